"""lk.optim.LocoProp held by the training frameworks users run (docs/design.md section 9).

Two examples that run as tests, on CPU, in a few seconds each:

* Lightning: ``configure_optimizers`` returns ``lk.optim.LocoProp(self, ...)``; automatic
  optimization calls ``optimizer.step(closure)``, the closure being training_step, then
  ``optimizer_zero_grad``, then backward: the hooks record the layer calls of the
  closure's forward, its backward marks them used, and the step consumes them. With a
  scheduler, and with gradient accumulation (the records of the micro-batches add up, as
  their gradients do). Lightning zeroes the gradients AFTER the forward:
  ``LocoProp.zero_grad()`` keeps the calls the backward pass has not reached yet (it once
  dropped them, and the step then silently ran as if every parameter were linearized;
  ``test_lightning_zero_grad_after_forward`` keeps that fixed).
* Accelerate: ``accelerator.prepare(model, lk.optim.LocoProp(model, ...), loader)``; the
  optimizer comes back wrapped in ``AcceleratedOptimizer``, which forwards ``step()`` and
  ``zero_grad()`` to ours (skipping both on accumulation micro-batches), and on CPU the model
  comes back as the same object, so the hooks the optimizer put on it keep recording.

Each run is checked against the plain loop on a copy of the same model and the same batches:
same weights (so the framework delivered every step, every record and every lr), and the
training loss went down.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk

pytestmark = [
    # One process on CPU by design; Lightning suggests DataLoader workers.
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    # lightning 2.6 on torch 2.13: its pytree helper uses a deprecated torch check.
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*deprecated"),
]

D, K, N, BATCH = 10, 3, 128, 32     # 4 batches an epoch
EPOCHS = 3
# Cross-entropy on logits: the output layer's local loss matches through a softmax.
OPTIONS = dict(lr=1e-3, inner_steps=5, output_activation="softmax")


def blobs():
    """Three Gaussian classes in D dimensions: a classification problem an MLP learns fast."""
    g = torch.Generator().manual_seed(0)
    centers = 2.0 * torch.randn(K, D, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    return centers[y] + torch.randn(N, D, generator=g), y


def make_loader():
    # No shuffling: the plain loop the runs are compared with sees the same batches.
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*blobs()),
                                       batch_size=BATCH, shuffle=False)


def mlp():
    """LayerNorm (a linearized parameter group), Linear + tanh, a Linear logits head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))


def plain_loop(model, epochs=EPOCHS, accumulate=1, scheduler=None):
    """The standard loop (docs/design.md section 9) that each framework run must reproduce: one step
    every ``accumulate`` batches on the sum of their mean losses / accumulate."""
    opt = lk.optim.LocoProp(model, **OPTIONS)
    sched = scheduler(opt) if scheduler else None
    for _ in range(epochs):
        for i, (x, y) in enumerate(make_loader()):
            if i % accumulate == 0:
                opt.zero_grad()
            (F.cross_entropy(model(x), y) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
        if sched:
            sched.step()
    return opt


def check_trained(opt, model, reference, start, losses, steps):
    """The optimizer stepped ``steps`` times on every parameter, the weights moved, exactly as
    the plain loop moved them, and the loss of the last epoch is below the first's."""
    assert [(i.activation, i.how) for i in opt.layers] == [("tanh", "detected"),
                                                            ("softmax", "output")]
    assert len(opt.param_groups) == 2  # the Linears; the LayerNorm (linearized)
    params = list(model.parameters())
    assert all(opt.state[p]["step"].item() == steps for p in params)
    for p, p0 in zip(params, start):
        assert not torch.equal(p, p0)
    for p, q in zip(params, reference.parameters()):
        torch.testing.assert_close(p, q)
    per_epoch = len(losses) // EPOCHS
    first, last = losses[:per_epoch], losses[-per_epoch:]
    assert sum(last) < 0.5 * sum(first), (first, last)


# ---------------------------------------------------------------- Lightning

def _classifier(L, scheduler=None):
    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.losses = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = lk.optim.LocoProp(self, **OPTIONS)
            if scheduler is None:
                return opt
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": scheduler(opt), "interval": "epoch"}}

    return Classifier()


def _trainer(L, **kwargs):
    options = dict(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    return L.Trainer(**{**options, **kwargs})


def halve_every_epoch(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning(accumulate):
    L = pytest.importorskip("lightning")
    module = _classifier(L)
    reference = copy.deepcopy(module.net)
    start = [p.detach().clone() for p in module.parameters()]
    _trainer(L, accumulate_grad_batches=accumulate).fit(module, make_loader())

    opt = module.trainer.optimizers[0]
    assert isinstance(opt, lk.optim.LocoProp)
    plain_loop(reference, accumulate=accumulate)
    check_trained(opt, module, reference, start, module.losses,
                  steps=EPOCHS * N // BATCH // accumulate)


def test_lightning_scheduler():
    """A scheduler returned by configure_optimizers moves both groups' lr; LocoProp reads it
    at every step (the same weights as the plain loop with the same scheduler)."""
    L = pytest.importorskip("lightning")
    module = _classifier(L, scheduler=halve_every_epoch)
    reference = copy.deepcopy(module.net)
    start = [p.detach().clone() for p in module.parameters()]
    _trainer(L).fit(module, make_loader())

    opt = module.trainer.optimizers[0]
    assert module.trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert [g["lr"] for g in opt.param_groups] == [OPTIONS["lr"] * 0.5 ** EPOCHS] * 2
    plain_loop(reference, scheduler=halve_every_epoch)
    check_trained(opt, module, reference, start, module.losses, steps=EPOCHS * N // BATCH)


def test_lightning_zero_grad_after_forward():
    """Lightning's order (forward, zero_grad, backward, step) trains like the plain loop's
    (zero_grad, forward, backward, step): zero_grad keeps the pending records."""
    L = pytest.importorskip("lightning")
    module = _classifier(L)
    reference = copy.deepcopy(module.net)
    _trainer(L, max_epochs=1).fit(module, make_loader())
    plain_loop(reference, epochs=1)
    for p, q in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------- Accelerate

@pytest.fixture
def accelerate():
    accelerate = pytest.importorskip("accelerate")
    yield accelerate
    # Accelerator keeps process-wide singletons; leave none behind for other tests.
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_accelerate(accelerate, accumulate):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = mlp()
    reference = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = lk.optim.LocoProp(model, **OPTIONS)  # on the model, before prepare
    prepared, wrapped, loader = accelerator.prepare(model, opt, make_loader())
    # On CPU in one process prepare hands back the model the hooks are on, and wraps the
    # optimizer: AcceleratedOptimizer.step / zero_grad call ours.
    assert prepared is model
    assert isinstance(wrapped, accelerate.optimizer.AcceleratedOptimizer)
    assert wrapped.optimizer is opt

    losses = []
    for _ in range(EPOCHS):
        for x, y in loader:
            with accelerator.accumulate(prepared):  # divides the loss by accumulate
                loss = F.cross_entropy(prepared(x), y)
                accelerator.backward(loss)
                wrapped.step()       # skipped on a micro-batch that does not sync
                wrapped.zero_grad()  # likewise: records and .grad add up
            losses.append(loss.item())

    plain_loop(reference, accumulate=accumulate)
    check_trained(opt, model, reference, start, losses, steps=EPOCHS * N // BATCH // accumulate)
