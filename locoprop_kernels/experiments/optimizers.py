"""The optimizers the autoencoder experiment compares, behind one small interface.

Every method is built from the same model (same initial weights) and the same loss, and
exposes ``step(x) -> loss before the update`` (a 0-d tensor) and ``start_epoch(epoch)`` for
its learning-rate schedule (epoch counts from 0). ``build(name, lr, model, loss_fn, ...)``
makes one; ``SWEEPS`` lists the learning rates each name is run with by default.

| name          | what runs                                                            | schedule |
|---------------|----------------------------------------------------------------------|----------|
| locoprop-m/-s | ``lk.LocoProp`` (our ops), official defaults, variant M / S          | official: epoch 0 at lr 0, warmup, linear decay |
| rmsprop       | backprop + ``torch.optim.RMSprop``                                   | constant |
| adam          | backprop + ``torch.optim.Adam``                                      | constant |
| sgd           | backprop + ``torch.optim.SGD(momentum=0.9)``                         | constant |
| pypi-locoprop | PyPI ``locoprop==0.1.0`` ``LocopropTrainer``, its own defaults        | constant |
| shampoo       | backprop + ``pytorch_optimizer.ScalableShampoo`` (roots every 10 steps, AdaGrad grafting) | constant |
| kfac          | ``asdfghjkl`` (asdl) K-FAC gradients (empirical Fisher) + SGD momentum | constant |

The peers are optional: ``available(name)`` says whether a name can run here and, if not, what
to install. The PyPI ``locoprop`` package is run as it ships (T = 5, torch RMSprop, mean over
the batch, layers in sequence with its input correction), not retuned to the official code.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from typing import Callable, Optional

import torch
from torch import nn

from ..trainer import LocoProp

#: Learning rates run by default (the sweep); None: the method's own default.
SWEEPS = {
    "locoprop-m": [1e-5],
    "locoprop-s": [1e-5],
    "rmsprop": [1e-4, 3e-4, 1e-3],
    "adam": [3e-4, 1e-3, 3e-3],
    "sgd": [1e-5, 3e-5, 1e-4],
    "pypi-locoprop": [None],
    "shampoo": [1e-3, 3e-3],
    "kfac": [3e-2, 1e-1],
}
NAMES = tuple(SWEEPS)

#: K-FAC's damping. Our loss sums over 784 pixels, so the curvature is large: on 3000 MNIST
#: images damping 1e-3 and 0.1 diverged at lr >= 1e-2 or barely moved below; 10 with lr 0.1
#: trained steadily (probed on a 3-batch subset, 9 steps).
KFAC_DAMPING = 10.0

#: Which import each optional peer needs, and how to get it.
_PEER_MODULES = {
    "pypi-locoprop": ("locoprop", "pip install locoprop==0.1.0"),
    "shampoo": ("pytorch_optimizer", "pip install pytorch-optimizer"),
    "kfac": ("asdl", "pip install asdfghjkl"),
}


def available(name: str) -> Optional[str]:
    """None when ``name`` can run here, else what to install."""
    if name not in SWEEPS:
        return f"unknown optimizer {name!r} (one of {list(NAMES)})"
    module, install = _PEER_MODULES.get(name, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        return install
    return None


def official_lr(base: float, epoch: int, total: int = 100) -> float:
    """The official outer schedule (DESIGN.md section 2): epoch 0 at lr 0 (the RMSProp
    accumulators warm up while the weights stay put), linear warmup over epochs 1-4, then a
    linear decay that reaches 0 after ``total`` epochs."""
    warmup = 5
    if epoch < warmup:
        return base * epoch / warmup
    return base * max(0.0, 1.0 - (epoch + 1 - warmup) / (total - warmup))


class Method:
    """One optimizer on one model: ``step(x)`` trains on a batch (targets = inputs)."""

    def __init__(self, name: str, lr: Optional[float], model: nn.Sequential):
        self.name, self.lr, self.model = name, lr, model

    @property
    def label(self) -> str:
        return self.name if self.lr is None else f"{self.name} lr={self.lr:g}"

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LocoPropMethod(Method):
    """Our trainer with the official defaults and schedule."""

    def __init__(self, name, lr, model, loss_fn, *, total_epochs, backend=None, **options):
        super().__init__(name, lr, model)
        variant = "M" if name == "locoprop-m" else "S"
        self.total_epochs = total_epochs
        self.opt = LocoProp(model, loss_fn, variant=variant, lr=0.0, backend=backend, **options)

    def start_epoch(self, epoch):
        self.opt.lr = official_lr(self.lr, epoch, self.total_epochs)

    def step(self, x):
        return self.opt.step(x, x)


class BackpropMethod(Method):
    """A torch.optim-style optimizer on backprop gradients."""

    def __init__(self, name, lr, model, loss_fn, optimizer):
        super().__init__(name, lr, model)
        self.loss_fn, self.optimizer = loss_fn, optimizer

    def step(self, x):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), x)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class PyPILocoPropMethod(Method):
    """PyPI ``locoprop==0.1.0``: its LocopropTrainer over LocoLayer-wrapped Linear layers
    (the same Linear modules as ``model``, so evaluation reads the trained weights)."""

    def __init__(self, name, lr, model, loss_fn, activations):
        super().__init__(name, lr, model)
        locoprop = importlib.import_module("locoprop")
        linears = [m for m in model if isinstance(m, nn.Linear)]
        modules = {"tanh": nn.Tanh, "identity": nn.Identity, "sigmoid": nn.Sigmoid}
        layers = [locoprop.LocoLayer(lin, modules[act](), implicit=(i == len(linears) - 1))
                  for i, (lin, act) in enumerate(zip(linears, activations))]
        self.trainer = locoprop.LocopropTrainer(nn.Sequential(*layers), loss_fn)

    def step(self, x):
        return self.trainer.step(x, x).detach()


class KfacMethod(Method):
    """asdl's K-FAC preconditioned gradients (empirical Fisher: our loss is a BCE, which
    asdl's Monte-Carlo Fisher does not model) followed by SGD with momentum 0.9."""

    def __init__(self, name, lr, model, loss_fn, batch):
        super().__init__(name, lr, model)
        asdl = _import_asdl()
        config = asdl.PreconditioningConfig(data_size=batch, damping=KFAC_DAMPING,
                                            preconditioner_upd_interval=10,
                                            curvature_upd_interval=10)
        self.grad_maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.loss_fn = loss_fn

    def step(self, x):
        self.optimizer.zero_grad(set_to_none=True)
        dummy = self.grad_maker.setup_model_call(self.model, x)
        self.grad_maker.setup_loss_call(self.loss_fn, dummy, x)
        _, loss = self.grad_maker.forward_and_backward()
        self.optimizer.step()
        return loss.detach()


def _import_asdl():
    """asdl calls ``torch.cuda.nvtx.range`` around its curvature code; a CPU-only torch has
    no working NVTX, so a no-op range stands in for it there."""
    if not torch.cuda.is_available():
        class NoRange(contextlib.ContextDecorator):  # used both as `with` and as a decorator
            def __init__(self, *args, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        nvtx = types.SimpleNamespace(range=NoRange, range_push=lambda *a, **k: None,
                                     range_pop=lambda *a, **k: None)
        torch.cuda.nvtx = nvtx
        sys.modules["torch.cuda.nvtx"] = nvtx
    return importlib.import_module("asdl")


def build(name: str, lr: Optional[float], model: nn.Sequential, loss_fn: Callable, *,
          activations, batch: int, total_epochs: int, backend: Optional[str] = None) -> Method:
    """The method ``name`` at learning rate ``lr`` over ``model`` (trained in place)."""
    missing = available(name)
    if missing is not None:
        raise RuntimeError(f"{name} cannot run here: {missing}")
    if name in ("locoprop-m", "locoprop-s"):
        return LocoPropMethod(name, lr, model, loss_fn, total_epochs=total_epochs,
                              backend=backend)
    params = model.parameters()
    if name == "rmsprop":
        return BackpropMethod(name, lr, model, loss_fn, torch.optim.RMSprop(params, lr=lr))
    if name == "adam":
        return BackpropMethod(name, lr, model, loss_fn, torch.optim.Adam(params, lr=lr))
    if name == "sgd":
        return BackpropMethod(name, lr, model, loss_fn,
                              torch.optim.SGD(params, lr=lr, momentum=0.9))
    if name == "pypi-locoprop":
        return PyPILocoPropMethod(name, lr, model, loss_fn, activations)
    if name == "shampoo":
        po = importlib.import_module("pytorch_optimizer")
        # AdaGrad grafting: the RMSProp graft (beta 0.999, no bias correction) takes ~30x
        # steps while its average fills and blew the loss up to ~1e3 in a probe.
        grafting = importlib.import_module(
            "pytorch_optimizer.optimizer.utils.graft").LayerWiseGrafting.ADAGRAD
        return BackpropMethod(name, lr, model, loss_fn, po.ScalableShampoo(
            params, lr=lr, preconditioning_compute_steps=10, graft_type=grafting))
    if name == "kfac":
        return KfacMethod(name, lr, model, loss_fn, batch)
    raise ValueError(f"unknown optimizer {name!r}")
