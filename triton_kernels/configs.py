"""Launch configurations of the GEMM and row kernels: tile edges, warps, pipeline stages.

A config is looked up by (kernel, activation class, operand dtype class, precision, shape
class) in ``config_table.TABLE``, falling back to shape class "any":

    kernel      "delta", "weight_grad" (Linear stages 1 and 2), "grouped_delta",
                "grouped_weight_grad", "targets" (local_targets), "conv_delta"
    activation  "softmax" (one program walks whole rows) or "elementwise"; the grouped
                stage 1 holds both paths in one kernel: "mixed"; stage 2: "-"
    dtype       "fp32" or "half" (bf16/fp16 storage: narrower loads, other registers)
    precision   "ieee", "tf32", "bf16" (``_common.PRECISIONS``); "-" for kernels without a dot
    shape       "small" (every GEMM dimension <= 256) or "large"; "any" matches both

The tile edges are maxima: ``_common.tile`` shrinks an edge to the dimension's power of two.
The stage-2 rows ("weight_grad", "grouped_weight_grad") also carry ``split_k``, the most
slices the reduction over the batch may be split into; ``split_k_slices`` is the rule that
picks the slice count S of a launch (at most that cap).
Every shipped row compiles for sm_90 without spills (``make triton-check`` fails otherwise);
rows chosen by timing on a card say so (``chosen_by``, ``card``, the medians), the others were
chosen by the compile check alone. ``bench/triton_tune.py`` rewrites the table on a GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from . import config_table

KERNELS = ("delta", "weight_grad", "grouped_delta", "grouped_weight_grad", "targets",
           "conv_delta")
#: Largest dimension of a "small" problem.
SMALL_UP_TO = 256


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    #: Stage 2 only: the most slices the reduction over B may be split into (1: never split).
    split_k: int = 1

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def shape_class(shape) -> str:
    return "small" if max(shape) <= SMALL_UP_TO else "large"


def key(kernel: str, act: str, dtype: str, precision: str, shape: str) -> str:
    return "/".join((kernel, act, dtype, precision, shape))


def lookup(kernel: str, dtype: torch.dtype, precision: str = "-", *, softmax=None,
           shape=(1,)) -> Config:
    """The config for one launch. ``softmax``: True/False for the row kernels, None for the
    kernels that have no activation class (it is then read from ``kernel``)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")
    act = {True: "softmax", False: "elementwise", None: ACT_OF.get(kernel, "-")}[softmax]
    for shape_cls in (shape_class(shape), "any"):
        row = config_table.TABLE.get(key(kernel, act, dtype_class(dtype), precision, shape_cls))
        if row is not None:
            cfg = Config(*(row[f] for f in ("block_m", "block_n", "block_k", "num_warps",
                                            "num_stages")), split_k=row.get("split_k", 1))
            return replace(cfg, **_FORCED.get(kernel, {}))
    raise KeyError(f"no launch config for {kernel}/{act}/{dtype_class(dtype)}/{precision} "
                   f"in triton_kernels/config_table.py")


#: kernel -> Config fields that replace the table's in every lookup (``forced``).
_FORCED: dict = {}


@contextlib.contextmanager
def forced(kernel: str, **fields):
    """Within the block, every ``lookup`` of ``kernel`` returns its table row with ``fields``
    (Config field names) replaced. For the tests only (a small tile or a given split on a
    small shape; the tuner sets whole table rows instead); the launchers never call it. Not
    thread-safe."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")
    unknown = set(fields) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown Config field(s) {sorted(unknown)}")
    saved = _FORCED.get(kernel)
    _FORCED[kernel] = {**(saved or {}), **fields}
    try:
        yield
    finally:
        if saved is None:
            del _FORCED[kernel]
        else:
            _FORCED[kernel] = saved


#: Streaming multiprocessors assumed where no CUDA device says (the interpreter, the compile
#: check): an H100/H200 SXM's 132, the card the table is made for.
DEFAULT_SMS = 132
#: Stage 2 is split until tiles x S reaches this many waves of programs over the SMs.
SPLIT_WAVES = 2
#: Each slice gets at least this many BLOCK_M row blocks: a shorter slice would cost more in
#: its fp32 partial tile (written, then read by the second pass) than its rows take to reduce.
MIN_SLICE_BLOCKS = 2


def sm_count(device) -> int:
    """The multiprocessor count of ``device`` (CUDA), else ``DEFAULT_SMS``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def split_k_slices(split_k: int, batch: int, block_m: int, tiles: int, sms: int
                   ) -> tuple[int, int]:
    """(S, rows per slice) for stage 2's reduction over ``batch`` rows with ``tiles``
    (d_out, d_in) output tiles on ``sms`` multiprocessors; ``split_k`` caps S.

    S = 1 when tiles alone fill SPLIT_WAVES waves (tiles >= SPLIT_WAVES * sms), or when the
    batch has fewer than 2 * MIN_SLICE_BLOCKS row blocks (in particular B <= 2 * BLOCK_M).
    Otherwise S = min(split_k, cdiv(SPLIT_WAVES * sms, tiles), blocks // MIN_SLICE_BLOCKS)
    with blocks = cdiv(B, BLOCK_M). A slice is a whole number of row blocks,
    rows = cdiv(blocks, S) * BLOCK_M, and S is then cdiv(B, rows) (no empty slice; the last
    may be shorter). S = 1 returns rows = B."""
    blocks = -(-batch // block_m)
    target = SPLIT_WAVES * sms
    s = 1 if tiles >= target else min(split_k, -(-target // tiles),
                                       blocks // MIN_SLICE_BLOCKS)
    if s <= 1:
        return 1, batch
    rows = -(-blocks // s) * block_m
    return -(-batch // rows), rows


#: The activation class of the kernels that have only one.
ACT_OF = {"grouped_delta": "mixed", "grouped_weight_grad": "-", "weight_grad": "-"}


def render_table(table: dict, card, note: str) -> str:
    """The text of ``config_table.py`` for ``table`` (key -> dict of Config fields plus
    ``chosen_by`` and, for timed rows, the numbers), one row per line."""
    lines = ['"""Launch configs of the Triton kernels (``configs.py`` says how they are keyed and',
             'used). Written by ``configs.render_table``; do not edit the rows by hand without',
             'rerunning ``make triton-check``."""', "",
             f"#: The card whose timings chose the rows marked chosen_by='timed' (None: none).",
             f"CARD = {card!r}", f"#: How this table was made.", f"NOTE = {note!r}", "",
             "TABLE = {"]
    for k in sorted(table):
        fields = ", ".join(f"{f}={v!r}" for f, v in table[k].items())
        lines.append(f"    {k!r}: dict({fields}),")
    lines.append("}")
    return "\n".join(lines) + "\n"
