"""Helpers for tests: count kernel launches made inside a ``with`` block.

    with lk.testing.count_launches() as n:
        lk.rmsprop_step_(...)
    assert n.triton == 1          # or n["cpp"], n.total

A backend counts its own launches (``Backend.launches``; calls into compiled code for cpp,
nothing for the pure-PyTorch reference).
"""
from __future__ import annotations

import contextlib

from . import backends


class LaunchCount:
    """Launches per backend inside the block: read live inside it, or after it (then the
    count is frozen at the block's exit: later launches do not count)."""

    def __init__(self):
        self._start = backends.launch_counts()
        self._end = None  # the counts at the block's exit

    def _stop(self) -> None:
        self._end = backends.launch_counts()

    def __getitem__(self, name: str) -> int:
        backends.check_name("count_launches", name)
        now = self._end if self._end is not None else backends.launch_counts()
        return now.get(name, 0) - self._start.get(name, 0)

    def __getattr__(self, name: str) -> int:
        if name.startswith("_") or name not in backends.NAMES:
            raise AttributeError(name)
        return self[name]

    @property
    def total(self) -> int:
        """Launches of every backend together."""
        return sum(self[name] for name in backends.NAMES)


@contextlib.contextmanager
def count_launches():
    count = LaunchCount()
    try:
        yield count
    finally:
        count._stop()
