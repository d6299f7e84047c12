"""LocoProp targets from one backward pass, one fused element-wise (row-wise for softmax) pass.

    variant M:  Y = f(Z) - gamma * G     variant S:  Y = Z - gamma * G  (launched as identity)

Z and G are (B, d_out); G = dL/dZ already carries the loss's 1/B. Softmax needs its row's max
and sum first: one program owns BLOCK_M rows and walks the columns twice (stats, then write).
"""
import torch
import triton
import triton.language as tl

from . import configs
from ._common import softmax_rows, tile
from ._launch import launch
from .activation import IDENTITY, SOFTMAX, apply_elementwise


@triton.jit
def _z_tile(z_ptr, unused_ptr, unused_b_ptr, rows, cols, B, N, unused_k, unused_has_bias,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Z's (rows, cols) tile in fp32, masked entries 0 (finite rows past B); the signature is
    ``softmax_rows``'s tile source."""
    return tl.load(z_ptr + rows[:, None] * N + cols[None, :],
                   mask=(rows[:, None] < B) & (cols[None, :] < N), other=0.0).to(tl.float32)


@triton.jit
def _targets_kernel(z_ptr, g_ptr, y_ptr, B, N, gamma, ACT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y = f(Z) - gamma G. Grid (cdiv(B, BLOCK_M), cdiv(N, BLOCK_N)); (cdiv(B, BLOCK_M), 1)
    for softmax, whose program loops over all columns."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if ACT == SOFTMAX:
        # Z is re-read in pass 2 (parking it would round it to Y's dtype).
        softmax_rows(_z_tile, z_ptr, z_ptr, z_ptr, 0, z_ptr, g_ptr, y_ptr, gamma, rows, B, N,
                     0, False, BLOCK_N, BLOCK_N, "ieee")
    else:
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = apply_elementwise(z, ACT) - gamma * g
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def local_targets_into(preact, grad_preact, code: int, gamma: float, variant: str, out) -> None:
    """Write the targets into ``out`` (B, d_out), one launch. Inputs contiguous."""
    if variant == "S":
        code = IDENTITY.value
    B, N = preact.shape
    softmax = code == SOFTMAX.value
    cfg = configs.lookup("targets", preact.dtype, softmax=softmax, shape=(B, N))
    bm, bn = tile(B, cfg.block_m), tile(N, cfg.block_n)
    grid = (triton.cdiv(B, bm), 1 if softmax else triton.cdiv(N, bn))
    launch(_targets_kernel, grid, preact, grad_preact, out, B, N, float(gamma),
           ACT=code, BLOCK_M=bm, BLOCK_N=bn, **cfg.launch_options())
