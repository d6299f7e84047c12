"""Memory probes of the race (Linux /proc): RSS now, the peak RSS since a reset, and a
``MemoryProbe`` context that records both (and CUDA's allocator) around a block."""
from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Optional

import torch


def _status_kb(key: str) -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def rss_bytes() -> Optional[int]:
    """The process's resident set size now (Linux /proc), None elsewhere."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """The peak RSS since the last ``reset_peak_rss`` (or since the process started)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS) cannot be reset
        return None
    return kb * 1024


class MemoryProbe:
    """Around a block: RSS before, peak RSS during (mark reset first), RSS kept after; on
    CUDA the caching allocator's peak and kept bytes too. All in bytes, above ``before``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result = {}

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda0 = torch.cuda.memory_allocated(self.device)
        self._can_reset = reset_peak_rss()
        self._rss0 = rss_bytes()
        return self

    def __exit__(self, *exc):
        rss1, peak = rss_bytes(), peak_rss_bytes()
        r = dict(rss_before=self._rss0)
        if self._rss0 is not None:
            r["rss_kept"] = rss1 - self._rss0
            r["rss_peak_above"] = (peak - self._rss0) if (peak is not None and
                                                          self._can_reset) else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            r["cuda_peak_above"] = torch.cuda.max_memory_allocated(self.device) - self._cuda0
            r["cuda_kept"] = torch.cuda.memory_allocated(self.device) - self._cuda0
        self.result = r
        return False
