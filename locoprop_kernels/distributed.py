"""Data-parallel LocoProp over ``torch.distributed``: the collectives, in one place.

Each replica holds a shard of the mini-batch; LocoProp's local problems are defined over the
whole batch, so the result must equal one process running the whole batch. Where each
piece of the math lives (docs/design.md section 2; B is the GLOBAL batch, B_r replica r's shard):

- The loss L = (1/B) sum_n l_n is a mean over the global batch; ``loss_fn`` returns the mean
  over the batch it is given, L_r = (1/B_r) sum_{n in r} l_n. So L = sum_r (B_r / B) L_r,
  and the replica back-propagates ``(B_r / B) L_r``: its dL/dZ rows then carry the global
  1/B, exactly the rows a single process would compute. Forming B and L needs one all-reduce
  of the pair (B_r, B_r L_r) per outer step (the "backward pass" all-reduce); shards may
  differ in size.
- Targets Y = f(Z) - gamma G are per row: no communication.
- The local gradient scale * sum_n D_n x_n^T is a sum over the global batch, so each replica
  computes it over its own rows and ONE all-reduce (sum) of the flat gradient arena per
  inner iteration gives the whole batch's gradient on every rank, for all layers at once.
- The prox term (W - W0) / eta is the same on every replica and must be counted once: each
  replica adds it with ``eta * world_size`` (``local_eta``), and the sum restores 1/eta.
- RMSProp then runs on identical gradients from identical parameters and state: the state
  stays identical on all ranks. ``broadcast_`` makes it identical at the start (rank 0 of
  the group is the source), as ``DistributedDataParallel`` does.

The collectives use whatever backend the group was initialised with (NCCL on GPUs, gloo on
CPUs); the tensors passed are flat contiguous buffers, one call each.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

OP = "LocoProp"


def _dist():
    import torch.distributed as dist
    return dist


class DataParallel:
    """The collective operations of data-parallel LocoProp for one process group.

    ``DataParallel.for_group(process_group)`` returns an inactive instance (every method a
    no-op, ``world_size`` 1) when ``process_group`` is None and ``torch.distributed`` is not
    initialised, so callers need no branches.
    """

    def __init__(self, group=None, *, active: bool = True):
        self.group = group
        self.active = active
        dist = _dist() if active else None
        self.world_size = dist.get_world_size(group) if active else 1
        self.rank = dist.get_rank(group) if active else 0
        # broadcast's src is a global rank: the group's rank 0.
        self.src = (dist.get_global_rank(group, 0) if active and group is not None
                    and group is not dist.group.WORLD else 0)

    @classmethod
    def for_group(cls, process_group=None) -> "DataParallel":
        """The group to use: the one given, else the default group when ``torch.distributed``
        is initialised, else none (single process)."""
        if process_group is not None:
            dist = _dist()
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"locoprop.{OP}: argument 'process_group' expected a group of "
                                 f"an initialised torch.distributed, but torch.distributed "
                                 f"is not initialised (call init_process_group first)")
            return cls(process_group)
        try:
            dist = _dist()
        except ImportError:
            return cls(active=False)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.group.WORLD)
        return cls(active=False)

    # ---------------------------------------------------------------- per outer step

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite every tensor with rank 0's copy (start and checkpoint load)."""
        if not self.active:
            return
        dist = _dist()
        for t in tensors:
            if t is not None:
                dist.broadcast(t, src=self.src, group=self.group)

    def global_loss(self, local_loss: torch.Tensor, local_batch: int):
        """(loss to back-propagate, global loss) from this replica's mean loss over its shard.

        One all-reduce of (B_r, B_r L_r); the backward loss is (B_r / B) L_r, so that this
        replica's dL/dZ carries the global batch's 1/B. No host synchronisation.
        """
        if not self.active:
            return local_loss, local_loss.detach()
        stats = torch.stack([torch.full((), float(local_batch), dtype=torch.float64,
                                        device=local_loss.device),
                             local_loss.detach().double() * local_batch])
        _dist().all_reduce(stats, group=self.group)
        total_batch, loss_sum = stats[0], stats[1]
        weight = (local_batch / total_batch).to(local_loss.dtype)
        return local_loss * weight, (loss_sum / total_batch).to(local_loss.dtype)

    # ---------------------------------------------------------------- per inner iteration

    def all_reduce_grads_(self, grads: torch.Tensor) -> None:
        """grads <- sum over replicas of grads: the flat gradient arena of all layers, one call."""
        if self.active:
            _dist().all_reduce(grads, group=self.group)

    def local_eta(self, eta: Optional[float]) -> Optional[float]:
        """The prox strength each replica uses so that the sum over replicas has 1/eta once."""
        return None if eta is None else eta * self.world_size
