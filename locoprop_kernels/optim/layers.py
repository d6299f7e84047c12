"""Which modules of a model are LocoProp layers, and the activation f of each (DESIGN §9).

A LocoProp layer is an ``nn.Linear`` (or a subclass) whose weight requires grad and whose
qualified name matches no ``exclude`` pattern (``re.search``). Its f, in this order:
1. ``activations={name: table_name}``, given by the user ("explicit");
2. ``output_activation`` when the Linear's output is the model's output ("output");
3. detected: with ``torch.fx``, the Linear's output goes only into one known activation
   (module, function or Tensor-method form, as the activation table lists them); where the
   model cannot be traced, the next module of the ``nn.Sequential`` that holds the Linear
   ("detected");
4. identity ("default").
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
    shape: tuple           # the weight's (d_out, d_in)
    bias: bool
    activation: str        # f of the layer's local loss
    how: str               # "explicit", "output", "detected" or "default"


def find_layers(model: nn.Module, exclude) -> list:
    """[(qualified name, module)] of the LocoProp layers, in ``named_modules`` order."""
    patterns = [re.compile(p) for p in ((exclude,) if isinstance(exclude, str) else exclude)]
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad
            and not any(p.search(name) for p in patterns)]


def _module_activation(module: nn.Module) -> Optional[str]:
    """The table name of an activation module; None for other modules and for a known type
    that computes another function (nn.Softmax(dim=0), nn.LeakyReLU(0.2)): no detection."""
    try:
        entry = activation_of_module(module)
    except ValueError:
        return None
    return None if entry is None else entry.name


def _traced_activations(model: nn.Module, names: set) -> Optional[dict]:
    """{layer name: (table name or None, feeds the output)} from a torch.fx trace; None when
    the model cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the Sequential order
        return None
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        users = list(node.users)
        to_output = any(u.op == "output" for u in users)
        act = None
        if len(users) == 1:
            user = users[0]
            if user.op == "call_module":
                act = _module_activation(modules[user.target])
            elif user.op in ("call_function", "call_method") and user.args \
                    and user.args[0] is node:
                entry = activation_of_call(user.target, user.args, dict(user.kwargs),
                                           method=user.op == "call_method")
                act = entry.name if entry else None
        found[node.target] = (act, to_output)
    return found


def _sequential_activations(model: nn.Module) -> dict:
    """{layer name: table name} from the module after each Linear in every nn.Sequential."""
    found = {}
    for prefix, m in model.named_modules():
        if not isinstance(m, nn.Sequential):
            continue
        children = list(m.named_children())
        for (name, child), (_, nxt) in zip(children, children[1:]):
            act = _module_activation(nxt) if isinstance(child, nn.Linear) else None
            if act is not None:
                found[f"{prefix}.{name}" if prefix else name] = act
    return found


def decide_activations(model: nn.Module, layers: list, activations: Optional[dict],
                       output_activation: Optional[str]) -> list:
    """One ``LayerInfo`` per layer of ``find_layers``; see the module docstring."""
    activations = dict(activations or {})
    names = {name for name, _ in layers}
    for name, act in activations.items():
        if name not in names:
            raise ValueError(f"locoprop.{OP}: argument 'activations' names {name!r}, which is "
                             f"not a LocoProp layer (one of {sorted(names)})")
        get_activation(act, op=f"locoprop.{OP}")
    if output_activation is not None:
        get_activation(output_activation, op=f"locoprop.{OP}")
    traced = _traced_activations(model, names)
    sequential = _sequential_activations(model) if traced is None else {}
    infos = []
    for name, m in layers:
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
        infos.append(LayerInfo(name, tuple(m.weight.shape), m.bias is not None,
                               act or "identity", how))
    return infos
