"""What lk.optim.LocoProp's step reads is what each layer computed (docs/design.md section 9):
records under in-place activations and torch.autocast, and affine layers beyond nn.Linear."""
import copy
import gc
import math
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from conftest import BACKENDS

U_BF16, U_FP16 = 2.0 ** -8, 2.0 ** -11  # unit roundoffs (8 and 11 significant bits)


def _steps(model, x, y, steps=3, **kw):
    opt = lk.optim.LocoProp(model, lr=1e-3, inner_steps=3, backend="reference", **kw)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def _mlp(inplace):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 8),
                         nn.Hardswish(inplace=inplace), nn.Linear(8, 3))


def _cnn(inplace):
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace),
                         nn.Conv2d(4, 4, 3), nn.Hardswish(inplace=inplace), nn.Flatten(),
                         nn.Linear(64, 3))


@pytest.mark.parametrize("make, shape", [(_mlp, (10, 6)), (_cnn, (5, 2, 6, 6))])
def test_in_place_activation_gives_the_same_weights(make, shape):
    torch.manual_seed(0)
    a, b = make(False).double(), make(True).double()
    b.load_state_dict(a.state_dict())
    start = copy.deepcopy(a.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    _steps(a, x, y)
    opt = lk.optim.LocoProp(b, lr=1e-3, inner_steps=3, backend="reference")
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(b(x), y).backward()
        # Not vacuous: the in-place activation did overwrite the recorded Z of the first layer.
        first = opt._records[b[0]][0]
        assert first.z._version != first.z_version
        opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - start[name]).abs().max() > 1e-6, name  # the steps moved the weights
        assert ((p - q).abs().max() / p.abs().max()).item() <= 1e-12, name


def test_input_modified_after_backward_is_refused_with_nothing_changed():
    torch.manual_seed(0)
    model = _mlp(False)
    opt = lk.optim.LocoProp(model, lr=1e-3, backend="reference")
    x = torch.randn(10, 6)
    F.cross_entropy(model(x), torch.randint(0, 3, (10,))).backward()
    before = copy.deepcopy(model.state_dict())
    x.add_(1.0)  # the first layer's recorded input
    with pytest.raises(RuntimeError, match=r"input of layer '0' was modified in place"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state


def test_weights_changed_before_a_recompute_are_refused():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    opt = lk.optim.LocoProp(model, lr=1e-3, backend="reference")
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="weights were changed in place after the forward"):
        opt.step()


# ---------------------------------------------------------------- affine types

class InOut(nn.Module):
    """An affine layer with its weight stored (d_in, d_out), as transformers' Conv1D."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        self.b = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return x @ self.w + self.b


lk.optim.register_affine_type(InOut, weight="w", bias="b", layout="in_out")


def test_declared_in_out_layer_equals_linear():
    torch.manual_seed(0)
    a = nn.Sequential(InOut(6, 8), nn.Tanh(), InOut(8, 3)).double()
    b = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for la, lb in ((a[0], b[0]), (a[2], b[2])):
            lb.weight.copy_(la.w.t())
            lb.bias.copy_(la.b)
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    opt = _steps(a, x, y, output_activation="softmax")
    assert [(i.name, i.module, i.activation, i.shape) for i in opt.layers] == [
        ("0", "InOut", "tanh", (6, 8)), ("2", "InOut", "softmax", (8, 3))]
    assert opt.param_groups[0]["params"] == [a[0].w, a[0].b, a[2].w, a[2].b]
    _steps(b, x, y, output_activation="softmax")
    for la, lb in ((a[0], b[0]), (a[2], b[2])):
        assert ((la.w.t() - lb.weight).abs().max()).item() <= 1e-12
        assert ((la.b - lb.bias).abs().max()).item() <= 1e-12


def test_declared_layer_first_local_gradient_is_gamma_backprop():
    torch.manual_seed(1)
    model = nn.Sequential(InOut(6, 8), nn.Sigmoid(), InOut(8, 3)).double()
    opt = lk.optim.LocoProp(model, backend="reference", output_activation="softmax")
    x = torch.randn(9, 6, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 3, (9,))).backward()
    # at W0 + delta the matched part is not zero: the records are used, with their layout
    at = {model[0].w: model[0].w.detach() + 0.1}
    moved = opt.local_gradients(at=at)
    assert not torch.allclose(moved[model[0].w], 10.0 * model[0].w.grad)
    local = opt.local_gradients()
    for p in model.parameters():
        assert ((local[p] - 10.0 * p.grad).abs().max() / p.grad.abs().max()).item() <= 1e-10


def test_activations_may_name_a_declared_layer():
    model = nn.Sequential(InOut(6, 8), nn.Linear(8, 3))
    opt = lk.optim.LocoProp(model, activations={"0": "identity"})
    assert opt.layers[0].how == "explicit"


@pytest.mark.parametrize("kwargs, error", [
    (dict(layout="row"), ValueError), (dict(weight=3), TypeError), (dict(bias=1), TypeError)])
def test_register_affine_type_refuses_bad_declarations(kwargs, error):
    with pytest.raises(error, match="register_affine_type"):
        lk.optim.register_affine_type(InOut, **kwargs)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        lk.optim.register_affine_type(int)


# ---------------------------------------------------------------- mixed precision

def _tanh_mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 5))


def test_bf16_autocast_local_gradients_within_the_bound():
    """The local gradient at W0 + delta from bf16 records against (1) the float64 formula on
    the same bf16-rounded records (only fp32 accumulation error: 1e-5) and (2) a float64 model
    with the same weights (bf16 rounding of X and of the backward: <= 4u, u = 2^-8; 1.6u
    measured). The first layer's X is the fp32 input (not rounded): its matched part is
    within 1e-5 of float64 too."""
    torch.manual_seed(0)
    a = _tanh_mlp()
    b = copy.deepcopy(a).double()
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    g = torch.Generator().manual_seed(1)
    lin_a = [m for m in a if isinstance(m, nn.Linear)]
    lin_b = [m for m in b if isinstance(m, nn.Linear)]
    deltas = [0.05 * torch.randn(m.weight.shape, generator=g) for m in lin_a]
    opt_a = lk.optim.LocoProp(a, output_activation="softmax")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(a(x), y)
    loss.backward()
    assert opt_a._records[lin_a[1]][0].x.dtype == torch.bfloat16  # what autocast recorded
    got = opt_a.local_gradients(at={m.weight: m.weight.detach() + d
                                    for m, d in zip(lin_a, deltas)})
    opt_b = lk.optim.LocoProp(b, output_activation="softmax", backend="reference")
    F.cross_entropy(b(x.double()), y).backward()
    want = opt_b.local_gradients(at={m.weight: m.weight.detach() + d.double()
                                     for m, d in zip(lin_b, deltas)})
    acts = ["tanh", "tanh", "softmax"]
    for i, (ma, mb) in enumerate(zip(lin_a, lin_b)):
        # (1) the same formula in float64 on the very values the records hold
        X = opt_a._records[ma][0].x.double()
        W0, b0 = ma.weight.detach().double(), ma.bias.detach().double()
        f = lk.ACTIVATIONS[acts[i]].f
        D = f(X @ (W0 + deltas[i].double()).T + b0) - f(X @ W0.T + b0)
        matched = got[ma.weight].double() - 10.0 * ma.weight.grad.double()
        assert ((matched - D.T @ X).abs().max() / (D.T @ X).abs().max()).item() <= 1e-5
        # (2) against the float64 model
        for pa, pb in ((ma.weight, mb.weight), (ma.bias, mb.bias)):
            err = ((got[pa].double() - want[pb]).abs().max() / want[pb].abs().max()).item()
            assert err <= 4 * U_BF16, (i, err)
            if i == 0 and pa is ma.weight:
                m_a = got[pa].double() - 10.0 * pa.grad.double()
                m_b = want[pb] - 10.0 * pb.grad
                assert ((m_a - m_b).abs().max() / m_b.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] + [None])
def test_bf16_autocast_trains(backend):
    torch.manual_seed(2)
    model = _tanh_mlp()
    opt = lk.optim.LocoProp(model, lr=3e-4, inner_steps=3, backend=backend,
                            output_activation="softmax")
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step()  # a step inside the region solves the local problems in fp32 anyway
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_autocast_with_grad_scaler():
    torch.manual_seed(3)
    model = _tanh_mlp()
    opt = lk.optim.LocoProp(model, lr=3e-4, inner_steps=3, output_activation="softmax")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # an overflowing batch: GradScaler skips the step, nothing changes
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x * float("inf")), y)
    scaler.scale(loss).backward()
    before = copy.deepcopy(model.state_dict())
    scaler.step(opt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bf16_model_trains_with_fp32_local_problems():
    torch.manual_seed(4)
    model = _tanh_mlp().to(torch.bfloat16)
    opt = lk.optim.LocoProp(model, lr=3e-4, inner_steps=3, output_activation="softmax")
    x, y = torch.randn(64, 16, dtype=torch.bfloat16), torch.randint(0, 5, (64,))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]
    st = opt.state[model[0].weight]
    assert model[0].weight.dtype == torch.bfloat16 and st["square_avg"].dtype == torch.float32


# ---------------------------------------------------------------- lifecycle of the hooks

def test_hooks_do_not_keep_the_optimizer_alive():
    model = _mlp(False)
    opt = lk.optim.LocoProp(model)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_deep_copied_model_does_not_record_into_the_optimizer():
    model = _mlp(False)
    opt = lk.optim.LocoProp(model)
    clone = copy.deepcopy(model)
    clone(torch.randn(3, 6)).sum().backward()
    assert not any(opt._records[m] for m in opt._modules)
