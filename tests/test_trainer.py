"""lk.LocoProp against docs/design.md section 2 written out by hand, plus its model handling,
checkpoints, launch counts and errors.

The oracle ``plain_locoprop`` is deliberately naive and shares no code with the trainer: a
forward pass with torch functions, autograd for dL/dZ, then for each layer on its own T
RMSProp steps written as formulas (the layers' local problems are independent, so layer by
layer equals the trainer's all-layers-at-once).
"""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import locoprop_kernels as lk

from conftest import DEVICE, rel_err, requires_interpreter

SIZES = [7, 5, 3, 7]                      # odd widths; an autoencoder: output width = input
ACTS = [nn.Tanh, nn.Identity]             # hidden activations; the output layer's f: sigmoid
OFFICIAL = dict(gamma=10.0, lr=1e-5, inner_steps=10, alpha=0.9, eps=1e-5, momentum=0.999,
                style="tf", lr_floor=0.25, eta=None, scale=1.0, variant="M")


def bce(logits, x):
    """The official loss: BCE on the logits, summed over pixels, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def make_model(seed=0, dtype=torch.float64, sizes=SIZES, acts=ACTS):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
        lin = nn.Linear(d_in, d_out).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.6)
            lin.bias.copy_(torch.randn(d_out, generator=g) * 0.3)
        mods.append(lin)
        if i < len(acts):
            mods.append(acts[i]())
    return nn.Sequential(*mods)


def batches(n, batch=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, SIZES[0], generator=g, dtype=dtype) for _ in range(n)]


def plain_locoprop(weights, biases, xs, h):
    """docs/design.md section 2 by hand (float64): returns the final [W_l], [b_l] and the losses."""
    W = [w.detach().clone() for w in weights]
    b = [v.detach().clone() for v in biases]
    fs = [torch.tanh, lambda z: z, torch.sigmoid]
    local_fs = fs if h["variant"] == "M" else [lambda z: z] * 3
    tf = h["style"] == "tf"
    ms_w = [torch.full_like(w, 1.0 if tf else 0.0) for w in W]
    ms_b = [torch.full_like(v, 1.0 if tf else 0.0) for v in b]
    mom_w = [torch.zeros_like(w) for w in W]
    mom_b = [torch.zeros_like(v) for v in b]
    losses = []
    for x in xs:
        # forward, recording inputs and pre-activations; autograd for G = dL/dZ
        ins, zs, a = [], [], x
        for l in range(3):
            ins.append(a)
            z = a @ W[l].T + b[l]
            if l == 0:
                z.requires_grad_()
            zs.append(z)
            a = fs[l](z)
        loss = bce(zs[-1], x)
        losses.append(loss.item())
        gs = torch.autograd.grad(loss, zs)
        ys = [(fs[l](zs[l]) if h["variant"] == "M" else zs[l]).detach() - h["gamma"] * gs[l]
              for l in range(3)]
        ins = [v.detach() for v in ins]
        W0, b0 = [w.clone() for w in W], [v.clone() for v in b]
        for l in range(3):  # each layer on its own: T steps of RMSProp on its local loss
            for t in range(h["inner_steps"]):
                lr_t = h["lr"] * max(1 - t / h["inner_steps"], h["lr_floor"])
                D = local_fs[l](ins[l] @ W[l].T + b[l]) - ys[l]
                gw, gb = h["scale"] * D.T @ ins[l], h["scale"] * D.sum(0)
                if h["eta"] is not None:
                    gw = gw + (W[l] - W0[l]) / h["eta"]
                    gb = gb + (b[l] - b0[l]) / h["eta"]
                for p, g, ms, mom in ((W, gw, ms_w, mom_w), (b, gb, ms_b, mom_b)):
                    ms[l] = h["alpha"] * ms[l] + (1 - h["alpha"]) * g * g
                    if tf:
                        mom[l] = h["momentum"] * mom[l] + lr_t * g / torch.sqrt(ms[l] + h["eps"])
                        p[l] = p[l] - mom[l]
                    else:
                        mom[l] = h["momentum"] * mom[l] + g / (torch.sqrt(ms[l]) + h["eps"])
                        p[l] = p[l] - lr_t * mom[l]
    return W, b, losses


def trained(model, xs, **h):
    opt = lk.LocoProp(model, bce, backend="reference", **h)
    losses = [opt.step(x, x) for x in xs]
    return opt, torch.stack(losses).tolist()


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("case", [
    {},                                            # the official defaults
    dict(lr=1e-3),                                 # a larger step: weights move visibly
    dict(variant="S", lr=1e-3),
    dict(style="torch", lr=1e-3, momentum=0.9),
    dict(eta=0.5, lr=1e-3, scale=1.0 / 6),
], ids=["official", "official-lr1e-3", "variant-S", "torch-style", "prox-scale"])
def test_trainer_equals_plain_loop(case):
    h = {**OFFICIAL, **case}
    model = make_model()
    W0 = [m.weight.detach().clone() for m in linears(model)]
    b0 = [m.bias.detach().clone() for m in linears(model)]
    xs = batches(4)
    want_w, want_b, want_losses = plain_locoprop(W0, b0, xs, h)
    opt, losses = trained(model, xs, **{k: v for k, v in h.items()})
    assert losses == pytest.approx(want_losses, rel=1e-12)
    for lin, w, b, w0, bb0 in zip(linears(model), want_w, want_b, W0, b0):
        # the update itself, not only the weights, must agree (lr = 1e-5 moves them little)
        assert rel_err(lin.weight.detach() - w0, w - w0) <= 1e-9
        assert rel_err(lin.bias.detach() - bb0, b - bb0) <= 1e-9
        assert rel_err(lin.weight.detach(), w) <= 1e-12
        assert (lin.weight.detach() - w0).abs().max() > 0, "the weights must move"


def test_first_inner_step_follows_gamma_times_backprop_gradient():
    """At W = W0 the local gradient of every layer is gamma x dL/dW (docs/design.md section 2)."""
    model = make_model()
    x = batches(1)[0]
    loss = bce(model(x), x)
    want = torch.autograd.grad(loss, [m.weight for m in linears(model)])
    opt = lk.LocoProp(model, bce, backend="reference", inner_steps=1)
    opt.step(x, x)
    for got, w in zip(lk.arena.split_views(opt.grads.buffer, opt.shapes)[::2], want):
        assert rel_err(got, 10.0 * w) <= 1e-12


def test_grouped_path_equals_per_layer_path():
    xs = batches(3)
    a, b = make_model(), make_model()
    opt_a = lk.LocoProp(a, bce, backend="reference", lr=1e-3, eta=2.0, grouped=False)
    opt_b = lk.LocoProp(b, bce, backend="reference", lr=1e-3, eta=2.0, grouped=True)
    for x in xs:
        opt_a.step(x, x)
        opt_b.step(x, x)
    assert rel_err(opt_b.params.buffer, opt_a.params.buffer) <= 1e-12


def test_model_stays_a_normal_model():
    model = make_model()
    opt = lk.LocoProp(model, bce, backend="reference", lr=1e-3)
    x = batches(1)[0]
    opt.step(x, x)
    lin = linears(model)
    # parameters are views of the arena: the model sees the trained values
    assert lin[0].weight.data_ptr() == opt.params.buffer.data_ptr()
    assert isinstance(lin[0].weight, nn.Parameter)
    want = torch.sigmoid(lin[2](lin[1](torch.tanh(lin[0](x)))))
    assert torch.equal(torch.sigmoid(model(x)), want)
    sd = model.state_dict()
    assert torch.equal(sd["0.weight"], lin[0].weight.detach())
    # loading the model's state dict writes into the arena
    other = make_model(seed=5)
    model.load_state_dict(other.state_dict())
    assert torch.equal(opt.params[0], other[0].weight.detach())


def test_bf16_params_fp32_state():
    model = make_model(dtype=torch.bfloat16)
    opt = lk.LocoProp(model, bce, lr=1e-3)
    x = batches(1, dtype=torch.float32)[0]
    start = opt.params.buffer.clone()
    loss = opt.step(x, x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert opt.params.buffer.dtype == torch.bfloat16
    assert opt.square_avgs.buffer.dtype == torch.float32 == opt.grads.buffer.dtype
    assert not torch.equal(opt.params.buffer, start)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_resume_is_bit_for_bit(backend):
    dtype = torch.float32
    xs = batches(5, dtype=dtype)
    h = dict(lr=1e-3, backend=backend)
    model = make_model(dtype=dtype)
    full = lk.LocoProp(model, bce, **h)
    full_losses = [full.step(x, x) for x in xs]

    first = lk.LocoProp(make_model(dtype=dtype), bce, **h)
    for x in xs[:2]:
        first.step(x, x)
    first.lr = 2e-3
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = lk.LocoProp(make_model(seed=9, dtype=dtype), bce, **h)  # other weights
    resumed.load_state_dict(torch.load(buf))
    assert resumed.lr == 2e-3 and resumed.steps == 2
    resumed.lr = 1e-3
    losses = [resumed.step(x, x) for x in xs[2:]]
    assert torch.equal(resumed.params.buffer, full.params.buffer)
    assert torch.equal(resumed.square_avgs.buffer, full.square_avgs.buffer)
    assert torch.equal(resumed.momentum_bufs.buffer, full.momentum_bufs.buffer)
    assert torch.equal(torch.stack(losses), torch.stack(full_losses[2:]))


def test_load_state_dict_rejects_another_model_and_changes_nothing():
    opt = lk.LocoProp(make_model(), bce, backend="reference")
    other = lk.LocoProp(make_model(sizes=[7, 5, 4, 7]), bce, backend="reference")
    before = opt.params.buffer.clone()
    with pytest.raises(ValueError, match="layer 1"):
        opt.load_state_dict(other.state_dict())
    assert torch.equal(opt.params.buffer, before)


@requires_interpreter
@pytest.mark.parametrize("grouped", [False, True])
def test_one_rmsprop_launch_per_inner_iteration(grouped):
    """All layers' parameters take one RMSProp launch per inner iteration (triton), and the
    first iteration runs no matched-loss launch at all (the exact t = 0 skip). The targets
    f(Z0) need no kernel (the optimizer's record of Z0, through torch's f); the grouped
    strategy takes the same launch count on the interpreter's per-layer fallback or two
    launches per iteration with a grouped kernel."""
    T = 3
    model = make_model(dtype=torch.float32, sizes=[3, 2, 3], acts=[nn.Tanh])
    opt = lk.LocoProp(model, bce, backend="triton", inner_steps=T, grouped=grouped)
    x = torch.rand(2, 3)
    with lk.testing.count_launches() as n:   # what one layer's ops cost, measured
        lk.matched_loss_grad(x, model[0].weight.detach(), model[0].bias.detach(),
                             torch.rand(2, 2), "tanh", backend="triton")
    per_grad = n.triton
    assert per_grad >= 1
    with lk.testing.count_launches() as n:
        opt.step(x, x)
    assert opt.strategy == ("grouped" if grouped else "per-layer (grouped=False)")
    layers = 2
    matched = (T - 1) * (2 if grouped else layers * per_grad)
    assert n.triton == matched + T


@pytest.mark.parametrize("model, match", [
    (lambda: nn.Sequential(nn.Conv1d(1, 1, 3), nn.Linear(3, 3)), "Conv1d"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ELU(), nn.Linear(4, 3)), "ELU"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(5, 3)), "in_features = 4"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=0), nn.Linear(4, 3)), "dim=-1"),
    (lambda: nn.Sequential(nn.Tanh(), nn.Linear(3, 3)), "directly after an nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Tanh()), "directly after"),
    (lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh()), "output_activation 'sigmoid'"),
    (lambda: nn.Sequential(), "at least one nn.Linear"),
])
def test_rejects_models_it_cannot_train(model, match):
    with pytest.raises(ValueError, match=match):
        lk.LocoProp(model(), bce)


def test_rejects_bad_settings():
    with pytest.raises(TypeError, match="nn.Sequential"):
        lk.LocoProp(nn.Linear(3, 3), bce)
    for kwargs, match in ((dict(variant="X"), "variant"), (dict(style="keras"), "style"),
                          (dict(inner_steps=0), "inner_steps"), (dict(eta=0.0), "eta"),
                          (dict(output_activation="elu"), "activation"),
                          (dict(backend="cuda"), "backend")):
        with pytest.raises(ValueError, match=match):
            lk.LocoProp(make_model(), bce, **kwargs)
    opt = lk.LocoProp(make_model(), bce, backend="reference")
    with pytest.raises(ValueError, match="'x'"):
        opt.step(torch.rand(4, 6, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0


def test_trailing_sigmoid_and_softmax_models_are_accepted():
    """loss_fn gets what the model returns: here probabilities, so an NLL of their log."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Softmax(dim=-1))
    seen = []

    def nll(probs, y):
        seen.append(probs.detach())
        return F.nll_loss(probs.log(), y)

    opt = lk.LocoProp(model, nll, output_activation="softmax", backend="reference", lr=1e-3)
    assert [l.activation for l in opt.layers] == ["relu", "softmax"]
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    first = opt.step(x, y)
    for _ in range(5):
        last = opt.step(x, y)
    assert torch.isfinite(last) and last < first
    assert torch.allclose(seen[0].sum(-1), torch.ones(6))  # probabilities, not logits
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())
    assert lk.LocoProp(model, bce, backend="reference").layers[0].activation == "sigmoid"


def test_grouped_triton_path_equals_reference():
    """The path the trainer takes by default on CUDA (grouped launches), here interpreted."""
    xs = [x.to(DEVICE) for x in batches(2, dtype=torch.float32)]
    a = make_model(dtype=torch.float32, sizes=[7, 4, 7], acts=[nn.Tanh]).to(DEVICE)
    b = make_model(dtype=torch.float32, sizes=[7, 4, 7], acts=[nn.Tanh]).to(DEVICE)
    opt_a = lk.LocoProp(a, bce, backend="triton", grouped=True, lr=1e-2)
    opt_b = lk.LocoProp(b, bce, backend="reference", lr=1e-2)
    for x in xs:
        opt_a.step(x, x)
        opt_b.step(x, x)
    assert rel_err(opt_a.params.buffer, opt_b.params.buffer) <= 1e-5


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Linear(4, 4).requires_grad_(False), nn.Tanh(), nn.Linear(4, 4)),
     "requires_grad=False"),
    (lambda: (lambda lin: nn.Sequential(lin, nn.Tanh(), lin))(nn.Linear(4, 4)),
     "used once"),
], ids=["frozen layer", "Linear used twice"])
def test_models_it_would_mistrain_are_refused(make, match):
    """Frozen or repeated layers were trained silently wrong; now a clear error that points to
    lk.optim.LocoProp, which trains them correctly."""
    with pytest.raises(ValueError, match=match):
        lk.LocoProp(make(), bce, backend="reference")
