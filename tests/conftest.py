"""Test setup: Triton runs on CPU through its interpreter when there is no GPU.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it is set here, before
anything imports ``locoprop_kernels.triton_kernels``.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from locoprop_kernels import backends  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
#: Every backend present on this machine; each one is tested against the reference.
BACKENDS = ["reference", "triton"] + (["cpp"] if backends.cpp_available() else [])

requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
#: For tests that run the triton backend on CPU tensors: that needs the interpreter, which is
#: off where a GPU is present (there the backend refuses CPU tensors with a ValueError).
requires_interpreter = pytest.mark.skipif(
    HAS_CUDA, reason="triton on CPU tensors runs only under the interpreter (no GPU)")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise relative error max|got - want| / max|want| (want in float64).

    Element-wise relative error is meaningless for gradients that cross zero; this is the
    error relative to the result's own scale."""
    want = want.double()
    scale = want.abs().max().clamp_min(1e-30)
    return ((got.double() - want).abs().max() / scale).item()


def f64(t):
    return None if t is None else t.detach().double()


def random_layer(B, d_in, d_out, activation, bias=True, dtype=torch.float32, x_dtype=None,
                 seed=0):
    """A random Linear layer's matched-loss inputs on DEVICE: x (B, d_in), W (d_out, d_in)
    scaled by 1/sqrt(d_in), b (d_out,) or None, y = f(random) (in f's range), and W0, b0 at 0.1
    from them; x and y in ``x_dtype`` (default ``dtype``), the rest in ``dtype``."""
    from locoprop_kernels.activations import ACTIVATIONS

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g) if bias else None
    y = ACTIVATIONS[activation].f(torch.randn(B, d_out, generator=g))
    w0 = w + 0.1 * torch.randn(d_out, d_in, generator=g)
    b0 = b + 0.1 * torch.randn(d_out, generator=g) if bias else None

    def to(t, dt=dtype):
        return None if t is None else t.to(DEVICE, dt)

    return to(x, x_dtype or dtype), to(w), to(b), to(y, x_dtype or dtype), to(w0), to(b0)

