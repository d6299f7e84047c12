"""The autoencoder experiment's pieces that need no data or extras: the official model, init,
loss and schedule, and a tiny end-to-end run on synthetic images (when tqdm is installed)."""
import functools
import importlib.util
import math

import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels.experiments import autoencoder as ae
from locoprop_kernels.experiments import data, optimizers


def test_official_model_layers_and_glorot_init():
    model = ae.build_model(784)
    opt = lk.LocoProp(model, ae.bce_loss, backend="reference")
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert [(l.d_in, l.d_out) for l in opt.layers] == list(zip(sizes, sizes[1:]))
    assert [l.activation for l in opt.layers] == ["tanh"] * 3 + ["identity"] + ["tanh"] * 3 \
        + ["sigmoid"]
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    w_limit = math.sqrt(6 / (784 + 1000))
    b_limit = math.sqrt(6 / (1000 + 1000))   # a bias (d,) has fan_in = fan_out = d
    assert w_limit * 0.98 < lin[0].weight.abs().max() <= w_limit
    assert b_limit * 0.9 < lin[0].bias.abs().max() <= b_limit
    assert torch.equal(ae.build_model(784)[0].weight, lin[0].weight)  # seeded: same init


def test_official_schedule():
    base = 1e-5
    got = [optimizers.official_lr(base, e) for e in (0, 1, 4, 5, 50, 99)]
    want = [0.0, base / 5, 4 * base / 5, base * (1 - 1 / 95), base * (1 - 46 / 95), 0.0]
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_loss_reductions():
    x = torch.rand(5, 6)
    z = torch.randn(5, 6)
    per_row = ae.bce_loss(z, x, "none")
    assert per_row.shape == (5,)
    assert ae.bce_loss(z, x) == pytest.approx(per_row.mean().item(), rel=1e-6)
    assert ae.bce_loss(z, x, "sum") == pytest.approx(per_row.sum().item(), rel=1e-6)


def test_mnist_unpickler_refuses_anything_but_arrays():
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data._ArraysOnly(io.BytesIO(pickle.dumps(Evil()))).load()


@pytest.mark.skipif(importlib.util.find_spec("tqdm") is None, reason="needs the bench extras")
def test_run_one_on_synthetic_images(monkeypatch):
    monkeypatch.setattr(ae, "HIDDEN", [6, 3, 6])
    monkeypatch.setattr(ae, "CODE_LAYER", 1)
    g = torch.Generator().manual_seed(0)
    split = data.Split(torch.rand(30, 8, generator=g), torch.rand(10, 8, generator=g))
    rec = ae.run_one("locoprop-m", 1e-2, split, epochs=3, seed=0, device=torch.device("cpu"),
                     dtype=torch.float32, batch=16, backend="reference", progress=False)
    rows = rec["epochs"]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rec["status"] == "ok"
    assert rows[1]["lr"] == 0.0 and rows[1]["train_loss"] == rows[0]["train_loss"]  # lr 0
    assert rows[3]["train_loss"] < rows[0]["train_loss"]
    text = ae.table(dict(dataset="synthetic", train_size=30, test_size=10, device="cpu",
                         runs=[rec]))
    assert "locoprop-m lr=0.01 *" in text


def test_console_script_exits_0(monkeypatch):
    """The console script's wrapper does sys.exit(entry()): the entry must return 0, not the
    result dict (which made every successful run exit with status 1)."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module, func = pyproject["project"]["scripts"]["locoprop-autoencoder"].split(":")
    monkeypatch.setattr(ae, "main", lambda argv=None: {"runs": []})
    entry = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        import sys
        sys.exit(entry())
    assert exit_info.value.code == 0


# ----------------------------------------------------------------------------- presets

def _small_setup(monkeypatch, n=48, d=8):
    monkeypatch.setattr(ae, "HIDDEN", [6, 3, 6])
    monkeypatch.setattr(ae, "CODE_LAYER", 1)
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, d, generator=g), ae.layer_activations(len(ae.HIDDEN) + 1)


def _build(name, lr, acts, **hparams):
    return optimizers.build(name, lr, ae.build_model(8), ae.bce_loss, activations=acts,
                            batch=16, total_epochs=100, backend="reference", **hparams)


def test_official_preset_is_the_official_trainer_bit_for_bit(monkeypatch):
    """The default preset stays what the reproduction ran: lk.LocoProp with its defaults and
    the official schedule (epoch 0 at lr 0), set through start_epoch."""
    x, acts = _small_setup(monkeypatch)
    default = _build("locoprop-m", 1e-2, acts)
    explicit = _build("locoprop-m", 1e-2, acts, preset="official")
    model = ae.build_model(8)
    by_hand = lk.LocoProp(model, ae.bce_loss, variant="M", lr=0.0, backend="reference")
    assert default.label == "locoprop-m lr=0.01" and default.hparams == {}
    for epoch in range(3):
        default.start_epoch(epoch)
        explicit.start_epoch(epoch)
        by_hand.lr = optimizers.official_lr(1e-2, epoch, 100)
        for i in range(0, x.shape[0], 16):
            batch = x[i:i + 16]
            losses = [m.step(batch) for m in (default, explicit)] + [by_hand.step(batch, batch)]
            assert losses[0].item() == losses[1].item() == losses[2].item()
    for a, b, c in zip(default.model.parameters(), explicit.model.parameters(),
                       model.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert default.opt.inner_steps == 10


def test_fast_preset_zero_lr_warmup(monkeypatch):
    x, acts = _small_setup(monkeypatch)
    method = _build("locoprop-m-fast", 1e-2, acts, warmup_steps=2, warmup="zero-lr")
    assert method.name == "locoprop-m-fast" and method.opt.inner_steps == 2
    fast = optimizers.PRESETS["fast"]
    assert method.hparams == dict(preset="fast", inner_steps=2, warmup_steps=2,
                                  warmup="zero-lr", decay=fast["decay"],
                                  horizon=fast["horizon"], horizon_steps=fast["horizon_steps"],
                                  final_ratio=fast["final_ratio"])
    start = [p.detach().clone() for p in method.model.parameters()]
    method.set_progress(0.0)
    for k in range(2):  # warm steps: the square averages move, the weights do not
        method.step(x[16 * k:16 * (k + 1)])
        assert all(torch.equal(p, q) for p, q in zip(method.model.parameters(), start))
        assert method.opt.lr == 0.0
    assert not torch.equal(method.opt.square_avgs.buffer,
                           torch.ones_like(method.opt.square_avgs.buffer))
    before = method.opt.square_avgs.buffer.clone()
    method.step(x[32:48])
    assert not all(torch.equal(p, q) for p, q in zip(method.model.parameters(), start))
    assert not torch.equal(method.opt.square_avgs.buffer, before)
    # the same as preset="fast" on locoprop-m
    same = _build("locoprop-m", 1e-2, acts, preset="fast", warmup_steps=2, warmup="zero-lr")
    same.set_progress(0.0)
    for k in range(3):
        same.step(x[16 * k:16 * (k + 1)])
    assert all(torch.equal(p, q) for p, q in zip(same.model.parameters(),
                                                 method.model.parameters()))


def test_fast_preset_grad_square_warmup(monkeypatch):
    """warmup='grad-square': the square averages become the mean over the warm batches of
    (gamma * dL/dtheta)^2, the first local gradient of every layer; weights stay put."""
    x, acts = _small_setup(monkeypatch)
    method = _build("locoprop-m-fast", 1e-2, acts, warmup_steps=2, gamma=5.0)  # the default
    assert method.hparams["warmup"] == "grad-square"
    start = [p.detach().clone() for p in method.model.parameters()]
    reference = ae.build_model(8)
    want = [torch.zeros_like(p) for p in reference.parameters()]
    for k in range(2):
        batch = x[16 * k:16 * (k + 1)]
        loss = method.step(batch)
        grads = torch.autograd.grad(ae.bce_loss(reference(batch), batch),
                                    list(reference.parameters()))
        assert loss.item() == pytest.approx(ae.bce_loss(reference(batch), batch).item())
        for w, g in zip(want, grads):
            w += (5.0 * g) ** 2 / 2
    assert all(torch.equal(p, q) for p, q in zip(method.model.parameters(), start))
    # a warm step holds no layer records after it (nothing steps on them)
    assert optimizers.state_bytes(method, exclude=[x])["bytes"] == \
        optimizers.state_bytes(_build("locoprop-m-fast", 1e-2, acts, warmup_steps=2,
                                      gamma=5.0), exclude=[x])["bytes"]
    for avg, w in zip(method.opt.square_avgs.views(), want):
        torch.testing.assert_close(avg, w, rtol=1e-5, atol=1e-12)
    method.set_progress(0.0)  # the preset decays on the budget: at its start, the peak
    method.step(x[32:48])
    assert method.opt.lr == 1e-2
    assert not all(torch.equal(p, q) for p, q in zip(method.model.parameters(), start))


def test_official_preset_has_no_fast_schedule():
    """preset="official" is the reproduction's: its entry holds the official schedule only."""
    assert optimizers.PRESETS["official"] == dict(schedule="official")


def test_fast_schedule_shape():
    """fast_lr_factor, on its own: 0 over the warm-up, the peak at the first step after it,
    the decay's midpoint halfway through the horizon, the floor at the horizon and after."""
    f = functools.partial(optimizers.fast_lr_factor, warmup_steps=5, final_ratio=0.1)
    for decay in ("cosine", "linear", "constant"):
        assert [f(k, decay=decay, horizon_steps=26) for k in range(1, 6)] == [0.0] * 5
        assert f(6, decay=decay, horizon_steps=26) == 1.0  # q = (6 - 5 - 1) / 20 = 0
    # on a horizon in steps, q = (step - 6) / 20
    assert f(16, decay="cosine", horizon_steps=26) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(11, decay="cosine", horizon_steps=26) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(11, decay="linear", horizon_steps=26) == pytest.approx(0.1 + 0.9 * 0.75)
    for decay in ("cosine", "linear"):
        assert f(26, decay=decay, horizon_steps=26) == pytest.approx(0.1)
        assert f(500, decay=decay, horizon_steps=26) == pytest.approx(0.1)
        curve = [f(k, decay=decay, horizon_steps=26) for k in range(6, 40)]
        assert all(a >= b for a, b in zip(curve, curve[1:]))  # never rises
    assert f(500, decay="constant", horizon_steps=26) == 1.0
    # on the budget, q = progress / horizon
    assert f(6, decay="cosine", progress=0.0) == 1.0
    assert f(9, decay="cosine", progress=0.5) == pytest.approx(0.55)
    assert f(9, decay="cosine", progress=0.3, horizon=0.6) == pytest.approx(0.55)
    assert f(9, decay="cosine", progress=0.6, horizon=0.6) == pytest.approx(0.1)
    assert f(9, decay="linear", progress=1.0) == pytest.approx(0.1)
    assert f(9, decay="linear", progress=1.3) == pytest.approx(0.1)  # an overrun step
    assert f(3, decay="cosine", progress=0.5) == 0.0  # still warming up
    with pytest.raises(ValueError, match="set_progress"):
        f(9, decay="cosine")


def test_fast_preset_decay_sets_the_outer_lr(monkeypatch):
    """The method steps at lr x fast_lr_factor: in steps, and on the progress it is given."""
    x, acts = _small_setup(monkeypatch)
    method = _build("locoprop-m-fast", 1e-2, acts, warmup_steps=1, decay="linear",
                    final_ratio=0.5, horizon_steps=4)
    seen = []
    for k in range(5):
        method.step(x[16 * (k % 3):16 * (k % 3 + 1)])
        seen.append(method.opt.lr)
    # step 1 warms (grad-square: opt.lr untouched), then 1, 0.75, 0.5, 0.5 of the peak
    assert seen[1:] == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.5e-2])
    on_budget = _build("locoprop-m-fast", 1e-2, acts, warmup_steps=1, decay="cosine",
                       final_ratio=0.2)
    with pytest.raises(ValueError, match="set_progress"):
        for k in range(2):
            on_budget.step(x[:16])
    for progress, want in ((0.0, 1.0), (0.5, 0.6), (1.0, 0.2)):
        on_budget.set_progress(progress)
        on_budget.step(x[:16])
        assert on_budget.opt.lr == pytest.approx(1e-2 * want)


def test_preset_errors(monkeypatch):
    _, acts = _small_setup(monkeypatch)
    with pytest.raises(ValueError, match="lr = 0 epoch"):
        _build("locoprop-m", 1e-2, acts, warmup_steps=3)
    with pytest.raises(ValueError, match="unknown preset"):
        _build("locoprop-m", 1e-2, acts, preset="turbo")
    with pytest.raises(ValueError, match="unknown warmup"):
        _build("locoprop-m-fast", 1e-2, acts, warmup="magic")
    with pytest.raises(ValueError, match="own schedule"):
        _build("locoprop-m", 1e-2, acts, decay="cosine")
    with pytest.raises(ValueError, match="unknown decay"):
        _build("locoprop-m-fast", 1e-2, acts, decay="step")
    with pytest.raises(ValueError, match="final_ratio"):
        _build("locoprop-m-fast", 1e-2, acts, decay="cosine", final_ratio=1.5)
    with pytest.raises(ValueError, match="horizon_steps"):
        _build("locoprop-m-fast", 1e-2, acts, decay="cosine", horizon_steps=5)  # = warm-up
    with pytest.raises(ValueError, match="horizon"):
        _build("locoprop-m-fast", 1e-2, acts, decay="cosine", horizon=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        _build("locoprop-m-fast", 1e-2, acts, warmup_steps=-1)
    with pytest.raises(ValueError, match="unknown setting"):
        _build("locoprop-m", 1e-2, acts, inner_step=3)
    with pytest.raises(ValueError, match="bad setting for Adam"):
        _build("adam", 1e-3, acts, betas_typo=(0.9, 0.99))


def test_state_bytes_counts_what_a_method_holds_beyond_the_model(monkeypatch):
    x, acts = _small_setup(monkeypatch)
    n = sum(p.numel() for p in ae.build_model(8).parameters())
    adam = _build("adam", 1e-3, acts)
    assert optimizers.state_bytes(adam)["bytes"] == 0  # no state before the first step
    adam.step(x[:16])
    assert 2 * 4 * n <= optimizers.state_bytes(adam, exclude=[x])["bytes"] < 2 * 4 * n + 512
    ours = _build("locoprop-m-fast", 1e-2, acts, warmup_steps=1)
    ours.step(x[:16])  # the warm step: square averages and momentum only
    assert 2 * 4 * n <= optimizers.state_bytes(ours, exclude=[x])["bytes"] < 3 * 4 * n
    ours.set_progress(0.0)
    ours.step(x[:16])  # a LocoProp step: its gradient arenas and backup are kept for the next
    held = optimizers.state_bytes(ours, exclude=[x], detail=10)
    assert held["bytes"] >= 3 * 4 * n  # gradient, square-average and momentum arenas
    assert "method.opt.square_avgs.buffer" in {path for path, _ in held["largest"]}


@pytest.mark.skipif(importlib.util.find_spec("tqdm") is None, reason="needs the bench extras")
def test_run_one_fast_preset(monkeypatch):
    x, _ = _small_setup(monkeypatch)
    split = data.Split(x[:32], x[32:])
    rec = ae.run_one("locoprop-m-fast", 1e-2, split, epochs=3, seed=0,
                     device=torch.device("cpu"), dtype=torch.float32, batch=16,
                     backend="reference", progress=False)
    rows = rec["epochs"]
    assert rec["status"] == "ok" and rec["label"] == "locoprop-m-fast lr=0.01"
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


needs_asdl = pytest.mark.skipif(importlib.util.find_spec("asdl") is None,
                                reason="needs the race's peers (make race installs asdfghjkl)")


@needs_asdl
@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_mc"])
def test_kfac_step_is_lr_times_preconditioned_gradient_of_the_real_loss(monkeypatch,
                                                                         fisher_type):
    """K-FAC (asdl) with either Fisher: the update is -lr x the K-FAC-preconditioned gradient
    of the real loss (for fisher_mc the factors come from sampled targets, not the gradient),
    and the preconditioning changes it; an unknown kind is refused."""
    x, acts = _small_setup(monkeypatch)
    torch.manual_seed(0)
    kfac = _build("kfac", 0.5, acts, fisher_type=fisher_type, momentum=0.0, damping=1e-2)
    before = [p.detach().clone() for p in kfac.model.parameters()]
    kfac.step(x[:16])
    moved = [p.detach() - b for p, b in zip(kfac.model.parameters(), before)]
    with torch.no_grad():  # the same weights, the factors of that step: precondition by hand
        for p, b in zip(kfac.model.parameters(), before):
            p.copy_(b)
    kfac.model.zero_grad(set_to_none=True)
    ae.bce_loss(kfac.model(x[:16]), x[:16]).backward()
    kfac.grad_maker.precondition()
    for d, p in zip(moved, kfac.model.parameters()):
        torch.testing.assert_close(d, -0.5 * p.grad, rtol=1e-4, atol=1e-6)
    plain_grad = torch.autograd.grad(ae.bce_loss(kfac.model(x[:16]), x[:16]),
                                     list(kfac.model.parameters()))
    assert any(not torch.allclose(g, p.grad)
               for g, p in zip(plain_grad, kfac.model.parameters()))
    with pytest.raises(ValueError, match="fisher_type"):
        _build("kfac", 0.5, acts, fisher_type="fisher_exact")


@needs_asdl
def test_kfac_fisher_kinds_build_different_factors(monkeypatch):
    x, acts = _small_setup(monkeypatch)
    inverses = {}
    for kind in ("fisher_emp", "fisher_mc"):
        torch.manual_seed(0)
        kfac = _build("kfac", 0.5, acts, fisher_type=kind, damping=1e-2)
        kfac.step(x[:16])
        inverses[kind] = kfac.model[0].fisher.kron.B_inv.clone()
    assert not torch.allclose(inverses["fisher_emp"], inverses["fisher_mc"], rtol=1e-3)
