"""Flat buffers that hold many tensors as views.

An ``Arena`` is one contiguous 1-D buffer plus a list of shapes; ``views()`` returns one tensor
per shape, each a view into the buffer. Kernels then treat all layers as one array (one
launch for RMSProp over every layer) while callers keep per-layer tensors.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def layout_offsets(shapes: Sequence[Sequence[int]]) -> list:
    """Element offsets of tensors of these shapes laid end to end; the last is the total."""
    offsets = [0]
    for s in shapes:
        offsets.append(offsets[-1] + math.prod(s))
    return offsets


def split_views(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list:
    """Views of a flat contiguous buffer as tensors of these shapes, end to end."""
    offsets = layout_offsets(shapes)
    return [flat[o:e].view(tuple(s)) for o, e, s in zip(offsets, offsets[1:], shapes)]


class Arena:
    """A flat buffer of ``sum(prod(shape))`` elements and its per-tensor views.

    Element offsets are those of the shapes in order, no padding: ``offsets[i]`` is where
    tensor i starts and ``offsets[-1]`` the total size.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], *, dtype=torch.float32, device="cpu",
                 fill: float | None = 0.0):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.offsets = layout_offsets(self.shapes)
        self.buffer = torch.empty(self.offsets[-1], dtype=dtype, device=device)
        if fill is not None:
            self.buffer.fill_(fill)
        self._views = split_views(self.buffer, self.shapes)

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], *, dtype=None, device=None):
        """An arena holding copies of ``tensors`` (dtype/device of the first unless given)."""
        first = tensors[0]
        arena = cls([t.shape for t in tensors], dtype=dtype or first.dtype,
                    device=device or first.device, fill=None)
        for view, t in zip(arena.views(), tensors):
            view.copy_(t)
        return arena

    @classmethod
    def over(cls, buffer: torch.Tensor, shapes: Sequence[Sequence[int]]) -> "Arena":
        """An arena whose buffer is ``buffer`` itself (1-D, ``layout_offsets(shapes)[-1]``
        elements): views, no copy."""
        arena = cls.__new__(cls)
        arena.shapes = [tuple(int(d) for d in s) for s in shapes]
        arena.offsets = layout_offsets(arena.shapes)
        if buffer.dim() != 1 or buffer.numel() != arena.offsets[-1]:
            raise ValueError(f"locoprop.Arena.over: argument 'buffer' expected a 1-D tensor of "
                             f"{arena.offsets[-1]} elements, got shape {tuple(buffer.shape)}")
        arena.buffer = buffer
        arena._views = split_views(buffer, arena.shapes)
        return arena

    def views(self) -> list:
        """One tensor per shape, each a view into ``buffer``."""
        return list(self._views)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._views[i]
