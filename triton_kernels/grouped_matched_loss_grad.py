"""Matched-loss gradients of ALL layers in two launches (stage 1 for every layer, then
stage 2 for every layer), the per-layer math of ``matched_loss_grad.py`` unchanged; three
when stage 2 is split over B (pass 1 and pass 2 each one launch over every layer).

Every layer's tensors live in flat arenas, addressed as offsets from one base pointer each:
    inputs  X_l (B, d_in_l)          targets Y_l and deltas D_l (B, d_out_l), same offsets
    params  W_l (d_out_l, d_in_l), b_l (d_out_l,)   grads and prox anchors: params' layout
A layer table (int64, one row per layer) holds those offsets, the sizes, the activation code
and a has-bias flag; a tile table lists the (layer, block, block, slice) work items of each
stage (the slice is 0 but in pass 1 of a split stage 2).
Split stage 2 (``configs.split_k_slices`` on the tile count of all layers, one S for the
group): pass 1 writes slice s of every layer's unscaled partials into a scratch of S copies of
the params' layout, at s * slice_stride + the param's offset; pass 2 sums the S copies in the
order s = 0..S-1 and writes scale * sum (+ prox) into the grad arena. The scratch belongs to
the plan (allocated once per group, reused by every call: one call at a time per plan).
Tiles are ordered by decreasing work so that the GPU, which issues programs roughly in id
order, starts the long tiles first and fills the tail with short ones (a greedy
longest-first schedule); tiles of one size class stay together. The activation code is read
at run time and handed to the same ``delta_block`` the single-layer kernel compiles with a
constexpr code: the grouped kernel holds one softmax path and one element-wise path, whose f
comes from ``activation.apply_elementwise`` (this file lists no activations).
The delta form of stage 1 (an ``anchored`` plan: LocoProp's inner iterations at tf32/bf16)
is its own kernel, ``_grouped_anchored_delta_kernel``, over the single-layer kernel's
``anchored_delta_block``: W0, b0 in one more params-layout arena and Z0 in one more
targets-layout arena, both at the layer table's offsets (no new columns).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._common import check_precision, tile
from ._launch import launch, table_row
from .activation import SOFTMAX
from .matched_loss_grad import (ANCHORED_MAX_BLOCK_K, SUM_BLOCK_K, SUM_BLOCK_N, SUM_WARPS,
                                anchored_delta_block, delta_block, weight_grad_block,
                                weight_grad_partial_block, weight_grad_sum_block)

# Layer-table columns (int64, one row per layer): element offsets of X_l, W_l, b_l (W_l's when
# the layer has no bias) and Y_l/D_l in their arenas, d_out, d_in, activation code, has-bias.
X_OFF: tl.constexpr = tl.constexpr(0)
W_OFF: tl.constexpr = tl.constexpr(1)
B_OFF: tl.constexpr = tl.constexpr(2)
YD_OFF: tl.constexpr = tl.constexpr(3)
N_COL: tl.constexpr = tl.constexpr(4)
K_COL: tl.constexpr = tl.constexpr(5)
ACT_COL: tl.constexpr = tl.constexpr(6)
HAS_BIAS_COL: tl.constexpr = tl.constexpr(7)
LAYER_FIELDS: tl.constexpr = tl.constexpr(8)
# Tile-table columns (int64, one row per program): layer, the tile's two block indices
# (stage 1: row block, column block; stage 2: output block, input block) and the slice of B
# (pass 1 of a split stage 2; 0 elsewhere).
LAYER_COL: tl.constexpr = tl.constexpr(0)
BLOCK0_COL: tl.constexpr = tl.constexpr(1)
BLOCK1_COL: tl.constexpr = tl.constexpr(2)
SLICE_COL: tl.constexpr = tl.constexpr(3)
TILE_FIELDS: tl.constexpr = tl.constexpr(4)


@triton.jit
def _grouped_delta_kernel(x_ptr, p_ptr, y_ptr, d_ptr, layers_ptr, tiles_ptr, B,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Stage 1, all layers: D_l = f_l(X_l W_l^T + b_l) - Y_l. Grid (n_tiles,); tiles (layer,
    row block, column block)."""
    tile_row = tiles_ptr + tl.program_id(0).to(tl.int64) * TILE_FIELDS
    pid_m = tl.load(tile_row + BLOCK0_COL)
    pid_n = tl.load(tile_row + BLOCK1_COL)
    row = layers_ptr + tl.load(tile_row + LAYER_COL) * LAYER_FIELDS
    yd = tl.load(row + YD_OFF)
    delta_block(x_ptr + tl.load(row + X_OFF), p_ptr + tl.load(row + W_OFF),
                p_ptr + tl.load(row + B_OFF), y_ptr + yd, d_ptr + yd, pid_m, pid_n, B,
                tl.load(row + N_COL).to(tl.int32), tl.load(row + K_COL).to(tl.int32),
                tl.load(row + HAS_BIAS_COL).to(tl.int32), tl.load(row + ACT_COL),
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _grouped_anchored_delta_kernel(x_ptr, p_ptr, p0_ptr, z0_ptr, y_ptr, d_ptr, layers_ptr,
                                   tiles_ptr, B, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Stage 1 in the delta form, all layers: D_l = f_l(Z0_l + X_l (W_l - W0_l)^T
    + (b_l - b0_l)) - Y_l (``anchored_delta_block``). W0, b0 sit in ``p0_ptr``'s arena at
    the params' offsets, Z0_l in ``z0_ptr``'s at the targets' offsets. Grid and tiles as
    ``_grouped_delta_kernel``'s."""
    tile_row = tiles_ptr + tl.program_id(0).to(tl.int64) * TILE_FIELDS
    pid_m = tl.load(tile_row + BLOCK0_COL)
    pid_n = tl.load(tile_row + BLOCK1_COL)
    row = layers_ptr + tl.load(tile_row + LAYER_COL) * LAYER_FIELDS
    w_off = tl.load(row + W_OFF)
    b_off = tl.load(row + B_OFF)
    yd = tl.load(row + YD_OFF)
    anchored_delta_block(x_ptr + tl.load(row + X_OFF), p_ptr + w_off, p0_ptr + w_off,
                         z0_ptr + yd, p_ptr + b_off, p0_ptr + b_off, y_ptr + yd, d_ptr + yd,
                         pid_m, pid_n, B, tl.load(row + N_COL).to(tl.int32),
                         tl.load(row + K_COL).to(tl.int32),
                         tl.load(row + HAS_BIAS_COL).to(tl.int32), tl.load(row + ACT_COL),
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _grouped_weight_grad_kernel(x_ptr, d_ptr, p_ptr, p0_ptr, g_ptr, layers_ptr, tiles_ptr, B,
                                scale, inv_eta, HAS_PROX: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                PRECISION: tl.constexpr):
    """Stage 2, all layers: grad_W_l = scale D_l^T X_l (+ prox), grad_b_l, written into the
    grad arena (params' layout). Grid (n_tiles,); tiles (layer, out block, in block)."""
    tile_row = tiles_ptr + tl.program_id(0).to(tl.int64) * TILE_FIELDS
    pid_n = tl.load(tile_row + BLOCK0_COL)
    pid_k = tl.load(tile_row + BLOCK1_COL)
    row = layers_ptr + tl.load(tile_row + LAYER_COL) * LAYER_FIELDS
    x_off = tl.load(row + X_OFF)
    w_off = tl.load(row + W_OFF)
    b_off = tl.load(row + B_OFF)
    d_off = tl.load(row + YD_OFF)
    N = tl.load(row + N_COL).to(tl.int32)
    K = tl.load(row + K_COL).to(tl.int32)
    has_bias = tl.load(row + HAS_BIAS_COL).to(tl.int32)
    weight_grad_block(x_ptr + x_off, d_ptr + d_off, p_ptr + w_off, p0_ptr + w_off,
                      p_ptr + b_off, p0_ptr + b_off, g_ptr + w_off, g_ptr + b_off,
                      pid_n, pid_k.to(tl.int32), B, N, K, scale, inv_eta, has_bias, HAS_PROX,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _grouped_weight_grad_partial_kernel(x_ptr, d_ptr, part_ptr, layers_ptr, tiles_ptr, B,
                                        rows_per_slice, slice_stride, BLOCK_M: tl.constexpr,
                                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                        PRECISION: tl.constexpr):
    """Split stage 2, pass 1, all layers: slice s of D_l^T X_l and sum_n D_l (fp32, unscaled)
    into the partials at s * slice_stride + the param's offset. Grid (n_tiles,); tiles (layer,
    out block, in block, slice)."""
    tile_row = tiles_ptr + tl.program_id(0).to(tl.int64) * TILE_FIELDS
    pid_n = tl.load(tile_row + BLOCK0_COL)
    pid_k = tl.load(tile_row + BLOCK1_COL)
    pid_s = tl.load(tile_row + SLICE_COL)
    row = layers_ptr + tl.load(tile_row + LAYER_COL) * LAYER_FIELDS
    slice_ptr = part_ptr + pid_s * slice_stride
    weight_grad_partial_block(x_ptr + tl.load(row + X_OFF), d_ptr + tl.load(row + YD_OFF),
                              slice_ptr + tl.load(row + W_OFF), slice_ptr + tl.load(row + B_OFF),
                              pid_n, pid_k.to(tl.int32), pid_s, B, rows_per_slice,
                              tl.load(row + N_COL).to(tl.int32),
                              tl.load(row + K_COL).to(tl.int32),
                              tl.load(row + HAS_BIAS_COL).to(tl.int32),
                              BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _grouped_weight_grad_sum_kernel(part_ptr, p_ptr, p0_ptr, g_ptr, layers_ptr, tiles_ptr,
                                    n_slices, slice_stride, scale, inv_eta,
                                    HAS_PROX: tl.constexpr, BLOCK_N: tl.constexpr,
                                    BLOCK_K: tl.constexpr):
    """Split stage 2, pass 2, all layers: grad = scale * (sum over s = 0..S-1 of the partials)
    (+ prox) into the grad arena. Grid (n_tiles,); tiles (layer, out block, in block, 0)."""
    tile_row = tiles_ptr + tl.program_id(0).to(tl.int64) * TILE_FIELDS
    pid_n = tl.load(tile_row + BLOCK0_COL)
    pid_k = tl.load(tile_row + BLOCK1_COL)
    row = layers_ptr + tl.load(tile_row + LAYER_COL) * LAYER_FIELDS
    w_off = tl.load(row + W_OFF)
    b_off = tl.load(row + B_OFF)
    weight_grad_sum_block(part_ptr + w_off, part_ptr + b_off, slice_stride, n_slices,
                          p_ptr + w_off, p0_ptr + w_off, p_ptr + b_off, p0_ptr + b_off,
                          g_ptr + w_off, g_ptr + b_off, pid_n, pid_k.to(tl.int32),
                          tl.load(row + N_COL).to(tl.int32), tl.load(row + K_COL).to(tl.int32),
                          scale, inv_eta, tl.load(row + HAS_BIAS_COL).to(tl.int32), HAS_PROX,
                          BLOCK_N, BLOCK_K)


@dataclass
class GroupedPlan:
    """Device tables for one set of layer shapes, batch size, operand dtype and precision;
    build once, launch often. Each stage has its own config (``configs.py``) and tiles.
    ``anchored``: stage 1 takes the delta form (its reduction depth capped as the per-layer
    delta form's, ``ANCHORED_MAX_BLOCK_K``: it loads W and W0 tiles).
    With ``n_slices`` > 1 stage 2 is split over B: ``grad_tiles`` are pass 1's (with the
    slice), ``sum_tiles``/``sum_blocks`` pass 2's, ``partials`` their fp32 scratch
    (n_slices * slice_stride floats, slice_stride >= the params' arena length)."""

    batch: int
    precision: str
    anchored: bool              # stage 1 in the delta form (``_grouped_anchored_delta_kernel``)
    layers: torch.Tensor        # int64 (L, LAYER_FIELDS)
    delta_tiles: torch.Tensor   # int64 (n1, TILE_FIELDS)
    grad_tiles: torch.Tensor    # int64 (n2, TILE_FIELDS)
    delta_blocks: dict          # BLOCK_M/N/K, num_warps, num_stages of stage 1
    grad_blocks: dict           # the same for stage 2 (pass 1 when split)
    n_slices: int = 1
    rows_per_slice: int = 0     # rows of B per slice (the batch when n_slices is 1)
    slice_stride: int = 0
    partials: Optional[torch.Tensor] = None  # fp32 (n_slices * slice_stride,) when split
    sum_tiles: Optional[torch.Tensor] = None  # int64 (n3, TILE_FIELDS) when split
    sum_blocks: Optional[dict] = None         # BLOCK_N/K, num_warps of pass 2 when split


def _blocks(cfg: configs.Config, batch: int, d_out: int, d_in: int) -> dict:
    return dict(BLOCK_M=tile(batch, cfg.block_m), BLOCK_N=tile(d_out, cfg.block_n),
                BLOCK_K=tile(d_in, cfg.block_k), **cfg.launch_options())


def plan(batch: int, layers, device, *, dtype=torch.float32, precision: str = "ieee",
         anchored: bool = False) -> GroupedPlan:
    """Build the tables (and, when stage 2 is split, its partials scratch). ``layers``:
    dicts with x_off, w_off, b_off (or None), yd_off, d_in, d_out, code (activation).
    Offsets are in elements of their arenas; ``dtype`` is the arenas' storage dtype (it
    picks the configs, with ``precision``). ``anchored``: stage 1 in the delta form."""
    check_precision(precision)
    d_out = max(l["d_out"] for l in layers)
    d_in = max(l["d_in"] for l in layers)
    shape = (batch, d_out, d_in)
    delta_cfg = configs.lookup("grouped_delta", dtype, precision, shape=shape)
    delta_blocks = _blocks(delta_cfg, batch, d_out, d_in)
    if anchored:
        # One kernel holds both paths: the softmax cap when any layer takes softmax.
        softmax = any(l["code"] == SOFTMAX.value for l in layers)
        delta_blocks["BLOCK_K"] = tile(d_in, min(delta_cfg.block_k,
                                                 ANCHORED_MAX_BLOCK_K[softmax]))
    grad_cfg = configs.lookup("grouped_weight_grad", dtype, precision, shape=shape)
    grad_blocks = _blocks(grad_cfg, batch, d_out, d_in)
    bm, bn1 = delta_blocks["BLOCK_M"], delta_blocks["BLOCK_N"]
    bm2, bn2, bk2 = grad_blocks["BLOCK_M"], grad_blocks["BLOCK_N"], grad_blocks["BLOCK_K"]
    n_grad_tiles = sum(triton.cdiv(l["d_out"], bn2) * triton.cdiv(l["d_in"], bk2)
                       for l in layers)
    n_slices, rows_per_slice = configs.split_k_slices(grad_cfg.split_k, batch, bm2,
                                                      n_grad_tiles, configs.sm_count(device))
    sbn, sbk = tile(d_out, SUM_BLOCK_N), tile(d_in, SUM_BLOCK_K)
    rows, delta_tiles, grad_tiles, sum_tiles = [], [], [], []
    slice_stride = 0  # the params' arena length: one past the last param element
    for i, l in enumerate(layers):
        N, K = l["d_out"], l["d_in"]
        has_bias = l.get("b_off") is not None
        slice_stride = max(slice_stride, l["w_off"] + N * K,
                           l["b_off"] + N if has_bias else 0)
        rows.append(table_row(LAYER_FIELDS, (X_OFF, l["x_off"]), (W_OFF, l["w_off"]),
                              (B_OFF, l["b_off"] if has_bias else l["w_off"]),
                              (YD_OFF, l["yd_off"]), (N_COL, N), (K_COL, K),
                              (ACT_COL, l["code"]), (HAS_BIAS_COL, has_bias)))
        softmax = l["code"] == SOFTMAX.value
        col_blocks = 1 if softmax else triton.cdiv(N, bn1)
        tile_cost = K * (N if softmax else bn1)  # multiply-adds per row of the tile
        for m in range(triton.cdiv(batch, bm)):
            for n in range(col_blocks):
                delta_tiles.append((tile_cost, i, m, n, 0))
        for n in range(triton.cdiv(N, bn2)):
            for k in range(triton.cdiv(K, bk2)):
                for s in range(n_slices):
                    # multiply-adds per output element: the slice's rows times the tile's K
                    slice_rows = min(rows_per_slice, batch - s * rows_per_slice)
                    grad_tiles.append((slice_rows * min(bk2, K), i, n, k, s))
        if n_slices > 1:
            for n in range(triton.cdiv(N, sbn)):
                for k in range(triton.cdiv(K, sbk)):
                    sum_tiles.append((min(sbn, N) * min(sbk, K), i, n, k, 0))
    split = dict(rows_per_slice=rows_per_slice)
    if n_slices > 1:
        split.update(n_slices=n_slices, slice_stride=slice_stride,
                     partials=torch.empty(n_slices * slice_stride, dtype=torch.float32,
                                          device=device),
                     sum_tiles=_tile_table(sum_tiles, device),
                     sum_blocks=dict(BLOCK_N=sbn, BLOCK_K=sbk, num_warps=SUM_WARPS))
    return GroupedPlan(batch, precision, anchored, _int64_table(rows, device),
                       _tile_table(delta_tiles, device), _tile_table(grad_tiles, device),
                       delta_blocks, grad_blocks, **split)


def _int64_table(rows, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _tile_table(tiles, device) -> torch.Tensor:
    """(cost, layer, block, block, slice) work items as a tile table, by decreasing cost (a
    stable sort: equal costs keep their layer, block and slice order)."""
    return _int64_table([table_row(TILE_FIELDS, (LAYER_COL, layer), (BLOCK0_COL, b0),
                                   (BLOCK1_COL, b1), (SLICE_COL, s))
                         for _, layer, b0, b1, s in sorted(tiles, key=lambda t: -t[0])],
                        device)


def grouped_matched_loss_grad_(p: GroupedPlan, inputs, params, targets, deltas, grads, *,
                               scale: float = 1.0, anchors=None, eta=None, start_params=None,
                               anchor_preacts=None) -> None:
    """Write every layer's matched-loss gradient into ``grads`` (params' layout): two
    launches, three when the plan splits stage 2, at the plan's precision. All arenas are
    flat contiguous tensors; ``deltas`` is fp32 scratch laid out like ``targets``.
    ``anchors`` (params' layout) and ``eta`` turn the prox term on. An anchored plan needs
    ``start_params`` W0, b0 (params' layout) and ``anchor_preacts`` Z0 (targets' layout) for
    its delta form; others take neither."""
    given = [name for name, t in (("start_params", start_params),
                                  ("anchor_preacts", anchor_preacts)) if t is not None]
    if len(given) != (2 if p.anchored else 0):
        raise ValueError(f"grouped_matched_loss_grad_(): a plan with anchored={p.anchored} "
                         f"takes {'both' if p.anchored else 'neither'} of start_params and "
                         f"anchor_preacts, got {given or 'neither'}")
    if p.anchored:
        launch(_grouped_anchored_delta_kernel, (p.delta_tiles.shape[0],), inputs, params,
               start_params, anchor_preacts, targets, deltas, p.layers, p.delta_tiles, p.batch,
               PRECISION=p.precision, **p.delta_blocks)
    else:
        launch(_grouped_delta_kernel, (p.delta_tiles.shape[0],), inputs, params, targets,
               deltas, p.layers, p.delta_tiles, p.batch, PRECISION=p.precision,
               **p.delta_blocks)
    has_prox = eta is not None
    anchors = anchors if has_prox else params  # never read without prox: a stand-in pointer
    inv_eta = 1.0 / eta if has_prox else 0.0
    if p.n_slices == 1:
        launch(_grouped_weight_grad_kernel, (p.grad_tiles.shape[0],), inputs, deltas, params,
               anchors, grads, p.layers, p.grad_tiles, p.batch, float(scale), inv_eta,
               HAS_PROX=has_prox, PRECISION=p.precision, **p.grad_blocks)
        return
    launch(_grouped_weight_grad_partial_kernel, (p.grad_tiles.shape[0],), inputs, deltas,
           p.partials, p.layers, p.grad_tiles, p.batch, p.rows_per_slice, p.slice_stride,
           PRECISION=p.precision, **p.grad_blocks)
    launch(_grouped_weight_grad_sum_kernel, (p.sum_tiles.shape[0],), p.partials, params,
           anchors, grads, p.layers, p.sum_tiles, p.n_slices, p.slice_stride, float(scale),
           inv_eta, HAS_PROX=has_prox, **p.sum_blocks)
