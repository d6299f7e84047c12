"""The command line of the race (``python -m bench.race --help``)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from bench.cpu_suite import machine
from bench.output import RESULTS, write_results
from locoprop_kernels.experiments import autoencoder as ae
from locoprop_kernels.experiments import data

from . import peers
from .memory import MemoryProbe
from .report import plot, table, tune_table
from .runner import Runner, prime, race
from .settings import parse_assignments, resolve, select
from .tasks import TASKS
from .tune import tune, tune_grids

REPO = Path(__file__).resolve().parents[2]


def load_task_data(task, args):
    try:
        return task.load(args.dataset, args.train_subset, args.eval_size)
    except data.DataUnavailable as error:
        raise SystemExit(f"race: data of task {task.name!r} unavailable: {error}")


# ----------------------------------------------------------------------------- isolated memory

def isolated_memory(entry_id: str, spec: dict, args) -> dict:
    """Run the race in a fresh process for one entry (``--memory-child``): data + one model,
    then the same probe as in-process. Returns its JSON, or dict(error=...)."""
    cmd = [sys.executable, "-m", "bench.race", "--memory-child",
           json.dumps(dict(id=entry_id, spec=spec)), "--task", args.task,
           "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype,
           "--memory-steps", str(max(args.memory_steps, 1)), "--seed", str(args.seed)]
    for flag, value in (("--dataset", args.dataset), ("--train-subset", args.train_subset),
                        ("--backend", args.backend), ("--threads", args.threads)):
        if value:
            cmd += [flag, str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(payload: str, args) -> None:
    """The child of ``isolated_memory``: prints one JSON line."""
    job = json.loads(payload)
    task = TASKS[args.task]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peers.import_peer(job["spec"]["peer"], task)  # imports are not the method's memory
    task_data = task.to(load_task_data(task, args), device, dtype)
    runner = Runner(job["id"], job["spec"], task, task_data, batch=args.batch,
                    seed=args.seed, device=device, dtype=dtype, backend=args.backend,
                    budget=math.inf, eval_every=10 ** 9, eval_seconds=math.inf)
    runner.history.append([0.0, 0, float("nan")])
    prime(task, task_data, args.batch, device, dtype)
    with MemoryProbe(device) as probe:
        runner.build()
        for _ in range(args.memory_steps):
            runner.step()
    if not runner.active:
        raise SystemExit(runner.status)
    from locoprop_kernels.experiments import optimizers

    state = optimizers.state_bytes(runner.method, exclude=[task_data.train_x,
                                                           task_data.train_y,
                                                           *runner.last_batch])
    print(json.dumps(dict(probe.result, steps=runner.steps, state_bytes=state["bytes"])))


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="python -m bench.race", description=doc.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="tasks and entries: " + "; ".join(
                                    f"{t}: {', '.join(e)}" for t, e in peers.ENTRIES.items()))
    p.add_argument("--task", choices=list(TASKS), default="autoencoder")
    p.add_argument("--optimizers", default="all",
                   help="comma-separated entries of the task (see below), or 'all' (default)")
    p.add_argument("--budget", type=float, default=600.0,
                   help="training seconds per optimizer (per setting with --tune)")
    p.add_argument("--budget-steps", type=int, default=None,
                   help="with --tune: steps per setting instead of --budget seconds (a budget "
                        "that a shared, loaded machine does not shorten)")
    p.add_argument("--slice-seconds", type=float, default=2.0,
                   help="training seconds per turn before the next optimizer runs")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate after this many steps")
    p.add_argument("--eval-seconds", type=float, default=5.0,
                   help="... or after this many training seconds, whichever comes first")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate on the first N training rows (default: the task's)")
    p.add_argument("--targets", default=None, help="losses to time (default: the task's)")
    p.add_argument("--lrs", default=None, help="e.g. 'adam=1e-3,kfac=0.03'")
    p.add_argument("--hparams", default=None,
                   help="other settings, e.g. 'kfac.damping=1,locoprop-m-fast.inner_steps=5'")
    p.add_argument("--settings", default=None,
                   help="--tune outputs (comma-separated; a later file wins for an "
                        "entry in several): each entry's best lr and settings")
    p.add_argument("--tune", action="store_true",
                   help="race --trials settings of each entry's grid and write the best")
    p.add_argument("--trials", type=int, default=peers.DEFAULT_TRIALS,
                   help="with --tune: settings per entry, the same for every entry")
    p.add_argument("--grid", default=None,
                   help="with --tune: replace or add grid axes, e.g. 'adam.lr=1e-3:3e-3'; "
                        "'kfac.intervals=' drops an axis")
    p.add_argument("--grid-file", default=None,
                   help="with --tune: a JSON file {entry: {axis: [values]}} whose grids "
                        "replace those entries' own (before --grid); an axis of settings "
                        "dicts tunes settings that are not a product")
    p.add_argument("--repeat", type=int, default=1, help="race this many times (spread)")
    p.add_argument("--append", action="store_true",
                   help="add the races to an existing JSON of the same configuration")
    p.add_argument("--name", default=None,
                   help="output stem: bench/results/race[-<task>]-<name> (default: the "
                        "device; the autoencoder's files carry no task)")
    p.add_argument("--output-dir", default=str(RESULTS))
    p.add_argument("--dataset", default=None, help="the task's data (default: its own)")
    p.add_argument("--train-subset", type=int, default=None, help="first N training rows")
    p.add_argument("--batch", type=int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--backend", default=None, help="our ops' backend (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--memory", choices=["both", "inprocess", "isolated", "none"],
                   default="both", help="how RSS is measured (module docstring)")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="steps run while measuring memory (they count as training)")
    p.add_argument("--progress", choices=["bar", "lines", "none"], default=None,
                   help="default: a bar on a terminal, else a line per round")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if args.batch is None:
        args.batch = task.batch
    if args.eval_size is None:
        args.eval_size = task.eval_size
    if args.progress is None:
        args.progress = "bar" if sys.stderr.isatty() else "lines"
    if args.dataset is not None and args.dataset not in task.datasets:
        p.error(f"--dataset {args.dataset!r}: task {args.task} takes {list(task.datasets)}")
    for flag in ("budget", "slice_seconds", "eval_seconds"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.budget_steps is not None:
        if not args.tune:
            p.error("--budget-steps is for --tune (a race runs on the clock)")
        if args.budget_steps < 1:
            p.error("--budget-steps must be >= 1")
        args.budget = math.inf  # the steps alone end a setting
    if (args.grid or args.grid_file) and not args.tune:
        p.error("--grid and --grid-file are for --tune")
    if args.grid_file and not Path(args.grid_file).is_file():
        p.error(f"--grid-file {args.grid_file}: no such file")
    if min(args.eval_every, args.eval_size, args.repeat, args.batch, args.trials) < 1:
        p.error("--eval-every, --eval-size, --repeat, --batch and --trials must be >= 1")
    return args


def _grid_file(path) -> dict:
    """The ``--grid-file``'s {entry: grid} (None: none)."""
    if path is None:
        return {}
    try:
        grids = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"race: --grid-file {path} is not JSON: {error}") from None
    if not isinstance(grids, dict):
        raise SystemExit(f"race: --grid-file {path} must hold an object {{entry: grid}}")
    return grids


def main(argv=None) -> dict:
    args = parse_args(argv)
    # asdl registers the deprecated non-full backward hooks: a warning per run, no news
    warnings.filterwarnings("ignore", message="Using a non-full backward hook",
                            category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("race: --device cuda, but torch sees no CUDA device here")
    if args.memory_child:
        memory_child(args.memory_child, args)
        return {}
    task = TASKS[args.task]
    dtype = getattr(torch, args.dtype)
    ids = []
    for i in select(task.name, args.optimizers):
        missing = peers.available(peers.ENTRIES[task.name][i].peer, task)
        if missing is not None:
            print(f"race: skipping {i}: not installed ({missing})", file=sys.stderr)
        else:
            ids.append(i)
    if not ids:
        raise SystemExit("race: nothing to race")
    overrides = parse_assignments(args.lrs, default_key="lr")
    for entry, settings in parse_assignments(args.hparams).items():
        overrides.setdefault(entry, {}).update(settings)
    for entry in overrides:
        if entry not in peers.ENTRIES[task.name]:
            raise SystemExit(f"race: --lrs/--hparams name unknown entry {entry!r}")
    specs = resolve(task.name, ids, args.settings, overrides)
    targets = sorted({float(t) for t in args.targets.split(",") if t.strip()}, reverse=True) \
        if args.targets else list(task.targets)

    for i in ids:
        peers.import_peer(specs[i]["peer"], task)  # before any memory baseline
    task_data = task.to(load_task_data(task, args), device, dtype)
    name = args.name or ae.device_slug(device)
    prefix = "race" if task.name == "autoencoder" else f"race-{task.name}"
    stem = Path(args.output_dir) / (f"{prefix.replace('race', 'race-tune', 1)}-{name}"
                                    if args.tune else f"{prefix}-{name}")
    config = dict(task=task.name, task_description=task.description, loss=task.loss_name,
                  budget=args.budget if math.isfinite(args.budget) else None,
                  budget_steps=args.budget_steps, slice_seconds=args.slice_seconds,
                  eval_every=args.eval_every, eval_seconds=args.eval_seconds,
                  targets=targets, batch=args.batch, seed=args.seed, dtype=args.dtype,
                  backend=args.backend, threads=args.threads, memory=args.memory,
                  memory_steps=args.memory_steps, **task_data.info)
    common = dict(benchmark="race", name=name, machine=machine(),
                  device=ae.device_name(device), torch=torch.__version__, config=config,
                  command="python -m bench.race " + " ".join(
                      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    if args.tune:
        config["trials"] = args.trials
        grids = tune_grids(task.name, ids, args.grid, _grid_file(args.grid_file))
        result = tune(specs, grids, task, task_data, args,
                      dict(common, _device=device, _dtype=dtype), stem)
        print(tune_table(result))
        print(f"\nwrote {stem}.json, .md, .png; race with --settings {stem}.json")
        return result

    path = stem.with_suffix(".json")
    result = dict(common, runs=[])
    if args.append and path.exists():
        old = json.loads(path.read_text())
        keep = ("task", "budget", "slice_seconds", "eval_size", "train_size", "batch",
                "dataset")
        if {k: old["config"].get(k, "autoencoder" if k == "task" else None) for k in keep} \
                != {k: config[k] for k in keep}:
            raise SystemExit(f"race: --append: {path} was made with another configuration")
        result["runs"] = old["runs"]
    isolated = {}
    if args.memory in ("isolated", "both"):
        for i, spec in specs.items():
            print(f"race: memory of {i} in a fresh process ...", file=sys.stderr, flush=True)
            isolated[i] = isolated_memory(i, spec, args)
    for _ in range(args.repeat):
        n = len(result["runs"]) + 1
        started = datetime.datetime.now().isoformat(timespec="seconds")
        done = race(specs, task, task_data, budget=args.budget,
                    slice_seconds=args.slice_seconds, batch=args.batch, seed=args.seed,
                    device=device, dtype=dtype, backend=args.backend,
                    eval_every=args.eval_every, eval_seconds=args.eval_seconds,
                    targets=targets, memory=args.memory, memory_steps=args.memory_steps,
                    progress=args.progress, desc=f"race {n}")
        for e in done["entries"]:
            if e["id"] in isolated:
                e["memory"]["isolated"] = isolated[e["id"]]
        result["runs"].append(dict(run=n, started=started, **done))
        write_results(result, stem, markdown=table, plot=plot)  # a long run keeps its parts
    print(table(result))
    print(f"\nwrote {stem}.json, {stem}.md, {stem}.png")
    return result
