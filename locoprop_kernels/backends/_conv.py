"""What the compiled backends share for Conv2d layers: torch's convolutions as the GEMMs, and
the channels-last row view that lets the Linear epilogue kernels run on their output.

A Conv2d pre-activation Z (N, C_out, H_out, W_out) stored channels-last (NHWC in memory) is,
byte for byte, a row-major (N * H_out * W_out, C_out) matrix: one row per output position,
one column per channel. That is section 2's (B, d_out) layout with B = positions, so the
Linear delta kernel (f over a row, softmax included) and finish kernel (column sums for
grad_b) run on it unchanged. The input is made channels-last too, so that torch's
convolution (oneDNN on the CPU, cuDNN on the GPU) writes Z channels-last, and its weight
gradient reads D in the layout the delta kernel left it in.
"""
from __future__ import annotations

import contextlib

import torch

CHANNELS_LAST = torch.channels_last


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """t (N, C, H, W) with NHWC memory; t itself when it already is."""
    return t.contiguous(memory_format=CHANNELS_LAST)


def rows(t: torch.Tensor) -> torch.Tensor:
    """The (N*H*W, C) row matrix of a channels-last (N, C, H, W) tensor: a view, never a
    copy (the kernels write through it)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n * h * w, c)


def rows_copy(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A contiguous (N*H*W, C) row matrix holding t's values (in ``dtype`` when given): a view
    when t is channels-last already and of that dtype (then nothing is copied), else one
    transposing (and converting) copy."""
    n, c, h, w = t.shape
    nhwc = t.permute(0, 2, 3, 1)
    if dtype is None or dtype == t.dtype:
        return nhwc.reshape(n * h * w, c).contiguous()
    out = torch.empty((n * h * w, c), dtype=dtype, device=t.device)
    out.view(n, h, w, c).copy_(nhwc)
    return out


@contextlib.contextmanager
def conv_precision(precision: str, device: torch.device):
    """fp32 convolutions on CUDA in IEEE fp32 ("ieee": cuDNN's TF32 off for the block) or
    TF32 ("tf32"). cuDNN allows TF32 for convolutions by default, which would cost fp32 its
    1e-5 accuracy. Nothing to do on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def preactivation(x32, w32, stride, padding, dilation, groups) -> torch.Tensor:
    """Z = conv2d(X, W) without bias, fp32, channels-last (N, C_out, H_out, W_out)."""
    z = torch.nn.functional.conv2d(channels_last(x32), w32, None, stride, padding, dilation,
                                   groups)
    return channels_last(z)  # a no-op unless the library chose another layout


def weight_grad(x32, w32, d, stride, padding, dilation, groups) -> torch.Tensor:
    """conv2d_weight_grad(X, D) (the GEMM D^T X of section 2 per position), fp32, contiguous
    (C_out, C_in/groups, kh, kw): the finish kernels index it as a (C_out, K) matrix."""
    gw = torch.ops.aten.convolution_backward(
        d, channels_last(x32), w32, None, list(stride), list(padding), list(dilation), False,
        [0, 0], groups, [False, True, False])[1]
    return gw.contiguous()
