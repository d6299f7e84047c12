"""Preloaded by the fork server of tests/test_cpp_hostile.py: torch, the package, and one call
of every op, so that each forked case starts warm (the first op call of a process sets up
torch.library's dispatch: ~1 s, which 32 cases would pay 32 times).

Single-threaded on purpose: OpenMP's thread pool does not survive fork(), so the server never
starts one; each child sets its own thread count and starts a pool of its own.
"""
import torch

import locoprop_kernels as lk
from locoprop_kernels import reference  # noqa: F401  (imported for the children)

torch.set_num_threads(1)


def _warm_up():
    x, w, b, y = torch.randn(3, 2), torch.randn(4, 2), torch.randn(4), torch.rand(3, 4)
    for backend in ("cpp", "reference"):
        lk.matched_loss_grad(x, w, b, y, "tanh", backend=backend, eta=0.5, anchor_weight=w,
                             anchor_bias=b)
        lk.local_targets(y, y, "softmax", 1.0, backend=backend)
        lk.rmsprop_step_([w.clone()], [w], [torch.ones_like(w)], [torch.zeros_like(w)], lr=0.1,
                         backend=backend)
        lk.matched_loss_grad_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), None,
                                    torch.rand(1, 3, 3, 3), "tanh", backend=backend)


_warm_up()
