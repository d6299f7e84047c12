"""LocoProp targets from one backward pass, one fused element-wise (row-wise for softmax) pass.

    variant M:  Y = f(Z) - gamma * G     variant S:  Y = Z - gamma * G  (launched as identity)

Z and G are (B, d_out); G = dL/dZ already carries the loss's 1/B. Softmax needs its row's max
and sum first: one program owns BLOCK_M rows and walks the columns twice (stats, then write).
"""
import torch
import triton
import triton.language as tl

from ._launch import launch, tile
from .activation import IDENTITY, SOFTMAX, apply_elementwise, online_softmax_update

# Element-wise work: 64 x 64 tiles (4096 elements) keep a program busy on the GPU and keep
# the interpreter's per-tile overhead small; 16 is the floor for tiny layers.
MIN_TILE = 16
MAX_TILE = 64


@triton.jit
def _targets_kernel(z_ptr, g_ptr, y_ptr, B, N, gamma, ACT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y = f(Z) - gamma G. Grid (cdiv(B, BLOCK_M), cdiv(N, BLOCK_N)); (cdiv(B, BLOCK_M), 1)
    for softmax, whose program loops over all columns."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if ACT == SOFTMAX:
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            ok = row_ok[:, None] & (cols[None, :] < N)
            z = tl.load(z_ptr + rows[:, None] * N + cols[None, :], mask=ok,
                        other=float("-inf")).to(tl.float32)
            # Rows past B are all -inf: give them one finite column so m stays finite.
            z = tl.where(row_ok[:, None] | (cols[None, :] != n0), z, 0.0)
            m, s = online_softmax_update(m, s, z)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            ok = row_ok[:, None] & (cols[None, :] < N)
            offs = rows[:, None] * N + cols[None, :]
            z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            y = tl.exp(z - m[:, None]) / s[:, None] - gamma * g
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
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
    bm, bn = tile(B, MIN_TILE, MAX_TILE), tile(N, MIN_TILE, MAX_TILE)
    grid = (triton.cdiv(B, bm), 1 if code == SOFTMAX.value else triton.cdiv(N, bn))
    launch(_targets_kernel, grid, preact, grad_preact, out, B, N, float(gamma),
           ACT=code, BLOCK_M=bm, BLOCK_N=bn)
