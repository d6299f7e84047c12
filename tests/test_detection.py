"""Activation detection from the forward pass (optim/detection.py, docs/design.md section 9).

Each model here is one a fx trace would either fail on or read wrongly; after one training
forward ``opt.layers`` must name the activation that a reader of the model's code would name,
or identity with the reason.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels.activations import ACTIVATIONS
from locoprop_kernels.optim.detection import computed_activation


class Untraceable(nn.Module):
    """fx cannot trace this (data-dependent control flow); ``forward`` is given."""

    def __init__(self, forward, sizes=(6, 8, 3), loss=None, act=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2])
        self._forward, self.loss, self.act = forward, loss, act

    def forward(self, x, y=None):
        if x.sum() > -1e30:  # a data-dependent branch: torch.fx cannot trace it
            out = self._forward(self, x)
        if self.loss is not None and y is not None:
            return self.loss(out, y), out
        return out


def _decide(model, x, y=None, **kw):
    """opt.layers as {name: (activation, how, reason)} after one training forward + backward."""
    opt = lk.optim.LocoProp(model, backend="reference", **kw)
    out = model(x) if y is None else model(x, y)
    loss = out[0] if isinstance(out, tuple) else out.square().mean()
    loss.backward()
    opt.step()
    return {i.name: (i.activation, i.how, i.reason) for i in opt.layers}


X = torch.randn(5, 6)


class TanhByFormula(nn.Module):
    """tanh written as 2 sigmoid(2z) - 1: no tanh node, but the module computes tanh."""

    def forward(self, z):
        return 2.0 * torch.sigmoid(2.0 * z) - 1.0


@pytest.mark.parametrize("form, want", [
    (lambda m, x: m.fc2(torch.tanh(m.fc1(x))), "tanh"),
    (lambda m, x: m.fc2(m.fc1(x).tanh()), "tanh"),
    (lambda m, x: m.fc2(F.relu(m.fc1(x).view(5, 2, 4).reshape(5, 8))), "relu"),
    (lambda m, x: m.fc2(torch.sigmoid(m.fc1(x).double()).float()), "sigmoid"),
    (lambda m, x: m.fc2(F.leaky_relu(m.fc1(x).contiguous())), "leaky_relu"),
    (lambda m, x: m.fc2(torch.softmax(m.fc1(x), dim=-1)), "softmax"),
    (lambda m, x: m.fc2(torch.softmax(m.fc1(x), dim=1)), "softmax"),
    ((lambda m, x: m.fc2(m.act(m.fc1(x))), TanhByFormula()), "tanh"),
    ((lambda m, x: m.fc2(m.act(m.fc1(x))), nn.ReLU(inplace=True)), "relu"),
])
def test_detected_forms(form, want):
    form, act = form if isinstance(form, tuple) else (form, None)
    got = _decide(Untraceable(form, act=act), X)
    assert got["fc1"][:2] == (want, "detected"), got


@pytest.mark.parametrize("form, reason", [
    (lambda m, x: m.fc2(m.fc1(x) + x[:, :1]), "Z feeds add"),
    (lambda m, x: m.fc2(torch.tanh(m.fc1(x)) * m.fc1(x)), "more than one consumer"),
    (lambda m, x: m.fc2(F.leaky_relu(m.fc1(x), 0.2)), "Z feeds leakyrelu"),
    # softmax over the batch, and over the features after a transpose: not the layer's f
    (lambda m, x: m.fc2(torch.softmax(m.fc1(x), dim=0)), "Z feeds softmax"),
    (lambda m, x: m.fc2(torch.softmax(m.fc1(x).t(), dim=0).t()), "Z feeds softmax"),
    (lambda m, x: m.fc2(F.hardswish(m.fc1(x))), "Z feeds hardswish"),
    ((lambda m, x: m.fc2(m.act(m.fc1(x))), nn.Dropout(0.5)), "Z feeds Dropout"),
])
def test_identity_with_its_reason(form, reason):
    form, act = form if isinstance(form, tuple) else (form, None)
    name, how, why = _decide(Untraceable(form, act=act), X)["fc1"]
    assert (name, how) == ("identity", "default")
    assert reason in why, why


def test_eval_mode_dropout_keeps_values():
    model = Untraceable(lambda m, x: m.fc2(torch.tanh(m.act(m.fc1(x)))), act=nn.Dropout(0.5))
    model.act.eval()
    got = _decide(model, X)
    assert got["fc1"][:2] == ("tanh", "detected")


@pytest.mark.parametrize("loss, want", [
    (lambda z, y: F.cross_entropy(z, y), "softmax"),
    (lambda z, y: -F.log_softmax(z, dim=-1).mean(), "softmax"),
    (lambda z, y: F.binary_cross_entropy_with_logits(z, torch.ones_like(z)), "sigmoid"),
    (lambda z, y: F.mse_loss(z, torch.zeros_like(z)), "identity"),
])
def test_loss_links_inside_the_model(loss, want):
    model = Untraceable(lambda m, x: m.fc2(torch.tanh(m.fc1(x))), loss=loss)
    y = torch.randint(0, 3, (5,))
    got = _decide(model, X, y)
    assert got["fc1"][:2] == ("tanh", "detected")
    assert got["fc2"][:2] == (want, "loss")
    # output_activation still wins for a layer whose output is the model's output
    got = _decide(copy.deepcopy(model), X, y, output_activation="sigmoid")
    assert got["fc2"][:2] == ("sigmoid", "output")


def test_output_without_a_loss_says_so():
    got = _decide(Untraceable(lambda m, x: m.fc2(torch.tanh(m.fc1(x)))), X)
    assert got["fc2"][0] == "identity" and "model's output" in got["fc2"][2]


def test_explicit_wins_and_gated_mlp():
    """Llama's act(gate(x)) * up(x): gate gets the activation, up identity (feeds mul)."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.down(self.act(self.gate(x)) * self.up(x))

    got = _decide(Gated(), X)
    assert got["gate"][:2] == ("tanh", "detected")
    assert got["up"][0] == "identity" and "mul" in got["up"][2]
    got = _decide(Gated(), X, activations={"gate": "sigmoid"})
    assert got["gate"][:2] == ("sigmoid", "explicit")


def test_layer_used_twice_with_different_consumers():
    got = _decide(Untraceable(lambda m, x: m.fc2(torch.tanh(m.fc1(x)) + torch.relu(m.fc1(x))),
                              sizes=(6, 8, 3)), X)
    assert got["fc1"][0] == "identity" and "relu" in got["fc1"][2] and "tanh" in got["fc1"][2]


def test_conv2d_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3)
            self.head = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            if x.sum() > -1e30:
                h = torch.softmax(self.c1(x), dim=1)
            h = F.relu(self.c2(h))
            return self.head(h.flatten(1))

    got = _decide(Net(), torch.randn(3, 2, 6, 6))
    assert got["c1"][:2] == ("softmax", "detected")
    assert got["c2"][:2] == ("relu", "detected")


def test_probe_tells_activations_apart():
    assert computed_activation(nn.Tanh(), -1, 3) == "tanh"
    assert computed_activation(TanhByFormula(), -1, 2) == "tanh"
    assert computed_activation(nn.Softmax(dim=1), 1, 4) == "softmax"
    assert computed_activation(nn.Softmax(dim=0), -1, 2) is None
    assert computed_activation(nn.LeakyReLU(0.02), -1, 2) is None
    assert computed_activation(nn.Hardswish(), -1, 2) is None
    assert computed_activation(nn.Flatten(), -1, 3) is None
    for name, act in ACTIVATIONS.items():
        class Module(nn.Module):
            def forward(self, z, f=act.f):
                return f(z)
        assert computed_activation(Module(), -1, 3) == name


def test_compiled_model_decides_as_eager():
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8),
                             nn.Sigmoid(), nn.Dropout(0.0), nn.Linear(8, 3))

    y = torch.randint(0, 3, (5,))
    decided = []
    for model in (make(), torch.compile(make())):
        opt = lk.optim.LocoProp(model, lr=1e-3, output_activation="softmax")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            opt.step()
        decided.append([(i.name, i.activation, i.how) for i in opt.layers])
    assert decided[0] == decided[1] == [("0", "relu", "detected"), ("2", "sigmoid", "detected"),
                                        ("5", "softmax", "output")]


def test_compiled_detection_restores_the_rng():
    """The eager detection forward of a compiled model draws dropout masks: the RNG stream the
    real forward sees must be the one it would have seen without the optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    compiled = torch.compile(model)
    lk.optim.LocoProp(compiled, lr=1e-3)
    torch.manual_seed(1)
    out = compiled(X)
    torch.manual_seed(1)
    want = model(X)
    assert torch.equal(out, want)


def test_construction_time_guess_before_any_forward():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = lk.optim.LocoProp(model, output_activation="softmax")
    assert [(i.activation, i.how) for i in opt.layers] == [("tanh", "detected"),
                                                           ("softmax", "output")]
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


@pytest.mark.parametrize("act, name", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"),
                                       (nn.SiLU(), "silu")])
@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64),
                                            ("cpp", torch.float32)])
def test_non_monotone_activations_train(act, name, backend, dtype):
    """GELU / SiLU layers (non-convex F on a negative range): detected, and 30 steps of both
    LocoProp APIs keep a finite, decreasing loss."""
    if backend == "cpp" and not lk.backends.cpp_available():
        pytest.skip("locoprop_kernels._C not built")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), act, nn.Linear(16, 16), copy.deepcopy(act),
                          nn.Linear(16, 3)).to(dtype)
    trainer_model = copy.deepcopy(model)
    x, y = torch.randn(32, 6, dtype=dtype), torch.randint(0, 3, (32,))
    opt = lk.optim.LocoProp(model, lr=1e-3, inner_steps=3, backend=backend,
                            output_activation="softmax")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert [i.activation for i in opt.layers] == [name, name, "softmax"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    trainer = lk.LocoProp(trainer_model, lambda z, t: F.cross_entropy(z, t),
                          output_activation="softmax", lr=1e-3, inner_steps=3, backend=backend)
    assert trainer.activations == [name, name, "softmax"]
    first = last = None
    for _ in range(30):
        v = float(trainer.step(x, y))
        first = v if first is None else first
        last = v
    assert math.isfinite(last) and last < first
