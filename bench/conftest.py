"""Microbenchmark plumbing: device, shapes, a timing wrapper and the ratio table.

In CI the benchmarks run once as smoke tests (``--benchmark-disable``) at tiny shapes. Timed
runs (``make bench``) use the deep autoencoder's shapes; Triton is timed only on a GPU (its
CPU interpreter is a test tool, and timing it would say nothing). Every group is printed at
the end with each entry's median and its ratio to the group's baseline (PyTorch eager).
"""
import os
import platform
from collections import defaultdict

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from locoprop_kernels.experiments import autoencoder  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
AUTOENCODER = autoencoder.layer_sizes()
BASELINE = "eager"
_RESULTS = defaultdict(dict)  # group -> name -> median seconds


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


@pytest.fixture
def smoke(request) -> bool:
    """True when benchmarks only run once for correctness (CI)."""
    return bool(request.config.getoption("benchmark_disable"))


@pytest.fixture
def timed(benchmark, smoke):
    """timed(group, name, fn): benchmark fn (synchronising CUDA inside) and record it."""
    def run(group, name, fn):
        def call():
            fn()
            if HAS_CUDA:
                torch.cuda.synchronize()
        benchmark.group = group
        benchmark.extra_info["device"] = device_name()
        benchmark.pedantic(call, rounds=1 if smoke else 20, warmup_rounds=0 if smoke else 3,
                           iterations=1)
        if not smoke and benchmark.stats is not None:
            _RESULTS[group][name] = benchmark.stats.stats.median
    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.write_sep("=", f"ratios on {device_name()} (time / {BASELINE}; < 1 is faster)")
    for group, entries in sorted(_RESULTS.items()):
        base = entries.get(BASELINE)
        tr.write_line(f"{group}")
        for name, t in sorted(entries.items(), key=lambda kv: kv[1]):
            ratio = f"{t / base:6.2f}x" if base else "   n/a"
            tr.write_line(f"    {name:<28} {t * 1e3:10.3f} ms  {ratio}")
