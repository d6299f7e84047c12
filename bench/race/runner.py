"""One race: every entry on its own copy of the task's model, interleaved on its own clock."""
from __future__ import annotations

import gc
import math
import sys
import time
from typing import Optional

import torch

from locoprop_kernels.experiments import optimizers

from . import peers
from .memory import MemoryProbe, rss_bytes
from .tasks import Task, TaskData, steps_per_epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setting_label(spec: dict) -> str:
    """'lr=0.001 damping=1' (what the table's setting column shows)."""
    parts = [] if spec["lr"] is None else [f"lr={spec['lr']:g}"]
    for k, v in spec["hparams"].items():
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts) or "defaults"


def prime(task: Task, task_data: TaskData, batch: int, device: torch.device,
          dtype: torch.dtype) -> None:
    """Two throwaway training steps (forward, backward, ``torch.optim.SGD``) of a scratch
    model, before any memory baseline. The first ``optimizer.step()`` in a process imports
    torch's compiler stack lazily (~110 MB RSS on the CPU here) and the first backward sets
    up autograd's and the BLAS library's buffers: costs of the process, not of whichever
    optimizer happens to run first."""
    model = task.build_model(task_data, seed=12345, device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = task_data.train_x[:batch], task_data.train_y[:batch]
    for _ in range(2):
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
    del model, opt, x, y
    _sync(device)
    gc.collect()  # earlier races' models (a --tune, a --repeat) go before the baseline


class Runner:
    """One entry in the race: its model, method, data cursor, clock and evaluations."""

    def __init__(self, entry_id: str, spec: dict, task: Task, task_data: TaskData, *,
                 batch: int, seed: int, device: torch.device, dtype: torch.dtype,
                 backend: Optional[str], budget: float, eval_every: int, eval_seconds: float,
                 budget_steps: Optional[int] = None):
        self.id, self.spec, self.task, self.data = entry_id, spec, task, task_data
        self.batch, self.seed, self.device, self.dtype = batch, seed, device, dtype
        self.backend, self.budget, self.budget_steps = backend, budget, budget_steps
        self.eval_every, self.eval_seconds = eval_every, eval_seconds
        self.model = task.build_model(task_data, seed=seed, device=device, dtype=dtype)
        self.method = None
        self.clock = 0.0          # training seconds: this entry's steps only
        self.steps = 0
        self.steps_per_epoch = steps_per_epoch(task_data, batch)
        self.order = None
        self.history = []         # [clock s, steps, loss on the evaluation set]
        self.slices = []          # [race wall s at the slice's start, steps, seconds]
        self.status = "ok"
        self.memory = {}
        self.last_batch = ()

    def build(self) -> None:
        self.method = peers.build(self.spec, self.task, self.model, batch=self.batch,
                                  backend=self.backend)

    @property
    def active(self) -> bool:
        return self.status == "ok"

    @property
    def progress(self) -> float:
        """The fraction of the budget spent: steps / ``budget_steps`` on a step budget, else
        this entry's clock / ``budget`` (what time-based schedules read)."""
        if self.budget_steps is not None:
            return self.steps / self.budget_steps
        return self.clock / self.budget

    @property
    def spent(self) -> bool:
        """Whether the budget (steps, or seconds of this entry's clock) is used up."""
        return self.clock >= self.budget or (self.budget_steps is not None
                                             and self.steps >= self.budget_steps)

    # -- training
    def _next_batch(self) -> tuple:
        n = self.data.train_x.shape[0]
        epoch, index = divmod(self.steps, self.steps_per_epoch)
        if index == 0:
            # the same shuffle as experiments.autoencoder.run_one (its epochs count from 1)
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch + 1)
            self.order = torch.randperm(n, generator=g).to(self.data.train_x.device)
            self.method.start_epoch(epoch)
        rows = self.order[index * self.batch:(index + 1) * self.batch]
        return self.data.train_x[rows], self.data.train_y[rows]

    def step(self) -> None:
        """One timed training step; an exception marks the run failed (kept, not raised)."""
        try:
            _sync(self.device)
            start = time.perf_counter()
            self.method.set_progress(self.progress)
            x, y = self._next_batch()
            self.method.step(x, y)
            _sync(self.device)
            self.clock += time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - one failing peer must not end the race
            self.status = f"failed at step {self.steps + 1}: {type(error).__name__}: " \
                          f"{str(error)[:200]}"
            return
        self.last_batch = (x, y)
        self.steps += 1

    def evaluate(self) -> float:
        """Loss on the evaluation set (off the clock); non-finite marks the run diverged."""
        if self.method is None:
            loss = self.task.eval_loss(self.model, self.data.eval_x, self.data.eval_y)
        else:
            with self.method.evaluating():
                loss = self.task.eval_loss(self.model, self.data.eval_x, self.data.eval_y)
        self.history.append([self.clock, self.steps, loss])
        if not math.isfinite(loss) and self.active:
            self.status = f"diverged at step {self.steps} ({self.clock:.1f} s)"
        return loss

    def _due(self) -> bool:
        last_clock, last_steps = self.history[-1][0], self.history[-1][1]
        return (self.steps - last_steps >= self.eval_every
                or self.clock - last_clock >= self.eval_seconds)

    def run_slice(self, seconds: float, race_wall: float) -> None:
        """Steps until ``seconds`` more of this entry's clock have passed (or its budget)."""
        start_clock, start_steps = self.clock, self.steps
        stop = min(self.clock + seconds, self.budget)
        while self.active and self.clock < stop and not self.spent:
            self.step()
            if self.active and self._due():
                self.evaluate()
        self.slices.append([round(race_wall, 3), self.steps - start_steps,
                            self.clock - start_clock])
        if self.active and self.spent and self.history[-1][1] != self.steps:
            self.evaluate()  # the final loss

    @property
    def last_loss(self) -> float:
        return self.history[-1][2] if self.history else float("nan")

    # -- the record
    def record(self, targets) -> dict:
        finite = [h for h in self.history if math.isfinite(h[2])]
        time_to, steps_to = {}, {}
        for t in targets:
            hit = next((h for h in finite if h[2] <= t), None)
            time_to[f"{t:g}"] = None if hit is None else hit[0]
            steps_to[f"{t:g}"] = None if hit is None else hit[1]
        stalled = False
        if self.status == "ok" and finite and self.spent:
            half = [h for h in finite if (h[1] <= self.budget_steps / 2 if self.budget_steps
                                          else h[0] <= self.budget / 2)]
            final = finite[-1][2]
            stalled = bool(half) and final > 0.98 * half[-1][2] and final > max(targets)
        return dict(
            id=self.id, peer=self.spec["peer"], lr=self.spec["lr"],
            hparams=self.spec["hparams"], setting=setting_label(self.spec),
            source=self.spec.get("source"), note=self.spec.get("note", ""),
            label=getattr(self.method, "label", self.id), status=self.status,
            stalled=stalled, steps=self.steps, train_seconds=self.clock,
            s_per_step=self.clock / self.steps if self.steps else None,
            final_loss=self.last_loss, best_loss=min((h[2] for h in finite), default=None),
            time_to=time_to, steps_to=steps_to, memory=self.memory,
            history=self.history, slices=self.slices)


class Progress:
    """A tqdm bar over the total training seconds (or a line per round, or nothing)."""

    def __init__(self, mode: str, total: float, desc: str):
        self.mode, self.bar, self.desc = mode, None, desc
        if mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.mode = "lines"
            else:
                self.bar = tqdm(total=round(total, 1), desc=desc, unit="s", file=sys.stderr,
                                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s train "
                                           "[{elapsed}<{remaining}]{postfix}")

    def update(self, advanced: float, runners: list, round_index: int, wall: float) -> None:
        status = " | ".join(
            f"{r.id} {r.last_loss:.3g}" + ("" if r.active else f" ({r.status.split()[0]})")
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


def race(specs: dict, task: Task, task_data: TaskData, *, budget: float, slice_seconds: float,
         batch: int, seed: int, device: torch.device, dtype: torch.dtype,
         backend: Optional[str], eval_every: int, eval_seconds: float, targets,
         memory: str = "inprocess", memory_steps: int = 2, progress: str = "lines",
         desc: str = "race", budget_steps: Optional[int] = None) -> dict:
    """Race ``specs`` (id -> spec: peer, lr, hparams, note) interleaved; one record each.
    ``budget_steps``: each entry stops after that many steps instead (``budget`` seconds
    still cap its clock; pass ``math.inf`` for steps alone): a budget that a loaded machine
    does not shorten."""
    if budget_steps is not None and budget_steps < 1:
        raise ValueError(f"budget_steps must be >= 1, got {budget_steps}")
    wall0 = time.perf_counter()
    runners = [Runner(i, spec, task, task_data, batch=batch, seed=seed, device=device,
                      dtype=dtype, backend=backend, budget=budget, eval_every=eval_every,
                      eval_seconds=eval_seconds, budget_steps=budget_steps)
               for i, spec in specs.items()]
    for r in runners:
        r.evaluate()  # the initial loss (all the same: one init), before any baseline
    prime(task, task_data, batch, device, dtype)
    baseline = rss_bytes()
    measure = memory in ("inprocess", "both")
    for r in runners:  # build each method and take its first steps, measuring each in turn
        try:
            with MemoryProbe(device) as probe:
                r.build()
                for _ in range(memory_steps if measure else 0):
                    r.step()
        except Exception as error:  # noqa: BLE001 - a peer that cannot start is recorded
            r.status = f"failed to build: {type(error).__name__}: {str(error)[:200]}"
            continue
        if r.active and measure and memory_steps:
            r.memory["inprocess"] = dict(probe.result, steps=r.steps)
        if r.steps:  # the measured steps were training: the first slice
            r.slices.append([round(time.perf_counter() - wall0, 3), r.steps, r.clock])
        if r.active and r.steps:
            r.evaluate()
    if baseline is not None:
        for r in runners:
            r.memory.setdefault("baseline_rss", baseline)
    bar = Progress(progress, budget * len(runners) if math.isfinite(budget) else 0.0, desc)
    round_index = 0
    try:
        while any(r.active and not r.spent for r in runners):
            round_index += 1
            start = (round_index - 1) % len(runners)  # rotate who goes first
            advanced = 0.0
            for r in runners[start:] + runners[:start]:
                if r.active and not r.spent:
                    before = r.clock
                    r.run_slice(slice_seconds, time.perf_counter() - wall0)
                    advanced += r.clock - before
            bar.update(advanced, runners, round_index, time.perf_counter() - wall0)
    finally:
        bar.close()
    for r in runners:
        if r.method is not None and r.active:
            exclude = [task_data.train_x, task_data.train_y, task_data.eval_x,
                       task_data.eval_y, *r.last_batch]
            r.memory.update(optimizers.state_bytes(r.method, exclude=exclude, detail=5))
        if r.history and r.history[-1][1] != r.steps:
            r.evaluate()
    return dict(wall_seconds=time.perf_counter() - wall0, rounds=round_index,
                entries=[r.record(targets) for r in runners])
