"""lk.optim.LocoProp: LocoProp on any model in the standard loop (docs/design.md section 9)."""
import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from conftest import BACKENDS, HAS_CUDA

CPU_BACKENDS = [b for b in BACKENDS if not (b == "triton" and HAS_CUDA)]


def bce(logits, x):
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def autoencoder(sizes=(20, 16, 8, 4, 8, 16, 20), code=2):
    """The official autoencoder's shape in small: tanh, a linear code layer, logits out."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 and i != code:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- the models of the issue

class TanhMLP(nn.Module):
    """A custom module that calls torch.tanh in its forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 9), nn.Linear(9, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TwiceUsed(nn.Module):
    """One Linear called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.out(h)


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


class EmbeddingLN(nn.Module):
    """nn.Embedding, nn.LayerNorm and a GELU MLP; the output head tied to the embedding."""

    def __init__(self, vocab=11, d=8, tied=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 16), nn.Linear(16, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _data(model, n=16, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    if isinstance(model, EmbeddingLN):
        tokens = torch.randint(0, 11, (n, 5), generator=g)
        return tokens, torch.randint(0, 11, (n, 5), generator=g)
    if isinstance(model, Transformer):
        x = torch.randn(n, 4, 8, generator=g)
    elif isinstance(model, SmallCNN):
        x = torch.randn(n, 1, 6, 6, generator=g)
    else:
        x = torch.randn(n, 6, generator=g)
    out = {SmallCNN: 5}.get(type(model), 3)
    return x, torch.randint(0, out, (n,), generator=g)


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


MODELS = {"custom tanh MLP": TanhMLP, "Linear used twice": TwiceUsed,
          "TransformerEncoderLayer + head": Transformer,
          "Embedding + LayerNorm + GELU MLP (tied head)": EmbeddingLN}


# ---------------------------------------------------------------- same weights

def test_same_weights_as_the_sequential_trainer():
    """On the autoencoder, activations detected: the weights of lk.LocoProp.step(x, x) after
    3 outer steps at T = 10, in float64."""
    torch.manual_seed(0)
    a = autoencoder().double()
    b = copy.deepcopy(a)
    trainer = lk.LocoProp(a, bce, output_activation="sigmoid", backend="reference", lr=1e-3)
    opt = lk.optim.LocoProp(b, output_activation="sigmoid", backend="reference", lr=1e-3)
    assert [(i.activation, i.how) for i in opt.layers] == [
        ("tanh", "detected"), ("tanh", "detected"), ("identity", "default"),
        ("tanh", "detected"), ("tanh", "detected"), ("sigmoid", "output")]
    for t in range(3):
        x = torch.rand(32, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        trainer.step(x, x)
        opt.zero_grad()
        bce(b(x), x).backward()
        opt.step()
    for p, q in zip(b.parameters(), a.parameters()):
        assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-12


# ---------------------------------------------------------------- the invariant at W0

@pytest.mark.parametrize("name", list(MODELS))
def test_first_local_gradient_is_gamma_backprop(name):
    torch.manual_seed(1)
    model = MODELS[name]().double()
    opt = lk.optim.LocoProp(model, gamma=10.0, backend="reference",
                            output_activation="softmax")
    x, y = _data(model)
    if x.is_floating_point():
        x = x.double()
    opt.zero_grad()
    _loss(model, x, y).backward()
    local = opt.local_gradients()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(map(id, local)) == set(map(id, trainable))
    for p in trainable:
        want = 10.0 * p.grad
        assert ((local[p] - want).abs().max() / want.abs().max()).item() <= 1e-10
    # Not a tautology: the local gradient is the matched-loss gradient with the target f(Z0)
    # (0 only if the records hold the right X and Z of every call) plus gamma p.grad.


def test_unrecorded_linear_is_linearized():
    """MultiheadAttention's out_proj: its forward is never called; all of its gradient is R."""
    model = Transformer().double()
    opt = lk.optim.LocoProp(model, backend="reference")
    out_proj = model.encoder.self_attn.out_proj
    assert any(i.name == "encoder.self_attn.out_proj" for i in opt.layers)
    x, y = _data(model)
    _loss(model, x.double(), y).backward()
    local = opt.local_gradients()
    assert torch.allclose(local[out_proj.weight], 10.0 * out_proj.weight.grad, rtol=1e-12)
    assert all(not calls for calls in (opt._records[out_proj],))


# ---------------------------------------------------------------- they train

def _train(model, backend, steps, **kw):
    opt = lk.optim.LocoProp(model, backend=backend, output_activation="softmax", **kw)
    g = torch.Generator().manual_seed(5)
    x, y = _data(model, generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(MODELS) + ["CNN (Conv2d + Linear head)"])
def test_models_train(name, backend):
    torch.manual_seed(2)
    model = (MODELS.get(name) or SmallCNN)()
    # The interpreter runs every Triton launch in numpy: 50 steps at T = 2 there (CI time).
    steps, T = (50, 10) if backend != "triton" else (50, 2)
    losses = _train(model, backend, steps, lr=1e-4, inner_steps=T)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- what is never touched

def test_frozen_parameters_are_bit_identical():
    torch.manual_seed(3)
    model = TanhMLP()
    model.fc1.weight.requires_grad_(False)   # a frozen weight: fc1 is no LocoProp layer
    model.out.requires_grad_(False)          # a frozen layer
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = lk.optim.LocoProp(model, lr=1e-2, backend="reference")
    assert [i.name for i in opt.layers] == ["fc2"]
    assert model.fc1.bias in opt.param_groups[1]["params"]  # linearized
    _train_loop(model, opt, 3)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def _train_loop(model, opt, steps):
    x, y = _data(model)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


def test_tied_parameter_is_one_parameter():
    torch.manual_seed(4)
    model = EmbeddingLN()
    opt = lk.optim.LocoProp(model, lr=1e-2, backend="reference")
    groups = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p is model.embed.weight for p in groups) == 1
    before = model.embed.weight.detach().clone()
    _train_loop(model, opt, 1)
    assert model.head.weight is model.embed.weight
    assert not torch.equal(model.embed.weight, before)
    assert opt.state[model.embed.weight]["step"].item() == 1


def test_no_grad_forward_records_nothing():
    model = TanhMLP()
    opt = lk.optim.LocoProp(model, backend="reference")
    with torch.no_grad():
        model(torch.randn(4, 6))
    assert all(not calls for calls in opt._records.values())


# ---------------------------------------------------------------- schedules, closure, state

@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5 ** e),
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10,
                                                  cycle_momentum=False),
], ids=["LambdaLR", "StepLR", "CosineAnnealingLR", "OneCycleLR"])
def test_schedulers_move_both_groups(make):
    model = EmbeddingLN(tied=False)
    opt = lk.optim.LocoProp(model, lr=1e-3, other_lr=2e-3, backend="reference")
    sched = make(opt)
    seen = []
    for _ in range(3):
        _train_loop(model, opt, 1)
        sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
    assert len(opt.param_groups) == 2
    for group_lrs in zip(*seen):
        assert len(set(group_lrs)) == 3  # each group's lr moved at every step


def test_lr_is_read_at_every_step():
    """A step at lr 0 changes nothing but the RMSProp state (the official warm-up epoch)."""
    model = TanhMLP()
    opt = lk.optim.LocoProp(model, lr=0.0, backend="reference")
    before = copy.deepcopy(model.state_dict())
    _train_loop(model, opt, 1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(opt.state[model.fc1.weight]["square_avg"],
                           torch.ones_like(model.fc1.weight))


def test_closure():
    model = TanhMLP()
    opt = lk.optim.LocoProp(model, lr=1e-4, backend="reference", output_activation="softmax")
    x, y = _data(model)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(10)]
    assert losses[-1] < losses[0]


def test_resume_is_bit_exact():
    torch.manual_seed(6)
    a = EmbeddingLN()
    b = copy.deepcopy(a)
    kw = dict(lr=1e-2, backend="cpp" if "cpp" in BACKENDS else "reference")
    opt_a = lk.optim.LocoProp(a, **kw)
    _train_loop(a, opt_a, 2)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b = lk.optim.LocoProp(b, **kw)
    opt_b.load_state_dict(saved["opt"])
    _train_loop(a, opt_a, 2)
    _train_loop(b, opt_b, 2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- refused, not wrong

def test_refusals():
    model = TanhMLP()
    with pytest.raises(ValueError, match="activations.*not a LocoProp layer"):
        lk.optim.LocoProp(model, activations={"nope": "tanh"})
    with pytest.raises(ValueError, match="activation"):
        lk.optim.LocoProp(model, activations={"fc1": "swish"})
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        lk.optim.LocoProp(model, process_group=object())


def test_grad_scaler_works():
    """GradScaler unscales p.grad, the only gradient the step uses: the same weights as
    without it (its scale is a power of two), and a step with an inf is skipped."""
    a = TanhMLP()
    b = copy.deepcopy(a)
    opt_a = lk.optim.LocoProp(a, lr=1e-3, backend="reference")
    opt_b = lk.optim.LocoProp(b, lr=1e-3, backend="reference")
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data(a)
    for _ in range(3):
        opt_a.zero_grad()
        scaler.scale(_loss(a, x, y)).backward()
        scaler.step(opt_a)
        scaler.update()
        _train_loop(b, opt_b, 1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    opt_a.zero_grad()
    scaler.scale(_loss(a, x * float("inf"), y)).backward()
    before = copy.deepcopy(a.state_dict())
    scaler.step(opt_a)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_explicit_activation_and_exclude():
    model = TanhMLP()
    opt = lk.optim.LocoProp(model, activations={"fc1": "relu"}, exclude=[r"^out$"])
    assert [(i.name, i.activation, i.how) for i in opt.layers] == [
        ("fc1", "relu", "explicit"), ("fc2", "tanh", "detected")]
    assert model.out.weight in opt.param_groups[1]["params"]
