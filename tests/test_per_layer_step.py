"""lk.optim.LocoProp's per-layer strategy keeps its layout (optim/per_layer_step.py): buffers,
segments and backup are reused while the parameters and state stay the same, rebuilt when
they do not, and a reused layout computes what a fresh one does, bit for bit. A layer's
matched-loss op is checked once per step and repeated by the backend (``RepeatedOp``)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels.optim.per_layer_step import RepeatedOp

BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    not lk.backends.cpp_available(), reason="the cpp extension is not built"))]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(),
                         nn.Linear(6, 3))


def _batches(n, rows=9):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(rows, 5, generator=g), torch.randint(0, 3, (rows,), generator=g))
            for _ in range(n)]


def _steps(model, opt, batches, fresh_layout=False, between=None):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if fresh_layout:
            opt._layout = None  # what every step built before the layout was kept
        opt.step()
        if between is not None:
            between(i, opt)


def _two_groups(model, backend, **options):
    return lk.optim.LocoProp(model, lr=3e-3, backend=backend, inner_steps=4, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9), dict(eta=0.5)],
                         ids=["plain", "momentum", "prox"])
def test_a_kept_layout_gives_bitwise_the_steps_of_a_fresh_one(backend, options):
    kept, fresh = _model(), _model()
    opt_kept = _two_groups(kept, backend, **options)
    opt_fresh = _two_groups(fresh, backend, **options)

    def schedule(i, opt):  # a scheduler's lr change between steps keeps the layout
        for g in opt.param_groups:
            g["lr"] *= 0.7

    batches = _batches(4)
    _steps(kept, opt_kept, batches, between=schedule)
    _steps(fresh, opt_fresh, batches, fresh_layout=True, between=schedule)
    for a, b in zip(kept.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt_kept.state.values(), opt_fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_layout_is_reused_and_rebuilt_when_parameters_or_state_change():
    model = _model()
    opt = lk.optim.LocoProp(model, lr=1e-3, backend="reference", inner_steps=3)
    batches = _batches(6)
    _steps(model, opt, batches[:1])
    first = opt._layout
    _steps(model, opt, batches[1:2])
    assert opt._layout is first  # same parameters and state: kept
    opt.load_state_dict(opt.state_dict())
    _steps(model, opt, batches[2:3])
    assert opt._layout is not first  # new state tensors: rebuilt
    second = opt._layout
    model[4].weight.requires_grad_(False)  # a parameter without a gradient from now on
    _steps(model, opt, batches[3:4])
    assert opt._layout is not second
    third = opt._layout
    opt.state[model[0].weight]["square_avg"] = opt.state[model[0].weight]["square_avg"].clone()
    _steps(model, opt, batches[4:5])
    assert opt._layout is not third  # a state tensor replaced by the user: rebuilt


def test_a_failure_on_a_kept_layout_changes_nothing(monkeypatch):
    model = _model()
    opt = lk.optim.LocoProp(model, lr=1e-2, backend="reference", inner_steps=4, momentum=0.5)
    batches = _batches(3)
    _steps(model, opt, batches[:2])
    kept = opt._layout
    params = copy.deepcopy(model.state_dict())
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    calls = []
    real = opt._matched_loss_grads

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(opt, "_matched_loss_grads", failing)
    x, y = batches[2]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    assert opt._layout is kept
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    for p, st in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in st.items())


def test_a_failed_first_step_leaves_no_state_and_the_next_one_runs():
    model = _model()
    opt = lk.optim.LocoProp(model, lr=1e-3, backend="reference")
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    x.add_(1.0)  # the first layer's recorded input: refused before anything is written
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()
    assert not opt.state
    _steps(model, opt, _batches(1))
    assert len(opt.state) == len(list(model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_out", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "softmax"])
def test_a_repeated_op_equals_a_checked_call_after_the_weights_change(backend, dtype, in_out,
                                                                      activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    y = torch.rand(7, 4, generator=g)
    w = (torch.randn(5, 4, generator=g) if in_out else torch.randn(4, 5, generator=g)).to(dtype)
    b = torch.randn(4, generator=g).to(dtype)
    op = RepeatedOp(x, w, b, y, activation, dtype=torch.float32, in_out=in_out, conv2d=None,
                    scale=0.5, backend=backend, precision="ieee")
    with torch.no_grad():
        w.mul_(0.5).add_(0.25)  # an inner iteration's update, in place
        b.sub_(0.125)
    op.again()
    w32 = w.float().t() if in_out else w.float()
    want_w, want_b = lk.matched_loss_grad(x, w32, b.float(), y, activation, scale=0.5,
                                          backend=backend)
    assert torch.equal(op.grad_weight, want_w)
    assert torch.equal(op.grad_bias, want_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_conv2d_op_equals_a_checked_call(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    geometry = dict(stride=[2, 1], padding=[1, 0], dilation=[1, 1], groups=1)
    y = torch.rand(2, 4, 3, 3, generator=g)
    op = RepeatedOp(x, w, None, y, "relu", dtype=torch.float32, in_out=False,
                    conv2d=geometry, scale=1.5, backend=backend, precision="ieee")
    assert op.grad_bias is None
    with torch.no_grad():
        w.mul_(-0.5)
    op.again()
    want_w, _ = lk.matched_loss_grad_conv2d(x, w, None, y, "relu", scale=1.5, backend=backend,
                                            **geometry)
    assert torch.equal(op.grad_weight, want_w)


def test_the_grouped_strategy_keeps_its_views_of_the_layout_and_a_failed_first_step_no_state(
        monkeypatch):
    model = _model()
    opt = lk.optim.LocoProp(model, lr=1e-3, backend="reference", inner_steps=3, grouped=True)
    calls = []
    real = lk.optim.locoprop.GroupedLoop.run

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lk.optim.locoprop.GroupedLoop, "run", failing)
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    assert not opt.state  # the first step created the state; its failure dropped it
    _steps(model, opt, _batches(2))
    assert opt.strategy == "grouped"
    views = opt._layout.grouped
    _steps(model, opt, _batches(1))
    assert opt._layout.grouped is views
