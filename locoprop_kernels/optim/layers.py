"""Which modules of a model are LocoProp layers, and the activation f of each (DESIGN §9).

A LocoProp layer is an ``nn.Linear`` or an ``nn.Conv2d`` (or a subclass of either) whose
weight requires grad and whose qualified name matches no ``exclude`` pattern
(``re.search``). A Conv2d whose ``padding_mode`` is not "zeros" (reflect, replicate,
circular) is listed in ``opt.layers`` with ``loss="linearized"``, ``how="refused"`` and the
reason: the matched conv loss (``lk.matched_loss_grad_conv2d``) pads with zeros. String
padding is converted (``conv_geometry``): "valid" is 0, "same" the symmetric part as ints,
plus one zero row / column on the bottom / right of the recorded input where the dilated
kernel is even (as torch pads it). A layer's f, in this order:
1. ``activations={name: table_name}``, given by the user ("explicit");
2. ``output_activation`` when the layer's output is the model's output ("output");
3. detected: with ``torch.fx``, the layer's output goes only into one known activation
   (module, function or Tensor-method form, as the activation table lists them); where the
   model cannot be traced, the next module of the ``nn.Sequential`` that holds the layer
   ("detected");
4. identity ("default").
For a Conv2d, f acts on each position's channel vector (dim 1): the elementwise activations
are detected as for a Linear, a softmax only where the model declares it over the channels
(``nn.Softmax(dim=1)`` or ``dim=-3``, ``F.softmax(z, dim=1)``, ``z.softmax(1)``); a softmax
over another dim (or with an implicit dim) is no detection, and the conv's f falls to 4.
``activations=`` and ``output_activation="softmax"`` declare it (cross-entropy over the
channels of an (N, C, H, W) output is that softmax).
Variant S uses identity for every layer's local loss whatever f is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

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
    module: str = "Linear"  # "Linear" or "Conv2d"


#: The module types that get matched local losses.
LAYER_TYPES = (nn.Linear, nn.Conv2d)


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
    """[(qualified name, module)] of the Linear and Conv2d layers with a trainable weight whose
    name matches no ``exclude`` pattern, in ``named_modules`` order (refused ones included:
    see ``refusal``)."""
    patterns = [re.compile(p) for p in ((exclude,) if isinstance(exclude, str) else exclude)]
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and m.weight.requires_grad
            and not any(p.search(name) for p in patterns)]


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
                   if isinstance(child, LAYER_TYPES) else None)
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
        kind = "Conv2d" if isinstance(m, nn.Conv2d) else "Linear"
        shape, bias = tuple(m.weight.shape), m.bias is not None
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
