"""The classification experiment (lk.optim.LocoProp against Adam): its models, the layer
table it records, and its CLI entry point end to end on tiny synthetic data (both tasks,
one epoch), checking the JSON it writes."""
import importlib.util
import json
import math

import pytest
import torch

from locoprop_kernels.experiments import classification as clf
from locoprop_kernels.experiments import data

needs_bench = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("tqdm", "matplotlib")),
    reason="needs the bench extras (tqdm, matplotlib)")


def test_models_shapes():
    x = torch.rand(3, 784)
    assert clf.build_model("mlp", 784, seed=0)(x).shape == (3, 10)
    cnn = clf.build_model("cnn", 784, seed=0)
    assert cnn(x).shape == (3, 10) and cnn.head.in_features == 512
    assert torch.equal(clf.build_model("mlp", 784, seed=0)[0].weight,
                       clf.build_model("mlp", 784, seed=0)[0].weight)  # seeded init
    with pytest.raises(ValueError, match="square"):
        clf.CNN(64)  # 8x8 digits are too small for two 5x5 convolutions


def test_layer_tables():
    mlp = clf.layer_table("mlp", 784)
    assert [(r["name"], r["loss"], r["f"]) for r in mlp] == [
        ("0", "matched", "relu"), ("2", "matched", "relu"), ("4", "matched", "softmax")]
    cnn = clf.layer_table("cnn", 784)  # issue 12: the convolutions take matched losses
    assert [(r["module"], r["loss"], r["f"]) for r in cnn] == [
        ("Conv2d", "matched", "relu"), ("Conv2d", "matched", "relu"),
        ("Linear", "matched", "softmax")]
    linconv = clf.layer_table("cnn", 784, optimizer="locoprop-m-linconv")
    assert [(r["module"], r["loss"], r["f"]) for r in linconv] == [
        ("Conv2d", "linearized", None), ("Conv2d", "linearized", None),
        ("Linear", "matched", "softmax")]


def test_synthetic_labels_are_learnable_and_fixed():
    a, b = clf.synthetic(), clf.synthetic()
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert a.y_train.dtype == torch.int64 and a.y_train.unique().numel() > 3


@needs_bench
@pytest.mark.parametrize("task", ["mnist-mlp", "fashion-cnn"])
def test_cli_one_epoch_on_synthetic(task, tmp_path, capsys):
    out = tmp_path / f"classification-{task}.json"
    clf.main(["--task", task, "--dataset", "synthetic", "--epochs", "1",
              "--synthetic-pixels", "256", "--train-subset", "100", "--eval-train", "50",
              "--batch", "50", "--lrs", "locoprop-m=1e-5,locoprop-s=1e-5,adam=1e-3",
              "--output", str(out), "--no-progress",
              "--threads", str(torch.get_num_threads())])  # leaves the session's count
    result = json.loads(out.read_text())
    for key in ("task", "model", "dataset", "train_size", "eval_train_size", "test_size",
                "batch", "epochs", "machine", "device", "threads", "torch", "layers",
                "locoprop_options", "runs", "command"):
        assert key in result, key
    assert result["train_size"] == 100 and result["eval_train_size"] == 50
    assert [r["label"] for r in result["runs"]] == [
        "locoprop-m lr=1e-05", "locoprop-s lr=1e-05", "adam lr=0.001"]
    for run in result["runs"]:
        assert run["status"] == "ok"
        assert [row["epoch"] for row in run["epochs"]] == [0, 1]
        last = run["epochs"][-1]
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "wall_s", "batch_loss"):
            assert math.isfinite(last[key]), (run["label"], key)
        assert 0.0 <= last["test_acc"] <= 1.0 and last["wall_s"] > 0
    kinds = {r["module"]: r["loss"] for r in result["layers"]}
    assert kinds["Linear"] == "matched"
    assert kinds.get("Conv2d", "matched") == "matched"  # issue 12: matched conv losses
    assert out.with_suffix(".png").stat().st_size > 0
    assert "**adam lr=0.001**" in out.with_suffix(".md").read_text()
    assert "train loss ep 1" in capsys.readouterr().out


def test_labeled_loaders_keep_the_images_of_load():
    try:
        sets = data.load_labeled("digits")
    except data.DataUnavailable:
        pytest.skip("scikit-learn not installed")
    assert torch.equal(sets.x_train, data.load("digits").train)
    assert sets.y_train.shape == (1500,) and sets.y_test.shape == (297,)
    assert sets.y_train.dtype == torch.int64 and int(sets.y_train.max()) == 9


def test_sgd_and_linearized_convs_are_what_they_say():
    model = clf.build_model("cnn", 784, seed=0)
    sgd = clf.build_optimizer("sgd", 0.1, model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    opt = clf.build_optimizer("locoprop-m-linconv", 1e-6, model)
    assert [i.name for i in opt.layers] == ["head"]
    conv_params = {id(p) for n, p in model.named_parameters() if n.startswith("features.")}
    assert conv_params == {id(p) for p in opt.param_groups[1]["params"]}
    opt.remove_hooks()


@needs_bench
def test_cli_step_timing_and_four_optimizers(tmp_path):
    """The CNN with matched and linearized convs, Adam and SGD; the interleaved step timing
    lands in the JSON and the .md."""
    out = tmp_path / "classification-fashion-cnn.json"
    clf.main(["--task", "fashion-cnn", "--dataset", "synthetic", "--epochs", "1",
              "--synthetic-pixels", "256", "--train-subset", "100", "--eval-train", "50",
              "--batch", "50", "--optimizers", "locoprop-m,locoprop-m-linconv,adam,sgd",
              "--lrs", "locoprop-m=1e-6,locoprop-m-linconv=1e-6,adam=1e-3,sgd=1e-2",
              "--timing-rounds", "3", "--timing-steps", "1", "--output", str(out),
              "--no-progress", "--threads", str(torch.get_num_threads())])
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["runs"]] == [
        "locoprop-m lr=1e-06", "locoprop-m-linconv lr=1e-06", "adam lr=0.001", "sgd lr=0.01"]
    assert all(r["status"] == "ok" for r in result["runs"])
    assert [r["loss"] for r in result["layers_linconv"]] == ["linearized"] * 2 + ["matched"]
    timing = result["step_timing"]
    assert timing["rounds"] == 3 and timing["ratio_to"] == "locoprop-m-linconv"
    for name in ("locoprop-m", "locoprop-m-linconv", "adam", "sgd"):
        assert len(timing["per_round_s"][name]) == 3
        t = timing["s_per_step"][name]
        assert 0 < t["min"] <= t["median"] <= t["max"]
    assert set(timing["ratio"]) == {"locoprop-m", "adam", "sgd"}
    assert "ratio median" in out.with_suffix(".md").read_text()
