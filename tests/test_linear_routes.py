"""The triton backend's two routes for the Linear matched-loss gradient (backends/_routes.py):
"fused" (two fused Triton GEMM kernels) and "gemm" (torch.mm + our delta and finish passes).

Both routes against the float64 reference (every activation, odd and power-of-two shapes,
bias and prox on and off, fp32, half storage and mixed half inputs, each precision), forcing
a route (set_route, using_route, LOCOPROP_LINEAR_ROUTE), the chooser driven by a fake clock
(the faster wins, each key is timed once, the launch counter keeps the op's own launches),
the CPU default (fused, not timed) and the report. A spy on the kernel entry points says
which route ran: the two routes agree to rounding, so the results alone cannot.
"""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import backends, reference
from locoprop_kernels.activations import ACTIVATIONS
from locoprop_kernels.backends import _routes
from locoprop_kernels.triton_kernels import conv_matched_loss_grad

from conftest import DEVICE, HAS_CUDA, f64, rel_err, requires_gpu, requires_interpreter, random_layer

# (B, d_in, d_out): ones, odd primes, powers of two, a tile edge plus one.
SHAPES = [(1, 1, 1), (7, 33, 5), (16, 8, 32), (33, 17, 65)]
#: (bias, prox)
TERMS = [(True, True), (True, False), (False, True), (False, False)]
TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
#: tests/test_triton_precision.py's bounds and floors (normwise error vs float64).
BOUND = {"ieee": 1e-5, "tf32": 4e-3, "bf16": 1e-2}
FLOOR = {"tf32": 1e-5, "bf16": 1e-4}


@pytest.fixture(autouse=True)
def fresh_routes(monkeypatch):
    """A chooser with no decisions, no override and no environment variable for each test."""
    monkeypatch.setattr(_routes, "CHOOSER", _routes.RouteChooser())
    monkeypatch.delenv(_routes.ENV, raising=False)
    yield
    backends.set_route(None)


@pytest.fixture
def ran(monkeypatch):
    """Counts of the routes' entry points that ran: "fused" (the two-kernel launcher) and
    "gemm" (its delta pass), each still calling the real kernels."""
    counts = {"fused": 0, "gemm": 0}

    def spy(module, name, route):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            counts[route] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    import locoprop_kernels.triton_kernels as tk
    spy(tk, "matched_loss_grad_into", "fused")
    spy(conv_matched_loss_grad, "delta_rows_", "gemm")
    return counts


_layer = random_layer  # x, W, b, y, W0, b0 (conftest)


def _grad(route, x, w, b, y, activation, prox=False, w0=None, b0=None, precision="ieee"):
    """lk.matched_loss_grad on triton with ``route`` forced; the kwargs it used."""
    kw = dict(scale=1.0 / x.shape[0] if prox else 1.0, eta=0.5 if prox else None,
              anchor_weight=w0 if prox else None, anchor_bias=b0 if prox else None)
    with backends.using_route(route):
        gw, gb = lk.matched_loss_grad(x, w, b, y, activation, backend="triton",
                                      precision=precision, **kw)
    return gw, gb, kw


def _want(x, w, b, y, activation, kw):
    return reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation,
                                       scale=kw["scale"], eta=kw["eta"],
                                       anchor_weight=f64(kw["anchor_weight"]),
                                       anchor_bias=f64(kw["anchor_bias"]))


@pytest.mark.parametrize("route", _routes.ROUTES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,prox", TERMS, ids=lambda v: str(v))
def test_each_route_matches_reference(ran, route, activation, shape, bias, prox):
    x, w, b, y, w0, b0 = _layer(*shape, activation, bias)
    gw, gb, kw = _grad(route, x, w, b, y, activation, prox, w0, b0)
    rw, rb = _want(x, w, b, y, activation, kw)
    assert ran[route] == 1 and sum(ran.values()) == 1, ran
    assert gw.dtype == w.dtype and rel_err(gw, rw) <= 1e-5
    if bias:
        assert rel_err(gb, rb) <= 1e-5
    else:
        assert gb is None


@pytest.mark.parametrize("route", _routes.ROUTES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["tanh", "softmax", "relu", "gelu"])
def test_half_storage_and_mixed_half_inputs(ran, route, dtype, activation):
    """Half storage (every tensor half): the reference on the same rounded inputs, to half's
    rounding of the output. Mixed (half x and target, fp32 parameters): fp32 outputs of fp32
    math, to fp32's bound."""
    x, w, b, y, w0, b0 = _layer(19, 24, 13, activation, dtype=dtype)
    gw, gb, kw = _grad(route, x, w, b, y, activation)
    rw, rb = _want(x, w, b, y, activation, kw)
    assert gw.dtype == dtype and rel_err(gw, rw) <= TOL[dtype] and rel_err(gb, rb) <= TOL[dtype]

    x, w, b, y, w0, b0 = _layer(19, 24, 13, activation, x_dtype=dtype, seed=1)
    assert x.dtype == y.dtype == dtype and w.dtype == torch.float32
    gw, gb, kw = _grad(route, x, w, b, y, activation, True, w0, b0)
    rw, rb = _want(x, w, b, y, activation, kw)
    assert gw.dtype == torch.float32 and max(rel_err(gw, rw), rel_err(gb, rb)) <= 1e-5
    assert ran[route] == 2 and sum(ran.values()) == 2, ran


@pytest.mark.parametrize("precision", list(BOUND))
@pytest.mark.parametrize("activation", ["tanh", "softmax", "relu"])
def test_gemm_route_honours_precision(precision, activation):
    """The gemm route within each precision's bound of float64 and, where the reduced
    precision must show, above its floor: bf16 rounds the operands on every device; tf32 is
    the tensor cores' only on a GPU (the CPU's fp32 matmul has no tf32 mode)."""
    x, w, b, y, _, _ = _layer(37, 70, 45, activation, seed=len(activation))
    gw, gb, kw = _grad("gemm", x, w, b, y, activation, precision=precision)
    rw, rb = _want(x, w, b, y, activation, kw)
    assert max(rel_err(gw, rw), rel_err(gb, rb)) <= BOUND[precision]
    if precision == "bf16" or (precision == "tf32" and HAS_CUDA):
        assert rel_err(gw, rw) > FLOOR[precision], "reduced precision did not take effect"


@requires_interpreter
def test_gemm_route_bf16_rounds_the_operands_of_both_gemms():
    """bf16 on the gemm route: Z = X_r W_r^T (rounded operands, fp32 result, not rounded to
    bf16) so D equals float64 math on the rounded operands; the identity f makes D exact
    enough to predict grad_W = D_r^T X_r too (D_r: D rounded to bf16 as the route does)."""
    x, w, b, y, _, _ = _layer(29, 48, 33, "identity", seed=5)
    gw, gb, _ = _grad("gemm", x, w, b, y, "identity", precision="bf16")

    def r(t):
        return t.to(torch.bfloat16).double()
    d = r(x) @ r(w).T + f64(b) - f64(y)
    assert rel_err(gb, d.sum(0)) <= 1e-5
    assert rel_err(gw, r(d.float()).T @ r(x)) <= 1e-4
    # Not the fp32 result: the operands were rounded.
    assert rel_err(gw, (f64(x) @ f64(w).T + f64(b) - f64(y)).T @ f64(x)) > FLOOR["bf16"]


def test_set_route_env_and_their_precedence(ran, monkeypatch):
    x, w, b, y, _, _ = _layer(7, 33, 5, "tanh")

    def call():
        lk.matched_loss_grad(x, w, b, y, "tanh", backend="triton")
    monkeypatch.setenv(_routes.ENV, "gemm")
    call()
    assert ran == {"fused": 0, "gemm": 1}
    backends.set_route("fused")  # the function wins over the environment
    call()
    assert ran == {"fused": 1, "gemm": 1}
    with backends.using_route("gemm"):
        call()
        assert _routes.forced_route() == "gemm"
    assert _routes.forced_route() == "fused"  # restored after the block
    backends.set_route(None)
    assert _routes.forced_route() == "gemm"  # the environment again
    assert ran == {"fused": 1, "gemm": 2}
    assert backends.routes() == []  # forced calls decide nothing
    backends.set_route("auto")  # measure even though the environment forces gemm
    assert _routes.forced_route() is None


def test_bad_route_values_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="set_route expected one of"):
        backends.set_route("cublas")
    with pytest.raises(ValueError, match="set_route"):
        with backends.using_route("fast"):
            pass
    monkeypatch.setenv(_routes.ENV, "Gemm")
    x, w, b, y, _, _ = _layer(4, 3, 2, "tanh")
    with pytest.raises(ValueError, match=f"{_routes.ENV} expected one of"):
        lk.matched_loss_grad(x, w, b, y, "tanh", backend="triton")


class FakeClock:
    """A timer with given times per route; it runs every route once, as a real timer would,
    and records which keys' runs it was handed."""

    def __init__(self, **ms):
        self.ms, self.calls = ms, 0

    def __call__(self, runs):
        self.calls += 1
        assert set(runs) == set(_routes.ROUTES)
        for run in runs.values():
            run()
        return dict(self.ms)


@pytest.mark.parametrize("faster", _routes.ROUTES)
def test_chooser_picks_the_faster_once_per_key(ran, monkeypatch, faster):
    slower = "fused" if faster == "gemm" else "gemm"
    clock = FakeClock(**{faster: 1.0, slower: 3.0})
    monkeypatch.setattr(_routes, "CHOOSER", _routes.RouteChooser(timer=clock))
    x, w, b, y, w0, b0 = _layer(7, 33, 5, "softmax")
    with lk.testing.count_launches() as n:
        gw, gb, kw = _grad(None, x, w, b, y, "softmax")
    # The clock ran each route once, then the winner wrote the result.
    assert clock.calls == 1 and ran == {faster: 2, slower: 1}
    assert n.triton == 2, "the measurement's launches were counted as the op's"
    rw, rb = _want(x, w, b, y, "softmax", kw)
    assert max(rel_err(gw, rw), rel_err(gb, rb)) <= 1e-5
    _grad(None, x, w, b, y, "softmax")  # cached: no timing
    assert clock.calls == 1 and ran == {faster: 3, slower: 1}
    _grad(None, *_layer(8, 33, 5, "softmax")[:4], "softmax")  # another batch size
    _grad(None, *_layer(7, 33, 5, "tanh")[:4], "tanh")  # another activation kind
    assert clock.calls == 3
    x16 = x.half()
    _grad(None, x16, w, b, y.half(), "softmax")  # another x dtype
    _grad(None, x, w, b, y, "softmax", True, w0, b0)  # prox on
    assert clock.calls == 5
    decisions = backends.routes()
    assert len(decisions) == 5 and {d.route for d in decisions} == {faster}
    first = decisions[0]
    assert first.key == _routes.RouteKey(7, 33, 5, "softmax", "float32", "float32", "ieee",
                                         False, str(x.device))
    assert (first.how, first.fused_ms, first.gemm_ms) == (
        "timed", clock.ms["fused"], clock.ms["gemm"])
    backends.clear_routes()
    _grad(None, x, w, b, y, "softmax")
    assert clock.calls == 6 and len(backends.routes()) == 1


def test_a_tie_goes_to_fused(ran, monkeypatch):
    monkeypatch.setattr(_routes, "CHOOSER", _routes.RouteChooser(timer=FakeClock(fused=2.0,
                                                                                 gemm=2.0)))
    _grad(None, *_layer(5, 6, 7, "relu")[:4], "relu")
    assert backends.routes()[0].route == "fused"


@requires_interpreter
def test_on_the_cpu_the_route_is_fused_and_not_timed(ran):
    x, w, b, y, _, _ = _layer(7, 33, 5, "tanh")
    _grad(None, x, w, b, y, "tanh")
    assert ran == {"fused": 1, "gemm": 0}
    (decision,) = backends.routes()
    assert (decision.route, decision.how, decision.fused_ms, decision.gemm_ms) == (
        "fused", "not timed (device cpu)", None, None)


def test_report_lists_every_decision(monkeypatch):
    assert "no key decided yet" in backends.routes_report()
    monkeypatch.setattr(_routes, "CHOOSER", _routes.RouteChooser(
        timer=FakeClock(fused=0.25, gemm=0.125)))
    x, w, b, y, w0, b0 = _layer(9, 6, 4, "sigmoid")
    _grad(None, x, w, b, y, "sigmoid", True, w0, b0, precision="tf32")
    report = backends.routes_report()
    assert "chosen per key" in report
    row = [line for line in report.splitlines() if line.startswith("| 9 |")]
    assert row == [f"| 9 | 6 | 4 | elementwise | float32 | float32 | tf32 | yes | {x.device} "
                   f"| 0.2500 | 0.1250 | gemm | timed |"]
    with backends.using_route("fused"):
        assert "forced to fused by set_route" in backends.routes_report()
    monkeypatch.setenv(_routes.ENV, "gemm")
    assert f"forced to gemm by {_routes.ENV}" in backends.routes_report()


def test_a_registered_activation_has_only_the_fused_route(ran):
    """Its triton_f runs only inside the fused kernel: forcing gemm still runs fused, and the
    decision says why."""
    from locoprop_kernels.triton_kernels.activation import _tanh
    lk.register_activation("route_tanh", torch.tanh, triton_f=_tanh)
    try:
        x, w, b, y, _, _ = _layer(7, 5, 3, "tanh")
        gw, gb, kw = _grad("gemm", x, w, b, y, "route_tanh")
        assert ran == {"fused": 1, "gemm": 0}
        rw, rb = _want(x, w, b, y, "tanh", kw)
        assert max(rel_err(gw, rw), rel_err(gb, rb)) <= 1e-5
        (decision,) = backends.routes()
        assert decision.key.activation == "registered route_tanh"
        assert decision.route == "fused" and "registered activation" in decision.how
    finally:
        lk.unregister_activation("route_tanh")


def test_non_contiguous_outputs_on_the_gemm_route():
    x, w, b, y, w0, b0 = _layer(9, 6, 11, "softmax")
    out_w = torch.full((w.shape[1], w.shape[0]), float("nan"), device=DEVICE).T
    out_b = torch.full((2 * b.shape[0],), float("nan"), device=DEVICE)[::2]
    with backends.using_route("gemm"):
        lk.matched_loss_grad(x.T.contiguous().T, w, b, y, "softmax", backend="triton",
                             out=(out_w, out_b))
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "softmax")
    assert rel_err(out_w, rw) <= 1e-5 and rel_err(out_b, rb) <= 1e-5


@requires_gpu
@pytest.mark.parametrize("precision", list(BOUND))
def test_cuda_times_both_routes_and_the_winner_is_right(precision):
    """On the GPU the first call of a key times both routes with CUDA events; both times are
    recorded and the result (written by the winner) is within the precision's bound."""
    x, w, b, y, w0, b0 = _layer(256, 384, 512, "tanh", seed=7)
    gw, gb, kw = _grad(None, x, w, b, y, "tanh", True, w0, b0, precision=precision)
    (decision,) = backends.routes()
    assert decision.how == "timed" and decision.fused_ms > 0 and decision.gemm_ms > 0
    assert decision.route == min(("fused", decision.fused_ms), ("gemm", decision.gemm_ms),
                                 key=lambda r: r[1])[0]
    rw, rb = _want(x, w, b, y, "tanh", kw)
    assert max(rel_err(gw, rw), rel_err(gb, rb)) <= BOUND[precision]
