"""The activation table is the one source of activation codes and module mappings.

The compiled backends carry their own copy of the codes (a Triton constexpr per activation,
the C++ ``Activation`` enum exported as ``_C.ACTIVATION_CODES``): these tests fail the moment
one of them disagrees with ``locoprop_kernels/activations.py``.
"""
import pytest
import torch
from torch import nn

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
    """dF/dz = f: the matched loss's gradient is f(z) - y (DESIGN section 2)."""
    act = ACTIVATIONS[name]
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(act.potential(z).sum(), z)
    assert torch.allclose(grad, act.f(z.detach()), rtol=1e-12, atol=1e-12)


def test_every_module_type_maps_to_its_entry():
    for act in ACTIVATIONS.values():
        for module_type in act.modules:
            module = module_type(dim=-1) if module_type is nn.Softmax else module_type()
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
