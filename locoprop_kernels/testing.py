"""Helpers for tests: count kernel launches made inside a ``with`` block.

    with lk.testing.count_launches() as n:
        lk.rmsprop_step_(...)
    assert n.triton == 1
"""
from __future__ import annotations

import contextlib
import sys

_COUNTER_MODULES = {
    "triton": "locoprop_kernels.triton_kernels._launch",
    "cpp": "locoprop_kernels.cpp_backend",
}


def _read(kind: str) -> int:
    module = sys.modules.get(_COUNTER_MODULES[kind])
    return 0 if module is None else module.LAUNCHES[kind]


class LaunchCount:
    """Launches per backend since the block started; read live or after the block."""

    def __init__(self):
        self._start = {kind: _read(kind) for kind in _COUNTER_MODULES}

    @property
    def triton(self) -> int:
        return _read("triton") - self._start["triton"]

    @property
    def cpp(self) -> int:
        return _read("cpp") - self._start["cpp"]


@contextlib.contextmanager
def count_launches():
    yield LaunchCount()
