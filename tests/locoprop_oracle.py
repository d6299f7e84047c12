"""An independent float64 oracle for ``lk.optim.LocoProp`` (docs/design.md sections 2 and 9).

Deliberately imports nothing from ``locoprop_kernels``: no ops, no ``reference.py``, no
activation table. It states the math of docs/design.md once more, in the most direct form that plain
autograd allows, so that a test comparing it with the package checks the package against the
specification and not against itself.

One outer step (``LocoPropOracle.step``):

1. Forward + backward of the model's loss, with our own forward hooks on the LocoProp layers
   (the names in ``layer_acts``). Each call made while autograd records stores X (its input),
   Z0 (its output) and, through a hook on the tensor Z0, G = dL/dZ0. Calls the backward pass
   does not reach (no G) count for nothing. ``loss.backward()`` leaves p.grad on every
   parameter.
2. The local objective, a function of every trainable parameter theta (start theta0):

       Phi(theta) = sum over LocoProp layers l, over their calls c:
                        s * sum_rows [F_l(z_c(theta)) - y_c . z_c(theta)]
                  + sum over trainable parameters p:  s * gamma * <R_p, p>
                  [+ sum over p: ||p - p0||^2 / (2 eta)]

   with y_c = f_l(Z0_c) - gamma G_c (variant M; variant S: y_c = Z0_c - gamma G_c and
   f_l = identity), z_c(theta) recomputed from the recorded X_c with the layer's current
   weight and bias (a Linear: X W^T + b, a Conv1D: X W + b, a Conv2d: conv2d(X, W, b) with the
   module's stride, padding, dilation and groups; its rows are the output positions and f
   acts on each position's channel vector, dim 1), and

       R_p = p.grad - d/dp [ sum over recorded calls  <G_c, z_c(p)> ] at theta0,

   the part of p's backprop gradient that the recorded calls do not produce: all of it for a
   parameter with no recorded call (LayerNorm, embeddings), the embedding use for a weight tied
   to an embedding, zero for a layer used only through its forward.
3. T = ``inner_steps`` iterations t = 0..T-1: g = dPhi/dp at the current theta for every
   parameter with a gradient, then one RMSProp step per parameter with
   lr_t = lr * max(1 - t/T, lr_floor). TF1 flavour: ms starts at 1, mom at 0, and persist
   across outer steps; ms = alpha ms + (1 - alpha) g^2; mom = momentum mom + lr_t g /
   sqrt(ms + eps); p -= mom.

F enters only through its gradient in z, f(z) - y. Instead of writing each potential F
(log cosh, softplus, logsumexp, ... and no closed form is needed for GELU / SiLU, whose F is
not even convex), the objective uses the surrogate  f(z).detach() . z - y . z , whose autograd
gradient in z is exactly f(z) - y: the same gradient, so the same inner iterations.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


# ------------------------------------------------------------------ transfer functions
# Written from their formulas (f acts on the last dim; softmax over it).

def _softmax_last(z: Tensor) -> Tensor:
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _gelu_erf(z: Tensor) -> Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _gelu_tanh(z: Tensor) -> Tensor:
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


ACTIVATIONS: dict = {
    "identity": lambda z: z,
    "tanh": torch.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + torch.exp(-z)),
    "relu": lambda z: torch.clamp(z, min=0.0),
    "softmax": _softmax_last,
    "gelu": _gelu_erf,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda z: z / (1.0 + torch.exp(-z)),
}

KINDS = ("Linear", "Conv1D", "Conv2d")


def module_kind(module: nn.Module) -> str:
    """"Linear", "Conv1D" (transformers' layer, weight stored (in, out)) or "Conv2d"."""
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.Linear):
        return "Linear"
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:
        return "Conv1D"
    raise TypeError(f"oracle: no LocoProp layer kind for {type(module).__name__}")


def apply_f(name: str, z: Tensor, kind: str) -> Tensor:
    """f over the last dim (Linear, Conv1D) or over the channels, dim 1 (Conv2d)."""
    f = ACTIVATIONS[name]
    if kind == "Conv2d":
        return f(z.movedim(1, -1)).movedim(-1, 1)
    return f(z)


def preactivation(module: nn.Module, kind: str, x: Tensor, weight: Tensor,
                  bias: Optional[Tensor]) -> Tensor:
    """z(W) of one recorded call, from its input x and the given weight and bias."""
    if kind == "Linear":
        z = x @ weight.t()
    elif kind == "Conv1D":
        z = x @ weight
    else:
        if module.padding_mode != "zeros":
            raise ValueError("oracle: only zero-padded Conv2d layers")
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation,
                        module.groups)
    return z if bias is None else z + bias


class _Call:
    __slots__ = ("x", "z0", "g")

    def __init__(self, x: Tensor, z0: Tensor):
        self.x, self.z0, self.g = x, z0, None


class LocoPropOracle:
    """LocoProp by the book, on ``model`` in place; keeps the RMSProp state across steps.

    ``layer_acts``: {module name: activation name} of the LocoProp layers (every other
    parameter gets only the linear term, i.e. the linearized loss). ``layer_kinds``: {name:
    "Linear" | "Conv1D" | "Conv2d"}, read from the module types where not given.
    """

    def __init__(self, model: nn.Module, layer_acts: dict, layer_kinds: Optional[dict] = None,
                 *, lr: float, variant: str = "M", gamma: float = 10.0, inner_steps: int = 10,
                 alpha: float = 0.9, eps: float = 1e-5, momentum: float = 0.999,
                 lr_floor: float = 0.25, scale: float = 1.0, eta: Optional[float] = None):
        if variant not in ("M", "S"):
            raise ValueError(f"oracle: variant {variant!r}")
        modules = dict(model.named_modules())
        self.model = model
        self.layers = []  # (name, module, kind, activation)
        for name, act in layer_acts.items():
            if act not in ACTIVATIONS:
                raise ValueError(f"oracle: unknown activation {act!r}")
            m = modules[name]
            kind = (layer_kinds or {}).get(name) or module_kind(m)
            if kind not in KINDS:
                raise ValueError(f"oracle: unknown layer kind {kind!r}")
            self.layers.append((name, m, kind, "identity" if variant == "S" else act))
        self.variant = variant
        self.lr, self.gamma, self.inner_steps = lr, gamma, inner_steps
        self.alpha, self.eps, self.momentum = alpha, eps, momentum
        self.lr_floor, self.scale, self.eta = lr_floor, scale, eta
        self.params = [p for p in _unique(model.parameters()) if p.requires_grad]
        self.square_avg: dict = {}
        self.mom: dict = {}

    # -------------------------------------------------------------- one outer step

    def step(self, loss_of: Callable[[nn.Module], Tensor]) -> float:
        """One outer step; ``loss_of(model)`` runs the forward and returns the loss."""
        loss, params, objective = self._prepare(loss_of)
        T = self.inner_steps
        for t in range(T):
            g = self._gradient(objective, params)
            lr_t = self.lr * max(1.0 - t / T, self.lr_floor)
            with torch.no_grad():
                for p, gp in zip(params, g):
                    ms = self.square_avg.setdefault(p, torch.ones_like(p))
                    mom = self.mom.setdefault(p, torch.zeros_like(p))
                    ms.mul_(self.alpha).add_((1.0 - self.alpha) * gp * gp)
                    mom.mul_(self.momentum).add_(lr_t * gp / torch.sqrt(ms + self.eps))
                    p.sub_(mom)
        for p in self.params:
            p.grad = None
        return loss

    def local_gradients(self, loss_of: Callable[[nn.Module], Tensor]) -> dict:
        """{parameter: dPhi/dp at theta0} after a forward + backward; no step is taken and
        p.grad is left as the backward pass set it."""
        _, params, objective = self._prepare(loss_of)
        return dict(zip(params, self._gradient(objective, params)))

    def _prepare(self, loss_of):
        """Forward + backward with the recording hooks; (loss, the parameters with a gradient,
        Phi as a function of the current parameters)."""
        model = self.model
        for p in self.params:
            p.grad = None
        records = {name: [] for name, *_ in self.layers}
        hooks = [m.register_forward_hook(self._recorder(records[name]))
                 for name, m, *_ in self.layers]
        try:
            loss = loss_of(model)
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
        params = [p for p in self.params if p.grad is not None]
        calls = [(m, kind, act, c) for name, m, kind, act in self.layers
                 for c in records[name] if c.g is not None]  # calls the backward reached

        # The recomputed z(theta0) must be the recorded Z0 (a wrong layout would show here).
        with torch.no_grad():
            for m, kind, _, c in calls:
                z = preactivation(m, kind, c.x, m.weight, m.bias)
                err = (z - c.z0).abs().max() / c.z0.abs().max().clamp_min(1.0)
                if err > 1e-6:
                    raise AssertionError(f"oracle: z(W0) of a {kind} layer is not its recorded "
                                         f"output (error {err.item():.2e})")

        # R_p = p.grad - (the part of p.grad the recorded calls produce), at theta0.
        if calls:
            produced = self._sum_over_calls(calls, lambda i, z: (calls[i][3].g * z).sum())
            seen = torch.autograd.grad(produced, params, allow_unused=True)
        else:
            seen = [None] * len(params)
        residual = [p.grad.detach() - (0.0 if s is None else s) for p, s in zip(params, seen)]
        targets = [self._target(act, kind, c) for _, kind, act, c in calls]
        anchors = [p.detach().clone() for p in params]
        s = self.scale

        def matched(i, z):
            # The surrogate of F(z) - y.z: its gradient in z is f(z) - y (see the docstring).
            _, kind, act, _ = calls[i]
            return (apply_f(act, z, kind).detach() * z - targets[i] * z).sum()

        def objective() -> Tensor:
            total = s * self._sum_over_calls(calls, matched) if calls else 0.0
            for p, r, p0 in zip(params, residual, anchors):
                total = total + s * self.gamma * (r * p).sum()
                if self.eta is not None:
                    total = total + ((p - p0) ** 2).sum() / (2.0 * self.eta)
            return total

        return loss.item(), params, objective

    @staticmethod
    def _gradient(objective, params) -> list:
        with torch.enable_grad():
            g = torch.autograd.grad(objective(), params, allow_unused=True)
        return [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, g)]

    # -------------------------------------------------------------- helpers

    @staticmethod
    def _recorder(calls: list):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, Tensor)
                    and output.requires_grad):
                return None
            call = _Call(inputs[0].detach(), output.detach())
            calls.append(call)

            def keep(grad, call=call):
                call.g = grad.detach() if call.g is None else call.g + grad.detach()
            output.register_hook(keep)
            return None
        return hook

    def _target(self, act: str, kind: str, c: _Call) -> Tensor:
        base = c.z0 if self.variant == "S" else apply_f(act, c.z0, kind)
        return base - self.gamma * c.g

    @staticmethod
    def _sum_over_calls(calls, term) -> Tensor:
        """sum_i term(i, z_i(theta)) over the recorded calls, z_i from the current weights."""
        total = 0.0
        with torch.enable_grad():
            for i, (m, kind, _, c) in enumerate(calls):
                total = total + term(i, preactivation(m, kind, c.x, m.weight, m.bias))
        return total


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def oracle_steps(model: nn.Module, batches, loss_of: Callable, layer_acts: dict,
                 layer_kinds: Optional[dict] = None, **options) -> LocoPropOracle:
    """Run one outer oracle step per batch on ``model`` in place; ``loss_of(model, batch)``
    returns the loss. Options as ``LocoPropOracle`` (lr required). Returns the oracle (its
    RMSProp state) so that more steps can follow."""
    oracle = LocoPropOracle(model, layer_acts, layer_kinds, **options)
    for batch in batches:
        oracle.step(lambda m, b=batch: loss_of(m, b))
    return oracle
