"""Launch bookkeeping shared by the Triton launchers: a counter the tests read, and the rows of
the int64 tables some kernels read. Knows nothing of the op layer. Tile rules and launch
configs: ``_common.tile`` and ``configs.py``."""
import collections

#: Number of kernel launches per backend since import; ``locoprop_kernels.testing`` reads it.
LAUNCHES = collections.Counter()


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` and count it. ``num_warps``/``num_stages`` in
    kwargs are launch options (the launchers take them from ``configs.lookup``)."""
    LAUNCHES["triton"] += 1
    kernel[grid](*args, **kwargs)


def table_row(width, *cells) -> list:
    """One row of an int64 table the kernels read: ``width`` fields, set from (column, value)
    pairs whose columns are the kernel's ``tl.constexpr`` column indices."""
    row = [0] * int(getattr(width, "value", width))
    for column, value in cells:
        row[int(getattr(column, "value", column))] = int(value)
    return row
