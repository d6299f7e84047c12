"""All layers in two launches: grouped == per-layer ops == float64 reference."""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import reference
from locoprop_kernels.arena import split_views
from locoprop_kernels.grouped import LayerGroup, LayerSpec, param_shapes

from conftest import BACKENDS, DEVICE, rel_err

# Ragged: a width-1 layer, a softmax layer, a layer without bias, odd and power-of-two sizes.
RAGGED = [LayerSpec(7, 1, "tanh"), LayerSpec(1, 33, "softmax"), LayerSpec(33, 5, "sigmoid", False),
          LayerSpec(5, 16, "relu"), LayerSpec(16, 3, "identity")]


def _filled_group(layers, batch, backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    group = LayerGroup(layers, batch, device=DEVICE, backend=backend)
    for x, y, layer in zip(group.inputs.views(), group.targets.views(), layers):
        x.copy_(torch.randn(x.shape, generator=g))
        y.copy_(lk.ACTIVATIONS[layer.activation].f(torch.randn(y.shape, generator=g)))
    params = torch.randn(group.num_params, generator=g).to(DEVICE) * 0.5
    anchors = params + 0.1 * torch.randn(group.num_params, generator=g).to(DEVICE)
    return group, params, anchors


def _reference_grads(group, params, anchors, scale, eta):
    views = split_views(params.double(), group.param_shapes)
    a_views = split_views(anchors.double(), group.param_shapes)
    out, p = [], 0
    for i, layer in enumerate(group.layers):
        w, b = views[p], views[p + 1] if layer.bias else None
        w0, b0 = a_views[p], a_views[p + 1] if layer.bias else None
        gw, gb = reference.matched_loss_grad(group.inputs[i].double(), w, b,
                                             group.targets[i].double(), layer.activation,
                                             scale=scale, eta=eta, anchor_weight=w0,
                                             anchor_bias=b0)
        out += [gw] + ([gb] if layer.bias else [])
        p += 2 if layer.bias else 1
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 13, 64])
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_grouped_matches_reference(backend, batch, prox):
    group, params, anchors = _filled_group(RAGGED, batch, backend)
    grads = torch.full((group.num_params,), float("nan"), device=DEVICE)
    scale, eta = (1.0 / batch, 0.3) if prox else (1.0, None)
    group.matched_loss_grads_(params, grads, scale=scale, anchors=anchors if prox else None,
                              eta=eta)
    for got, want in zip(split_views(grads, group.param_shapes),
                         _reference_grads(group, params, anchors, scale, eta)):
        assert rel_err(got, want) <= 1e-5


def test_grouped_equals_per_layer_ops():
    """The triton grouped launch and the per-layer triton ops give the same numbers."""
    group, params, _ = _filled_group(RAGGED, 13, "triton")
    grads = torch.empty(group.num_params, device=DEVICE)
    with lk.testing.count_launches() as n:
        group.matched_loss_grads_(params, grads)
    assert n.triton == 2
    views = split_views(params, group.param_shapes)
    p = 0
    for i, layer in enumerate(group.layers):
        w, b = views[p], views[p + 1] if layer.bias else None
        gw, gb = lk.matched_loss_grad(group.inputs[i], w, b, group.targets[i], layer.activation,
                                      backend="triton")
        got = split_views(grads, group.param_shapes)
        torch.testing.assert_close(got[p], gw, rtol=1e-6, atol=1e-6)
        if layer.bias:
            torch.testing.assert_close(got[p + 1], gb, rtol=1e-6, atol=1e-6)
        p += 2 if layer.bias else 1


def test_autoencoder_inner_iteration_is_three_launches():
    """One inner iteration of the 8-layer autoencoder (widths shrunk for the interpreter):
    all layers' gradients in 2 launches + RMSProp over the arena in 1."""
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    sizes = [max(1, s // 40) for s in sizes]
    acts = ["tanh", "tanh", "tanh", "identity", "tanh", "tanh", "tanh", "sigmoid"]
    layers = [LayerSpec(a, b, f) for a, b, f in zip(sizes, sizes[1:], acts)]
    group, params, _ = _filled_group(layers, 10, "triton")
    grads = torch.empty_like(params)
    ms, mom = torch.ones_like(params), torch.zeros_like(params)
    with lk.testing.count_launches() as n:
        group.matched_loss_grads_(params, grads)
        lk.rmsprop_step_(params, grads, ms, mom, lr=1e-5, backend="triton")
    assert n.triton <= 3


def test_param_layout_matches_sequential_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2, bias=False))
    layers = [LayerSpec(3, 4, "tanh"), LayerSpec(4, 2, "sigmoid", bias=False)]
    assert param_shapes(layers) == [tuple(p.shape) for p in model.parameters()]


def test_bad_group_arguments():
    with pytest.raises(ValueError, match="'layers'"):
        LayerGroup([], 4, device=DEVICE)
    with pytest.raises(ValueError, match="'activation'"):
        LayerGroup([LayerSpec(2, 3, "elu")], 4, device=DEVICE)
    group = LayerGroup(RAGGED, 4, device=DEVICE, backend="reference")
    with pytest.raises(ValueError, match="'grads'"):
        group.matched_loss_grads_(torch.zeros(group.num_params, device=DEVICE),
                                  torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["tf", "torch"])
def test_rmsprop_reads_lr_from_device_tensor(backend, style):
    """lr as a one-element device tensor (what a captured CUDA graph needs) == lr as float."""
    p = torch.randn(100, device=DEVICE)
    g = torch.randn(100, device=DEVICE)
    p2, ms, ms2 = p.clone(), torch.ones_like(p), torch.ones_like(p)
    mom, mom2 = torch.zeros_like(p), torch.zeros_like(p)
    lk.rmsprop_step_(p, g, ms, mom, lr=0.01, momentum=0.9, style=style, backend=backend)
    lk.rmsprop_step_(p2, g, ms2, mom2, lr=torch.tensor([0.01], device=DEVICE), momentum=0.9,
                     style=style, backend=backend)
    torch.testing.assert_close(p, p2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mom, mom2, rtol=1e-6, atol=1e-7)


def _anchored_group(layers, batch, backend, precision, gram, dtype, seed=0):
    """An anchored group filled as LocoProp's loop fills it: X, W0 (``form_anchors_``), its Z0
    = X W0^T + b0 plus a perturbation (so that a dropped Z0 term shows) and targets f(Z0);
    the current params W = W0 + a small update."""
    g = torch.Generator().manual_seed(seed)
    group = LayerGroup(layers, batch, device=DEVICE, backend=backend, dtype=dtype,
                       precision=precision, gram=gram, anchored=True)
    start = (torch.randn(group.num_params, generator=g, dtype=dtype) * 0.5).to(DEVICE)
    params = start + 1e-2 * torch.randn(group.num_params, generator=g, dtype=dtype).to(DEVICE)
    views = split_views(start, group.param_shapes)
    p = 0
    for i, layer in enumerate(layers):
        x = group.inputs[i]
        x.copy_(torch.randn(x.shape, generator=g, dtype=dtype))
        z0 = x @ views[p].T + (views[p + 1] if layer.bias else 0)
        z0 += 0.1 * torch.randn(z0.shape, generator=g, dtype=dtype).to(DEVICE)
        group.anchor_preacts[i].copy_(z0)
        group.targets[i].copy_(lk.ACTIVATIONS[layer.activation].f(z0))
        p += 2 if layer.bias else 1
    group.form_anchors_(start)
    group.form_gram_(start)
    return group, start, params


#: RAGGED's identity layer (the last) in the Gram form; the other four matched.
RAGGED_GRAM = (False, False, False, False, True)


#: (backend, precision, dtype, tolerance): triton's grouped kernel in fp32 at each precision;
#: the backends without a grouped entry (their per-layer fallback) in float64 where they
#: take it (reference; cpp computes in fp32).
ANCHORED_CASES = [("triton", p, torch.float32, 1e-6) for p in ("tf32", "bf16", "ieee")] + [
    ("reference", "bf16", torch.float64, 1e-12)] + (
    [("cpp", "tf32", torch.float32, 1e-6)] if "cpp" in BACKENDS else [])


@pytest.mark.parametrize("backend,precision,dtype,tol", ANCHORED_CASES)
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_anchored_group_equals_per_layer_delta_form(backend, precision, dtype, tol, prox):
    """The delta form on the grouped path (triton: one stage-1 launch for all layers; the
    reference and cpp backends: the per-layer fallback) == the per-layer op with
    anchor_preact Z0 and W0, b0, layer by layer (softmax and a bias-free layer included); the
    Gram layer's slots are those of the plain group (the delta form does not touch the Gram
    form)."""
    _check_anchored_group(RAGGED, 13, RAGGED_GRAM, backend, precision, dtype, tol, prox)


#: Several row blocks (B = 70), a softmax over several column blocks and a reduction over
#: several K blocks in the anchored kernel's loops.
WIDE = [LayerSpec(9, 80, "softmax"), LayerSpec(80, 20, "tanh", False)]


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_anchored_group_equals_per_layer_delta_form_wide(precision):
    """The same on WIDE, with prox."""
    _check_anchored_group(WIDE, 70, None, "triton", precision, torch.float32, 1e-6, True)


def _check_anchored_group(layers, batch, gram, backend, precision, dtype, tol, prox):
    """Every layer's gradient from an anchored group (``_anchored_group``) against the
    per-layer op's delta form (the prox term with centre A != W0 added by hand), to ``tol``
    relative; Gram layers' slots against the plain group's."""
    group, start, params = _anchored_group(layers, batch, backend, precision, gram, dtype)
    gram = (False,) * len(layers) if gram is None else gram
    anchors = start + 0.1 * torch.ones_like(start)  # a prox centre other than W0
    scale, eta = (1.0 / batch, 0.3) if prox else (1.0, None)
    grads = torch.full((group.num_params,), float("nan"), dtype=dtype, device=DEVICE)
    with lk.testing.count_launches() as n:
        group.matched_loss_grads_(params, grads, scale=scale, anchors=anchors, eta=eta)
    if backend == "triton":
        assert n.triton == 2  # stage 1 (delta form) and stage 2, all matched layers each
    plain = LayerGroup(layers, batch, device=DEVICE, backend=backend, dtype=dtype,
                       precision=precision, gram=gram)
    for view, x in zip(plain.inputs.views(), group.inputs.views()):
        view.copy_(x)
    plain.form_gram_(start)
    plain_grads = torch.full_like(grads, float("nan"))
    plain.matched_loss_grads_(params, plain_grads, scale=scale, anchors=anchors, eta=eta)
    got, p_views = split_views(grads, group.param_shapes), split_views(params, group.param_shapes)
    s_views, a_views = (split_views(t, group.param_shapes) for t in (start, anchors))
    p = 0
    for i, layer in enumerate(group.layers):
        k = 2 if layer.bias else 1
        if gram[i]:
            want = split_views(plain_grads, group.param_shapes)[p:p + k]
        else:
            b, b0 = (p_views[p + 1], s_views[p + 1]) if layer.bias else (None, None)
            gw, gb = lk.matched_loss_grad(group.inputs[i], p_views[p], b, group.targets[i],
                                          layer.activation, scale=scale, backend=backend,
                                          precision=precision,
                                          anchor_preact=group.anchor_preacts[i],
                                          anchor_weight=s_views[p], anchor_bias=b0)
            if prox:  # the prox centre is the anchors, W0 only the delta form's
                gw = gw + (p_views[p] - a_views[p]) / eta
                gb = None if b is None else gb + (b - a_views[p + 1]) / eta
            want = [gw] + ([gb] if layer.bias else [])
        for g_got, g_want in zip(got[p:p + k], want):
            assert torch.isfinite(g_got).all()
            assert rel_err(g_got, g_want) <= tol, (i, rel_err(g_got, g_want))
        p += k


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_anchored_group_uses_z0(precision):
    """Z0 is read: the delta form with a Z0 off X W0^T + b0 differs from the plain form (a
    test that the anchored launch is not the plain one under another name)."""
    group, start, params = _anchored_group(RAGGED, 13, "triton", precision, None,
                                           torch.float32)
    grads, plain_grads = (torch.empty(group.num_params, device=DEVICE) for _ in range(2))
    group.matched_loss_grads_(params, grads)
    plain = LayerGroup(RAGGED, 13, device=DEVICE, backend="triton", precision=precision)
    for dst, src in ((plain.inputs, group.inputs), (plain.targets, group.targets)):
        dst.buffer.copy_(src.buffer)
    plain.matched_loss_grads_(params, plain_grads)
    assert (grads - plain_grads).abs().max() > 1e-2


def test_anchored_group_arguments():
    group = LayerGroup(RAGGED, 4, device=DEVICE, backend="reference")
    assert group.anchor_preacts is None and group.start_params is None
    with pytest.raises(ValueError, match="'form_anchors_'"):
        group.form_anchors_(torch.zeros(group.num_params, device=DEVICE))
    with pytest.raises(ValueError, match="'anchored'"):
        LayerGroup(RAGGED, 4, device=DEVICE, anchored=1)
    anchored = LayerGroup(RAGGED, 4, device=DEVICE, backend="reference", anchored=True)
    with pytest.raises(ValueError, match="'params'"):
        anchored.form_anchors_(torch.zeros(3, device=DEVICE))
