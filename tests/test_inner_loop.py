"""InnerLoop: T RMSProp steps on all layers' local problems == a plain per-layer loop."""
import pytest
import torch

from locoprop_kernels import reference
from locoprop_kernels.activations import get_activation
from locoprop_kernels.arena import split_views
from locoprop_kernels.grouped import LayerGroup, LayerSpec
from locoprop_kernels.inner_loop import InnerLoop, inner_lr_factors

from conftest import BACKENDS, DEVICE, rel_err

LAYERS = [LayerSpec(5, 7, "tanh"), LayerSpec(7, 3, "identity"), LayerSpec(3, 6, "sigmoid"),
          LayerSpec(6, 4, "softmax", bias=False)]


def _plain_loop(layers, xs, ys, params, T, lr, floor, eta, scale):
    """docs/design.md section 2 written out: per layer, T steps of TF RMSProp, float64."""
    shapes = [s for l in layers for s in ([(l.d_out, l.d_in), (l.d_out,)] if l.bias else [(l.d_out, l.d_in)])]
    p = [v.clone() for v in split_views(params.double(), shapes)]
    anchors = [v.clone() for v in p]
    ms = [torch.ones_like(v) for v in p]
    mom = [torch.zeros_like(v) for v in p]
    for t in range(T):
        lr_t = lr * max(1 - t / T, floor)
        k = 0
        for i, l in enumerate(layers):
            w, b = p[k], p[k + 1] if l.bias else None
            gw, gb = reference.matched_loss_grad(xs[i].double(), w, b, ys[i].double(), l.activation,
                                                 scale=scale, eta=eta, anchor_weight=anchors[k],
                                                 anchor_bias=anchors[k + 1] if l.bias else None)
            for j, g in zip((k, k + 1), (gw, gb)):
                if g is None:
                    continue
                ms[j] = 0.9 * ms[j] + 0.1 * g * g
                mom[j] = 0.999 * mom[j] + lr_t * g / torch.sqrt(ms[j] + 1e-5)
                p[j] = p[j] - mom[j]
            k += 2 if l.bias else 1
    return torch.cat([v.flatten() for v in p])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [None, 2.0])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_inner_loop_matches_plain_loop(backend, eta, cuda_graph):
    B, T, lr = 9, 4, 1e-2
    group = LayerGroup(LAYERS, B, device=DEVICE, backend=backend)
    g = torch.Generator().manual_seed(0)
    for x, y, l in zip(group.inputs.views(), group.targets.views(), LAYERS):
        x.copy_(torch.randn(x.shape, generator=g))
        y.copy_(torch.rand(y.shape, generator=g))
    params = (0.5 * torch.randn(group.num_params, generator=g)).to(DEVICE)
    start = params.clone()
    loop = InnerLoop.for_group(group, params, torch.ones_like(params), torch.zeros_like(params),
                     inner_steps=T, lr=lr, eta=eta, scale=1.0 / B, cuda_graph=cuda_graph)
    loop.run()
    want = _plain_loop(LAYERS, group.inputs.views(), group.targets.views(), start, T, lr, 0.25,
                       eta, 1.0 / B)
    assert rel_err(params, want) <= 1e-5
    if DEVICE == "cpu":
        assert loop.graph_state == "eager"


def test_inner_lr_schedule():
    assert inner_lr_factors(10, 0.25) == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.30000000000000004,
                                          0.25, 0.25]
    with pytest.raises(ValueError, match="'inner_steps'"):
        InnerLoop.for_group(LayerGroup(LAYERS, 2, device=DEVICE), torch.zeros(1), torch.zeros(1),
                  torch.zeros(1), inner_steps=0)


@pytest.mark.parametrize("eta", [None, 2.0])
def test_graph_replays_equal_eager_runs(eta):
    """cuda_graph=True: run 1 eager, run 2 captures and replays, later runs replay, a new lr
    needs no re-capture; params equal the eager loop's bit for bit after every run (the same
    kernels, no atomics). On the GPU the graph must really be in use; elsewhere both stay
    eager. (test_inner_loop_matches_plain_loop runs once, so it never reaches a replay.)"""
    B, T = 9, 3

    def make(cuda_graph):
        group = LayerGroup(LAYERS, B, device=DEVICE, backend="triton")
        g = torch.Generator().manual_seed(0)
        for x, y in zip(group.inputs.views(), group.targets.views()):
            x.copy_(torch.randn(x.shape, generator=g))
            y.copy_(torch.rand(y.shape, generator=g))
        params = (0.5 * torch.randn(group.num_params, generator=g)).to(DEVICE)
        return InnerLoop.for_group(group, params, torch.ones_like(params), torch.zeros_like(params),
                         inner_steps=T, lr=1e-2, eta=eta, scale=1.0 / B, cuda_graph=cuda_graph)

    eager, graphed = make(False), make(True)
    for run in range(3):
        for loop in (eager, graphed):
            if run == 2:
                loop.set_lr(3e-3)
            loop.group.targets.buffer.mul_(0.9)  # new targets, written into the same buffers
            loop.run()
        assert torch.equal(graphed.params, eager.params), f"run {run}: {graphed.graph_state}"
    assert graphed.graph_state == ("graph" if DEVICE == "cuda" else "eager")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [None, 2.0])
def test_t0_skip_changes_no_result(backend, eta):
    """The exact t = 0 skip: the loop with targets f(Z0) and the constant C = s gamma
    [G^T X, sum G] (copied at t = 0, no GEMM; added at t >= 1), as lk.optim.LocoProp runs it,
    gives the loop with targets Y = f(Z0) - gamma G that computes every iteration with the
    matched-loss kernels (Z = Z0 at t = 0 there, so D = gamma G). float64 where the backend computes in it (reference: <= 1e-12), else fp32
    against the same fp32 path without the skip (<= 1e-6)."""
    B, T, gamma, scale = 9, 4, 10.0, 1.0 / 9
    dtype = torch.float64 if backend == "reference" else torch.float32
    g = torch.Generator().manual_seed(3)
    layers = [LayerSpec(l.d_in, l.d_out, l.activation, l.bias) for l in LAYERS]
    params0 = (0.5 * torch.randn(LayerGroup(layers, B, device=DEVICE).num_params,
                                 generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    xs = [torch.randn(B, l.d_in, generator=g, dtype=torch.float64).to(DEVICE, dtype)
          for l in layers]
    gs = [torch.randn(B, l.d_out, generator=g, dtype=torch.float64).to(DEVICE, dtype) / B
          for l in layers]
    shapes = LayerGroup(layers, B, device=DEVICE).param_shapes
    p_views = split_views(params0, shapes)

    def run(skip):
        group = LayerGroup(layers, B, device=DEVICE, dtype=dtype, backend=backend)
        params = params0.clone()
        k = 0
        for i, l in enumerate(layers):
            w = p_views[k]
            b = p_views[k + 1] if l.bias else None
            z0 = xs[i] @ w.T + (b if b is not None else 0)
            f = get_activation(l.activation).f
            group.inputs[i].copy_(xs[i])
            group.targets[i].copy_(f(z0) - gamma * gs[i])
            k += 2 if l.bias else 1
        state = torch.float64 if dtype == torch.float64 else torch.float32
        constant = None
        if skip:  # targets f(Z0) and C = s gamma dL/dp from G and X, as lk.optim.LocoProp
            constant = torch.zeros(params.shape, dtype=state, device=DEVICE)
            views = split_views(constant, shapes)
            k = 0
            for i, l in enumerate(layers):
                group.targets[i].add_(gamma * gs[i])
                views[k].copy_(scale * gamma * gs[i].T @ xs[i])
                if l.bias:
                    views[k + 1].copy_(scale * gamma * gs[i].sum(0))
                k += 2 if l.bias else 1
        loop = InnerLoop.for_group(group, params, torch.ones_like(params, dtype=state),
                                   torch.zeros_like(params, dtype=state), inner_steps=T,
                                   lr=1e-2, eta=eta, scale=scale, constant=constant)
        loop.run()
        return params

    with_skip, without = run(True), run(False)
    assert rel_err(with_skip - params0, without - params0) <= (
        1e-12 if dtype == torch.float64 else 1e-6)
