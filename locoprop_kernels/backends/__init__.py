"""Backend selection: the only place that knows backend names.

Three backends implement one interface (``base.Backend``): ``reference`` (plain PyTorch, the
oracle), ``triton`` (fused Triton kernels) and ``cpp`` (``locoprop_kernels._C``, C++/OpenMP and
CUDA C++). Selection (docs/design.md section 4): ``backend=`` wins, then ``LOCOPROP_BACKEND``, then
auto: CUDA tensors -> triton, CPU tensors -> cpp when the extension is built, else reference
(with one warning); auto also skips a backend that does not serve the tensors' dtype (fp64
runs on the reference). Nothing outside this package compares backend names or loads kernels.

The triton backend's Linear matched-loss gradient takes one of two routes per shape, chosen
once by measurement on CUDA (``_routes.py``): ``set_route``/``using_route`` force one,
``routes()``/``routes_report()`` show what was decided.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Optional

import torch

from ._routes import (RouteDecision, RouteKey, clear_routes, routes, routes_report, set_route,
                      using_route)
from .base import Backend

NAMES = ("reference", "triton", "cpp")

_INSTANCES: dict = {}
_warned_missing_cpp = False


def cpp_available() -> bool:
    """Whether the compiled extension ``locoprop_kernels._C`` can be imported."""
    try:
        importlib.import_module("locoprop_kernels._C")
    except ImportError:
        return False
    return True


def _instance(name: str) -> Backend:
    if name not in _INSTANCES:
        if name == "reference":
            from .reference import ReferenceBackend as cls
        elif name == "triton":
            from .triton import TritonBackend as cls
        else:
            from .cpp import CppBackend as cls
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def _auto(device: torch.device, dtype: Optional[torch.dtype]) -> str:
    global _warned_missing_cpp
    if device.type == "cuda":
        preferred = ["triton", "reference"]
    elif cpp_available():
        preferred = ["cpp", "reference"]
    else:
        if not _warned_missing_cpp and device.type == "cpu":
            warnings.warn("locoprop_kernels._C (the C++ backend) is not built; CPU ops fall "
                          "back to the 'reference' backend", RuntimeWarning, stacklevel=4)
            _warned_missing_cpp = True
        preferred = ["reference"]
    for name in preferred:
        if dtype is None or dtype in _class_dtypes(name):
            return name
    return preferred[0]  # the op's dtype check then names what this backend supports


def _class_dtypes(name: str) -> tuple:
    return _instance(name).dtypes


def check_name(op: str, backend) -> None:
    """TypeError/ValueError when ``backend`` is not None or one of NAMES."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"locoprop.{op}: argument 'backend' expected None or one of "
                        f"{list(NAMES)}, got {type(backend).__name__}")
    if backend is not None and backend not in NAMES:
        raise ValueError(f"locoprop.{op}: argument 'backend' expected one of "
                         f"{[None, *NAMES]}, got {backend!r}")


def resolve(op: str, backend: Optional[str], device: torch.device,
            dtype: Optional[torch.dtype] = None, *, activation=None,
            variant: Optional[str] = None) -> Backend:
    """The backend object for a call on tensors of ``device`` (and ``dtype``), by the rules in
    this module's docstring. A named backend that cannot run there is a ValueError. With
    ``activation`` (a table row): a backend without a kernel for it (a registered activation,
    ``Backend.implements``) hands the call to the reference backend, which computes any f
    from its torch function, in the same compute dtype. ``variant`` (local_targets'): "S"
    targets, Y = Z - gamma G, apply no f, so every backend computes them, whatever
    ``activation`` is."""
    name = backend or os.environ.get("LOCOPROP_BACKEND") or None
    check_name(op, name)
    if name is None:
        name = _auto(device, dtype)
    if name == "triton":
        from .triton import TritonBackend
        reason = TritonBackend.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"locoprop.{op}: backend 'triton' {reason}")
    if name == "cpp" and not cpp_available():
        raise ValueError(f"locoprop.{op}: backend 'cpp' asked for, but the C++ extension "
                         f"locoprop_kernels._C is not built (reinstall with a C++ compiler)")
    be = _instance(name)
    if variant == "S":
        activation = None
    if activation is not None and not be.implements(activation, op):
        return _instance("reference")
    return be


def launch_counts() -> dict:
    """{backend name: kernel launches so far} for the backends loaded in this process."""
    if "locoprop_kernels.triton_kernels" in sys.modules:
        _instance("triton")  # its kernels may have been launched directly, not through us
    return {name: be.launches() for name, be in _INSTANCES.items()}


__all__ = ["Backend", "NAMES", "RouteDecision", "RouteKey", "check_name", "clear_routes",
           "cpp_available", "launch_counts", "resolve", "routes", "routes_report", "set_route",
           "using_route"]
