"""The C++ backend (``locoprop_kernels._C`` through ``backends/cpp.py``) vs the float64 reference.

Every activation, shapes with 1 / odd primes / powers of two, fp32/fp16/bf16 storage; RMSProp
both flavours (and "torch" vs torch.optim.RMSprop); one C++ call for all layers; the storage
conversions bit for bit against torch's casts; the fallback when the extension is missing;
the CUDA half (skipped without a GPU or without a CUDA build).
"""
import sys
import warnings

import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import backends, reference
from locoprop_kernels.activations import ACTIVATIONS

from conftest import HAS_CUDA, f64, rel_err, requires_gpu

pytestmark = pytest.mark.skipif(not backends.cpp_available(),
                                reason="locoprop_kernels._C is not built")

if backends.cpp_available():
    from locoprop_kernels import _C
    from locoprop_kernels.backends import cpp as cpp_backend

SHAPES = [(1, 1, 1), (7, 33, 5), (16, 8, 32), (33, 17, 257), (3, 5, 1024), (129, 3, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32: the kernels' fp32 math; half: the output's own rounding (inputs are rounded the same
# way for the reference, so only the output rounding and fp32 math remain).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ids = {"dtype": lambda d: str(d).split(".")[-1], "shape": lambda s: "x".join(map(str, s))}


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def test_build_info_names_the_parts():
    info = _C.build_info()
    assert info["cpu"] is True
    assert {"openmp", "cuda", "max_threads"} <= set(info)
    assert cpp_backend.build_info() == dict(info)


def test_activation_codes_match_the_table():
    """csrc/activation.h's enum is the table's codes: a wrong code would run another f."""
    z = _randn(4, 9, seed=0)
    for name, act in ACTIVATIONS.items():
        y = lk.local_targets(z, torch.zeros_like(z), name, 1.0, backend="cpp")
        assert rel_err(y, act.f(f64(z))) <= 1e-6, name


# ---------------------------------------------------------------------- matched_loss_grad

@pytest.mark.parametrize("dtype", DTYPES, ids=ids["dtype"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=ids["shape"])
@pytest.mark.parametrize("bias,prox", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["bias", "nobias", "bias-prox", "nobias-prox"])
def test_matched_loss_grad(dtype, activation, shape, bias, prox):
    B, d_in, d_out = shape
    x = _randn(B, d_in, seed=1, dtype=dtype)
    w = _randn(d_out, d_in, seed=2, dtype=dtype, scale=d_in ** -0.5)
    b = _randn(d_out, seed=3, dtype=dtype) if bias else None
    y = ACTIVATIONS[activation].f(_randn(B, d_out, seed=4)).to(dtype)
    w0 = (w.float() + 0.1).to(dtype) if prox else None
    b0 = (b.float() - 0.1).to(dtype) if prox and bias else None
    kw = dict(scale=1.0 / B if prox else 1.0, eta=0.5 if prox else None)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, anchor_weight=w0, anchor_bias=b0,
                                  backend="cpp", **kw)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation,
                                         anchor_weight=f64(w0), anchor_bias=f64(b0), **kw)
    assert gw.dtype == dtype and gw.shape == w.shape
    assert rel_err(gw, rw) <= TOL[dtype]
    if bias:
        assert gb.dtype == dtype and rel_err(gb, rb) <= TOL[dtype]
    else:
        assert gb is None


@pytest.mark.parametrize("bias,prox,calls", [(True, False, 2), (False, True, 2),
                                             (False, False, 1)])
def test_matched_loss_grad_calls(bias, prox, calls):
    """The epilogue around the first GEMM, and one after the second unless fp32 with
    neither bias nor prox (then the second GEMM writes the result directly)."""
    x, w, y = _randn(5, 4, seed=0), _randn(3, 4, seed=1), _randn(5, 3, seed=2)
    b = _randn(3, seed=3) if bias else None
    kw = dict(eta=1.0, anchor_weight=w.clone()) if prox else {}
    with lk.testing.count_launches() as n:
        lk.matched_loss_grad(x, w, b, y, "tanh", backend="cpp", **kw)
    assert n.cpp == calls


def test_matched_loss_grad_out_of_another_dtype_and_layout():
    """out= with a transposed fp64 weight output and an fp64 bias output."""
    x, w, b, y = _randn(6, 5, seed=0), _randn(4, 5, seed=1), _randn(4, seed=2), _randn(6, 4, seed=3)
    out_w = torch.zeros(5, 4, dtype=torch.float64).T
    out_b = torch.zeros(4, dtype=torch.float64)
    lk.matched_loss_grad(x, w, b, y, "sigmoid", out=(out_w, out_b), backend="cpp")
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "sigmoid")
    assert rel_err(out_w, rw) <= 1e-5 and rel_err(out_b, rb) <= 1e-5


@pytest.mark.parametrize("magnitude", [1e4, 3e38])
def test_delta_softmax_stays_finite(magnitude):
    """The raw epilogue on logits near fp32's limits: the row max is subtracted first."""
    z = _randn(3, 11, seed=5) * (magnitude / 4)
    y = torch.softmax(_randn(3, 11, seed=6), -1)
    d = z.clone()
    _C.matched_loss_delta(d.data_ptr(), 0, y.data_ptr(), 0, 3, 11,
                          ACTIVATIONS["softmax"].code, 2.0)
    want = 2.0 * (torch.softmax(f64(z), -1) - f64(y))
    assert torch.isfinite(d).all() and rel_err(d, want) <= 1e-6


def test_delta_elementwise_extremes():
    """tanh/sigmoid at 0, tiny, huge and infinite arguments."""
    z = torch.tensor([[0.0, -0.0, 1e-30, -1e-6, 0.1999, 0.2, 0.2001, 5.0, -9.0, 44.0, -100.0,
                       1e30, float("inf"), float("-inf")]])
    for name in ("tanh", "sigmoid", "relu", "identity"):
        d = z.clone()
        y = torch.zeros_like(z)
        _C.matched_loss_delta(d.data_ptr(), 0, y.data_ptr(), 0, 1, z.shape[1],
                              ACTIVATIONS[name].code, 1.0)
        want = ACTIVATIONS[name].f(f64(z))
        if name in ("relu", "identity"):
            assert torch.equal(d, want.float()), name
        else:
            ok = (d.double() - want).abs() <= 2e-7 * want.abs() + 1e-38
            assert ok.all(), (name, d, want)


# Very negative logits, on both sides of the point where torch's fp32 sigmoid becomes exactly 0
# (e^-z overflows for z <= -88.72284), and the normal range next to it.
SIGMOID_TAIL = [float("-inf"), -3e38, -1e30, -1e4, -200.0, -104.0, -100.0, -90.0, -88.72284,
                -88.72283, -88.5, -88.0, -87.5, -80.0, -50.0, -20.0, -1e-3, 0.0, 5.0, 100.0]


@pytest.mark.parametrize("path", ["local_targets", "matched_loss_delta"])
def test_sigmoid_goes_to_zero_for_very_negative_z(path):
    """sigmoid(z) is exactly 0 where torch's fp32 sigmoid is (it used to stay at
    1/(1 + e^88) = 6.05e-39 for every z < -88: exp_fp32 clamps its argument to 88), and
    silu = z sigmoid(z) with it: -0 instead of z * 6e-39 (-6e-9 at -1e30), NaN at -inf as in
    torch (was -inf). Both element-wise kernels (targets, and the matched-loss epilogue, which
    the Conv2d path shares) take the same f. Just above torch's zero point the kernels may
    still return the clamped 6.05e-39 where torch returns 2.9e-39..6.05e-39: within 3.2e-39
    (a subnormal), so within 3.2e-39 |z| for silu; elsewhere within 4 ulps of torch."""
    z = torch.tensor([SIGMOID_TAIL])
    zeros = torch.zeros_like(z)  # held: _C takes bare addresses
    for name, torch_f in (("sigmoid", torch.sigmoid), ("silu", torch.nn.functional.silu)):
        code = ACTIVATIONS[name].code
        if path == "local_targets":
            got = torch.empty_like(z)
            _C.local_targets(z.data_ptr(), zeros.data_ptr(), got.data_ptr(), 0, 1, z.shape[1],
                             code, 1.0)
        else:
            got = z.clone()
            _C.matched_loss_delta(got.data_ptr(), 0, zeros.data_ptr(), 0, 1, z.shape[1], code,
                                  1.0)
        want = torch_f(z)
        zero = z <= -88.72284
        finite = zero & want.isfinite()
        assert (want[finite] == 0).all(), "torch's zero point"
        # Exactly torch's values there, the NaN of silu(-inf) and the sign of -0 included.
        assert torch.equal(got[zero].isnan(), want[zero].isnan()), name
        assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32)), name
        rest = ~zero
        floor = 3.2e-39 * (z[rest].abs() if name == "silu" else 1.0)
        err = (got[rest].double() - want[rest].double()).abs()
        assert (err <= 4 * 2.0 ** -24 * want[rest].double().abs() + floor).all(), (name, got, want)
        # Monotone across the switch to 0 (sigmoid), and never above its value at -88.
        if name == "sigmoid":
            assert (got[0, 1:] >= got[0, :-1]).all(), got


# ---------------------------------------------------------------------- local_targets

@pytest.mark.parametrize("dtype", DTYPES, ids=ids["dtype"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (16, 257), (5, 1024)], ids=ids["shape"])
def test_local_targets(dtype, activation, variant, shape):
    z = _randn(*shape, seed=7, dtype=dtype, scale=3.0)
    g = _randn(*shape, seed=8, dtype=dtype, scale=1e-2)
    with lk.testing.count_launches() as n:
        y = lk.local_targets(z, g, activation, 10.0, variant=variant, backend="cpp")
    want = reference.local_targets(f64(z), f64(g), activation, 10.0, variant=variant)
    assert n.cpp == 1 and y.dtype == dtype
    assert rel_err(y, want) <= TOL[dtype]


def test_local_targets_softmax_huge_logits():
    z = _randn(4, 37, seed=9, scale=1e4)
    g = _randn(4, 37, seed=10)
    y = lk.local_targets(z, g, "softmax", 10.0, backend="cpp")
    want = reference.local_targets(f64(z), f64(g), "softmax", 10.0)
    assert torch.isfinite(y).all() and rel_err(y, want) <= 1e-6


# ---------------------------------------------------------------------- storage casts

def _cast_values():
    """fp32 values around every fp16/bf16 rounding case: ties, subnormals, overflow, NaN."""
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, -65520.0, 7e4,
                            3e38, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                            2.0 ** -26, 1e-45, -1e-40, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
                            1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, float("inf"), float("-inf"),
                            float("nan")])
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), generator=torch.Generator()
                         .manual_seed(0), dtype=torch.int64).to(torch.int32)
    return torch.cat([special, bits.view(torch.float32)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids["dtype"])
def test_float_to_storage_rounds_like_torch(dtype):
    """csrc/storage.h's conversions, bit for bit against torch's .to() (NaNs as NaNs)."""
    v = _cast_values()
    out = torch.empty(v.shape, dtype=dtype)
    code = cpp_backend.DTYPE_CODES[dtype]
    # matched_loss_finish without prox is exactly "out = storage(grad_w32)".
    _C.matched_loss_finish(v.data_ptr(), 0, 0, out.data_ptr(), 0, 0, 0, 0, code, 1, 1,
                           v.numel(), False, 0.0)
    want = v.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # And back: storage -> fp32 is exact (local_targets with gamma = 0 is the identity, up
    # to the sign of zero: -0 - 0 * g is +0).
    back, zeros = torch.empty_like(want), torch.zeros_like(want)
    _C.local_targets(want.data_ptr(), zeros.data_ptr(), back.data_ptr(), code, 1, v.numel(),
                     ACTIVATIONS["identity"].code, 0.0)
    assert torch.equal(back[~nan], want[~nan]) and torch.isnan(back[nan]).all()


# ---------------------------------------------------------------------- rmsprop

RMS_SHAPES = [(7, 5), (7,), (3, 7), (3,), (1, 1), (1,), (33, 17), (1025,), (70000,)]


def _state(shapes, seed, dtype=torch.float32, fill=0.0):
    params = [_randn(*s, seed=seed + i, dtype=dtype) for i, s in enumerate(shapes)]
    return params, [torch.full(s, fill) for s in shapes], [torch.zeros(s) for s in shapes]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_torch_style_matches_torch_optim(momentum):
    params, ms, bufs = _state(RMS_SHAPES, 0)
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.RMSprop(theirs, lr=1e-2, alpha=0.9, eps=1e-5, momentum=momentum,
                              foreach=False)
    for step in range(25):
        grads = [_randn(*s, seed=100 * step + i) for i, s in enumerate(RMS_SHAPES)]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        lk.rmsprop_step_(params, grads, ms, bufs if momentum else None, lr=1e-2, alpha=0.9,
                         eps=1e-5, momentum=momentum, style="torch", backend="cpp")
    for p, t in zip(params, theirs):
        torch.testing.assert_close(p, t.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["tf", "torch"])
@pytest.mark.parametrize("p_dtype,g_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "fp16-fp32grad", "bf16-fp32grad"])
@pytest.mark.parametrize("layout", ["list", "arena"])
def test_rmsprop_matches_reference_in_one_call(style, p_dtype, g_dtype, layout):
    """Both flavours, half storage with fp32 state: one C++ call for all tensors, and the
    reference's result (which computes in fp32 and rounds p once per step)."""
    fill = 1.0 if style == "tf" else 0.0
    params, ms, bufs = _state(RMS_SHAPES, 1, dtype=p_dtype, fill=fill)
    ref = [[t.clone() for t in ts] for ts in (params, ms, bufs)]
    if layout == "arena":
        params, ms, bufs = ([lk.Arena.from_tensors(ts).buffer] for ts in (params, ms, bufs))
    for step in range(4):
        grads = [_randn(*s, seed=50 + 10 * step + i, dtype=g_dtype)
                 for i, s in enumerate(RMS_SHAPES)]
        g_in = [lk.Arena.from_tensors(grads).buffer] if layout == "arena" else grads
        kw = dict(lr=1e-3, alpha=0.9, eps=1e-5, momentum=0.9, style=style)
        with lk.testing.count_launches() as n:
            lk.rmsprop_step_(params, g_in, ms, bufs, backend="cpp", **kw)
        assert n.cpp == 1
        reference.rmsprop_step_(*ref[:1], grads, *ref[1:], **kw)
    flat = lambda ts: torch.cat([t.flatten().double() for t in ts])  # noqa: E731
    # Half params are rounded once per step; an fp32 step that differs in its last bit can
    # round to the neighbouring half value, one half ulp (bf16: 2^-8 relative) away.
    tol = dict(rtol=1e-6, atol=1e-7) if p_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(flat(params), flat(ref[0]), **tol)
    torch.testing.assert_close(flat(ms), flat(ref[1]), rtol=1e-6, atol=1e-7)
    # bufs are O(1) sums of +-g/sqrt(ms) terms that can cancel: compare at their scale.
    torch.testing.assert_close(flat(bufs), flat(ref[2]), rtol=1e-5, atol=1e-5)


def test_rmsprop_non_contiguous_params():
    """A transposed param and state: updated through contiguous copies, written back."""
    p = _randn(6, 4, seed=3).T
    ms, buf = torch.ones(4, 6).T.contiguous().T, torch.zeros(6, 4).T
    g = _randn(4, 6, seed=4)
    want = [p.clone(), ms.clone(), buf.clone()]
    lk.rmsprop_step_(p, g, ms, buf, lr=0.1, style="tf", backend="cpp")
    reference.rmsprop_step_([want[0]], [g], [want[1]], [want[2]], lr=0.1, alpha=0.9, eps=1e-5,
                            momentum=0.999, style="tf")
    for got, w in zip((p, ms, buf), want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)


def test_rmsprop_expanded_grads():
    """Stride-0 grads are copied to contiguous buffers that must outlive the kernel call."""
    shapes = [(300, 7), (64,), (5000,)]
    params, ms, bufs = _state(shapes, 4, fill=1.0)
    grads = [_randn(*((1,) + s[1:]), seed=9 + i).expand(s) for i, s in enumerate(shapes)]
    want = [[t.clone() for t in ts] for ts in (params, ms, bufs)]
    lk.rmsprop_step_(params, grads, ms, bufs, lr=0.1, style="tf", backend="cpp")
    reference.rmsprop_step_(want[0], grads, want[1], want[2], lr=0.1, alpha=0.9, eps=1e-5,
                            momentum=0.999, style="tf")
    for got, w in zip(params + ms + bufs, want[0] + want[1] + want[2]):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)


def test_rmsprop_table_is_checked():
    with pytest.raises(ValueError, match="rmsprop table"):
        _C.rmsprop_multi([1, 2, 3], 0.1, _C.RmspropOptions())


# ---------------------------------------------------------------------- fallback

def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    """With ``locoprop_kernels._C`` unimportable, auto-dispatch on CPU runs the reference
    and warns exactly once; asking for "cpp" by name is a clear error."""
    monkeypatch.setitem(sys.modules, "locoprop_kernels._C", None)  # import now fails
    monkeypatch.delenv("LOCOPROP_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned_missing_cpp", False)
    assert not backends.cpp_available()
    x, w, y = _randn(5, 4, seed=0), _randn(3, 4, seed=1), _randn(5, 3, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lk.testing.count_launches() as n:
            gw, _ = lk.matched_loss_grad(x, w, None, y, "tanh")
            lk.local_targets(x, x, "tanh", 1.0)
        assert n.cpp == 0
    missing = [c for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(missing) == 1 and "reference" in str(missing[0].message)
    rw, _ = reference.matched_loss_grad(f64(x), f64(w), None, f64(y), "tanh")
    assert rel_err(gw, rw) <= 1e-5
    with pytest.raises(ValueError, match="not built"):
        lk.matched_loss_grad(x, w, None, y, "tanh", backend="cpp")


# ---------------------------------------------------------------------- CUDA

requires_cuda_build = pytest.mark.skipif(
    not (HAS_CUDA and backends.cpp_available() and _C.build_info()["cuda"]),
    reason="needs a GPU and locoprop_kernels._C built with LOCOPROP_CUDA=ON")


@requires_gpu
@requires_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=ids["dtype"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_cuda_matched_loss_grad_and_targets(dtype, activation):
    B, d_in, d_out = 33, 17, 257
    x = _randn(B, d_in, seed=1, dtype=dtype).cuda()
    w = _randn(d_out, d_in, seed=2, dtype=dtype, scale=d_in ** -0.5).cuda()
    b = _randn(d_out, seed=3, dtype=dtype).cuda()
    y = ACTIVATIONS[activation].f(_randn(B, d_out, seed=4)).to(dtype).cuda()
    w0, b0 = (w.float() + 0.1).to(dtype), (b.float() - 0.1).to(dtype)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, scale=0.5, eta=0.5,
                                  anchor_weight=w0, anchor_bias=b0, backend="cpp")
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation,
                                         scale=0.5, eta=0.5, anchor_weight=f64(w0),
                                         anchor_bias=f64(b0))
    tol = TOL[dtype] if dtype != torch.float32 else 1e-4  # cuBLAS may reorder the sums
    assert rel_err(gw, rw) <= tol and rel_err(gb, rb) <= tol
    g = _randn(B, d_out, seed=5, dtype=dtype, scale=1e-2).cuda()
    t = lk.local_targets(y, g, activation, 10.0, backend="cpp")
    assert rel_err(t, reference.local_targets(f64(y), f64(g), activation, 10.0)) <= TOL[dtype]


@requires_gpu
@requires_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("style", ["tf", "torch"])
def test_cuda_rmsprop_one_launch(style):
    params, ms, bufs = _state(RMS_SHAPES, 1, fill=1.0 if style == "tf" else 0.0)
    ref = [[t.clone() for t in ts] for ts in (params, ms, bufs)]
    params, ms, bufs = ([t.cuda() for t in ts] for ts in (params, ms, bufs))
    grads = [_randn(*s, seed=60 + i) for i, s in enumerate(RMS_SHAPES)]
    kw = dict(lr=1e-3, alpha=0.9, eps=1e-5, momentum=0.9, style=style)
    with lk.testing.count_launches() as n:
        lk.rmsprop_step_(params, [g.cuda() for g in grads], ms, bufs, backend="cpp", **kw)
    assert n.cpp == 1
    reference.rmsprop_step_(ref[0], grads, ref[1], ref[2], **kw)
    for got, want in zip(params + ms + bufs, ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-7)


def test_count_launches_stops_counting_when_the_block_exits():
    p, g, s = torch.zeros(4), torch.ones(4), torch.ones(4)
    with lk.testing.count_launches() as n:
        lk.rmsprop_step_([p], [g], [s], lr=1e-3, momentum=0.0, backend="cpp")
        inside = n.cpp
    assert inside >= 1 and n.cpp == inside
    lk.rmsprop_step_([p], [g], [s], lr=1e-3, momentum=0.0, backend="cpp")  # after the block: not counted
    assert n.cpp == inside and n.total == inside
