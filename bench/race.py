"""Time to target loss: every optimizer on the official deep autoencoder, same clock budget.

    .venv/bin/python bench/race.py                                   # the headline: 600 s each
    .venv/bin/python bench/race.py --budget 60 --optimizers adam,locoprop-m-fast
    .venv/bin/python bench/race.py --tune --budget 60                # short races over grids
    .venv/bin/python bench/race.py --settings bench/results/race-tune-cpu.json --repeat 2
    make race RACE_ARGS="--budget 600 --repeat 2"

What it does (issue 11):
- Each entry (``ENTRIES``: an optimizer of ``locoprop_kernels.experiments.optimizers`` with its
  settings) trains its own copy of the official autoencoder (``experiments.autoencoder``: same
  Glorot init, BCE loss, batch 1000) on the training set, full MNIST by default, for the same
  training-clock budget (``--budget`` seconds).
- Interleaved: all entries live in one process and take turns in slices (``--slice-seconds``
  of their own steps; the starting entry rotates every round). Each entry's clock counts only
  its own steps (batch gather included; CUDA synchronised around every step), so a machine
  whose speed drifts slows them all alike. A slice ends at the first step that crosses the
  slice (or the budget), so an entry may overrun its budget by less than one step.
- Every entry sees the same batches in the same order (a per-epoch shuffle seeded as in
  ``experiments.autoencoder.run_one``); schedules are step based: an epoch is
  ceil(train size / batch) steps, and ``start_epoch`` is called as each one begins, so
  ``locoprop-m`` runs the official schedule (its first epoch at lr = 0) on the clock.
- Train loss is evaluated on a fixed subset (the first ``--eval-size`` training images,
  10000) at the start, whenever ``--eval-every`` steps or ``--eval-seconds`` of an entry's
  clock have passed since its last evaluation, and at the end. Evaluation is not on the clock.
  The time to a target (``--targets``) is the clock at the first evaluation at or below it.
- A run whose loss turns NaN/inf is marked diverged and stops; one whose step raises is marked
  failed; one that improved by less than 2% over the second half of its budget while above
  every target is flagged stalled. None is dropped.
- Memory, per entry: ``state_bytes`` (experiments.optimizers.state_bytes: the tensors the
  method holds beyond its model), and RSS. In one process the peak RSS is shared, so
  ``--memory inprocess`` measures each entry in turn before the race, after the data and every
  model exist: reset the kernel's peak-RSS mark (``/proc/self/clear_refs``), build the method,
  run ``--memory-steps`` steps (timed as training), then record the peak RSS and the RSS kept,
  each above the RSS just before. Memory the allocator kept from earlier entries can be reused
  and not show, so ``--memory isolated`` repeats it in a fresh process per entry (data + one
  model = the baseline); ``both`` (the default) records both. On CUDA the allocator's peak
  above the same baseline is recorded too.

Output: ``bench/results/race-<name>.json`` (configuration, machine, every evaluation, per
slice timing), ``.md`` (the table) and ``.png`` (loss against training seconds, log scale).
``--repeat N`` races N times (the same seed: the spread is the machine's); ``--append`` adds
this invocation's races to an existing JSON of the same configuration. ``--tune`` races the
settings of ``TUNE_GRIDS`` per entry (short budget) and writes the best of each to
``race-tune-<name>.json``, which ``--settings`` reads for the final race.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_suite import machine  # noqa: E402

from locoprop_kernels.experiments import autoencoder as ae  # noqa: E402
from locoprop_kernels.experiments import data, optimizers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (120.0, 100.0, 80.0, 70.0, 65.0, 60.0)


# ----------------------------------------------------------------------------- the entries

@dataclass(frozen=True)
class Entry:
    """One runner of the race: an optimizer of ``experiments.optimizers`` and its settings."""
    optimizer: str
    lr: Optional[float]
    hparams: dict = field(default_factory=dict)
    note: str = ""


#: Default settings: the best of the CPU tuning races (bench/results/race-tune-cpu*.md: 30 s
#: per setting; rates at the top of a grid were raced again against the next ones up), until
#: a ``--settings`` file says otherwise.
ENTRIES = {
    "locoprop-m": Entry("locoprop-m", 1e-5, note="ours, official preset (lr 0 epoch, warmup, "
                        "decay; T = 10)"),
    "locoprop-m-fast": Entry("locoprop-m-fast", 4e-5, note="ours, preset fast (T = 3, 5 warm "
                             "steps, constant lr)"),
    "adam": Entry("adam", 1e-3, note="backprop, torch.optim.Adam"),
    "rmsprop": Entry("rmsprop", 3e-4, note="backprop, torch.optim.RMSprop"),
    "shampoo": Entry("shampoo", 1e-3, {"preconditioning_compute_steps": 20},
                     note="pytorch-optimizer ScalableShampoo, AdaGrad graft"),
    "kfac": Entry("kfac", 0.03, {"damping": 1.0},
                  note="asdfghjkl K-FAC + SGD momentum (fisher_type: empirical, or the "
                  "sampled Bernoulli Fisher)"),
    "pypi-locoprop": Entry("pypi-locoprop", None, note="locoprop==0.1.0, its defaults (T = 5)"),
    "pypi-locoprop-t2": Entry("pypi-locoprop", 1e-4, {"local_iterations": 2},
                              note="locoprop==0.1.0, T = 2"),
    "pypi-locoprop-t3": Entry("pypi-locoprop", 5e-5, {"local_iterations": 3},
                              note="locoprop==0.1.0, T = 3"),
    "pypi-locoprop-t5": Entry("pypi-locoprop", None, {"local_iterations": 5},
                              note="locoprop==0.1.0, T = 5 (tunable copy of the defaults)"),
}

#: ``--tune`` grids: axis -> values. An axis named after a setting (or ``lr``) takes scalars;
#: any other axis takes dicts of settings applied together. The grid is the product of its
#: axes. ``locoprop-m`` (the reproduction) and ``pypi-locoprop`` (its defaults) are not tuned.
TUNE_GRIDS = {
    "locoprop-m-fast": {"lr": [1e-5, 2e-5, 4e-5], "inner_steps": [2, 3, 5],
                        "gamma": [5.0, 10.0],
                        "warmup": ["zero-lr", "grad-square"]},
    "adam": {"lr": [3e-4, 1e-3, 2e-3, 3e-3]},
    "rmsprop": {"lr": [1e-4, 3e-4, 1e-3]},
    "shampoo": {"lr": [3e-4, 1e-3, 3e-3], "preconditioning_compute_steps": [5, 20, 100]},
    # K-FAC (Martens & Grosse 2015 on this autoencoder: damping adapted from 150, statistics
    # every step, inverses every 20): lr x damping x how often statistics / inverses refresh.
    "kfac": {"lr": [0.01, 0.03, 0.1, 0.3], "damping": [0.1, 1.0, 10.0],
             "intervals": [dict(curvature_upd_interval=1, preconditioner_upd_interval=10),
                           dict(curvature_upd_interval=10, preconditioner_upd_interval=10)]},
    "pypi-locoprop-t2": {"lr": [1e-5, 2e-5, 5e-5, 1e-4, 2e-4]},
    "pypi-locoprop-t3": {"lr": [1e-5, 2e-5, 5e-5, 1e-4, 2e-4]},
    "pypi-locoprop-t5": {"lr": [1e-5, 2e-5, 5e-5, 1e-4, 2e-4]},
}


def parse_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001, 'none' -> None, 'true' -> True, else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[+-]?\d+", low):
        return int(low)
    try:
        return float(low)
    except ValueError:
        return text.strip()


def parse_assignments(text: Optional[str], *, default_key: Optional[str] = None,
                      lists: bool = False) -> dict:
    """'kfac.damping=1,adam.lr=1e-3' -> {'kfac': {'damping': 1, 'lr': 0.001}}; with
    ``default_key`` a bare 'adam=1e-3' sets that key; with ``lists`` 'a.b=1:2' -> [1, 2]."""
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        target, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"race: expected entry.key=value, got {item!r}")
        entry, dot, key = target.strip().partition(".")
        if not dot:
            if default_key is None:
                raise SystemExit(f"race: expected entry.key=value, got {item!r}")
            key = default_key
        values = [parse_value(v) for v in value.split(":")] if lists else parse_value(value)
        out.setdefault(entry, {})[key] = values
    return out


def resolve(ids: list, settings_file: Optional[str], overrides: dict) -> dict:
    """id -> dict(optimizer, lr, hparams, note): ENTRIES, then the tuned settings file, then
    the command line's overrides (``{'adam': {'lr': 1e-3}, 'kfac': {'damping': 1}}``)."""
    tuned = {}
    if settings_file:
        path = Path(settings_file)
        if not path.exists():
            raise SystemExit(f"race: settings file {path} not found (make it with --tune)")
        tuned = json.loads(path.read_text()).get("best", {})
    specs = {}
    for i in ids:
        e = ENTRIES[i]
        spec = dict(optimizer=e.optimizer, lr=e.lr, hparams=dict(e.hparams), note=e.note,
                    source="default")
        if i in tuned:
            spec["lr"] = tuned[i]["lr"]
            spec["hparams"] = {**spec["hparams"], **tuned[i].get("hparams", {})}
            spec["source"] = f"tuned ({settings_file})"
        for key, value in overrides.get(i, {}).items():
            if key == "lr":
                spec["lr"] = value
            else:
                spec["hparams"][key] = value
        if overrides.get(i):
            spec["source"] += " + command line"
        specs[i] = spec
    return specs


def setting_label(spec: dict) -> str:
    """'lr=0.001 damping=1' (what the table's setting column shows)."""
    parts = [] if spec["lr"] is None else [f"lr={spec['lr']:g}"]
    for k, v in spec["hparams"].items():
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts) or "defaults"


# ----------------------------------------------------------------------------- memory probes

def _status_kb(key: str) -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def rss_bytes() -> Optional[int]:
    """The process's resident set size now (Linux /proc), None elsewhere."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """The peak RSS since the last ``reset_peak_rss`` (or since the process started)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS) cannot be reset
        return None
    return kb * 1024


class MemoryProbe:
    """Around a block: RSS before, peak RSS during (mark reset first), RSS kept after; on
    CUDA the caching allocator's peak and kept bytes too. All in bytes, above ``before``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result = {}

    def __enter__(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda0 = torch.cuda.memory_allocated(self.device)
        self._can_reset = reset_peak_rss()
        self._rss0 = rss_bytes()
        return self

    def __exit__(self, *exc):
        rss1, peak = rss_bytes(), peak_rss_bytes()
        r = dict(rss_before=self._rss0)
        if self._rss0 is not None:
            r["rss_kept"] = rss1 - self._rss0
            r["rss_peak_above"] = (peak - self._rss0) if (peak is not None and
                                                          self._can_reset) else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            r["cuda_peak_above"] = torch.cuda.max_memory_allocated(self.device) - self._cuda0
            r["cuda_kept"] = torch.cuda.memory_allocated(self.device) - self._cuda0
        self.result = r
        return False


# ----------------------------------------------------------------------------- one runner

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prime(train: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype) -> None:
    """Two throwaway training steps (forward, backward, ``torch.optim.SGD``) of a scratch
    autoencoder, before any memory baseline. The first ``optimizer.step()`` in a process
    imports torch's compiler stack lazily (~110 MB RSS on the CPU here) and the first
    backward sets up autograd's and the BLAS library's buffers: costs of the process, not of
    whichever optimizer happens to run first."""
    model = ae.build_model(train.shape[1], seed=12345, device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = train[:batch]
    for _ in range(2):
        opt.zero_grad()
        ae.bce_loss(model(x), x).backward()
        opt.step()
    del model, opt, x
    _sync(device)
    import gc

    gc.collect()  # earlier races' models (a --tune, a --repeat) go before the baseline


class Runner:
    """One entry in the race: its model, method, data cursor, clock and evaluations."""

    def __init__(self, entry_id: str, spec: dict, train: torch.Tensor, eval_images: torch.Tensor,
                 *, batch: int, seed: int, device: torch.device, dtype: torch.dtype,
                 backend: Optional[str], eval_every: int, eval_seconds: float):
        self.id, self.spec = entry_id, spec
        self.train, self.eval_images = train, eval_images
        self.batch, self.seed, self.device, self.dtype = batch, seed, device, dtype
        self.backend = backend
        self.eval_every, self.eval_seconds = eval_every, eval_seconds
        self.model = ae.build_model(train.shape[1], seed=seed, device=device, dtype=dtype)
        self.method = None
        self.clock = 0.0          # training seconds: this entry's steps only
        self.steps = 0
        self.steps_per_epoch = math.ceil(train.shape[0] / batch)
        self.order = None
        self.history = []         # [clock s, steps, loss on the evaluation subset]
        self.slices = []          # [race wall s at the slice's start, steps, seconds]
        self.status = "ok"
        self.memory = {}
        self.last_x = None

    # -- setup
    def build(self) -> None:
        self.method = optimizers.build(
            self.spec["optimizer"], self.spec["lr"], self.model, ae.bce_loss,
            activations=ae.layer_activations(len(ae.HIDDEN) + 1), batch=self.batch,
            total_epochs=100, backend=self.backend, **self.spec["hparams"])

    @property
    def label(self) -> str:
        return self.id

    @property
    def active(self) -> bool:
        return self.status == "ok"

    # -- training
    def _next_batch(self) -> torch.Tensor:
        n = self.train.shape[0]
        epoch, index = divmod(self.steps, self.steps_per_epoch)
        if index == 0:
            # the same shuffle as experiments.autoencoder.run_one (its epochs count from 1)
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch + 1)
            self.order = torch.randperm(n, generator=g).to(self.train.device)
            self.method.start_epoch(epoch)
        return self.train[self.order[index * self.batch:(index + 1) * self.batch]]

    def step(self) -> None:
        """One timed training step; an exception marks the run failed (kept, not raised)."""
        try:
            _sync(self.device)
            start = time.perf_counter()
            x = self._next_batch()
            self.method.step(x)
            _sync(self.device)
            self.clock += time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - one failing peer must not end the race
            self.status = f"failed at step {self.steps + 1}: {type(error).__name__}: " \
                          f"{str(error)[:200]}"
            return
        self.last_x = x
        self.steps += 1

    def evaluate(self) -> float:
        """Loss on the evaluation subset (off the clock); non-finite marks the run diverged."""
        loss = ae.mean_loss(self.model, self.eval_images, chunk=2000)
        self.history.append([self.clock, self.steps, loss])
        if not math.isfinite(loss) and self.active:
            self.status = f"diverged at step {self.steps} ({self.clock:.1f} s)"
        return loss

    def _due(self) -> bool:
        last_clock, last_steps = self.history[-1][0], self.history[-1][1]
        return (self.steps - last_steps >= self.eval_every
                or self.clock - last_clock >= self.eval_seconds)

    def run_slice(self, seconds: float, budget: float, race_wall: float) -> None:
        """Steps until ``seconds`` more of this entry's clock have passed (or its budget)."""
        start_clock, start_steps = self.clock, self.steps
        stop = min(self.clock + seconds, budget)
        while self.active and self.clock < stop:
            self.step()
            if self.active and self._due():
                self.evaluate()
        self.slices.append([round(race_wall, 3), self.steps - start_steps,
                            self.clock - start_clock])
        if self.active and self.clock >= budget and self.history[-1][1] != self.steps:
            self.evaluate()  # the final loss

    @property
    def last_loss(self) -> float:
        return self.history[-1][2] if self.history else float("nan")

    # -- the record
    def record(self, targets, budget: float) -> dict:
        finite = [h for h in self.history if math.isfinite(h[2])]
        time_to, steps_to = {}, {}
        for t in targets:
            hit = next((h for h in finite if h[2] <= t), None)
            time_to[f"{t:g}"] = None if hit is None else hit[0]
            steps_to[f"{t:g}"] = None if hit is None else hit[1]
        stalled = False
        if self.status == "ok" and finite and self.clock >= budget:
            half = [h for h in finite if h[0] <= budget / 2]
            final = finite[-1][2]
            stalled = bool(half) and final > 0.98 * half[-1][2] and final > max(targets)
        return dict(
            id=self.id, optimizer=self.spec["optimizer"], lr=self.spec["lr"],
            hparams=self.spec["hparams"], setting=setting_label(self.spec),
            source=self.spec.get("source"), note=self.spec.get("note", ""),
            label=getattr(self.method, "label", self.id), status=self.status,
            stalled=stalled, steps=self.steps, train_seconds=self.clock,
            s_per_step=self.clock / self.steps if self.steps else None,
            final_loss=self.last_loss, best_loss=min((h[2] for h in finite), default=None),
            time_to=time_to, steps_to=steps_to, memory=self.memory,
            history=self.history, slices=self.slices)


# ----------------------------------------------------------------------------- the race

class Progress:
    """A tqdm bar over the total training seconds (or a line per round, or nothing)."""

    def __init__(self, mode: str, total: float, desc: str):
        self.mode, self.bar = mode, None
        if mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.mode = "lines"
            else:
                self.bar = tqdm(total=round(total, 1), desc=desc, unit="s", file=sys.stderr,
                                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s train "
                                           "[{elapsed}<{remaining}]{postfix}")
        self.desc = desc

    def update(self, advanced: float, runners: list, round_index: int, wall: float) -> None:
        status = " | ".join(
            f"{r.id} {r.last_loss:.1f}" + ("" if r.active else f" ({r.status.split()[0]})")
            for r in runners)
        if self.bar is not None:
            self.bar.update(advanced)
            self.bar.set_postfix_str(status, refresh=False)
        elif self.mode == "lines":
            clocks = min((r.clock for r in runners if r.active), default=0.0)
            print(f"{self.desc} round {round_index} ({wall:.0f} s wall, >= {clocks:.0f} s "
                  f"train each): {status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def race(specs: dict, train: torch.Tensor, eval_images: torch.Tensor, *, budget: float,
         slice_seconds: float, batch: int, seed: int, device: torch.device,
         dtype: torch.dtype, backend: Optional[str], eval_every: int, eval_seconds: float,
         targets=TARGETS, memory: str = "inprocess", memory_steps: int = 2,
         progress: str = "lines", desc: str = "race") -> dict:
    """Race ``specs`` (id -> spec, ``resolve``) interleaved; one record per entry."""
    wall0 = time.perf_counter()
    runners = [Runner(i, spec, train, eval_images, batch=batch, seed=seed, device=device,
                      dtype=dtype, backend=backend, eval_every=eval_every,
                      eval_seconds=eval_seconds) for i, spec in specs.items()]
    for r in runners:
        r.evaluate()  # the initial loss (all the same: one init), before any baseline
    prime(train, batch, device, dtype)
    baseline = rss_bytes()
    for r in runners:  # build each method and take its first steps, measuring each in turn
        try:
            with MemoryProbe(device) as probe:
                r.build()
                for _ in range(memory_steps if memory in ("inprocess", "both") else 0):
                    r.step()
        except Exception as error:  # noqa: BLE001 - a peer that cannot start is recorded
            r.status = f"failed to build: {type(error).__name__}: {str(error)[:200]}"
            continue
        if r.active and memory in ("inprocess", "both") and memory_steps:
            r.memory["inprocess"] = dict(probe.result, steps=r.steps)
        if r.steps:  # the measured steps were training: the first slice
            r.slices.append([round(time.perf_counter() - wall0, 3), r.steps, r.clock])
        if r.active and r.steps:
            r.evaluate()
    if baseline is not None:
        for r in runners:
            r.memory.setdefault("baseline_rss", baseline)
    bar = Progress(progress, budget * len(runners), desc)
    round_index = 0
    try:
        while any(r.active and r.clock < budget for r in runners):
            round_index += 1
            start = (round_index - 1) % len(runners)  # rotate who goes first
            advanced = 0.0
            for r in runners[start:] + runners[:start]:
                if r.active and r.clock < budget:
                    before = r.clock
                    r.run_slice(slice_seconds, budget, time.perf_counter() - wall0)
                    advanced += r.clock - before
            bar.update(advanced, runners, round_index, time.perf_counter() - wall0)
    finally:
        bar.close()
    for r in runners:
        if r.method is not None and r.active:
            exclude = [train, eval_images] + ([r.last_x] if r.last_x is not None else [])
            r.memory.update(optimizers.state_bytes(r.method, exclude=exclude, detail=5))
        if r.history and r.history[-1][1] != r.steps:
            r.evaluate()
    return dict(wall_seconds=time.perf_counter() - wall0, rounds=round_index,
                entries=[r.record(targets, budget) for r in runners])


# ----------------------------------------------------------------------------- isolated memory

def isolated_memory(entry_id: str, spec: dict, args) -> dict:
    """Run this script in a fresh process for one entry (``--memory-child``): data + one
    model, then the same probe as in-process. Returns its JSON, or dict(error=...)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child",
           json.dumps(dict(id=entry_id, spec=spec)), "--dataset", args.dataset,
           "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype,
           "--memory-steps", str(max(args.memory_steps, 1)), "--seed", str(args.seed)]
    if args.train_subset:
        cmd += ["--train-subset", str(args.train_subset)]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(payload: str, args) -> None:
    """The child of ``isolated_memory``: prints one JSON line."""
    job = json.loads(payload)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    optimizers.import_peer(job["spec"]["optimizer"])  # imports are not the method's memory
    train = load_train(args).to(device=device, dtype=dtype)
    runner = Runner(job["id"], job["spec"], train, train[:1], batch=args.batch, seed=args.seed,
                    device=device, dtype=dtype, backend=args.backend, eval_every=10 ** 9,
                    eval_seconds=math.inf)
    runner.history.append([0.0, 0, float("nan")])
    prime(train, args.batch, device, dtype)
    with MemoryProbe(device) as probe:
        runner.build()
        for _ in range(args.memory_steps):
            runner.step()
    if not runner.active:
        raise SystemExit(runner.status)
    state = optimizers.state_bytes(runner.method, exclude=[train, runner.last_x])
    print(json.dumps(dict(probe.result, steps=runner.steps, state_bytes=state["bytes"])))


# ----------------------------------------------------------------------------- reporting

def _cell(values: list, fmt: Callable) -> str:
    """One table cell from the runs' values: 'v', or 'v1 / v2' (the spread), '–' for None."""
    shown = [("–" if v is None else fmt(v)) for v in values]
    return " / ".join(shown) if len(set(shown)) > 1 else shown[0]


def _mb(n) -> str:
    return f"{n / 2 ** 20:.1f}"


def table(result: dict) -> str:
    """The markdown table: per entry (across runs, 'run 1 / run 2'), seconds of its own
    training to each target, final loss, steps, s/step, state MB, RSS MB, status."""
    cfg = result["config"]
    runs = result["runs"]
    targets = [f"{t:g}" for t in cfg["targets"]]
    ids = list(dict.fromkeys(e["id"] for run in runs for e in run["entries"]))
    by_id = {i: [next((e for e in run["entries"] if e["id"] == i), None) for run in runs]
             for i in ids}
    lines = [
        f"Race on {result['machine']} ({result['device']}, {cfg['dtype']}, torch "
        f"{result['torch']}{', ' + str(cfg['threads']) + ' threads' if cfg['threads'] else ''}):"
        f" {cfg['budget']:g} s of training per optimizer, interleaved in "
        f"{cfg['slice_seconds']:g} s slices; {cfg['dataset']} {cfg['train_size']} training "
        f"images, batch {cfg['batch']}; loss = BCE summed over pixels, mean over the first "
        f"{cfg['eval_size']} training images (evaluated every {cfg['eval_every']} steps or "
        f"{cfg['eval_seconds']:g} s, off the clock). Seconds are each optimizer's own "
        f"training time to reach the loss. "
        + (f"{len(runs)} races: cells show 'race 1 / race 2 / ...' where they differ."
           if len(runs) > 1 else "One race."),
        "",
        "| optimizer | setting | " + " | ".join(f"s to {t}" for t in targets)
        + " | final loss | steps | s/step | state MB | RSS peak MB (isolated / in-process) "
          "| status |",
        "|---|---|" + "---:|" * (len(targets) + 6) + "---|",
    ]
    for i in ids:
        es = [e for e in by_id[i] if e is not None]
        cells = [_cell([e["time_to"].get(t) for e in es], lambda v: f"{v:.0f}") for t in targets]
        mem = [e["memory"] for e in es]
        state = _cell([m.get("bytes") for m in mem], _mb)
        iso = _cell([(m.get("isolated") or {}).get("rss_peak_above") for m in mem], _mb)
        inproc = _cell([(m.get("inprocess") or {}).get("rss_peak_above") for m in mem], _mb)
        status = "; ".join(dict.fromkeys(
            ("stalled" if e["stalled"] else "ok") if e["status"] == "ok" else e["status"]
            for e in es))
        lines.append(
            f"| {i} | {es[0]['setting']} | " + " | ".join(cells)
            + f" | {_cell([e['final_loss'] for e in es], lambda v: f'{v:.1f}')}"
            + f" | {_cell([e['steps'] for e in es], str)}"
            + f" | {_cell([e['s_per_step'] for e in es], lambda v: f'{v:.3f}')}"
            + f" | {state} | {iso} / {inproc} | {status} |")
    lines += ["", *summary_lines(result)]
    return "\n".join(lines)


def summary_lines(result: dict, focus=("70", "65")) -> list:
    """'to 70: fastest X (95 s); Y 1.21x, ...' per focus target and race."""
    out = []
    many = len(result["runs"]) > 1
    for run in result["runs"]:
        entries = run["entries"]
        prefix = f"race {run.get('run', 1)}, " if many else ""
        for t in focus:
            reached = sorted((e["time_to"].get(t), e["id"]) for e in entries
                             if e["time_to"].get(t) is not None)
            if not reached:
                out.append(f"- {prefix}to {t}: nobody reached it within the budget.")
                continue
            best, who = reached[0]
            others = ", ".join(f"{i} {s / best:.2f}x" for s, i in reached[1:])
            missing = [e["id"] for e in entries if e["time_to"].get(t) is None]
            out.append(f"- {prefix}to {t}: fastest {who} ({best:.0f} s)"
                       + (f"; {others}" if others else "")
                       + (f"; not reached: {', '.join(missing)}" if missing else "") + ".")
    return out


def plot(result: dict, path: Path) -> None:
    """Loss on the evaluation subset against each optimizer's training seconds (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ids = list(dict.fromkeys(e["id"] for run in result["runs"] for e in run["entries"]))
    colors = {i: f"C{k % 10}" for k, i in enumerate(ids)}
    styles = ["-", "--", ":", "-."]
    for n, run in enumerate(result["runs"]):
        for e in run["entries"]:
            pts = [(h[0], h[2]) for h in e["history"]
                   if h[2] is not None and math.isfinite(h[2]) and h[2] > 0]
            if not pts:
                continue
            flag = "" if e["status"] == "ok" and not e["stalled"] else \
                (" (stalled)" if e["stalled"] else f" ({e['status'].split()[0]})")
            ax.plot(*zip(*pts), styles[n % len(styles)], color=colors[e["id"]],
                    lw=1.6 if n == 0 else 1.0, label=(e["id"] + flag) if n == 0 else None)
    for t in result["config"]["targets"]:
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("training seconds (each optimizer's own steps; evaluation excluded)")
    ax.set_ylabel(f"train loss, first {result['config']['eval_size']} images")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    runs = len(result["runs"])
    ax.set_title(f"Deep autoencoder race, {result['config']['budget']:g} s each, "
                 f"{result['machine']}" + (f" ({runs} races: line styles)" if runs > 1 else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite_or_none(obj):
    """The result with NaN/inf floats as None, so the JSON is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_outputs(result: dict, stem: Path, *, markdown: Callable = table) -> None:
    """``stem``.json (non-finite losses as null), .md (``markdown(result)``) and .png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(finite_or_none(result), indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result) + "\n")
    if "runs" in result:
        plot(result, stem.with_suffix(".png"))
    else:  # a tuning result: every setting of every optimizer as its own line
        flat = [dict(e, id=f"{i} {e['setting']}") for i, trials in result["trials"].items()
                for e in trials]
        plot(dict(result, runs=[dict(entries=flat)]), stem.with_suffix(".png"))


# ----------------------------------------------------------------------------- tuning

def grid_settings(base: dict, grid: dict) -> list:
    """Every setting of ``grid`` (axes, see TUNE_GRIDS) over ``base`` (a resolved spec)."""
    axes = list(grid.items())
    out = []
    for combo in itertools.product(*(values for _, values in axes)):
        spec = dict(base, hparams=dict(base["hparams"]))
        for (axis, _), value in zip(axes, combo):
            if axis == "lr":
                spec["lr"] = value
            elif isinstance(value, dict):
                spec["hparams"].update(value)
            else:
                spec["hparams"][axis] = value
        out.append(spec)
    return out


def tune_table(result: dict) -> str:
    cfg = result["config"]
    targets = [f"{t:g}" for t in cfg["targets"]]
    lines = [f"Tuning races on {result['machine']} ({result['device']}): {cfg['budget']:g} s "
             f"of training per setting, settings of one optimizer interleaved; best = lowest "
             f"final loss (marked *).", "",
             "| optimizer | setting | " + " | ".join(f"s to {t}" for t in targets)
             + " | final loss | s/step | status |",
             "|---|---|" + "---:|" * (len(targets) + 2) + "---|"]
    for i, trials in result["trials"].items():
        best = result["best"].get(i, {}).get("setting")
        for e in trials:
            mark = " *" if e["setting"] == best else ""
            status = ("stalled" if e["stalled"] else "ok") if e["status"] == "ok" \
                else e["status"]
            lines.append(f"| {i} | {e['setting']}{mark} | "
                         + " | ".join("–" if e["time_to"][t] is None else
                                      f"{e['time_to'][t]:.0f}" for t in targets)
                         + f" | {_cell([e['final_loss']], lambda v: f'{v:.1f}')} | "
                         + ("–" if e["s_per_step"] is None else f"{e['s_per_step']:.3f}")
                         + f" | {status} |")
    return "\n".join(lines)


def tune_grids(ids: list, text: Optional[str]) -> dict:
    """TUNE_GRIDS for ``ids`` with ``--grid``'s changes: 'adam.lr=1e-3:3e-3' replaces (or
    adds) an axis, 'kfac.intervals=' (no value) drops one, leaving the method's default."""
    grids = {i: dict(TUNE_GRIDS.get(i, {})) for i in ids}
    for entry, axes in parse_assignments(text, lists=True).items():
        if entry not in grids:
            raise SystemExit(f"race: --grid names {entry!r}, not among {ids}")
        for axis, values in axes.items():
            if values == [""]:
                grids[entry].pop(axis, None)
            else:
                grids[entry][axis] = values
    return grids


def tune(specs: dict, grids: dict, train, eval_images, args, common: dict, stem: Path) -> dict:
    """Per entry, race its grid's settings interleaved for ``--budget`` s each; the best
    (lowest final loss among runs that neither diverged nor failed) goes to ``best``."""
    path = stem.with_suffix(".json")
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(common, benchmark="race-tune")
    result.setdefault("best", {})
    result.setdefault("trials", {})
    for i, base in specs.items():
        grid = grids.get(i)
        if not grid:
            print(f"tune: {i} has no grid (not tuned)", file=sys.stderr)
            continue
        settings = grid_settings(base, grid)
        keyed = {f"{i} #{k + 1}": s for k, s in enumerate(settings)}
        print(f"tune: {i}: {len(settings)} settings x {args.budget:g} s", file=sys.stderr)
        done = race(keyed, train, eval_images, budget=args.budget,
                    slice_seconds=args.slice_seconds, batch=args.batch, seed=args.seed,
                    device=common["_device"], dtype=common["_dtype"], backend=args.backend,
                    eval_every=args.eval_every, eval_seconds=args.eval_seconds,
                    targets=common["config"]["targets"], memory="none", memory_steps=0,
                    progress=args.progress, desc=f"tune {i}")
        trials = done["entries"]
        result["trials"][i] = trials
        fine = [e for e in trials if e["status"] == "ok" and math.isfinite(e["final_loss"])]
        if fine:
            best = min(fine, key=lambda e: e["final_loss"])
            result["best"][i] = dict(lr=best["lr"], hparams=best["hparams"],
                                     setting=best["setting"], final_loss=best["final_loss"])
            print(f"tune: {i}: best {best['setting']} (final loss {best['final_loss']:.2f})",
                  file=sys.stderr)
        else:
            result["best"].pop(i, None)
            print(f"tune: {i}: every setting diverged or failed", file=sys.stderr)
        public = {k: v for k, v in result.items() if not k.startswith("_")}
        write_outputs(public, stem, markdown=tune_table)  # after every entry: keep its part
    return {k: v for k, v in result.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- CLI

def load_train(args) -> torch.Tensor:
    try:
        split = data.load(args.dataset)
    except data.DataUnavailable as error:
        raise SystemExit(f"race: data set {args.dataset!r} unavailable: {error}")
    train = split.train
    if args.train_subset:
        train = train[:args.train_subset]
    return train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/race.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="entries: " + ", ".join(ENTRIES))
    p.add_argument("--optimizers", default="all",
                   help="comma-separated entries (see below), or 'all' (default)")
    p.add_argument("--budget", type=float, default=600.0,
                   help="training seconds per optimizer (per setting with --tune)")
    p.add_argument("--slice-seconds", type=float, default=2.0,
                   help="training seconds per turn before the next optimizer runs")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate after this many steps")
    p.add_argument("--eval-seconds", type=float, default=5.0,
                   help="... or after this many training seconds, whichever comes first")
    p.add_argument("--eval-size", type=int, default=10000,
                   help="evaluate on the first N training images")
    p.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    p.add_argument("--lrs", default=None, help="e.g. 'adam=1e-3,kfac=0.03'")
    p.add_argument("--hparams", default=None,
                   help="other settings, e.g. 'kfac.damping=1,locoprop-m-fast.inner_steps=5'")
    p.add_argument("--settings", default=None,
                   help="a --tune output: each entry's best lr and settings")
    p.add_argument("--tune", action="store_true",
                   help="race each entry's grid (TUNE_GRIDS) and write the best settings")
    p.add_argument("--grid", default=None,
                   help="with --tune: replace or add grid axes, e.g. 'adam.lr=1e-3:3e-3'; "
                        "'kfac.intervals=' drops an axis")
    p.add_argument("--repeat", type=int, default=1, help="race this many times (spread)")
    p.add_argument("--append", action="store_true",
                   help="add the races to an existing JSON of the same configuration")
    p.add_argument("--name", default=None,
                   help="output stem: bench/results/race-<name> (default: the device)")
    p.add_argument("--output-dir", default=str(RESULTS))
    p.add_argument("--dataset", choices=data.NAMES, default="mnist")
    p.add_argument("--train-subset", type=int, default=None, help="first N training images")
    p.add_argument("--batch", type=int, default=ae.BATCH)
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
    if args.progress is None:
        args.progress = "bar" if sys.stderr.isatty() else "lines"
    for flag in ("budget", "slice_seconds", "eval_seconds"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.eval_every < 1 or args.eval_size < 1 or args.repeat < 1 or args.batch < 1:
        p.error("--eval-every, --eval-size, --repeat and --batch must be >= 1")
    return args


def select(text: str) -> list:
    ids = list(ENTRIES) if text == "all" else [i.strip() for i in text.split(",") if i.strip()]
    unknown = [i for i in ids if i not in ENTRIES]
    if unknown:
        raise SystemExit(f"race: unknown entries {unknown}; choose from {list(ENTRIES)}")
    return ids


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
    dtype = getattr(torch, args.dtype)
    ids = []
    for i in select(args.optimizers):
        missing = optimizers.available(ENTRIES[i].optimizer)
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
        if entry not in ENTRIES:
            raise SystemExit(f"race: --lrs/--hparams name unknown entry {entry!r}")
    specs = resolve(ids, args.settings, overrides)
    targets = sorted({float(t) for t in args.targets.split(",") if t.strip()}, reverse=True)

    for i in ids:
        optimizers.import_peer(ENTRIES[i].optimizer)  # before any memory baseline
    train = load_train(args).to(device=device, dtype=dtype)
    eval_images = train[:args.eval_size]
    name = args.name or ae.device_slug(device)
    stem = Path(args.output_dir) / (f"race-tune-{name}" if args.tune else f"race-{name}")
    config = dict(budget=args.budget, slice_seconds=args.slice_seconds,
                  eval_every=args.eval_every, eval_seconds=args.eval_seconds,
                  eval_size=eval_images.shape[0], targets=targets, dataset=args.dataset,
                  train_size=train.shape[0], batch=args.batch, seed=args.seed,
                  dtype=args.dtype, backend=args.backend, threads=args.threads,
                  memory=args.memory, memory_steps=args.memory_steps)
    common = dict(benchmark="race", name=name, machine=machine(),
                  device=ae.device_name(device), torch=torch.__version__, config=config,
                  command="python bench/race.py " + " ".join(shlex.quote(a) for a in
                                                             (argv or sys.argv[1:])))
    if args.tune:
        grids = tune_grids(ids, args.grid)
        result = tune(specs, grids, train, eval_images, args,
                      dict(common, _device=device, _dtype=dtype), stem)
        print(tune_table(result))
        print(f"\nwrote {stem}.json, .md, .png; race with --settings {stem}.json")
        return result

    path = stem.with_suffix(".json")
    result = dict(common, runs=[])
    if args.append and path.exists():
        old = json.loads(path.read_text())
        keep = ("budget", "slice_seconds", "eval_size", "train_size", "batch", "dataset")
        if {k: old["config"].get(k) for k in keep} != {k: config[k] for k in keep}:
            raise SystemExit(f"race: --append: {path} was made with another configuration")
        result["runs"] = old["runs"]
    isolated = {}
    if args.memory in ("isolated", "both"):
        for i, spec in specs.items():
            print(f"race: memory of {i} in a fresh process ...", file=sys.stderr, flush=True)
            isolated[i] = isolated_memory(i, spec, args)
    for k in range(args.repeat):
        n = len(result["runs"]) + 1
        started = datetime.datetime.now().isoformat(timespec="seconds")
        done = race(specs, train, eval_images, budget=args.budget,
                    slice_seconds=args.slice_seconds, batch=args.batch, seed=args.seed,
                    device=device, dtype=dtype, backend=args.backend,
                    eval_every=args.eval_every, eval_seconds=args.eval_seconds,
                    targets=targets, memory=args.memory, memory_steps=args.memory_steps,
                    progress=args.progress, desc=f"race {n}")
        for e in done["entries"]:
            if e["id"] in isolated:
                e["memory"]["isolated"] = isolated[e["id"]]
        result["runs"].append(dict(run=n, started=started, **done))
        write_outputs(result, stem)  # after every race: a long run keeps its parts
    print(table(result))
    print(f"\nwrote {stem}.json, {stem}.md, {stem}.png")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
