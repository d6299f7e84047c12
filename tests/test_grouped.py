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
        LayerGroup([LayerSpec(2, 3, "mish")], 4, device=DEVICE)
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
