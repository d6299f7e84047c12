"""Matched-loss gradient of a Conv2d+f layer: torch's convolutions for the GEMMs, Triton for
everything around them, on the channels-last row view of the layer's output.

    Z      = conv2d(X, W)              torch (cuDNN), channels-last: a (R, C_out) row matrix,
                                       R = N * H_out * W_out output positions
    D      = f(Z + b) - Y              ``_delta_kernel``, in place on Z (f over a row: softmax
                                       over the channels, two passes over the row's tiles)
    G_W    = conv2d_weight_grad(X, D)  torch (cuDNN), fp32 (C_out, K), K = C_in/groups*kh*kw
    grad_W = scale * G_W [+ (W - W0)/eta]           ``_finish_kernel``, one launch for both
    grad_b = scale * sum_r D[r, :] [+ (b - b0)/eta]

The finish kernel's programs split in two: the first ``weight_programs`` each own a chunk of
grad_W (element-wise), the rest each own a block of channels of grad_b and sum D's rows in a
fixed order (no atomics: deterministic), writing straight into the destination.
"""
import triton
import triton.language as tl

from . import configs
from ._common import softmax_rows, tile
from ._launch import launch
from .activation import SOFTMAX, apply_elementwise
from .matched_loss_grad import _add_prox  # the prox term's gradient, as for Linear

#: Elements of grad_W per program: 1024 fp32 is 4 KB, a full wave of loads on the GPU and few
#: Python-level iterations under the interpreter.
WEIGHT_BLOCK = 1024
#: Channels per bias program (columns of D) and rows per iteration of its reduction loop.
#: 16 channels spread a 64-channel layer's sum over 4 programs; 64 x 16 fp32 is 4 KB a step.
BIAS_COLUMNS = 16
BIAS_ROWS = 64


@triton.jit
def _preact_tile(z_ptr, unused_ptr, b_ptr, rows, cols, R, N, unused_k, has_bias,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Z + b on the (rows, cols) tile of the (R, N) row matrix, fp32; masked entries read 0
    (+ b: finite, so rows past R keep a finite max). The signature is ``softmax_rows``'s tile
    source; the unused arguments are the GEMM source's."""
    ok = (rows[:, None] < R) & (cols[None, :] < N)
    z = tl.load(z_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)
    if has_bias:
        z += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _delta_kernel(z_ptr, b_ptr, y_ptr, R, N, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Z <- f(Z + b) - Y in place, Z (R, N) fp32, Y (R, N). Grid (cdiv(R, BLOCK_M),
    cdiv(N, BLOCK_N)); (cdiv(R, BLOCK_M), 1) for softmax, whose program walks its rows' tiles
    twice (online max/sum, then write: ``_common.softmax_rows``, the tile re-read rather than
    parked, since it is a load); each element is read and written by one program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    if ACT == SOFTMAX:
        softmax_rows(_preact_tile, z_ptr, z_ptr, b_ptr, HAS_BIAS, z_ptr, y_ptr, z_ptr, 1.0,
                     rows, R, N, 0, False, BLOCK_N, BLOCK_N, "ieee")
    else:
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (rows[:, None] < R) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        z = _preact_tile(z_ptr, z_ptr, b_ptr, rows, cols, R, N, 0, HAS_BIAS, BLOCK_N, "ieee")
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(z_ptr + offs, apply_elementwise(z, ACT) - y, mask=ok)


@triton.jit
def _finish_kernel(gw32_ptr, w_ptr, w0_ptr, gw_ptr, d_ptr, b_ptr, b0_ptr, gb_ptr,
                   R, N, NK, scale, inv_eta, weight_programs,
                   HAS_PROX: tl.constexpr, WEIGHT_BLOCK: tl.constexpr,
                   BIAS_ROWS: tl.constexpr, BIAS_COLUMNS: tl.constexpr):
    """Grid (weight_programs + bias programs,): see the module docstring. D is (R, N) fp32,
    G_W and W are (N, K) with NK = N * K elements."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < weight_programs:
        offs = pid * WEIGHT_BLOCK + tl.arange(0, WEIGHT_BLOCK)
        ok = offs < NK
        grad = tl.load(gw32_ptr + offs, mask=ok, other=0.0) * scale
        if HAS_PROX:
            grad = _add_prox(grad, w_ptr, w0_ptr, offs, ok, inv_eta)
        tl.store(gw_ptr + offs, grad.to(gw_ptr.dtype.element_ty), mask=ok)
    else:
        cols = (pid - weight_programs) * BIAS_COLUMNS + tl.arange(0, BIAS_COLUMNS)
        col_ok = cols < N
        acc = tl.zeros((BIAS_ROWS, BIAS_COLUMNS), dtype=tl.float32)
        for r0 in range(0, R, BIAS_ROWS):
            rws = r0 + tl.arange(0, BIAS_ROWS).to(tl.int64)
            acc += tl.load(d_ptr + rws[:, None] * N + cols[None, :],
                           mask=(rws[:, None] < R) & col_ok[None, :], other=0.0)
        grad_b = tl.sum(acc, axis=0) * scale
        if HAS_PROX:
            grad_b = _add_prox(grad_b, b_ptr, b0_ptr, cols, col_ok, inv_eta)
        tl.store(gb_ptr + cols, grad_b.to(gb_ptr.dtype.element_ty), mask=col_ok)


def delta_rows_(z_rows, bias, target_rows, code: int) -> None:
    """Z <- f(Z + b) - Y in place on the contiguous (R, C_out) fp32 rows: one launch. ``bias``
    (C_out,) or None and ``target_rows`` (R, C_out) contiguous, of any float dtype."""
    R, N = z_rows.shape
    softmax = code == SOFTMAX.value
    cfg = configs.lookup("conv_delta", target_rows.dtype, softmax=softmax, shape=(R, N))
    bm, bn = tile(R, cfg.block_m), tile(N, cfg.block_n)
    grid = (triton.cdiv(R, bm), 1 if softmax else triton.cdiv(N, bn))
    launch(_delta_kernel, grid, z_rows, bias if bias is not None else z_rows, target_rows,
           R, N, HAS_BIAS=bias is not None, ACT=code, BLOCK_M=bm, BLOCK_N=bn,
           **cfg.launch_options())


def finish_into(grad_w32, delta, weight, anchor_weight, bias, anchor_bias, scale: float, eta,
                out_weight, out_bias) -> None:
    """out_weight = scale * grad_w32 [+ (W - W0)/eta], out_bias = scale * sum_r delta[r]
    [+ (b - b0)/eta]: one launch. ``grad_w32`` fp32 and W, W0, out_weight contiguous with
    grad_w32's element order; ``delta`` (R, C_out) fp32 contiguous; ``out_bias`` None when
    there is no bias."""
    R, N = delta.shape
    NK = grad_w32.numel()
    has_prox = eta is not None
    weight_programs = triton.cdiv(NK, WEIGHT_BLOCK)
    bias_programs = triton.cdiv(N, BIAS_COLUMNS) if out_bias is not None else 0
    launch(_finish_kernel, (weight_programs + bias_programs,), grad_w32,
           weight if has_prox else grad_w32, anchor_weight if has_prox else grad_w32,
           out_weight, delta,
           bias if (has_prox and out_bias is not None) else grad_w32,
           anchor_bias if (has_prox and out_bias is not None) else grad_w32,
           out_bias if out_bias is not None else out_weight,
           R, N, NK, float(scale), 1.0 / eta if has_prox else 0.0, weight_programs,
           HAS_PROX=has_prox, WEIGHT_BLOCK=WEIGHT_BLOCK, BIAS_ROWS=BIAS_ROWS,
           BIAS_COLUMNS=BIAS_COLUMNS)
