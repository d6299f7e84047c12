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
Every shipped row compiles for sm_90 without spills (``make triton-check`` fails otherwise);
rows chosen by timing on a card say so (``chosen_by``, ``card``, the medians), the others were
chosen by the compile check alone. ``bench/triton_tune.py`` rewrites the table on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

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
            return Config(*(row[f] for f in ("block_m", "block_n", "block_k", "num_warps",
                                             "num_stages")))
    raise KeyError(f"no launch config for {kernel}/{act}/{dtype_class(dtype)}/{precision} "
                   f"in triton_kernels/config_table.py")


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
