"""``lk.optim.LocoProp``: LocoProp on any model, as a ``torch.optim.Optimizer`` (docs/design.md §9).

    opt = lk.optim.LocoProp(model, lr=1e-5, output_activation="sigmoid")
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # hooks record X and Z of every layer call
        opt.step()                        # or opt.step(closure)

Layers (``optim/layers.py``): every trainable ``nn.Linear`` and ``nn.Conv2d`` not excluded
(a Conv2d with a padding_mode other than "zeros" is listed as refused, and linearized);
``opt.layers`` says which f each one's local loss uses and why. A forward hook records each
call of a layer made while autograd records (X its input, Z its output: a Linear's flattened
to rows, a Conv2d's as (N, C_in, H, W) and (N, C_out, H_out, W_out)), and a hook on the
tensor Z marks the call as used when the backward pass reaches it; calls it never reaches
(evaluation under ``no_grad`` records nothing at all, an output the loss does not use) count
for nothing. ``step()`` clears the records; ``zero_grad()`` clears those whose gradients it
clears (the calls the backward pass has reached).

The math. Layer l's local objective (docs/design.md §2) with targets Y = f(Z0) - gamma G, summed over
its calls, plus gamma R for the uses of its parameters the hooks do not see, has the gradient

    s (f(Z) - Y)^T X + s gamma R = s (f(Z) - f(Z0))^T X + s gamma (G^T X + R)
                                 = s (f(Z) - f(Z0))^T X + s gamma p.grad,

because G^T X (summed over the recorded calls) plus R IS the backprop gradient p.grad. So
G itself is never needed: the matched-loss gradient with the target f(Z0) (variant S: Z0, and
f = identity) plus the constant s gamma p.grad.

A Conv2d layer is the same with one row per output position (n, h, w) and one column per
channel (``lk.matched_loss_grad_conv2d``): X (N, C_in, H, W), W (C_out, C_in/groups, kh, kw),
Z = conv2d(X, W) + b (N, C_out, H_out, W_out), G = dL/dZ of Z's shape, targets
Y = f(Z0) - gamma G with f over each position's channel vector (softmax over dim 1), local
objective s sum_{n,h,w} [F(z[n,:,h,w]) - y[n,:,h,w] . z[n,:,h,w]] (+ the prox term), and

    s (f(Z) - Y)^T X  becomes  s conv2d_weight_grad(X, f(Z) - Y)  (grad_b: s sum_{n,h,w})
    G^T X             becomes  conv2d_weight_grad(X, G), the conv's backprop dL/dW,

so the same identity holds: local gradient = s conv2d_weight_grad(X, f(Z) - f(Z0))
+ s gamma p.grad. Its calls are stacked along N (one problem per input size when they
differ), with the module's stride, padding, dilation and groups ("same"/"valid" padding as
ints, ``layers.conv_geometry``). One ``step()`` (T = ``inner_steps``, s = ``scale``,
lr_t = lr max(1 - t/T, lr_floor)):

    every trainable parameter p with a gradient: p0 = p, and
      LocoProp layers' W, b (param_groups[0]):
        local_grad_t(p) = sum over the layer's uses of matched_loss_grad(X, W, b, f(Z0), f)
                          (a Conv2d: matched_loss_grad_conv2d(X, W, b, f(Z0), f, stride=...,
                          padding=..., dilation=..., groups=...))
                          + s gamma p.grad
      every other parameter (param_groups[1], the linearized local loss):
        local_grad_t(p) = s gamma p.grad
      with eta: + (p - p0) / eta for every parameter
      a layer with f = identity may take the same gradient in its Gram form (``Quadratic``:
      X^T X once per step, no row-sized GEMM in the inner iterations), where cheaper
    t = 0: the matched part is 0 (W = W0): local_grad_0(p) = s gamma p.grad, no GEMMs
    t = 0 .. T-1: ONE rmsprop_step_ over every parameter (per group when the groups' lr or
           options differ), TF1 or torch flavour, state in ``self.state`` (torch's format).
    The T iterations run in ``inner_loop.InnerLoop``, the same loop as ``lk.LocoProp``'s.

So at W0 the local gradient of every trainable parameter is s gamma times its backprop
gradient, and with T = 1 a step is one RMSProp step on s gamma p.grad. A tied embedding, a
direct ``F.linear`` read or an ``nn.MultiheadAttention.out_proj`` (whose forward is never
called: no records, all of its gradient is linearized) are exact by construction. Parameters
with ``requires_grad=False`` are never touched; a parameter shared by several modules is one
parameter (its local gradients add up). AMP's ``GradScaler`` works as with any optimizer:
it unscales p.grad (the only gradient used) and skips the step on inf/NaN.

Data parallel (a ``DistributedDataParallel`` model, or ``process_group``): each rank records
its shard; the matched-loss gradients are all-reduced (summed) once per inner iteration, one
flat buffer; p.grad is DDP's average (averaged here when there is no DDP). Every rank then
takes the same RMSProp step. Linear and Conv2d layers take this same path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..distributed import DataParallel
from ..inner_loop import InnerLoop
from ..activations import get_activation
from .. import backends
from ..grouped import LayerSpec
from ..config import LocoPropConfig, Variant
from ..ops import matched_loss_grad, matched_loss_grad_conv2d
from ..rmsprop_options import RMSpropOptions
from ..validation import check_choice, check_number, fail_type, fail_value
from .detection import Detector
from .gram import Quadratic, uses_gram
from .grouped_step import GroupedLoop, flat_view
from .per_layer_step import FlatGrads, RepeatedOp, StepLayout
from .layers import (OP, LayerInfo, conv_geometry, decide_activations, features, find_layers,
                     layer_params, observed, preactivation, stores_in_out)
from .rmsprop import state_dtype

#: Forward passes observed for activation detection at most (``Detector``): a layer that no
#: pass has called by then keeps its construction-time decision.
DETECTION_PASSES = 8


class _Hook:
    """A module hook that calls a method of the optimizer through a weak reference, so that
    the model does not keep its optimizer alive. A deep copy or a pickle of the model carries
    an inert hook: the copy's modules are not the ones the optimizer records."""

    __slots__ = ("_optimizer", "_method")

    def __init__(self, optimizer, method: str):
        self._optimizer = None if optimizer is None else weakref.ref(optimizer)
        self._method = method

    def __call__(self, *args, **kwargs):
        optimizer = None if self._optimizer is None else self._optimizer()
        return None if optimizer is None else getattr(optimizer, self._method)(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _Hook(None, self._method)

    def __reduce__(self):
        return (_Hook, (None, self._method))


#: module -> weak reference to the lk.optim.LocoProp recording it (one per model).
_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: What a step does with non-finite gradients: "apply" (torch's behaviour: the update
#: goes through), "skip" (nothing changes, ``skipped_steps`` counts it, a warning says so).
NONFINITE = ("apply", "skip")
#: ``gram=``: "auto" takes the Gram-matrix inner gradient for a quadratic local loss when
#: ``uses_gram`` says it is cheaper, "always" wherever it is exact, "never" not at all.
GRAM = ("auto", "always", "never")


def _owner(module: nn.Module):
    ref = _OWNERS.get(module)
    owner = None if ref is None else ref()
    return owner if owner is not None and owner._hooks else None


def _remove_hooks(handles: list, modules: list = ()) -> None:
    for h in handles:
        h.remove()
    handles.clear()
    for m in modules:
        _OWNERS.pop(m, None)


def _check_group(group: dict, params: list) -> LocoPropConfig:
    """The hyper-parameters a param group holds (the constructor's and add_param_group's one
    check, ``config.LocoPropConfig.check``), lr also as torch.optim accepts it (a tensor)."""
    _check_lr(OP, "lr", group["lr"], params)
    return LocoPropConfig(
        lr=group["lr"], variant=group["variant"], gamma=group["gamma"],
        inner_steps=group["inner_steps"], lr_floor=group["lr_floor"], eta=group.get("eta"),
        scale=group.get("scale", 1.0), rmsprop=RMSpropOptions.from_group(group),
        backend=group.get("backend"),
        precision=group.get("precision", "ieee")).check(OP, lr=False)


def _check_lr(op: str, arg: str, lr, params) -> None:
    """lr: a finite number >= 0 or a one-element floating tensor on the CPU or the params'
    device (what torch.optim accepts), checked where the group is made, not at step()."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            fail_value(op, arg, "a one-element floating tensor", f"shape {tuple(lr.shape)} "
                       f"{lr.dtype}")
        devices = {p.device for p in params or ()}
        if lr.device.type != "cpu" and devices and lr.device not in devices:
            fail_type(op, arg, f"a tensor on the CPU or on the parameters' device "
                      f"{sorted(map(str, devices))}", lr.device)
        value = float(lr.detach().cpu())
        if not (value >= 0.0 and value < float("inf")):
            fail_value(op, arg, "a finite number >= 0", value)
        return
    check_number(op, arg, lr, low=0.0)


class _Call:
    """One recorded call of a layer: its input X and output Z (an affine layer's flattened to
    rows, a Conv2d's (N, C, H, W)) with their version counters at record time; used once the
    backward pass has reached Z."""

    __slots__ = ("x", "z", "x_version", "z_version", "param_versions", "used", "grad")

    def __init__(self, x: Tensor, z: Tensor, params: tuple, keep_grad: bool = False):
        self.x, self.z, self.used = x, z, False
        self.x_version, self.z_version = x._version, z._version
        self.param_versions = tuple(p._version for p in params if p is not None)
        self.grad = [] if keep_grad else None  # G = dL/dZ, kept for a custom target rule

    def mark_used(self, grad: Tensor) -> None:
        """The hook on the tensor Z (it fires also when a later op modifies Z in place)."""
        self.used = True
        if self.grad is not None:
            self.grad.append(grad.detach().reshape(self.z.shape))


class LocoProp(torch.optim.Optimizer):
    """LocoProp for any model, in the standard loop; see the module docstring.

    Options as ``lk.LocoProp`` (docs/design.md §2, the official defaults) plus ``activations``
    ({layer name: activation}), ``output_activation`` (f of layers whose output is the
    model's output: "sigmoid" for BCE-with-logits, "softmax" for cross-entropy), ``exclude``
    (regex patterns of layer names sent to the linearized loss), ``other_lr`` (lr of
    param_groups[1], default ``lr``) and ``backend``. ``lr_floor`` and ``inner_steps`` apply to
    both groups. Custom local problems (docs/models.md): ``targets`` (a rule
    (z0, grad, f, gamma) -> Y, or {layer: rule}), ``eta`` as {layer: eta}, ``regularizer``
    ((param name, p, p0) -> gradient or None). ``nonfinite``: "apply" (torch's behaviour) or
    "skip" (a step with non-finite gradients or update changes nothing; ``skipped_steps``
    counts them). ``precision``: the matched-loss kernels' dots ("ieee", "tf32", "bf16";
    the Gram form's GEMMs stay in the parameters' precision). ``gram``: "auto" (the default), "always" or "never": whether layers with a
    quadratic local loss (f = identity) take the exact Gram form (``Quadratic``, ``uses_gram``;
    ``opt.layers[i].inner`` says which did). Every hyper-parameter is checked here and in ``add_param_group``; one
    optimizer per model; a step is applied whole or not at all (docs/guarantees.md).
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-5, variant: str = "M",
                 gamma: float = 10.0, inner_steps: int = 10, alpha: float = 0.9,
                 eps: float = 1e-5, momentum: float = 0.999, style: str = "tf",
                 lr_floor: float = 0.25, eta: Optional[float] = None, scale: float = 1.0,
                 activations: Optional[dict] = None, output_activation: Optional[str] = None,
                 exclude=(), other_lr: Optional[float] = None, backend: Optional[str] = None,
                 process_group=None, targets=None, regularizer: Optional[Callable] = None,
                 nonfinite: str = "apply", gram: str = "auto", precision: str = "ieee",
                 grouped: Optional[bool] = None, cuda_graph: bool = False):
        if not isinstance(model, nn.Module):
            fail_type(OP, "model", "an nn.Module", type(model).__name__)
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if ddp and process_group is None:
            process_group = model.process_group
        # Data parallel only when asked for (a group, or a DDP model): a process of an
        # initialised torch.distributed may well train a model of its own.
        self._dp = (DataParallel.for_group(process_group) if process_group is not None
                    else DataParallel(active=False))
        # How p.grad is combined over the replicas: DDP has averaged it already ("none");
        # without DDP each replica's gradient of its mean loss is averaged ("average", what
        # DDP would do); lk.LocoProp back-propagates each replica's share of the global mean,
        # so it sums ("sum").
        self._grad_reduction = "none" if ddp else "average"
        if ddp:
            model = model.module  # hooks on the wrapped modules, whose forward is called
        root = model
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(compiled, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = compiled  # torch.compile's wrapper: names and hooks on the real modules
        # Everything a param group holds, checked as add_param_group checks it (and before
        # anything below touches the model: detaching an older optimizer included).
        layer_eta = eta if isinstance(eta, dict) else {}
        if isinstance(eta, dict):
            eta = None
            for name, value in layer_eta.items():
                check_number(OP, f"eta[{name!r}]", value, low=0.0, low_open=True)
        self.rmsprop = RMSpropOptions(style=style, alpha=alpha, eps=eps, momentum=momentum)
        self.config = _check_group(dict(
            lr=lr, variant=variant, gamma=gamma, inner_steps=inner_steps, lr_floor=lr_floor,
            eta=eta, scale=scale, backend=backend, precision=precision,
            **dataclasses.asdict(self.rmsprop)),
            list(model.parameters()))
        if regularizer is not None and not callable(regularizer):
            fail_type(OP, "regularizer", "a callable (name, p, p0) -> Tensor or None",
                      type(regularizer).__name__)
        check_choice(OP, "nonfinite", nonfinite, NONFINITE)
        check_choice(OP, "gram", gram, GRAM)
        if other_lr is not None:
            _check_lr(OP, "other_lr", other_lr, list(model.parameters()))

        self.model = model
        try:
            modules = find_layers(model, exclude)
        except re.error as e:
            fail_value(OP, "exclude", "regular expressions (re.search patterns)",
                       f"{e.pattern!r}: {e}")
        previous = {id(o): o for o in (_owner(m) for _, m in modules) if o is not None}
        for old in previous.values():
            # One optimizer per model: both would record every forward, and one would step on
            # records taken before the other moved the weights. The newest wins (re-running
            # `opt = LocoProp(model)` in a notebook must work); the old one is detached and
            # refuses to step.
            old.remove_hooks()
            old._superseded = True
            warnings.warn(f"locoprop.{OP}: the model already had an lk.optim.LocoProp; it is "
                          f"detached from the model now (its step() raises)", RuntimeWarning,
                          stacklevel=2)
        self.layers = decide_activations(model, modules, activations, output_activation)
        matched = [(m, info) for (_, m), info in zip(modules, self.layers)
                   if info.loss == "matched"]
        self._modules = [m for m, _ in matched]
        self._infos = [info for _, info in matched]
        matched_params = []
        for m in self._modules:
            for p in layer_params(m):
                if p is not None and p.requires_grad and all(p is not q for q in matched_params):
                    matched_params.append(p)
        others = [p for p in model.parameters()
                  if p.requires_grad and all(p is not q for q in matched_params)]
        groups = [dict(params=matched_params, lr=lr, kind="locoprop")]
        if others:
            groups.append(dict(params=others, lr=lr if other_lr is None else other_lr,
                               kind="linearized"))
        if not matched_params:
            groups = groups[1:]
        if not groups:
            fail_value(OP, "model", "at least one trainable parameter", "none")
        defaults = dict(lr=lr, variant=variant, gamma=float(gamma), inner_steps=inner_steps,
                        lr_floor=float(lr_floor), eta=None if eta is None else float(eta),
                        scale=float(scale), backend=backend, precision=precision,
                        **dataclasses.asdict(self.rmsprop))
        super().__init__(groups, defaults)
        names = {m: info.name for m, info in zip(self._modules, self._infos)}
        self._targets = _per_layer(OP, "targets", targets, names, callable, "a callable "
                                   "(z0, grad, f, gamma) -> Y")
        if self._targets and self._dp.active:
            fail_value(OP, "targets", "None under data parallel (a custom target's constant "
                       "term is not all-reduced yet)", "a target rule")
        self._layer_eta = _per_layer(OP, "eta", layer_eta or None, names,
                                     lambda v: True, "a number > 0")
        self._regularizer = regularizer
        self._param_names = {p: n for n, p in model.named_parameters()}
        self._names = names
        # (weight, bias) of each layer, read once: the forward hook runs on every layer call.
        self._params_of = {m: layer_params(m) for m in self._modules}
        self._records = {m: [] for m in self._modules}
        self.nonfinite = nonfinite
        self.gram = gram
        for name, value, allowed in (("grouped", grouped, (None, True, False)),
                                     ("cuda_graph", cuda_graph, (True, False))):
            if not any(value is a for a in allowed):
                fail_type(OP, name, " or ".join(map(repr, allowed)), repr(value))
        self.grouped, self.cuda_graph = grouped, cuda_graph
        self.strategy = None  # "grouped" or "per-layer (why)" after a step
        self._grouped_cache: dict = {}
        self._layout: Optional[StepLayout] = None  # the per-layer strategy's, while it fits
        self._last_grads = None
        self._layer_index = {info.name: i for i, info in enumerate(self.layers)}
        self._module_index = {m: j for j, m in enumerate(self._modules)}
        self.skipped_steps = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        self._had_records = False  # the last step had recorded layer calls
        self._superseded = False  # a newer LocoProp on the same model detached this one
        for m in self._modules:
            _OWNERS[m] = weakref.ref(self)
        self._hooks = [m.register_forward_hook(_Hook(self, "_record")) for m in self._modules]
        # Activation detection from the first forward passes (detection.py): hooks on the
        # model the user calls (torch.compile's wrapper included).
        self._explicit = set(activations or {})
        self._output_activation = output_activation
        self._detector = Detector(model, {m: features(m) for m in self._modules})
        self._detection_passes = DETECTION_PASSES
        self._compiled = model if root is not model else None
        self._pass = None
        self._recording = True
        if self._modules:
            self._hooks.append(root.register_forward_pre_hook(_Hook(self, "_detect_before"),
                                                              with_kwargs=True))
            self._hooks.append(root.register_forward_hook(_Hook(self, "_detect_after"),
                                                          always_call=True))
        # The hooks hold the optimizer weakly; once it is collected, they go too.
        weakref.finalize(self, _remove_hooks, self._hooks, list(self._modules))

    # ------------------------------------------------------------------ recording

    def _record(self, module: nn.Module, inputs: tuple, output: Tensor):
        if not (self._recording and torch.is_grad_enabled() and isinstance(output, Tensor)
                and output.requires_grad):
            return None  # evaluation: nothing will come back, record nothing
        x, z = inputs[0].detach(), output.detach()
        params = self._params_of[module]
        if isinstance(module, nn.Conv2d):
            if x.dim() == 3:  # an unbatched (C, H, W) call: one image
                x, z = x.unsqueeze(0), z.unsqueeze(0)
            call = _Call(x, z, params, module in self._targets)
        else:
            call = _Call(x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1]), params,
                         module in self._targets)
        if call.x.shape[0] == 0:
            return None  # no rows (an expert that got no tokens): nothing to learn from
        calls = self._records[module]
        if calls and params[0].grad is None:
            # Someone else cleared the gradients (another optimizer's zero_grad, the model's):
            # the used calls' share of them is gone, so they go too.
            calls[:] = [c for c in calls if not c.used]
        calls.append(call)
        output.register_hook(call.mark_used)
        return None

    # ------------------------------------------------------------------ detection

    def _detect_before(self, root, args, kwargs):
        """Before a forward of the model: observe it (an eager model), or observe one eager
        call of the original module of a compiled one, whose own forward runs inside compiled
        graphs (RNG state restored after it, nothing recorded)."""
        if not (torch.is_grad_enabled() and self._detector.pending
                and self._detection_passes > 0 and self._pass is None):
            return None
        self._detection_passes -= 1
        if self._compiled is None:
            self._pass = self._detector.start()
            return None
        run = self._detector.start()
        self._recording = False
        outputs = None
        try:
            with torch.random.fork_rng(devices=_devices(self._compiled)):
                outputs = self._compiled(*args, **kwargs)
        finally:
            self._recording = True
            self._detector.finish(run, outputs)
            del outputs
            self._apply_decisions()
        return None

    def _detect_after(self, root, args, output):
        run, self._pass = self._pass, None
        if run is not None:
            self._detector.finish(run, output)
            self._apply_decisions()
        return None

    def _apply_decisions(self) -> None:
        decisions = self._detector.decisions
        by_name = {info.name: m for m, info in zip(self._modules, self._infos)}
        self.layers = [observed(info, decisions[by_name[info.name]],
                                info.name in self._explicit, self._output_activation)
                       if by_name.get(info.name) in decisions else info
                       for info in self.layers]
        infos = {info.name: info for info in self.layers}
        self._infos = [infos[info.name] for info in self._infos]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; the records whose gradient it clears go with it. Calls the backward
        pass has not reached yet stay: Lightning's loop runs the forward, then zero_grad, then
        the backward."""
        super().zero_grad(set_to_none=set_to_none)
        for calls in self._records.values():
            calls[:] = [c for c in calls if not c.used]

    def _clear_records(self) -> None:
        for calls in self._records.values():
            calls.clear()

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its forward runs without recording after)."""
        _remove_hooks(self._hooks, self._modules)
        self._clear_records()

    # ------------------------------------------------------------------ torch.optim API

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, with every hyper-parameter checked before the group is
        added (lr >= 0 finite or a one-element tensor on the params' device, alpha in [0, 1],
        eps >= 0, momentum >= 0, style, inner_steps >= 1, lr_floor in [0, 1], gamma > 0)."""
        params = param_group.get("params")
        params = [params] if isinstance(params, Tensor) else list(params or ())
        _check_group({**self.defaults, **param_group}, params)
        super().add_param_group(param_group)
        self._layout = None  # the per-layer strategy's buffers and segments are rebuilt

    def __deepcopy__(self, memo):
        raise TypeError(
            f"locoprop.{OP} cannot be deep-copied: it is bound to its model's modules through "
            f"forward hooks. Copy the model, make a new optimizer on the copy and "
            f"load_state_dict(opt.state_dict()) into it")

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"locoprop.{OP} cannot be pickled (it holds forward hooks on its model): pickle "
            f"opt.state_dict() instead (torch.save works, torch.load(weights_only=True) too)")

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One outer LocoProp step from the gradients and records of the last backward pass(es);
        returns ``closure()``'s loss when a closure is given."""
        if self._superseded:
            raise RuntimeError(f"locoprop.{OP}.step(): this optimizer was detached from its "
                               f"model by a newer lk.optim.LocoProp on the same model; step "
                               f"that one")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            # The local problems are solved in the parameters' precision: a step called inside
            # a torch.autocast region must not run its GEMMs in bf16.
            with contextlib.ExitStack() as no_autocast:
                for device_type in {p.device.type for g in self.param_groups
                                    for p in g["params"]}:
                    no_autocast.enter_context(torch.autocast(device_type, enabled=False))
                self._outer_step()
        finally:
            self._clear_records()
        return loss

    def _params_with_grad(self) -> list:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _prepare(self, params: list, constant: Optional[FlatGrads] = None):
        """(layer problems, C = s gamma p.grad in a flat buffer, global under data parallel)
        for ``params`` (those with a gradient), into ``constant`` when given (the layout's)."""
        g0 = self.param_groups[0]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("locoprop.optim.LocoProp: sparse gradients are not supported")
        if constant is None:
            constant = FlatGrads(params)
        if params:
            torch._foreach_copy_(constant.views, grads)
        if self._dp.active and self._grad_reduction != "none":
            constant.all_reduce_(self._dp, average=self._grad_reduction == "average")
        constant.mul_(g0["scale"] * g0["gamma"])
        problems = self._layer_problems()
        self._add_target_terms(problems, constant)
        return problems, constant

    def _step_layout(self, params: list) -> StepLayout:
        """The layout of this step's parameters with a gradient: the cached one while it
        fits (``per_layer_step.StepLayout.fits``), else a new one."""
        groups = self.param_groups
        with_anchors = groups[0]["eta"] is not None
        layout = self._layout
        if layout is None or not layout.fits(params, groups, self.state, with_anchors):
            layout = self._layout = StepLayout(params, groups, with_anchors=with_anchors)
        return layout

    def _add_target_terms(self, problems: list, constant: FlatGrads) -> None:
        """A custom target rule Y = rule(Z0, G, f, gamma) of a layer: its local gradient
        s (f(Z) - Y)^T X + s gamma R (R: the uses of W the hooks do not see) is the usual
        s (f(Z) - f(Z0))^T X + s gamma p.grad plus the constant s (f(Z0) - Y - gamma G)^T X,
        which is the matched-loss gradient at W0 with the target Y + gamma G: added to C once
        per step, so the T inner iterations are unchanged."""
        g0 = self.param_groups[0]
        gamma, scale = g0["gamma"], g0["scale"]
        for problem in problems:
            rule = self._targets.get(problem.layer)
            if rule is None:
                continue
            act = get_activation(problem.activation).f
            f = act if problem.conv is None else (lambda z, act=act: _over_channels(act, z))
            y = rule(problem.z0, problem.g, f, gamma)
            name = self._names[problem.layer]
            if not isinstance(y, Tensor) or y.shape != problem.z0.shape:
                fail_value(OP, f"targets[{name!r}]", f"a tensor of Z0's shape "
                           f"{tuple(problem.z0.shape)}",
                           tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__)
            target = (y.to(problem.z0.dtype) + gamma * problem.g)
            if problem.conv is not None:
                target = target.contiguous(memory_format=torch.channels_last)
            self._add_matched_loss_grad(problem, scale, constant, target=target)

    def _matched_loss_grads(self, problems, grads: FlatGrads, params=(), anchors=(),
                            eta: Optional[float] = None) -> None:
        """grads <- sum over every layer use of its matched-loss gradient (this rank's
        records), + (p - p0) / eta for every parameter with eta."""
        grads.zero_()
        scale = self.param_groups[0]["scale"]
        for problem in problems:
            self._add_matched_loss_grad(problem, scale, grads)
        if eta is not None:
            for p, p0 in zip(params, anchors):
                grads[p].add_(p.detach() - p0, alpha=1.0 / eta)

    def _regularization(self, params: list, constant: FlatGrads):
        """The per-layer prox terms (``eta={layer: eta}``) and the ``regularizer``: None without
        them, else a function adding their gradients at the current parameters, minus the
        regularizer's at p0, to the local gradients of iterations t >= 1; the regularizer's
        gradient at p0 goes into C (t = 0 takes C alone), so every iteration gets it exactly.
        Under data parallel each replica adds 1/world_size of them (the sum is all-reduced)."""
        if not self._layer_eta and self._regularizer is None:
            return None
        share = 1.0 / self._dp.world_size if self._dp.active else 1.0
        prox = [(p, 1.0 / eta) for m, eta in self._layer_eta.items()
                for p in layer_params(m) if p is not None and p in constant]
        regularized = []
        if self._regularizer is not None:
            for p in params:
                p0 = p.detach().clone()
                g0 = self._regularizer(self._param_names.get(p, ""), p.detach(), p0)
                if g0 is not None:
                    if not isinstance(g0, Tensor) or g0.shape != p.shape:
                        fail_value(OP, "regularizer", f"None or a tensor of the parameter's "
                                   f"shape {tuple(p.shape)} for {self._param_names.get(p)!r}",
                                   type(g0).__name__ if not isinstance(g0, Tensor)
                                   else tuple(g0.shape))
                    constant[p].add_(g0)
                    regularized.append((p, p0, g0))
        anchors = {p: p.detach().clone() for p, _ in prox}

        def add(grads: FlatGrads) -> None:
            for p, inv_eta in prox:
                grads[p].add_(p.detach() - anchors[p], alpha=inv_eta * share)
            for p, p0, g0 in regularized:
                g = self._regularizer(self._param_names.get(p, ""), p.detach(), p0)
                grads[p].add_(g - g0, alpha=share)

        return add

    @torch.no_grad()
    def local_gradients(self, at: Optional[dict] = None) -> dict:
        """{parameter: its local gradient} from the current records and gradients (the
        formula of inner iterations t >= 1, without the prox term): a diagnostic. The local
        problems are those of the current parameters (W0); the gradient is taken at W0, or at
        ``at`` = {parameter: value} for the parameters it names (the others at W0; the model
        is left as it was). At W0 every entry is s gamma p.grad."""
        params = self._params_with_grad()
        problems, constant = self._prepare(params)
        self._take_gram(problems)
        grads = FlatGrads(params)
        saved = {p: p.detach().clone() for p in (at or {})}
        try:
            # Through .data: a diagnostic must not bump the version counters that tell the
            # records whether the weights changed since the forward.
            for p, value in (at or {}).items():
                p.data.copy_(value)
            self._matched_loss_grads(problems, grads)
        finally:
            for p, value in saved.items():
                p.data.copy_(value)
        grads.all_reduce_(self._dp)
        return {p: grads[p] + constant[p] for p in params}

    def _outer_step(self) -> None:
        """T inner iterations through the shared ``InnerLoop`` (t = 0 is the constant alone),
        as one transaction: if anything raises during them (or, with ``nonfinite="skip"``, the
        update is not finite), the parameters, their state and the step counts are put back
        as they were."""
        params = self._params_with_grad()
        if not params:
            self._prepare(params)  # its checks, and the records' custom targets
            return
        layout = self._step_layout(params)
        problems, constant = self._prepare(params, layout.constant)
        had_records, self._had_records = self._had_records, bool(problems)
        if had_records and not problems:
            warnings.warn(f"locoprop.{OP}.step(): no recorded layer call reached by a backward "
                          f"pass since the last step (a second step() after one backward?): "
                          f"every parameter takes the linearized local loss only",
                          RuntimeWarning, stacklevel=4)
        if self.nonfinite == "skip" and not _all_finite(constant.buffers):
            self._skip("gradients")
            return
        # The state (created where missing, now that every check has passed) and the backup.
        backup = layout.bind(self.param_groups, self.state)
        grouped = self._grouped_loop(layout, params, problems)
        if grouped is None:
            self._take_gram(problems)
        backup.save()
        try:
            if grouped is not None:
                self._run_grouped(grouped, layout, problems)
            else:
                self._run_per_layer(layout, params, problems, constant)
        except BaseException:
            backup.restore(self.state)
            raise
        if self.nonfinite == "skip" and not _all_finite(params):
            backup.restore(self.state)
            self._skip("local gradients")
            return
        backup.committed()
        # One outer step: the state's step count, as torch.optim keeps it.
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)

    def _run_per_layer(self, layout: StepLayout, params: list, problems: list,
                       constant: FlatGrads) -> None:
        """The per-layer strategy: one matched-loss op (or Gram form) per layer per inner
        iteration, one RMSProp launch per segment; buffers and segments from ``layout``."""
        g0 = self.param_groups[0]
        eta = g0["eta"]
        layout.per_layer(self.param_groups, self.state)
        grads, anchors = layout.grads, layout.anchors
        extra = self._regularization(params, constant)

        def matched(local_eta):
            self._matched_loss_grads(problems, grads, params, anchors, local_eta)
            if extra is not None:
                extra(grads)

        loop = InnerLoop(matched, grads.buffers, layout.segments(self.param_groups),
                         inner_steps=g0["inner_steps"], lr_floor=g0["lr_floor"], eta=eta,
                         prox_centre=(None if eta is None
                                      else (anchors, layout.backup.params)),
                         constant=constant.buffers, dp=self._dp, checked=layout.checked)
        loop.run()
        layout.checked = True  # the same tensors from now on: t = 0 need not check them again
        # The last inner iteration's local gradients (one flat buffer per dtype): lk.LocoProp's
        # ``grads``.
        self._last_grads = grads.buffers

    def _grouped_loop(self, layout: StepLayout, params: list,
                      problems: list) -> Optional[GroupedLoop]:
        """The cached ``GroupedLoop`` for this step's records when the grouped strategy applies
        (``optim/grouped_step.py``), else None; ``self.strategy`` says which and why."""
        reason = self._grouped_refusal(params, problems)
        if reason is not None:
            self.strategy = f"per-layer ({reason})"
            return None
        g0 = self.param_groups[0]
        options = RMSpropOptions.from_group(g0)
        specs = [LayerSpec(pr.x.shape[1], pr.y.shape[1], pr.activation,
                           layer_params(pr.layer)[1] is not None) for pr in problems]
        gram = tuple(self._take_gram(problems, build=False))  # the per-layer rule, per layer
        first = params[0]
        buffers = self._grouped_views(layout, params, options).buffers
        precision = g0.get("precision", "ieee")  # older checkpoints: no precision
        # The delta form exactly where the per-layer strategy takes it (``_layer_problems``).
        anchored = precision != "ieee"
        key = (tuple(specs), gram, anchored, problems[0].x.shape[0], first.device, first.dtype,
               options, g0["inner_steps"], g0["lr_floor"], g0["scale"], g0["eta"],
               g0["backend"], precision,
               None if buffers is None else tuple(b.data_ptr() for b in buffers))
        loop = self._grouped_cache.get(key)
        if loop is None:
            self._grouped_cache.clear()  # one shape at a time: a new shape replaces the last
            loop = self._grouped_cache[key] = GroupedLoop(
                specs, problems[0].x.shape[0], device=first.device, dtype=first.dtype,
                backend=g0["backend"], precision=precision,
                options=options, inner_steps=g0["inner_steps"], lr=float(g0["lr"]),
                lr_floor=g0["lr_floor"], scale=g0["scale"], eta=g0["eta"],
                cuda_graph=self.cuda_graph, buffers=buffers, gram=gram, anchored=anchored)
        self.strategy = "grouped"
        return loop

    def _grouped_refusal(self, params: list, problems: list) -> Optional[str]:
        """Why this step cannot take the grouped strategy (None: it can)."""
        if self.grouped is False:
            return "grouped=False"
        if not problems:
            return "no recorded layer"
        if self.grouped is None:
            be = backends.resolve(OP, self.param_groups[0]["backend"], params[0].device,
                                  params[0].dtype)
            if not be.prefers_grouped(params[0].device):
                return f"the {be.name} backend runs layer by layer here"
        if self._dp.active:
            return "data parallel"
        if self._targets or self._layer_eta or self._regularizer is not None:
            return "custom targets, per-layer eta or a regularizer"
        if len(self.param_groups) != 1:
            return "more than one param group"
        layout = []
        rows = problems[0].x.shape[0]
        for problem in problems:
            m = problem.layer
            if problem.conv is not None or stores_in_out(m) or not isinstance(m, nn.Linear):
                return f"{self._names[m]} is not an nn.Linear"
            if not get_activation(problem.activation).builtin:
                return f"{self._names[m]} has a registered activation"
            if problem.x.shape[0] != rows:
                return "layers with different row counts"
            layout.extend(p for p in layer_params(m) if p is not None)
        if len(layout) != len(params) or any(a is not b for a, b in zip(layout, params)):
            return "the parameters with a gradient are not exactly the layers' (W, b)"
        if len({p.dtype for p in params}) != 1 or params[0].dtype not in (torch.float32,
                                                                          torch.float64):
            return "parameters not all fp32 or all fp64"
        if len({p.device for p in params}) != 1:
            return "parameters on several devices"
        return None

    def _grouped_views(self, layout: StepLayout, params: list,
                       options: RMSpropOptions) -> "_GroupedViews":
        """The grouped strategy's per-parameter lists and flat buffers of this layout, made on
        its first grouped step (the layout is kept only while they stay valid)."""
        views = layout.grouped
        if views is None:
            states = [self.state[p] for p in params]  # made by layout.bind
            square_avgs = [st["square_avg"] for st in states]
            momentum_bufs = ([st["momentum_buffer"] for st in states]
                             if options.has_momentum else None)
            # lk.LocoProp hands its parameter and state arenas: the step runs on them, no copy.
            buffers = (flat_view([p.detach() for p in params]), flat_view(square_avgs),
                       flat_view(momentum_bufs) if momentum_bufs is not None else None)
            if buffers[0] is None or buffers[1] is None or (momentum_bufs is not None
                                                            and buffers[2] is None):
                buffers = None
            elif buffers[2] is None:
                buffers = (buffers[0], buffers[1], torch.empty_like(buffers[0]))
            views = layout.grouped = _GroupedViews(
                buffers, square_avgs, momentum_bufs, [layout.constant[p] for p in params])
        return views

    def _run_grouped(self, loop: GroupedLoop, layout: StepLayout, problems: list) -> None:
        views = layout.grouped  # made by _grouped_loop
        loop.run(problems, layout.params, views.square_avgs, views.momentum_bufs,
                 views.constant, float(self.param_groups[0]["lr"]))
        self._last_grads = loop.loop.grad_buffers

    def _skip(self, what: str) -> None:
        self.skipped_steps += 1
        warnings.warn(f"locoprop.{OP}.step(): non-finite {what}: step skipped, nothing changed "
                      f"({self.skipped_steps} skipped so far; nonfinite='skip')",
                      RuntimeWarning, stacklevel=4)

    def _layer_problems(self) -> list:
        """[_Problem] for every layer with used calls: all calls' X stacked, Y0 = f(Z0)
        (variant S: Z0, the local f identity). An affine layer's rows are stacked; a Conv2d's
        calls along N, one problem per input size (H, W) when calls differ in it, X and Y0
        made channels-last once here (the compiled backends' layout, so the T - 1 inner
        iterations copy neither) and f applied over the channels. Each call's X and Z0 are
        what the layer computed (``_true_record``). At precision "tf32"/"bf16" each problem
        also gets the delta form's anchors (W0, b0: ``_add_matched_loss_grad``), copied here,
        where the weights are still those Z0 was recorded with; its Z0 is ``z0`` (a Conv2d's
        channels-last, as its targets)."""
        variant = Variant(self.param_groups[0]["variant"])
        takes_delta_form = self.param_groups[0].get("precision", "ieee") != "ieee"

        def anchors(m, dtype):
            return tuple(None if p is None else p.detach().to(dtype, copy=True)
                         for p in layer_params(m))

        problems = []
        for m, info in zip(self._modules, self._infos):
            weight, _ = layer_params(m)
            calls = [c for c in self._records[m] if c.used]
            if not calls or weight.grad is None:
                continue
            act = variant.local_activation(info.activation)
            f = get_activation(act).f
            records = [_true_record(m, info.name, c, state_dtype(weight)) for c in calls]
            grads = ([sum(c.grad).to(state_dtype(weight)) for c in calls]
                     if m in self._targets else None)
            if not isinstance(m, nn.Conv2d):
                X, Z = _stack([x for x, _ in records]), _stack([z for _, z in records])
                problems.append(_Problem(m, X, Z if variant is Variant.S else f(Z), act, z0=Z,
                                         g=None if grads is None else _stack(grads)))
                if takes_delta_form:
                    problems[-1].anchors = anchors(m, X.dtype)
                continue
            geometry, extra = conv_geometry(m)
            by_size: dict = {}
            for i, (x, z) in enumerate(records):
                by_size.setdefault(tuple(x.shape[1:]), []).append(
                    (x, z, None if grads is None else grads[i]))
            last = torch.channels_last
            for same in by_size.values():
                X = _stack([x for x, _, _ in same])
                if extra is not None:  # "same" padding with an even dilated kernel
                    X = nn.functional.pad(X, (0, extra[0], 0, extra[1]))
                X = X.contiguous(memory_format=last)
                Z = _stack([z for _, z, _ in same]).contiguous(memory_format=last)
                Y = Z if variant is Variant.S else _over_channels(f, Z)
                G = None if grads is None else _stack([g for _, _, g in same]).contiguous(
                    memory_format=last)
                problems.append(_Problem(m, X, Y.contiguous(memory_format=last), act,
                                         geometry, z0=Z, g=G))
                if takes_delta_form:  # one copy per problem: they are few, and W0 is small
                    problems[-1].anchors = anchors(m, X.dtype)
        return problems

    def _take_gram(self, problems: list, build: bool = True) -> list:
        """Each problem's choice of the Gram form (``uses_gram``, ``gram=``), one rule for both
        strategies, recorded in ``opt.layers[i].inner`` and returned (a bool per problem); with
        ``build`` (the per-layer strategy) its ``Quadratic`` is made (the grouped one keeps its
        Gram terms in its group)."""
        steps = self.param_groups[0]["inner_steps"]
        flags = []
        for problem in problems:
            x = problem.x
            gram = (problem.conv is None and problem.activation == "identity"
                    and (self.gram == "always" or (self.gram == "auto" and uses_gram(
                        x.shape[0], x.shape[1], problem.y.shape[1], steps))))
            if gram and build:
                problem.quadratic = Quadratic(problem.layer, x)
            self._set_inner(problem.layer, "gram" if gram else "matched")
            flags.append(bool(gram))
        return flags

    def _set_inner(self, module: nn.Module, inner: str) -> None:
        """Record in ``opt.layers`` how this step forms the layer's inner gradient."""
        j = self._module_index[module]
        info = self._infos[j]
        if info.inner != inner:
            new = dataclasses.replace(info, inner=inner)
            self.layers[self._layer_index[info.name]] = new
            self._infos[j] = new

    def _add_matched_loss_grad(self, problem: "_Problem", scale: float, grads,
                               target: Optional[Tensor] = None) -> None:
        """grads[W], grads[b] += the layer's matched-loss gradient at the current weights, with
        the problem's target f(Z0) (or ``target``, once). With f(Z0) the op is checked at its
        first call of the step and repeated after (``RepeatedOp``).

        At precision "tf32"/"bf16" the op of a Linear or Conv2d layer takes the delta form
        (``anchor_preact`` = the recorded Z0, anchors = the step's starting W0, b0, kept per
        problem by ``_layer_problems``): rounding W = W0 + dW to tf32/bf16 would swamp the
        small inner update's X dW^T, or conv2d(X, dW) (docs/design.md section 4,
        ``precision``). "ieee" and the Gram form are as before."""
        m = problem.layer
        w, b = layer_params(m)
        if problem.quadratic is not None and target is None:
            problem.quadratic.add_grad_(grads, scale)
            return
        in_out = problem.conv is None and stores_in_out(m)
        anchored = problem.anchors is not None
        if target is None:
            op = problem.repeated
            if op is None:
                g0 = self.param_groups[0]
                op = problem.repeated = RepeatedOp(
                    problem.x, w, b, problem.y, problem.activation, dtype=problem.x.dtype,
                    in_out=in_out, conv2d=problem.conv, scale=scale, backend=g0["backend"],
                    precision=g0.get("precision", "ieee"),  # older checkpoints: no precision
                    anchor_preact=problem.z0 if anchored else None, anchors=problem.anchors)
            else:
                op.again()
            gw, gb = op.grad_weight, op.grad_bias
            grads[w].add_(gw.t() if in_out else gw)
            if b is not None and b in grads:
                grads[b].add_(gb)
            return
        # In the records' compute dtype (``_true_record``): a copy only for half parameters.
        dtype = problem.x.dtype
        weight = w.detach().to(dtype)
        weight = weight.t() if in_out else weight
        args = (problem.x, weight, None if b is None else b.detach().to(dtype),
                problem.y if target is None else target, problem.activation)
        g0 = self.param_groups[0]
        backend, precision = g0["backend"], g0.get("precision", "ieee")  # older checkpoints
        delta_form = {}
        if anchored:
            w0, b0 = problem.anchors
            delta_form = dict(anchor_preact=problem.z0, anchor_weight=w0.t() if in_out else w0,
                              anchor_bias=b0)
        if problem.conv is None:
            gw, gb = matched_loss_grad(*args, scale=scale, backend=backend, precision=precision,
                                       **delta_form)
        else:
            gw, gb = matched_loss_grad_conv2d(*args, scale=scale, backend=backend,
                                              precision=precision, **problem.conv,
                                              **delta_form)
        grads[w].add_(gw.t() if in_out else gw)
        if b is not None and b in grads:
            grads[b].add_(gb)

    # ------------------------------------------------------------------ state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, after checking every per-parameter state tensor against
        its parameter (shape; dtype: the state dtype, fp32 for half parameters; a 0-d step),
        so that another model's state is refused with nothing changed. Stricter than torch,
        which loads a state of the same parameter count and fails later at step()."""
        ours = [p for g in self.param_groups for p in g["params"]]
        saved = state_dict.get("param_groups", [])
        ids = [i for g in saved for i in g.get("params", [])]
        if len(saved) != len(self.param_groups) or len(ids) != len(ours):
            fail_value(OP, "state_dict", f"{len(self.param_groups)} param groups of "
                       f"{[len(g['params']) for g in self.param_groups]} parameters (this "
                       f"optimizer's)", f"{len(saved)} groups of "
                       f"{[len(g.get('params', [])) for g in saved]}")
        by_id = dict(zip(ids, ours))
        for key, st in state_dict.get("state", {}).items():
            p = by_id.get(key)
            if p is None:
                fail_value(OP, "state_dict", "state only for its param_groups' ids",
                           f"state for id {key!r}")
            for name, t in st.items():
                if not isinstance(t, Tensor):
                    continue
                if name == "step":
                    if t.numel() != 1:
                        fail_value(OP, f"state_dict['state'][{key}]['step']", "a 0-d tensor",
                                   tuple(t.shape))
                    continue
                if tuple(t.shape) != tuple(p.shape) or t.dtype != state_dtype(p):
                    fail_value(OP, f"state_dict['state'][{key}][{name!r}]",
                               f"shape {tuple(p.shape)} and dtype {state_dtype(p)} (its "
                               f"parameter's)", f"shape {tuple(t.shape)}, {t.dtype}")
                if name == "square_avg" and bool((t < 0).any()):
                    fail_value(OP, f"state_dict['state'][{key}]['square_avg']",
                               "non-negative square averages", "negative entries")
        super().load_state_dict(state_dict)
        self._layout = None  # new state tensors: the per-layer layout is rebuilt

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._layout = None
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


@dataclasses.dataclass
class _GroupedViews:
    """What the grouped strategy reads of a ``StepLayout``: the flat parameter / square-average /
    momentum buffers the parameters and state are consecutive views of (None: they are not, the
    loop copies), the state lists and C's per-parameter views."""

    buffers: Optional[tuple]
    square_avgs: list
    momentum_bufs: Optional[list]
    constant: list


class _Problem:
    """One layer's local problem of a step: the module, its stacked inputs X, targets Y0,
    local activation and, for a Conv2d, its geometry (``layers.conv_geometry``); Z0 and, for a
    layer with a custom target rule, G = dL/dZ of its calls, stacked the same way."""

    __slots__ = ("layer", "x", "y", "activation", "conv", "z0", "g", "quadratic", "repeated",
                 "anchors")

    def __init__(self, layer: nn.Module, x: Tensor, y: Tensor, activation: str,
                 conv: Optional[dict] = None, z0: Optional[Tensor] = None,
                 g: Optional[Tensor] = None):
        self.layer, self.x, self.y, self.activation, self.conv = layer, x, y, activation, conv
        self.z0, self.g = z0, g
        self.quadratic: Optional[Quadratic] = None  # the Gram form, where it is taken
        self.repeated: Optional[RepeatedOp] = None  # its matched-loss op, once checked
        # (W0, b0) at tf32/bf16, for the delta form (``_add_matched_loss_grad``); else None.
        self.anchors: Optional[tuple] = None


def _per_layer(op: str, arg: str, value, names: dict, check, expected: str) -> dict:
    """{module: value} from one value for every LocoProp layer or {layer name: value}; the
    names must be LocoProp layers (``names``: module -> name), the values pass ``check``."""
    if value is None:
        return {}
    by_name = {n: m for m, n in names.items()}
    if not isinstance(value, dict):
        value = {n: value for n in by_name}
    out = {}
    for name, v in value.items():
        if name not in by_name:
            fail_value(op, arg, f"names of LocoProp layers (one of {sorted(by_name)})",
                       repr(name))
        if not check(v):
            fail_type(op, f"{arg}[{name!r}]", expected, type(v).__name__)
        out[by_name[name]] = v
    return out


def _true_record(module: nn.Module, name: str, call: _Call, dtype: torch.dtype) -> tuple:
    """(X, Z0) of one call as the layer computed them, in ``dtype`` (the state dtype: fp32
    for fp32 and half parameters).

    - X modified in place after the call (its version counter moved): autograd refuses that
      before the backward (the layer saved X for dL/dW), so it happened between the backward
      and ``step()``: a RuntimeError, since X as the layer saw it is gone.
    - Z modified in place (an ``nn.ReLU(inplace=True)`` after the layer): Z0 is recomputed
      from X and the weights, which have not moved since the forward. The common case, an
      unmodified Z, costs nothing.
    - A record in another dtype than ``dtype`` (bf16/fp16 under ``torch.autocast``, or a model
      cast to half, whose state and local gradients are fp32): X is converted once per step
      and Z0 recomputed in ``dtype`` from it, so that the inner loop's Z(W), computed from the
      same X, equals Z0 at W0 (the half Z0 would differ from it by half rounding).
    """
    x, z = call.x, call.z
    if x._version != call.x_version:
        raise RuntimeError(
            f"locoprop.{OP}: the input of layer '{name}' was modified in place after its "
            f"forward (its version counter moved from {call.x_version} to {x._version}): the "
            f"local loss needs X as the layer saw it. Modify a copy (x.clone()) instead")
    x = x.to(dtype)
    if z._version != call.z_version or z.dtype != dtype:
        params = tuple(p for p in layer_params(module) if p is not None)
        if tuple(p._version for p in params) != call.param_versions:
            raise RuntimeError(
                f"locoprop.{OP}: layer '{name}': its output was modified in place (or recorded "
                f"in {z.dtype} under autocast), so Z0 is recomputed from X and the weights, "
                f"but the weights were changed in place after the forward: Z0 is lost. Step "
                f"before changing them")
        z = preactivation(module, x, dtype).reshape(z.shape)
    return x, z


def _all_finite(tensors) -> bool:
    """One host sync: whether every entry of every tensor is finite."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _devices(module: nn.Module) -> list:
    """The CUDA devices of a module's parameters (whose RNG ``fork_rng`` must save)."""
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def _stack(tensors: list) -> Tensor:
    """The calls' tensors concatenated along dim 0 (rows; a Conv2d's N): no copy for one."""
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _over_channels(f, z: Tensor) -> Tensor:
    """f (written for a vector on the last dim) applied to the channel vector (dim 1) of every
    position of z (N, C, H, W): the elementwise ones as they are, softmax over dim 1."""
    return f(z.movedim(1, -1)).movedim(-1, 1)


__all__ = ["LayerInfo", "LocoProp"]
