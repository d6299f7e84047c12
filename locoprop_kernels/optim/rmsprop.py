"""``lk.optim.RMSprop``: the fused RMSprop that ``torch.optim`` lacks.

A drop-in for ``torch.optim.RMSprop``: same signature, defaults, param groups, state keys
(``step``, ``square_avg``, ``momentum_buffer`` when momentum > 0, ``grad_avg`` when centered)
and ``state_dict`` format, so a state dict saved by either loads into the other and training
goes on the same. The update of every parameter of a (param group, device, dtype) bucket is
ONE kernel launch (triton and cpp backends), where torch's foreach path streams the tensors
through about five separate multi-tensor kernels.

Host cost per step does not grow with per-tensor validation: a group's first step (and the
first after its layout changed) is ``lk.rmsprop_step_``, which validates every tensor; the
layout it validated (``_Layout``: parameters with a gradient, their state, the backend of each
bucket, one counter tensor holding every ``step``) is kept, and later steps re-check it in a
few list operations and call the backend directly (``RMSprop._fast_step`` lists what is
re-checked). Measured on 161 one-element parameters: bench/optim_rmsprop.py.

``capturable=True`` follows torch's contract: parameters and state on CUDA, the counters on
the device, no host sync in the step (a device ``lr`` is read by the kernel), so a CUDA graph
can capture the whole step; a backend that cannot be captured is refused, and capturing a
step with ``capturable=False`` raises as torch's does. Under ``torch.compile`` (or a torch
function / dispatch mode) the step always goes through the op, which Dynamo sees as one
custom op; no layout is kept there.

    g  = -g if maximize;  g = g + weight_decay p  if weight_decay != 0
    ms = alpha ms + (1 - alpha) g^2
    v  = ms - ga^2, ga = lerp(ga, g, 1 - alpha)  if centered, else v = ms
    style "torch": d = g / (sqrt(v) + eps);   style "tf": d = lr g / sqrt(v + eps)
    momentum > 0:  buf = momentum buf + d, d = buf
    "torch": p -= lr d;   "tf": p -= d

``style="tf"`` is TF1's RMSProp (the official LocoProp code's): eps inside the sqrt, lr inside
the momentum buffer, square averages starting at 1. Differences from torch, all on purpose:
fp16/bf16 parameters keep fp32 state (torch keeps it in the parameter's dtype); complex
parameters are updated as pairs of reals, as torch does. Refused with a clear error instead of
computing something else: ``differentiable=True`` (the kernels are not differentiable),
sparse gradients, ``capturable=True`` with parameters off CUDA (as torch refuses it).

The functional core ``rmsprop`` below is what the validating step calls, beside the class as
in ``torch/optim/rmsprop.py``.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import weakref
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..backends.base import HALF_DTYPES
from ..ops import rmsprop_step_
from ..rmsprop_options import STYLES, RMSpropOptions

#: The keys our param groups add to torch's; a torch state dict lacks them (see __setstate__).
OUR_GROUP_KEYS = ("style", "backend")


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of p's optimizer state: p's own, fp32 for half-precision parameters."""
    return torch.float32 if p.dtype in HALF_DTYPES else p.dtype


def init_state(state: dict, p: Tensor, options: RMSpropOptions, *,
               step_on_device: bool = False) -> dict:
    """p's RMSProp state in torch's keys, each created on first need (also when momentum or
    centered is switched on later): ``step`` (0-d fp32, on p's device when capturable),
    ``square_avg`` (from 1 in TF1's flavour, 0 in torch's), ``momentum_buffer``,
    ``grad_avg``. Shared by ``RMSprop`` and ``LocoProp``."""
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32,
                                    device=p.device if step_on_device else "cpu")
        state["square_avg"] = torch.full_like(p, options.initial_square_avg,
                                              dtype=state_dtype(p),
                                              memory_format=torch.preserve_format)
    for key, needed in (("momentum_buffer", options.has_momentum),
                        ("grad_avg", options.centered)):
        if needed and key not in state:
            state[key] = torch.zeros_like(p, dtype=state_dtype(p),
                                          memory_format=torch.preserve_format)
    return state


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its (..., 2) real view: the update treats re and im as two reals."""
    return torch.view_as_real(t) if t.is_complex() else t


#: The group entries a layout is built for; any change of one rebuilds it. The learning rate is
#: not among them: schedulers move it every step, and every step reads it.
LAYOUT_KEYS = ("style", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize",
               "capturable", "differentiable", "backend")
#: The op name backends are resolved under (the one ``lk.rmsprop_step_`` resolves with).
OP = "rmsprop_step_"
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_is = operator.is_
_data_ptr = Tensor.data_ptr


def _plain_eager() -> bool:
    """Whether a step may take the cached launch: not compiling or tracing, no torch function
    or dispatch mode active (those see the op through the dispatcher instead)."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._is_torch_function_mode_enabled())


def _bump_versions(tensors: list) -> None:
    """Autograd's version counters of tensors the kernels wrote through raw pointers (what the
    op does for its own fast path, and what torch's in-place foreach ops do)."""
    try:
        torch._C._increment_version(tensors)  # a list in one call (newer torch)
    except TypeError:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _check_capturable(op: str, backend, device: torch.device) -> None:
    """capturable=True: torch's contract is a step with no host sync that a CUDA graph can
    capture; a backend that cannot give that is refused rather than silently syncing."""
    if not backend.can_capture_graph(device):
        raise ValueError(f"lk.optim.{op}: capturable=True needs a backend whose step a CUDA "
                         f"graph can capture; backend '{backend.name}' on {device} cannot "
                         f"(backend=None picks one that can on CUDA, or pass capturable=False)")


class _Bucket:
    """One launch of a layout: its tensors of one (device, dtype), as the backend takes them
    (complex ones as real views). ``positions`` index the layout's parameters with a gradient;
    ``whole`` says they are all of them, in order, none complex (the step's grad list then
    serves as the bucket's)."""

    __slots__ = ("backend", "device", "dtype", "positions", "whole", "params", "square_avgs",
                 "momentum_bufs", "grad_avgs")

    def grads_of(self, grads: list) -> list:
        return grads if self.whole else [_real(grads[i]) for i in self.positions]


class _Layout:
    """One param group's step, validated once: the parameters with a gradient, their state,
    the launches (buckets) and the step counters, with what ``RMSprop._fast_step`` re-checks.

    ``counters``: one fp32 tensor per device the counters live on (the CPU, or the parameters'
    device with capturable=True) holding the ``step`` of every parameter of the layout; each
    parameter's ``state["step"]`` is a 0-d view of it, so a step adds 1 to all in one op.

    The gradients last checked are held by weak references: a layout must not keep a step's
    gradients alive once ``zero_grad()`` has dropped them (that would double their memory
    during the next backward pass)."""

    __slots__ = ("group", "group_params", "has_grad", "with_grad_index", "params",
                 "options", "options_key", "state", "state_dicts", "state_keys",
                 "state_tensors", "watched", "watched_ptrs", "grad_refs", "grad_ptrs",
                 "real_params", "any_complex", "written_storages", "buckets", "counters")

    def accepts_grads(self, grads: list) -> bool:
        """Whether new gradient tensors fit the validated layout as the op would accept them:
        plain strided tensors of their parameter's device and shape, of its dtype or fp32,
        none sharing memory with a tensor the step writes (a storage shared at all sends the
        step to the op, which tells overlap from mere sharing)."""
        fp32, strided = torch.float32, torch.strided
        for g, p in zip(grads, self.real_params):
            if type(g) not in _PLAIN_TYPES or g.layout is not strided:
                return False
            if self.any_complex and g.is_complex():
                g = torch.view_as_real(g)
            if not (g.shape == p.shape and (g.dtype is p.dtype or g.dtype is fp32)
                    and g.device == p.device):
                return False
        storages = {g.untyped_storage().data_ptr() for g in grads}
        return storages.isdisjoint(self.written_storages)


class RMSprop(torch.optim.Optimizer):
    """RMSprop in one launch per (param group, device, dtype); see the module docstring.

    Arguments are ``torch.optim.RMSprop``'s (``params``, ``lr``, ``alpha``, ``eps``,
    ``weight_decay``, ``momentum``, ``centered``, ``capturable``, ``foreach``, ``maximize``,
    ``differentiable``) plus ``style`` ("torch" or "tf") and ``backend`` (None = auto, or
    "reference", "triton", "cpp"). ``foreach`` is accepted and ignored: the update is always
    one fused launch. ``lr`` may be a float or a one-element tensor; with ``capturable=True``
    on CUDA a device tensor is read by the kernel, so a captured step follows a schedule.

    Host cost. The first step of a param group (and any step after its layout changed) goes
    through ``lk.rmsprop_step_``, which validates every tensor; the group's layout (which
    parameters have gradients, their state, the backend, the step counters) is then kept.
    Later steps re-check it in a few list operations over the group (the same parameter and
    state objects, the same data pointers, the same options, gradients present where they
    were; new gradient tensors get the op's per-tensor checks on shape, dtype, device and
    memory) and call the backend directly: one launch per bucket and one add for all step
    counters. Anything else rebuilds the layout through the validating op.
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, style="torch", backend=None):
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, style=style,
                        backend=backend)
        self._layouts: dict = {}  # param group index -> _Layout
        super().__init__(params, defaults)  # add_param_group checks every group

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then every option of the new group checked: a bad group is
        refused (and not added) with an error naming the option."""
        super().add_param_group(param_group)
        try:
            _check_group("RMSprop.add_param_group", self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._layouts = {}  # torch's __getstate__ keeps defaults, state and groups only
        for group in self.param_groups:
            # A group loaded from torch.optim.RMSprop lacks our keys: keep this optimizer's.
            for key in OUR_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
            for key, value in (("momentum", 0), ("centered", False), ("foreach", None),
                               ("maximize", False), ("differentiable", False),
                               ("capturable", False)):
                group.setdefault(key, value)

    def state_dict(self) -> dict:
        """torch's state_dict, each ``step`` its own 0-d fp32 tensor as torch.optim.RMSprop
        writes it (live, ours is a view into the layout's counter tensor); everything else is
        the live state, as torch returns it."""
        saved = super().state_dict()
        saved["state"] = {key: ({**value, "step": value["step"].clone()}
                                if isinstance(value.get("step"), Tensor) else value)
                          for key, value in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict (any torch RMSprop or ours), then the state of fp16/bf16
        parameters back to fp32 from the saved values (torch casts state to the parameter's
        dtype, which would round ours). The next step rebuilds every layout."""
        self._layouts = {}
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None or p.dtype not in HALF_DTYPES:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def _init_group(self, group, params, grads, square_avgs, grad_avgs, momentum_bufs,
                    steps) -> None:
        options = RMSpropOptions.from_group(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("lk.optim.RMSprop: sparse gradients are not supported "
                                   "(torch.optim.RMSprop does not support them either)")
            if group["capturable"] and p.device.type != "cuda":
                raise ValueError(f"lk.optim.RMSprop: capturable=True needs parameters on "
                                 f"CUDA (as torch.optim.RMSprop), got one on {p.device}")
            state = init_state(self.state[p], p, options, step_on_device=group["capturable"])
            params.append(p)
            grads.append(p.grad)
            square_avgs.append(state["square_avg"])
            steps.append(state["step"])
            if options.has_momentum:
                momentum_bufs.append(state["momentum_buffer"])
            if options.centered:
                grad_avgs.append(state["grad_avg"])

    @torch.no_grad()
    def step(self, closure=None):
        """One RMSprop step on every parameter with a gradient; returns closure()'s loss."""
        # torch's contract: capturing a step of an optimizer that is not capturable raises.
        # (torch < 2.12 names the check _cuda_graph_capture_health_check.)
        getattr(self, "_accelerator_graph_capture_health_check",
                getattr(self, "_cuda_graph_capture_health_check", None))()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eager = _plain_eager()
        for index, group in enumerate(self.param_groups):
            layout = self._layouts.get(index) if eager else None
            if layout is None or not self._fast_step(layout, group):
                self._full_step(index, group, eager)
        return loss

    def _full_step(self, index: int, group: dict, eager: bool) -> None:
        """The step through the validating op; then, in plain eager mode, the group's layout."""
        _check_group("RMSprop.step", group)
        params, grads, square_avgs, grad_avgs, momentum_bufs, steps = [], [], [], [], [], []
        self._init_group(group, params, grads, square_avgs, grad_avgs, momentum_bufs, steps)
        options = RMSpropOptions.from_group(group)
        if group["capturable"] and params:
            for p in params:
                be = backends.resolve(OP, group["backend"], p.device, _real(p).dtype)
                _check_capturable("RMSprop.step", be, p.device)
        rmsprop(params, grads, square_avgs, grad_avgs, momentum_bufs, steps, lr=group["lr"],
                options=options, backend=group["backend"])
        if eager:
            self._layouts[index] = self._build_layout(group, options, params, grads,
                                                      square_avgs, grad_avgs, momentum_bufs,
                                                      steps)

    def _build_layout(self, group, options, params, grads, square_avgs, grad_avgs,
                      momentum_bufs, steps) -> Optional[_Layout]:
        """The layout of a group whose step the op has just validated and run (None when a
        tensor is not a plain one: such groups always go through the op)."""
        watched = params + square_avgs + momentum_bufs + grad_avgs
        if any(type(t) not in _PLAIN_TYPES for t in watched + grads):
            return None
        layout = _Layout()
        layout.group = group
        layout.group_params = list(group["params"])
        layout.has_grad = [p.grad is not None for p in layout.group_params]
        layout.with_grad_index = (None if all(layout.has_grad) else
                                  [i for i, present in enumerate(layout.has_grad) if present])
        layout.params = params
        layout.options = options
        layout.options_key = tuple(group[key] for key in LAYOUT_KEYS)

        # The step counters: one tensor per device they live on, each state["step"] a view.
        counter_index: dict = {}
        for i, p in enumerate(params):
            device = p.device if group["capturable"] else torch.device("cpu")
            counter_index.setdefault(device, []).append(i)
        layout.counters = []
        for device, idx in counter_index.items():
            counter = torch.stack([steps[i].to(device=device, dtype=torch.float32)
                                   for i in idx])
            for j, i in enumerate(idx):
                self.state[params[i]]["step"] = counter[j]
            layout.counters.append(counter)

        layout.state = self.state
        layout.state_dicts = [self.state[p] for p in params]
        layout.state_keys = ("step", "square_avg") + (
            ("momentum_buffer",) if options.has_momentum else ()) + (
            ("grad_avg",) if options.centered else ())
        layout.state_tensors = [d[k] for d in layout.state_dicts for k in layout.state_keys]
        layout.watched = watched
        layout.watched_ptrs = list(map(_data_ptr, watched))
        layout.grad_refs = [weakref.ref(g) for g in grads]
        layout.grad_ptrs = list(map(_data_ptr, grads))
        layout.real_params = [_real(p) for p in params]
        layout.any_complex = any(p.is_complex() for p in params)
        layout.written_storages = {t.untyped_storage().data_ptr() for t in watched} - {0}

        by_kind: dict = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        layout.buckets = []
        for (device, _), idx in by_kind.items():
            b = _Bucket()
            b.device, b.dtype = device, _real(params[idx[0]]).dtype
            b.backend = backends.resolve(OP, group["backend"], device, b.dtype)
            b.positions = idx
            b.whole = len(idx) == len(params) and not layout.any_complex
            pick = lambda ts: [_real(ts[i]) for i in idx] if ts else []  # noqa: E731
            b.params, b.square_avgs = pick(params), pick(square_avgs)
            b.momentum_bufs, b.grad_avgs = pick(momentum_bufs), pick(grad_avgs)
            layout.buckets.append(b)
        return layout

    def _fast_step(self, layout: _Layout, group: dict) -> bool:
        """The group's step by its layout, when the re-check passes; False (and nothing
        written) when anything differs from the layout, which the op then validates anew."""
        if layout.group is not group:
            return False
        group_params = group["params"]
        if (len(group_params) != len(layout.group_params)
                or not all(map(_is, group_params, layout.group_params))):
            return False
        all_grads = [p.grad for p in group_params]
        if [g is not None for g in all_grads] != layout.has_grad:
            return False
        index = layout.with_grad_index
        grads = all_grads if index is None else [all_grads[i] for i in index]
        if tuple(group[key] for key in LAYOUT_KEYS) != layout.options_key:
            return False
        state = self.state
        if state is not layout.state or not all(
                map(_is, [state.get(p) for p in layout.params], layout.state_dicts)):
            return False
        keys = layout.state_keys
        if not all(map(_is, [d.get(k) for d in layout.state_dicts for k in keys],
                       layout.state_tensors)):
            return False
        if list(map(_data_ptr, layout.watched)) != layout.watched_ptrs:
            return False
        grad_ptrs = list(map(_data_ptr, grads))
        new_grads = not (grad_ptrs == layout.grad_ptrs and all(
            map(_is, grads, [ref() for ref in layout.grad_refs])))
        if new_grads and not layout.accepts_grads(grads):
            return False
        lr_args = []
        for b in layout.buckets:
            if backends.resolve(OP, group["backend"], b.device, b.dtype) is not b.backend:
                return False  # e.g. LOCOPROP_BACKEND changed
            lr_arg = _lr_arg(group["lr"], b)
            if lr_arg is None:
                return False  # the op names what is wrong with this lr
            lr_args.append(lr_arg)
        if new_grads:
            layout.grad_refs, layout.grad_ptrs = [weakref.ref(g) for g in grads], grad_ptrs
        options = layout.options
        for b, lr_arg in zip(layout.buckets, lr_args):
            b.backend.rmsprop_step_(b.params, b.grads_of(grads), b.square_avgs,
                                    b.momentum_bufs, b.grad_avgs, lr_arg, options)
        for counter in layout.counters:
            counter.add_(1)
        _bump_versions(layout.watched)
        return True


def _lr_arg(lr, bucket: _Bucket):
    """The learning rate as ``bucket``'s backend takes it, as ``lk.rmsprop_step_`` passes it:
    a float (from a number or a one-element CPU tensor, no device memory), or a device tensor
    read by a backend that reads it on the device (no host sync), else its value (one sync).
    None for anything else (a negative or non-finite value, a tensor of several elements):
    the op refuses those with a message."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            return None
        if lr.device.type != "cpu":
            lr = lr.reshape(1).to(device=bucket.device, dtype=torch.float32)
            return lr if bucket.backend.reads_lr_from_device else float(lr.item())
        lr = float(lr)
    elif type(lr) is not float and type(lr) is not int:
        return None
    return float(lr) if 0.0 <= lr < math.inf else None


def _check_group(op: str, group: dict) -> None:
    """Every option of a param group, with torch's bounds and our refusals."""
    if group.get("differentiable"):
        raise ValueError(f"lk.optim.{op}: differentiable=True is not supported: the fused "
                         f"update is not differentiable (use torch.optim.RMSprop for that)")
    if group.get("style") not in STYLES:
        raise ValueError(f"lk.optim.{op}: argument 'style' expected one of {list(STYLES)}, "
                         f"got {group.get('style')!r}")
    backends.check_name(f"optim.{op}", group.get("backend"))
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lk.optim.{op}: a Tensor lr must have one element, got shape "
                             f"{tuple(lr.shape)}")
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"lk.optim.{op}: argument 'lr' expected a number >= 0, got {lr!r}")
    RMSpropOptions.from_group(group).check(f"optim.{op}")
    if group.get("capturable") and any(p.device.type != "cuda" for p in group["params"]):
        raise ValueError(f"lk.optim.{op}: capturable=True needs parameters on CUDA (as "
                         f"torch.optim.RMSprop)")


def rmsprop(params: list, grads: list, square_avgs: list, grad_avgs: list,
            momentum_buffer_list: list, state_steps: list, *, lr, options: RMSpropOptions,
            backend: Optional[str] = None) -> None:
    """The functional core of ``RMSprop.step``: one update of these parameters, in place.

    Lists as ``torch.optim.rmsprop.rmsprop`` takes them (``grad_avgs`` empty unless centered,
    ``momentum_buffer_list`` empty unless momentum > 0). Parameters are bucketed by
    (device, dtype); each bucket is one ``rmsprop_step_`` call. ``state_steps`` are
    incremented by one (one foreach op).
    """
    if not params:
        return
    buckets: dict = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    kwargs = dataclasses.asdict(options)
    for (device, _), idx in buckets.items():
        pick = lambda ts: [_real(ts[i]) for i in idx] if ts else None  # noqa: E731
        bucket_lr = lr
        if isinstance(lr, Tensor) and lr.device.type != "cpu":
            # A device lr is read where the parameters are (no-ops when it already is there).
            bucket_lr = lr.reshape(1).to(device=device, dtype=torch.float32)
        rmsprop_step_(pick(params), pick(grads), pick(square_avgs), pick(momentum_buffer_list),
                      lr=bucket_lr, grad_avgs=pick(grad_avgs), backend=backend, **kwargs)
    torch._foreach_add_(state_steps, 1)
