"""LocoProp checkpoints: round trip, resume == uninterrupted, across devices and dtypes, and
state dicts from another model refused with the trainer left exactly as it was.

(``tests/test_trainer.py`` has the bit-for-bit resume on the default backends; this file adds
the round trip, every kind of mismatch, and device/dtype moves.)
"""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import locoprop_kernels as lk

from conftest import BACKENDS, HAS_CUDA, requires_interpreter

SIZES = [7, 5, 3, 7]
H = dict(lr=1e-3, inner_steps=3, momentum=0.9, eta=0.5)
# The models here live on the CPU: the triton backend runs them only under the interpreter.
CPU_BACKENDS = [pytest.param(b, marks=requires_interpreter) if b == "triton" else b
                for b in BACKENDS]


def bce(logits, x):
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def make_model(sizes=SIZES, acts=(nn.Tanh, nn.Identity), bias=True, seed=0,
               dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
        lin = nn.Linear(d_in, d_out, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.6)
            if bias:
                lin.bias.copy_(torch.randn(d_out, generator=g) * 0.3)
        mods.append(lin)
        if i < len(acts):
            mods.append(acts[i]())
    return nn.Sequential(*mods).to(device, dtype)


def batches(n, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(6, SIZES[0], generator=g).to(device, dtype) for _ in range(n)]


def snapshot(opt):
    """Everything a load could change, copied."""
    return dict(params=opt.params.buffer.clone(), square_avgs=opt.square_avgs.buffer.clone(),
                momentum_bufs=opt.momentum_bufs.buffer.clone(), lr=opt.lr, steps=opt.steps,
                model=[p.detach().clone() for p in opt.model.parameters()])


def assert_same(a, b):
    for key in ("params", "square_avgs", "momentum_bufs"):
        assert torch.equal(a[key], b[key]), key
    assert a["lr"] == b["lr"] and a["steps"] == b["steps"]
    assert all(torch.equal(x, y) for x, y in zip(a["model"], b["model"]))


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_round_trip(backend):
    """state_dict -> bytes -> a fresh trainer (other weights) -> the same state dict, and the
    model shows the loaded weights."""
    opt = lk.LocoProp(make_model(), bce, backend=backend, **H)
    for x in batches(2):
        opt.step(x, x)
    opt.lr = 3e-3
    sd = opt.state_dict()
    other = lk.LocoProp(make_model(seed=5), bce, backend=backend, **H)
    other.load_state_dict(save_load(sd))
    assert_same(snapshot(other), snapshot(opt))
    again = other.state_dict()
    assert again["layers"] == sd["layers"] and again["settings"] == sd["settings"]
    x = batches(1, seed=3)[0]
    assert torch.equal(other.model(x), opt.model(x))
    # the state dict is a copy: training on does not change it
    params = sd["params"].clone()
    opt.step(x, x)
    assert torch.equal(sd["params"], params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_resume_equals_uninterrupted(backend):
    xs = batches(5)
    full = lk.LocoProp(make_model(), bce, backend=backend, **H)
    want = [full.step(x, x) for x in xs]
    first = lk.LocoProp(make_model(), bce, backend=backend, **H)
    for x in xs[:3]:
        first.step(x, x)
    resumed = lk.LocoProp(make_model(seed=7), bce, backend=backend, **H)
    resumed.load_state_dict(save_load(first.state_dict()))
    got = [resumed.step(x, x) for x in xs[3:]]
    assert torch.equal(torch.stack(got), torch.stack(want[3:]))
    assert_same(snapshot(resumed), snapshot(full))


def _mismatches():
    """(name, trainer-maker of the OTHER model, or a state-dict edit, expected message)."""
    other = lambda **kw: (lambda: lk.LocoProp(make_model(**kw), bce, backend="reference", **H))  # noqa: E731
    return [
        ("width", other(sizes=[7, 5, 4, 7]), "layer 1"),
        ("depth", other(sizes=[7, 5, 7], acts=(nn.Tanh,)), "layers"),
        ("activation", other(acts=(nn.Sigmoid, nn.Identity)), "layer 0"),
        ("no-bias", other(bias=False), "layer 0"),
        ("input width", other(sizes=[6, 5, 3, 6]), "layer 0"),
    ]


@pytest.mark.parametrize("name,make_other,match", _mismatches(), ids=lambda v: v if isinstance(v, str) else "")
def test_other_model_refused_trainer_unchanged(name, make_other, match):
    opt = lk.LocoProp(make_model(), bce, backend="reference", **H)
    x = batches(1)[0]
    opt.step(x, x)
    other = make_other()
    y = torch.rand(6, other.layers[0].d_in)
    other.step(y, y)
    other.lr = 9.0
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match) as info:
        opt.load_state_dict(other.state_dict())
    assert "locoprop.LocoProp" in str(info.value) and "state_dict" in str(info.value)
    assert_same(snapshot(opt), before)


def _edited(sd, **change):
    sd = dict(sd)
    for k, v in change.items():
        if v is KeyError:
            del sd[k]
        else:
            sd[k] = v(sd) if callable(v) else v
    return sd


BROKEN = [
    ("missing params", dict(params=KeyError), ValueError, "params"),
    ("missing layers", dict(layers=KeyError), ValueError, "layers"),
    ("short params", dict(params=lambda sd: sd["params"][:-1]), ValueError, "params"),
    ("2-D state", dict(square_avgs=lambda sd: sd["square_avgs"].view(1, -1)), ValueError,
     "square_avgs"),
    ("not a tensor", dict(momentum_bufs=lambda sd: sd["momentum_bufs"].tolist()), ValueError,
     "momentum_bufs"),
    ("meta state", dict(square_avgs=lambda sd: sd["square_avgs"].to("meta")), ValueError,
     "square_avgs"),
    ("integer state", dict(momentum_bufs=lambda sd: sd["momentum_bufs"].long()), ValueError,
     "momentum_bufs"),
    ("negative lr", dict(lr=-1.0), ValueError, "lr"),
    ("nan lr", dict(lr=float("nan")), ValueError, "lr"),
    ("bad steps", dict(steps="three"), (ValueError, TypeError), "steps"),
    ("negative steps", dict(steps=-1), ValueError, "steps"),
]


@pytest.mark.parametrize("name,change,error,match", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_state_dict_refused_trainer_unchanged(name, change, error, match):
    opt = lk.LocoProp(make_model(), bce, backend="reference", **H)
    x = batches(1)[0]
    opt.step(x, x)
    sd = opt.state_dict()
    sd["params"] = sd["params"] + 1.0  # a load that got through would be visible
    opt.step(x, x)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(_edited(sd, **change))
    assert_same(snapshot(opt), before)


def test_not_a_dict_refused():
    opt = lk.LocoProp(make_model(), bce, backend="reference", **H)
    with pytest.raises(TypeError, match="state_dict"):
        opt.load_state_dict([1, 2])


def test_load_into_another_dtype():
    """A float64 checkpoint loads into a float32 trainer (values cast once) and back."""
    opt64 = lk.LocoProp(make_model(dtype=torch.float64), bce, **H)
    for x in batches(2, dtype=torch.float64):
        opt64.step(x, x)
    opt32 = lk.LocoProp(make_model(seed=3), bce, backend="reference", **H)
    opt32.load_state_dict(save_load(opt64.state_dict()))
    sd64 = opt64.state_dict()
    for key in ("params", "square_avgs", "momentum_bufs"):
        got = getattr(opt32, key).buffer
        assert got.dtype == torch.float32
        assert torch.equal(got, sd64[key].float())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU to move a checkpoint across devices")
@pytest.mark.parametrize("direction", ["cuda->cpu", "cpu->cuda"])
def test_load_across_devices(direction):
    """Saved on one device type, loaded on the other: the same state, and the resumed runs
    agree (fp32; the devices' kernels differ, so to 1e-4, not bit for bit)."""
    src, dst = direction.split("->")
    xs = batches(4)
    a = lk.LocoProp(make_model(device=src), bce, **H)
    for x in xs[:2]:
        a.step(x.to(src), x.to(src))
    sd = save_load(a.state_dict())
    b = lk.LocoProp(make_model(seed=4, device=dst), bce, **H)
    b.load_state_dict(sd)
    assert b.params.buffer.device.type == dst
    for key in ("params", "square_avgs", "momentum_bufs"):
        assert torch.equal(getattr(b, key).buffer.cpu(), sd[key].cpu())
    for x in xs[2:]:
        la, lb = a.step(x.to(src), x.to(src)), b.step(x.to(dst), x.to(dst))
        assert abs(la.item() - lb.item()) <= 1e-4 * abs(la.item())
    torch.testing.assert_close(b.params.buffer.cpu(), a.params.buffer.cpu(), rtol=1e-4, atol=1e-5)
