"""Argument checks shared by every op: run before any backend writes anything.

Every failure is a ``ValueError`` (bad shape, value, aliasing, empty batch) or a ``TypeError``
(bad dtype, device, type) whose message names the op, the argument, what was expected and
what was given. Shape/dtype checks work on fake tensors too (``register_fake`` calls them under
``torch.compile``); the aliasing check needs real storage and is skipped on fake tensors.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Mixed precision (the matched-loss ops): a parameter dtype -> the dtypes its operands (x,
#: target) may have. The parameters set the compute dtype; an operand may be that dtype or,
#: with a float32/float64 parameter, a half dtype (what ``torch.autocast`` records). Nothing
#: else mixes: fp32 with fp64, fp16 with bf16, or an operand more precise than the parameter.
OPERAND_DTYPES = {torch.float64: (torch.float64, *HALF_DTYPES),
                  torch.float32: (torch.float32, *HALF_DTYPES),
                  torch.bfloat16: (torch.bfloat16,), torch.float16: (torch.float16,)}
_PRECISION_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def fail_value(op: str, arg: str, expected: str, got) -> None:
    raise ValueError(f"locoprop.{op}: argument '{arg}' expected {expected}, got {got}")


def fail_type(op: str, arg: str, expected: str, got) -> None:
    raise TypeError(f"locoprop.{op}: argument '{arg}' expected {expected}, got {got}")


def check_tensor(op: str, arg: str, t, *, shape: Optional[tuple] = None,
                 dtypes=FLOAT_DTYPES, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, what: str = "") -> None:
    """Type, dtype, device and exact shape of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        fail_type(op, arg, "a torch.Tensor", type(t).__name__)
    if dtype is not None and t.dtype != dtype:
        fail_type(op, arg, f"dtype {dtype}{what}", t.dtype)
    if t.dtype not in dtypes:
        fail_type(op, arg, f"a dtype in {[str(d) for d in dtypes]}", t.dtype)
    if device is not None and t.device != device:
        fail_type(op, arg, f"device {device} (the device of the other arguments)", t.device)
    if shape is not None and tuple(t.shape) != tuple(shape):
        fail_value(op, arg, f"shape {tuple(shape)}{what}", tuple(t.shape))


def check_operand_dtype(op: str, arg: str, t: torch.Tensor, param: str,
                        param_dtype: torch.dtype, *, blame_param: bool = False) -> None:
    """The dtype of operand ``arg`` (a float tensor) against the parameter ``param`` whose dtype
    sets the compute dtype (``OPERAND_DTYPES``). With ``blame_param``, an operand more precise
    than the parameter (fp32 x with a bf16 weight) is reported as the parameter's fault: a
    parameter of lower precision than its operand is refused, not computed in the lower one."""
    allowed = OPERAND_DTYPES[param_dtype]
    if t.dtype in allowed:
        return
    if blame_param and _PRECISION_RANK[t.dtype] > _PRECISION_RANK[param_dtype]:
        fail_type(op, param, f"a dtype at least as precise as {arg}'s ({t.dtype}): the "
                  f"parameters set the compute dtype and their operands may be of lower "
                  f"precision, never higher", param_dtype)
    lower = ("" if len(allowed) == 1 else
             f" or a lower-precision float ({', '.join(str(d) for d in allowed[1:])})")
    fail_type(op, arg, f"dtype {param_dtype} ({param}'s dtype){lower}", t.dtype)


def check_matrix(op: str, arg: str, t, *, rows_name: str, cols_name: str) -> None:
    """A 2-D tensor with at least one row (an empty batch is an error, not a no-op)."""
    check_tensor(op, arg, t)
    if t.dim() != 2:
        fail_value(op, arg, f"a 2-D tensor ({rows_name}, {cols_name})", tuple(t.shape))
    if t.shape[0] == 0:
        fail_value(op, arg, f"a non-empty batch ({rows_name} >= 1)", tuple(t.shape))
    if t.shape[1] == 0:
        fail_value(op, arg, f"{cols_name} >= 1", tuple(t.shape))


def check_number(op: str, arg: str, value, *, low: Optional[float] = None,
                 low_open: bool = False, high: Optional[float] = None) -> None:
    """A finite real number, optionally bounded: [low, high] or (low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail_type(op, arg, "a float", type(value).__name__)
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        fail_value(op, arg, "a finite number", value)
    if low is not None and (value <= low if low_open else value < low):
        fail_value(op, arg, f"a number {'>' if low_open else '>='} {low}", value)
    if high is not None and value > high:
        fail_value(op, arg, f"a number <= {high}", value)


def check_call_types(op: str, *, tensors=(), optional_tensors=(), numbers=(),
                     optional_numbers=(), strings=()) -> None:
    """Python-side types of a call, checked before the dispatcher (whose own errors are a
    RuntimeError that names neither our op's public name nor a fix). Pairs of (name, value)."""
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            fail_type(op, name, "a torch.Tensor", type(t).__name__)
    for name, t in optional_tensors:
        if t is not None and not isinstance(t, torch.Tensor):
            fail_type(op, name, "a torch.Tensor or None", type(t).__name__)
    for name, v in numbers:
        check_number(op, name, v)
    for name, v in optional_numbers:
        if v is not None:
            check_number(op, name, v)
    for name, v in strings:
        if not isinstance(v, str):
            fail_type(op, name, "a str", type(v).__name__)


def check_choice(op: str, arg: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        fail_value(op, arg, f"one of {list(choices)}", repr(value))


def _byte_range(t: torch.Tensor):
    """(first byte address, one past the last) that t can touch; None when empty.

    Absolute addresses: two tensors of different storages can never overlap, so no storage
    lookup is needed. Strides are never negative in torch."""
    n = t.numel()
    if n == 0:
        return None
    # The common case (arena views, fresh tensors) skips the per-dimension sum: this check runs
    # over every tensor of a multi-tensor RMSProp step, where Python time is the op's overhead.
    span = n if t.is_contiguous() else 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + span * t.element_size()


def _name(name) -> str:
    """A pair (argument, index) is formatted 'argument[index]' only when an error needs it."""
    return f"{name[0]}[{name[1]}]" if isinstance(name, tuple) else name


def is_fake(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or isinstance(t, _fake_tensor_type())


@functools.lru_cache(maxsize=None)
def _fake_tensor_type() -> type:
    # Imported on first use (torch._subclasses pulls in much of torch._dynamo's dependencies),
    # then cached: the aliasing check runs on every call of every op.
    from torch._subclasses.fake_tensor import FakeTensor
    return FakeTensor


def check_no_overlap(op: str, written: Sequence[tuple], read: Sequence[tuple] = ()) -> None:
    """No written tensor shares an element with another argument, nor with itself; (name,
    tensor or None) pairs, a name being a str or an (argument, index) pair. Real tensors of one
    device only (the callers check devices first; fake and meta tensors have no memory and
    are skipped).

    An in-place or output argument that aliases another (or itself: a stride of 0, or
    ``as_strided`` views whose elements coincide) would make the result depend on the order a
    kernel happens to touch memory in, so the op refuses it. Reads may alias each other.
    Sorting the byte ranges makes this O(n log n): an interval overlaps an earlier one iff it
    overlaps the earlier one reaching furthest. Interleaved views whose byte ranges overlap
    but whose elements do not (``buf[0::2]`` and ``buf[1::2]``) are told apart by their
    element offsets (``_share_elements``).
    """
    spans = []
    for is_written, pairs in ((True, written), (False, read)):
        for name, t in pairs:
            if t is None:
                continue
            if not spans and is_fake(t):
                return  # one fake tensor means a fake call: all are
            if is_written and _self_overlaps(t):
                fail_value(op, _name(name), "a tensor whose elements have distinct memory",
                           f"a tensor with strides {tuple(t.stride())} whose elements overlap")
            r = _byte_range(t)
            if r is not None:
                spans.append((r[0], r[1], is_written, name, t))
    spans.sort(key=lambda s: s[0])
    # The furthest end so far, over all spans and over written ones.
    reach_any, reach_written = -1, -1
    for i, (lo, hi, is_written, name, t) in enumerate(spans):
        if (reach_any if is_written else reach_written) > lo:
            others = [s for s in spans[:i] if s[1] > lo and (is_written or s[2])]
            for _, _, _, oname, ot in others:
                if _share_elements(t, ot):
                    culprit, partner = (name, oname) if is_written else (oname, name)
                    fail_value(op, _name(culprit),
                               f"memory that does not overlap '{_name(partner)}'",
                               "an aliasing tensor")
        reach_any = max(reach_any, hi)
        if is_written:
            reach_written = max(reach_written, hi)


#: Above this many elements the exact element-offset comparison is not attempted: tensors
#: whose byte ranges overlap count as aliasing (the conservative answer).
_EXACT_OVERLAP_LIMIT = 1 << 22


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offsets (in elements) of every element of t, as one int64 vector."""
    off = torch.full((), t.storage_offset(), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        off = off.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return off.reshape(-1)


def _self_overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of t share memory (a stride of 0, or overlapping strides)."""
    if t.numel() <= 1 or t.is_contiguous():
        return False
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        return True
    overlap = torch._debug_has_internal_overlap(t)  # 0 no, 1 yes, 2 too hard to tell
    if overlap != 2:
        return overlap == 1
    if t.numel() > _EXACT_OVERLAP_LIMIT:
        return True
    return _offsets(t).unique().numel() != t.numel()


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors with overlapping byte ranges share an element: exact for views of
    one storage with one element size (up to ``_EXACT_OVERLAP_LIMIT`` elements), else True."""
    same = (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.element_size() == b.element_size())
    if not same or a.numel() + b.numel() > _EXACT_OVERLAP_LIMIT:
        return True
    return bool(torch.isin(_offsets(a), _offsets(b)).any())
