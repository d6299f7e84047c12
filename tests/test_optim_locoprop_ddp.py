"""lk.optim.LocoProp under DistributedDataParallel: 2 CPU processes (gloo) x B/2 == 1 x B.

Each worker wraps the same fp64 model in DDP, builds the optimizer on the DDP model and runs
the standard loop on its half of every batch; the single process runs the whole batches.
After 3 outer steps (T = 4, prox on, both param groups: a LayerNorm takes the linearized
loss) the weights must agree to 1e-9 relative and be bit-identical across the ranks.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import locoprop_kernels as lk

WORLD, STEPS, BATCH = 2, 3, 12
KW = dict(lr=1e-2, inner_steps=4, eta=0.5, backend="reference", output_activation="softmax")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8),
                         nn.ReLU(), nn.Linear(8, 3)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = lk.optim.LocoProp(model, **KW)
        shard = BATCH // WORLD
        train(model, opt, [(x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard])
                           for x, y in batches()])
        torch.save([p.detach() for p in model.module.parameters()], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model = make_model()
    start = copy.deepcopy(list(model.parameters()))
    train(model, lk.optim.LocoProp(model, **KW), batches())
    for want, p0, got0, got1 in zip(model.parameters(), start, *ranks):
        assert torch.equal(got0, got1)
        scale = want.detach().abs().max()
        assert ((got0 - want.detach()).abs().max() / scale).item() <= 1e-9
        assert not torch.equal(want, p0)  # it moved
