"""lk.optim.LocoProp under hostile use (issue 21's reproducers; docs/guarantees.md): lifecycle,
whole steps, torch's validation at construction, state checks, non-finite steps."""
import copy
import gc
import io
import math
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk

OPT = "locoprop.optim.LocoProp"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(n=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, opt, steps=3, x=None):
    x, y = _batch() if x is None else (x, _batch()[1])
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()),
            {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})


def _same(model, opt, snap):
    params, state = snap
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert {id(p) for p in opt.state} == set(state)
    for p, st in opt.state.items():
        assert st.keys() == state[id(p)].keys()
        assert all(torch.equal(v, state[id(p)][k]) for k, v in st.items())


# ---------------------------------------------------------------- lifecycle

def test_deleted_optimizer_is_freed_with_its_hooks_and_50_leave_none():
    model = _mlp()
    for _ in range(50):
        opt = lk.optim.LocoProp(model)
        ref = weakref.ref(opt)
        del opt
    gc.collect()
    assert ref() is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_switch_to_sgd_leaves_nothing_recording():
    model = _mlp()
    opt = lk.optim.LocoProp(model, lr=1e-3)
    _train(model, opt, 2)
    del opt
    gc.collect()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    for _ in range(5):
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_an_optimizer_kept_alive_but_not_stepped_holds_one_step_of_records():
    """Another optimizer trains (its zero_grad clears the gradients): the records of calls
    whose gradients are gone go too, so they do not grow."""
    model = _mlp()
    idle = lk.optim.LocoProp(model, lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    for _ in range(20):
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
    assert max(len(calls) for calls in idle._records.values()) <= 1


def test_a_second_optimizer_on_the_same_model_takes_over():
    """The newest optimizer of a model records; the previous one is detached, says so, and
    refuses to step (re-running `opt = LocoProp(model)` works)."""
    model = _mlp()
    first = lk.optim.LocoProp(model, lr=1e-3)
    with pytest.warns(RuntimeWarning, match="already had an lk.optim.LocoProp"):
        second = lk.optim.LocoProp(model, lr=1e-3)
    assert sum(len(m._forward_hooks) for m in model.modules()) == len(second._hooks) - 1
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    assert not any(first._records.values())
    assert any(second._records.values())
    with pytest.raises(RuntimeError, match="detached from its model by a newer"):
        first.step()
    second.step()
    opt = lk.optim.LocoProp(model)  # rebinding the name: no warning once the old one is gone
    del second, first
    gc.collect()


def test_deepcopy_and_pickle_refuse_clearly_and_state_dict_round_trips():
    model = _mlp()
    opt = lk.optim.LocoProp(model, lr=1e-3)
    _train(model, opt, 1)
    with pytest.raises(TypeError, match="cannot be deep-copied.*load_state_dict"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="cannot be pickled.*state_dict"):
        pickle.dumps(opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin_model = copy.deepcopy(model)
    twin = lk.optim.LocoProp(twin_model, lr=1e-3)
    twin.load_state_dict(torch.load(buf, weights_only=True))
    _train(model, opt, 2)
    _train(twin_model, twin, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


# ---------------------------------------------------------------- whole steps

class MoE(nn.Module):
    """Two experts; the mask may send no token to one: ``out[mask] += expert(x[mask])``."""

    def __init__(self):
        super().__init__()
        self.inp, self.experts = nn.Linear(6, 8), nn.ModuleList(nn.Linear(8, 8) for _ in "ab")
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        out = torch.zeros_like(h)
        mask = h[:, 0] > 1e9  # no token goes to expert 1
        out[~mask] += self.experts[0](h[~mask])
        out[mask] += self.experts[1](h[mask])
        return self.head(out)


def test_an_expert_with_no_tokens_trains():
    torch.manual_seed(0)
    model = MoE()
    opt = lk.optim.LocoProp(model, lr=1e-3, output_activation="softmax")
    before = model.experts[1].weight.detach().clone()
    x, y = _batch()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert not opt._records[model.experts[1]]  # its 0-row call recorded nothing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(opt.state[p]["step"].item() == 5 for p in model.experts[0].parameters())
    # its gradient was zero (no tokens): the TF1 step of a zero gradient leaves it in place
    assert torch.equal(model.experts[1].weight, before)


@pytest.mark.parametrize("first_step", [True, False])
def test_a_failure_in_a_later_inner_iteration_leaves_everything_as_before(first_step,
                                                                       monkeypatch):
    model = _mlp()
    opt = lk.optim.LocoProp(model, lr=1e-3, inner_steps=4)
    if not first_step:
        _train(model, opt, 2)
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    snap = _snapshot(model, opt)
    calls = []
    real = opt._matched_loss_grads

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the inner iteration t = 2 (t = 0 runs no matched part)
            raise RuntimeError("injected")
        return real(*args, **kw)

    monkeypatch.setattr(opt, "_matched_loss_grads", failing)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    assert len(calls) == 2  # it failed after two RMSProp steps had been applied
    _same(model, opt, snap)


# ---------------------------------------------------------------- construction

@pytest.mark.parametrize("kw, error, match", [
    (dict(gamma=0.0), ValueError, "'gamma' expected a number > 0"),
    (dict(gamma=-10.0), ValueError, "'gamma'"),
    (dict(lr=float("nan")), ValueError, "'lr' expected a finite number"),
    (dict(lr=float("inf")), ValueError, "'lr'"),
    (dict(lr=-1e-3), ValueError, "'lr' expected a number >= 0"),
    (dict(lr="0.1"), TypeError, "'lr' expected a float"),
    (dict(other_lr=-1.0), ValueError, "'other_lr'"),
    (dict(eps=-1.0), ValueError, "'eps'"),
    (dict(alpha=1.5), ValueError, "'alpha'"),
    (dict(momentum=-0.1), ValueError, "'momentum'"),
    (dict(inner_steps=0), ValueError, "'inner_steps'"),
    (dict(lr_floor=2.0), ValueError, "'lr_floor'"),
    (dict(style="bogus"), ValueError, "'style'"),
    (dict(exclude=["(unclosed"]), ValueError, "'exclude' expected regular expressions"),
    (dict(nonfinite="ignore"), ValueError, "'nonfinite'"),
    (dict(lr=torch.tensor(1e-3, device="meta")), TypeError, "'lr' expected a tensor on the CPU"),
])
def test_bad_hyper_parameters_are_refused_at_construction(kw, error, match):
    with pytest.raises(error, match=match) as info:
        lk.optim.LocoProp(_mlp(), **kw)
    assert str(info.value).startswith(OPT)


@pytest.mark.parametrize("group", [dict(lr=-1.0), dict(style="bogus"), dict(lr="1"),
                                   dict(inner_steps=0), dict(alpha=-0.5)])
def test_add_param_group_checks_before_adding(group):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    extra = nn.Parameter(torch.zeros(3))
    opt = lk.optim.LocoProp(model)
    n = len(opt.param_groups)
    with pytest.raises((ValueError, TypeError), match=OPT):
        opt.add_param_group(dict(params=[extra], **group))
    assert len(opt.param_groups) == n


def test_a_model_mixing_dtypes_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3).double())

    class Cast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner[2](self.inner[1](self.inner[0](x)).double())

    wrapped = Cast(model)
    opt = lk.optim.LocoProp(wrapped, lr=1e-3, output_activation="softmax", backend="reference")
    x, y = _batch()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.state[model[2].weight]["square_avg"].dtype == torch.float64


# ---------------------------------------------------------------- state

def test_a_foreign_state_is_refused_with_nothing_changed():
    model = _mlp()
    opt = lk.optim.LocoProp(model, lr=1e-3)
    _train(model, opt, 1)
    other = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 17))  # 4 params too
    other_opt = lk.optim.LocoProp(other, lr=1e-3)
    xo = torch.randn(4, 3)
    F.cross_entropy(other(xo), torch.tensor([0, 1, 2, 0])).backward()
    other_opt.step()
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"shape \(8, 6\).*its parameter's"):
        opt.load_state_dict(other_opt.state_dict())
    _same(model, opt, snap)
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the live state dicts
    sd["state"][0]["square_avg"] = -sd["state"][0]["square_avg"]
    with pytest.raises(ValueError, match="non-negative square averages"):
        opt.load_state_dict(sd)
    _same(model, opt, snap)


def test_the_trainer_refuses_negative_square_averages_and_nan_parameters():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))
    trainer = lk.LocoProp(model, lambda z, x: F.mse_loss(z, x), output_activation="identity",
                          backend="reference")
    trainer.step(torch.randn(5, 6), torch.randn(5, 6))
    for key, poison, match in (("square_avgs", -1.0, "non-negative"),
                               ("params", float("nan"), "finite values")):
        sd = trainer.state_dict()
        sd[key] = sd[key].clone()
        sd[key][0] = poison
        before = {k: v.clone() if isinstance(v, torch.Tensor) else v
                  for k, v in trainer.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            trainer.load_state_dict(sd)
        after = trainer.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()
                   if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------- non-finite steps

def test_nonfinite_skip_changes_nothing_and_counts():
    model = _mlp()
    opt = lk.optim.LocoProp(model, lr=1e-3, nonfinite="skip")
    _train(model, opt, 2)
    snap = _snapshot(model, opt)
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x * float("nan")), y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite gradients: step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    _same(model, opt, snap)
    _train(model, opt, 1)  # and it goes on
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


def test_nonfinite_apply_is_torchs_behaviour():
    model = _mlp()
    opt = lk.optim.LocoProp(model, lr=1e-3)  # the default
    x, y = _batch()
    F.cross_entropy(model(x * float("nan")), y).backward()
    opt.step()
    assert not all(math.isfinite(p.sum().item()) for p in model.parameters())
    assert opt.skipped_steps == 0


def test_a_second_step_without_new_records_warns():
    model = _mlp()
    opt = lk.optim.LocoProp(model, lr=1e-3)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="no recorded layer call"):
        opt.step()


# ---------------------------------------------------------------- aliasing

def test_self_overlapping_and_interleaved_tensors():
    base = torch.zeros(7)
    overlapping = base.as_strided((4, 4), (1, 1))
    g = torch.ones(4, 4)
    with pytest.raises(ValueError, match="elements overlap"):
        lk.rmsprop_step_([overlapping], [g], [torch.ones(4, 4)], [torch.zeros(4, 4)], lr=0.1)
    assert torch.equal(base, torch.zeros(7))
    buf = torch.ones(10)
    sq = torch.ones(10)
    # buf[0::2] and buf[1::2] share no element: accepted
    lk.rmsprop_step_([buf[0::2]], [torch.ones(5)], [sq[0::2]], [buf[1::2]], lr=0.1,
                     backend="reference")
    with pytest.raises(ValueError, match="does not overlap"):
        lk.rmsprop_step_([buf[0::2]], [torch.ones(5)], [sq[0::2]], [buf.view(5, 2)[:, 0]], lr=0.1)
