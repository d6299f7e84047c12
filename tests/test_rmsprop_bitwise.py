"""lk.optim.RMSprop on the cpp backend gives torch.optim.RMSprop's numbers, BIT FOR BIT, in fp32.

For every RMSprop config of torch's own ``optim_db`` (and a few more: momentum without
centering, alpha < 0.5, which takes lerp's other branch, eps 0, a large lr), 20 steps on
fp32 parameters of odd and power-of-two sizes and a few 3x3-conv shapes (one larger than the
kernels' single-thread cutoff, so that both OpenMP paths run): after EVERY step the params and
every state tensor are ``torch.equal`` to torch's, both foreach=False and foreach=True.

Why this can hold: ``csrc/rmsprop.h`` performs torch's operations in torch's order with
torch's roundings (its CPU kernels, probed on torch 2.13: addcmul and add-with-alpha and lerp
are ONE fused multiply-add, addcdiv is ``self + (value * t1) / t2``, every scalar a Python
float rounded once to fp32); ``csrc/cpu/rmsprop.cpp`` is compiled with -ffp-contract=off so
that the compiler adds no multiply-add of its own; and the square root is torch's own:
``torch.sqrt`` of fp32 on this CPU is MKL VML's ``vmsSqrt``, which is NOT the IEEE sqrt (1 ulp
off it for ~20% of inputs), and the kernel calls that same function (``backends/cpp.py``
``torch_sqrt``). ``test_torch_cpu_kernels_round_as_probed`` pins those facts of torch's
kernels (it says which op changed if a torch upgrade breaks the bitwise tests) and shows that
on this data a fused and an unfused evaluation of each op differ in many elements, so a lost
-ffp-contract=off (GCC then fuses ``buf * momentum + g / avg``: the momentum configs fail,
checked by building so) or a reordered operation fails the bitwise tests.

With the IEEE sqrt instead (``LOCOPROP_IEEE_SQRT=1``, the faster one-pass kernel) the cpp
kernel is torch's result but for the sqrt: ``test_cpp_ieee_sqrt_is_within_bound``.

The Triton kernel follows the same order. It cannot be checked against torch bit for bit
here: on this CPU the interpreter runs it with numpy (fp32 operations, each correctly rounded,
a true fma, the IEEE sqrt), which tests the order of operations, not the GPU compile (which
has ``enable_fp_fusion=False``, so that it fuses nothing but the explicit fma's; not run here).
Under the interpreter it is bit for bit the cpp kernel with the IEEE sqrt, hence within that
kernel's bound of torch.
"""
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import locoprop_kernels as lk
from conftest import BACKENDS, requires_interpreter
from locoprop_kernels.backends import cpp

OPTIM_DB = [(o.desc, o.kwargs) for o in
            next(e for e in optim_db if e.optim_cls is torch.optim.RMSprop)
            .optim_inputs_func(device="cpu")]
EXTRA = [("momentum 0.9", {"momentum": 0.9}),
         ("alpha 0.3, centered, momentum", {"alpha": 0.3, "centered": True, "momentum": 0.7}),
         ("eps 0, maximize, momentum", {"eps": 0.0, "maximize": True, "momentum": 0.3}),
         ("lr 0.1, weight_decay, alpha 0.9", {"lr": 0.1, "weight_decay": 0.01, "alpha": 0.9})]
CONFIGS = OPTIM_DB + EXTRA
# Odd and power-of-two sizes, 3x3 convs (ResNet's, small), and 64x64x3x3 = 36864 elements,
# above the kernels' single-thread cutoff (cpu/parallel.h kParallelMin = 32768).
SHAPES = [(1,), (7,), (33,), (64,), (257,), (1024,), (1030,), (3, 5), (2, 3, 4),
          (16, 3, 3, 3), (8, 8, 3, 3), (64, 64, 3, 3)]
STEPS = 20
requires_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension")
TRITON_SHAPES = [(1,), (7,), (33,), (257,), (1030,), (8, 8, 3, 3)]  # the interpreter is slow
#: max |ours - torch| over a tensor, in units of fp32 eps * max |torch| (one ulp of the largest
#: element), after any of 20 steps, with the IEEE sqrt in place of torch's. Measured at most:
#: params 2.4 (config "momentum 0.9"; 0.65 to 1.5 for the others), square_avg 1.8, grad_avg
#: 1.7, momentum_buffer 7.6 (centered with momentum: avg = sqrt(ms - ga^2) + eps cancels).
IEEE_SQRT_BOUND = {"param": 4.0, "square_avg": 4.0, "grad_avg": 4.0, "momentum_buffer": 16.0}


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """The cpp kernel with the IEEE sqrt (what LOCOPROP_IEEE_SQRT=1 selects)."""
    monkeypatch.setattr(cpp, "torch_sqrt", lambda: (0, 0, "ieee"))


def _start(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _grads(shapes, step):
    # Mixed scales, so that square averages and updates span many binades.
    gen = torch.Generator().manual_seed(10_000 + step)
    return [torch.randn(s, generator=gen) * 10.0 ** (j % 5 - 2) for j, s in enumerate(shapes)]


def _assert_same(ours, opt_ours, theirs, opt_theirs, where):
    for j, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), (where, "param", j, _ulps(a, b))
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert sorted(sa) == sorted(sb), (where, j)
        for key in sb:
            assert torch.equal(sa[key], sb[key]), (where, key, j, _ulps(sa[key], sb[key]))


def _ulps(a, b):
    """Max distance in units in the last place (fp32 bit patterns as ordered integers)."""
    def ordered(t):
        i = t.detach().contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs().max().item()


def _optimizers(backend, kwargs, shapes, others, seed=0):
    """(params, optimizer) for ours on ``backend`` and for each of ``others`` (makers), all
    from the same start."""
    start = _start(shapes, seed)
    runs = []
    for make in [lambda ps: lk.optim.RMSprop(ps, backend=backend, **kwargs)] + others:
        params = [p.clone().requires_grad_() for p in start]
        runs.append((params, make(params)))
    return runs


def _steps(runs, shapes, steps):
    """Step every optimizer on the same gradients; yields the step index after each."""
    for step in range(steps):
        grads = _grads(shapes, step)
        for params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        yield step


def _run(backend, kwargs, shapes, steps=STEPS, seed=0):
    """ours (``backend``), torch foreach=False and torch foreach=True, stepped together;
    every step's params and states compared bitwise."""
    runs = _optimizers(backend, kwargs, shapes, [
        lambda ps: torch.optim.RMSprop(ps, foreach=False, **kwargs),
        lambda ps: torch.optim.RMSprop(ps, foreach=True, **kwargs)], seed)
    (ours, opt_ours), (single, opt_single), (multi, opt_multi) = runs
    for step in _steps(runs, shapes, steps):
        _assert_same(ours, opt_ours, single, opt_single, (step, "foreach=False"))
        _assert_same(ours, opt_ours, multi, opt_multi, (step, "foreach=True"))


def _scaled_diff(a, b):
    """max |a - b| in units of fp32 eps * max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / (torch.finfo(torch.float32).eps * b.abs().max())).item()


@requires_cpp
@pytest.mark.parametrize("kwargs", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_cpp_is_torch_bit_for_bit(kwargs):
    _run("cpp", kwargs, SHAPES)


@requires_cpp
def test_cpp_is_torch_bit_for_bit_in_param_groups():
    """Two groups with different options and one parameter without a gradient: each group
    is its own call, with its own scalars."""
    start = _start(SHAPES[:6], 1)
    groups = lambda ps: [dict(params=ps[:3], **OPTIM_DB[6][1]),  # noqa: E731
                         dict(params=ps[3:], lr=3e-3, **OPTIM_DB[5][1])]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    opt_ours = lk.optim.RMSprop(groups(ours), backend="cpp")
    opt_theirs = torch.optim.RMSprop(groups(theirs), foreach=False)
    for step in range(STEPS):
        for j, (a, b, g) in enumerate(zip(ours, theirs, _grads(SHAPES[:6], step))):
            a.grad = None if j == 4 else g.clone()
            b.grad = None if j == 4 else g.clone()
        opt_ours.step()
        opt_theirs.step()
        for j, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), (step, j)
            for key in opt_theirs.state.get(b, {}):
                assert torch.equal(opt_ours.state[a][key], opt_theirs.state[b][key])


@requires_cpp
def test_cpp_uses_torchs_sqrt():
    """The kernel takes torch's own sqrt: MKL's where torch.sqrt is not the IEEE one (this
    CPU: torch 2.13 with MKL), none (the IEEE sqrt) where it is."""
    address, mode, name = cpp.torch_sqrt()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1 << 16, generator=gen) * 4 + 0.25
    off = (x.sqrt() != x.double().sqrt().float()).float().mean().item()
    if off == 0:
        assert name == "ieee" and address == 0
    else:
        assert name == "mkl-vml" and address != 0, name
        assert mode == 0x2 | 0x140000 | 0x100  # VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
        assert 0.05 < off < 0.5  # ~20% of fp32 square roots are 1 ulp off the IEEE one here


@requires_cpp
def test_ieee_sqrt_environment_variable(monkeypatch):
    cpp.torch_sqrt.cache_clear()
    try:
        monkeypatch.setenv(cpp.IEEE_SQRT_ENV, "1")
        assert cpp.torch_sqrt() == (0, 0, "ieee (LOCOPROP_IEEE_SQRT=1)")
    finally:
        monkeypatch.delenv(cpp.IEEE_SQRT_ENV)
        cpp.torch_sqrt.cache_clear()
    assert cpp.torch_sqrt()[2] in ("mkl-vml", "ieee")


@requires_cpp
@pytest.mark.parametrize("kwargs", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_cpp_ieee_sqrt_is_within_bound(kwargs, ieee_sqrt):
    """With the IEEE sqrt the update is torch's but for the sqrt (up to an ulp of avg per step,
    through 20 steps): every tensor within IEEE_SQRT_BOUND ulps of its largest element."""
    runs = _optimizers("cpp", kwargs, SHAPES,
                       [lambda ps: torch.optim.RMSprop(ps, foreach=False, **kwargs)])
    (ours, opt_ours), (theirs, opt_theirs) = runs
    for step in _steps(runs, SHAPES, STEPS):
        for j, (a, b) in enumerate(zip(ours, theirs)):
            assert _scaled_diff(a, b) <= IEEE_SQRT_BOUND["param"], (step, j)
            for key, want in opt_theirs.state[b].items():
                if key == "step":
                    assert torch.equal(opt_ours.state[a][key], want)
                else:
                    got = _scaled_diff(opt_ours.state[a][key], want)
                    assert got <= IEEE_SQRT_BOUND[key], (step, j, key, got)


@requires_cpp
@requires_interpreter
@pytest.mark.parametrize("kwargs", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_triton_interpreted_is_cpp_with_ieee_sqrt_bit_for_bit(kwargs, ieee_sqrt):
    """The Triton kernel's order of operations, under the interpreter (module docstring: this
    is numpy's fp32 arithmetic, a true fma and the IEEE sqrt, not the GPU compile): bit for bit
    the cpp kernel with the IEEE sqrt after every step, so within IEEE_SQRT_BOUND of torch."""
    runs = _optimizers("triton", kwargs, TRITON_SHAPES,
                       [lambda ps: lk.optim.RMSprop(ps, backend="cpp", **kwargs)])
    (ours, opt_ours), (theirs, opt_theirs) = runs
    for step in _steps(runs, TRITON_SHAPES, 8):
        _assert_same(ours, opt_ours, theirs, opt_theirs, (step, "cpp, IEEE sqrt"))


# --------------------------------------------------- the facts of torch's kernels relied on


def _fma32(a, b, c):
    """fma(a, b, c) in fp32, one rounding, computed exactly (Fractions), for 1-D fp32 tensors."""
    out = []
    for x, y, z in zip(a.tolist(), b.tolist(), c.tolist()):
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        near = np.float32(float(exact))  # within an fp32 ulp of the exact value
        cands = [np.nextafter(near, np.float32(-np.inf)), near,
                 np.nextafter(near, np.float32(np.inf))]
        dist = [abs(Fraction(float(f)) - exact) for f in cands]
        best = min(dist)
        ties = [f for f, d in zip(cands, dist) if d == best]
        # ties to even: the candidate whose last significand bit is 0
        out.append(float(min(ties, key=lambda f: int(np.float32(f).view(np.int32)) & 1)))
    return torch.tensor(out, dtype=torch.float32)


def _differ(a, b):
    return (a.view(torch.int32) != b.view(torch.int32)).float().mean().item()


def test_torch_cpu_kernels_round_as_probed():
    """The rounding of each torch CPU op that torch.optim.RMSprop calls, as csrc/rmsprop.h
    reproduces it; 301 elements = vectorised body and scalar tail of torch's loops. Each
    check also shows that the alternative (fused vs not, other association) differs on this
    data, so the bitwise tests above see a change of any of them."""
    gen = torch.Generator().manual_seed(7)
    n = 301
    s, a = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    b = torch.rand(n, generator=gen) + 0.5
    v = 1.0 - 0.7  # a Python float: torch rounds it once to fp32
    vf = torch.tensor(v, dtype=torch.float32)

    # addcmul: fma(value * t1, t2, self)
    got = s.addcmul(a, b, value=v)
    assert torch.equal(got, _fma32(vf * a, b, s))
    assert _differ(got, s + (vf * a) * b) > 0.02 and _differ(got, s + vf * (a * b)) > 0.02

    # add with alpha: fma(alpha, other, self)
    got = s.add(a, alpha=v)
    assert torch.equal(got, _fma32(vf.expand(n), a, s))
    assert _differ(got, s + vf * a) > 0.02

    # lerp with a scalar weight, both branches: fma(coeff, end - start, base)
    for w in (0.3, 0.7):
        wf = torch.tensor(w, dtype=torch.float32)
        got = s.lerp(a, w)
        coeff, base = (wf, s) if w < 0.5 else (wf - 1, a)
        assert torch.equal(got, _fma32(coeff.expand(n), a - s, base))
        assert _differ(got, base + coeff * (a - s)) > 0.02

    # addcdiv: self + (value * t1) / t2, nothing fused
    got = s.addcdiv(a, b, value=v)
    assert torch.equal(got, s + (vf * a) / b)
    assert _differ(got, s + vf * (a / b)) > 0.02

    # mul by a Python float, add of one: each rounded once (fp32 scalar)
    assert torch.equal(s.mul(0.99), s * torch.tensor(0.99, dtype=torch.float32))
    m = torch.tensor(0.1, dtype=torch.float32)
    q = a / b
    assert torch.equal(s.mul(0.1).addcdiv(a, b), s * m + q)
    assert _differ(s * m + q, _fma32(s, m.expand(n), q)) > 0.02  # what contraction would give
