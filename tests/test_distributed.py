"""Data-parallel LocoProp: 2 CPU processes (gloo) x batch B/2 == 1 process x batch B.

Two levels: ``lk.LocoProp`` itself (its ``process_group`` support), and a LocoProp-M loop
written from the ops with ``DataParallel`` (the collectives on their own). Each worker is started with ``torch.multiprocessing`` (spawn) and a file:// rendezvous in the
test's tmp dir (no ports). Workers save their final parameters and losses; the test compares
them with a single-process run of the same steps in float64: equal to 1e-9 relative, and
bit-identical across ranks. A counting wrapper around ``torch.distributed.all_reduce``
checks the communication pattern: one all-reduce per inner iteration (the whole gradient
arena) plus one per outer step (the loss / batch size pair).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import locoprop_kernels as lk
from locoprop_kernels.distributed import DataParallel

from conftest import rel_err

WORLD = 2
SIZES = [6, 5, 3, 6]                    # a small autoencoder-like stack
ACTS = ["tanh", "identity", "sigmoid"]  # the last one is the output layer's local loss
OUTER, INNER = 3, 4
HYPER = dict(gamma=10.0, lr=1e-2, alpha=0.9, eps=1e-5, momentum=0.9, style="tf", floor=0.25,
             eta=0.5, scale=1.0)


def make_problem(batch=8, seed=0):
    """fp64 parameters (W_0, b_0, W_1, ...) and one batch of data x (targets = x)."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for d_in, d_out in zip(SIZES, SIZES[1:]):
        shapes += [(d_out, d_in), (d_out,)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for s in shapes]
    x = torch.rand(batch, SIZES[0], generator=g, dtype=torch.float64)
    return shapes, params, x


def locoprop_steps(shapes, params, x, dp: DataParallel, *, outer=OUTER, inner=INNER, h=HYPER):
    """LocoProp-M built from the ops (reference backend, fp64), data parallel through ``dp``:
    returns (flat params, [global loss per outer step])."""
    flat = lk.Arena.from_tensors(params)
    ms = lk.Arena(shapes, dtype=torch.float64, fill=1.0)
    mom = lk.Arena(shapes, dtype=torch.float64, fill=0.0)
    grads = lk.Arena(shapes, dtype=torch.float64, fill=0.0)
    anchors = torch.empty_like(flat.buffer)
    dp.broadcast_([flat.buffer, ms.buffer, mom.buffer])
    views, g_views, a_views = flat.views(), grads.views(), None
    losses = []
    for _ in range(outer):
        # forward, keeping each layer's input and pre-activation
        inputs, preacts, a = [], [], x
        for l, act in enumerate(ACTS):
            inputs.append(a.detach())
            z = a @ views[2 * l].T + views[2 * l + 1]
            if l == 0:  # the chain's leaf: later pre-activations depend on it
                z.requires_grad_()
            preacts.append(z)
            a = lk.ACTIVATIONS[act].f(z) if l < len(ACTS) - 1 else z
        local = F.binary_cross_entropy_with_logits(a, x, reduction="sum") / x.shape[0]
        backward_loss, loss = dp.global_loss(local, x.shape[0])
        losses.append(loss.item())
        dz = torch.autograd.grad(backward_loss, preacts)
        targets = [lk.local_targets(z.detach(), g, act, h["gamma"], backend="reference")
                   for z, g, act in zip(preacts, dz, ACTS)]
        anchors.copy_(flat.buffer)
        a_views = lk.arena.split_views(anchors, shapes)
        eta = dp.local_eta(h["eta"])
        for t in range(inner):
            for l, act in enumerate(ACTS):
                lk.matched_loss_grad(inputs[l], views[2 * l], views[2 * l + 1], targets[l], act,
                                     scale=h["scale"], eta=eta, anchor_weight=a_views[2 * l],
                                     anchor_bias=a_views[2 * l + 1], backend="reference",
                                     out=(g_views[2 * l], g_views[2 * l + 1]))
            dp.all_reduce_grads_(grads.buffer)
            lr = h["lr"] * max(1.0 - t / inner, h["floor"])
            lk.rmsprop_step_(flat.buffer, grads.buffer, ms.buffer, mom.buffer, lr=lr,
                             alpha=h["alpha"], eps=h["eps"], momentum=h["momentum"],
                             style=h["style"], backend="reference")
    return flat.buffer.clone(), losses


def bce(logits, x):
    """The official loss, a mean over the rows it is given (each rank: its shard)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def make_model(params):
    """nn.Sequential(Linear, Tanh, Linear, Linear) holding ``params`` (fp64)."""
    lins = [nn.Linear(d_in, d_out).double() for d_in, d_out in zip(SIZES, SIZES[1:])]
    with torch.no_grad():
        for l, lin in enumerate(lins):
            lin.weight.copy_(params[2 * l])
            lin.bias.copy_(params[2 * l + 1])
    return nn.Sequential(lins[0], nn.Tanh(), lins[1], lins[2])


def trainer_steps(params, x, h=HYPER, process_group=None):
    """OUTER steps of lk.LocoProp (official M semantics, fp64); (flat params, losses, opt)."""
    opt = lk.LocoProp(make_model(params), bce, output_activation="sigmoid", gamma=h["gamma"],
                      lr=h["lr"], inner_steps=INNER, alpha=h["alpha"], eps=h["eps"],
                      momentum=h["momentum"], style=h["style"], lr_floor=h["floor"],
                      eta=h["eta"], scale=h["scale"], process_group=process_group)
    losses = [opt.step(x, x).item() for _ in range(OUTER)]
    return opt.params.buffer.clone(), losses, opt


def _worker(rank, world, init_file, out_dir, splits):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        calls = {"all_reduce": 0}
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            calls["all_reduce"] += 1
            return real_all_reduce(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        results = {}
        for name, split in splits.items():
            shapes, params, x = make_problem(batch=sum(split))
            if rank == 1:  # rank 0's parameters must win: start rank 1 elsewhere
                params = [p + 1.0 for p in params]
            lo = sum(split[:rank])
            calls["all_reduce"] = 0
            dp = DataParallel.for_group(None)
            flat, losses = locoprop_steps(shapes, params, x[lo:lo + split[rank]], dp)
            results[name] = dict(params=flat, losses=losses, all_reduces=calls["all_reduce"],
                                 world=dp.world_size)
            calls["all_reduce"] = 0
            flat, losses, opt = trainer_steps(params, x[lo:lo + split[rank]])
            sd = opt.state_dict()
            results["trainer-" + name] = dict(params=flat, losses=losses,
                                              all_reduces=calls["all_reduce"],
                                              world=opt.dp.world_size, state=sd)
            # load_state_dict leaves every rank with rank 0's state (rank 1 loads another)
            if rank == 1:
                sd = dict(sd, params=sd["params"] * 2, square_avgs=sd["square_avgs"] + 1)
            opt.load_state_dict(sd)
            results["trainer-" + name]["reloaded"] = opt.state_dict()
        # an explicit process group (not the default one) takes the same path
        shapes, params, x = make_problem(batch=sum(splits["equal"]))
        lo, n = sum(splits["equal"][:rank]), splits["equal"][rank]
        group = dist.new_group(ranks=list(range(world)))
        flat, losses, opt = trainer_steps(params, x[lo:lo + n], process_group=group)
        results["trainer-group"] = dict(params=flat, losses=losses, group_used=opt.dp.group is group)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    splits = {"equal": (4, 4), "unequal": (3, 5)}
    mp.spawn(_worker, args=(WORLD, str(tmp / "rendezvous"), str(tmp), splits), nprocs=WORLD,
             join=True)
    return splits, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("split", ["equal", "unequal"])
def test_two_ranks_equal_one_process(two_rank_results, split):
    """2 ranks x their shards == 1 process x the whole batch, after several outer steps."""
    splits, ranks = two_rank_results
    shapes, params, x = make_problem(batch=sum(splits[split]))
    want, want_losses = locoprop_steps(shapes, params, x, DataParallel.for_group(None))
    start = lk.Arena.from_tensors(params).buffer
    assert rel_err(want, start) > 1e-3, "the parameters must move for the test to mean much"
    for r in ranks:
        got = r[split]
        assert got["world"] == WORLD
        assert rel_err(got["params"], want) <= 1e-9
        assert got["losses"] == pytest.approx(want_losses, rel=1e-9)
        # one all-reduce of the whole gradient arena per inner iteration + one per outer step
        assert got["all_reduces"] == OUTER * (INNER + 1)
    # identical state on every rank, bit for bit
    assert torch.equal(ranks[0][split]["params"], ranks[1][split]["params"])
    assert ranks[0][split]["losses"] == ranks[1][split]["losses"]


@pytest.mark.parametrize("split", ["equal", "unequal"])
def test_trainer_two_ranks_equal_one_process(two_rank_results, split):
    """lk.LocoProp picks up the initialised process group: 2 ranks x shards == 1 process x
    the whole batch, rank 1's different initial weights replaced by rank 0's."""
    splits, ranks = two_rank_results
    _, params, x = make_problem(batch=sum(splits[split]))
    want, want_losses, _ = trainer_steps(params, x)
    assert rel_err(want, lk.Arena.from_tensors(params).buffer) > 1e-3
    for r in ranks:
        got = r["trainer-" + split]
        assert got["world"] == WORLD
        assert rel_err(got["params"], want) <= 1e-9
        assert got["losses"] == pytest.approx(want_losses, rel=1e-9)
        assert got["all_reduces"] == OUTER * (INNER + 1)
    a, b = ranks[0]["trainer-" + split], ranks[1]["trainer-" + split]
    for key in ("params", "square_avgs", "momentum_bufs"):
        assert torch.equal(a["state"][key], b["state"][key]), key
        assert torch.equal(a["reloaded"][key], b["reloaded"][key]), f"after load: {key}"
        assert torch.equal(a["reloaded"][key], a["state"][key]), f"after load: {key}"
    assert a["losses"] == b["losses"]


def test_trainer_explicit_process_group(two_rank_results):
    _, ranks = two_rank_results
    for r in ranks:
        assert r["trainer-group"]["group_used"]
        assert rel_err(r["trainer-group"]["params"], r["trainer-equal"]["params"]) <= 1e-12
        assert r["trainer-group"]["losses"] == pytest.approx(r["trainer-equal"]["losses"], rel=1e-12)


def test_inactive_without_torch_distributed():
    """Not initialised and no group: single process, every collective a no-op."""
    dp = DataParallel.for_group(None)
    assert not dp.active and dp.world_size == 1 and dp.local_eta(0.5) == 0.5
    loss = torch.tensor(2.0, requires_grad=True)
    backward_loss, global_loss = dp.global_loss(loss, 7)
    assert backward_loss is loss and global_loss.item() == 2.0
    grads = torch.ones(3)
    dp.all_reduce_grads_(grads)
    assert torch.equal(grads, torch.ones(3))


def test_group_without_init_is_a_clear_error():
    with pytest.raises(ValueError, match="process_group"):
        DataParallel.for_group(object())


def test_torchrun_script_matches_one_process(tmp_path):
    """bench/autoencoder_torchrun.py under torchrun (2 gloo processes) gives the losses of the
    same script in one process (fp32: summation order differs, so to 1e-5)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "autoencoder_torchrun.py"
    args = ["--dataset", "synthetic", "--train-subset", "32", "--batch", "16", "--epochs", "2",
            "--lr", "1e-3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # CPU backends only; no interpreter needed
    runs = {}
    for name, launcher in (("one", [sys.executable, str(script)]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={WORLD}", str(script)])):
        out = tmp_path / f"{name}.json"
        done = subprocess.run(launcher + args + ["--out", str(out)], env=env, timeout=300,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads(out.read_text())
    assert runs["one"]["world_size"] == 1 and runs["two"]["world_size"] == WORLD
    one = [e["train_loss"] for e in runs["one"]["epochs"]]
    two = [e["train_loss"] for e in runs["two"]["epochs"]]
    assert one[-1] < one[0]  # it trained
    assert two == pytest.approx(one, rel=1e-5)
