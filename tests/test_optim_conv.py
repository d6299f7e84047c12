"""lk.optim.LocoProp with Conv2d layers (issue 12, deliverable 3): convolutions take matched
local losses (lk.matched_loss_grad_conv2d) in the same inner loop as the Linear layers."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels import reference as ref
from conftest import BACKENDS, HAS_CUDA

CPU_BACKENDS = [b for b in BACKENDS if not (b == "triton" and HAS_CUDA)]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these shapes are tiny, and two threads on a shared 2-core machine
    made each step ~40x slower (spinning OpenMP workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

S, GAMMA = 0.5, 10.0  # scale and gamma of the invariant tests: the local gradient is 5 p.grad

#: f of the first conv, in the module form the model applies (softmax over the channels).
ACTS = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
        "leaky_relu": nn.LeakyReLU(), "softmax": nn.Softmax(dim=1), "identity": nn.Identity()}


class CNN(nn.Module):
    """Conv2d(stride 2, padding 1, dilation 2, bias) + f, Conv2d + tanh, Flatten, Linear."""

    def __init__(self, act=None, side=9, c=3):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4, 3, stride=2, padding=1, dilation=2)
        self.act = act if act is not None else nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        h = (side + 2 - 5) // 2 + 1
        self.head = nn.Linear(5 * h * h, 6)

    def forward(self, x):
        h = torch.tanh(self.conv2(self.act(self.conv1(x))))
        return self.head(h.flatten(1))


class Twice(nn.Module):
    """One Conv2d called twice (the same input size), then once more on a pooled map (another
    size: a second problem of the same layer)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(2, 3, 3, padding=1)
        self.shared = nn.Conv2d(3, 3, 3, padding=1, dilation=1)
        self.head = nn.Linear(3 * 8 * 8 + 3 * 4 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        small = torch.relu(self.shared(F.avg_pool2d(h, 2)))
        return self.head(torch.cat([h.flatten(1), small.flatten(1)], 1))


def _data(n, c, side, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, side, side, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def _records(model, names):
    """Capture every call's (X, Z0) of the named Conv2d modules, independently of the
    optimizer's records."""
    seen, handles = {n: [] for n in names}, []
    for name, m in model.named_modules():
        if name in names:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, n=name: seen[n].append((inp[0].detach(),
                                                              out.detach()))))
    return seen, handles


def _padded(m, X):
    """(X zero-padded as m pads it, when m's padding is a string; the int padding left)."""
    if m.padding == "valid":
        return X, 0
    if m.padding == "same":  # torch: total = d (k - 1), total // 2 before, the rest after
        pad = []
        for d, k in reversed(list(zip(m.dilation, m.kernel_size))):
            pad += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
        return F.pad(X, pad), 0
    return X, m.padding


def _check_invariant_and_records(model, opt, x, y, acts):
    """At W0 every local gradient is S GAMMA p.grad (1e-10, float64); after moving the conv
    weights it is the reference matched-loss gradient of every recorded call plus
    S GAMMA p.grad (so the records hold the right X and Z of each call)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    seen, handles = _records(model, set(convs))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    local = opt.local_gradients()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(map(id, local)) == set(map(id, trainable))
    for p in trainable:
        want = S * GAMMA * p.grad
        assert ((local[p] - want).abs().max() / want.abs().max()).item() <= 1e-10
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in convs.values():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    local = opt.local_gradients()
    for name, m in convs.items():
        gw_want, gb_want = S * GAMMA * m.weight.grad, S * GAMMA * m.bias.grad
        for X, Z0 in seen[name]:
            Y0 = ref._over_channels(lk.activations.get_activation(acts[name]).f, Z0)
            X, padding = _padded(m, X)
            gw, gb = ref.matched_loss_grad_conv2d(X, m.weight.detach(), m.bias.detach(), Y0,
                                                  acts[name], scale=S, stride=m.stride,
                                                  padding=padding, dilation=m.dilation,
                                                  groups=m.groups)
            gw_want, gb_want = gw_want + gw, gb_want + gb
        for got, want in ((local[m.weight], gw_want), (local[m.bias], gb_want)):
            assert not torch.allclose(want, S * GAMMA * m.weight.grad if want.dim() > 1
                                      else S * GAMMA * m.bias.grad)
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10


# ---------------------------------------------------------------- the invariant at W0

@pytest.mark.parametrize("act", list(ACTS))
def test_first_local_gradient_is_scale_gamma_backprop(act):
    torch.manual_seed(1)
    model = CNN(copy.deepcopy(ACTS[act])).double()
    opt = lk.optim.LocoProp(model, gamma=GAMMA, scale=S, backend="reference",
                            output_activation="softmax")
    assert [(i.name, i.module, i.activation) for i in opt.layers] == [
        ("conv1", "Conv2d", act), ("conv2", "Conv2d", "tanh"), ("head", "Linear", "softmax")]
    x, y = _data(8, 3, 9, 6)
    _check_invariant_and_records(model, opt, x, y, {"conv1": act, "conv2": "tanh"})


def test_conv_used_twice_in_one_forward():
    torch.manual_seed(2)
    model = Twice().double()
    opt = lk.optim.LocoProp(model, gamma=GAMMA, scale=S, backend="reference",
                            output_activation="softmax")
    x, y = _data(6, 2, 8, 4)
    _check_invariant_and_records(model, opt, x, y, {"inp": "relu", "shared": "relu"})
    assert [tuple(c.x.shape) for c in opt._records[model.shared]] == [
        (6, 3, 8, 8), (6, 3, 8, 8), (6, 3, 4, 4)]
    assert len([p for p in opt._layer_problems() if p.layer is model.shared]) == 2


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its padded copy
def test_string_padding_and_grouped_conv():
    """padding="same" (an even dilated kernel: torch pads one more row/column after),
    "valid", and a depthwise conv: the invariant and the records' check hold."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, (4, 3), padding="same", dilation=(1, 2))
            self.b = nn.Conv2d(4, 4, 3, padding="valid", groups=4)
            self.head = nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            return self.head(torch.sigmoid(self.b(torch.tanh(self.a(x)))).flatten(1))

    torch.manual_seed(3)
    model = Padded().double()
    opt = lk.optim.LocoProp(model, gamma=GAMMA, scale=S, backend="reference",
                            output_activation="softmax")
    x, y = _data(5, 2, 7, 3)
    _check_invariant_and_records(model, opt, x, y, {"a": "tanh", "b": "sigmoid"})


# ---------------------------------------------------------------- opt.layers

def test_layers_detect_exclude_and_refuse():
    model = CNN()
    opt = lk.optim.LocoProp(model, output_activation="softmax")
    assert [(i.name, i.shape, i.bias, i.activation, i.how, i.loss) for i in opt.layers] == [
        ("conv1", (4, 3, 3, 3), True, "relu", "detected", "matched"),
        ("conv2", (5, 4, 3, 3), True, "tanh", "detected", "matched"),
        ("head", (6, 80), True, "softmax", "output", "matched")]
    assert model.conv1.weight in opt.param_groups[0]["params"]

    opt = lk.optim.LocoProp(model, output_activation="softmax", exclude=[r"^conv1$"])
    assert [i.name for i in opt.layers] == ["conv2", "head"]
    assert {id(model.conv1.weight), id(model.conv1.bias)} <= set(
        map(id, opt.param_groups[1]["params"]))
    assert opt.param_groups[1]["kind"] == "linearized"

    explicit = lk.optim.LocoProp(model, activations={"conv1": "sigmoid"})
    assert (explicit.layers[0].activation, explicit.layers[0].how) == ("sigmoid", "explicit")

    reflect = CNN()
    reflect.conv2.padding_mode = "reflect"
    opt = lk.optim.LocoProp(reflect, output_activation="softmax")
    info = opt.layers[1]
    assert (info.name, info.loss, info.how, info.activation) == (
        "conv2", "linearized", "refused", None)
    assert "padding_mode='reflect'" in info.reason
    assert reflect.conv2.weight in opt.param_groups[1]["params"]
    assert reflect.conv2 not in opt._records
    with pytest.raises(ValueError, match="not a LocoProp layer: padding_mode"):
        lk.optim.LocoProp(reflect, activations={"conv2": "tanh"})


class _Softmaxed(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        z = self.conv(x)
        h = {"F dim 1": lambda: nn.functional.softmax(z, dim=1),
             "method -3": lambda: z.softmax(-3),
             "dim -1": lambda: F.softmax(z, dim=-1),
             "torch dim 2": lambda: torch.softmax(z, 2)}[self.how]()
        return self.head(h.flatten(1))


@pytest.mark.parametrize("how,want", [("F dim 1", "softmax"), ("method -3", "softmax"),
                                      ("dim -1", "identity"), ("torch dim 2", "identity")])
def test_softmax_of_a_conv_only_over_the_channels(how, want):
    opt = lk.optim.LocoProp(_Softmaxed(how))
    assert opt.layers[0].activation == want
    seq = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Softmax(dim=1 if want == "softmax" else -1))
    seq.forward = lambda x: seq[1](seq[0](x))  # untraceable: the Sequential order decides
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.fx, "symbolic_trace", _fail)
        assert lk.optim.LocoProp(seq).layers[0].activation == want


def _fail(*args, **kwargs):
    raise RuntimeError("no tracing here")


# ---------------------------------------------------------------- T = 1 is RMSProp

def test_one_inner_step_is_one_rmsprop_step():
    """T = 1: each outer step is torch.optim.RMSprop's step on S GAMMA p.grad, every
    parameter (the convs' included), float64, three steps."""
    torch.manual_seed(4)
    a = CNN().double()
    b = copy.deepcopy(a)
    opt = lk.optim.LocoProp(a, inner_steps=1, gamma=GAMMA, scale=S, lr=1e-3, style="torch",
                            alpha=0.9, eps=1e-5, momentum=0.9, backend="reference",
                            output_activation="softmax")
    rms = torch.optim.RMSprop(b.parameters(), lr=1e-3, alpha=0.9, eps=1e-5, momentum=0.9,
                              foreach=False)
    for t in range(3):
        x, y = _data(8, 3, 9, 6, seed=t)
        opt.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt.step()
        rms.zero_grad()
        F.cross_entropy(b(x), y).backward()
        for p in b.parameters():
            p.grad.mul_(S * GAMMA)
        rms.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-12


# ---------------------------------------------------------------- it trains

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cnn_trains(backend):
    """50 steps on one batch; the Triton interpreter runs every launch in numpy: tiny shapes
    and T = 2 there."""
    torch.manual_seed(5)
    tiny = backend == "triton"
    model = CNN(side=7 if tiny else 9, c=2 if tiny else 3)
    opt = lk.optim.LocoProp(model, lr=1e-4, backend=backend, output_activation="softmax",
                            inner_steps=2 if tiny else 10)
    assert sum(i.module == "Conv2d" and i.loss == "matched" for i in opt.layers) == 2
    x, y = _data(4 if tiny else 16, 2 if tiny else 3, 7 if tiny else 9, 6, seed=6)
    x = x.float()
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- data parallel, prox

DDP_KW = dict(lr=1e-2, inner_steps=4, eta=0.5, backend="reference",
              output_activation="softmax")


def _ddp_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 3, 9, 9, generator=g, dtype=torch.float64),
             torch.randint(0, 6, (12,), generator=g)) for _ in range(3)]


def _ddp_model():
    torch.manual_seed(0)
    return CNN().double()


def _ddp_train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(_ddp_model())
        opt = lk.optim.LocoProp(model, **DDP_KW)
        _ddp_train(model, opt, [(x[rank * 6:(rank + 1) * 6], y[rank * 6:(rank + 1) * 6])
                                for x, y in _ddp_batches()])
        torch.save([p.detach() for p in model.module.parameters()], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_with_prox(tmp_path):
    """2 gloo processes x 6 images == 1 process x 12 after 3 steps (T = 4, eta = 0.5): the
    convs' matched-loss gradients are all-reduced with the Linear's, in one buffer."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _ddp_model()
    start = copy.deepcopy(list(model.parameters()))
    _ddp_train(model, lk.optim.LocoProp(model, **DDP_KW), _ddp_batches())
    for want, p0, got0, got1 in zip(model.parameters(), start, *ranks):
        assert torch.equal(got0, got1)
        assert ((got0 - want.detach()).abs().max() / want.detach().abs().max()).item() <= 1e-9
        assert not torch.equal(want, p0)
