"""The activation table is the one source of activation codes and module mappings.

The compiled backends carry their own copy of the codes (a Triton constexpr per activation,
the C++ ``Activation`` enum exported as ``_C.ACTIVATION_CODES``): these tests fail the moment
one of them disagrees with ``locoprop_kernels/activations.py``.
"""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels.activations import ACTIVATIONS, activation_of_module
from locoprop_kernels import backends


def test_codes_are_distinct():
    codes = [a.code for a in ACTIVATIONS.values()]
    assert len(set(codes)) == len(codes)


def test_triton_constants_match_the_table():
    from locoprop_kernels.triton_kernels import activation as triton_activation
    for act in ACTIVATIONS.values():
        constant = getattr(triton_activation, act.name.upper())
        assert int(getattr(constant, "value", constant)) == act.code, act.name


@pytest.mark.skipif(not backends.cpp_available(), reason="locoprop_kernels._C not built")
def test_cpp_codes_match_the_table():
    from locoprop_kernels import _C
    assert dict(_C.ACTIVATION_CODES) == {a.name: a.code for a in ACTIVATIONS.values()}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_potential_derivative_is_f(name):
    """dF/dz = f: the matched loss's gradient is f(z) - y (docs/design.md section 2)."""
    act = ACTIVATIONS[name]
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(act.potential(z).sum(), z)
    assert torch.allclose(grad, act.f(z.detach()), rtol=1e-12, atol=1e-12)


def test_every_module_type_maps_to_its_entry():
    for act in ACTIVATIONS.values():
        for module_type in act.modules:
            module = (module_type(dim=-1) if module_type is nn.Softmax
                      else module_type(approximate="tanh" if act.name == "gelu_tanh" else "none")
                      if module_type is nn.GELU else module_type())
            assert activation_of_module(module) is act
    with pytest.raises(ValueError, match="dim=-1 or dim=1"):
        activation_of_module(nn.Softmax(dim=0))
    assert activation_of_module(nn.Linear(2, 2)) is None


def test_leaky_relu_other_slopes_are_refused():
    assert activation_of_module(nn.LeakyReLU()).name == "leaky_relu"
    with pytest.raises(ValueError, match="negative_slope 0.01.*got negative_slope 0.2"):
        activation_of_module(nn.LeakyReLU(0.2))
    model = nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.2), nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"model\[1\].*negative_slope"):
        lk.LocoProp(model, lambda z, y: z.sum())


def test_trainer_takes_leaky_relu_from_the_table():
    model = nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(), nn.Linear(3, 4))
    opt = lk.LocoProp(model, lambda z, y: ((z - y) ** 2).sum() / len(y),
                      output_activation="identity", backend="reference")
    assert opt.activations == ["leaky_relu", "identity"]


def test_gelu_forms_map_to_their_entries():
    from locoprop_kernels.activations import activation_of_call
    assert activation_of_module(nn.GELU()).name == "gelu"
    assert activation_of_module(nn.GELU(approximate="tanh")).name == "gelu_tanh"
    assert activation_of_module(nn.SiLU()).name == "silu"
    z = torch.randn(3)
    assert activation_of_call(F.gelu, (z,), {}).name == "gelu"
    assert activation_of_call(F.gelu, (z,), {"approximate": "tanh"}).name == "gelu_tanh"
    assert activation_of_call(F.silu, (z,), {}).name == "silu"
    for name in ("gelu", "gelu_tanh", "silu"):
        want = {"gelu": lambda t: F.gelu(t), "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                "silu": F.silu}[name]
        t = torch.linspace(-6, 6, 101, dtype=torch.float64)
        assert torch.equal(ACTIVATIONS[name].f(t), want(t))


@pytest.mark.parametrize("name, below", [("gelu", -0.7518), ("gelu_tanh", -0.7518),
                                         ("silu", -1.2785)])
def test_non_monotone_activations_are_non_convex_only_below_their_minimum(name, below):
    """f' < 0 (F not convex) exactly below f's minimiser, as docs/activations.md states."""
    z = torch.linspace(-6, 6, 12001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(ACTIVATIONS[name].f(z).sum(), z)
    negative = z.detach()[slope < 0]
    assert abs(negative.max().item() - below) < 2e-3


def test_potentials_of_the_quadrature_entries():
    """F(z) - F(0) = integral_0^z f against a fine trapezoid rule (its error ~1e-9 here)."""
    for name in ("gelu", "gelu_tanh", "silu"):
        act = ACTIVATIONS[name]
        base = act.potential(torch.zeros(1, 1, dtype=torch.float64)).item()
        for v in (-8.0, -1.0, 0.5, 3.0, 8.0):
            t = torch.linspace(0.0, v, 100001, dtype=torch.float64)
            want = torch.trapezoid(act.f(t), t).item()
            got = act.potential(torch.tensor([[v]], dtype=torch.float64)).item() - base
            assert abs(got - want) <= 1e-8, (name, v)
