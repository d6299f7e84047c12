"""The LocoProp trainer: an ``nn.Sequential`` of Linear + activation layers, trained by local
loss optimization with the official semantics (docs/design.md sections 2 and 4).

A thin layer over the one LocoProp, ``lk.optim.LocoProp``: it checks that the model is a
Sequential it supports (``parse_sequential``), gives the optimizer each layer's f (the module
after each Linear; the last Linear's is ``output_activation``), keeps its parameters and
RMSProp state in flat arenas (the model's ``weight``/``bias`` become ``nn.Parameter`` views of
the parameter arena, the optimizer's state views of the state arenas), and runs the outer step:

1. forward through the model, L = ``loss_fn(model(x), y)`` (a mean over the batch; under data
   parallel this replica's share of the global mean);
2. one backward pass (the optimizer's hooks record every layer's X and Z0);
3. ``lk.optim.LocoProp.step()``: T inner iterations on every layer's local problem with the
   target f(Z0) - gamma dL/dZ, as the local gradient s (f(Z) - f(Z0))^T X + s gamma dL/dp
   (docs/design.md section 9). At t = 0 the local gradient is s gamma dL/dp (no GEMM).

The inner loop runs per layer or grouped (all layers per launch, optionally replayed as one
CUDA graph): ``grouped`` (default: where the backend prefers it, triton on CUDA) and
``cuda_graph`` go to the optimizer; ``strategy`` says what the last step did. The arenas make
the grouped strategy run on the trainer's own buffers, with no copy, and keep the checkpoint
format (``state_dict``: flat ``params``, ``square_avgs``, ``momentum_bufs``). Build the trainer
BEFORE anything else keeps references to the model's parameters (another optimizer, an EMA),
and do not move the model (``.to()``) afterwards: both would see the replaced tensors.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import backends
from .activations import ACTIVATIONS, activation_of_module, get_activation
from .arena import Arena
from .config import LocoPropConfig
from .distributed import DataParallel
from .grouped import LayerSpec, param_shapes
from .optim.locoprop import LocoProp as _Optimizer
from .validation import check_number, fail_type, fail_value

OP = "LocoProp"

# ----------------------------------------------------------------------------- the model

def _activation_name(module: nn.Module, index: int) -> Optional[str]:
    """The table name of an activation module, None if ``module`` is not one."""
    act = activation_of_module(module, op=f"locoprop.{OP}", arg=f"model[{index}]")
    return None if act is None else act.name


def parse_sequential(model: nn.Module, output_activation: str) -> tuple:
    """(linears, layer activations, output activation module's name or None) of a supported
    model, else a ValueError/TypeError.

    ``model`` is an ``nn.Sequential`` of ``nn.Linear`` layers, each followed by at most one
    activation module (none = identity); widths must chain. The last Linear's output is the
    logits: its activation is ``output_activation`` (the f of its local loss), and a module
    after it, if any, must be that same activation (or Identity): ``loss_fn`` then gets the
    model's output, as the model's forward returns it. Every parameter must be trainable and
    each Linear (and each parameter) used once: frozen, repeated or tied layers are refused
    (``lk.optim.LocoProp`` trains those models correctly).
    """
    if not isinstance(model, nn.Sequential):
        fail_type(OP, "model", "an nn.Sequential of nn.Linear + activation modules",
                  type(model).__name__)
    get_activation(output_activation, op=f"locoprop.{OP}")
    linears, acts = [], []
    for i, module in enumerate(model):
        if isinstance(module, nn.Linear):
            if linears and len(acts) < len(linears):
                acts.append("identity")  # Linear directly after Linear: f = identity
            if linears and module.in_features != linears[-1].out_features:
                fail_value(OP, f"model[{i}]", f"an nn.Linear with in_features = "
                           f"{linears[-1].out_features} (the previous layer's out_features)",
                           f"in_features = {module.in_features}")
            linears.append(module)
            continue
        name = _activation_name(module, i)
        if name is None:
            supported = ", ".join(f"nn.{t.__name__}" for a in ACTIVATIONS.values()
                                  for t in a.modules)
            fail_value(OP, f"model[{i}]", f"nn.Linear or an activation module ({supported})",
                       f"{type(module).__name__}")
        if not linears or len(acts) == len(linears):
            fail_value(OP, f"model[{i}]", "an activation directly after an nn.Linear",
                       f"{type(module).__name__} after "
                       f"{type(model[i - 1]).__name__ if i else 'nothing'}")
        acts.append(name)
    if not linears:
        fail_value(OP, "model", "at least one nn.Linear", "none")
    if len(acts) == len(linears) and acts[-1] not in ("identity", output_activation):
        fail_value(OP, f"model[{len(model) - 1}]",
                   f"no activation after the last nn.Linear, or the output_activation "
                   f"'{output_activation}' (the last Linear's output is the logits)",
                   f"{type(model[len(model) - 1]).__name__} ('{acts[-1]}')")
    tail = acts[-1] if len(acts) == len(linears) and acts[-1] != "identity" else None
    acts = acts[:len(linears) - 1] + [output_activation]
    seen = {}
    for i, lin in enumerate(linears):
        for pname in ("weight", "bias"):
            p = getattr(lin, pname)
            if p is None:
                continue
            if not p.requires_grad:
                fail_value(OP, "model", "every parameter trainable (the trainer updates them "
                           "all; lk.optim.LocoProp leaves frozen parameters untouched)",
                           f"Linear {i}'s {pname} with requires_grad=False")
            if id(p) in seen:
                fail_value(OP, "model", "each nn.Linear and each parameter used once (a "
                           "repeated or tied one would be trained twice over; lk.optim."
                           "LocoProp trains it as one parameter)",
                           f"Linear {i}'s {pname} is also {seen[id(p)]}")
            seen[id(p)] = f"Linear {i}'s {pname}"
    first = linears[0].weight
    for i, lin in enumerate(linears):
        for p in (lin.weight, lin.bias):
            if p is not None and (p.dtype != first.dtype or p.device != first.device):
                fail_value(OP, "model", f"all parameters of one dtype and device "
                           f"({first.dtype}, {first.device})",
                           f"{p.dtype}, {p.device} in Linear {i}")
    if first.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        fail_type(OP, "model", "floating-point parameters", first.dtype)
    return linears, acts, tail


# ----------------------------------------------------------------------------- the trainer

class LocoProp:
    """LocoProp for an ``nn.Sequential`` of Linear + activation layers; see the module docstring.

    Official defaults (the google-research notebook): variant M, gamma 10, T = 10 inner
    RMSProp steps in TF1 style (square averages start at 1, lr inside the momentum), lr 1e-5,
    alpha 0.9, eps 1e-5, momentum 0.999, lr floor 0.25, scale 1 (local losses summed over the
    batch), no prox term. ``opt.lr`` is the outer learning rate (the schedule is the
    caller's). Extra options: ``grouped``, ``cuda_graph`` (see the module docstring),
    ``precision`` ("ieee" or "tf32" fp32 dots on the GPU), ``process_group`` (data-parallel:
    ``docs/guarantees.md``).
    """

    def __init__(self, model: nn.Sequential, loss_fn: Callable, *,
                 output_activation: str = "sigmoid", variant: str = "M", gamma: float = 10.0,
                 lr: float = 1e-5, inner_steps: int = 10, alpha: float = 0.9,
                 eps: float = 1e-5, momentum: float = 0.999, style: str = "tf",
                 lr_floor: float = 0.25, eta: Optional[float] = None, scale: float = 1.0,
                 backend: Optional[str] = None, grouped: Optional[bool] = None,
                 cuda_graph: bool = False, precision: str = "ieee", process_group=None,
                 gram: str = "auto"):
        if not callable(loss_fn):
            fail_type(OP, "loss_fn", "a callable loss_fn(logits, y)", type(loss_fn).__name__)
        self.config = LocoPropConfig.of(
            lr=lr, variant=variant, gamma=gamma, inner_steps=inner_steps, lr_floor=lr_floor,
            eta=eta, scale=scale, backend=backend, precision=precision, style=style,
            alpha=alpha, eps=eps, momentum=momentum).check(OP)
        config = self.config
        self.rmsprop = config.rmsprop
        variant, gamma, inner_steps = config.variant, config.gamma, config.inner_steps
        lr_floor, eta, scale, lr = config.lr_floor, config.eta, config.scale, config.lr

        linears, acts, _ = parse_sequential(model, output_activation)
        self.model, self.loss_fn = model, loss_fn
        self.variant, self.gamma = variant, float(gamma)
        self.inner_steps, self.lr_floor = inner_steps, float(lr_floor)
        self.eta, self.scale, self.precision = (None if eta is None else float(eta),
                                                float(scale), precision)
        self.activations = acts                                  # f_l in the forward pass
        local = [variant.local_activation(act) for act in acts]
        self.layers = [LayerSpec(lin.in_features, lin.out_features, act, lin.bias is not None)
                       for lin, act in zip(linears, local)]     # f_l of the local losses
        self.linears = linears

        weight = linears[0].weight
        self.device, self.dtype = weight.device, weight.dtype
        be = backends.resolve(OP, backend, self.device, self.dtype)  # auto: fp64 -> reference
        if self.dtype not in be.dtypes:
            fail_type(OP, "model", f"parameters of a dtype the '{be.name}' backend supports "
                      f"{[str(d) for d in be.dtypes]}", self.dtype)
        self.backend = be.name
        self.dp = DataParallel.for_group(process_group)
        # The grouped kernel switches on the built-in rows' codes only.
        all_builtin = all(get_activation(layer.activation).builtin for layer in self.layers)
        if grouped is None:
            grouped = be.prefers_grouped(self.device) and not self.dp.active and all_builtin
        if grouped and not all_builtin:
            fail_value(OP, "grouped", "False with a registered activation (the grouped "
                       "kernel implements the built-in ones)", grouped)
        if grouped and self.dp.active:
            fail_value(OP, "grouped", "False with a process group (the grouped inner loop "
                       "has no per-iteration all-reduce)", grouped)
        self.grouped, self.cuda_graph = bool(grouped), bool(cuda_graph)

        # The arenas: parameters (the model's weight/bias become views of it), RMSProp state
        # (fp32 for fp32/half params, fp64 for fp64), in the layout W_0, b_0, W_1, b_1, ...
        self.shapes = param_shapes(self.layers)
        state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        tensors = [t.detach() for lin in linears for t in (lin.weight, lin.bias)
                   if t is not None]
        self.params = Arena.from_tensors(tensors)
        self.square_avgs = Arena(self.shapes, dtype=state_dtype, device=self.device,
                                 fill=self.rmsprop.initial_square_avg)
        self.momentum_bufs = Arena(self.shapes, dtype=state_dtype, device=self.device)
        self._rebind_model_parameters()
        self.dp.broadcast_(self._state_buffers())

        # The one LocoProp: lk.optim.LocoProp over the same model, its f per layer given, its
        # RMSProp state the arenas' views (so its grouped strategy runs on the arenas, no copy).
        names = {id(m): name for name, m in model.named_modules()}
        self.optimizer = _Optimizer(
            model, lr=lr, variant=variant.value, gamma=gamma, inner_steps=inner_steps,
            alpha=alpha, eps=eps, momentum=momentum, style=style, lr_floor=lr_floor, eta=eta,
            scale=scale, activations={names[id(lin)]: act for lin, act in zip(linears, acts)},
            output_activation=output_activation, backend=self.backend,
            process_group=self.dp.group if self.dp.active else None, precision=precision,
            grouped=self.grouped, cuda_graph=self.cuda_graph, gram=gram)
        # The backward loss is this replica's share of the global mean (``global_loss``): the
        # replicas' gradients are summed, not averaged.
        self.optimizer._grad_reduction = "sum"
        params = self._model_params()
        for p, avg, mom in zip(params, self.square_avgs.views(), self.momentum_bufs.views()):
            self.optimizer.state[p] = dict(step=torch.zeros((), dtype=torch.float32),
                                           square_avg=avg, momentum_buffer=mom)
        self.steps = 0

    # ------------------------------------------------------------------ setup helpers

    def _rebind_model_parameters(self) -> None:
        """Make every Linear's weight/bias an nn.Parameter viewing the parameter arena."""
        views = iter(self.params.views())
        for lin in self.linears:
            requires = lin.weight.requires_grad
            lin.weight = nn.Parameter(next(views), requires_grad=requires)
            if lin.bias is not None:
                lin.bias = nn.Parameter(next(views), requires_grad=requires)

    def _model_params(self) -> list:
        return [t for lin in self.linears for t in (lin.weight, lin.bias) if t is not None]

    def _state_buffers(self) -> list:
        return [self.params.buffer, self.square_avgs.buffer, self.momentum_bufs.buffer]

    @property
    def grads(self) -> Arena:
        """The local gradients of the last inner iteration of the last step, in the arena
        layout (zeros before the first step)."""
        last = self.optimizer._last_grads
        if not last:
            return Arena(self.shapes, dtype=self.square_avgs.buffer.dtype, device=self.device)
        return Arena.over(last[0], self.shapes)

    @property
    def strategy(self) -> Optional[str]:
        """How the last step ran: "grouped" or "per-layer (why)" (``lk.optim.LocoProp``)."""
        return self.optimizer.strategy

    @property
    def lr(self) -> float:
        """The outer learning rate; inner iteration t uses lr * max(1 - t/T, lr_floor)."""
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        check_number(OP, "lr", value, low=0.0)
        self.optimizer.param_groups[0]["lr"] = float(value)

    # ------------------------------------------------------------------ the outer step

    def step(self, x: torch.Tensor, y) -> torch.Tensor:
        """One outer LocoProp step on the batch (x, y); returns L before the update, as a
        0-d tensor on the model's device (no host synchronisation)."""
        if not isinstance(x, torch.Tensor):
            fail_type(OP, "x", "a torch.Tensor", type(x).__name__)
        if x.device != self.device:
            fail_type(OP, "x", f"device {self.device} (the model's device)", x.device)
        if x.dim() != 2 or x.shape[1] != self.layers[0].d_in or x.shape[0] == 0:
            fail_value(OP, "x", f"shape (B >= 1, {self.layers[0].d_in})", tuple(x.shape))
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)  # the model's forward would need the parameters' dtype
        params = self._model_params()
        with torch.enable_grad():
            # loss_fn gets what the model returns: the logits, or the output activation's
            # values when the model ends in one (an nn.Softmax for an NLL loss).
            local_loss = self.loss_fn(self.model(x), y)
            if not isinstance(local_loss, torch.Tensor) or local_loss.numel() != 1:
                fail_value(OP, "loss_fn", "a callable returning a one-element loss tensor",
                           type(local_loss).__name__ if not isinstance(local_loss, torch.Tensor)
                           else f"a tensor of shape {tuple(local_loss.shape)}")
            backward_loss, loss = self.dp.global_loss(local_loss.reshape(()), x.shape[0])
            for p in params:
                p.grad = None
            backward_loss.backward()
        try:
            self.optimizer.step()
        finally:
            for p in params:
                p.grad = None  # the trainer owns the step: no gradient left on the model
        self.steps += 1
        return loss

    # ------------------------------------------------------------------ checkpoints

    def _layer_records(self) -> list:
        return [dict(d_in=l.d_in, d_out=l.d_out, activation=l.activation, bias=l.bias)
                for l in self.layers]

    def state_dict(self) -> dict:
        """Everything that changes in training (parameters, RMSProp state, lr, step count)
        plus the layer layout and settings; tensors are copies."""
        return {
            "params": self.params.buffer.detach().clone(),
            "square_avgs": self.square_avgs.buffer.clone(),
            "momentum_bufs": self.momentum_bufs.buffer.clone(),
            "lr": self.lr,
            "steps": self.steps,
            "layers": self._layer_records(),
            "settings": dict(variant=self.variant.value, gamma=self.gamma,
                             inner_steps=self.inner_steps, alpha=self.rmsprop.alpha,
                             eps=self.rmsprop.eps, momentum=self.rmsprop.momentum,
                             style=self.rmsprop.style,
                             lr_floor=self.lr_floor, eta=self.eta, scale=self.scale),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``'s output (any device; copied to this trainer's device and
        dtypes). Every check runs before anything is written: a state from another model
        raises a ValueError naming the first mismatch and leaves the trainer unchanged."""
        if not isinstance(state_dict, dict):
            fail_type(OP, "state_dict", "a dict from LocoProp.state_dict()",
                      type(state_dict).__name__)
        missing = [k for k in ("params", "square_avgs", "momentum_bufs", "lr", "steps",
                               "layers") if k not in state_dict]
        if missing:
            fail_value(OP, "state_dict", "the keys of LocoProp.state_dict()",
                       f"a dict without {missing}")
        mine, theirs = self._layer_records(), list(state_dict["layers"])
        if len(theirs) != len(mine):
            fail_value(OP, "state_dict", f"{len(mine)} layers", f"{len(theirs)} layers")
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if dict(b) != a:
                fail_value(OP, "state_dict", f"layer {i} = {a}", f"layer {i} = {dict(b)}")
        n = self.params.buffer.numel()
        for key in ("params", "square_avgs", "momentum_bufs"):
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or t.shape != (n,):
                fail_value(OP, f"state_dict['{key}']", f"a tensor of shape ({n},)",
                           tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__)
            if not t.is_floating_point() or t.device.type == "meta":
                fail_value(OP, f"state_dict['{key}']", "a floating-point tensor with data",
                           f"{t.dtype} on {t.device}")
            if not bool(torch.isfinite(t).all()):
                fail_value(OP, f"state_dict['{key}']", "finite values", "NaN or inf entries")
        if bool((state_dict["square_avgs"] < 0).any()):
            fail_value(OP, "state_dict['square_avgs']", "non-negative square averages",
                       "negative entries")
        check_number(OP, "state_dict['lr']", state_dict["lr"], low=0.0)
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            fail_value(OP, "state_dict['steps']", "an int >= 0", repr(steps))
        with torch.no_grad():
            self.params.buffer.copy_(state_dict["params"])
            self.square_avgs.buffer.copy_(state_dict["square_avgs"])
            self.momentum_bufs.buffer.copy_(state_dict["momentum_bufs"])
        self.lr = float(state_dict["lr"])
        self.steps = steps
        for p in self._model_params():
            self.optimizer.state[p]["step"].fill_(steps)
        self.dp.broadcast_(self._state_buffers())


__all__ = ["LocoProp", "parse_sequential"]
