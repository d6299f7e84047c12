"""Stage 2 of the Triton matched-loss gradient as a split-K over the batch (issue 17).

Stage 2 reduces grad_W = scale * D^T X over the B rows. ``configs.split_k_slices`` may cut
the rows into S slices: pass 1 writes one fp32 partial per slice, pass 2 sums them in the
order s = 0..S-1. Checked here, on the interpreter at small shapes with the split forced
(``configs.forced``: 16-row blocks and a cap of S, so that a 97-row batch splits):
  - the rule itself (S = 1 where it must be, slices cover B, no empty slice);
  - per-op and grouped results against float64 for S in {1, 2, 3}, with and without bias and
    prox, every activation of the table, odd and power-of-two shapes;
  - the launch count (S = 1: today's single stage-2 launch; S > 1: pass 1 + pass 2);
  - bitwise determinism (two runs equal), pass 2's fixed summation order (the result is the
    fp32 sum ((P_0 + P_1) + P_2) of the slices' own gradients, bit for bit), split == unsplit
    to fp32 rounding, grouped == per-layer.
"""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import reference
from locoprop_kernels.activations import ACTIVATIONS
from locoprop_kernels.arena import split_views
from locoprop_kernels.grouped import LayerGroup, LayerSpec
from locoprop_kernels.triton_kernels import configs
from locoprop_kernels.triton_kernels import grouped_matched_loss_grad as grouped
from locoprop_kernels.triton_kernels import matched_loss_grad as mlg

from conftest import DEVICE, f64, rel_err, random_layer

#: (B, d_in, d_out): odd (7 row blocks of 16: slices 64+33 at S = 2, 48+48+1 at S = 3) and
#: powers of two (8 row blocks: 64+64, 48+48+32).
SHAPES = [(97, 33, 5), (128, 32, 16)]
SPLITS = [1, 2, 3]
BLOCK_M = 16


def _split(s):
    """Force stage 2 of the per-op kernel to 16-row blocks and at most s slices."""
    return configs.forced("weight_grad", block_m=BLOCK_M, split_k=s)


_layer = random_layer  # x, W, b, y, W0, b0 (conftest)


def _run(x, w, b, y, activation, n_slices, *, prox=False, w0=None, b0=None, scale=1.0,
         eta=0.5):
    """The triton op with stage 2 forced to ``n_slices`` (asserted: the rule must give it),
    prox (anchors w0, b0, ``eta``) on or off; also the number of launches it took."""
    with _split(n_slices):
        cut = mlg.weight_grad_split(x.shape[0], w.shape[0], w.shape[1], x.dtype, "ieee",
                                    x.device)
        assert cut.n_slices == n_slices, cut
        with lk.testing.count_launches() as n:
            gw, gb = lk.matched_loss_grad(x, w, b, y, activation, backend="triton",
                                          scale=scale, eta=eta if prox else None,
                                          anchor_weight=w0 if prox else None,
                                          anchor_bias=b0 if prox else None)
    return gw, gb, n.triton


# ------------------------------------------------------------------------------ the rule
def test_rule_keeps_one_slice_where_it_must():
    sms = configs.DEFAULT_SMS
    for block_m in (16, 64, 128):
        for batch in (1, block_m, 2 * block_m, 3 * block_m):  # under 4 row blocks
            assert configs.split_k_slices(8, batch, block_m, 1, sms) == (1, batch)
    # The tiles alone fill SPLIT_WAVES waves: no split however long the batch.
    tiles = configs.SPLIT_WAVES * sms
    assert configs.split_k_slices(8, 10 ** 6, 64, tiles, sms) == (1, 10 ** 6)
    assert configs.split_k_slices(1, 10 ** 6, 64, 1, sms) == (1, 10 ** 6)  # cap 1: never


@pytest.mark.parametrize("batch", [256, 257, 1000, 8192, 10 ** 5 + 3])
@pytest.mark.parametrize("tiles", [1, 7, 64, 256])
@pytest.mark.parametrize("cap", [2, 3, 8, 64])
def test_rule_slices_cover_the_batch(batch, tiles, cap):
    block_m, sms = 64, configs.DEFAULT_SMS
    s, rows = configs.split_k_slices(cap, batch, block_m, tiles, sms)
    blocks = -(-batch // block_m)
    want = min(cap, -(-configs.SPLIT_WAVES * sms // tiles),
               blocks // configs.MIN_SLICE_BLOCKS)
    assert 1 <= s <= max(1, want)
    if s > 1:
        assert rows % block_m == 0 and rows >= configs.MIN_SLICE_BLOCKS * block_m
        assert (s - 1) * rows < batch <= s * rows  # every slice holds rows, none is empty
    else:
        assert rows == batch


def test_rule_at_the_issue_shapes():
    """The shipped table on a 132-SM card: at 1000x1000, B = 1000, the 256 output tiles (64x64
    "ieee", 128x32 tensor-core) are under 2 waves: 2 slices; the transformer MLP shape
    (8192 rows, 768 -> 3072) has 576 tiles: unsplit."""
    def slices(shape, precision):
        return mlg.weight_grad_split(*shape, torch.float32, precision, "cpu").n_slices
    for precision in ("ieee", "tf32", "bf16"):
        assert slices((1000, 1000, 1000), precision) == 2
        assert slices((8192, 3072, 768), precision) == 1


def test_forced_checks_and_restores():
    before = configs.lookup("weight_grad", torch.float32, "ieee")
    with configs.forced("weight_grad", split_k=3):
        assert configs.lookup("weight_grad", torch.float32, "ieee").split_k == 3
        with configs.forced("weight_grad", block_m=16):
            inner = configs.lookup("weight_grad", torch.float32, "ieee")
            assert (inner.split_k, inner.block_m) == (3, 16)
        assert configs.lookup("weight_grad", torch.float32, "ieee").block_m == before.block_m
    assert configs.lookup("weight_grad", torch.float32, "ieee") == before
    with pytest.raises(ValueError, match="unknown kernel"):
        with configs.forced("nope", split_k=2):
            pass
    with pytest.raises(ValueError, match="unknown Config field"):
        with configs.forced("weight_grad", splitk=2):
            pass


# ------------------------------------------------------------------------------ per op
@pytest.mark.parametrize("n_slices", SPLITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_per_op_matches_reference_every_activation(n_slices, shape, activation):
    """Bias and prox on; each activation (stage 1 differs, stage 2 reads its D)."""
    _check_per_op(n_slices, shape, activation, bias=True, prox=True)


@pytest.mark.parametrize("n_slices", SPLITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,prox", [(False, False), (True, False), (False, True)],
                         ids=["nobias-noprox", "bias-noprox", "nobias-prox"])
def test_per_op_matches_reference_bias_prox(n_slices, shape, bias, prox):
    _check_per_op(n_slices, shape, "tanh", bias=bias, prox=prox)


def _check_per_op(n_slices, shape, activation, *, bias, prox):
    B = shape[0]
    x, w, b, y, w0, b0 = _layer(*shape, activation, bias)
    scale = 1.0 / B
    gw, gb, launches = _run(x, w, b, y, activation, n_slices, prox=prox, w0=w0, b0=b0,
                            scale=scale)
    assert launches == (2 if n_slices == 1 else 3)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation,
                                         scale=scale, eta=0.5 if prox else None,
                                         anchor_weight=f64(w0) if prox else None,
                                         anchor_bias=f64(b0) if prox else None)
    assert rel_err(gw, rw) <= 1e-5
    if bias:
        assert rel_err(gb, rb) <= 1e-5
    else:
        assert gb is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_per_op_half_storage(dtype):
    """Half inputs and outputs through the split path: fp32 partials, one rounding at the
    end, so the result is the reference on the rounded inputs to half's own rounding."""
    x, w, b, y, w0, b0 = _layer(97, 33, 5, "sigmoid", True, dtype=dtype)
    gw, gb, _ = _run(x, w, b, y, "sigmoid", 3, prox=True, w0=w0, b0=b0)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "sigmoid", eta=0.5,
                                         anchor_weight=f64(w0), anchor_bias=f64(b0))
    assert gw.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    assert rel_err(gw, rw) <= tol and rel_err(gb, rb) <= tol


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_per_op_bitwise_deterministic_and_close_to_unsplit(shape):
    x, w, b, y, w0, b0 = _layer(*shape, "softmax", True, seed=4)
    unsplit = _run(x, w, b, y, "softmax", 1, prox=True, w0=w0, b0=b0)[:2]
    for n_slices in (2, 3):
        first = _run(x, w, b, y, "softmax", n_slices, prox=True, w0=w0, b0=b0)[:2]
        again = _run(x, w, b, y, "softmax", n_slices, prox=True, w0=w0, b0=b0)[:2]
        for a, a2, u in zip(first, again, unsplit):
            assert torch.equal(a, a2)
            # Another order of the same fp32 sums: equal to a few fp32 roundings.
            assert rel_err(a, u) <= 1e-6 and not torch.equal(a, torch.zeros_like(a))


def test_pass_two_sums_the_slices_in_order():
    """Split S = 3 with scale 1 and no prox returns exactly ((P_0 + P_1) + P_2) in fp32,
    where P_s is the unsplit kernel's gradient over slice s's rows alone: pass 1 reduces each
    slice like the unsplit kernel does, pass 2 adds them in slice order and nothing else.
    Stage 1 is forced to 16-row blocks too, so that every D tile is the same GEMM shape in
    both runs."""
    B, d_in, d_out = 97, 33, 5
    x, w, b, y, _, _ = _layer(B, d_in, d_out, "tanh", True, seed=7)
    with configs.forced("delta", block_m=BLOCK_M):
        gw, gb, _ = _run(x, w, b, y, "tanh", 3)
        with _split(3):
            rows = mlg.weight_grad_split(B, d_out, d_in, x.dtype, "ieee",
                                         x.device).rows_per_slice
        want_w, want_b = torch.zeros_like(w), torch.zeros_like(b)
        for lo in range(0, B, rows):
            pw, pb, _ = _run(x[lo:lo + rows], w, b, y[lo:lo + rows], "tanh", 1)
            want_w, want_b = want_w + pw, want_b + pb
    assert torch.equal(gw, want_w) and torch.equal(gb, want_b)


# ------------------------------------------------------------------------------ grouped
# Ragged: a width-1 layer, a softmax layer, a layer without bias, odd and power-of-two sizes.
RAGGED = [LayerSpec(7, 1, "tanh"), LayerSpec(1, 33, "softmax"),
          LayerSpec(33, 5, "sigmoid", False), LayerSpec(5, 16, "relu"),
          LayerSpec(16, 3, "identity"), LayerSpec(3, 8, "gelu_tanh")]
GROUP_BATCH = 97


def _group(n_slices, seed=0):
    """A triton LayerGroup over RAGGED whose plan splits stage 2 into ``n_slices``, filled
    with random inputs/targets; its params and anchors."""
    with configs.forced("grouped_weight_grad", block_m=BLOCK_M, split_k=n_slices):
        group = LayerGroup(RAGGED, GROUP_BATCH, device=DEVICE, backend="triton")
    g = torch.Generator().manual_seed(seed)
    for xv, yv, layer in zip(group.inputs.views(), group.targets.views(), RAGGED):
        xv.copy_(torch.randn(xv.shape, generator=g))
        yv.copy_(lk.ACTIVATIONS[layer.activation].f(torch.randn(yv.shape, generator=g)))
    params = torch.randn(group.num_params, generator=g).to(DEVICE) * 0.5
    anchors = params + 0.1 * torch.randn(group.num_params, generator=g).to(DEVICE)
    return group, params, anchors


def _grouped_grads(group, params, anchors, prox, scale=1.0):
    grads = torch.full((group.num_params,), float("nan"), device=DEVICE)
    with lk.testing.count_launches() as n:
        group.matched_loss_grads_(params, grads, scale=scale,
                                  anchors=anchors if prox else None, eta=0.3 if prox else None)
    return grads, n.triton


def _plan(n_slices):
    with configs.forced("grouped_weight_grad", block_m=BLOCK_M, split_k=n_slices):
        group = LayerGroup(RAGGED, GROUP_BATCH, device=DEVICE, backend="reference")
        return grouped.plan(GROUP_BATCH, group.layer_table(), DEVICE), group


@pytest.mark.parametrize("n_slices", SPLITS)
def test_grouped_plan_splits_once_with_its_scratch(n_slices):
    """The plan carries the split and its partials (allocated here, once per group), the
    pass-1 tiles one per (tile, slice), longest first."""
    p, group = _plan(n_slices)
    assert p.n_slices == n_slices
    bn, bk = p.grad_blocks["BLOCK_N"], p.grad_blocks["BLOCK_K"]
    n_tiles = sum(-(-l.d_out // bn) * -(-l.d_in // bk) for l in RAGGED)
    assert p.grad_tiles.shape == (n_tiles * n_slices, grouped.TILE_FIELDS.value)
    if n_slices == 1:
        assert p.partials is None and p.sum_tiles is None
    else:
        assert p.slice_stride == group.num_params
        assert p.partials.dtype == torch.float32
        assert p.partials.numel() == n_slices * group.num_params
    # Longest first: rows of the tile's slice times its layer's K (capped by BLOCK_K).
    tiles = p.grad_tiles.cpu().tolist()
    cost = [min(p.rows_per_slice, GROUP_BATCH - t[grouped.SLICE_COL.value] * p.rows_per_slice)
            * min(p.grad_blocks["BLOCK_K"], RAGGED[t[grouped.LAYER_COL.value]].d_in)
            for t in tiles]
    assert cost == sorted(cost, reverse=True)
    assert sorted(t[grouped.SLICE_COL.value] for t in tiles) == sorted(
        s for s in range(n_slices) for _ in range(n_tiles))


@pytest.mark.parametrize("n_slices", SPLITS)
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_grouped_matches_reference(n_slices, prox):
    group, params, anchors = _group(n_slices)
    scale = 1.0 / GROUP_BATCH
    grads, launches = _grouped_grads(group, params, anchors, prox, scale)
    assert launches == (2 if n_slices == 1 else 3)
    views = split_views(params.double(), group.param_shapes)
    a_views = split_views(anchors.double(), group.param_shapes)
    got, p = split_views(grads, group.param_shapes), 0
    for i, layer in enumerate(RAGGED):
        n = 2 if layer.bias else 1
        want = reference.matched_loss_grad(
            group.inputs[i].double(), views[p], views[p + 1] if layer.bias else None,
            group.targets[i].double(), layer.activation, scale=scale,
            eta=0.3 if prox else None, anchor_weight=a_views[p] if prox else None,
            anchor_bias=a_views[p + 1] if prox and layer.bias else None)
        for g_t, w_t in zip(got[p:p + n], want[:n]):
            assert rel_err(g_t, w_t) <= 1e-5
        p += n


def test_grouped_deterministic_and_equal_to_per_layer_and_unsplit():
    group, params, anchors = _group(3)
    first, _ = _grouped_grads(group, params, anchors, True)
    again, _ = _grouped_grads(group, params, anchors, True)
    assert torch.equal(first, again)
    unsplit_group, _, _ = _group(1)
    unsplit, _ = _grouped_grads(unsplit_group, params, anchors, True)
    assert rel_err(first, unsplit) <= 1e-6
    # Per layer, the per-op kernel split the same way (3 slices of 16-row blocks).
    views = split_views(params, group.param_shapes)
    a_views = split_views(anchors, group.param_shapes)
    got, p = split_views(first, group.param_shapes), 0
    for i, layer in enumerate(RAGGED):
        b = views[p + 1] if layer.bias else None
        b0 = a_views[p + 1] if layer.bias else None
        gw, gb, _ = _run(group.inputs[i], views[p], b, group.targets[i], layer.activation, 3,
                         prox=True, w0=a_views[p], b0=b0, eta=0.3)
        torch.testing.assert_close(got[p], gw, rtol=1e-6, atol=1e-6)
        if layer.bias:
            torch.testing.assert_close(got[p + 1], gb, rtol=1e-6, atol=1e-6)
        p += 2 if layer.bias else 1
