"""User-registered activations (lk.register_activation): a row of the one table, run by every
backend (the compiled ones through their kernels where they have one for it: a @triton.jit f
in the per-layer Triton kernel; else the reference math), detected like the built-ins."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from conftest import BACKENDS, requires_interpreter
from locoprop_kernels.activations import ACTIVATIONS
from locoprop_kernels.triton_kernels.activation import _tanh


@pytest.fixture
def registered():
    """Register rows for one test and remove them after it."""
    names = []

    def add(name, f, **kw):
        row = lk.register_activation(name, f, **kw)
        names.append(name)
        return row

    yield add
    for name in names:
        lk.unregister_activation(name)


def _args(B, d_in, d_out, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in ** 0.5
    b = torch.randn(d_out, generator=g, dtype=dtype)
    y = torch.tanh(torch.randn(B, d_out, generator=g, dtype=dtype))
    return x, w, b, y


@pytest.mark.parametrize("shape", [(7, 5, 3), (16, 8, 32), (1, 1, 1)])
def test_a_registered_copy_of_tanh_is_bit_identical_on_the_reference(registered, shape):
    registered("my_tanh", torch.tanh, potential=ACTIVATIONS["tanh"].potential)
    x, w, b, y = _args(*shape)
    for kw in ({}, dict(anchor_weight=w + 0.1, anchor_bias=b - 0.1, eta=0.5)):
        got = lk.matched_loss_grad(x, w, b, y, "my_tanh", backend="reference", **kw)
        want = lk.matched_loss_grad(x, w, b, y, "tanh", backend="reference", **kw)
        assert all(torch.equal(g, h) for g, h in zip(got, want))


@requires_interpreter
@pytest.mark.parametrize("shape", [(7, 5, 3), (16, 8, 32)])
def test_triton_f_runs_in_the_fused_kernel_bit_identically(registered, shape):
    """The table's own Triton tanh as a registered row's triton_f: the per-layer kernel gives
    the built-in tanh's bits (same kernel, the same f), in one more compiled variant."""
    registered("my_tanh", torch.tanh, triton_f=_tanh)
    x, w, b, y = _args(*shape, dtype=torch.float32)
    from locoprop_kernels import testing
    with testing.count_launches() as launches:
        got = lk.matched_loss_grad(x, w, b, y, "my_tanh", backend="triton")
    assert launches.triton == 2  # the fused kernels ran, not the fallback
    want = lk.matched_loss_grad(x, w, b, y, "tanh", backend="triton")
    assert all(torch.equal(g, h) for g, h in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_runs_a_registered_row(registered, backend):
    """Softplus, which no kernel knows: compiled backends without its f compute it with the
    reference math in the same compute dtype (fp32), matching float64 to 1e-5."""
    registered("my_softplus", F.softplus)
    x, w, b, y = _args(9, 6, 5, dtype=torch.float32)
    got = lk.matched_loss_grad(x, w, b, y, "my_softplus", backend=backend)
    want = lk.reference.matched_loss_grad(x.double(), w.double(), b.double(), y.double(),
                                          "my_softplus")
    for g, h in zip(got, want):
        assert ((g.double() - h).abs().max() / h.abs().max()).item() <= 1e-5
    # conv and local targets too
    xc = torch.randn(2, 3, 5, 5)
    wc = torch.randn(4, 3, 3, 3) * 0.3
    yc = torch.rand(2, 4, 3, 3)
    gw, _ = lk.matched_loss_grad_conv2d(xc, wc, None, yc, "my_softplus", backend=backend)
    ref, _ = lk.reference.matched_loss_grad_conv2d(xc.double(), wc.double(), None, yc.double(),
                                                   "my_softplus")
    assert ((gw.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    z, g = torch.randn(4, 5), torch.randn(4, 5)
    t = lk.local_targets(z, g, "my_softplus", 2.0, backend=backend)
    assert torch.allclose(t, F.softplus(z) - 2.0 * g, rtol=1e-6, atol=1e-6)


def test_default_potential_has_gradient_f(registered):
    row = registered("my_softplus", F.softplus)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(row.potential(z).sum(), z)
    assert torch.allclose(grad, F.softplus(z.detach()), rtol=1e-12, atol=1e-12)


class Softplus2(nn.Module):
    def forward(self, z):
        return F.softplus(z)


def test_detection_and_w0_invariant_with_a_registered_row(registered):
    registered("my_softplus", F.softplus, modules=(Softplus2,), functions=(F.softplus,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Softplus2(), nn.Linear(8, 3)).double()
    opt = lk.optim.LocoProp(model, backend="reference", output_activation="softmax")
    assert opt.layers[0].activation == "my_softplus"  # the fx guess, by function
    x = torch.randn(9, 6, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 3, (9,))).backward()
    assert opt.layers[0].activation == "my_softplus"  # and from the forward (the probe)
    local = opt.local_gradients()
    for p in model.parameters():
        assert ((local[p] - 10.0 * p.grad).abs().max() / p.grad.abs().max()).item() <= 1e-10
    moved = opt.local_gradients(at={model[0].weight: model[0].weight.detach() + 0.05})
    assert not torch.allclose(moved[model[0].weight], 10.0 * model[0].weight.grad)
    opt.step()
    trainer = lk.LocoProp(copy.deepcopy(model), lambda z, t: F.cross_entropy(z, t),
                          output_activation="softmax", backend="reference")
    assert trainer.activations == ["my_softplus", "softmax"]


def test_clashes_and_bad_registrations_are_refused(registered):
    with pytest.raises(ValueError, match="clashes with the built-in activation"):
        lk.register_activation("tanh", torch.tanh)
    registered("mine", torch.tanh)
    with pytest.raises(ValueError, match="clashes with the registered activation"):
        lk.register_activation("mine", torch.tanh)
    with pytest.raises(TypeError, match="argument 'f' expected a callable"):
        lk.register_activation("other", 3)
    with pytest.raises(ValueError, match="expected an identifier"):
        lk.register_activation("a b", torch.tanh)
    with pytest.raises(ValueError, match="expected a registered activation"):
        lk.unregister_activation("tanh")
    assert "other" not in ACTIVATIONS
