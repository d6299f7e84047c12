"""Each LocoProp layer's activation f, read from what a forward pass computes on its output Z.

Why the autograd graph. ``torch.fx`` cannot trace most real models (every transformers model
tried; ``nn.TransformerEncoderLayer``), and a ``TorchFunctionMode`` sees only the calls made
while it is active (not the loss a model computes after its hooks, not the inside of an
activation written as ``0.5 * x * (1 + tanh(...))`` as one op). The graph autograd records
during a forward holds every op that consumes Z, whatever code issued it, and its nodes carry
the arguments we need (GELU's ``approximate``, softmax's ``dim``, leaky_relu's slope). So, for
one forward pass with grad enabled (``Detector.observe``):

1. temporary forward hooks note each layer call's producer node ``Z.grad_fn`` and, for every
   parameter-free submodule (an activation module is one), the call's input and output nodes;
2. when the model returns, the graph is walked once from the outputs (the model's own loss
   included, as transformers models return it) and every node's consumers are listed;
3. for each layer call, the consumers of Z are read, skipping ops that keep Z's values (views,
   reshapes, transposes, clones / ``contiguous``, dtype casts; eval-mode dropout is no op):
   - consumers inside one call of a parameter-free module (the innermost one): that module is
     the consumer, and it is an activation of the table if it COMPUTES one — probed once on a
     float64 tensor (``computed_activation``), so transformers' ``NewGELUActivation``, written
     with tanh and pow, is ``gelu_tanh``, and no list of class names is needed;
   - an autograd node of a table activation (``_NODE_ACTIVATIONS``): that activation;
   - a loss with a known link (``_LOSS_LINKS``): cross-entropy / log_softmax -> softmax,
     binary_cross_entropy_with_logits -> sigmoid, mse_loss -> identity;
   - anything else: the op's name (``add``, ``mul``, ``split`` ...), the reason for identity.
   Z reaching the model's output is noted (``output_activation`` applies there).
4. f is the one activation (or link) all consumers of all calls agree on; otherwise identity,
   with the reason (``Decision``).

A model wrapped by ``torch.compile`` runs its layers inside compiled graphs (one autograd node
per graph), so its detection forward is one extra eager call of the original module on the
first batch (RNG state restored, nothing recorded): see ``LocoProp``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..activations import ACTIVATIONS, LEAKY_RELU_SLOPE

#: Autograd nodes that keep Z's values (and its feature axis, except the ones in _MOVES_AXES).
_VALUE_PRESERVING = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0",
    "CloneBackward0", "ToCopyBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "UnsqueezeBackward0", "TransposeBackward0", "TransposeBackward1",
    "TBackward0", "PermuteBackward0",
})
#: ...of which these may move the feature axis: a softmax after them is not over the features.
_MOVES_AXES = frozenset({"TransposeBackward0", "TransposeBackward1", "TBackward0",
                         "PermuteBackward0"})

#: Losses whose gradient in Z is f(Z) - target for a table f: Z's matched loss is that link.
_LOSS_LINKS = {"LogSoftmaxBackward0": "softmax",
               "BinaryCrossEntropyWithLogitsBackward0": "sigmoid",
               "MseLossBackward0": "identity"}

#: A parameter-free module call whose interior (the nodes between its input and output) has
#: more nodes than this is no activation: it is not probed (keeps the walk linear).
_MAX_INTERIOR = 256


def _saved_dim(node, attr: str = "_saved_dim") -> int:
    """A dim saved on an autograd node (stored as an unsigned 64-bit int: -1 reads 2^64 - 1)."""
    d = int(getattr(node, attr))
    return d - (1 << 64) if d >= 1 << 63 else d


def _feature_dim_matches(node, feature_dim: int, features: int, moved: bool) -> bool:
    """A softmax / log_softmax node is over Z's features: its dim is the feature axis (last
    for a Linear's (..., d_out), 1 for a Conv2d's (N, C, H, W)) with the layer's width."""
    if moved:
        return False
    result = getattr(node, "_saved_result", None)
    if result is None:
        return False
    dim = _saved_dim(node) % result.dim()
    want = feature_dim % result.dim()
    return dim == want and result.shape[dim] == features


def _node_activation(node, feature_dim: int, features: int, moved: bool) -> Optional[str]:
    """The table activation an autograd node computes on its input, if any."""
    kind = type(node).__name__
    if kind == "GeluBackward0":
        name = "gelu_tanh" if getattr(node, "_saved_approximate", "none") == "tanh" else "gelu"
    elif kind == "LeakyReluBackward0":
        slope = float(getattr(node, "_saved_negative_slope", LEAKY_RELU_SLOPE))
        name = "leaky_relu" if slope == LEAKY_RELU_SLOPE else None
    elif kind == "SoftmaxBackward0":
        name = "softmax" if _feature_dim_matches(node, feature_dim, features, moved) else None
    else:
        name = _NODE_ACTIVATIONS.get(kind)
    return name if name in ACTIVATIONS else None


#: Elementwise activation nodes (GELU, leaky_relu and softmax read their arguments above).
_NODE_ACTIVATIONS = {"TanhBackward0": "tanh", "SigmoidBackward0": "sigmoid",
                     "ReluBackward0": "relu", "SiluBackward0": "silu"}


def _op_name(node) -> str:
    """'add' for AddBackward0: how a reason names an op."""
    return re.sub(r"Backward\d*$", "", type(node).__name__).lower() or type(node).__name__


def computed_activation(module: nn.Module, feature_dim: int, ndim: int) -> Optional[str]:
    """The table activation a parameter-free module computes on a tensor of ``ndim`` dims
    whose features are on ``feature_dim``, or None. Probed once in float64 on values in
    about [-8, 8]; the tolerance (1e-5 relative, 1e-6 absolute) admits a module that computes
    in fp32 and still tells gelu from gelu_tanh (up to 4.7e-4 apart) and the slopes apart."""
    shape = [2] * ndim
    shape[feature_dim] = 11
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = module(z.clone())
    except Exception:  # noqa: BLE001 - a module that cannot take the probe computes no f
        return None
    if not isinstance(out, Tensor) or out.shape != z.shape or not out.is_floating_point():
        return None
    out = out.double()
    for name, act in ACTIVATIONS.items():
        want = act.f(z.movedim(feature_dim, -1)).movedim(-1, feature_dim)
        if torch.allclose(out, want, rtol=1e-5, atol=1e-6):
            return name
    return None


@dataclass(frozen=True)
class Decision:
    """What a forward pass showed about one layer: the activation (None: none found), how it
    was found ("detected": an activation; "loss": a loss's link) and, for None, why."""

    activation: Optional[str]
    how: Optional[str]
    to_output: bool
    reason: Optional[str] = None


class _ModuleCall:
    __slots__ = ("module", "input_node", "output_node", "interior")

    def __init__(self, module, input_node):
        self.module, self.input_node, self.output_node, self.interior = \
            module, input_node, None, None


class Detector:
    """Observes forward passes of ``model`` and decides each layer's f (module docstring).

    ``layers``: {module: (feature_dim, features)} of the LocoProp layers to decide (a Linear's
    features are its last dim, a Conv2d's dim 1). ``observe`` is a context manager around
    one forward pass; ``decisions`` holds what the passes so far decided."""

    def __init__(self, model: nn.Module, layers: dict):
        self.model = model
        self.layers = dict(layers)
        self.decisions: dict = {}
        self._probed: dict = {}
        self._candidates = [m for m in model.modules()
                            if m is not model and m not in self.layers
                            and next(m.parameters(), None) is None
                            and next(m.buffers(), None) is None]

    @property
    def pending(self) -> bool:
        return any(m not in self.decisions for m in self.layers)

    # ---------------------------------------------------------------- one forward pass

    def start(self) -> "_Pass":
        """Install the temporary hooks of one forward pass; ``finish(pass, outputs)`` reads
        the graph and removes them."""
        return _Pass(self)

    def finish(self, run: "_Pass", outputs) -> None:
        try:
            if torch.is_grad_enabled():
                self._decide(run, outputs)
        finally:
            run.remove()

    # ---------------------------------------------------------------- the graph

    def _decide(self, run: "_Pass", outputs) -> None:
        roots = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
        if not roots or not run.produced:
            return
        consumers = _consumers(roots)
        root_set = set(roots)
        calls_by_input: dict = {}
        for call in run.module_calls:
            if call.output_node is None or call.input_node is None:
                continue
            call.interior = _interior(call.output_node, call.input_node)
            if call.interior is not None:
                calls_by_input.setdefault(call.input_node, []).append(call)
        by_layer: dict = {}
        for module, node, ndim in run.produced:
            if module in self.decisions:
                continue
            feature_dim, features = self.layers[module]
            by_layer.setdefault(module, []).append(self._kinds(
                node, ndim, consumers, root_set, calls_by_input, feature_dim, features))
        for module, per_call in by_layer.items():
            self.decisions[module] = _agree(per_call)

    def _kinds(self, producer, ndim, consumers, roots, calls_by_input, feature_dim, features):
        """(set of what consumes Z: ("act", f) / ("loss", f) / ("op", name), reaches output)."""
        kinds, to_output = set(), producer in roots
        stack = [(producer, False)]
        seen = set()
        while stack:
            node, moved = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node is not producer and node in roots:
                to_output = True
            module_calls = calls_by_input.get(node, ())
            for user in consumers.get(node, ()):
                call = _innermost(module_calls, user)
                if call is not None:
                    act = self._probe(call.module, feature_dim, ndim)
                    kinds.add(("act", act) if act is not None and not (moved and act == "softmax")
                              else ("op", type(call.module).__name__))
                    continue
                name = type(user).__name__
                if name in _VALUE_PRESERVING:
                    stack.append((user, moved or name in _MOVES_AXES))
                    continue
                act = _node_activation(user, feature_dim, features, moved)
                if act is not None:
                    kinds.add(("act", act))
                elif name in _LOSS_LINKS and (name != "LogSoftmaxBackward0" or
                                              _feature_dim_matches(user, feature_dim,
                                                                   features, moved)):
                    kinds.add(("loss", _LOSS_LINKS[name]))
                else:
                    kinds.add(("op", _op_name(user)))
        return kinds, to_output

    def _probe(self, module, feature_dim, ndim):
        key = (module, feature_dim, ndim)
        if key not in self._probed:
            self._probed[key] = computed_activation(module, feature_dim, max(ndim, 2))
        return self._probed[key]


def _agree(per_call: list) -> Decision:
    """One decision from every recorded call's consumers."""
    to_output = any(out for _, out in per_call)
    kinds = set().union(*(k for k, _ in per_call))
    if len(kinds) == 1:
        (kind, name), = kinds
        if kind in ("act", "loss"):
            return Decision(name, "detected" if kind == "act" else "loss", to_output)
    if not kinds:
        return Decision(None, None, to_output,
                        "Z is the model's output (give output_activation= for its loss)"
                        if to_output else "Z is not used")
    named = sorted(f"{name}" if kind == "op" else f"{name} ({kind})" for kind, name in kinds)
    return Decision(None, None, to_output, "Z feeds " + ", ".join(named)
                    + (" (not one activation of the table)" if len(named) == 1
                       else " (more than one consumer)"))


def _innermost(calls, node) -> Optional[_ModuleCall]:
    best = None
    for call in calls:
        if node in call.interior and (best is None or len(call.interior) < len(best.interior)):
            best = call
    return best


def _tensors(value):
    """Every tensor in a nest of tuples, lists, dicts (a transformers ModelOutput is one) and
    dataclasses."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name, None))


def _consumers(roots) -> dict:
    """{node: [the nodes that take its output]} over the graph below ``roots``."""
    consumers: dict = {}
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                consumers.setdefault(child, []).append(node)
                stack.append(child)
    return consumers


def _interior(output_node, input_node) -> Optional[frozenset]:
    """The nodes a parameter-free module call created: everything below its output node down
    to its input's node. None when the call reaches a leaf (it used a tensor that requires
    grad other than its input: not an activation of its input) or has more than
    ``_MAX_INTERIOR`` nodes."""
    inside, stack = set(), [output_node]
    while stack:
        node = stack.pop()
        if node is input_node or node in inside:
            continue
        if type(node).__name__ == "AccumulateGrad" or len(inside) >= _MAX_INTERIOR:
            return None
        inside.add(node)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return frozenset(inside)


class _Pass:
    """The temporary hooks of one observed forward pass."""

    def __init__(self, detector: Detector):
        self.produced: list = []
        self.module_calls: list = []
        self._open: dict = {}
        self._handles = []
        for module in detector.layers:
            if module not in detector.decisions:
                self._handles.append(module.register_forward_hook(self._layer_output))
        for module in detector._candidates:
            self._handles.append(module.register_forward_pre_hook(self._module_input))
            self._handles.append(module.register_forward_hook(self._module_output))

    def _layer_output(self, module, inputs, output):
        if isinstance(output, Tensor) and output.grad_fn is not None:
            self.produced.append((module, output.grad_fn, output.dim()))

    def _module_input(self, module, args):
        first = args[0] if args and isinstance(args[0], Tensor) else None
        node = first.grad_fn if first is not None else None
        self._open.setdefault(module, []).append(_ModuleCall(module, node))

    def _module_output(self, module, inputs, output):
        stack = self._open.get(module)
        if not stack:
            return
        call = stack.pop()
        if isinstance(output, Tensor) and output.grad_fn is not None:
            call.output_node = output.grad_fn
            self.module_calls.append(call)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
