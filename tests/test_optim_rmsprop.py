"""lk.optim.RMSprop against torch.optim.RMSprop(foreach=False), on torch's own test inputs.

The configurations are the RMSprop entry of ``torch.testing._internal.common_optimizers.optim_db``
(default, lr, weight_decay, maximize, centered, momentum and their combinations). Each runs 20
steps on 9 parameters of mixed shapes (one without a gradient) in two param groups with
different options; every backend in fp32 (1e-6 relative), the reference in fp64, bf16
parameters with fp32 state to bf16 rounding.

"Relative" is normwise over the whole model (max|ours - torch| / max|torch| over every
parameter, and likewise per state key), the project's error measure. Per tensor the bound is
1e-5: torch's own fp32 result is 6.6e-7 away from its float64 result on the 1-element
parameter of the "centered" configuration (its value drifts to 0.008 while the updates are
1e-2, and v = ms - ga^2 cancels), so a per-tensor 1e-6 would test rounding order, not the
update.
"""
import copy
import io

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import locoprop_kernels as lk
from conftest import BACKENDS, HAS_CUDA

CONFIGS = [(o.desc, o.kwargs) for o in
           next(e for e in optim_db if e.optim_cls is torch.optim.RMSprop)
           .optim_inputs_func(device="cpu")]
SHAPES = [(3, 5), (7,), (1,), (33, 17), (2, 3, 4), (1030,), (16, 16), (5, 1, 3), (2,)]
NO_GRAD = 4  # index of the parameter that never gets a gradient (skipped, as torch skips it)


def _device(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def _groups(params, i):
    """Two param groups: config i on the first five tensors, config i+1 on the rest."""
    first, second = CONFIGS[i][1], CONFIGS[(i + 1) % len(CONFIGS)][1]
    return [dict(params=params[:5], **first), dict(params=params[5:], **{"lr": 2e-3, **second})]


def _grads(step, dtype, device):
    gen = torch.Generator().manual_seed(1000 + step)
    return [None if j == NO_GRAD else torch.randn(s, generator=gen, dtype=torch.float64)
            .to(device=device, dtype=dtype) for j, s in enumerate(SHAPES)]


def _run_pair(i, backend, dtype, steps=20):
    device = _device(backend)
    gen = torch.Generator().manual_seed(i)
    start = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)
             for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    opt_ours = lk.optim.RMSprop(_groups(ours, i), backend=backend)
    opt_theirs = torch.optim.RMSprop(_groups(theirs, i), foreach=False)
    for t in range(steps):
        for a, b, g in zip(ours, theirs, _grads(t, dtype, device)):
            a.grad = None if g is None else g.clone()
            b.grad = None if g is None else g.clone()
        opt_ours.step()
        opt_theirs.step()
    return ours, theirs, opt_ours, opt_theirs


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _rel_model(ours, theirs):
    """Normwise relative error over all tensors together (complex as pairs of reals)."""
    flat = lambda ts: torch.cat([torch.view_as_real(t).flatten() if t.is_complex()  # noqa: E731
                                 else t.detach().flatten().double() for t in ts])
    return _rel(flat(ours), flat(theirs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[c[0] for c in CONFIGS])
def test_matches_torch_fp32(i, backend):
    ours, theirs, opt_ours, opt_theirs = _run_pair(i, backend, torch.float32)
    assert _rel_model(ours, theirs) <= 1e-6
    states = {}
    for j, (a, b) in enumerate(zip(ours, theirs)):
        assert _rel(a, b) <= 1e-5, (j, _rel(a, b))
        if j == NO_GRAD:
            assert opt_ours.state.get(a) is None and torch.equal(a, b)
            continue
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sb:
            if key == "step":
                assert sa[key].item() == sb[key].item() == 20
            else:
                assert _rel(sa[key], sb[key]) <= 1e-5, (j, key)
                states.setdefault(key, ([], []))
                states[key][0].append(sa[key])
                states[key][1].append(sb[key])
    for key, (mine, torchs) in states.items():
        assert _rel_model(mine, torchs) <= 1e-6, key


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[c[0] for c in CONFIGS])
def test_reference_matches_torch_fp64(i):
    ours, theirs, _, _ = _run_pair(i, "reference", torch.float64)
    for a, b in zip(ours, theirs):
        assert _rel(a, b) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_bf16_params_fp32_state(backend, grad_dtype):
    """Every step: ours (bf16 params, fp32 state) == torch on fp32 copies, rounded to bf16;
    torch's params are then reset to ours so that only one step's rounding is compared."""
    i = len(CONFIGS) - 1  # maximize, centered, weight_decay, momentum: every option on
    device = _device(backend)
    start = [torch.randn(s, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
             .to(device, torch.bfloat16) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in start]
    if grad_dtype != torch.bfloat16 and hasattr(ours[0], "grad_dtype"):
        for p in ours:
            p.grad_dtype = None  # torch >= 2.10 checks .grad's dtype unless told not to
    theirs = [p.float().requires_grad_() for p in start]
    opt_ours = lk.optim.RMSprop(_groups(ours, i), backend=backend)
    opt_theirs = torch.optim.RMSprop(_groups(theirs, i), foreach=False)
    for t in range(20):
        for a, b, g in zip(ours, theirs, _grads(t, torch.bfloat16, device)):
            a.grad = None if g is None else g.to(grad_dtype)
            b.grad = None if g is None else g.float()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            want = b.detach().to(torch.bfloat16).float()
            ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-30)
            assert ((a.detach().float() - want).abs() <= ulp).all()
            with torch.no_grad():
                b.copy_(a.float())
    for j, (a, b) in enumerate(zip(ours, theirs)):
        if j == NO_GRAD:
            continue
        for key, value in opt_theirs.state[b].items():
            if key != "step":
                assert opt_ours.state[a][key].dtype == torch.float32
                assert _rel(opt_ours.state[a][key], value) <= 1e-6


def _saved(opt):
    """The state dict through torch.save and torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_round_trip(direction):
    """Train 5 steps with one, load its state into the other, train 5 more: same as 10 steps
    of the first alone."""
    backend = "cpp" if "cpp" in BACKENDS else "reference"
    i = len(CONFIGS) - 1
    make = {"ours": lambda ps: lk.optim.RMSprop(_groups(ps, i), backend=backend),
            "torch": lambda ps: torch.optim.RMSprop(_groups(ps, i), foreach=False)}
    first, second = direction.split("->")
    start = [torch.randn(s, generator=torch.Generator().manual_seed(3)) for s in SHAPES]
    straight = [p.clone().requires_grad_() for p in start]
    resumed = [p.clone().requires_grad_() for p in start]
    opt_straight = make[first](straight)
    opt_first = make[first](resumed)

    def train(opt, params, steps):
        for t in steps:
            for p, g in zip(params, _grads(t, torch.float32, "cpu")):
                p.grad = g
            opt.step()

    train(opt_straight, straight, range(10))
    train(opt_first, resumed, range(5))
    opt_second = make[second](resumed)
    opt_second.load_state_dict(_saved(opt_first))
    assert [g["lr"] for g in opt_second.param_groups] == [g["lr"] for g in opt_first.param_groups]
    train(opt_second, resumed, range(5, 10))
    assert _rel_model(resumed, straight) <= 1e-6


def test_resume_is_bit_exact():
    backend = "cpp" if "cpp" in BACKENDS else "reference"
    start = [torch.randn(s) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in start]
    b = [p.clone().requires_grad_() for p in start]
    opt_a = lk.optim.RMSprop(a, lr=1e-2, momentum=0.5, centered=True, backend=backend)
    for t in range(3):
        for p, g in zip(a, _grads(t, torch.float32, "cpu")):
            p.grad = g
        opt_a.step()
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    opt_b = lk.optim.RMSprop(b, lr=1e-2, momentum=0.5, centered=True, backend=backend)
    opt_b.load_state_dict(_saved(opt_a))
    for t in range(3, 6):
        for p, q, g in zip(a, b, _grads(t, torch.float32, "cpu")):
            p.grad, q.grad = g, None if g is None else g.clone()
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_one_launch_for_100_tensors(backend):
    device = _device(backend)
    params = [torch.randn(3 + k % 7, 1 + k % 5, device=device, requires_grad=True)
              for k in range(100)]
    opt = lk.optim.RMSprop(params, lr=1e-3, momentum=0.9, centered=True, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    with lk.testing.count_launches() as n:
        opt.step()
    assert n[backend] == 1


def test_scheduler_moves_lr():
    """StepLR on ours and on torch's: the same lr sequence, the same weights."""
    backend = "cpp" if "cpp" in BACKENDS else "reference"
    start = [torch.randn(s) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    opt_ours = lk.optim.RMSprop(ours, lr=1e-2, backend=backend)
    opt_theirs = torch.optim.RMSprop(theirs, lr=1e-2, foreach=False)
    sched_ours = torch.optim.lr_scheduler.StepLR(opt_ours, step_size=2, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(opt_theirs, step_size=2, gamma=0.5)
    for t in range(8):
        for a, b, g in zip(ours, theirs, _grads(t, torch.float32, "cpu")):
            a.grad = g
            b.grad = None if g is None else g.clone()
        opt_ours.step()
        opt_theirs.step()
        sched_ours.step()
        sched_theirs.step()
        assert opt_ours.param_groups[0]["lr"] == opt_theirs.param_groups[0]["lr"]
    assert opt_ours.param_groups[0]["lr"] == 1e-2 / 16
    assert _rel_model(ours, theirs) <= 1e-6


def test_tensor_lr_and_closure():
    start = [torch.randn(4, 3)]
    ours = [start[0].clone().requires_grad_()]
    theirs = [start[0].clone().requires_grad_()]
    opt_ours = lk.optim.RMSprop(ours, lr=torch.tensor(0.01), backend="reference")
    opt_theirs = torch.optim.RMSprop(theirs, lr=torch.tensor(0.01), foreach=False)
    for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        def closure(params=params, opt=opt):
            opt.zero_grad()
            loss = (params[0] ** 2).sum()
            loss.backward()
            return loss
        for _ in range(3):
            loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
    assert _rel(ours[0], theirs[0]) <= 1e-6


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if "cpp" in BACKENDS else []))
def test_complex_params_as_pairs_of_reals(backend):
    start = torch.randn(5, 3, dtype=torch.complex64)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    kw = dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=0.1, maximize=True)
    opt_ours = lk.optim.RMSprop([ours], backend=backend, **kw)
    opt_theirs = torch.optim.RMSprop([theirs], foreach=False, **kw)
    for t in range(10):
        g = torch.randn(5, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(t))
        ours.grad, theirs.grad = g, g.clone()
        opt_ours.step()
        opt_theirs.step()
    assert opt_ours.state[ours]["square_avg"].dtype == torch.complex64
    assert _rel_model([ours], [theirs]) <= 1e-6


def test_style_tf_is_the_op():
    """style="tf": the same update as lk.rmsprop_step_ with style "tf" (TF1, ms from 1)."""
    p = torch.randn(6, 4, requires_grad=True)
    want = p.detach().clone()
    ms, buf = torch.ones_like(want), torch.zeros_like(want)
    opt = lk.optim.RMSprop([p], lr=1e-3, alpha=0.9, eps=1e-5, momentum=0.999, style="tf",
                           backend="reference")
    for t in range(5):
        g = torch.randn(6, 4, generator=torch.Generator().manual_seed(t))
        p.grad = g
        opt.step()
        lk.reference.rmsprop_step_([want], [g], [ms], [buf], lr=1e-3, alpha=0.9, eps=1e-5,
                                   momentum=0.999, style="tf")
    assert torch.equal(p.detach(), want)
    assert torch.equal(opt.state[p]["square_avg"], ms)


def test_refusals():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        lk.optim.RMSprop([p], differentiable=True)
    with pytest.raises(ValueError, match="style"):
        lk.optim.RMSprop([p], style="keras")
    with pytest.raises(ValueError, match="capturable=True needs parameters on CUDA"):
        lk.optim.RMSprop([p], capturable=True)
    with pytest.raises(ValueError, match="lr"):
        lk.optim.RMSprop([p], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        lk.optim.RMSprop([p], momentum=-0.5)
    with pytest.raises(ValueError, match="backend"):
        lk.optim.RMSprop([p], backend="numpy")
    opt = lk.optim.RMSprop([p])
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group(dict(params=[torch.randn(2, requires_grad=True)],
                                 weight_decay=-1.0))
    assert len(opt.param_groups) == 1  # the bad group was not added
    p.grad = torch.randn(3).to_sparse()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_fp64_runs_on_reference_unless_named():
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    p.grad = torch.randn(4, dtype=torch.float64)
    lk.optim.RMSprop([p]).step()  # auto: the reference serves fp64
    if "cpp" in BACKENDS:
        opt = lk.optim.RMSprop([p], backend="cpp")
        with pytest.raises(TypeError, match="the 'cpp' backend supports"):
            opt.step()


def test_momentum_switched_on_later():
    p = torch.randn(4, requires_grad=True)
    q = copy.deepcopy(p)
    opt = lk.optim.RMSprop([p], lr=1e-2, backend="reference")
    ref = torch.optim.RMSprop([q], lr=1e-2, foreach=False)
    p.grad, q.grad = torch.ones(4), torch.ones(4)
    opt.step()
    ref.step()
    opt.param_groups[0]["momentum"] = 0.9
    opt.step()  # torch would raise KeyError('momentum_buffer'); we start the buffer at 0
    assert torch.equal(opt.state[p]["momentum_buffer"] != 0, torch.ones(4, dtype=torch.bool))
