"""The Gram-matrix inner gradient of quadratic local losses (``optim/gram.py``: ``Quadratic``,
``GramTerms``, ``uses_gram``): exact against the independent float64 oracle and against the
matched-loss op path, on identity layers (with and without bias, Conv1D layout, a layer called
twice, the prox term), variant S on a tanh MLP, reported in ``opt.layers``, and in a
``LayerGroup`` (the grouped strategy's form; its end-to-end tests: test_optim_grouped.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels import backends, reference
from locoprop_kernels.arena import split_views
from locoprop_kernels.grouped import LayerGroup, LayerSpec, param_shapes
from locoprop_kernels.optim.gram import uses_gram
from locoprop_oracle import oracle_steps
from test_oracle import max_rel_diff

TOL = 1e-9
OPTIONS = dict(lr=1e-3, inner_steps=4)


class Identities(nn.Module):
    """Affine layers without activations (one without a bias), the middle one called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 13, bias=False)
        self.c = nn.Linear(13, 5)

    def forward(self, x):
        return self.c(self.b(self.b(self.a(x))))


IDENTITY_ACTS = {"a": "identity", "b": "identity", "c": "identity"}


def tanh_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 9), nn.Tanh(),
                         nn.Linear(9, 3))


MLP_ACTS = {"0": "tanh", "2": "tanh", "4": "identity"}


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y, reduction="sum") / (2 * x.shape[0])


def data(d_in, d_out, rows=33, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, d_in, generator=g, dtype=torch.float64),
             torch.randn(rows, d_out, generator=g, dtype=torch.float64)) for _ in range(n)]


def run(model, batches, backend="reference", **options):
    opt = lk.optim.LocoProp(model, backend=backend, output_activation="identity", **options)
    for batch in batches:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    return opt


def rel_diff(a: nn.Module, b: nn.Module) -> float:
    """max over parameters of max |a - b| / max |b|."""
    return max(max_rel_diff(a, b).values())


def _backends():
    names = ["reference"]
    if backends.cpp_available():
        names.append("cpp")
    return names


@pytest.mark.parametrize("gram", ["always", "never"])
@pytest.mark.parametrize("eta", [None, 0.05])
def test_identity_layers_equal_the_oracle(gram, eta):
    torch.manual_seed(1)
    start = Identities().double()
    batches = data(7, 5)
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    opt = run(theirs, batches, gram=gram, eta=eta, **OPTIONS)
    assert [i.inner for i in opt.layers] == ["gram" if gram == "always" else "matched"] * 3
    oracle_steps(ours, batches, mse, IDENTITY_ACTS, eta=eta, **OPTIONS)
    assert rel_diff(start, ours) > 1e-4
    assert rel_diff(theirs, ours) <= TOL


@pytest.mark.parametrize("gram", ["always", "never"])
def test_variant_s_tanh_mlp_equals_the_oracle(gram):
    torch.manual_seed(2)
    start = tanh_mlp().double()
    batches = data(6, 3, rows=40)
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    opt = run(theirs, batches, variant="S", gram=gram, **OPTIONS)
    want = "gram" if gram == "always" else "matched"
    assert [i.inner for i in opt.layers] == [want] * 3
    oracle_steps(ours, batches, mse, MLP_ACTS, variant="S", **OPTIONS)
    assert rel_diff(start, ours) > 1e-4
    assert rel_diff(theirs, ours) <= TOL


@pytest.mark.skipif(not backends.cpp_available(), reason="the C++ extension is not built")
def test_cpp_float32_gram_equals_the_matched_path():
    """On the cpp backend (float32 only) the Gram form and the op agree to float32 rounding
    over 3 outer steps of T = 4 (the two differ only in the order of the sums)."""
    torch.manual_seed(1)
    start = Identities()
    batches = [(x.float(), y.float()) for x, y in data(7, 5)]
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    opt = run(a, batches, "cpp", gram="always", **OPTIONS)
    assert [i.inner for i in opt.layers] == ["gram"] * 3
    run(b, batches, "cpp", gram="never", **OPTIONS)
    assert rel_diff(start, a) > 1e-4
    assert rel_diff(a, b) <= 1e-5


def test_variant_m_takes_gram_only_for_the_identity_layer():
    torch.manual_seed(3)
    model = tanh_mlp().double()
    opt = run(model, data(6, 3, rows=40), gram="always", **OPTIONS)
    assert [i.inner for i in opt.layers] == ["matched", "matched", "gram"]


def test_conv1d_layout_equals_the_matched_path():
    """A weight stored (d_in, d_out) (transformers' Conv1D, declared here with
    register_affine_type) takes the Gram form through its transposed view."""

    class InOut(nn.Module):
        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
            self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

        def forward(self, x):
            return x @ self.weight + self.bias

    lk.optim.register_affine_type(InOut, layout="in_out")
    torch.manual_seed(4)
    start = nn.Sequential(InOut(7, 11), InOut(11, 4)).double()
    batches = data(7, 4)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    opt = run(a, batches, gram="always", **OPTIONS)
    assert [i.inner for i in opt.layers] == ["gram", "gram"]
    run(b, batches, gram="never", **OPTIONS)
    assert rel_diff(start, a) > 1e-4
    assert rel_diff(a, b) <= 1e-12


def test_local_gradients_at_w0_are_gamma_times_backprop_and_match_elsewhere():
    """docs/design.md §9's invariant on the Gram path, and the Gram gradient away from W0 equals the
    op's (``local_gradients(at=...)``)."""
    torch.manual_seed(5)
    model = Identities().double()
    x, y = data(7, 5, n=1)[0]
    grads = {}
    for gram in ("always", "never"):
        opt = lk.optim.LocoProp(model, backend="reference", gram=gram, gamma=3.0)
        opt.zero_grad()
        mse(model, (x, y)).backward()
        at0 = opt.local_gradients()
        for p, g in at0.items():
            torch.testing.assert_close(g, 3.0 * p.grad, rtol=1e-12, atol=1e-14)
        torch.manual_seed(6)
        away = {p: p.detach() + 0.1 * torch.randn_like(p) for p in model.parameters()}
        grads[gram] = opt.local_gradients(at=away)
        opt.remove_hooks()
    for p in model.parameters():
        torch.testing.assert_close(grads["always"][p], grads["never"][p], rtol=1e-11,
                                   atol=1e-12)


def test_auto_rule():
    """rows d_in + (T - 1) d_out d_in < 2 (T - 1) rows d_out (docs/models.md)."""
    assert uses_gram(4096, 256, 256, 10)
    assert not uses_gram(100, 256, 256, 10)      # more width than rows
    assert not uses_gram(4096, 256, 256, 1)      # T = 1: no inner GEMM to save
    d, rows, t = 189, 100, 9
    assert uses_gram(rows, d - 1, d - 1, t + 1) and not uses_gram(rows, d, d, t + 1)
    torch.manual_seed(7)
    wide = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).double()
    opt = run(wide, data(64, 64, rows=16, n=1), **OPTIONS)  # 16 rows, 64 wide: matched
    assert [i.inner for i in opt.layers] == ["matched", "matched"]
    opt = run(wide, data(64, 64, rows=256, n=1), **OPTIONS)  # many rows: gram
    assert [i.inner for i in opt.layers] == ["gram", "gram"]


def test_bad_gram_option():
    with pytest.raises(ValueError, match="gram"):
        lk.optim.LocoProp(nn.Linear(3, 2), gram="yes")


@pytest.mark.parametrize("eta", [None, 0.5])
def test_layer_group_gram_layers_equal_the_matched_loss_op(eta):
    """``LayerGroup(gram=...)``: a Gram layer's slots of the flat gradient equal the
    matched-loss op's for the target X W0^T + b0 (W0, b0: the params at ``form_gram_``), with
    the prox term; the matched layers' slots are the op's as before."""
    layers = [LayerSpec(5, 7, "identity"), LayerSpec(7, 3, "tanh"),
              LayerSpec(3, 4, "identity", bias=False)]
    rows, g = 9, torch.Generator().manual_seed(8)
    group = LayerGroup(layers, rows, device="cpu", dtype=torch.float64, backend="reference",
                       gram=(True, False, True))
    assert [r["d_in"] for r in group.layer_table()] == [7]  # the matched layer only
    for x, y in zip(group.inputs.views(), group.targets.views()):
        x.copy_(torch.randn(x.shape, generator=g, dtype=torch.float64))
        y.copy_(torch.randn(y.shape, generator=g, dtype=torch.float64))
    start = torch.randn(group.num_params, generator=g, dtype=torch.float64)
    params = start + 0.1 * torch.randn(group.num_params, generator=g, dtype=torch.float64)
    anchors = torch.randn(group.num_params, generator=g, dtype=torch.float64)
    grads = torch.full_like(params, float("nan"))  # every slot must be written
    with pytest.raises(RuntimeError, match="before form_"):
        group.matched_loss_grads_(params, grads, scale=0.3, anchors=anchors, eta=eta)
    group.form_gram_(start)
    group.matched_loss_grads_(params, grads, scale=0.3, anchors=anchors, eta=eta)
    shapes = param_shapes(layers)
    at, w0s, anchor, got = (split_views(t, shapes) for t in (params, start, anchors, grads))
    k = 0
    for i, layer in enumerate(layers):
        w, w0, aw = at[k], w0s[k], anchor[k]
        b, b0, ab = (at[k + 1], w0s[k + 1], anchor[k + 1]) if layer.bias else (None,) * 3
        x = group.inputs[i]
        gram = group.gram[i]
        target = (x @ w0.t() + (0 if b0 is None else b0)) if gram else group.targets[i]
        gw, gb = reference.matched_loss_grad(x, w, b, target, layer.activation, scale=0.3,
                                             eta=eta, anchor_weight=aw, anchor_bias=ab)
        torch.testing.assert_close(got[k], gw, rtol=1e-12, atol=1e-13)
        if layer.bias:
            torch.testing.assert_close(got[k + 1], gb, rtol=1e-12, atol=1e-13)
        k += 2 if layer.bias else 1


def test_layer_group_gram_flags_are_checked():
    layers = [LayerSpec(3, 2, "identity"), LayerSpec(2, 2, "tanh")]
    with pytest.raises(ValueError, match=r"gram\[1\]"):
        LayerGroup(layers, 4, device="cpu", gram=(True, True))
    with pytest.raises(ValueError, match="'gram'"):
        LayerGroup(layers, 4, device="cpu", gram=(True,))
