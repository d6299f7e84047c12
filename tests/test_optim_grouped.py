"""``lk.optim.LocoProp``'s grouped strategy (optim/grouped_step.py): the same steps as the
per-layer strategy, the cache of its loops, when it applies and why not, and ``lk.LocoProp``
running on it with its own arenas (no copy)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels.optim.grouped_step import flat_view
from conftest import requires_interpreter


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 6), nn.Linear(6, 5),
                         nn.Sigmoid(), nn.Linear(5, 3)).to(dtype)


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
def test_grouped_triton_kernel_equals_per_layer_float32():
    start = mlp(torch.float32)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    with lk.testing.count_launches() as n:
        opt = train(a, batches(dtype=torch.float32), grouped=True, backend="triton")
    assert opt.strategy == "grouped"
    assert n.triton == 3 * (2 * 3 + 4)  # per step: 2 launches x (T - 1) + T RMSProp launches
    train(b, batches(dtype=torch.float32), grouped=False, backend="triton")
    assert max_diff(a, b) <= 1e-6


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
