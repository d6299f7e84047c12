"""User-defined local problems in lk.optim.LocoProp: target rules, per-layer eta and a
regularizer (docs/models.md ("Custom local problems"))."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk

GAMMA = 10.0


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(),
                         nn.Linear(8, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,),
                                                                           generator=g)


def _run(model, steps=3, **kw):
    opt = lk.optim.LocoProp(model, lr=1e-3, inner_steps=3, backend="reference",
                            output_activation="softmax", **kw)
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def _max_rel(a, b):
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters()))


def test_the_m_rule_as_a_custom_target_is_variant_m():
    a, b = _mlp(), _mlp()
    _run(a)
    _run(b, targets=lambda z0, g, f, gamma: f(z0) - gamma * g)
    assert _max_rel(b, a) <= 1e-12
    moved = _mlp()
    assert _max_rel(a, moved) > 1e-6


def test_a_target_rule_changes_the_first_local_gradient_as_the_math_says():
    """Y = f(Z0) - 2 gamma G on layer '2' only: its local gradient at W0 is
    s (f(Z0) - Y)^T X + s gamma R = 2 s gamma G^T X + s gamma (p.grad - G^T X)
    = 2 gamma p.grad (the layer is used once, so G^T X = p.grad); others keep gamma p.grad."""
    model = _mlp()
    opt = lk.optim.LocoProp(model, backend="reference", output_activation="softmax",
                            targets={"2": lambda z0, g, f, gamma: f(z0) - 2 * gamma * g})
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    local = opt.local_gradients()
    for name, p in model.named_parameters():
        k = 2.0 if name.startswith("2.") else 1.0
        assert ((local[p] - k * GAMMA * p.grad).abs().max() / p.grad.abs().max()) <= 1e-10, name


def test_conv_target_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 3)).double()
    opt = lk.optim.LocoProp(model, backend="reference", output_activation="softmax",
                            targets={"0": lambda z0, g, f, gamma: f(z0) - 3 * gamma * g})
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    local = opt.local_gradients()
    for name, p in model.named_parameters():
        k = 3.0 if name.startswith("0.") else 1.0
        assert ((local[p] - k * GAMMA * p.grad).abs().max() / p.grad.abs().max()) <= 1e-10, name


def test_per_layer_eta_equals_the_global_prox_when_it_names_every_layer():
    a, b, c = _mlp(), _mlp(), _mlp()
    _run(a, eta=0.05)
    _run(b, eta={"0": 0.05, "2": 0.05, "4": 0.05})
    assert _max_rel(b, a) <= 1e-12
    _run(c, eta={"0": 0.05})
    assert _max_rel(c, a) > 1e-9  # the other layers took no prox term


def test_regularizer_equal_to_the_prox_gradient_is_the_prox():
    a, b = _mlp(), _mlp()
    _run(a, eta=0.05)
    _run(b, regularizer=lambda name, p, p0: (p - p0) / 0.05)
    assert _max_rel(b, a) <= 1e-12


def test_regularizer_at_w0_enters_the_first_inner_step():
    """T = 1: one TF1 RMSProp step on gamma p.grad + reg(p0) (here a weight decay 0.1 p0)."""
    model = _mlp()
    start = copy.deepcopy(model)
    opt = lk.optim.LocoProp(model, lr=1e-3, inner_steps=1, backend="reference",
                            output_activation="softmax",
                            regularizer=lambda name, p, p0: 0.1 * p0 if "weight" in name
                            else None)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for (name, p), p0 in zip(model.named_parameters(), start.parameters()):
        g = GAMMA * grads[name] + (0.1 * p0 if "weight" in name else 0.0)
        ms = 0.9 + 0.1 * g * g
        want = p0 - 1e-3 * g / torch.sqrt(ms + 1e-5)
        assert ((p - want).abs().max() / want.abs().max()).item() <= 1e-12, name


@pytest.mark.parametrize("kw, match", [
    (dict(targets={"nope": lambda *a: None}), "names of LocoProp layers"),
    (dict(targets=3), "expected a callable"),
    (dict(eta={"0": -1.0}), "eta"),
    (dict(regularizer="l2"), "regularizer"),
])
def test_bad_local_problem_options_are_refused(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lk.optim.LocoProp(_mlp(), **kw)


def test_a_target_of_the_wrong_shape_is_refused():
    model = _mlp()
    opt = lk.optim.LocoProp(model, backend="reference",
                            targets={"0": lambda z0, g, f, gamma: z0[:1]})
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"targets\['0'\].*Z0's shape"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
