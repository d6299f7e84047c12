"""``lk.optim.RMSprop``: the fused RMSprop that ``torch.optim`` lacks.

A drop-in for ``torch.optim.RMSprop``: same signature, defaults, param groups, state keys
(``step``, ``square_avg``, ``momentum_buffer`` when momentum > 0, ``grad_avg`` when centered)
and ``state_dict`` format, so a state dict saved by either loads into the other and training
goes on the same. The update of every parameter of a (param group, device, dtype) bucket is
ONE call of ``lk.rmsprop_step_`` (one kernel launch on the triton and cpp backends), where
torch's foreach path streams the tensors through about five separate multi-tensor kernels.

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

The functional core ``rmsprop`` below is what ``step`` calls, beside the class as in
``torch/optim/rmsprop.py``.
"""
from __future__ import annotations

import dataclasses
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


class RMSprop(torch.optim.Optimizer):
    """RMSprop in one launch per (param group, device, dtype); see the module docstring.

    Arguments are ``torch.optim.RMSprop``'s (``params``, ``lr``, ``alpha``, ``eps``,
    ``weight_decay``, ``momentum``, ``centered``, ``capturable``, ``foreach``, ``maximize``,
    ``differentiable``) plus ``style`` ("torch" or "tf") and ``backend`` (None = auto, or
    "reference", "triton", "cpp"). ``foreach`` is accepted and ignored: the update is always
    one fused launch. ``lr`` may be a float or a one-element tensor; with ``capturable=True``
    on CUDA a device tensor is read by the kernel, so a captured step follows a schedule.
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, style="torch", backend=None):
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, style=style,
                        backend=backend)
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
        for group in self.param_groups:
            # A group loaded from torch.optim.RMSprop lacks our keys: keep this optimizer's.
            for key in OUR_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
            for key, value in (("momentum", 0), ("centered", False), ("foreach", None),
                               ("maximize", False), ("differentiable", False),
                               ("capturable", False)):
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict (any torch RMSprop or ours), then the state of fp16/bf16
        parameters back to fp32 from the saved values (torch casts state to the parameter's
        dtype, which would round ours)."""
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, square_avgs, grad_avgs, momentum_bufs, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, square_avgs, grad_avgs, momentum_bufs, steps)
            rmsprop(params, grads, square_avgs, grad_avgs, momentum_bufs, steps, lr=group["lr"],
                    options=RMSpropOptions.from_group(group), backend=group["backend"])
        return loss


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
