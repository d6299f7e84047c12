"""The autoencoder experiment's pieces that need no data or extras: the official model, init,
loss and schedule, and a tiny end-to-end run on synthetic images (when tqdm is installed)."""
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
