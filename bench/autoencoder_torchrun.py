"""Data-parallel LocoProp on the paper's deep autoencoder, one process per device (torchrun).

    torchrun --standalone --nproc_per_node=8 bench/autoencoder_torchrun.py --dataset mnist
    torchrun --standalone --nproc_per_node=2 bench/autoencoder_torchrun.py --dataset digits
    python bench/autoencoder_torchrun.py --dataset digits          # one process, same numbers

The model, loss, initialisation and outer schedule are those of the autoencoder experiment
(``locoprop_kernels/experiments/autoencoder.py``); this script adds only the data-parallel
part. Every rank draws the same shuffle; each global batch of ``--batch`` rows is split into
``world_size`` shards (rows ``rank::world_size``), and ``lk.LocoProp`` picks up the process
group: one all-reduce of the gradient arena per inner iteration, the global loss, the same
weights on every rank (docs/guarantees.md). The run therefore matches a single process with
the whole batch. Rank 0 prints one line per epoch and writes ``--out`` (JSON: config, world
size, device, per-epoch losses and wall time).

Backends: NCCL on GPUs (``cuda:LOCAL_RANK``), gloo on CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import locoprop_kernels as lk
from locoprop_kernels.experiments import data
from locoprop_kernels.experiments.autoencoder import (bce_loss, build_model, device_name,
                                                      mean_loss)
from locoprop_kernels.experiments.optimizers import official_lr

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=list(data.NAMES) + ["synthetic"], default="digits",
                   help="synthetic: seeded uniform images, 64 pixels (needs no download)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1000, help="the GLOBAL batch (all ranks)")
    p.add_argument("--lr", type=float, default=1e-5, help="LocoProp's base lr (official 1e-5)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--backend", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (rank 0 writes it)")
    return p.parse_args(argv)


def setup() -> tuple:
    """(rank, world size, device): torchrun's environment, else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def load(name: str, seed: int) -> data.Split:
    if name == "synthetic":
        g = torch.Generator().manual_seed(seed)
        return data.Split(torch.rand(512, 64, generator=g), torch.rand(128, 64, generator=g))
    return data.load(name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup()
    dtype = DTYPES[args.dtype]
    split = load(args.dataset, args.seed)
    train, test = split.train, split.test
    if args.train_subset:
        train = train[:args.train_subset]
    train, test = train.to(device, dtype), test.to(device, dtype)
    model = build_model(train.shape[1], seed=args.seed, device=device, dtype=dtype)
    opt = lk.LocoProp(model, bce_loss, lr=0.0, backend=args.backend)
    assert opt.dp.world_size == world
    n = train.shape[0]
    record = dict(config=vars(args), world_size=world, device=device_name(device),
                  backend=opt.backend, epochs=[dict(epoch=0, train_loss=mean_loss(model, train),
                                                    test_loss=mean_loss(model, test))])
    wall = 0.0
    for epoch in range(1, args.epochs + 1):
        opt.lr = official_lr(args.lr, epoch - 1)  # epoch 1 at lr 0, as the official schedule
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(0, n, args.batch):
            rows = order[i:i + args.batch]
            if rows.numel() < world:  # a tail too short to give every rank a row
                continue
            x = train[rows[rank::world].to(device)]
            opt.step(x, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - start
        row = dict(epoch=epoch, train_loss=mean_loss(model, train),
                   test_loss=mean_loss(model, test), wall_s=wall, lr=opt.lr)
        record["epochs"].append(row)
        if rank == 0:
            print(f"epoch {epoch}: train {row['train_loss']:.6f} test {row['test_loss']:.6f} "
                  f"({wall:.1f} s, {world} x {record['device']})", flush=True)
    if rank == 0 and args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    if world > 1:
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
