"""``lk.optim.LocoProp``: LocoProp on any model, as a ``torch.optim.Optimizer`` (DESIGN §9).

    opt = lk.optim.LocoProp(model, lr=1e-5, output_activation="sigmoid")
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # hooks record X, Z and G = dL/dZ of every layer call
        opt.step()                        # or opt.step(closure)

Layers (``optim/layers.py``): every trainable ``nn.Linear`` not excluded; ``opt.layers`` says
which f each one's local loss uses and why. A forward hook records each call of a layer made
while autograd records (X its input, Z its output, both flattened to rows), and an identity
hook on the tensor Z catches G = dL/dZ in the backward pass; calls whose G never comes
(evaluation under ``no_grad``, an output the loss does not use) cost nothing and count for
nothing. ``zero_grad()`` and ``step()`` clear the records.

One ``step()`` (T = ``inner_steps``, s = ``scale``, gamma, lr_t = lr max(1 - t/T, lr_floor)):

    per layer l (all its calls' rows stacked):  Y_l = f_l(Z_l) - gamma G_l   (S: Z_l - gamma G_l)
    every trainable parameter p with a gradient: p0 = p, and
      LocoProp layers' W, b (param_groups[0]):
        local_grad_t(p) = sum over the layer's uses of matched_loss_grad(X, W, b, Y, f) + C_p
        C_p = s gamma (p.grad - sum over the recorded calls of G^T X  (or G summed, for b))
            = s gamma R: the part of the backprop gradient the recorded calls do not produce
            (a tied embedding, a direct F.linear read); 0 up to rounding for a Linear used
            only through its forward
      every other parameter (param_groups[1], the linearized local loss):
        local_grad_t(p) = s gamma p.grad
      with eta: + (p - p0) / eta for every parameter
    t = 0: local_grad_0(p) = s gamma p.grad exactly (the matched-loss gradient at W0 is
           s gamma sum G^T X): no matched-loss GEMMs at all
    t = 0 .. T-1: ONE rmsprop_step_ over every parameter (per group when the groups' lr or
           options differ), TF1 or torch flavour, state in ``self.state`` (torch's format).

So at W0 the local gradient of every trainable parameter is s gamma times its backprop
gradient, and with T = 1 a step is one RMSProp step on s gamma p.grad. Parameters with
``requires_grad=False`` are never touched; a parameter shared by several modules is one
parameter (its local gradients add up).

Not yet: data parallel (``process_group``, a ``DistributedDataParallel`` model) and AMP's
``GradScaler`` are refused with an error rather than trained wrongly; Conv layers get the
linearized loss.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backends
from ..inner_loop import inner_lr_factors
from ..ops import VARIANTS, local_targets, matched_loss_grad, rmsprop_step_
from ..rmsprop_options import RMSpropOptions
from ..validation import check_choice, check_number, fail_type, fail_value
from .layers import OP, LayerInfo, decide_activations, find_layers

HALF_DTYPES = (torch.float16, torch.bfloat16)


class _Call:
    """One recorded call of a layer: rows of its input X and output Z, and G once known."""

    __slots__ = ("x", "z", "g")

    def __init__(self, x: Tensor, z: Tensor):
        self.x, self.z, self.g = x, z, None

    def catch(self, grad: Tensor) -> None:
        """The tensor hook on Z: dL/dZ (of Z as the layer returned it, also when a later op
        modifies Z in place). A second backward through the same graph adds up."""
        g = grad.detach().reshape(-1, grad.shape[-1])
        self.g = g if self.g is None else self.g + g


class LocoProp(torch.optim.Optimizer):
    """LocoProp for any model, in the standard loop; see the module docstring.

    Options as ``lk.LocoProp`` (DESIGN §2, the official defaults) plus ``activations``
    ({layer name: activation}), ``output_activation`` (f of layers whose output is the
    model's output: "sigmoid" for BCE-with-logits, "softmax" for cross-entropy), ``exclude``
    (regex patterns of Linear names sent to the linearized loss), ``other_lr`` (lr of
    param_groups[1], default ``lr``) and ``backend``. ``lr_floor`` and ``inner_steps`` apply to
    both groups.
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-5, variant: str = "M",
                 gamma: float = 10.0, inner_steps: int = 10, alpha: float = 0.9,
                 eps: float = 1e-5, momentum: float = 0.999, style: str = "tf",
                 lr_floor: float = 0.25, eta: Optional[float] = None, scale: float = 1.0,
                 activations: Optional[dict] = None, output_activation: Optional[str] = None,
                 exclude=(), other_lr: Optional[float] = None, backend: Optional[str] = None,
                 process_group=None):
        if not isinstance(model, nn.Module):
            fail_type(OP, "model", "an nn.Module", type(model).__name__)
        if process_group is not None or isinstance(model, nn.parallel.DistributedDataParallel):
            raise NotImplementedError(
                "locoprop.optim.LocoProp: data parallel training (process_group or a "
                "DistributedDataParallel model) is not supported yet; use lk.LocoProp "
                "(nn.Sequential models) with process_group, or one process")
        check_choice(OP, "variant", variant, VARIANTS)
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            fail_value(OP, "inner_steps", "an int >= 1", repr(inner_steps))
        for name, value in (("gamma", gamma), ("scale", scale)):
            check_number(OP, name, value)
        check_number(OP, "lr_floor", lr_floor, low=0.0)
        if eta is not None:
            check_number(OP, "eta", eta, low=0.0, low_open=True)
        backends.check_name(OP, backend)
        self.rmsprop = RMSpropOptions(style=style, alpha=alpha, eps=eps,
                                      momentum=momentum).check(OP)

        self.model = model
        modules = find_layers(model, exclude)
        self.layers = decide_activations(model, modules, activations, output_activation)
        self._modules = [m for _, m in modules]
        layer_params = []
        for m in self._modules:
            for p in (m.weight, m.bias):
                if p is not None and p.requires_grad and all(p is not q for q in layer_params):
                    layer_params.append(p)
        others = [p for p in model.parameters()
                  if p.requires_grad and all(p is not q for q in layer_params)]
        groups = [dict(params=layer_params, lr=lr, kind="locoprop")]
        if others:
            groups.append(dict(params=others, lr=lr if other_lr is None else other_lr,
                               kind="linearized"))
        if not layer_params:
            groups = groups[1:]
        if not groups:
            fail_value(OP, "model", "at least one trainable parameter", "none")
        defaults = dict(lr=lr, variant=variant, gamma=float(gamma), inner_steps=inner_steps,
                        lr_floor=float(lr_floor), eta=None if eta is None else float(eta),
                        scale=float(scale), backend=backend,
                        **dataclasses.asdict(self.rmsprop))
        super().__init__(groups, defaults)
        self._records = {m: [] for m in self._modules}
        self._hooks = [m.register_forward_hook(self._record) for m in self._modules]
        # GradScaler: with this flag it hands us its scale instead of unscaling .grad, and
        # step() refuses it (G is caught scaled; an unscaled step is not implemented yet).
        self._step_supports_amp_scaling = True

    # ------------------------------------------------------------------ recording

    def _record(self, module: nn.Module, inputs: tuple, output: Tensor):
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return None  # evaluation: nothing will come back, record nothing
        x = inputs[0]
        call = _Call(x.detach().reshape(-1, x.shape[-1]),
                     output.detach().reshape(-1, output.shape[-1]))
        self._records[module].append(call)
        output.register_hook(call.catch)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad, and the recorded calls are dropped with the gradients."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_records()

    def _clear_records(self) -> None:
        for calls in self._records.values():
            calls.clear()

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its forward runs without recording after)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One outer LocoProp step from the gradients and records of the last backward pass(es);
        returns ``closure()``'s loss when a closure is given."""
        if getattr(self, "grad_scale", None) is not None:
            raise NotImplementedError(
                "locoprop.optim.LocoProp: torch.amp.GradScaler is not supported yet (the layer "
                "gradients G are recorded scaled); train without it, or in bf16 autocast, "
                "which needs no scaler")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._outer_step()
        finally:
            self._clear_records()
        return loss

    def _prepare(self):
        """(params with a gradient, layer problems, constant part of each local gradient)."""
        g0 = self.param_groups[0]
        gamma, scale = g0["gamma"], g0["scale"]
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("locoprop.optim.LocoProp: sparse gradients are not "
                                   "supported")
        problems = self._layer_problems(gamma)
        # C_p = s gamma (p.grad - what the recorded calls produce); fp32 for half params.
        constant = {p: (p.grad * (scale * gamma)).to(_state_dtype(p)) for p in params}
        for layer, X, G, _, _ in problems:
            for p, seen in ((layer.weight, lambda: G.T @ X), (layer.bias, lambda: G.sum(0))):
                if p is not None and p in constant:
                    constant[p].sub_(seen().to(constant[p].dtype), alpha=scale * gamma)
        return params, problems, constant

    @torch.no_grad()
    def local_gradients(self) -> dict:
        """{parameter: its local gradient at the current parameters} from the current records
        and gradients (the formula of inner iterations t >= 1, without the prox term): a
        diagnostic. Right after the backward pass (W = W0) every entry is s gamma p.grad."""
        params, problems, constant = self._prepare()
        grads = {p: constant[p].clone() for p in params}
        for layer, X, _, Y, act in problems:
            self._add_matched_loss_grad(layer, X, Y, act, self.param_groups[0]["scale"], grads)
        return grads

    @torch.no_grad()
    def unseen_gradients(self) -> dict:
        """{LocoProp layer parameter: R}, the part of its backprop gradient that its recorded
        calls do not produce (DESIGN §9): 0 up to rounding for a Linear used only through its
        forward; a tied embedding's or a direct ``F.linear`` read's share otherwise."""
        params, problems, constant = self._prepare()
        s_gamma = self.param_groups[0]["scale"] * self.param_groups[0]["gamma"]
        layer_params = {p for layer, *_ in problems for p in (layer.weight, layer.bias)
                        if p is not None}
        return {p: constant[p] / s_gamma for p in params if p in layer_params}

    def _outer_step(self) -> None:
        g0 = self.param_groups[0]
        gamma, scale, eta = g0["gamma"], g0["scale"], g0["eta"]
        params, problems, constant = self._prepare()
        if not params:
            return
        grads = {p: torch.empty_like(p, dtype=_state_dtype(p)) for p in params}
        anchors = {p: p.detach().clone() for p in params} if eta is not None else None
        state_lists = self._state_lists(params)
        T = g0["inner_steps"]
        for t, factor in enumerate(inner_lr_factors(T, g0["lr_floor"])):
            if t == 0:  # the local gradient at W0 is exactly s gamma p.grad: no GEMMs
                for p in params:
                    grads[p].copy_(p.grad).mul_(scale * gamma)
            else:
                for p in params:
                    grads[p].copy_(constant[p])
                for layer, X, _, Y, act in problems:
                    self._add_matched_loss_grad(layer, X, Y, act, scale, grads)
            if eta is not None:
                for p in params:
                    grads[p].add_(p.detach() - anchors[p], alpha=1.0 / eta)
            self._rmsprop(grads, state_lists, factor, first=t == 0)

    def _layer_problems(self, gamma: float) -> list:
        """[(module, X, G, Y, local activation)] for every layer with recorded calls."""
        problems = []
        for m, info in zip(self._modules, self.layers):
            calls = [c for c in self._records[m] if c.g is not None]
            if not calls or m.weight.grad is None:
                continue
            X = torch.cat([c.x for c in calls]) if len(calls) > 1 else calls[0].x
            Z = torch.cat([c.z for c in calls]) if len(calls) > 1 else calls[0].z
            G = torch.cat([c.g for c in calls]) if len(calls) > 1 else calls[0].g
            G = G.to(Z.dtype)
            variant = self.param_groups[0]["variant"]
            local = info.activation if variant == "M" else "identity"
            Y = local_targets(Z, G, info.activation, gamma, variant=variant,
                              backend=self.param_groups[0]["backend"])
            problems.append((m, X, G, Y, local))
        return problems

    def _add_matched_loss_grad(self, layer, X, Y, act, scale, grads) -> None:
        w, b = layer.weight, layer.bias
        gw, gb = matched_loss_grad(X, w.detach(), None if b is None else b.detach(), Y, act,
                                   scale=scale, backend=self.param_groups[0]["backend"])
        grads[w].add_(gw)
        if b is not None and b in grads:
            grads[b].add_(gb)

    def _state_lists(self, params) -> dict:
        """Per group: (params, square_avgs, momentum_bufs) in torch's state format."""
        lists = {}
        for gi, group in enumerate(self.param_groups):
            opts = _group_options(group)
            ps, ms, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.full_like(
                        p, opts.initial_square_avg, dtype=_state_dtype(p),
                        memory_format=torch.preserve_format)
                if opts.has_momentum and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
                ps.append(p)
                ms.append(state["square_avg"])
                if opts.has_momentum:
                    bufs.append(state["momentum_buffer"])
            lists[gi] = (ps, ms, bufs)
        return lists

    def _rmsprop(self, grads, state_lists, factor: float, first: bool) -> None:
        """One RMSProp step on every parameter: one launch when the groups share their lr and
        options (the usual case), else one per group."""
        calls = []
        for gi, group in enumerate(self.param_groups):
            ps, ms, bufs = state_lists[gi]
            if ps:
                key = (group["lr"], group["backend"], _group_options(group))
                if calls and calls[-1][0] == key:
                    calls[-1][1].extend(zip(ps, ms, bufs or [None] * len(ps)))
                else:
                    calls.append((key, list(zip(ps, ms, bufs or [None] * len(ps)))))
        for (lr, backend, options), rows in calls:
            ps, ms, bufs = zip(*rows)
            rmsprop_step_(list(ps), [grads[p] for p in ps], list(ms),
                          None if bufs[0] is None else list(bufs), lr=lr * factor,
                          backend=backend, **dataclasses.asdict(options))
        if first:  # one outer step: the state's step count, as torch.optim keeps it
            steps = [self.state[p]["step"] for gi in state_lists for p in state_lists[gi][0]]
            if steps:
                torch._foreach_add_(steps, 1)

    # ------------------------------------------------------------------ state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in HALF_DTYPES else p.dtype


def _group_options(group: dict) -> RMSpropOptions:
    return RMSpropOptions(style=group["style"], alpha=group["alpha"], eps=group["eps"],
                          weight_decay=group["weight_decay"], momentum=group["momentum"],
                          centered=group["centered"], maximize=group["maximize"])


__all__ = ["LayerInfo", "LocoProp"]
