"""Matched-loss gradients of ALL layers in two launches (stage 1 for every layer, then
stage 2 for every layer), the per-layer math of ``matched_loss_grad.py`` unchanged.

Every layer's tensors live in flat arenas, addressed as offsets from one base pointer each:
    inputs  X_l (B, d_in_l)          targets Y_l and deltas D_l (B, d_out_l), same offsets
    params  W_l (d_out_l, d_in_l), b_l (d_out_l,)   grads and prox anchors: params' layout
A layer table (int64, one row per layer) holds those offsets, the sizes, the activation code
and a has-bias flag; a tile table lists the (layer, block, block) work items of each stage.
Tiles are ordered by decreasing work so that the GPU, which issues programs roughly in id
order, starts the long tiles first and fills the tail with short ones (a greedy
longest-first schedule); tiles of one size class stay together. The activation is read at
run time and dispatched to the same ``delta_block`` the single-layer kernel compiles, one
branch per table entry.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import launch, tile
from .activation import IDENTITY, RELU, SIGMOID, SOFTMAX, TANH
from .matched_loss_grad import MAX_TILE, MIN_TILE, delta_block, weight_grad_block

# Layer-table columns.
X_OFF, W_OFF, B_OFF, YD_OFF, N_COL, K_COL, ACT_COL, HAS_BIAS_COL = range(8)
LAYER_FIELDS = 8


@triton.jit
def _grouped_delta_kernel(x_ptr, p_ptr, y_ptr, d_ptr, layers_ptr, tiles_ptr, B,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Stage 1, all layers: D_l = f_l(X_l W_l^T + b_l) - Y_l. Grid (n_tiles,); tiles (layer,
    row block, column block)."""
    t = tl.program_id(0).to(tl.int64) * 3
    layer = tl.load(tiles_ptr + t)
    pid_m = tl.load(tiles_ptr + t + 1)
    pid_n = tl.load(tiles_ptr + t + 2)
    row = layers_ptr + layer * 8
    x = x_ptr + tl.load(row + 0)
    w = p_ptr + tl.load(row + 1)
    b = p_ptr + tl.load(row + 2)
    yd = tl.load(row + 3)
    N = tl.load(row + 4).to(tl.int32)
    K = tl.load(row + 5).to(tl.int32)
    act = tl.load(row + 6)
    has_bias = tl.load(row + 7).to(tl.int32)
    if act == TANH:
        delta_block(x, w, b, y_ptr + yd, d_ptr + yd, pid_m, pid_n, B, N, K, has_bias, TANH,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    elif act == SIGMOID:
        delta_block(x, w, b, y_ptr + yd, d_ptr + yd, pid_m, pid_n, B, N, K, has_bias, SIGMOID,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    elif act == SOFTMAX:
        delta_block(x, w, b, y_ptr + yd, d_ptr + yd, pid_m, pid_n, B, N, K, has_bias, SOFTMAX,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    elif act == RELU:
        delta_block(x, w, b, y_ptr + yd, d_ptr + yd, pid_m, pid_n, B, N, K, has_bias, RELU,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        delta_block(x, w, b, y_ptr + yd, d_ptr + yd, pid_m, pid_n, B, N, K, has_bias, IDENTITY,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _grouped_weight_grad_kernel(x_ptr, d_ptr, p_ptr, p0_ptr, g_ptr, layers_ptr, tiles_ptr, B,
                                scale, inv_eta, HAS_PROX: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                PRECISION: tl.constexpr):
    """Stage 2, all layers: grad_W_l = scale D_l^T X_l (+ prox), grad_b_l, written into the
    grad arena (params' layout). Grid (n_tiles,); tiles (layer, out block, in block)."""
    t = tl.program_id(0).to(tl.int64) * 3
    layer = tl.load(tiles_ptr + t)
    pid_n = tl.load(tiles_ptr + t + 1)
    pid_k = tl.load(tiles_ptr + t + 2)
    row = layers_ptr + layer * 8
    x_off = tl.load(row + 0)
    w_off = tl.load(row + 1)
    b_off = tl.load(row + 2)
    d_off = tl.load(row + 3)
    N = tl.load(row + 4).to(tl.int32)
    K = tl.load(row + 5).to(tl.int32)
    has_bias = tl.load(row + 7).to(tl.int32)
    weight_grad_block(x_ptr + x_off, d_ptr + d_off, p_ptr + w_off, p0_ptr + w_off,
                      p_ptr + b_off, p0_ptr + b_off, g_ptr + w_off, g_ptr + b_off,
                      pid_n, pid_k.to(tl.int32), B, N, K, scale, inv_eta, has_bias, HAS_PROX,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@dataclass
class GroupedPlan:
    """Device tables for one set of layer shapes and batch size; build once, launch often."""

    batch: int
    layers: torch.Tensor        # int64 (L, 8)
    delta_tiles: torch.Tensor   # int64 (n1, 3)
    grad_tiles: torch.Tensor    # int64 (n2, 3)
    block_m: int
    block_n: int
    block_k: int


def plan(batch: int, layers, device) -> GroupedPlan:
    """Build the tables. ``layers``: dicts with x_off, w_off, b_off (or None), yd_off,
    d_in, d_out, code (activation). Offsets are in elements of their arenas."""
    bm = tile(batch, MIN_TILE, MAX_TILE)
    bn = tile(max(l["d_out"] for l in layers), MIN_TILE, MAX_TILE)
    bk = tile(max(l["d_in"] for l in layers), MIN_TILE, MAX_TILE)
    rows, delta_tiles, grad_tiles = [], [], []
    for i, l in enumerate(layers):
        N, K = l["d_out"], l["d_in"]
        has_bias = l.get("b_off") is not None
        rows.append([l["x_off"], l["w_off"], l["b_off"] if has_bias else l["w_off"],
                     l["yd_off"], N, K, l["code"], int(has_bias)])
        softmax = l["code"] == SOFTMAX.value
        col_blocks = 1 if softmax else triton.cdiv(N, bn)
        tile_cost = K * (N if softmax else bn)  # multiply-adds per row of the tile
        for m in range(triton.cdiv(batch, bm)):
            for n in range(col_blocks):
                delta_tiles.append((tile_cost, i, m, n))
        for n in range(triton.cdiv(N, bn)):
            for k in range(triton.cdiv(K, bk)):
                grad_tiles.append((min(bk, K), i, n, k))
    order = lambda tiles: [t[1:] for t in sorted(tiles, key=lambda t: -t[0])]  # noqa: E731
    as_table = lambda x: torch.tensor(x, dtype=torch.int64).to(device)  # noqa: E731
    return GroupedPlan(batch, as_table(rows), as_table(order(delta_tiles)),
                       as_table(order(grad_tiles)), bm, bn, bk)


def grouped_matched_loss_grad_(p: GroupedPlan, inputs, params, targets, deltas, grads, *,
                               scale: float = 1.0, anchors=None, eta=None,
                               precision: str = "ieee") -> None:
    """Write every layer's matched-loss gradient into ``grads`` (params' layout): two
    launches. All arenas are flat contiguous tensors; ``deltas`` is fp32 scratch laid out
    like ``targets``. ``anchors`` (params' layout) and ``eta`` turn the prox term on."""
    blocks = dict(BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_k, PRECISION=precision)
    launch(_grouped_delta_kernel, (p.delta_tiles.shape[0],), inputs, params, targets, deltas,
           p.layers, p.delta_tiles, p.batch, **blocks)
    has_prox = eta is not None
    launch(_grouped_weight_grad_kernel, (p.grad_tiles.shape[0],), inputs, deltas, params,
           anchors if has_prox else params, grads, p.layers, p.grad_tiles, p.batch,
           float(scale), 1.0 / eta if has_prox else 0.0, HAS_PROX=has_prox, **blocks)
