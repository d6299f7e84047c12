"""torch.library integration: opcheck on every op, torch.compile(fullgraph=True) over them."""
import re

import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import ops

from conftest import BACKENDS, DEVICE, f64, rel_err


def _layer(bias=True):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    y = torch.rand(9, 5, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(b), to(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_matched_loss_grad(backend, bias):
    x, w, b, y = _layer(bias)
    w0 = w + 0.1
    b0 = None if b is None else b + 0.1
    torch.library.opcheck(ops._matched_loss_grad_op,
                          (x, w, b, y, "softmax", 0.5, w0, b0, 0.3, backend, "ieee"))
    out_w = torch.empty_like(w)
    out_b = None if b is None else torch.empty_like(b)
    torch.library.opcheck(ops._matched_loss_grad_out_op,
                          (x, w, b, y, "tanh", 1.0, None, None, None, backend, "ieee",
                           out_w, out_b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_opcheck_new_activations(backend, activation):
    x, w, b, y = _layer(True)
    torch.library.opcheck(ops._matched_loss_grad_op,
                          (x, w, b, y, activation, 0.5, w + 0.1, b + 0.1, 0.3, backend, "ieee"))
    xc, wc = torch.randn(2, 3, 5, 5).to(DEVICE), torch.randn(4, 3, 3, 3).to(DEVICE)
    yc = torch.rand(2, 4, 3, 3).to(DEVICE)
    gw, gb = lk.matched_loss_grad_conv2d(xc, wc, None, yc, activation, backend=backend)
    torch.library.opcheck(ops._local_targets_op,
                          (y, torch.randn_like(y), activation, 10.0, "M", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_local_targets(backend):
    z = torch.randn(7, 4, device=DEVICE)
    # A stride-0 gradient, as `.sum().backward()` produces (NOTES: opcheck found this once).
    g = torch.ones(1, 1, device=DEVICE).expand(7, 4)
    torch.library.opcheck(ops._local_targets_op, (z, g, "sigmoid", 10.0, "M", backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["tf", "torch"])
@pytest.mark.parametrize("every_option", [False, True])
def test_opcheck_rmsprop(backend, style, every_option):
    shapes = [(4, 3), (3,)]
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    grads = [torch.randn(s, device=DEVICE) for s in shapes]
    ms = [torch.ones(s, device=DEVICE) for s in shapes]
    bufs = [torch.zeros(s, device=DEVICE) for s in shapes]
    avgs = [torch.zeros(s, device=DEVICE) for s in shapes] if every_option else []
    # lr as a value (a CPU scalar) and, with every option on, as a device tensor.
    lr = torch.full((1,), 0.1, device=DEVICE) if every_option else torch.tensor(0.1)
    torch.library.opcheck(ops._rmsprop_step_op,
                          (params, grads, ms, bufs, avgs, lr, style, 0.9, 1e-5,
                           0.1 if every_option else 0.0, 0.9, every_option, every_option,
                           backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """One compiled function that calls every op: no graph break, same numbers as eager."""
    x, w, b, y = _layer()

    def local_step(x, w, b, z, g, ms, buf):
        target = lk.local_targets(z, g, "tanh", 10.0, backend=backend)
        gw, gb = lk.matched_loss_grad(x, w, b, target, "tanh", scale=0.5, backend=backend)
        lk.rmsprop_step_([w, b], [gw, gb], ms, buf, lr=1e-3, backend=backend)
        return gw, gb

    def fresh():
        return (w.clone(), b.clone(), [torch.ones_like(w), torch.ones_like(b)],
                [torch.zeros_like(w), torch.zeros_like(b)])

    z, g = torch.randn(9, 5, device=DEVICE), torch.randn(9, 5, device=DEVICE)
    w_e, b_e, ms_e, buf_e = fresh()
    eager = local_step(x, w_e, b_e, z, g, ms_e, buf_e)
    w_c, b_c, ms_c, buf_c = fresh()
    compiled = torch.compile(local_step, fullgraph=True)
    got = compiled(x, w_c, b_c, z, g, ms_c, buf_c)
    for a, e in zip(got, eager):
        assert rel_err(a, f64(e)) <= 1e-6
    assert rel_err(w_c, f64(w_e)) <= 1e-6 and rel_err(ms_c[0], f64(ms_e[0])) <= 1e-6


# ---------------------------------------------------------------- autograd: refused clearly

def _backward_raises(op, *outputs):
    loss = sum(o.sum() for o in outputs)
    with pytest.raises(RuntimeError, match=rf"^locoprop\.{op} is not differentiable: .*"
                                           rf"locoprop_kernels\.reference\.{op}"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_ops_run_on_inputs_that_require_grad_and_refuse_backward(backend):
    x, w, b, y = _layer()
    want_w, want_b = lk.matched_loss_grad(x, w, b, y, "tanh", scale=0.5, backend=backend)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    gw, gb = lk.matched_loss_grad(xr, wr, br, y, "tanh", scale=0.5, backend=backend)
    assert gw.requires_grad and gb.requires_grad  # so that a backward reaches the op
    assert torch.equal(gw.detach(), want_w) and torch.equal(gb.detach(), want_b)
    _backward_raises("matched_loss_grad", gw, gb)
    assert wr.grad is None and xr.grad is None
    # Under no_grad (or on detached inputs) nothing is recorded.
    with torch.no_grad():
        gw, _ = lk.matched_loss_grad(xr, wr, br, y, "tanh", scale=0.5, backend=backend)
    assert not gw.requires_grad and torch.equal(gw, want_w)

    z, g = torch.randn(7, 4, device=DEVICE), torch.randn(7, 4, device=DEVICE)
    want = lk.local_targets(z, g, "sigmoid", 10.0, backend=backend)
    zr, gr = z.clone().requires_grad_(), g.clone().requires_grad_()
    got = lk.local_targets(zr, gr, "sigmoid", 10.0, backend=backend)
    assert got.requires_grad and torch.equal(got.detach(), want)
    _backward_raises("local_targets", got)
    with pytest.raises(RuntimeError, match=r"^locoprop\.local_targets is not differentiable"):
        torch.autograd.grad(got.sum(), gr)


def test_reference_named_in_the_error_is_differentiable():
    """The error points at reference.<op> for derivatives: it does give them."""
    x, w, b, y = _layer()
    w = w.double().requires_grad_()
    gw, _ = lk.reference.matched_loss_grad(x.double(), w, b.double(), y.double(), "tanh")
    (hvp,) = torch.autograd.grad(gw.sum(), w)
    assert hvp.shape == w.shape and torch.isfinite(hvp).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_autograd_registration(backend):
    """opcheck's autograd-registration and fake-tensor checks on inputs that require grad
    (its AOT gradient check would run the backward, which raises by design)."""
    x, w, b, y = _layer()
    args = (x, w.clone().requires_grad_(), b, y, "sigmoid", 1.0, None, None, None, backend,
            "ieee")
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops._matched_loss_grad_op, args, test_utils=utils)
    z = torch.randn(7, 4, device=DEVICE, requires_grad=True)
    g = torch.randn(7, 4, device=DEVICE)
    torch.library.opcheck(ops._local_targets_op, (z, g, "tanh", 10.0, "S", backend),
                          test_utils=utils)


def test_not_differentiable_op():
    """The op the backward formulas call: its fake twin describes the gradient (so a compiled
    backward traces), the real one raises. (No opcheck: it only ever raises.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        grad = torch.empty(3, 4)
        out = ops._not_differentiable_op(grad, [5, 2], torch.float64, "local_targets")
    assert out.shape == (5, 2) and out.dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"^locoprop\.matched_loss_grad is not differentiable"):
        ops._not_differentiable_op(torch.ones(3), [3], torch.float32, "matched_loss_grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_form_refuses_tensors_that_require_grad_in_grad_mode(backend):
    x, w, b, y = _layer()
    want_w, want_b = lk.matched_loss_grad(x, w, b, y, "relu", backend=backend)
    out = (torch.full_like(w, 7.0), torch.full_like(b, 7.0))
    for name, args in (("weight", (x, w.clone().requires_grad_(), b, y)),
                       ("x", (x.clone().requires_grad_(), w, b, y))):
        with pytest.raises(RuntimeError, match=rf"^locoprop\.matched_loss_grad is not "
                           rf"differentiable: it writes out=.*argument '{name}' requires grad"):
            lk.matched_loss_grad(*args, "relu", backend=backend, out=out)
        assert (out[0] == 7.0).all() and (out[1] == 7.0).all()  # nothing written
    out_w = torch.zeros_like(w, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"argument 'out_weight' requires grad"):
        lk.matched_loss_grad(x, w, b, y, "relu", backend=backend, out=(out_w, out[1]))
    # Under no_grad the same call writes, as an optimizer would call it.
    with torch.no_grad():
        lk.matched_loss_grad(x, w.clone().requires_grad_(), b, y, "relu", backend=backend,
                             out=out)
    assert torch.equal(out[0], want_w) and torch.equal(out[1], want_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rmsprop_refuses_tensors_that_require_grad_in_grad_mode(backend):
    def state():
        g = torch.Generator().manual_seed(1)
        return ([torch.randn(4, 3, generator=g).to(DEVICE), torch.randn(3, generator=g).to(DEVICE)],
                [torch.randn(4, 3, generator=g).to(DEVICE), torch.randn(3, generator=g).to(DEVICE)],
                [torch.ones(4, 3, device=DEVICE), torch.ones(3, device=DEVICE)],
                [torch.zeros(4, 3, device=DEVICE), torch.zeros(3, device=DEVICE)])

    p, g, ms, buf = state()
    lk.rmsprop_step_(p, g, ms, buf, lr=0.1, backend=backend)  # the expected result

    cases = {"params[0]": lambda s: s[0][0].requires_grad_(),
             "grads[1]": lambda s: s[1][1].requires_grad_(),
             "square_avgs[1]": lambda s: s[2][1].requires_grad_(),
             "momentum_bufs[0]": lambda s: s[3][0].requires_grad_()}
    for name, mark in cases.items():
        s = state()
        mark(s)
        before = [t.detach().clone() for ts in s for t in ts]
        with pytest.raises(RuntimeError, match=rf"^locoprop\.rmsprop_step_ is not "
                           rf"differentiable: .*argument '{re.escape(name)}' requires grad "
                           rf"while grad mode is on\. Call it under torch\.no_grad\(\)"):
            lk.rmsprop_step_(*s, lr=0.1, backend=backend)
        assert all(torch.equal(t, u) for t, u in zip([t for ts in s for t in ts], before))
        with torch.no_grad():  # as optimizers call it: writes, same numbers
            lk.rmsprop_step_(*s, lr=0.1, backend=backend)
        assert torch.equal(s[0][0], p[0]) and torch.equal(s[2][1], ms[1])

    # A non-leaf param (autograd would have to record the write) and a tensor lr.
    q = state()
    q[0][0] = q[0][0].requires_grad_() * 1.0
    with pytest.raises(RuntimeError, match=r"argument 'params\[0\]' requires grad"):
        lk.rmsprop_step_(*q, lr=0.1, backend=backend)
    lr = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"argument 'lr' requires grad"):
        lk.rmsprop_step_(*state(), lr=lr, backend=backend)
    # Tensors that require grad with grad mode off: the optimizer's case.
    s = state()
    s[0][0].requires_grad_()
    with torch.no_grad():
        lk.rmsprop_step_(*s, lr=0.1, backend=backend)
    assert torch.equal(s[0][0], p[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_on_inputs_that_require_grad(backend):
    """Compiled as in eager: the forward gives the same values, a backward raises the same
    error (at run time, not while compiling)."""
    x, w, b, y = _layer()

    def fn(x, w, b, y, z, g):
        target = lk.local_targets(z, g, "tanh", 10.0, backend=backend)
        gw, gb = lk.matched_loss_grad(x, w, b, y + 0.0 * target, "tanh", backend=backend)
        return gw, gb, target

    z, g = torch.randn(9, 5, device=DEVICE), torch.randn(9, 5, device=DEVICE)
    eager = fn(x, w, b, y, z, g)
    wr, zr = w.clone().requires_grad_(), z.clone().requires_grad_()
    got = torch.compile(fn, fullgraph=True)(x, wr, b, y, zr, g)
    for a, e in zip(got, eager):
        assert a.requires_grad and rel_err(a.detach(), f64(e)) <= 1e-6
    with pytest.raises(RuntimeError, match=r"^locoprop\.(matched_loss_grad|local_targets) "
                                           r"is not differentiable"):
        got[0].sum().backward()
    assert wr.grad is None
