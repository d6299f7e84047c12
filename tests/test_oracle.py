"""The independent oracle (tests/locoprop_oracle.py) against ``lk.optim.LocoProp``.

The oracle restates docs/design.md sections 2 and 9 with plain autograd and imports nothing of ours; here
it is checked against the package on the models where the package is known to follow docs/design.md
(nn.Linear / nn.Conv2d layers with tanh, sigmoid, relu, softmax, identity), so that the
transformer tests (test_transformers_models.py) can use it as their oracle.

Criterion everywhere: for every parameter, max |p_package - p_oracle| <= tol * max |p_oracle|
(the parameter's own scale; tol 1e-9 in float64), after 3 outer steps of T = 3 inner steps at
lr 1e-3; and the same parameters must have moved from their start by more than 1e-4 of their
scale (so the comparison is not between two untouched models).
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_oracle import ACTIVATIONS, LocoPropOracle, apply_f, oracle_steps

TOL = 1e-9
MOVED = 1e-4
OPTIONS = dict(lr=1e-3, inner_steps=3)


# ---------------------------------------------------------------- models

def mlp():
    """nn.Sequential, Linear + {tanh, sigmoid, relu}, logits out (BCE with logits)."""
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Sigmoid(),
                         nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 4))


MLP_ACTS = {"0": "tanh", "2": "sigmoid", "4": "relu", "6": "sigmoid"}


class TwiceUsed(nn.Module):
    """One Linear called twice in one forward (its local objective sums the two calls)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


TWICE_ACTS = {"inp": "tanh", "shared": "tanh", "out": "softmax"}


class Tied(nn.Module):
    """A token model whose output layer's weight is the embedding's (GPT-2's lm_head = wte),
    with a LayerNorm: parameters with no recorded call, and a tied one with both."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.hidden = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.norm(self.emb(tokens))
        h = h + torch.tanh(self.hidden(h))
        return self.head(h)


TIED_ACTS = {"hidden": "tanh", "head": "softmax"}


class ConvNet(nn.Module):
    """Two Conv2d layers (padding, stride, dilation, groups) and a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, dilation=1, groups=2)
        self.conv3 = nn.Conv2d(6, 3, 2, padding="same", dilation=2, bias=False)
        self.fc = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.sigmoid(self.conv3(h))
        return self.fc(h.flatten(1))


CONV_ACTS = {"conv1": "tanh", "conv2": "relu", "conv3": "sigmoid", "fc": "softmax"}


def bce(model, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x), y, reduction="sum") / x.shape[0]


def cross_entropy(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(kind, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "mlp":
            x = torch.randn(9, 6, generator=g, dtype=torch.float64)
            out.append((x, torch.rand(9, 4, generator=g, dtype=torch.float64)))
        elif kind == "twice":
            x = torch.randn(9, 6, generator=g, dtype=torch.float64)
            out.append((x, torch.randint(0, 3, (9,), generator=g)))
        elif kind == "tied":
            t = torch.randint(0, 11, (3, 5), generator=g)
            out.append((t, torch.randint(0, 11, (3, 5), generator=g)))
        else:
            x = torch.randn(4, 2, 7, 7, generator=g, dtype=torch.float64)
            out.append((x, torch.randint(0, 5, (4,), generator=g)))
    return out


CASES = {
    "mlp": (mlp, bce, MLP_ACTS, "sigmoid"),
    "twice": (TwiceUsed, cross_entropy, TWICE_ACTS, "softmax"),
    "tied": (Tied, cross_entropy, TIED_ACTS, "softmax"),
    "conv": (ConvNet, cross_entropy, CONV_ACTS, "softmax"),
}


def build(factory, seed=1):
    torch.manual_seed(seed)
    return factory().double()


def package_steps(model, data, loss_of, output_activation, **options):
    opt = lk.optim.LocoProp(model, backend="reference", output_activation=output_activation,
                            **options)
    for batch in data:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    return opt


def max_rel_diff(a: nn.Module, b: nn.Module) -> dict:
    """{parameter name: max |a - b| / max |b|}."""
    pb = dict(b.named_parameters())
    return {n: ((p - pb[n]).abs().max() / pb[n].abs().max().clamp_min(1e-30)).item()
            for n, p in a.named_parameters()}


# ---------------------------------------------------------------- the oracle itself

@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_oracle_activations_are_the_textbook_functions(name):
    z = torch.randn(5, 7, dtype=torch.float64)
    want = {"identity": z, "tanh": torch.tanh(z), "sigmoid": torch.sigmoid(z),
            "relu": torch.relu(z), "softmax": torch.softmax(z, -1), "gelu": F.gelu(z),
            "gelu_tanh": F.gelu(z, approximate="tanh"), "silu": F.silu(z)}[name]
    torch.testing.assert_close(ACTIVATIONS[name](z), want, rtol=1e-14, atol=1e-15)
    zc = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    got = apply_f(name, zc, "Conv2d")
    if name == "softmax":  # over the channels
        torch.testing.assert_close(got, torch.softmax(zc, 1), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(got.sum(1), torch.ones(2, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("case", sorted(CASES))
def test_oracle_first_local_gradient_is_gamma_times_backprop(case):
    """At theta0 the oracle's local gradient is gamma p.grad for every parameter (docs/design.md §9):
    the oracle's own consistency (its R and its matched part at W0)."""
    factory, loss_of, acts, _ = CASES[case]
    model = build(factory)
    oracle = LocoPropOracle(model, acts, lr=1e-3, gamma=10.0)
    data = batches(case, n=1)
    got = oracle.local_gradients(lambda m: loss_of(m, data[0]))
    assert len(got) == len(list(model.parameters()))
    for p, g in got.items():
        torch.testing.assert_close(g, 10.0 * p.grad, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- against the package

@pytest.mark.parametrize("case", sorted(CASES))
def test_package_matches_oracle_three_outer_steps(case):
    factory, loss_of, acts, output_activation = CASES[case]
    start = build(factory)
    data = batches(case)
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    if case == "tied":  # deepcopy keeps the tie
        assert ours.head.weight is ours.emb.weight

    opt = package_steps(theirs, data, loss_of, output_activation, **OPTIONS)
    assert {i.name: i.activation for i in opt.layers} == acts, opt.layers
    oracle_steps(ours, data, loss_of, acts, **OPTIONS)

    moved = max_rel_diff(start, ours)
    assert min(moved.values()) > MOVED, moved
    diff = max_rel_diff(theirs, ours)
    assert max(diff.values()) <= TOL, diff


def test_package_matches_oracle_variant_s():
    """Variant S: Y = Z0 - gamma G, identity local losses everywhere."""
    start, data = build(mlp), batches("mlp")
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    package_steps(theirs, data, bce, "sigmoid", variant="S", **OPTIONS)
    oracle_steps(ours, data, bce, MLP_ACTS, variant="S", **OPTIONS)
    assert min(max_rel_diff(start, ours).values()) > MOVED
    assert max(max_rel_diff(theirs, ours).values()) <= TOL


def test_package_matches_oracle_with_the_prox_term():
    """eta: + ||p - p0||^2 / (2 eta) in the local objective. docs/design.md §2 writes it for a layer's
    (W, b); the package (its module docstring) and the oracle put it on every trainable
    parameter, the linearized ones (LayerNorm, embedding) included."""
    start, data = build(Tied), batches("tied")
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    package_steps(theirs, data, cross_entropy, "softmax", eta=0.05, **OPTIONS)
    oracle_steps(ours, data, cross_entropy, TIED_ACTS, eta=0.05, **OPTIONS)
    assert min(max_rel_diff(start, ours).values()) > MOVED
    assert max(max_rel_diff(theirs, ours).values()) <= TOL


def test_package_matches_oracle_other_hyperparameters():
    """gamma, scale, alpha, eps, momentum, lr_floor and T away from their defaults."""
    options = dict(lr=2e-3, gamma=3.0, scale=0.25, alpha=0.8, eps=1e-4, momentum=0.9,
                   lr_floor=0.5, inner_steps=4)
    start, data = build(TwiceUsed), batches("twice")
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    package_steps(theirs, data, cross_entropy, "softmax", **options)
    oracle_steps(ours, data, cross_entropy, TWICE_ACTS, **options)
    assert min(max_rel_diff(start, ours).values()) > MOVED
    assert max(max_rel_diff(theirs, ours).values()) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_inner_step_is_one_rmsprop_step_on_gamma_grad(case):
    """T = 1: p1 = p0 - lr g / sqrt(alpha + (1 - alpha) g^2 + eps), g = gamma p.grad (TF1
    RMSProp from ms = 1, mom = 0), for the oracle and for the package."""
    factory, loss_of, acts, output_activation = CASES[case]
    start = build(factory)
    batch = batches(case, n=1)
    lr, gamma, alpha, eps = 1e-3, 10.0, 0.9, 1e-5
    probe = copy.deepcopy(start)
    loss_of(probe, batch[0]).backward()
    want = {}
    for (n, p) in probe.named_parameters():
        g = gamma * p.grad
        want[n] = p.detach() - lr * g / torch.sqrt(alpha + (1 - alpha) * g * g + eps)

    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    oracle_steps(ours, batch, loss_of, acts, lr=lr, inner_steps=1)
    package_steps(theirs, batch, loss_of, output_activation, lr=lr, inner_steps=1)
    for model in (ours, theirs):
        for n, p in model.named_parameters():
            scale = want[n].abs().max()
            assert ((p - want[n]).abs().max() / scale).item() <= 1e-12, n


class Conv1D(nn.Module):
    """transformers' Conv1D in miniature (the oracle recognises the class name): weight stored
    (in, out), z = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_oracle_inner_gradient_is_the_matched_loss_gradient(act, kind):
    """Away from W0 the oracle's local gradient of a layer is docs/design.md §2's
    s (f(X W^T + b) - Y)^T X (Conv1D: X^T (f(X W + b) - Y)), Y = f(Z0) - gamma G: checks the
    surrogate of F for every activation, and the Conv1D layout."""
    torch.manual_seed(3)
    first = nn.Linear(4, 5) if kind == "Linear" else Conv1D(5, 4)
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64)  # rows in two leading dims
    target = torch.randn(2, 7, 3, dtype=torch.float64)
    gamma, s = 10.0, 0.5
    oracle = LocoPropOracle(model, {"0": act}, lr=1e-3, gamma=gamma, scale=s)

    # G = dL/dZ0 and Z0 of the first layer, by hand
    z0 = first(x)
    z0.retain_grad()
    loss = ((model[2](torch.tanh(z0)) - target) ** 2).sum()
    loss.backward()
    G, Z0 = z0.grad.detach(), z0.detach()
    model.zero_grad()

    _, params, objective = oracle._prepare(
        lambda m: ((m(x) - target) ** 2).sum())
    grads0 = {id(p): p.grad.detach().clone() for p in params}
    with torch.no_grad():  # move away from W0
        first.weight.add_(0.2 * torch.randn_like(first.weight))
        first.bias.add_(0.2 * torch.randn_like(first.bias))
    got = dict(zip([id(p) for p in params], oracle._gradient(objective, params)))

    f = ACTIVATIONS[act]
    Y = f(Z0) - gamma * G
    with torch.no_grad():
        Z = first(x)
        D = (s * (f(Z) - Y)).reshape(-1, 5)
        X = x.reshape(-1, 4)
        want_w = D.t() @ X if kind == "Linear" else X.t() @ D
        want_b = D.sum(0)
    torch.testing.assert_close(got[id(first.weight)], want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[id(first.bias)], want_b, rtol=1e-12, atol=1e-12)
    # the other layer has no recorded call: its local gradient stays s gamma p.grad
    for p in model[2].parameters():
        torch.testing.assert_close(got[id(p)], s * gamma * grads0[id(p)], rtol=1e-12,
                                   atol=1e-14)
