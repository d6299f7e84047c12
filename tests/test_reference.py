"""The reference's own identities, in float64: it is the oracle, so it is checked first."""
import pytest
import torch

from locoprop_kernels import reference
from locoprop_kernels.activations import ACTIVATIONS

from conftest import rel_err

torch.manual_seed(0)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eta", [None, 0.7])
@pytest.mark.parametrize("scale", [1.0, 1 / 9])
def test_grad_is_autograd_of_local_objective(activation, bias, eta, scale):
    B, d_in, d_out = 9, 7, 5
    x = torch.randn(B, d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if bias else None
    y = ACTIVATIONS[activation].f(torch.randn(B, d_out, dtype=torch.float64))
    w0 = w.detach() + 0.3 * torch.randn_like(w)
    b0 = b.detach() + 0.3 * torch.randn_like(b) if bias else None
    kw = dict(scale=scale, anchor_weight=w0, anchor_bias=b0, eta=eta)
    obj = reference.local_objective(x, w, b, y, activation, **kw)
    auto = torch.autograd.grad(obj, [w] + ([b] if bias else []))
    gw, gb = reference.matched_loss_grad(x, w.detach(), None if b is None else b.detach(), y,
                                         activation, **kw)
    assert rel_err(gw, auto[0]) < 1e-12
    if bias:
        assert rel_err(gb, auto[1]) < 1e-12
    else:
        assert gb is None


@pytest.mark.parametrize("variant", ["M", "S"])
def test_first_local_gradient_is_gamma_times_backprop(variant):
    """At W = W0 the local gradient of every layer equals gamma x dL/dW (docs/design.md section 2)."""
    gamma = 10.0
    sizes = [7, 5, 3, 6]
    acts = ["tanh", "identity", "sigmoid"]
    layers = [torch.nn.Linear(a, b).double() for a, b in zip(sizes, sizes[1:])]
    x = torch.rand(11, sizes[0], dtype=torch.float64)
    inputs, preacts = [], []
    h = x
    for layer, act in zip(layers, acts):
        inputs.append(h)
        z = layer(h)
        z.retain_grad()
        preacts.append(z)
        h = ACTIVATIONS[act].f(z)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        preacts[-1], torch.rand(11, sizes[-1], dtype=torch.float64), reduction="sum") / 11
    loss.backward()
    for layer, act, xin, z in zip(layers, acts, inputs, preacts):
        local_act = act if variant == "M" else "identity"
        y = reference.local_targets(z.detach(), z.grad, act, gamma, variant=variant)
        gw, gb = reference.matched_loss_grad(xin.detach(), layer.weight.detach(),
                                             layer.bias.detach(), y, local_act)
        assert rel_err(gw, gamma * layer.weight.grad) < 1e-12
        assert rel_err(gb, gamma * layer.bias.grad) < 1e-12


def test_targets_variants():
    z = torch.randn(4, 6, dtype=torch.float64)
    g = torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(reference.local_targets(z, g, "tanh", 2.0), torch.tanh(z) - 2 * g)
    assert torch.allclose(reference.local_targets(z, g, "softmax", 2.0, variant="S"), z - 2 * g)
    with pytest.raises(ValueError, match="variant"):
        reference.local_targets(z, g, "tanh", 2.0, variant="Q")


def test_potentials_are_antiderivatives():
    """dF/dz = f for every row of the table (F summed over the row)."""
    for name, act in ACTIVATIONS.items():
        z = (3 * torch.randn(5, 8, dtype=torch.float64)).requires_grad_()
        (grad,) = torch.autograd.grad(act.potential(z).sum(), z)
        assert rel_err(grad, act.f(z.detach())) < 1e-12, name
