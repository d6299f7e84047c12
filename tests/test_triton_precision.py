"""The Triton kernels at each GEMM precision ("ieee", "tf32", "bf16") vs float64.

Bounds (normwise relative error, ``conftest.rel_err``, on random layers with independent
targets), per precision, for the per-layer Linear op, the grouped kernels and the Conv2d op:

    "ieee"  1e-5   fp32 rounding only
    "tf32"  4e-3   operands to 10 mantissa bits: truncation costs up to 2^-10 ~ 1e-3 each
    "bf16"  1e-2   operands rounded to 8 bits, 2^-9 ~ 2e-3 each; D rounded again for stage 2

Measured under the interpreter at (B, d_in, d_out) = (37, 70, 45), grad_W: ieee 1.5-2.4e-7,
tf32 1.0-1.7e-3, bf16 2.6-3.5e-3 (tanh, softmax, relu, sigmoid, gelu). The lower ends are
checked too (tf32 > 1e-5, bf16 > 1e-4): a precision that silently ran as
"ieee" would pass an upper bound alone. A sharper test pins the bf16 model itself: the result
equals float64 math on bf16-rounded operands (X, W; then D, X for stage 2) up to fp32
accumulation. Under the interpreter (CPU) the tf32/bf16 dots are emulated
(``triton_kernels/_common.py``); on a GPU these tests run the tensor-core instructions, which
``make triton-check`` verifies are the ones asked for.
"""
import pytest
import torch

from locoprop_kernels import reference
from locoprop_kernels.activations import ACTIVATIONS
from locoprop_kernels.arena import split_views
from locoprop_kernels.backends.triton import TritonBackend
from locoprop_kernels.grouped import LayerGroup, LayerSpec
from locoprop_kernels.triton_kernels import matched_loss_grad as mlg

from conftest import DEVICE, f64, rel_err, requires_interpreter

BOUND = {"ieee": 1e-5, "tf32": 4e-3, "bf16": 1e-2}
#: Below these a reduced precision did not happen (the emulation or the instruction is off).
FLOOR = {"tf32": 1e-5, "bf16": 1e-4}
ACTS = ["tanh", "softmax", "relu", "sigmoid", "gelu"]


def _layer(B, d_in, d_out, activation, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g)
    y = ACTIVATIONS[activation].f(torch.randn(B, d_out, generator=g))
    w0 = w + 0.1 * torch.randn(d_out, d_in, generator=g)
    b0 = b + 0.1 * torch.randn(d_out, generator=g)
    return [t.to(DEVICE) for t in (x, w, b, y, w0, b0)]


def _triton(x, w, b, y, activation, precision, anchors=None):
    """The backend's Linear matched-loss gradient (grad_W, grad_b, scale, eta) at
    ``precision``; ``anchors`` (W0, b0) turn the prox term on."""
    gw = torch.full_like(w, float("nan"))
    gb = torch.full_like(b, float("nan"))
    w0, b0 = anchors or (None, None)
    scale, eta = (1.0 / x.shape[0], 0.5) if anchors else (1.0, None)
    TritonBackend().matched_loss_grad_into(x, w, b, y, activation, scale, w0, b0, eta, gw, gb,
                                           precision)
    return gw, gb, scale, eta


@pytest.mark.parametrize("precision", list(BOUND))
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_linear_within_bound(precision, activation, prox):
    x, w, b, y, w0, b0 = _layer(37, 70, 45, activation, seed=len(activation))
    gw, gb, scale, eta = _triton(x, w, b, y, activation, precision, (w0, b0) if prox else None)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation,
                                         scale=scale, eta=eta,
                                         anchor_weight=f64(w0) if prox else None,
                                         anchor_bias=f64(b0) if prox else None)
    err = max(rel_err(gw, rw), rel_err(gb, rb))
    assert err <= BOUND[precision], err
    if precision in FLOOR and not prox:  # the prox term is exact: it can mask the GEMM error
        assert rel_err(gw, rw) > FLOOR[precision], "reduced precision did not take effect"


def _bf16(t):
    return t.to(torch.bfloat16).double()


@requires_interpreter
@pytest.mark.parametrize("activation", ["tanh", "softmax"])
def test_bf16_is_bf16_operands_fp32_accumulation(activation):
    """bf16: Z = X_r W_r^T + b in fp32 (X_r, W_r rounded to bf16), D = f(Z) - Y, and
    grad_W = D_r^T X_r: float64 math on the rounded operands, to fp32 accumulation."""
    x, w, b, y, _, _ = _layer(29, 48, 33, activation, seed=5)
    gw, gb, _, _ = _triton(x, w, b, y, activation, "bf16")
    d = mlg.delta(x, w, b, y, ACTIVATIONS[activation].code, precision="bf16")
    z = _bf16(x) @ _bf16(w).T + f64(b)
    f = torch.softmax(z, -1) if activation == "softmax" else torch.tanh(z)
    assert rel_err(d, f - f64(y)) <= 1e-5
    # Stage 2 from the kernel's own fp32 D, rounded as the kernel rounds it.
    assert rel_err(gw, _bf16(d).T @ _bf16(x)) <= 1e-5
    assert rel_err(gb, d.double().sum(0)) <= 1e-5


@requires_interpreter
def test_tf32_drops_the_low_mantissa_bits():
    """tf32: the operands lose their low 13 mantissa bits (the emulation under the
    interpreter), so the result equals float64 math on operands truncated so."""
    x, w, b, y, _, _ = _layer(21, 40, 17, "identity", seed=6)
    d = mlg.delta(x, w, b, y, ACTIVATIONS["identity"].code, precision="tf32")

    def tf32(t):
        return (t.view(torch.int32) & ~0x1FFF).view(torch.float32).double()
    assert rel_err(d, tf32(x) @ tf32(w).T + f64(b) - f64(y)) <= 1e-6


@pytest.mark.parametrize("precision", list(BOUND))
def test_grouped_within_bound(precision):
    layers = [LayerSpec(7, 33, "tanh"), LayerSpec(33, 20, "softmax"),
              LayerSpec(20, 16, "relu", False), LayerSpec(16, 9, "sigmoid")]
    batch = 24
    g = torch.Generator().manual_seed(2)
    group = LayerGroup(layers, batch, device=DEVICE, backend="triton", precision=precision)
    for xv, yv, layer in zip(group.inputs.views(), group.targets.views(), layers):
        xv.copy_(torch.randn(xv.shape, generator=g))
        yv.copy_(ACTIVATIONS[layer.activation].f(torch.randn(yv.shape, generator=g)))
    params = (torch.randn(group.num_params, generator=g) * 0.3).to(DEVICE)
    grads = torch.full((group.num_params,), float("nan"), device=DEVICE)
    group.matched_loss_grads_(params, grads)
    views, p = split_views(params.double(), group.param_shapes), 0
    got = split_views(grads, group.param_shapes)
    errs = []
    for i, layer in enumerate(layers):
        w, bias = views[p], views[p + 1] if layer.bias else None
        want = reference.matched_loss_grad(group.inputs[i].double(), w, bias,
                                           group.targets[i].double(), layer.activation)
        errs.append(rel_err(got[p], want[0]))
        if layer.bias:
            errs.append(rel_err(got[p + 1], want[1]))
        p += 2 if layer.bias else 1
    assert max(errs) <= BOUND[precision], errs
    if precision in FLOOR:
        assert max(errs) > FLOOR[precision], errs


@pytest.mark.parametrize("precision", list(BOUND))
@pytest.mark.parametrize("activation", ["tanh", "softmax"])
def test_conv2d_within_bound(precision, activation):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 8, generator=g).to(DEVICE)
    w = (torch.randn(6, 3, 3, 3, generator=g) / 27 ** 0.5).to(DEVICE)
    b = torch.randn(6, generator=g).to(DEVICE)
    z = torch.nn.functional.conv2d(x, w, b, padding=1)
    y = ACTIVATIONS[activation].f(torch.randn(z.shape, generator=g).transpose(1, -1)
                                  ).transpose(1, -1).to(DEVICE)
    gw, gb = torch.full_like(w, float("nan")), torch.full_like(b, float("nan"))
    TritonBackend().matched_loss_grad_conv2d_into(
        x, w, b, y, activation, (1, 1), (1, 1), (1, 1), 1, 1.0, None, None, None, gw, gb,
        precision)
    rw, rb = reference.matched_loss_grad_conv2d(f64(x), f64(w), f64(b), f64(y), activation,
                                                padding=1)
    err = max(rel_err(gw, rw), rel_err(gb, rb))
    assert err <= BOUND[precision], err
    if precision == "bf16":  # tf32 on the CPU's convolution is fp32 (no tensor cores)
        assert rel_err(gw, rw) > FLOOR["bf16"]


def test_unknown_precision_is_refused():
    x, w, b, y, _, _ = _layer(4, 16, 16, "tanh", seed=0)
    with pytest.raises(ValueError, match="precision"):
        mlg.delta(x, w, b, y, ACTIVATIONS["tanh"].code, precision="fp8")


#: Unit roundoff of the dots' operands as the interpreter emulates them (``_common.py``):
#: tf32 truncated to 10 mantissa bits (2^-10), bf16 rounded to nearest (2^-9).
UNIT = {"tf32": 2.0 ** -10, "bf16": 2.0 ** -9}


@requires_interpreter
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("activation", ["tanh", "softmax"])
def test_delta_form_survives_small_updates(precision, activation):
    """An inner iteration's op: W = W0 + dW with |dW| = 1e-4 |W|, Y = f(Z0). Forming
    X W^T on tf32/bf16 operands rounds W by the rounding unit, which swamps X dW^T: the plain
    form's gradient is off by O(1) (measured: tf32 5.8 / 8.2, bf16 15 / 35 for tanh /
    softmax; the bench's 2.7 / 23 on another layer). The delta form (anchor_preact = Z0)
    rounds dW only: its error is that of the operands, bounded by 4 units (X and dW in
    stage 1, D and X in stage 2, each <= 1 unit relative). Measured: tf32 1.4e-3 / 1.7e-3,
    bf16 3.7e-3 / 3.7e-3 (bounds 3.9e-3, 7.8e-3)."""
    g = torch.Generator().manual_seed(11)
    B, d_in, d_out = 40, 24, 16
    x = torch.randn(B, d_in, generator=g).to(DEVICE)
    w0 = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(DEVICE)
    b0 = torch.randn(d_out, generator=g).to(DEVICE)
    w = w0 + 1e-4 * w0.abs().mean() * torch.randn(d_out, d_in, generator=g).to(DEVICE)
    b = b0 + 1e-4 * b0.abs().mean() * torch.randn(d_out, generator=g).to(DEVICE)
    f = ACTIVATIONS[activation].f
    z0 = (f64(x) @ f64(w0).T + f64(b0)).float()  # Z0 = X W0^T + b0, rounded once
    y = f(z0)
    # float64 truth: Z from the fp32 Z0 (the op's definition), W - W0 exact.
    z = f64(z0) + f64(x) @ (f64(w) - f64(w0)).T + (f64(b) - f64(b0))
    want = (f(z) - f64(y)).T @ f64(x)
    gw, gb = torch.empty_like(w), torch.empty_like(b)
    backend = TritonBackend()
    backend.matched_loss_grad_into(x, w, b, y, activation, 1.0, w0, b0, None, gw, gb, precision,
                                   anchor_preact=z0)
    assert rel_err(gw, want) <= 4 * UNIT[precision]
    backend.matched_loss_grad_into(x, w, b, y, activation, 1.0, None, None, None, gw, gb,
                                   precision)
    assert rel_err(gw, want) > 0.5  # the plain form: O(1), the cancellation


@requires_interpreter
@pytest.mark.parametrize("grouped", [False, True], ids=["per-layer", "grouped"])
@pytest.mark.parametrize("lr", [1e-2, 1e-4])
@pytest.mark.parametrize("api", ["optim", "trainer"])
def test_a_whole_step_at_tf32_bf16_is_within_its_bound(api, lr, grouped):
    """precision= is one option through lk.optim.LocoProp and lk.LocoProp down to the Triton
    dots, and a whole step (24-32-16 tanh, 3 inner steps) at tf32/bf16 moves the weights as
    float64 does, within the bound

        |move - move64| / |move64| <= 4 u + e_ieee

    u the operands' unit roundoff (``UNIT``): each local gradient is formed from operands
    rounded once each (the delta form: X and dW in stage 1, D and X in stage 2: <= 4 u, as in
    test_delta_form_survives_small_updates), and RMSProp's g / sqrt(v) keeps a gradient's
    relative error; e_ieee the same step's error in fp32
    ("ieee", measured beside it), the floor set by storing p and its small move in fp32
    (~6e-8 |p| / |move|: 1e-5 at lr 1e-2, 8e-4 at lr 1e-4). Measured (interpreter): lr 1e-2
    tf32 2.5e-4, bf16 3.5e-4 (ieee 1.2e-5); lr 1e-4 tf32 8.3e-4, bf16 8.3e-4 (ieee 8.4e-4).
    Before the delta form the same steps were off by tf32 6.2e-2 / 5.9e-2 and bf16 0.19 /
    0.22 (lr 1e-2 / 1e-4): 12-26x this bound (test_delta_form_survives_small_updates shows
    the op-level cause). The step also differs from the ieee one (the option is not dropped).
    The same bound on both strategies: per layer (the ops' delta form) and grouped (the grouped
    kernel's, ``grouped=True``)."""
    import copy

    import locoprop_kernels as lk
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16))
    x, y = torch.randn(40, 24), torch.rand(40, 16)

    def step(precision, dtype=torch.float32, backend="triton"):
        model = copy.deepcopy(start).to(dtype)
        xx, yy = x.to(dtype), y.to(dtype)
        loss = lambda out, t: F.binary_cross_entropy_with_logits(out, t)  # noqa: E731
        if api == "optim":
            opt = lk.optim.LocoProp(model, lr=lr, inner_steps=3, backend=backend,
                                    precision=precision, output_activation="sigmoid",
                                    grouped=grouped)
            opt.zero_grad()
            loss(model(xx), yy).backward()
            opt.step()
        else:
            opt = lk.LocoProp(model, loss, lr=lr, inner_steps=3, backend=backend,
                              precision=precision, grouped=grouped)
            opt.step(xx, yy)
        assert opt.strategy == "grouped" if grouped else opt.strategy.startswith("per-layer")
        return torch.cat([(p.detach().double() - q.detach().double()).flatten()
                          for p, q in zip(model.parameters(), start.parameters())])

    want = step("ieee", torch.float64, "reference")
    moves = {p: step(p) for p in ("ieee", "tf32", "bf16")}
    err = {p: ((m - want).norm() / want.norm()).item() for p, m in moves.items()}
    assert err["ieee"] <= (1e-4 if lr >= 1e-2 else 3e-3), err
    for precision in ("tf32", "bf16"):
        assert err[precision] <= 4 * UNIT[precision] + err["ieee"], err
        assert (moves[precision] - moves["ieee"]).abs().max() > 0, err


@requires_interpreter
def test_grouped_strategy_takes_the_delta_form_at_tf32_bf16(monkeypatch):
    """A tf32/bf16 step takes the grouped strategy with its stage 1 in the delta form (the
    anchored kernel launched, the plain one not); "ieee" keeps the plain kernel."""
    import importlib

    import locoprop_kernels as lk
    from torch import nn

    kernels = importlib.import_module("locoprop_kernels.triton_kernels.grouped_matched_loss_grad")
    launched = []
    real = kernels.launch

    def recording(kernel, *args, **kwargs):
        launched.append(kernel.fn.__name__)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", recording)
    for precision in ("tf32", "bf16", "ieee"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = lk.optim.LocoProp(model, lr=1e-2, inner_steps=2, backend="triton",
                                precision=precision, grouped=True)
        opt.zero_grad()
        model(torch.randn(4, 6)).square().sum().backward()
        launched.clear()
        opt.step()
        assert opt.strategy == "grouped", opt.strategy
        anchored = precision != "ieee"
        stage1 = [k for k in launched if "delta" in k]
        assert stage1 == ["_grouped_anchored_delta_kernel" if anchored
                          else "_grouped_delta_kernel"], launched


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("activation", ["tanh", "softmax"])
def test_conv2d_delta_form_survives_small_updates(precision, activation):
    """The Conv2d op of an inner iteration: W = W0 + dW with |dW| = 1e-4 |W|, Y = f(Z0) (f
    over the channels). The delta form (anchor_preact = Z0: only dW is rounded to an operand,
    Z0 added in fp32) stays within 4 units as the Linear one does (X and dW in stage 1, D and
    X in stage 2). Measured under the interpreter: bf16 3.0e-3 / 2.4e-3 (tanh / softmax;
    bound 7.8e-3), the plain form 23 / 23: rounding W to bf16 swamps conv2d(X, dW). tf32 on
    the CPU is torch's fp32 convolution (no TF32 there): both forms are then fp32, 2.3e-4 /
    4.8e-4 (delta) and 4.3e-4 / 7.5e-4 (plain), the floor of f(Z) - Y cancelling in fp32;
    the plain form's failure is asserted where cuDNN's TF32 runs (CUDA)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 8, 8, generator=g).to(DEVICE)
    w0 = (torch.randn(6, 3, 3, 3, generator=g) / 27 ** 0.5).to(DEVICE)
    b0 = torch.randn(6, generator=g).to(DEVICE)
    w = w0 + 1e-4 * w0.abs().mean() * torch.randn(w0.shape, generator=g).to(DEVICE)
    b = b0 + 1e-4 * b0.abs().mean() * torch.randn(6, generator=g).to(DEVICE)

    def f(z):
        return reference._over_channels(ACTIVATIONS[activation].f, z)

    conv2d = torch.nn.functional.conv2d
    z0 = conv2d(f64(x), f64(w0), f64(b0), padding=1).float()  # Z0, rounded once
    y = f(z0)
    # float64 truth: Z from the fp32 Z0 (the op's definition), W - W0 exact.
    z = f64(z0) + conv2d(f64(x), f64(w) - f64(w0), f64(b) - f64(b0), padding=1)
    want = torch.nn.grad.conv2d_weight(f64(x), w.shape, f(z) - f64(y), 1, 1)
    gw, gb = torch.empty_like(w), torch.empty_like(b)
    backend, geometry = TritonBackend(), ([1, 1], [1, 1], [1, 1], 1)
    backend.matched_loss_grad_conv2d_into(x, w, b, y, activation, *geometry, 1.0, w0, b0, None,
                                          gw, gb, precision, anchor_preact=z0)
    assert rel_err(gw, want) <= 4 * UNIT[precision]
    backend.matched_loss_grad_conv2d_into(x, w, b, y, activation, *geometry, 1.0, None, None,
                                          None, gw, gb, precision)
    if precision == "bf16" or x.is_cuda:
        assert rel_err(gw, want) > 0.5  # the plain form: O(1), the cancellation


@requires_interpreter
@pytest.mark.parametrize("lr", [1e-2, 1e-4])
def test_a_whole_cnn_step_at_tf32_bf16_is_within_its_bound(lr, monkeypatch):
    """A whole lk.optim.LocoProp step (3 inner steps) on a small CNN (conv 3->8 3x3 pad 1,
    tanh, conv 8->6 3x3 stride 2 pad 1, tanh, linear 96->5) at tf32/bf16 on triton moves
    every parameter as float64 does, within the Linear step's bound (its test above):

        |move - move64| / |move64| <= 4 u + e_ieee        (per parameter tensor and overall)

    e_ieee the same tensor's error of the fp32 ("ieee") step, measured beside it. The Conv2d
    layers take the delta form (Z0 + conv2d(X, W - W0) + (b - b0)). Measured (interpreter),
    overall: lr 1e-2 tf32 1.5e-5, bf16 4.1e-4 (ieee 2.9e-6); lr 1e-4 tf32 1.4e-4, bf16
    1.4e-4 (ieee 1.4e-4, the fp32 storage floor of a small move); the worst tensor, the first
    conv's weight at bf16 and lr 1e-2: 5.6e-3 (bound 7.8e-3). The plain form for the Conv2d
    layers (their anchors dropped, the Linear layer still in the delta form) is shown worse
    at bf16: overall 9.9e-2 / 0.23 (lr 1e-2 / 1e-4), the first conv's weight 1.6 / 0.59. At
    tf32 under the interpreter the convolutions are torch's fp32 ones (no TF32 on the CPU),
    so there the plain form is as accurate and only the bound is checked."""
    import copy

    import locoprop_kernels as lk
    from locoprop_kernels.optim.locoprop import LocoProp
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    start = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5))
    x, y = torch.randn(8, 3, 8, 8), torch.rand(8, 5)
    with_anchors = LocoProp._layer_problems

    def without_conv_anchors(self):
        problems = with_anchors(self)
        for problem in problems:
            if problem.conv is not None:
                problem.anchors = None
        return problems

    def step(precision, dtype=torch.float32, backend="triton", plain=False):
        model = copy.deepcopy(start).to(dtype)
        with monkeypatch.context() as patch:
            if plain:
                patch.setattr(LocoProp, "_layer_problems", without_conv_anchors)
            opt = lk.optim.LocoProp(model, lr=lr, inner_steps=3, backend=backend,
                                    precision=precision, output_activation="sigmoid")
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(model(x.to(dtype)), y.to(dtype)).backward()
            opt.step()
        return [(p.detach().double() - q.detach().double()).flatten()
                for p, q in zip(model.parameters(), start.parameters())]

    def errors(moves, want):
        per = [((m - w).norm() / w.norm()).item() for m, w in zip(moves, want)]
        overall = (torch.cat(moves) - torch.cat(want)).norm() / torch.cat(want).norm()
        return per, overall.item()

    want = step("ieee", torch.float64, "reference")
    ieee_per, ieee = errors(step("ieee"), want)
    for precision in ("tf32", "bf16"):
        bound = 4 * UNIT[precision]
        per, overall = errors(step(precision), want)
        assert overall <= bound + ieee, (precision, overall, ieee)
        for i, (e, e_ieee) in enumerate(zip(per, ieee_per)):
            assert e <= bound + e_ieee, (precision, i, per, ieee_per)
    _, plain = errors(step("bf16", plain=True), want)
    assert plain > 4 * UNIT["bf16"] + ieee, plain  # the conv layers' cancellation, shown


def test_cnn_delta_form_is_the_plain_step_in_float64():
    """The delta form's Z0, W0, b0 as lk.optim.LocoProp records them for a Conv2d are
    consistent (Z0 = conv2d(X, W0) + b0), so on the reference backend in float64, which
    computes any precision exactly, a "bf16" step equals the "ieee" one to rounding: also
    through a "same"-padded even kernel (X padded by the optimizer) and a custom target rule
    (its once-per-step matched-loss term). A Z0 off by anything (a missing bias, another
    padding) would move the result by O(1)."""
    import copy

    import locoprop_kernels as lk
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    start = nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), nn.ReLU(), nn.Conv2d(3, 4, 3),
                          nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    x, labels = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

    def step(precision):
        model = copy.deepcopy(start)
        opt = lk.optim.LocoProp(model, lr=1e-2, inner_steps=3, backend="reference",
                                precision=precision, output_activation="softmax",
                                targets={"0": lambda z0, g, f, gamma: f(z0) - 3 * gamma * g})
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()
        return [p.detach() - q.detach() for p, q in zip(model.parameters(), start.parameters())]

    for got, want in zip(step("bf16"), step("ieee")):
        assert rel_err(got, want) <= 1e-12
        assert want.abs().max() > 0
