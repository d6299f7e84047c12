"""Soak test of lk.optim.LocoProp (docs/guarantees.md): a long run on an MLP and a small CNN
with evaluation forwards, a switch to another optimizer and back, and a checkpoint round trip
every ``--every`` steps; resident memory and the number of live tensors must stay flat and
the run must resume bit-exactly from its checkpoints.

    python bench/soak.py --steps 2000            # the long run (outside CI)
    tests/test_soak_smoke.py                     # the same code, 60 steps, in CI

Every ``--every`` steps: the model's and optimizer's state dicts are saved (torch.save to
memory); at the end the run is replayed from a middle checkpoint in a fresh model and
optimizer and must give the same parameters bit for bit. Memory is read after a warm-up
(``--warmup`` steps): RSS growth and live-tensor growth over the rest of the run are reported.
"""
from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 10))
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _batch(kind: str, step: int):
    g = torch.Generator().manual_seed(step % 8)  # 8 batches in turn: a learnable task
    x = torch.randn(32, 20, generator=g) if kind == "mlp" else torch.randn(16, 1, 8, 8,
                                                                            generator=g)
    return x, torch.randint(0, 10, (x.shape[0],), generator=g)


def _optimizer(model):
    return lk.optim.LocoProp(model, lr=1e-3, inner_steps=3, output_activation="softmax")


def _locoprop_step(model, opt, kind, step):
    x, y = _batch(kind, step)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def run(kind: str, start: int, stop: int, model, opt, *, every: int, switch: tuple,
        checkpoints: dict, eval_every: int = 10) -> list:
    """Steps start..stop-1 of the soak schedule; returns the losses. Steps in ``switch``
    = (first, last) train with SGD while the LocoProp optimizer stays alive."""
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    for step in range(start, stop):
        if step % every == 0:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            checkpoints[step] = buf.getvalue()
        if switch[0] <= step < switch[1]:
            x, y = _batch(kind, step)
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sgd.step()
        else:
            losses.append(_locoprop_step(model, opt, kind, step))
        if step % eval_every == 0:
            with torch.no_grad():
                model(_batch(kind, -step - 1)[0])  # an evaluation forward: records nothing
    return losses


def soak(kind: str, steps: int, *, every: int = 100, warmup: int = 200) -> dict:
    model = make_model(kind)
    opt = _optimizer(model)
    switch = (steps // 2, steps // 2 + max(1, steps // 40))
    checkpoints: dict = {}
    warm = min(warmup, steps // 4)
    t0 = time.perf_counter()
    losses = run(kind, 0, warm, model, opt, every=every, switch=switch, checkpoints=checkpoints)
    rss0, live0 = _rss_mb(), _live_tensors()
    losses += run(kind, warm, steps, model, opt, every=every, switch=switch,
                  checkpoints=checkpoints)
    rss1, live1 = _rss_mb(), _live_tensors()
    seconds = time.perf_counter() - t0
    records = max(len(c) for c in opt._records.values())
    # Resume from a checkpoint after the switch and replay to the end: bit-exact.
    resume_at = max(s for s in checkpoints if s <= steps - every) if steps > every else 0
    saved = torch.load(io.BytesIO(checkpoints[resume_at]), weights_only=True)
    twin = make_model(kind)
    twin.load_state_dict(saved["model"])
    want = {k: v.clone() for k, v in model.state_dict().items()}
    opt.remove_hooks()  # one optimizer per model object; the twin is another model
    twin_opt = _optimizer(twin)
    twin_opt.load_state_dict(saved["opt"])
    run(kind, resume_at, steps, twin, twin_opt, every=every, switch=switch, checkpoints={})
    exact = all(torch.equal(v, want[k]) for k, v in twin.state_dict().items())
    return dict(kind=kind, steps=steps, seconds=round(seconds, 1), first_loss=losses[0],
                last_loss=losses[-1], rss_mb_after_warmup=round(rss0, 1),
                rss_mb_growth=round(rss1 - rss0, 2), live_tensors_after_warmup=live0,
                live_tensor_growth=live1 - live0, records_held_at_end=records,
                resumed_from=resume_at, resume_bit_exact=exact,
                finite=all(v == v and abs(v) != float("inf") for v in losses))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--output", default="bench/results/soak-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [soak(kind, args.steps, every=args.every) for kind in ("mlp", "cnn")]
    for r in results:
        print(json.dumps(r))
    with open(args.output, "w") as f:
        json.dump(dict(device="cpu (2-core x86_64, 1 thread)", torch=torch.__version__,
                       results=results), f, indent=1)


if __name__ == "__main__":
    main()
