"""Argument checks the op families share, on top of ``validation.py``'s per-tensor ones: the
``backend=`` argument, the dtypes a resolved backend serves, ints and pairs of ints, and the
refusal of autograd by the in-place ops. Each raises before anything is written, naming the
op and the argument."""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import backends
from ..validation import fail_type, fail_value

Tensor = torch.Tensor

#: What the custom ops' ``str backend`` argument holds for ``backend=None`` (auto selection:
#: a schema has no Optional[str] default worth the dispatcher's cost; ``backends.resolve``
#: reads an empty name as "not named").
AUTO_BACKEND = ""


def backend_arg(op: str, backend: Optional[str]) -> str:
    """The public ``backend=`` argument, checked (None or a backend's name), as the custom ops
    take it."""
    backends.check_name(op, backend)
    return backend or AUTO_BACKEND


def check_backend_dtype(op: str, backend, arg: str, t: Tensor) -> None:
    """TypeError when the resolved ``backend`` does not compute on ``t``'s dtype."""
    if t.dtype not in backend.dtypes:
        fail_type(op, arg, f"a dtype the '{backend.name}' backend supports "
                  f"{[str(d) for d in backend.dtypes]}", t.dtype)


def int_pair(op: str, arg: str, value, low: int) -> List[int]:
    """An int or a pair of ints, each >= low, as a list [h, w] (torch's conv2d arguments)."""
    values = list(value) if isinstance(value, (tuple, list)) else [value, value]
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        fail_type(op, arg, "an int or a pair of ints", repr(value))
    if min(values) < low:
        fail_value(op, arg, f"ints >= {low}", repr(value))
    return values


def check_int(op: str, arg: str, value, low: int) -> None:
    """An int (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail_type(op, arg, "an int", type(value).__name__)
    if value < low:
        fail_value(op, arg, f"an int >= {low}", value)


def _any_requires_grad_py(*values) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad
               for v in values for t in (v if isinstance(v, list) else (v,)))


# Tensors and lists of tensors, in C++ (torch's custom-op autograd layer asks the same): eager
# rmsprop_step_ asks it of every tensor at every step in grad mode. Dynamo cannot trace it.
_any_requires_grad_c = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)


def refuse_in_place_autograd(op: str, writes: str, args: dict, hint: str = "") -> None:
    """Grad mode on and a tensor argument that requires grad: an in-place op has nothing to
    hang an autograd node on (torch's own ``out=`` functions refuse this too); say so, naming
    the argument, before anything is written. ``args``: name -> a Tensor, None or a list of
    Tensors (then named ``name[i]``)."""
    if not torch.is_grad_enabled():
        return
    any_requires_grad = (_any_requires_grad_py if torch.compiler.is_compiling()
                         else _any_requires_grad_c)
    if not any_requires_grad(*args.values()):
        return
    for name, value in args.items():
        for i, t in enumerate(value if isinstance(value, list) else (value,)):
            if isinstance(t, Tensor) and t.requires_grad:
                arg = f"{name}[{i}]" if isinstance(value, list) else name
                raise RuntimeError(
                    f"locoprop.{op} is not differentiable: it writes {writes} in place, which "
                    f"autograd cannot record, and argument '{arg}' requires grad while grad "
                    f"mode is on. Call it under torch.no_grad() or on detached tensors "
                    f"(t.detach() shares t's memory){hint}")
