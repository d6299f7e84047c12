"""What the matched-loss, conv and local-target kernels share: the tile rule, the dot at a
given precision, and the softmax row loop (online max/sum over the row's column tiles).

Tile rule. A tile edge is the power of two at or above the dimension, clamped to
[MIN_TILE, the config's maximum]: ``tl.dot`` needs every edge >= 16, and a dimension smaller
than the maximum gets one tile instead of a mostly masked one.

Precision of the GEMMs (``PRECISIONS``), fp32 accumulation in every case:
    "ieee"  fp32 operands on the FMA units (fp32 rounding only, ~1e-6 relative)
    "tf32"  fp32 operands on the tensor cores, read as tf32 (10 mantissa bits)
    "bf16"  operands rounded to bf16 (8 bits, round-to-nearest-even) on the tensor cores
Under the interpreter (CPU) the tf32 and bf16 dots are emulated: the operands are reduced to
the format's bits (tf32: the low 13 mantissa bits dropped, the worst case of truncation and
rounding; bf16: rounded to nearest even) and multiplied in fp32, where products of such
values are exact, so the result is the tensor cores' up to the order of the fp32 sums. The
interpreter's own bf16 ``tl.dot`` multiplies bit patterns and its fp32 -> bf16 cast
truncates, so neither is used there. On the GPU the real instructions run; the compile check
(tools/triton_compile_check.py) verifies which ones.

Softmax row loop. f = softmax needs a row's max and sum before any output: one program owns
BLOCK_M rows across all N columns. Pass 1 produces each (BLOCK_M, BLOCK_N) pre-activation tile
(``tile_fn``), folds it into a running (max m, sum s of exp(z - m)) and, for tiles that are
costly to redo (a GEMM), parks it in an fp32 buffer; pass 2 reads or redoes each tile and
writes exp(z - m) / s - t_scale * T.
"""
import os

import triton
import triton.language as tl

#: tl.dot needs every tile edge >= 16.
MIN_TILE = 16

#: The precisions of the GEMM operands (module docstring).
PRECISIONS = ("ieee", "tf32", "bf16")

# The interpreter is chosen when ``@triton.jit`` decorates a kernel (at import), so this is
# read at import too: kernels imported under the interpreter emulate tf32/bf16 dots.
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile(n: int, high: int, low: int = MIN_TILE) -> int:
    """A power-of-two tile edge for a dimension of size n, clamped to [low, high]."""
    return max(low, min(high, next_pow2(n)))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@triton.jit
def _tf32_bits(v):
    """fp32 v with its low 13 mantissa bits cleared: the tf32 value the tensor cores read."""
    return (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_bits(v):
    """fp32 v rounded to the nearest bf16 (ties to even), kept in fp32; NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a, b fp32 tiles (edges >= 16); PRECISION one of
    ``PRECISIONS`` (module docstring)."""
    if PRECISION == "bf16":
        if INTERPRETED:
            acc = tl.dot(_bf16_bits(a), _bf16_bits(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == "tf32":
        if INTERPRETED:
            acc = tl.dot(_tf32_bits(a), _tf32_bits(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def online_softmax_update(m, s, z):
    """Fold a tile z (rows x cols, -inf outside the row) into the running row max m and
    the running sum s of exp(z - m); returns the new (m, s). Stable for |z| up to fp32 max.
    While a row has seen only -inf, m_new is -inf and exp(-inf - (-inf)) would be NaN: the
    exponents then use 0 as the shift (every term is exp(-inf) = 0, s stays 0)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
    return m_new, s_new


@triton.jit
def softmax_rows(tile_fn, src_ptr, w_ptr, b_ptr, has_bias, park_ptr, t_ptr, out_ptr, t_scale,
                 rows, B, N, K, PARK: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """out[rows, :] = softmax(Z[rows, :]) - t_scale * T[rows, :], every row of the block whole.

    ``tile_fn(src_ptr, w_ptr, b_ptr, rows, cols, B, N, K, has_bias, BLOCK_K, PRECISION)``
    gives the fp32 (len(rows), BLOCK_N) tile of Z at ``cols``; it must read finite values for
    rows past B (masked loads of 0) so that their max stays finite. T, out and the park buffer
    are (B, N) row-major; out and T may be any float dtype. PARK: pass 1 stores each Z tile
    in ``park_ptr`` (fp32) and pass 2 reads it back (for a GEMM tile); else pass 2 calls
    ``tile_fn`` again (a load). Pass 2 runs after pass 1 in the same program, so out may be
    the park buffer itself."""
    row_ok = rows < B
    m = tl.full((rows.shape[0],), float("-inf"), dtype=tl.float32)
    s = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        z = tile_fn(src_ptr, w_ptr, b_ptr, rows, cols, B, N, K, has_bias, BLOCK_K, PRECISION)
        m, s = online_softmax_update(m, s, tl.where(cols[None, :] < N, z, float("-inf")))
        if PARK:
            tl.store(park_ptr + rows[:, None] * N + cols[None, :], z,
                     mask=row_ok[:, None] & (cols[None, :] < N))
    if PARK:
        # Pass 2 reads what pass 1 of this same program wrote.
        tl.debug_barrier()
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        ok = row_ok[:, None] & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        if PARK:
            z = tl.load(park_ptr + offs, mask=ok, other=0.0)
        else:
            z = tile_fn(src_ptr, w_ptr, b_ptr, rows, cols, B, N, K, has_bias, BLOCK_K,
                        PRECISION)
        t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        out = tl.exp(z - m[:, None]) / s[:, None] - t_scale * t
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)
