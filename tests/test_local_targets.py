"""local_targets on every backend vs the float64 reference."""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import reference
from locoprop_kernels.activations import ACTIVATIONS

from conftest import BACKENDS, DEVICE, f64, rel_err

SHAPES = [(1, 1), (7, 5), (16, 32), (33, 257), (65, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["M", "S"])
def test_matches_reference(backend, activation, shape, variant):
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(*shape, generator=g)).to(DEVICE)
    grad = (torch.randn(*shape, generator=g) / shape[0]).to(DEVICE)
    y = lk.local_targets(z, grad, activation, 10.0, variant=variant, backend=backend)
    want = reference.local_targets(f64(z), f64(grad), activation, 10.0, variant=variant)
    assert y.shape == z.shape and y.dtype == z.dtype
    assert rel_err(y, want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_huge_logits(backend):
    z = (1e4 * torch.randn(4, 300)).to(DEVICE)
    grad = torch.randn(4, 300).to(DEVICE)
    y = lk.local_targets(z, grad, "softmax", 10.0, backend=backend)
    want = reference.local_targets(f64(z), f64(grad), "softmax", 10.0)
    assert torch.isfinite(y).all() and rel_err(y, want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_storage(backend, dtype):
    z = torch.randn(9, 13).to(DEVICE, dtype)
    grad = torch.randn(9, 13).to(DEVICE, dtype)
    y = lk.local_targets(z, grad, "tanh", 2.0, backend=backend)
    assert y.dtype == dtype
    assert rel_err(y, reference.local_targets(f64(z), f64(grad), "tanh", 2.0)) <= 1e-2


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_one_launch(backend):
    z = torch.randn(9, 13).to(DEVICE)
    with lk.testing.count_launches() as n:
        lk.local_targets(z, z, "softmax", 2.0, backend=backend)
    assert getattr(n, backend) == 1
