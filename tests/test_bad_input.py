"""Bad input: a clear ValueError/TypeError naming the op and the argument, nothing written.

Each case builds fresh arguments, snapshots every tensor, calls the op, and checks the error
type, that the message names the op and the argument, and that no tensor changed.
"""
import pytest
import torch

import locoprop_kernels as lk

from conftest import BACKENDS, DEVICE


def _mlg_args(**change):
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(6, 4, generator=g), weight=torch.randn(3, 4, generator=g),
                bias=torch.randn(3, generator=g), target=torch.rand(6, 3, generator=g),
                activation="tanh")
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    kw = dict(out=(torch.zeros(3, 4, device=DEVICE), torch.zeros(3, device=DEVICE)))
    for k, v in change.items():
        (args if k in args else kw)[k] = v(args, kw) if callable(v) else v
    return args, kw


def _rms_args(**change):
    shapes = [(3, 2), (2,)]
    args = dict(params=[torch.randn(s, device=DEVICE) for s in shapes],
                grads=[torch.randn(s, device=DEVICE) for s in shapes],
                square_avgs=[torch.ones(s, device=DEVICE) for s in shapes],
                momentum_bufs=[torch.zeros(s, device=DEVICE) for s in shapes])
    kw = dict(lr=0.1)
    for k, v in change.items():
        (args if k in args else kw)[k] = v(args, kw) if callable(v) else v
    return args, kw


def _lt_args(**change):
    args = dict(preact=torch.randn(5, 3, device=DEVICE), grad_preact=torch.randn(5, 3, device=DEVICE),
                activation="softmax", gamma=10.0)
    kw = {}
    for k, v in change.items():
        (args if k in args else kw)[k] = v(args, kw) if callable(v) else v
    return args, kw


META = torch.device("meta")
CASES = [
    # (op, builder, changes, error type, argument named in the message)
    ("matched_loss_grad", _mlg_args, dict(x=torch.randn(4)), ValueError, "x"),
    ("matched_loss_grad", _mlg_args, dict(x=lambda a, k: a["x"][:0]), ValueError, "x"),
    ("matched_loss_grad", _mlg_args, dict(x=lambda a, k: a["x"].long()), TypeError, "x"),
    ("matched_loss_grad", _mlg_args, dict(weight=lambda a, k: a["weight"][:, :3]), ValueError, "weight"),
    # Mixed precision (ops module docstring): the weight sets the compute dtype; x and target
    # may be lower-precision halves of an fp32/fp64 weight, nothing else mixes.
    # fp32 x with an fp64 weight: not a half operand.
    ("matched_loss_grad", _mlg_args, dict(weight=lambda a, k: a["weight"].double()), TypeError, "x"),
    # A weight less precise than x (fp32 x, bf16 weight): the weight is named.
    ("matched_loss_grad", _mlg_args, dict(weight=lambda a, k: a["weight"].bfloat16()), TypeError, "weight"),
    # fp16 x with a bf16 weight (and bias, target): halves do not mix with each other.
    ("matched_loss_grad", _mlg_args, dict(weight=lambda a, k: a["weight"].bfloat16(),
                                          bias=lambda a, k: a["bias"].bfloat16(),
                                          target=lambda a, k: a["target"].bfloat16(),
                                          x=lambda a, k: a["x"].half()), TypeError, "x"),
    # A target more precise than a bf16 weight (x, bias bf16 too).
    ("matched_loss_grad", _mlg_args, dict(weight=lambda a, k: a["weight"].bfloat16(),
                                          bias=lambda a, k: a["bias"].bfloat16(),
                                          x=lambda a, k: a["x"].bfloat16()), TypeError, "target"),
    # fp64 and integer targets under an fp32 weight.
    ("matched_loss_grad", _mlg_args, dict(target=lambda a, k: a["target"].double()), TypeError, "target"),
    ("matched_loss_grad", _mlg_args, dict(target=lambda a, k: a["target"].long()), TypeError, "target"),
    # bf16 x is fine with an fp32 weight, but bias and anchors are parameters: weight's dtype.
    ("matched_loss_grad", _mlg_args, dict(x=lambda a, k: a["x"].bfloat16(),
                                          bias=lambda a, k: a["bias"].bfloat16()), TypeError, "bias"),
    ("matched_loss_grad", _mlg_args, dict(x=lambda a, k: a["x"].bfloat16(), eta=0.5,
                                          anchor_weight=lambda a, k: a["weight"].bfloat16(),
                                          anchor_bias=lambda a, k: a["bias"]), TypeError,
     "anchor_weight"),
    ("matched_loss_grad", _mlg_args, dict(weight=lambda a, k: a["weight"].to(META)), TypeError, "weight"),
    ("matched_loss_grad", _mlg_args, dict(bias=lambda a, k: a["bias"][:2]), ValueError, "bias"),
    ("matched_loss_grad", _mlg_args, dict(target=lambda a, k: a["target"].T), ValueError, "target"),
    ("matched_loss_grad", _mlg_args, dict(activation="quick_gelu"), ValueError, "activation"),
    ("matched_loss_grad", _mlg_args, dict(eta=0.5), ValueError, "anchor_weight"),
    ("matched_loss_grad", _mlg_args, dict(eta=-1.0, anchor_weight=lambda a, k: a["weight"],
                                          anchor_bias=lambda a, k: a["bias"]), ValueError, "eta"),
    ("matched_loss_grad", _mlg_args, dict(scale=float("nan")), ValueError, "scale"),
    ("matched_loss_grad", _mlg_args, dict(backend="cuda"), ValueError, "backend"),
    ("matched_loss_grad", _mlg_args, dict(out=lambda a, k: (k["out"][0][:2], k["out"][1])),
     ValueError, "out_weight"),
    ("matched_loss_grad", _mlg_args, dict(out=lambda a, k: (a["weight"], k["out"][1])),
     ValueError, "out_weight"),
    ("matched_loss_grad", _mlg_args, dict(out=lambda a, k: (k["out"][0], k["out"][0][0, :3])),
     ValueError, "out_bias"),
    ("matched_loss_grad", _mlg_args, dict(out=lambda a, k: (k["out"][0], None)), ValueError, "out_bias"),
    ("local_targets", _lt_args, dict(grad_preact=lambda a, k: a["grad_preact"][:4]), ValueError, "grad_preact"),
    ("local_targets", _lt_args, dict(preact=lambda a, k: a["preact"][:0]), ValueError, "preact"),
    ("local_targets", _lt_args, dict(variant="X"), ValueError, "variant"),
    ("local_targets", _lt_args, dict(activation="Tanh"), ValueError, "activation"),
    ("local_targets", _lt_args, dict(gamma="10"), TypeError, "gamma"),
    # local_targets does not mix dtypes: grad_preact has preact's.
    ("local_targets", _lt_args, dict(grad_preact=lambda a, k: a["grad_preact"].bfloat16()),
     TypeError, "grad_preact"),
    ("rmsprop_step_", _rms_args, dict(grads=lambda a, k: a["grads"][:1]), ValueError, "grads"),
    ("rmsprop_step_", _rms_args, dict(grads=lambda a, k: [a["grads"][0].T, a["grads"][1]]), ValueError, "grads[0]"),
    ("rmsprop_step_", _rms_args, dict(square_avgs=lambda a, k: [s.half() for s in a["square_avgs"]]),
     TypeError, "square_avgs[0]"),
    ("rmsprop_step_", _rms_args, dict(params=lambda a, k: [a["params"][0], a["params"][0][0]]),
     ValueError, "params[1]"),
    ("rmsprop_step_", _rms_args, dict(grads=lambda a, k: [a["params"][0], a["grads"][1]]),
     ValueError, "params[0]"),
    ("rmsprop_step_", _rms_args, dict(momentum_bufs=lambda a, k: a["square_avgs"]), ValueError, "momentum_bufs["),
    ("rmsprop_step_", _rms_args, dict(momentum_bufs=None), ValueError, "momentum_bufs"),
    ("rmsprop_step_", _rms_args, dict(params=lambda a, k: [a["params"][0], a["params"][1].to(META)]),
     TypeError, "params[1]"),
    ("rmsprop_step_", _rms_args, dict(params=[]), ValueError, "params"),
    ("rmsprop_step_", _rms_args, dict(lr=-1.0), ValueError, "lr"),
    ("rmsprop_step_", _rms_args, dict(style="adam"), ValueError, "style"),
    ("rmsprop_step_", _rms_args, dict(square_avgs=lambda a, k: [torch.ones(1).expand(3, 2), a["square_avgs"][1]]),
     ValueError, "square_avgs[0]"),
]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[4]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(backend, case):
    op, build, changes, error, arg = case
    args, kw = build(**changes)
    kw.setdefault("backend", backend)
    snapshot = [(t, t.clone()) for t in _tensors((args, kw)) if t.device != META]
    with pytest.raises(error) as info:
        getattr(lk, op)(**args, **kw)
    message = str(info.value)
    # arg ends in "[" where any element may be the one named (memory order decides which)
    assert f"locoprop.{op}" in message and f"'{arg}" in message, message
    for t, before in snapshot:
        assert torch.equal(t, before) or (t.isnan() == before.isnan()).all(), message


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, kw = _mlg_args()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lk.matched_loss_grad(**args, **{**kw, "backend": "triton"})


@pytest.mark.skipif(DEVICE != "cpu", reason="fp64 on the triton backend is refused on any device")
def test_triton_refuses_float64():
    x = torch.randn(3, 2, dtype=torch.float64)
    w = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="'triton' backend"):
        lk.matched_loss_grad(x, w, None, torch.rand(3, 4, dtype=torch.float64), "relu",
                             backend="triton")
