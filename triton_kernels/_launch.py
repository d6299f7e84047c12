"""Launch bookkeeping shared by the Triton launchers: a counter the tests read, and the
choice of dot precision. Knows nothing of the op layer."""
import collections
import os

#: Number of kernel launches per backend since import; ``locoprop_kernels.testing`` reads it.
LAUNCHES = collections.Counter()


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` and count it."""
    LAUNCHES["triton"] += 1
    kernel[grid](*args, **kwargs)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile(n: int, low: int, high: int) -> int:
    """A power-of-two tile edge for a dimension of size n, clamped to [low, high]."""
    return max(low, min(high, next_pow2(n)))
