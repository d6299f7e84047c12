"""Launch bookkeeping shared by the Triton launchers: a counter the tests read, the warps
knob, tile sizes and the rows of the int64 tables some kernels read. Knows nothing of the op
layer."""
import collections
import os

#: Number of kernel launches per backend since import; ``locoprop_kernels.testing`` reads it.
LAUNCHES = collections.Counter()


#: Environment variable: warps per program for every launch (Triton's default, 4, when unset).
#: A knob for timing on a GPU without an edit: at 4 warps the sm_90 compile of the 64-wide
#: tile kernels spills to local memory (up to ~1.6 KB per thread for the softmax epilogue,
#: ~4.9 KB for the half-precision weight gradient), at 8 it spills <= 0.45 KB
#: (tools/triton_compile_check.py --num-warps N). Which is faster is not measured yet.
WARPS_ENV = "LOCOPROP_TRITON_WARPS"


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` and count it."""
    LAUNCHES["triton"] += 1
    warps = os.environ.get(WARPS_ENV)
    if warps:
        kwargs.setdefault("num_warps", int(warps))
    kernel[grid](*args, **kwargs)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile(n: int, low: int, high: int) -> int:
    """A power-of-two tile edge for a dimension of size n, clamped to [low, high]."""
    return max(low, min(high, next_pow2(n)))


def table_row(width, *cells) -> list:
    """One row of an int64 table the kernels read: ``width`` fields, set from (column, value)
    pairs whose columns are the kernel's ``tl.constexpr`` column indices."""
    row = [0] * int(getattr(width, "value", width))
    for column, value in cells:
        row[int(getattr(column, "value", column))] = int(value)
    return row
