"""Tuning races: every tuned entry races the same number of settings (``--trials``) of its
grid (``peers.TUNE_GRIDS``) on the same budget; the best of each is written for
``--settings``."""
from __future__ import annotations

import itertools
import json
import math
import random
import sys
from pathlib import Path
from typing import Optional

from bench.output import write_results

from . import peers
from .report import plot, tune_table
from .runner import race
from .settings import parse_assignments


def grid_settings(base: dict, grid: dict) -> list:
    """Every setting of ``grid`` (axes, see ``peers.TUNE_GRIDS``) over ``base`` (a spec)."""
    axes = list(grid.items())
    out = []
    for combo in itertools.product(*(values for _, values in axes)):
        spec = dict(base, hparams=dict(base["hparams"]))
        for (axis, _), value in zip(axes, combo):
            if axis == "lr":
                spec["lr"] = value
            elif isinstance(value, dict):  # settings together; "lr" among them sets the lr
                spec["hparams"].update({k: v for k, v in value.items() if k != "lr"})
                if "lr" in value:
                    spec["lr"] = value["lr"]
            else:
                spec["hparams"][axis] = value
        out.append(spec)
    return out


def sample_trials(settings: list, trials: int, seed: int) -> list:
    """``trials`` of ``settings``, a seeded sample kept in grid order (all when there are
    fewer: the caller reports the count)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if len(settings) <= trials:
        return list(settings)
    keep = sorted(random.Random(seed).sample(range(len(settings)), trials))
    return [settings[k] for k in keep]


def tune_grids(task: str, ids: list, text: Optional[str],
               replace: Optional[dict] = None) -> dict:
    """``TUNE_GRIDS[task]`` for ``ids``, each entry named in ``replace`` ({entry: grid}, the
    ``--grid-file``'s JSON) given that grid whole, then ``--grid``'s changes:
    'adam.lr=1e-3:3e-3' replaces (or adds) an axis, 'kfac.intervals=' (no value) drops one."""
    grids = {i: dict(peers.TUNE_GRIDS.get(task, {}).get(i, {})) for i in ids}
    for entry, grid in (replace or {}).items():
        if entry not in grids:
            raise SystemExit(f"race: the grid file names {entry!r}, not among {ids}")
        if not isinstance(grid, dict) or not grid or not all(
                isinstance(values, list) and values for values in grid.values()):
            raise SystemExit(f"race: the grid file's {entry!r} must map each axis to a "
                             f"non-empty list of values, got {grid!r}")
        grids[entry] = dict(grid)
    for entry, axes in parse_assignments(text, lists=True).items():
        if entry not in grids:
            raise SystemExit(f"race: --grid names {entry!r}, not among {ids}")
        for axis, values in axes.items():
            if values == [""]:
                grids[entry].pop(axis, None)
            else:
                grids[entry][axis] = values
    return grids


def tune(specs: dict, grids: dict, task, task_data, args, common: dict, stem: Path) -> dict:
    """Per entry, race ``args.trials`` settings of its grid interleaved for ``--budget`` s
    (or ``--budget-steps`` steps) each; the best (lowest final loss among runs that neither
    diverged nor failed) goes to ``best``. The file is merged entry by entry and written
    after every entry."""
    path = stem.with_suffix(".json")
    result = json.loads(path.read_text()) if path.exists() else {}
    if result and result.get("config", {}).get("task", task.name) != task.name:
        raise SystemExit(f"race: {path} holds task {result['config']['task']}, not {task.name}")
    result.update(common, benchmark="race-tune")
    result.setdefault("best", {})
    result.setdefault("trials", {})
    for i, base in specs.items():
        grid = grids.get(i)
        if not grid:
            print(f"tune: {i} has no grid (not tuned)", file=sys.stderr)
            continue
        settings = sample_trials(grid_settings(base, grid), args.trials, args.seed)
        if len(settings) < args.trials:
            print(f"tune: {i}: its grid has only {len(settings)} settings (< --trials "
                  f"{args.trials}): the trials differ", file=sys.stderr)
        keyed = {f"{i} #{k + 1}": s for k, s in enumerate(settings)}
        per = f"{args.budget_steps} steps" if args.budget_steps else f"{args.budget:g} s"
        print(f"tune: {i}: {len(settings)} settings x {per}", file=sys.stderr)
        done = race(keyed, task, task_data, budget=args.budget,
                    slice_seconds=args.slice_seconds, batch=args.batch, seed=args.seed,
                    device=common["_device"], dtype=common["_dtype"], backend=args.backend,
                    eval_every=args.eval_every, eval_seconds=args.eval_seconds,
                    targets=common["config"]["targets"], memory="none", memory_steps=0,
                    progress=args.progress, desc=f"tune {i}",
                    budget_steps=args.budget_steps)
        trials = done["entries"]
        result["trials"][i] = trials
        fine = [e for e in trials if e["status"] == "ok" and math.isfinite(e["final_loss"])]
        if fine:
            best = min(fine, key=lambda e: e["final_loss"])
            result["best"][i] = dict(lr=best["lr"], hparams=best["hparams"],
                                     setting=best["setting"], final_loss=best["final_loss"])
            print(f"tune: {i}: best {best['setting']} (final loss {best['final_loss']:.4g})",
                  file=sys.stderr)
        else:
            result["best"].pop(i, None)
            print(f"tune: {i}: every setting diverged or failed", file=sys.stderr)
        public = {k: v for k, v in result.items() if not k.startswith("_")}
        write_results(public, stem, markdown=tune_table, plot=_tune_plot)  # keep each part
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _tune_plot(result: dict, path: Path) -> None:
    """Every setting of every entry as its own line."""
    flat = [dict(e, id=f"{i} {e['setting']}") for i, trials in result["trials"].items()
            for e in trials]
    plot(dict(result, runs=[dict(entries=flat)]), path)
