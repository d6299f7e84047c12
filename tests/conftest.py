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
