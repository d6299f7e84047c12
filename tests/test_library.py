"""torch.library integration: opcheck on every op, torch.compile(fullgraph=True) over them."""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import ops

from conftest import BACKENDS, DEVICE, f64, rel_err


def _layer(bias=True):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    y = torch.rand(9, 5, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(b), to(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_matched_loss_grad(backend, bias):
    x, w, b, y = _layer(bias)
    w0 = w + 0.1
    b0 = None if b is None else b + 0.1
    torch.library.opcheck(ops._matched_loss_grad_op,
                          (x, w, b, y, "softmax", 0.5, w0, b0, 0.3, backend, "ieee"))
    out_w = torch.empty_like(w)
    out_b = None if b is None else torch.empty_like(b)
    torch.library.opcheck(ops._matched_loss_grad_out_op,
                          (x, w, b, y, "tanh", 1.0, None, None, None, backend, "ieee",
                           out_w, out_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_local_targets(backend):
    z = torch.randn(7, 4, device=DEVICE)
    # A stride-0 gradient, as `.sum().backward()` produces (NOTES: opcheck found this once).
    g = torch.ones(1, 1, device=DEVICE).expand(7, 4)
    torch.library.opcheck(ops._local_targets_op, (z, g, "sigmoid", 10.0, "M", backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["tf", "torch"])
@pytest.mark.parametrize("every_option", [False, True])
def test_opcheck_rmsprop(backend, style, every_option):
    shapes = [(4, 3), (3,)]
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    grads = [torch.randn(s, device=DEVICE) for s in shapes]
    ms = [torch.ones(s, device=DEVICE) for s in shapes]
    bufs = [torch.zeros(s, device=DEVICE) for s in shapes]
    avgs = [torch.zeros(s, device=DEVICE) for s in shapes] if every_option else []
    # lr as a value (a CPU scalar) and, with every option on, as a device tensor.
    lr = torch.full((1,), 0.1, device=DEVICE) if every_option else torch.tensor(0.1)
    torch.library.opcheck(ops._rmsprop_step_op,
                          (params, grads, ms, bufs, avgs, lr, style, 0.9, 1e-5,
                           0.1 if every_option else 0.0, 0.9, every_option, every_option,
                           backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """One compiled function that calls every op: no graph break, same numbers as eager."""
    x, w, b, y = _layer()

    def local_step(x, w, b, z, g, ms, buf):
        target = lk.local_targets(z, g, "tanh", 10.0, backend=backend)
        gw, gb = lk.matched_loss_grad(x, w, b, target, "tanh", scale=0.5, backend=backend)
        lk.rmsprop_step_([w, b], [gw, gb], ms, buf, lr=1e-3, backend=backend)
        return gw, gb

    def fresh():
        return (w.clone(), b.clone(), [torch.ones_like(w), torch.ones_like(b)],
                [torch.zeros_like(w), torch.zeros_like(b)])

    z, g = torch.randn(9, 5, device=DEVICE), torch.randn(9, 5, device=DEVICE)
    w_e, b_e, ms_e, buf_e = fresh()
    eager = local_step(x, w_e, b_e, z, g, ms_e, buf_e)
    w_c, b_c, ms_c, buf_c = fresh()
    compiled = torch.compile(local_step, fullgraph=True)
    got = compiled(x, w_c, b_c, z, g, ms_c, buf_c)
    for a, e in zip(got, eager):
        assert rel_err(a, f64(e)) <= 1e-6
    assert rel_err(w_c, f64(w_e)) <= 1e-6 and rel_err(ms_c[0], f64(ms_e[0])) <= 1e-6
