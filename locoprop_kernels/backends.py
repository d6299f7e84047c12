"""Backend selection and the three backends behind one interface.

A backend writes into caller-given outputs:
    matched_loss_grad_into(x, weight, bias, target, activation, scale, anchor_weight,
                           anchor_bias, eta, out_weight, out_bias, precision)
    local_targets_into(preact, grad_preact, activation, gamma, variant, out)
    rmsprop_step_(params, grads, square_avgs, momentum_bufs, lr, alpha, eps, momentum, style)
Arguments arrive validated (``validation.py``); backends only make layouts what their kernels
need. Selection (DESIGN.md section 4): ``backend=`` wins, then ``LOCOPROP_BACKEND``, then auto:
CUDA tensors -> triton, CPU tensors -> cpp when the extension is built, else reference.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import reference
from .activations import get_activation

NAMES = ("reference", "triton", "cpp")
HALF_DTYPES = (torch.float16, torch.bfloat16)


class ReferenceBackend:
    """The oracle run as a backend: plain PyTorch, half dtypes computed in fp32."""

    name = "reference"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    @staticmethod
    def _math(t):
        return None if t is None else (t.float() if t.dtype in HALF_DTYPES else t)

    def matched_loss_grad_into(self, x, weight, bias, target, activation, scale, anchor_weight,
                               anchor_bias, eta, out_weight, out_bias, precision):
        m = self._math
        gw, gb = reference.matched_loss_grad(m(x), m(weight), m(bias), m(target), activation,
                                             scale=scale, anchor_weight=m(anchor_weight),
                                             anchor_bias=m(anchor_bias), eta=eta)
        out_weight.copy_(gw)
        if out_bias is not None:
            out_bias.copy_(gb)

    def local_targets_into(self, preact, grad_preact, activation, gamma, variant, out):
        m = self._math
        out.copy_(reference.local_targets(m(preact), m(grad_preact), activation, gamma,
                                          variant=variant))

    def rmsprop_step_(self, params, grads, square_avgs, momentum_bufs, lr, alpha, eps,
                      momentum, style):
        reference.rmsprop_step_(params, grads, square_avgs, momentum_bufs or None, lr=lr,
                                alpha=alpha, eps=eps, momentum=momentum, style=style)


def _contiguous_out(out, fill):
    """Run ``fill(buffer)`` on ``out`` itself when contiguous, else on a copy written back."""
    if out is None or out.is_contiguous():
        fill(out)
        return
    tmp = out.contiguous()
    fill(tmp)
    out.copy_(tmp)


class TritonBackend:
    """Fused Triton kernels (``locoprop_kernels.triton_kernels``); fp32 state."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self):
        self.kernels = importlib.import_module("locoprop_kernels.triton_kernels")

    def matched_loss_grad_into(self, x, weight, bias, target, activation, scale, anchor_weight,
                               anchor_bias, eta, out_weight, out_bias, precision):
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        code = get_activation(activation).code

        def fill_weight(gw):
            _contiguous_out(out_bias, lambda gb: self.kernels.matched_loss_grad_into(
                c(x), c(weight), c(bias), c(target), code, scale, c(anchor_weight),
                c(anchor_bias), eta, gw, gb, precision=precision))

        _contiguous_out(out_weight, fill_weight)

    def local_targets_into(self, preact, grad_preact, activation, gamma, variant, out):
        code = get_activation(activation).code
        _contiguous_out(out, lambda y: self.kernels.local_targets_into(
            preact.contiguous(), grad_preact.contiguous(), code, gamma, variant, y))

    def rmsprop_step_(self, params, grads, square_avgs, momentum_bufs, lr, alpha, eps,
                      momentum, style):
        # In-place tensors with gaps or odd strides are updated through contiguous copies.
        work = [[t if t.is_contiguous() else t.contiguous() for t in ts]
                for ts in (params, square_avgs, momentum_bufs)]
        self.kernels.rmsprop_step_(work[0], [g.contiguous() for g in grads], work[1], work[2],
                                   lr=lr, alpha=alpha, eps=eps, momentum=momentum, style=style)
        for originals, copies in zip((params, square_avgs, momentum_bufs), work):
            for t, w in zip(originals, copies):
                if t is not w:
                    t.copy_(w)


_INSTANCES: dict = {}
_warned_missing_cpp = False


def cpp_available() -> bool:
    """Whether the compiled extension ``locoprop_kernels._C`` can be imported."""
    try:
        importlib.import_module("locoprop_kernels._C")
    except ImportError:
        return False
    return True


def _make(name: str):
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        return TritonBackend()
    return importlib.import_module("locoprop_kernels.cpp_backend").CppBackend()


def resolve(op: str, backend, device: torch.device):
    """The backend object for an op call, by the rules in this module's docstring."""
    global _warned_missing_cpp
    name = backend or os.environ.get("LOCOPROP_BACKEND") or None
    if name is not None and name not in NAMES:
        raise ValueError(f"locoprop.{op}: argument 'backend' expected one of "
                         f"{[None, *NAMES]}, got {name!r}")
    if name is None:
        if device.type == "cuda":
            name = "triton"
        elif cpp_available():
            name = "cpp"
        else:
            if not _warned_missing_cpp and _cpp_expected():
                warnings.warn("locoprop_kernels._C (the C++ backend) is not built; "
                              "CPU ops fall back to the 'reference' backend", RuntimeWarning,
                              stacklevel=3)
                _warned_missing_cpp = True
            name = "reference"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"locoprop.{op}: backend 'triton' needs CUDA tensors, got device "
                         f"{device}; on CPU it runs only under the Triton interpreter "
                         f"(set TRITON_INTERPRET=1 before importing locoprop_kernels)")
    if name == "cpp" and not cpp_available():
        raise ValueError(f"locoprop.{op}: backend 'cpp' asked for, but the C++ extension "
                         f"locoprop_kernels._C is not built (reinstall with a C++ compiler)")
    if name not in _INSTANCES:
        _INSTANCES[name] = _make(name)
    return _INSTANCES[name]


def _cpp_expected() -> bool:
    """A missing extension is worth a warning only where a C++ backend source exists."""
    return importlib.util.find_spec("locoprop_kernels.cpp_backend") is not None
