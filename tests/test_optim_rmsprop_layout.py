"""lk.optim.RMSprop's cached layouts: validated once, re-checked every step, rebuilt on change.

A param group's first step goes through ``lk.rmsprop_step_`` (full validation); later steps
call the backend directly after a cheap re-check (``RMSprop._fast_step``). These tests count
the op's calls to see which path a step took, and compare every result with
``torch.optim.RMSprop``: the fast path must change nothing but the host time. Also here: the
step counters (one tensor per layout, torch's 0-d steps in ``state_dict``), ``capturable``'s
checks and ``torch.compile`` of the step.
"""
import copy
import importlib
import io

import pytest
import torch

import locoprop_kernels as lk
from conftest import BACKENDS, HAS_CUDA, requires_gpu
from locoprop_kernels import backends

# The module itself: lk.optim.rmsprop is the functional core, which shadows the module's name.
rmsprop_module = importlib.import_module("locoprop_kernels.optim.rmsprop")
BACKEND = "cpp" if "cpp" in BACKENDS else "reference"
requires_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension")
SHAPES = [(3, 5), (7,), (1,), (33, 17), (2, 3, 4)]


@pytest.fixture
def op_calls(monkeypatch):
    """How many times lk.optim.RMSprop called the validating op (the slow path)."""
    calls = []
    real = rmsprop_module.rmsprop_step_

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rmsprop_module, "rmsprop_step_", counting)
    return calls


def _pair(shapes=SHAPES, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    return (ours, theirs, lk.optim.RMSprop(ours, backend=BACKEND, **kwargs),
            torch.optim.RMSprop(theirs, foreach=True, **kwargs))


def _set_grads(ours, theirs, step, skip=()):
    gen = torch.Generator().manual_seed(100 + step)
    for j, (a, b) in enumerate(zip(ours, theirs)):
        g = None if j in skip else torch.randn(a.shape, generator=gen)
        a.grad, b.grad = g, None if g is None else g.clone()


def _assert_same(ours, theirs, opt_ours, opt_theirs):
    """Bit for bit on the cpp backend (tests/test_rmsprop_bitwise.py), else 1e-6 relative."""
    for a, b in zip(ours, theirs):
        if BACKEND == "cpp":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        sa, sb = opt_ours.state.get(a, {}), opt_theirs.state.get(b, {})
        assert sorted(sa) == sorted(sb)
        for key in sb:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-6 if BACKEND != "cpp" else 0,
                                       atol=1e-7 if BACKEND != "cpp" else 0)


@requires_cpp
@pytest.mark.parametrize("new_grads", [False, True], ids=["same grads", "new grads"])
def test_161_one_element_params_bit_for_bit(new_grads, op_calls):
    """The benchmark's host-bound case: 161 one-element parameters, foreach's exact numbers."""
    ours, theirs, opt_ours, opt_theirs = _pair([(1,)] * 161, lr=1e-2, momentum=0.5)
    _set_grads(ours, theirs, 0)
    for t in range(10):
        if new_grads:
            _set_grads(ours, theirs, t)
        opt_ours.step()
        opt_theirs.step()
        _assert_same(ours, theirs, opt_ours, opt_theirs)
    assert len(op_calls) == 1  # validated on the first step only


def test_one_validation_one_launch_per_step(op_calls):
    ours, theirs, opt_ours, opt_theirs = _pair(momentum=0.9, centered=True)
    for t in range(5):
        _set_grads(ours, theirs, t)
        with lk.testing.count_launches() as n:
            opt_ours.step()
        opt_theirs.step()
        if BACKEND == "cpp":
            assert n.cpp == 1
    assert len(op_calls) == 1
    _assert_same(ours, theirs, opt_ours, opt_theirs)


def _grad_none(ours, theirs, opts):
    ours[1].grad = theirs[1].grad = None


def _param_data_replaced(ours, theirs, opts):
    with torch.no_grad():
        new = torch.randn(ours[0].shape)
        ours[0].data, theirs[0].data = new.clone(), new.clone()


def _state_replaced(ours, theirs, opts):
    for opt, p in zip(opts, (ours[3], theirs[3])):
        opt.state[p]["square_avg"] = opt.state[p]["square_avg"].clone() + 0.5


def _option_changed(ours, theirs, opts):
    for opt in opts:
        opt.param_groups[0]["alpha"] = 0.9


def _saved(opt) -> dict:
    """The state dict through torch.save and torch.load(weights_only=True), as checkpoints go
    (a live state dict shares its tensors with the optimizer, in torch's too)."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _loaded_own_state(ours, theirs, opts):
    for opt in opts:
        opt.load_state_dict(_saved(opt))


def _param_appended(ours, theirs, opts):
    for opt, params in zip(opts, (ours, theirs)):
        extra = torch.full((4,), 0.25, requires_grad=True)
        extra.grad = torch.ones(4)
        params.append(extra)
        opt.param_groups[0]["params"].append(extra)


@pytest.mark.parametrize("change", [_grad_none, _param_data_replaced, _state_replaced,
                                    _option_changed, _loaded_own_state, _param_appended])
def test_a_changed_layout_is_validated_again(change, op_calls):
    """Each change sends the next step through the op (which validates the new layout); the
    results stay torch's."""
    ours, theirs, opt_ours, opt_theirs = _pair(momentum=0.5)
    for t in range(3):
        _set_grads(ours, theirs, t)
        opt_ours.step()
        opt_theirs.step()
    assert len(op_calls) == 1
    _set_grads(ours, theirs, 3)
    change(ours, theirs, (opt_ours, opt_theirs))
    opt_ours.step()
    opt_theirs.step()
    assert len(op_calls) == 2
    for t in range(4, 6):
        _set_grads(ours, theirs, t, skip={1} if change is _grad_none else ())
        opt_ours.step()
        opt_theirs.step()
    assert len(op_calls) == 2  # the new layout holds
    _assert_same(ours, theirs, opt_ours, opt_theirs)


def _with_grad_dtype_free(p):
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch >= 2.10 checks .grad's dtype unless told not to
        return True
    return False


@pytest.mark.parametrize("bad", ["grad shape", "grad dtype", "grad aliases a param",
                                 "negative lr", "lr of two elements", "differentiable"])
def test_bad_input_after_the_layout_is_still_refused(bad):
    """The cheap re-check sends anything it does not recognise to the op, which refuses it
    before anything is written."""
    params = [torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = lk.optim.RMSprop(params, backend=BACKEND)
    for p in params:
        p.grad = torch.randn(4)
    opt.step()
    opt.step()
    group = opt.param_groups[0]
    if bad == "grad shape":
        params[0].grad.data = torch.randn(5)  # the same .grad object, other memory and shape
        error, match = ValueError, "grads\\[0\\]"
    elif bad == "grad dtype":
        if not _with_grad_dtype_free(params[0]):
            pytest.skip("this torch checks .grad's dtype itself")
        params[0].grad = torch.randn(4, dtype=torch.float64)
        error, match = TypeError, "grads\\[0\\]"
    elif bad == "grad aliases a param":
        params[0].grad = params[1].detach()
        error, match = ValueError, "aliasing"
    elif bad == "negative lr":
        group["lr"] = -1.0
        error, match = ValueError, "lr"
    elif bad == "lr of two elements":
        group["lr"] = torch.tensor([1e-2, 1e-2])
        error, match = ValueError, "lr"
    else:
        group["differentiable"] = True
        error, match = ValueError, "differentiable=True is not supported"
    before = [p.detach().clone() for p in params]
    state_before = [(p, key, value.clone()) for p, st in opt.state.items()
                    for key, value in st.items()]
    with pytest.raises(error, match=match):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for p, key, value in state_before:
        assert torch.equal(opt.state[p][key], value)


def test_step_counters_are_one_tensor_and_saved_as_torchs():
    ours, theirs, opt_ours, opt_theirs = _pair()
    for t in range(6):
        _set_grads(ours, theirs, t, skip={2} if t % 2 else ())  # parameter 2: every other step
        opt_ours.step()
        opt_theirs.step()
    steps = [opt_ours.state[p]["step"] for p in ours]
    assert [s.item() for s in steps] == [opt_theirs.state[p]["step"].item() for p in theirs]
    assert [s.item() for s in steps] == [6, 6, 3, 6, 6]
    # Every counter of the current layout (all but parameter 2 after an odd step) is a view
    # of one tensor, which a step advances in one add.
    bases = {s.untyped_storage().data_ptr() for j, s in enumerate(steps) if j != 2}
    assert len(bases) == 1 and steps[0]._base is not None
    saved = opt_ours.state_dict()
    for st in saved["state"].values():
        step = st["step"]
        assert step.shape == () and step.dtype == torch.float32 and step.device.type == "cpu"
        assert step._base is None and step.untyped_storage().nbytes() == 4
    assert opt_ours.state[ours[0]]["step"]._base is not None  # the live state is untouched
    # torch.optim.RMSprop takes it and goes on counting from there, and so do we from torch's.
    opt_theirs.load_state_dict(_saved(opt_ours))
    opt_ours.load_state_dict(_saved(opt_theirs))
    _set_grads(ours, theirs, 6)
    opt_ours.step()
    opt_theirs.step()
    assert [opt_ours.state[p]["step"].item() for p in ours] == [7, 7, 4, 7, 7]
    assert [opt_theirs.state[p]["step"].item() for p in theirs] == [7, 7, 4, 7, 7]
    _assert_same(ours, theirs, opt_ours, opt_theirs)


def test_deepcopy_steps_on_its_own_tensors(op_calls):
    ours, theirs, opt_ours, opt_theirs = _pair(momentum=0.5)
    for t in range(2):
        _set_grads(ours, theirs, t)
        opt_ours.step()
        opt_theirs.step()
    twin = copy.deepcopy(opt_ours)
    twin_params = twin.param_groups[0]["params"]
    for p, q in zip(twin_params, ours):
        assert p is not q and torch.equal(p, q)
    for t in range(2, 4):
        _set_grads(ours, theirs, t)
        for p, q in zip(twin_params, ours):
            p.grad = q.grad.clone()
        opt_ours.step()
        twin.step()
        opt_theirs.step()
    _assert_same(ours, theirs, opt_ours, opt_theirs)
    for p, q in zip(twin_params, ours):
        assert torch.equal(p, q)


@requires_cpp
def test_backend_environment_variable_is_honoured(monkeypatch):
    ours, theirs, opt_ours, opt_theirs = _pair()
    opt_ours.param_groups[0]["backend"] = None  # auto: cpp here, unless LOCOPROP_BACKEND
    monkeypatch.delenv("LOCOPROP_BACKEND", raising=False)
    for t, env in enumerate([None, None, "reference", "reference", None]):
        if env is None:
            monkeypatch.delenv("LOCOPROP_BACKEND", raising=False)
        else:
            monkeypatch.setenv("LOCOPROP_BACKEND", env)
        _set_grads(ours, theirs, t)
        with lk.testing.count_launches() as n:
            opt_ours.step()
        opt_theirs.step()
        assert n.cpp == (0 if env else 1)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_capturable_needs_a_backend_a_graph_can_capture():
    """torch's contract for capturable=True: a step with no host sync. A backend that reads a
    device lr on the host (or cannot be captured) is refused for it; CUDA itself is not here,
    so the check is called as the step calls it, on the backends' own answers."""
    check = rmsprop_module._check_capturable
    cuda = torch.device("cuda")
    for name in BACKENDS:
        be = backends.resolve("rmsprop_step_", name, torch.device("cpu"))
        if be.can_capture_graph(cuda):
            check("RMSprop.step", be, cuda)
        else:
            with pytest.raises(ValueError, match=f"backend '{name}' on cuda cannot"):
                check("RMSprop.step", be, cuda)
    assert backends.resolve("rmsprop_step_", "triton", torch.device("cpu")).can_capture_graph(
        cuda)  # the backend auto picks on CUDA
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="capturable=True needs parameters on CUDA"):
        lk.optim.RMSprop([p], capturable=True)  # torch refuses CPU parameters too


@requires_gpu
def test_capturable_step_replays_in_a_cuda_graph():
    """Warm up eagerly, capture one step, replay it: torch's capturable RMSprop's numbers, the
    device lr followed by every replay, the counters on the device."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    grads = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    lr_ours, lr_theirs = torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")
    opt_ours = lk.optim.RMSprop(ours, lr=lr_ours, momentum=0.5, capturable=True)
    opt_theirs = torch.optim.RMSprop(theirs, lr=lr_theirs, momentum=0.5, capturable=True,
                                     foreach=True)
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt_ours.step()
            opt_theirs.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_ours.step()
    for k in range(4):
        lr_ours.fill_(1e-2 / (k + 1))
        lr_theirs.fill_(1e-2 / (k + 1))
        graph.replay()
        opt_theirs.step()
    torch.cuda.synchronize()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(opt_ours.state[p]["step"].device.type == "cuda" for p in ours)
    assert [opt_ours.state[p]["step"].item() for p in ours] == [7] * len(ours)


def test_capture_of_a_step_that_is_not_capturable_raises_as_torchs(monkeypatch):
    """torch's own health check runs first in step (on this machine: no accelerator, so it
    passes); faked here as capturing, it raises before anything is written."""
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    opt = lk.optim.RMSprop([p], backend=BACKEND)
    name = ("_accelerator_graph_capture_health_check"
            if hasattr(opt, "_accelerator_graph_capture_health_check")
            else "_cuda_graph_capture_health_check")

    def capturing():
        raise RuntimeError("Attempting CUDA graph capture of step() for an instance of "
                           "RMSprop but param_groups' capturable is False.")

    monkeypatch.setattr(opt, name, capturing)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="capturable is False"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


def test_compiled_step_equals_eager():
    """torch.compile(opt.step) (the step goes through the op, which Dynamo sees as one custom
    op) after eager steps (so the counters are views of one tensor): eager's numbers."""
    torch._dynamo.reset()
    ours, theirs, opt_ours, opt_theirs = _pair(lr=torch.tensor(1e-2), momentum=0.5,
                                               centered=True)
    eager = [p.detach().clone().requires_grad_() for p in ours]
    opt_eager = lk.optim.RMSprop(eager, backend=BACKEND, lr=torch.tensor(1e-2), momentum=0.5,
                                 centered=True)
    compiled_step = torch.compile(opt_ours.step)
    for t in range(5):
        _set_grads(ours, theirs, t)
        for p, q in zip(eager, ours):
            p.grad = q.grad.clone()
        (compiled_step if t in (2, 3) else opt_ours.step)()
        opt_eager.step()
        opt_theirs.step()
    for a, b in zip(ours, eager):
        assert torch.equal(a, b)
    assert [opt_ours.state[p]["step"].item() for p in ours] == [5] * len(ours)
    _assert_same(ours, theirs, opt_ours, opt_theirs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU's default backend")
def test_first_step_validates_as_before(op_calls):
    """A group with no gradients builds an empty layout; the first gradient then rebuilds."""
    p = torch.randn(3, requires_grad=True)
    opt = lk.optim.RMSprop([p], backend=BACKEND)
    opt.step()
    opt.step()
    assert op_calls == [] and not opt.state
    p.grad = torch.randn(3)
    opt.step()
    opt.step()
    assert len(op_calls) == 1 and opt.state[p]["step"].item() == 2


def test_steps_bump_autograd_versions():
    """Every step writes the parameters in place as far as autograd can tell (as torch's
    in-place updates do): a graph that saved a parameter before the step refuses backward."""
    p = torch.randn(4, requires_grad=True)
    opt = lk.optim.RMSprop([p], backend=BACKEND)
    for _ in range(3):  # the third step takes the cached layout
        p.grad = torch.randn(4)
        loss = (p * p).sum()
        version = p._version
        opt.step()
        assert p._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_layout_does_not_keep_gradients_alive():
    """zero_grad() drops the gradients; the layout must not hold them (they would double the
    gradient memory during the next backward pass)."""
    import weakref

    p = torch.randn(4, requires_grad=True)
    opt = lk.optim.RMSprop([p], backend=BACKEND)
    for _ in range(3):
        p.grad = torch.randn(4)
        opt.step()
    last = weakref.ref(p.grad)
    opt.zero_grad()
    assert p.grad is None and last() is None
