"""Matched-loss gradient of a Linear+f layer as two fused Triton GEMMs.

    stage 1  D = f(X W^T + b) - Y                              (B, d_out), fp32 scratch
             (delta form: Z = Z0 + X (W - W0)^T + (b - b0) in place of X W^T + b)
    stage 2  grad_W = scale * D^T X [+ (W - W0)/eta]           (d_out, d_in)
             grad_b = scale * sum_n D_n [+ (b - b0)/eta]       (d_out,)

Stage 1 is a GEMM whose epilogue applies f and subtracts the target. Softmax needs the whole
row, so for it one program owns BLOCK_M rows across all of d_out: pass 1 computes the Z tiles,
parks them in D and folds them into an online (max, sum); pass 2 turns them into
softmax - Y in place. Stage 2 reduces over the batch with no atomics, in a fixed order:
bit-for-bit deterministic. When its output tiles alone fill the card it is one launch, each
program looping over all B rows, adding the bias gradient and the prox term in its epilogue
and writing straight into the destination (which may be a view into an arena). Otherwise
(``configs.split_k_slices``) it is a split-K over B in two launches: pass 1, program
(tile, s), reduces slice s of the rows into fp32 partials (S, d_out, d_in) and (S, d_out);
pass 2 sums them in the order s = 0..S-1 and applies the same epilogue.
Inputs are loaded in their storage dtype and upcast to fp32 in registers; ``precision``
("ieee", "tf32", "bf16", ``_common.dot``) says what the tensor cores or FMA units are given.
The delta form of stage 1 (``anchor_preact`` Z0 given: LocoProp's inner iterations, where
W = W0 + dW with a small dW) is a kernel of its own, ``_anchored_delta_kernel``: it loads W and
W0, forms dW in fp32, hands dW (not W) to the dot at ``precision`` and adds Z0 and b - b0 in
fp32 in the epilogue, so the operands' rounding costs the rounding unit of X dW^T, not of
X W^T (which would swamp X dW^T). Without Z0, ``_delta_kernel`` runs as before.
Tile edges, warps and pipeline stages come from the config table (``configs.py``).
"""
from dataclasses import dataclass

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
def _store_elementwise_delta(z, y_ptr, d_ptr, offs, ok, act, USER_F: tl.constexpr):
    """D = f(Z) - Y on an element-wise tile: Z an fp32 tile, Y and D at ``offs`` (masked by
    ``ok``); f is ``USER_F`` (a registered activation's ``@triton.jit`` f) when given, else
    the table row of ``act``. Shared by the plain and the delta-form stage 1."""
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if USER_F is not None:
        f = USER_F(z)
    else:
        f = apply_elementwise(z, act)
    tl.store(d_ptr + offs, f - y, mask=ok)


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
        _store_elementwise_delta(z, y_ptr, d_ptr, offs, ok, act, USER_F)


@triton.jit
def _anchored_preact_tile(x_ptr, w_ptr, w0_ptr, z0_ptr, b_ptr, b0_ptr, rows, cols, B, N, K,
                          has_bias, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Z[rows, cols] = Z0[rows, cols] + X[rows] (W - W0)[cols]^T + (b - b0)[cols] as an fp32
    (BLOCK_M, BLOCK_N) tile: W - W0 is formed in fp32 (exact to fp32 when W is near W0) and
    only it and X go through the dot at ``PRECISION``; Z0 and the bias update are added in
    fp32. Masked entries read 0, so rows past B give finite values (softmax's max).
    ``has_bias`` (0 or 1) may be a constexpr or a run-time value (the grouped kernel)."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < K), other=0.0)
        # (W - W0)^T tile (BLOCK_K, BLOCK_N) read straight from the (d_out, d_in) layouts.
        w_offs = cols[None, :] * K + ks[:, None]
        w_ok = (cols[None, :] < N) & (ks[:, None] < K)
        w_t = tl.load(w_ptr + w_offs, mask=w_ok, other=0.0).to(tl.float32)
        w0_t = tl.load(w0_ptr + w_offs, mask=w_ok, other=0.0).to(tl.float32)
        acc = dot(x.to(tl.float32), w_t - w0_t, acc, PRECISION)
    ok = (rows[:, None] < B) & (cols[None, :] < N)
    z = acc + tl.load(z0_ptr + rows[:, None] * N + cols[None, :], mask=ok,
                      other=0.0).to(tl.float32)
    # A mask, not a branch, so that a run-time flag works too (as in ``_preact_tile``).
    bias_ok = (cols < N) & (tl.full(cols.shape, has_bias, tl.int32) != 0)
    b = tl.load(b_ptr + cols, mask=bias_ok, other=0.0).to(tl.float32)
    b0 = tl.load(b0_ptr + cols, mask=bias_ok, other=0.0).to(tl.float32)
    return z + (b - b0)[None, :]


@triton.jit
def _parked_tile(z_ptr, unused_w_ptr, unused_b_ptr, rows, cols, B, N, unused_k, unused_bias,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The parked fp32 Z tile of a (B, N) row-major buffer (masked entries 0): the tile
    source of ``_common.softmax_rows`` for Z already formed (the unused arguments are the
    GEMM source's)."""
    ok = (rows[:, None] < B) & (cols[None, :] < N)
    return tl.load(z_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)


@triton.jit
def anchored_delta_block(x_ptr, w_ptr, w0_ptr, z0_ptr, b_ptr, b0_ptr, y_ptr, d_ptr, pid_m,
                         pid_n, B, N, K, has_bias, act, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr, USER_F: tl.constexpr = None):
    """Stage 1 in the delta form on rows block pid_m and column block pid_n (softmax: all
    columns of rows block pid_m, pid_n ignored): D = f(Z0 + X (W - W0)^T + (b - b0)) - Y
    (``_anchored_preact_tile``). Softmax: pass 1 parks the program's Z tiles (all of d_out)
    in D, then ``softmax_rows`` reads them back twice (its online max/sum, then softmax - Y
    in place): its own tile source takes three pointers, the delta form needs six. ``act``
    and ``has_bias`` are constexprs (``_anchored_delta_kernel``) or run-time scalars (the
    grouped kernel, as in ``delta_block``)."""
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if act == SOFTMAX:
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            z = _anchored_preact_tile(x_ptr, w_ptr, w0_ptr, z0_ptr, b_ptr, b0_ptr, rows, cols,
                                      B, N, K, has_bias, BLOCK_K, PRECISION)
            tl.store(d_ptr + rows[:, None] * N + cols[None, :], z,
                     mask=row_ok[:, None] & (cols[None, :] < N))
        tl.debug_barrier()  # softmax_rows reads what this program wrote
        softmax_rows(_parked_tile, d_ptr, d_ptr, d_ptr, 0, d_ptr, y_ptr, d_ptr, 1.0, rows, B, N,
                     K, False, BLOCK_N, BLOCK_K, PRECISION)
    else:
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        z = _anchored_preact_tile(x_ptr, w_ptr, w0_ptr, z0_ptr, b_ptr, b0_ptr, rows, cols, B,
                                  N, K, has_bias, BLOCK_K, PRECISION)
        _store_elementwise_delta(z, y_ptr, d_ptr, offs, ok, act, USER_F)


@triton.jit
def _anchored_delta_kernel(x_ptr, w_ptr, w0_ptr, z0_ptr, b_ptr, b0_ptr, y_ptr, d_ptr, B, N, K,
                           HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr, USER_F: tl.constexpr = None):
    """Stage 1 in the delta form for one layer (``anchored_delta_block``). Grid as
    ``_delta_kernel``'s."""
    anchored_delta_block(x_ptr, w_ptr, w0_ptr, z0_ptr, b_ptr, b0_ptr, y_ptr, d_ptr,
                         tl.program_id(0), tl.program_id(1), B, N, K, HAS_BIAS, ACT, BLOCK_M,
                         BLOCK_N, BLOCK_K, PRECISION, USER_F)


@triton.jit
def _add_prox(grad, p_ptr, p0_ptr, offs, mask, inv_eta):
    """grad + (P - P0) / eta on a tile: the prox term's gradient, in fp32."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p0 = tl.load(p0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return grad + (p - p0) * inv_eta


@triton.jit
def _dtx_tile(x_ptr, d_ptr, outs, ins, B, N, K, BLOCK_M: tl.constexpr,
              PRECISION: tl.constexpr):
    """(D^T X)[outs, ins] and sum_n D[n, outs] over the rows n < B of X (B, K) and D (B, N),
    both fp32, in a fixed order (row blocks of BLOCK_M from row 0 up): deterministic."""
    acc = tl.zeros((outs.shape[0], ins.shape[0]), dtype=tl.float32)
    acc_b = tl.zeros((outs.shape[0],), dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        # D^T tile (BLOCK_N, BLOCK_M) read straight from D's (B, d_out) layout.
        d_t = tl.load(d_ptr + rows[None, :] * N + outs[:, None],
                      mask=(rows[None, :] < B) & (outs[:, None] < N), other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + ins[None, :],
                    mask=(rows[:, None] < B) & (ins[None, :] < K), other=0.0)
        acc = dot(d_t, x.to(tl.float32), acc, PRECISION)
        acc_b += tl.sum(d_t, axis=1)  # a row sum of a tile in registers: free next to the dot
    return acc, acc_b


@triton.jit
def _bias_mask(outs, N, pid_k, has_bias):
    """The bias entries a (pid_n, pid_k) tile owns: those of the pid_k == 0 tiles, if any."""
    return ((outs < N) & (tl.full(outs.shape, pid_k, tl.int32) == 0)
            & (tl.full(outs.shape, has_bias, tl.int32) != 0))


@triton.jit
def _finish_tile(acc, acc_b, outs, ins, pid_k, N, K, scale, inv_eta, has_bias,
                 w_ptr, w0_ptr, b_ptr, b0_ptr, gw_ptr, gb_ptr, HAS_PROX: tl.constexpr):
    """Store grad_W[outs, ins] = scale * acc [+ (W - W0)/eta] and, from the pid_k == 0 tile,
    grad_b[outs] = scale * acc_b [+ (b - b0)/eta], in the destinations' dtypes."""
    w_offs = outs[:, None] * K + ins[None, :]
    w_ok = (outs[:, None] < N) & (ins[None, :] < K)
    grad = acc * scale
    if HAS_PROX:
        grad = _add_prox(grad, w_ptr, w0_ptr, w_offs, w_ok, inv_eta)
    tl.store(gw_ptr + w_offs, grad.to(gw_ptr.dtype.element_ty), mask=w_ok)
    b_ok = _bias_mask(outs, N, pid_k, has_bias)
    grad_b = acc_b * scale
    if HAS_PROX:
        grad_b = _add_prox(grad_b, b_ptr, b0_ptr, outs, b_ok, inv_eta)
    tl.store(gb_ptr + outs, grad_b.to(gb_ptr.dtype.element_ty), mask=b_ok)


@triton.jit
def weight_grad_block(x_ptr, d_ptr, w_ptr, w0_ptr, b_ptr, b0_ptr, gw_ptr, gb_ptr,
                      pid_n, pid_k, B, N, K, scale, inv_eta, has_bias,
                      HAS_PROX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Unsplit stage 2 (S = 1): grad_W tile (BLOCK_N, BLOCK_K) at (pid_n, pid_k)
    = scale * D^T X [+ (W - W0)/eta], reduced over all B rows here (a fixed-order loop:
    deterministic); the pid_k == 0 tile also writes grad_b = scale * sum_n D_n
    [+ (b - b0)/eta]."""
    outs = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ins = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc, acc_b = _dtx_tile(x_ptr, d_ptr, outs, ins, B, N, K, BLOCK_M, PRECISION)
    _finish_tile(acc, acc_b, outs, ins, pid_k, N, K, scale, inv_eta, has_bias,
                 w_ptr, w0_ptr, b_ptr, b0_ptr, gw_ptr, gb_ptr, HAS_PROX)


@triton.jit
def weight_grad_partial_block(x_ptr, d_ptr, pw_ptr, pb_ptr, pid_n, pid_k, pid_s, B,
                              rows_per_slice, N, K, has_bias, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Split stage 2, pass 1: the unscaled fp32 partials of slice pid_s, rows
    [pid_s * rows_per_slice, min((pid_s + 1) * rows_per_slice, B)):
    P_W[s][outs, ins] = (D^T X) over the slice at ``pw_ptr`` ((N, K) row-major), and from
    the pid_k == 0 tile P_b[s][outs] = sum_n D_n at ``pb_ptr``; the pointers are the slice's
    (the caller adds s times the slice stride). Each element has one writer: no atomics."""
    outs = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ins = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_lo = pid_s.to(tl.int64) * rows_per_slice
    # The slice as a batch of its own (X and D row-major: shifting the base pointers by
    # row_lo rows): the unsplit kernel's loop, over slice_rows rows.
    slice_rows = tl.minimum(row_lo + rows_per_slice, B) - row_lo
    acc, acc_b = _dtx_tile(x_ptr + row_lo * K, d_ptr + row_lo * N, outs, ins, slice_rows, N,
                           K, BLOCK_M, PRECISION)
    tl.store(pw_ptr + outs[:, None] * K + ins[None, :], acc,
             mask=(outs[:, None] < N) & (ins[None, :] < K))
    tl.store(pb_ptr + outs, acc_b, mask=_bias_mask(outs, N, pid_k, has_bias))


@triton.jit
def weight_grad_sum_block(pw_ptr, pb_ptr, slice_stride, n_slices, w_ptr, w0_ptr, b_ptr,
                          b0_ptr, gw_ptr, gb_ptr, pid_n, pid_k, N, K, scale, inv_eta, has_bias,
                          HAS_PROX: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Split stage 2, pass 2, on a (BLOCK_N, BLOCK_K) tile: grad_W = scale * sum_s P_W[s]
    [+ (W - W0)/eta] and, from the pid_k == 0 tile, grad_b = scale * sum_s P_b[s]
    [+ (b - b0)/eta], the sums in the fixed order s = 0, 1, ..., n_slices - 1, so the result
    is the same bits on every run whatever order the programs ran in. Slice s of the
    partials starts ``s * slice_stride`` elements after ``pw_ptr`` / ``pb_ptr``."""
    outs = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ins = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    w_offs = outs[:, None] * K + ins[None, :]
    w_ok = (outs[:, None] < N) & (ins[None, :] < K)
    b_ok = _bias_mask(outs, N, pid_k, has_bias)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for _ in range(0, n_slices):
        acc += tl.load(pw_ptr + w_offs, mask=w_ok, other=0.0)
        acc_b += tl.load(pb_ptr + outs, mask=b_ok, other=0.0)
        # Pointer arithmetic is 64-bit: slice s sits s * slice_stride elements in.
        pw_ptr += slice_stride
        pb_ptr += slice_stride
    _finish_tile(acc, acc_b, outs, ins, pid_k, N, K, scale, inv_eta, has_bias,
                 w_ptr, w0_ptr, b_ptr, b0_ptr, gw_ptr, gb_ptr, HAS_PROX)


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


@triton.jit
def _weight_grad_partial_kernel(x_ptr, d_ptr, part_ptr, B, rows_per_slice, N, K, slice_stride,
                                bias_off, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                PRECISION: tl.constexpr):
    """Split stage 2, pass 1, one layer. Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K), S); slice
    s of the partials at part_ptr + s * slice_stride: P_W (N, K), then P_b (N,) at
    ``bias_off`` = N * K (computed by the launcher: N * K in the kernel could overflow i32)."""
    pid_s = tl.program_id(2)
    pw_ptr = part_ptr + pid_s.to(tl.int64) * slice_stride
    weight_grad_partial_block(x_ptr, d_ptr, pw_ptr, pw_ptr + bias_off, tl.program_id(0),
                              tl.program_id(1), pid_s, B, rows_per_slice, N, K, HAS_BIAS,
                              BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _weight_grad_sum_kernel(part_ptr, slice_stride, bias_off, n_slices, w_ptr, w0_ptr, b_ptr,
                            b0_ptr, gw_ptr, gb_ptr, N, K, scale, inv_eta, HAS_BIAS: tl.constexpr,
                            HAS_PROX: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """Split stage 2, pass 2, one layer. Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); the
    partials as ``_weight_grad_partial_kernel`` wrote them."""
    weight_grad_sum_block(part_ptr, part_ptr + bias_off, slice_stride, n_slices, w_ptr, w0_ptr,
                          b_ptr, b0_ptr, gw_ptr, gb_ptr, tl.program_id(0), tl.program_id(1),
                          N, K, scale, inv_eta, HAS_BIAS, HAS_PROX, BLOCK_N, BLOCK_K)


#: The delta form's reduction tile depth at most (``delta``), element-wise / softmax: it
#: loads two weight tiles, and softmax holds a row block's whole pass-1 state besides.
ANCHORED_MAX_BLOCK_K = {False: 32, True: 16}


def delta(x, weight, bias, target, code: int, *, precision: str = "ieee", out=None,
          user_f=None, anchor_preact=None, anchor_weight=None, anchor_bias=None):
    """Launch stage 1 and return D = f(X W^T + b) - Y as fp32 (B, d_out); ``user_f``: a
    registered activation's @triton.jit f (then ``code`` is not read). With ``anchor_preact``
    Z0 (B, d_out), ``anchor_weight`` W0 and (with a bias) ``anchor_bias`` b0, all
    contiguous: the delta form, Z = Z0 + X (W - W0)^T + (b - b0)
    (``_anchored_delta_kernel``)."""
    check_precision(precision)
    B, K = x.shape
    N = weight.shape[0]
    d = torch.empty((B, N), device=x.device, dtype=torch.float32) if out is None else out
    softmax = user_f is None and code == SOFTMAX.value
    cfg = configs.lookup("delta", x.dtype, precision, softmax=softmax, shape=(B, N, K))
    bm, bn, bk = tile(B, cfg.block_m), tile(N, cfg.block_n), tile(K, cfg.block_k)
    grid = (triton.cdiv(B, bm), 1 if softmax else triton.cdiv(N, bn))
    blocks = dict(HAS_BIAS=int(bias is not None), ACT=code, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                  PRECISION=precision, USER_F=user_f, **cfg.launch_options())
    if anchor_preact is None:
        launch(_delta_kernel, grid, x, weight, bias if bias is not None else x, target, d, B,
               N, K, **blocks)
        return d
    # Stand-ins for an absent bias: never read (HAS_BIAS masks them), but a pointer is needed.
    b, b0 = (bias, anchor_bias) if bias is not None else (weight, weight)
    # The W0 tile beside W's: the "delta" rows' 64-deep half-dtype softmax tiles spill
    # (make triton-check, sm_90), 32-deep ones too with half x under fp32 weights;
    # ANCHORED_MAX_BLOCK_K deep they do not.
    blocks["BLOCK_K"] = tile(K, min(cfg.block_k, ANCHORED_MAX_BLOCK_K[softmax]))
    launch(_anchored_delta_kernel, grid, x, weight, anchor_weight, anchor_preact, b, b0,
           target, d, B, N, K, **blocks)
    return d


#: Pass 2 of a split stage 2 (``_weight_grad_sum_kernel``) is element-wise and memory-bound:
#: tile edges (maxima, shrunk by ``_common.tile``) and warps fixed here, not in the config
#: table. 128 fp32 columns are 16-byte vectors across a warp; 32 x 128 is 32 values a thread.
SUM_BLOCK_N = 32
SUM_BLOCK_K = 128
SUM_WARPS = 4


@dataclass(frozen=True)
class WeightGradSplit:
    """How stage 2 of one (B, d_out = N, d_in = K) launch is cut: tile edges, the output tile
    grid, and the split of the reduction over B into ``n_slices`` slices of
    ``rows_per_slice`` rows (``configs.split_k_slices``; 1 slice: one launch, no partials)."""
    config: configs.Config
    block_m: int
    block_n: int
    block_k: int
    tiles: tuple      # (cdiv(N, block_n), cdiv(K, block_k))
    n_slices: int
    rows_per_slice: int


def weight_grad_split(B: int, N: int, K: int, dtype, precision: str, device
                      ) -> WeightGradSplit:
    """Stage 2's cut for this launch: the config table's row, the tile rule, the split rule
    on ``device``'s multiprocessor count."""
    cfg = configs.lookup("weight_grad", dtype, precision, shape=(B, N, K))
    bm, bn, bk = tile(B, cfg.block_m), tile(N, cfg.block_n), tile(K, cfg.block_k)
    tiles = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    n_slices, rows = configs.split_k_slices(cfg.split_k, B, bm, tiles[0] * tiles[1],
                                            configs.sm_count(device))
    return WeightGradSplit(cfg, bm, bn, bk, tiles, n_slices, rows)


def matched_loss_grad_into(x, weight, bias, target, code: int, scale: float,
                           anchor_weight, anchor_bias, eta, out_weight, out_bias,
                           *, precision: str = "ieee", user_f=None,
                           anchor_preact=None) -> None:
    """Write the matched-loss gradient into ``out_weight`` (and ``out_bias``): two launches,
    three when stage 2 is split over B (``weight_grad_split``: pass 1 writes S fp32
    partials, allocated here per call, S * (d_out * d_in + d_out) floats; pass 2 sums them
    in slice order and finishes).

    All tensors must be contiguous; shapes as in the module docstring. ``eta`` None turns
    the prox term off; ``anchor_preact`` Z0 turns on stage 1's delta form (``delta``), with
    W0 and b0 from ``anchor_weight`` and ``anchor_bias`` (the prox centre too, with eta).
    The outputs may have any float dtype (math is fp32).
    """
    d = delta(x, weight, bias, target, code, precision=precision, user_f=user_f,
              anchor_preact=anchor_preact, anchor_weight=anchor_weight,
              anchor_bias=anchor_bias)
    B, K = x.shape
    N = weight.shape[0]
    cut = weight_grad_split(B, N, K, x.dtype, precision, x.device)
    has_prox, has_bias = eta is not None, bias is not None
    blocks = dict(BLOCK_M=cut.block_m, BLOCK_N=cut.block_n, BLOCK_K=cut.block_k,
                  PRECISION=precision, **cut.config.launch_options())
    # Stand-ins for absent tensors: never read (the flags mask them), but a pointer is needed.
    w0 = anchor_weight if has_prox else weight
    b = bias if has_bias else weight
    b0 = anchor_bias if (has_prox and has_bias) else weight
    gb = out_bias if has_bias else out_weight
    inv_eta = 1.0 / eta if has_prox else 0.0
    if cut.n_slices == 1:
        launch(_weight_grad_kernel, cut.tiles, x, d, weight, w0, b, b0, out_weight, gb,
               B, N, K, float(scale), inv_eta, HAS_BIAS=int(has_bias), HAS_PROX=has_prox,
               **blocks)
        return
    # One slice of the partials: P_W (N, K) then P_b (N,), the layout of one Linear's params.
    stride = N * K + N
    partials = torch.empty(cut.n_slices * stride, device=x.device, dtype=torch.float32)
    launch(_weight_grad_partial_kernel, (*cut.tiles, cut.n_slices), x, d, partials, B,
           cut.rows_per_slice, N, K, stride, N * K, HAS_BIAS=int(has_bias), **blocks)
    sbn, sbk = tile(N, SUM_BLOCK_N), tile(K, SUM_BLOCK_K)
    launch(_weight_grad_sum_kernel, (triton.cdiv(N, sbn), triton.cdiv(K, sbk)), partials,
           stride, N * K, cut.n_slices, weight, w0, b, b0, out_weight, gb, N, K, float(scale),
           inv_eta, HAS_BIAS=int(has_bias), HAS_PROX=has_prox, BLOCK_N=sbn, BLOCK_K=sbk,
           num_warps=SUM_WARPS)
