"""Which modules of a model are LocoProp layers, and the activation f of each (docs/design.md §9).

A LocoProp layer is an affine module whose weight requires grad and whose qualified name
matches no ``exclude`` pattern (``re.search``):
- ``nn.Linear`` (subclasses too): z = x W^T + b, W (d_out, d_in);
- transformers' ``Conv1D`` (GPT-2's blocks; recognised without importing transformers):
  z = x W + b, W stored (d_in, d_out);
- any type declared with ``register_affine_type`` (its weight and bias attributes and their
  layout), and
- ``nn.Conv2d``. A Conv2d whose ``padding_mode`` is not "zeros" (reflect, replicate, circular)
  is listed in ``opt.layers`` with ``loss="linearized"``, ``how="refused"`` and the reason: the
  matched conv loss (``lk.matched_loss_grad_conv2d``) pads with zeros. String padding is
  converted (``conv_geometry``): "valid" is 0, "same" the symmetric part as ints, plus one
  zero row / column on the bottom / right of the recorded input where the dilated kernel is
  even (as torch pads it).
A layer's f, in this order:
1. ``activations={name: table_name}``, given by the user ("explicit");
2. ``output_activation`` when the layer's output is the model's output ("output");
3. read from what a forward pass computes on the layer's output (``detection.py``): one
   activation of the table ("detected") or a loss with a known link ("loss"); before the first
   observed forward, and for layers no forward has called, ``torch.fx`` (the layer's output
   goes only into one known activation) or the next module of the ``nn.Sequential`` that holds
   the layer ("detected");
4. identity ("default"), with the reason once a forward pass has been observed.
For a Conv2d, f acts on each position's channel vector (dim 1): the elementwise activations
are detected as for a Linear, a softmax only over the channels (``nn.Softmax(dim=1)`` or
``dim=-3``, ``F.softmax(z, dim=1)``, ``z.softmax(1)``); a softmax over another dim is no
detection, and the conv's f falls to 4. ``activations=`` and ``output_activation="softmax"``
declare it (cross-entropy over the channels of an (N, C, H, W) output is that softmax).
Variant S uses identity for every layer's local loss whatever f is.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..activations import activation_of_call, activation_of_module, get_activation

OP = "optim.LocoProp"


@dataclass(frozen=True)
class LayerInfo:
    """What ``lk.optim.LocoProp`` decided for one layer (``opt.layers``)."""

    name: str
    shape: tuple           # the weight's shape: (d_out, d_in), Conv2d (C_out, C_in/g, kh, kw)
    bias: bool
    activation: Optional[str]  # f of the layer's local loss; None when refused
    how: str               # "explicit", "output", "detected", "default"; "refused"
    loss: str = "matched"  # "matched", or "linearized" for a refused layer
    reason: Optional[str] = None  # why a layer is refused (its parameters are linearized)
    module: str = "Linear"  # "Linear", "Conv1D", "Conv2d" or a declared type's class name
    # How the last step formed this layer's inner gradient: "gram" (the quadratic local loss
    # through X^T X, ``locoprop.uses_gram``), "matched" (the matched-loss op), None before any.
    inner: Optional[str] = None


@dataclass(frozen=True)
class AffineType:
    """How a module computes z = x W^T + b over the last dim of x: the attribute names of its
    weight and bias (``bias=None``: it has none) and the weight's layout, "out_in"
    ((d_out, d_in), ``nn.Linear``) or "in_out" ((d_in, d_out), z = x W + b)."""

    weight: str = "weight"
    bias: Optional[str] = "bias"
    layout: str = "out_in"


#: Declared affine module types (``register_affine_type``), looked up along the MRO.
_AFFINE_TYPES: dict = {nn.Linear: AffineType()}

#: transformers' Conv1D (``transformers.pytorch_utils.Conv1D``), recognised only when
#: transformers is already imported: a model holding one has imported it.
_CONV1D = ("transformers.pytorch_utils", "Conv1D")


def register_affine_type(module_type: type, *, weight: str = "weight",
                         bias: Optional[str] = "bias", layout: str = "out_in") -> None:
    """Declare ``module_type`` (and its subclasses) a LocoProp layer: its forward computes
    ``x W^T + b`` (layout "out_in", W = ``getattr(m, weight)`` of shape (d_out, d_in)) or
    ``x W + b`` (layout "in_out", W of shape (d_in, d_out)) over the last dim of its first
    argument, with b = ``getattr(m, bias)`` (shape (d_out,), or None). Nothing else may happen
    in that forward: its output is the layer's Z. Re-declaring a type replaces its entry."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"locoprop.register_affine_type: argument 'module_type' expected an "
                        f"nn.Module subclass, got {module_type!r}")
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"locoprop.register_affine_type: argument 'layout' expected 'out_in' "
                         f"or 'in_out', got {layout!r}")
    for arg, value in (("weight", weight), ("bias", bias)):
        if not (isinstance(value, str) or (arg == "bias" and value is None)):
            raise TypeError(f"locoprop.register_affine_type: argument '{arg}' expected an "
                            f"attribute name{' or None' if arg == 'bias' else ''}, got "
                            f"{value!r}")
    _AFFINE_TYPES[module_type] = AffineType(weight, bias, layout)


def affine_type(module: nn.Module) -> Optional[AffineType]:
    """The ``AffineType`` of an affine module (nn.Linear, Conv1D, declared), else None."""
    for cls in type(module).__mro__:
        if cls in _AFFINE_TYPES:
            return _AFFINE_TYPES[cls]
    conv1d = getattr(sys.modules.get(_CONV1D[0]), _CONV1D[1], None)
    if conv1d is not None and isinstance(module, conv1d):
        return AffineType(layout="in_out")
    return None


def stores_in_out(module: nn.Module) -> bool:
    """An affine layer whose weight is stored (d_in, d_out) (transformers' Conv1D)."""
    kind = affine_type(module)
    return kind is not None and kind.layout == "in_out"


def is_layer_type(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or affine_type(module) is not None


def layer_params(module: nn.Module) -> tuple:
    """(weight, bias or None) of a LocoProp layer."""
    if isinstance(module, nn.Conv2d):
        return module.weight, module.bias
    kind = affine_type(module)
    return getattr(module, kind.weight), (None if kind.bias is None
                                          else getattr(module, kind.bias, None))


def module_kind(module: nn.Module) -> str:
    """How ``opt.layers`` names a layer's type: "Linear" (nn.Linear and subclasses), "Conv2d",
    "Conv1D", or a declared type's class name."""
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.Linear):
        return "Linear"
    return type(module).__name__


def features(module: nn.Module) -> tuple:
    """(the feature dim of the layer's output Z, its size): a Conv2d's channels (dim 1),
    an affine layer's last dim."""
    if isinstance(module, nn.Conv2d):
        return 1, module.out_channels
    weight, _ = layer_params(module)
    return -1, weight.shape[1 if affine_type(module).layout == "in_out" else 0]


def preactivation(module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """Z = the layer's affine map of x, computed in ``dtype`` (autocast off): what the layer
    computes, recomputed from a record (an input (rows, d_in), a Conv2d's (N, C, H, W))."""
    weight, bias = layer_params(module)
    x, w = x.to(dtype), weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        if isinstance(module, nn.Conv2d):
            return module._conv_forward(x, w, b)
        if affine_type(module).layout == "in_out":
            z = x @ w
            return z if b is None else z + b
        return nn.functional.linear(x, w, b)


def refusal(module: nn.Module) -> Optional[str]:
    """Why a layer of ``find_layers`` cannot take the matched loss (None: it can)."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return (f"padding_mode={module.padding_mode!r}: the matched conv loss pads with zeros "
                f"only; linearized")
    return None


def conv_geometry(module: nn.Conv2d) -> tuple:
    """(dict(stride, padding, dilation, groups) for ``lk.matched_loss_grad_conv2d``, extra):
    ``extra`` = (right, bottom) zero columns / rows to append to the recorded input first, or
    None. Int padding is passed on; "valid" is 0; "same" pads total = dilation (k - 1) per
    dim, total // 2 before and the rest after (torch's rule), i.e. ints plus ``extra``."""
    padding, extra = module.padding, None
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same" (nn.Conv2d accepts no other string)
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            padding = tuple(t // 2 for t in totals)
            odd = tuple(t - 2 * (t // 2) for t in totals)  # (h, w)
            extra = (odd[1], odd[0]) if any(odd) else None
    return dict(stride=tuple(module.stride), padding=tuple(padding),
                dilation=tuple(module.dilation), groups=module.groups), extra


def find_layers(model: nn.Module, exclude) -> list:
    """[(qualified name, module)] of the affine and Conv2d layers with a trainable weight whose
    name matches no ``exclude`` pattern, in ``named_modules`` order (refused ones included:
    see ``refusal``)."""
    patterns = [re.compile(p) for p in ((exclude,) if isinstance(exclude, str) else exclude)]
    found = []
    for name, m in model.named_modules():
        if not is_layer_type(m) or any(p.search(name) for p in patterns):
            continue
        weight, _ = layer_params(m)
        if isinstance(weight, Tensor) and weight.requires_grad:
            found.append((name, m))
    return found


#: The dims of an (N, C, H, W) output that are its channels: a softmax over them is f of a
#: Conv2d layer (written explicitly; an implicit dim is no declaration).
_CHANNEL_DIMS = (1, -3)


def _module_activation(module: nn.Module, conv: bool = False) -> Optional[str]:
    """The table name of an activation module; None for other modules and for a known type
    that computes another function (nn.Softmax(dim=0), nn.LeakyReLU(0.2)): no detection.
    ``conv``: it follows a Conv2d, so a softmax counts only over the channels."""
    if conv and isinstance(module, nn.Softmax):
        return "softmax" if type(module) is nn.Softmax and module.dim in _CHANNEL_DIMS else None
    try:
        entry = activation_of_module(module)
    except ValueError:
        return None
    return None if entry is None else entry.name


def _call_activation(node, conv: bool) -> Optional[str]:
    """The table name of the activation a call_function / call_method node computes on its
    first argument; for a Conv2d's output a softmax counts only with dim = 1 (or -3)."""
    method = node.op == "call_method"
    entry = activation_of_call(node.target, node.args, dict(node.kwargs), method=method)
    softmax = get_activation("softmax")
    is_softmax = ((node.target in softmax.methods) if method
                  else any(node.target is f for f in softmax.functions))
    if conv and is_softmax:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return "softmax" if dim in _CHANNEL_DIMS else None
    return entry.name if entry else None


def _traced_activations(model: nn.Module, names: set, convs: set) -> Optional[dict]:
    """{layer name: (table name or None, feeds the output)} from a torch.fx trace; None when
    the model cannot be traced. ``convs``: the names of the Conv2d layers."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the Sequential order
        return None
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        conv = node.target in convs
        users = list(node.users)
        to_output = any(u.op == "output" for u in users)
        act = None
        if len(users) == 1:
            user = users[0]
            if user.op == "call_module":
                act = _module_activation(modules[user.target], conv)
            elif user.op in ("call_function", "call_method") and user.args \
                    and user.args[0] is node:
                act = _call_activation(user, conv)
        found[node.target] = (act, to_output)
    return found


def _sequential_activations(model: nn.Module) -> dict:
    """{layer name: table name} from the module after each layer in every nn.Sequential."""
    found = {}
    for prefix, m in model.named_modules():
        if not isinstance(m, nn.Sequential):
            continue
        children = list(m.named_children())
        for (name, child), (_, nxt) in zip(children, children[1:]):
            act = (_module_activation(nxt, isinstance(child, nn.Conv2d))
                   if is_layer_type(child) else None)
            if act is not None:
                found[f"{prefix}.{name}" if prefix else name] = act
    return found


def decide_activations(model: nn.Module, layers: list, activations: Optional[dict],
                       output_activation: Optional[str]) -> list:
    """One ``LayerInfo`` per layer of ``find_layers`` (refused ones: loss "linearized", no
    f); see the module docstring."""
    activations = dict(activations or {})
    refused = {name: refusal(m) for name, m in layers if refusal(m) is not None}
    names = {name for name, _ in layers if name not in refused}
    for name, act in activations.items():
        if name in refused:
            raise ValueError(f"locoprop.{OP}: argument 'activations' names {name!r}, which is "
                             f"not a LocoProp layer: {refused[name]}")
        if name not in names:
            raise ValueError(f"locoprop.{OP}: argument 'activations' names {name!r}, which is "
                             f"not a LocoProp layer (one of {sorted(names)})")
        get_activation(act, op=f"locoprop.{OP}")
    if output_activation is not None:
        get_activation(output_activation, op=f"locoprop.{OP}")
    convs = {name for name, m in layers if isinstance(m, nn.Conv2d)}
    traced = _traced_activations(model, names, convs)
    sequential = _sequential_activations(model) if traced is None else {}
    infos = []
    for name, m in layers:
        kind = module_kind(m)
        weight, bias = layer_params(m)
        shape, bias = tuple(weight.shape), bias is not None
        if name in refused:
            infos.append(LayerInfo(name, shape, bias, None, "refused", loss="linearized",
                                   reason=refused[name], module=kind))
            continue
        act, how = None, "default"
        detected, to_output = (traced or {}).get(name, (None, False))
        if name in activations:
            act, how = activations[name], "explicit"
        elif to_output and output_activation is not None:
            act, how = output_activation, "output"
        elif detected is not None:
            act, how = detected, "detected"
        elif name in sequential:
            act, how = sequential[name], "detected"
        infos.append(LayerInfo(name, shape, bias, act or "identity", how, module=kind))
    return infos


def observed(info: LayerInfo, decision, explicit: bool,
             output_activation: Optional[str]) -> LayerInfo:
    """``info`` updated with what a forward pass showed (``detection.Decision``); an explicit
    or refused layer stays as it is."""
    if explicit or info.how == "refused":
        return info
    if decision.to_output and output_activation is not None:
        act, how, reason = output_activation, "output", None
    elif decision.activation is not None:
        act, how, reason = decision.activation, decision.how, None
    else:
        act, how, reason = "identity", "default", decision.reason
    return LayerInfo(info.name, info.shape, info.bias, act, how, info.loss, reason, info.module)
