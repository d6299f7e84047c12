"""Matched-loss gradient of a Linear+f layer as two fused Triton GEMMs.

    stage 1  D = f(X W^T + b) - Y                              (B, d_out), fp32 scratch
    stage 2  grad_W = scale * D^T X [+ (W - W0)/eta]           (d_out, d_in)
             grad_b = scale * sum_n D_n [+ (b - b0)/eta]       (d_out,)

Stage 1 is a GEMM whose epilogue applies f and subtracts the target. Softmax needs the whole
row, so for it one program owns BLOCK_M rows across all of d_out: pass 1 computes the Z tiles,
parks them in D and folds them into an online (max, sum); pass 2 turns them into
softmax - Y in place. Stage 2 reduces over the batch inside each program (a loop over B, no
atomics: bit-for-bit deterministic), adds the bias gradient and the prox term in its epilogue
and writes straight into the destination (which may be a view into an arena).
Inputs are loaded in their storage dtype and upcast to fp32 in registers; ``precision``
("ieee", "tf32", "bf16", ``_common.dot``) says what the tensor cores or FMA units are given.
Tile edges, warps and pipeline stages come from the config table (``configs.py``).
"""
import torch
import triton
import triton.language as tl

from . import configs
from ._common import check_precision, dot, softmax_rows, tile
from ._launch import launch
from .activation import SOFTMAX, apply_elementwise


@triton.jit
def _preact_tile(x_ptr, w_ptr, b_ptr, rows, cols, B, N, K, has_bias,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Z[rows, cols] = X[rows] W[cols]^T + b[cols] as an fp32 (BLOCK_M, BLOCK_N) tile.
    ``has_bias`` (0 or 1) may be a constexpr or a run-time value (the grouped kernels)."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < K), other=0.0)
        # W^T tile (BLOCK_K, BLOCK_N) read straight from W's (d_out, d_in) layout.
        w_t = tl.load(w_ptr + cols[None, :] * K + ks[:, None],
                      mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc = dot(x.to(tl.float32), w_t.to(tl.float32), acc, PRECISION)
    # tl.full turns a scalar flag into a vector mask (the interpreter cannot AND a 0-d bool).
    bias_ok = (cols < N) & (tl.full(cols.shape, has_bias, tl.int32) != 0)
    bias = tl.load(b_ptr + cols, mask=bias_ok, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def delta_block(x_ptr, w_ptr, b_ptr, y_ptr, d_ptr, pid_m, pid_n, B, N, K, has_bias, act,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, USER_F: tl.constexpr = None):
    """D = f(X W^T + b) - Y on rows block pid_m and column block pid_n; for softmax on all
    columns of rows block pid_m (pid_n ignored): pass 1 parks Z in D and folds it into an
    online (max, sum), pass 2 turns it into softmax - Y in place. ``act``, the activation
    code, is a constexpr (``_delta_kernel``: the branches fold) or a run-time scalar (the
    grouped kernel: softmax vs element-wise is a branch uniform over the program).
    ``USER_F``: a registered activation's ``@triton.jit`` f, used instead of the code's."""
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if act == SOFTMAX:
        # Z tiles are GEMMs: parked in D by pass 1, turned into softmax - Y there by pass 2.
        softmax_rows(_preact_tile, x_ptr, w_ptr, b_ptr, has_bias, d_ptr, y_ptr, d_ptr, 1.0,
                     rows, B, N, K, True, BLOCK_N, BLOCK_K, PRECISION)
    else:
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        z = _preact_tile(x_ptr, w_ptr, b_ptr, rows, cols, B, N, K, has_bias, BLOCK_K,
                         PRECISION)
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if USER_F is not None:
            f = USER_F(z)
        else:
            f = apply_elementwise(z, act)
        tl.store(d_ptr + offs, f - y, mask=ok)


@triton.jit
def _add_prox(grad, p_ptr, p0_ptr, offs, mask, inv_eta):
    """grad + (P - P0) / eta on a tile: the prox term's gradient, in fp32."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p0 = tl.load(p0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return grad + (p - p0) * inv_eta


@triton.jit
def weight_grad_block(x_ptr, d_ptr, w_ptr, w0_ptr, b_ptr, b0_ptr, gw_ptr, gb_ptr,
                      pid_n, pid_k, B, N, K, scale, inv_eta, has_bias,
                      HAS_PROX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """grad_W tile (BLOCK_N, BLOCK_K) at (pid_n, pid_k) = scale * D^T X [+ (W - W0)/eta],
    reduced over all B rows here (a fixed-order loop: deterministic); the pid_k == 0 tile
    also writes grad_b = scale * sum_n D_n [+ (b - b0)/eta]."""
    outs = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ins = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        # D^T tile (BLOCK_N, BLOCK_M) read straight from D's (B, d_out) layout.
        d_t = tl.load(d_ptr + rows[None, :] * N + outs[:, None],
                      mask=(rows[None, :] < B) & (outs[:, None] < N), other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + ins[None, :],
                    mask=(rows[:, None] < B) & (ins[None, :] < K), other=0.0)
        acc = dot(d_t, x.to(tl.float32), acc, PRECISION)
        acc_b += tl.sum(d_t, axis=1)  # a row sum of a tile in registers: free next to the dot
    w_offs = outs[:, None] * K + ins[None, :]
    w_ok = (outs[:, None] < N) & (ins[None, :] < K)
    grad = acc * scale
    if HAS_PROX:
        grad = _add_prox(grad, w_ptr, w0_ptr, w_offs, w_ok, inv_eta)
    tl.store(gw_ptr + w_offs, grad.to(gw_ptr.dtype.element_ty), mask=w_ok)
    b_ok = ((outs < N) & (tl.full((BLOCK_N,), pid_k, tl.int32) == 0)
            & (tl.full((BLOCK_N,), has_bias, tl.int32) != 0))
    grad_b = acc_b * scale
    if HAS_PROX:
        grad_b = _add_prox(grad_b, b_ptr, b0_ptr, outs, b_ok, inv_eta)
    tl.store(gb_ptr + outs, grad_b.to(gb_ptr.dtype.element_ty), mask=b_ok)


@triton.jit
def _delta_kernel(x_ptr, w_ptr, b_ptr, y_ptr, d_ptr, B, N, K,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                  USER_F: tl.constexpr = None):
    """Stage 1 for one layer. Grid (cdiv(B, BLOCK_M), cdiv(N, BLOCK_N)); (cdiv(B, BLOCK_M), 1)
    for softmax."""
    delta_block(x_ptr, w_ptr, b_ptr, y_ptr, d_ptr, tl.program_id(0), tl.program_id(1),
                B, N, K, HAS_BIAS, ACT, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, USER_F)


@triton.jit
def _weight_grad_kernel(x_ptr, d_ptr, w_ptr, w0_ptr, b_ptr, b0_ptr, gw_ptr, gb_ptr,
                        B, N, K, scale, inv_eta,
                        HAS_BIAS: tl.constexpr, HAS_PROX: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Stage 2 for one layer. Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    weight_grad_block(x_ptr, d_ptr, w_ptr, w0_ptr, b_ptr, b0_ptr, gw_ptr, gb_ptr,
                      tl.program_id(0), tl.program_id(1), B, N, K, scale, inv_eta, HAS_BIAS,
                      HAS_PROX, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


def delta(x, weight, bias, target, code: int, *, precision: str = "ieee", out=None,
          user_f=None):
    """Launch stage 1 and return D = f(X W^T + b) - Y as fp32 (B, d_out); ``user_f``: a
    registered activation's @triton.jit f (then ``code`` is not read)."""
    check_precision(precision)
    B, K = x.shape
    N = weight.shape[0]
    d = torch.empty((B, N), device=x.device, dtype=torch.float32) if out is None else out
    softmax = user_f is None and code == SOFTMAX.value
    cfg = configs.lookup("delta", x.dtype, precision, softmax=softmax, shape=(B, N, K))
    bm, bn, bk = tile(B, cfg.block_m), tile(N, cfg.block_n), tile(K, cfg.block_k)
    grid = (triton.cdiv(B, bm), 1 if softmax else triton.cdiv(N, bn))
    launch(_delta_kernel, grid, x, weight, bias if bias is not None else x, target, d, B, N, K,
           HAS_BIAS=int(bias is not None), ACT=code, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
           PRECISION=precision, USER_F=user_f, **cfg.launch_options())
    return d


def matched_loss_grad_into(x, weight, bias, target, code: int, scale: float,
                           anchor_weight, anchor_bias, eta, out_weight, out_bias,
                           *, precision: str = "ieee", user_f=None) -> None:
    """Write the matched-loss gradient into ``out_weight`` (and ``out_bias``): two launches.

    All tensors must be contiguous; shapes as in the module docstring. ``eta`` None turns
    the prox term off. The outputs may have any float dtype (math is fp32).
    """
    d = delta(x, weight, bias, target, code, precision=precision, user_f=user_f)
    B, K = x.shape
    N = weight.shape[0]
    cfg = configs.lookup("weight_grad", x.dtype, precision, shape=(B, N, K))
    bm, bn, bk = tile(B, cfg.block_m), tile(N, cfg.block_n), tile(K, cfg.block_k)
    has_prox = eta is not None
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    launch(_weight_grad_kernel, grid, x, d, weight,
           anchor_weight if has_prox else weight,
           bias if bias is not None else weight,
           anchor_bias if (has_prox and bias is not None) else weight,
           out_weight, out_bias if bias is not None else out_weight,
           B, N, K, float(scale), 1.0 / eta if has_prox else 0.0,
           HAS_BIAS=int(bias is not None), HAS_PROX=has_prox, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
           PRECISION=precision, **cfg.launch_options())
