"""``lk.optim.LocoProp``'s grouped strategy (optim/grouped_step.py): the same steps as the
per-layer strategy (the Gram form of identity layers included), the cache of its loops, when it
applies and why not, and ``lk.LocoProp`` running on it with its own arenas (no copy)."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels.arena import layout_offsets
from locoprop_kernels.grouped import LayerSpec, param_shapes
from locoprop_kernels.optim.gram import uses_gram
from locoprop_kernels.optim.grouped_step import flat_view
from conftest import DEVICE, requires_interpreter
from test_oracle import max_rel_diff


def mlp(dtype=torch.float64, bias=True):
    """tanh, identity (no activation after it: its local loss is quadratic under M), sigmoid,
    and the output layer (f = sigmoid from ``output_activation``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 9, bias=bias), nn.Tanh(), nn.Linear(9, 6, bias=bias),
                         nn.Linear(6, 5, bias=bias), nn.Sigmoid(),
                         nn.Linear(5, 3, bias=bias)).to(dtype)


#: ``opt.layers[i].inner`` of ``mlp()`` with gram="always": variant M takes the Gram form for
#: its one identity layer, variant S (f = identity everywhere) for all four.
GRAM_INNER = {"M": ["matched", "gram", "matched", "matched"], "S": ["gram"] * 4}


def batches(rows=(11, 11, 11), dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(r, 7, generator=g).to(dtype), torch.rand(r, 3, generator=g).to(dtype))
            for r in rows]


def train(model, data, **options):
    opt = lk.optim.LocoProp(model, lr=1e-3, inner_steps=4, output_activation="sigmoid",
                            **options)
    for x, y in data:
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    return opt


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def rel_diff(a, b):
    """max over parameters of max |a - b| / max |b|."""
    return max(max_rel_diff(a, b).values())


def the_loop(opt):
    (loop,) = opt._grouped_cache.values()
    return loop


@pytest.mark.parametrize("eta", [None, 0.1])
@pytest.mark.parametrize("style", ["tf", "torch"])
def test_grouped_equals_per_layer_float64(eta, style):
    start = mlp()
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    kw = dict(backend="reference", eta=eta, style=style,
              **({} if style == "tf" else dict(momentum=0.0, alpha=0.99, eps=1e-8)))
    opt_a = train(a, batches(), grouped=True, **kw)
    opt_b = train(b, batches(), grouped=False, **kw)
    assert opt_a.strategy == "grouped"
    assert opt_b.strategy == "per-layer (grouped=False)"
    assert max_diff(start, a) > 1e-5
    assert max_diff(a, b) <= 1e-13
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        torch.testing.assert_close(sa["square_avg"], sb["square_avg"], rtol=1e-12, atol=1e-15)
        assert float(sa["step"]) == float(sb["step"]) == 3


@requires_interpreter
@pytest.mark.parametrize("gram", ["auto", "never"])
def test_grouped_triton_kernel_equals_per_layer_float32(gram):
    start = mlp(torch.float32)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    with lk.testing.count_launches() as n:
        opt = train(a, batches(dtype=torch.float32), grouped=True, backend="triton", gram=gram)
    assert opt.strategy == "grouped"
    assert n.triton == 3 * (2 * 3 + 4)  # per step: 2 launches x (T - 1) + T RMSProp launches
    want = GRAM_INNER["M"] if gram == "auto" else ["matched"] * 4
    assert [i.inner for i in opt.layers] == want
    assert not the_loop(opt).group.anchored  # "ieee": the plain stage 1, as before
    train(b, batches(dtype=torch.float32), grouped=False, backend="triton", gram=gram)
    assert max_diff(a, b) <= 1e-6


@requires_interpreter
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("gram", ["auto", "never"])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_delta_form_equals_per_layer_float32(precision, gram, bias):
    """At tf32/bf16 the grouped strategy runs (its stage 1 in the delta form, one launch for
    all matched layers) and moves the weights as the per-layer strategy's delta-form ops do;
    with gram="auto" the identity layer takes the Gram form on both."""
    start = mlp(torch.float32, bias=bias)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    data = batches(dtype=torch.float32)
    with lk.testing.count_launches() as n:
        opt = train(a, data, grouped=True, backend="triton", gram=gram, precision=precision)
    assert opt.strategy == "grouped"
    assert the_loop(opt).group.anchored
    assert n.triton == 3 * (2 * 3 + 4)  # the launch count of "ieee"
    want = GRAM_INNER["M"] if gram == "auto" else ["matched"] * 4
    assert [i.inner for i in opt.layers] == want
    opt_b = train(b, data, grouped=False, backend="triton", gram=gram, precision=precision)
    assert opt_b.strategy == "per-layer (grouped=False)"
    assert rel_diff(start, b) > 1e-4
    assert max_diff(a, b) <= 1e-6


@pytest.mark.parametrize("eta", [None, 0.1])
def test_grouped_delta_form_equals_per_layer_float64(eta):
    """The delta form on a backend without a grouped entry (reference: the group's per-layer
    fallback with anchor_preact), float64, the Gram layer mixed in, prox on and off: the
    per-layer strategy's steps to float64 rounding."""
    start = mlp()
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    kw = dict(backend="reference", precision="bf16", gram="always", eta=eta)
    opt_a = train(a, batches(), grouped=True, **kw)
    opt_b = train(b, batches(), grouped=False, **kw)
    assert opt_a.strategy == "grouped" and the_loop(opt_a).group.anchored
    assert the_loop(opt_a).group.gram == (False, True, False, False)
    assert rel_diff(start, b) > 1e-4
    assert rel_diff(a, b) <= 1e-12


def test_the_delta_form_flag_is_part_of_the_cache_key():
    model = mlp()
    opt = train(model, batches(rows=(11,)), grouped=True, backend="reference")
    first = the_loop(opt)
    assert not first.group.anchored
    opt.param_groups[0]["precision"] = "tf32"
    for x, y in batches(rows=(11,)):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    second = the_loop(opt)
    assert second is not first and second.group.anchored and opt.strategy == "grouped"


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eta", [None, 0.1])
def test_grouped_gram_equals_per_layer_gram_and_matched_float64(variant, bias, eta):
    """The Gram form on the grouped strategy: the same function as the per-layer strategy's
    Gram form and as the matched-loss op, to float64 rounding, over 3 steps of T = 4 with
    TF1's momentum 0.999; the Gram layers (the identity ones) say "gram" on both strategies."""
    start = mlp(bias=bias)
    runs = {}
    for name, kw in {"grouped gram": dict(grouped=True, gram="always"),
                     "per-layer gram": dict(grouped=False, gram="always"),
                     "per-layer matched": dict(grouped=False, gram="never")}.items():
        model = copy.deepcopy(start)
        runs[name] = (model, train(model, batches(), backend="reference", variant=variant,
                                   eta=eta, **kw))
    (a, opt_a), (b, opt_b), (c, opt_c) = runs.values()
    assert opt_a.strategy == "grouped" and opt_b.strategy.startswith("per-layer")
    assert [i.inner for i in opt_a.layers] == [i.inner for i in opt_b.layers] \
        == GRAM_INNER[variant]
    assert [i.inner for i in opt_c.layers] == ["matched"] * 4
    assert the_loop(opt_a).group.gram == tuple(i == "gram" for i in GRAM_INNER[variant])
    assert rel_diff(start, c) > 1e-4
    assert rel_diff(a, b) <= 1e-12
    assert rel_diff(a, c) <= 1e-12
    for p, q in zip(a.parameters(), c.parameters()):
        for key in ("square_avg", "momentum_buffer"):
            torch.testing.assert_close(opt_a.state[p][key], opt_c.state[q][key], rtol=1e-10,
                                       atol=1e-15)


def test_auto_takes_the_per_layer_rule_on_the_grouped_strategy():
    """gram="auto" on 4 rows, variant S: the rule (``uses_gram``) says matched for the two
    wider layers and Gram for the two narrow ones; both strategies choose so, and agree."""
    start = mlp()
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    data = batches(rows=(4, 4))
    opt_a = train(a, data, grouped=True, backend="reference", variant="S")
    opt_b = train(b, data, grouped=False, backend="reference", variant="S")
    rule = ["gram" if uses_gram(4, m.in_features, m.out_features, 4) else "matched"
            for m in start if isinstance(m, nn.Linear)]
    assert rule == ["matched", "matched", "gram", "gram"]
    assert [i.inner for i in opt_a.layers] == [i.inner for i in opt_b.layers] == rule
    assert opt_a.strategy == "grouped"
    assert rel_diff(a, b) <= 1e-12


@requires_interpreter
@pytest.mark.parametrize("variant", ["M", "S"])
def test_triton_leaves_the_gram_layers_out_of_the_grouped_launches(variant, monkeypatch):
    """The grouped kernels' layer table lists only the matched layers, at their offsets in the
    full layout; with every layer Gram (variant S) there is no grouped launch at all, only the
    T RMSProp launches per step. Results: the per-layer strategy's (float32)."""
    kernels = importlib.import_module("locoprop_kernels.triton_kernels.grouped_matched_loss_grad")
    tables = []
    plan = kernels.plan

    def recording_plan(batch, layers, *args, **kwargs):
        tables.append([layer["w_off"] for layer in layers])
        return plan(batch, layers, *args, **kwargs)

    monkeypatch.setattr(kernels, "plan", recording_plan)
    start = mlp(torch.float32)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    data = batches(dtype=torch.float32)
    with lk.testing.count_launches() as n:
        opt = train(a, data, grouped=True, backend="triton", gram="always", variant=variant)
    assert opt.strategy == "grouped" and [i.inner for i in opt.layers] == GRAM_INNER[variant]
    specs = [LayerSpec(m.in_features, m.out_features, "identity") for m in start
             if isinstance(m, nn.Linear)]
    w_offsets = layout_offsets(param_shapes(specs))[0:-1:2]  # W_l of each layer (with bias)
    if variant == "M":
        assert tables == [[w_offsets[0], w_offsets[2], w_offsets[3]]]  # layer 1 left out
        assert n.triton == 3 * (2 * 3 + 4)
    else:
        assert tables == []
        assert n.triton == 3 * 4
    train(b, data, grouped=False, backend="triton", gram="never", variant=variant)
    assert rel_diff(start, b) > 1e-4
    assert rel_diff(a, b) <= 1e-5


def test_the_gram_flags_are_part_of_the_cache_key():
    model = mlp()
    opt = train(model, batches(rows=(11,)), grouped=True, backend="reference", gram="always")
    first = the_loop(opt)
    assert first.group.gram == (False, True, False, False)
    opt.gram = "never"
    train_more = batches(rows=(11,))
    for x, y in train_more:
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    second = the_loop(opt)
    assert second is not first and second.group.gram == (False,) * 4
    assert [i.inner for i in opt.layers] == ["matched"] * 4 and opt.strategy == "grouped"


@pytest.mark.parametrize("eta", [None, 0.1])
def test_cuda_graph_with_gram_equals_eager(eta):
    """cuda_graph=True with Gram layers (variant S: all four) on the triton backend: step 1
    eager, step 2 captures the inner loop (the Gram GEMMs in it), later steps replay; the
    weights equal the eager strategy's. On the GPU the graph must be in use; on the CPU (the
    interpreter) both run eagerly, so there this checks only the eager path."""
    start = mlp(torch.float32).to(DEVICE)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    data = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(rows=(11,) * 4,
                                                             dtype=torch.float32)]
    graphed = train(a, data, grouped=True, backend="triton", gram="always", variant="S",
                    eta=eta, cuda_graph=True)
    train(b, data, grouped=True, backend="triton", gram="always", variant="S", eta=eta)
    assert [i.inner for i in graphed.layers] == ["gram"] * 4
    assert the_loop(graphed).graph_state == ("graph" if DEVICE == "cuda" else "eager")
    assert rel_diff(start, b) > 1e-4
    assert rel_diff(a, b) <= 1e-6


def test_the_loop_is_cached_per_shape():
    model = mlp()
    opt = train(model, batches(rows=(11, 11)), grouped=True, backend="reference")
    (first,) = opt._grouped_cache.values()
    train_more = [(x, y) for x, y in batches(rows=(11,))]
    for x, y in train_more:
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    assert list(opt._grouped_cache.values()) == [first]  # same shapes: reused
    for x, y in batches(rows=(5,)):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    (second,) = opt._grouped_cache.values()
    assert second is not first and second.group.batch == 5


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("make, options, reason", [
    (lambda: Twice().double(), {}, "different row counts"),
    (mlp, dict(eta={"0": 0.1}), "per-layer eta"),
    (mlp, dict(backend="cpp"), "runs layer by layer here"),
])
def test_when_it_does_not_apply_it_says_why(make, options, reason):
    grouped = None if "backend" in options else True
    if options.get("backend") == "cpp" and not lk.backends.cpp_available():
        pytest.skip("the C++ extension is not built")
    model = make()
    if options.get("backend") == "cpp":
        model = model.float()
    dtype = next(model.parameters()).dtype
    data = [(x.to(dtype), y.to(dtype)) for x, y in batches(rows=(11,))]
    opt = train(model, data, grouped=grouped, **({"backend": "reference"} | options))
    assert opt.strategy.startswith("per-layer") and reason in opt.strategy, opt.strategy


def test_grouped_option_is_checked():
    with pytest.raises(TypeError, match="'grouped'"):
        lk.optim.LocoProp(mlp(), grouped="yes")


def test_the_trainer_runs_on_its_own_arenas():
    """lk.LocoProp's parameters and state are consecutive views of its arenas: the grouped
    strategy runs on them (no copy) and gives the per-layer trainer's weights."""
    start = mlp()
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    loss = lambda out, y: F.binary_cross_entropy_with_logits(out, y)  # noqa: E731
    ta = lk.LocoProp(a, loss, backend="reference", grouped=True, lr=1e-3, inner_steps=4)
    tb = lk.LocoProp(b, loss, backend="reference", grouped=False, lr=1e-3, inner_steps=4)
    for x, y in batches():
        ta.step(x, y)
        tb.step(x, y)
    assert ta.strategy == "grouped"
    assert [i.inner for i in ta.optimizer.layers] == GRAM_INNER["M"]  # auto: the rule holds
    assert [i.inner for i in tb.optimizer.layers] == GRAM_INNER["M"]
    (loop,) = ta.optimizer._grouped_cache.values()
    assert not loop.owned and loop.params.data_ptr() == ta.params.buffer.data_ptr()
    assert loop.square_avgs.data_ptr() == ta.square_avgs.buffer.data_ptr()
    assert max_diff(a, b) <= 1e-13
    torch.testing.assert_close(ta.square_avgs.buffer, tb.square_avgs.buffer, rtol=1e-12,
                               atol=1e-15)


def test_flat_view():
    buf = torch.arange(10.0)
    views = [buf[0:6].view(2, 3), buf[6:10]]
    flat = flat_view(views)
    assert flat.data_ptr() == buf.data_ptr() and flat.shape == (10,)
    assert flat_view([buf[0:6].view(2, 3), buf[7:10]]) is None  # a gap
    assert flat_view([torch.zeros(2), torch.zeros(3)]) is None  # two storages
