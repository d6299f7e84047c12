"""Flat buffers that hold many tensors as views.

An ``Arena`` is one contiguous 1-D buffer plus a list of shapes; ``views()`` returns one tensor
per shape, each a view into the buffer. Kernels then treat all layers as one array (one
launch for RMSProp over every layer) while callers keep per-layer tensors.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class Arena:
    """A flat buffer of ``sum(prod(shape))`` elements and its per-tensor views.

    Element offsets are those of the shapes in order, no padding: ``offsets[i]`` is where
    tensor i starts and ``offsets[-1]`` the total size.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], *, dtype=torch.float32, device="cpu",
                 fill: float | None = 0.0):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.buffer = torch.empty(self.offsets[-1], dtype=dtype, device=device)
        if fill is not None:
            self.buffer.fill_(fill)
        self._views = [self.buffer[o:o + n].view(s)
                       for o, n, s in zip(self.offsets, sizes, self.shapes)]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], *, dtype=None, device=None):
        """An arena holding copies of ``tensors`` (dtype/device of the first unless given)."""
        first = tensors[0]
        arena = cls([t.shape for t in tensors], dtype=dtype or first.dtype,
                    device=device or first.device, fill=None)
        for view, t in zip(arena.views(), tensors):
            view.copy_(t)
        return arena

    def views(self) -> list:
        """One tensor per shape, each a view into ``buffer``."""
        return list(self._views)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._views[i]
