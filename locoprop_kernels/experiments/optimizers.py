"""The optimizers the autoencoder experiment compares, behind one small interface.

Every method is built from the same model (same initial weights) and the same loss, and
exposes ``step(x) -> loss before the update`` (a 0-d tensor) and ``start_epoch(epoch)`` for
its learning-rate schedule (epoch counts from 0). ``build(name, lr, model, loss_fn, ...,
**hparams)`` makes one (``hparams``: the method's other settings, listed in ``HPARAMS``);
``SWEEPS`` lists the learning rates each name is run with by default. ``state_bytes(method)``
counts the bytes of the tensors a method holds beyond its model.

| name          | what runs                                                            | schedule |
|---------------|----------------------------------------------------------------------|----------|
| locoprop-m/-s | ``lk.LocoProp`` (our ops), official defaults, variant M / S          | official: epoch 0 at lr 0, warmup, linear decay |
| locoprop-m-fast | ``lk.LocoProp``, variant M, ``preset="fast"`` (``PRESETS``): T = 2 | 5 warm-up steps (squared gradients), then cosine to 0.3 x lr at the budget |
| rmsprop       | backprop + ``torch.optim.RMSprop``                                   | constant |
| adam          | backprop + ``torch.optim.Adam``                                      | constant |
| sgd           | backprop + ``torch.optim.SGD(momentum=0.9)``                         | constant |
| pypi-locoprop | PyPI ``locoprop==0.1.0`` ``LocopropTrainer``, its own defaults        | constant |
| shampoo       | backprop + ``pytorch_optimizer.ScalableShampoo`` (roots every 10 steps, AdaGrad grafting) | constant |
| kfac          | ``asdfghjkl`` (asdl) K-FAC gradients (empirical or sampled Bernoulli Fisher) + SGD momentum | constant |

LocoProp presets (``build(..., preset=...)``; ``locoprop-m-fast`` is ``locoprop-m`` with
``preset="fast"``): ``"official"`` (the default) is the google-research notebook, bit for bit
what the reproduction was measured with. ``"fast"`` is for time to a target loss: T = 2 inner
steps and, instead of the official whole epoch at lr = 0 (which only warms the RMSProp square
averages), ``warmup_steps`` outer steps that do that job: ``warmup="grad-square"`` (the
default) sets the square averages to the mean of (gamma * scale * backprop gradient)^2 over
that many batches (one forward and backward each: at W = W0 that is exactly the first local
gradient), ``warmup="zero-lr"`` runs them as LocoProp steps at lr = 0. Then the outer lr is
``fast_lr_factor``'s: a cosine from the peak to ``final_ratio`` = 0.3 x lr at the end of the
run's budget (``horizon`` = 1; the race's clock fraction, ``set_progress``), or ``decay=
"constant"`` / ``"linear"``, or a horizon in steps (``horizon_steps``). Its settings are the
race's tuning: gamma 10, grad-square warm-up (30 s per setting,
bench/results/race-tune-cpu*.md), that cosine (450 steps per setting,
bench/results/race-tune-cpu-locoprop-m-fast-decay.md; within noise of the constant 4e-5 it
replaced there), then T = 2 at peak lr 1.2e-4 (120 s per setting, T 2 / 3 x lr:
bench/results/race-tune-cpu-locoprop-m-fast-t2*.md).

The peers are optional: ``available(name)`` says whether a name can run here and, if not, what
to install. The PyPI ``locoprop`` package is run as it ships (T = 5, torch RMSprop, mean over
the batch, layers in sequence with its input correction), not retuned to the official code.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
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
    "locoprop-m-fast": [1.2e-4],
    "rmsprop": [1e-4, 3e-4, 1e-3],
    "adam": [3e-4, 1e-3, 3e-3],
    "sgd": [1e-5, 3e-5, 1e-4],
    "pypi-locoprop": [None],
    "shampoo": [1e-3, 3e-3],
    "kfac": [3e-2, 1e-1],
}
NAMES = tuple(SWEEPS)

#: K-FAC's damping in the per-epoch experiment, whose committed results were made with it:
#: on 3000 MNIST images damping 1e-3 and 0.1 diverged at lr >= 1e-2 or barely moved below;
#: 10 with lr 0.1 looked steady over 9 steps, but on the full set it is SGD in disguise (the
#: damping swamps the curvature) and stalls at 206. The race's tuning found damping 1 with
#: lr 0.03 (bench/results/race-tune-cpu.md), which bench/race/ uses.
KFAC_DAMPING = 10.0

#: LocoProp presets. "official": the notebook's settings and outer schedule (epoch 0 at lr 0,
#: a 4-epoch linear warmup, linear decay to 0 at epoch ``total_epochs``); nothing in it may
#: change (the reproduction depends on it). "fast": for time to loss, from the race's tuning
#: (30 s per setting, interleaved: T 2/3 x gamma 5/10 x lr 1e-5/2e-5/4e-5 x warm-up kind; the
#: grad-square warm-up beat zero-lr in all 8 pairs; bench/results/race-tune-cpu*.md), then
#: its schedule (450 steps per setting, ~143 s of the idle 600 s race: 8 settings of peak lr
#: x floor x horizon; the cosine to 0.3 x lr at the budget, peak 8e-5, won by 0.1 over the
#: constant 4e-5, within noise; bench/results/race-tune-cpu-locoprop-m-fast-decay.md), then
#: T 2 / 3 x peak lr at 120 s per setting: T = 2 won at every lr (final 65.0-66.1 against
#: 66.8-67.7; to 70 in 83-94 s against 94-105 s; -t2.md, lr edge -t2-lr-edge.md). The peak lr
#: is ``build``'s lr (the race's entry: 1.2e-4).
PRESETS = {
    "official": dict(schedule="official"),
    "fast": dict(inner_steps=2, warmup_steps=5, warmup="grad-square",
                 decay="cosine", horizon=1.0, horizon_steps=None, final_ratio=0.3),
}
WARMUPS = ("zero-lr", "grad-square")
#: The fast preset's outer lr after its warm-up: held, or decayed to final_ratio x lr.
DECAYS = ("constant", "cosine", "linear")
#: The settings of the fast preset's schedule (not ``lk.LocoProp``'s).
SCHEDULE_KEYS = ("warmup_steps", "warmup", "decay", "horizon", "horizon_steps", "final_ratio")


def check_schedule(decay: str, horizon: float, horizon_steps: Optional[int],
                   final_ratio: float, warmup_steps: int) -> None:
    """A ValueError for a schedule ``fast_lr_factor`` cannot run."""
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r} (one of {DECAYS})")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not horizon > 0:
        raise ValueError(f"horizon (a fraction of the budget) must be > 0, got {horizon!r}")
    if horizon_steps is not None and (isinstance(horizon_steps, bool)
                                      or not isinstance(horizon_steps, int)
                                      or horizon_steps <= warmup_steps):
        raise ValueError(f"horizon_steps must be None or an int > warmup_steps "
                         f"({warmup_steps}), got {horizon_steps!r}")


def fast_lr_factor(step: int, *, warmup_steps: int, decay: str, final_ratio: float,
                   horizon: float = 1.0, horizon_steps: Optional[int] = None,
                   progress: Optional[float] = None) -> float:
    """The fast preset's outer lr at outer step ``step`` (1-based), as a fraction of its peak.

    Steps 1..w (w = ``warmup_steps``) warm the square averages and do not move the weights:
    0. After them the lr decays from the peak (1) to r = ``final_ratio`` at the horizon and
    stays at r after it. With q the way through the horizon,

        horizon_steps = H:  q = (step - w - 1) / (H - w - 1)   (the peak at step w + 1, r at
                            step H; steps count from the run's first, warm-up included)
        else:               q = progress / horizon   (progress: the fraction of the run's
                            budget spent before this step, the race's own clock / budget or
                            steps / step budget; horizon 1 reaches r at the budget's end)

        cosine:   r + (1 - r) (1 + cos(pi min(q, 1))) / 2
        linear:   r + (1 - r) (1 - min(q, 1))
        constant: 1 (r and the horizon unused)
    """
    if step <= warmup_steps:
        return 0.0
    if decay == "constant":
        return 1.0
    if horizon_steps is not None:
        q = (step - warmup_steps - 1) / max(horizon_steps - warmup_steps - 1, 1)
    elif progress is None:
        raise ValueError("a horizon on the budget needs the fraction of it spent (the "
                         "method's set_progress(p), before every step), or horizon_steps")
    else:
        q = progress / horizon
    q = min(max(q, 0.0), 1.0)
    if decay == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))
    return final_ratio + (1.0 - final_ratio) * (1.0 - q)


#: The settings ``build`` accepts per method beside lr (anything else is a ValueError).
#: Backprop methods forward them to their torch.optim class (e.g. ``eps``, ``betas``).
HPARAMS = {
    "locoprop": ("preset", "warmup_steps", "warmup", "decay", "horizon", "horizon_steps",
                 "final_ratio", "inner_steps", "gamma", "alpha", "eps", "momentum", "style",
                 "lr_floor", "eta", "scale", "grouped", "cuda_graph", "precision"),
    "shampoo": ("preconditioning_compute_steps", "statistics_compute_steps",
                "start_preconditioning_step", "block_size", "graft_type", "betas",
                "matrix_eps", "diagonal_eps", "nesterov", "inverse_exponent_override"),
    "kfac": ("damping", "curvature_upd_interval", "preconditioner_upd_interval", "ema_decay",
             "momentum", "fisher_type"),
    "pypi-locoprop": ("local_iterations", "learning_rate", "correction", "momentum", "eps",
                      "alpha", "optimizer_momentum"),
}

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


def import_peer(name: str) -> None:
    """Import the optional package behind ``name`` now (a no-op for ours and torch.optim), so
    that a memory baseline taken afterwards does not count the import."""
    if name == "kfac":
        _import_asdl()
    elif name in _PEER_MODULES:
        importlib.import_module(_PEER_MODULES[name][0])


def official_lr(base: float, epoch: int, total: int = 100) -> float:
    """The official outer schedule (docs/design.md section 2): epoch 0 at lr 0 (the RMSProp
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
        self.hparams = {}  # the settings given beside lr (recorded with the results)

    @property
    def label(self) -> str:
        return self.name if self.lr is None else f"{self.name} lr={self.lr:g}"

    def start_epoch(self, epoch: int) -> None:
        pass

    def set_progress(self, progress: float) -> None:
        """The fraction of the run's budget spent before the next step (a no-op: only the
        fast LocoProp preset's decay reads it)."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LocoPropMethod(Method):
    """Our trainer. ``preset="official"`` (the default): the official defaults and schedule,
    exactly as the reproduction ran. ``preset="fast"``: T = 2, ``warmup_steps`` warm-up steps
    (module docstring), then the outer lr of ``fast_lr_factor`` (``decay``, ``horizon``,
    ``final_ratio``). Other keywords go to ``lk.LocoProp``."""

    def __init__(self, name, lr, model, loss_fn, *, total_epochs, backend=None,
                 preset="official", **options):
        if preset not in PRESETS:
            raise ValueError(f"{name}: unknown preset {preset!r} (one of {list(PRESETS)})")
        if lr is None:
            raise ValueError(f"{name}: needs an lr (SWEEPS[{name!r}] has the defaults)")
        variant = "M" if name.startswith("locoprop-m") else "S"
        base = "locoprop-m" if variant == "M" else "locoprop-s"
        super().__init__(base if preset == "official" else f"{base}-{preset}", lr, model)
        self.preset, self.total_epochs = preset, total_epochs
        self.progress = None  # the fraction of the run's budget spent (set_progress)
        if preset == "official":
            foreign = sorted(set(options) & set(SCHEDULE_KEYS))
            if foreign:
                raise ValueError(f"{name}: the official preset runs its own schedule (the lr = "
                                 f"0 epoch, warmup, linear decay); {foreign} belong to "
                                 "preset='fast'")
            self.warmup_steps, self.warmup = 0, None
            self.opt = LocoProp(model, loss_fn, variant=variant, lr=0.0, backend=backend,
                                **options)
        else:
            settings = {k: v for k, v in PRESETS[preset].items() if k != "schedule"}
            settings.update(options)
            schedule = {k: settings.pop(k) for k in SCHEDULE_KEYS}
            self.warmup_steps = schedule["warmup_steps"]
            self.warmup = schedule["warmup"]
            self.decay, self.horizon = schedule["decay"], schedule["horizon"]
            self.horizon_steps = schedule["horizon_steps"]
            self.final_ratio = float(schedule["final_ratio"])
            if self.warmup not in WARMUPS:
                raise ValueError(f"{name}: unknown warmup {self.warmup!r} (one of {WARMUPS})")
            try:
                check_schedule(self.decay, self.horizon, self.horizon_steps, self.final_ratio,
                               self.warmup_steps)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
            self.loss_fn = loss_fn
            self.opt = LocoProp(model, loss_fn, variant=variant, lr=lr, backend=backend,
                                **settings)
            options = dict(settings, **schedule)
        self.hparams = dict(options, preset=preset) if preset != "official" else dict(options)
        self.steps_done = 0

    def start_epoch(self, epoch):
        if self.preset == "official":
            self.opt.lr = official_lr(self.lr, epoch, self.total_epochs)

    def set_progress(self, progress: float) -> None:
        """The fraction of the run's budget spent before the next step (the race calls it
        before every step; ``run_one`` with steps / the run's steps): a decay whose horizon
        is on the budget (no ``horizon_steps``) reads it."""
        self.progress = float(progress)

    def lr_at(self, step: int) -> float:
        """The fast preset's outer lr at outer step ``step`` (1-based): ``fast_lr_factor``."""
        return self.lr * fast_lr_factor(step, warmup_steps=self.warmup_steps, decay=self.decay,
                                        final_ratio=self.final_ratio, horizon=self.horizon,
                                        horizon_steps=self.horizon_steps,
                                        progress=self.progress)

    def step(self, x):
        if self.preset == "official":
            return self.opt.step(x, x)
        self.steps_done += 1
        if self.steps_done > self.warmup_steps:
            self.opt.lr = self.lr_at(self.steps_done)
            return self.opt.step(x, x)
        if self.warmup == "grad-square":
            return self._square_avgs_from_gradient(x, self.steps_done)
        self.opt.lr = 0.0  # warm step: the square averages move, the weights do not
        return self.opt.step(x, x)

    @torch.no_grad()
    def _square_avgs_from_gradient(self, x, k):
        """Warm step ``k`` (1-based) of ``warmup="grad-square"``: the square averages become
        the mean over the k batches so far of g^2, g = gamma * scale * dL/dtheta: the first
        local gradient of every layer (at W = W0 the matched-loss gradient equals that)."""
        params = [p for lin in self.opt.linears for p in (lin.weight, lin.bias)
                  if p is not None]  # the arena's layout: W_0, b_0, W_1, b_1, ...
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), x)
            grads = torch.autograd.grad(loss, params)
        # The forward recorded every layer's X and Z0 and nothing steps on them: zero_grad
        # drops the calls the backward reached, which would otherwise stay until the next
        # forward (a batch of activations held for nothing).
        self.opt.optimizer.zero_grad()
        factor = self.opt.gamma * self.opt.scale
        for avg, g in zip(self.opt.square_avgs.views(), grads):
            g2 = (g.to(avg.dtype) * factor).square_()
            if k == 1:
                avg.copy_(g2)
            else:
                avg.add_(g2.sub_(avg), alpha=1.0 / k)  # running mean
        return loss.detach()


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
    (the same Linear modules as ``model``, so evaluation reads the trained weights).
    ``lr`` None keeps its inner RMSprop's defaults (lr 2e-5, eps 1e-6, momentum 0.999,
    alpha 0.9); ``eps``, ``alpha``, ``optimizer_momentum`` change those, and the trainer's own
    keywords (``local_iterations`` = T, default 5; ``learning_rate`` = gamma, default 10;
    ``correction``; ``momentum``) pass through."""

    DEFAULT_INNER = dict(lr=2e-5, eps=1e-6, momentum=0.999, alpha=0.9)  # its signature's

    def __init__(self, name, lr, model, loss_fn, activations, **options):
        super().__init__(name, lr, model)
        self.hparams = dict(options)
        locoprop = importlib.import_module("locoprop")
        linears = [m for m in model if isinstance(m, nn.Linear)]
        modules = {"tanh": nn.Tanh, "identity": nn.Identity, "sigmoid": nn.Sigmoid}
        layers = [locoprop.LocoLayer(lin, modules[act](), implicit=(i == len(linears) - 1))
                  for i, (lin, act) in enumerate(zip(linears, activations))]
        inner = dict(self.DEFAULT_INNER)
        for key, inner_key in (("eps", "eps"), ("alpha", "alpha"),
                               ("optimizer_momentum", "momentum")):
            if key in options:
                inner[inner_key] = options.pop(key)
        if lr is not None:
            inner["lr"] = lr
        self.trainer = locoprop.LocopropTrainer(nn.Sequential(*layers), loss_fn,
                                                optimizer_hparams=inner, **options)

    def step(self, x):
        return self.trainer.step(x, x).detach()


class KfacMethod(Method):
    """asdl's K-FAC preconditioned gradients followed by SGD with momentum 0.9.

    ``fisher_type``: ``"fisher_emp"`` (the default) builds the Kronecker factors from the
    gradients of the loss itself (the empirical Fisher). ``"fisher_mc"`` is the true Fisher
    of our model's output distribution, sampled as Martens & Grosse (2015) do for this
    autoencoder: the logits define independent Bernoulli pixels, so on a step whose
    curvature is due the factors come from the backward of BCE(logits, y) with
    y ~ Bernoulli(sigmoid(logits)) (one sample per pixel), and the update preconditions the
    gradient of the real loss, from a second forward and backward. asdl's own ``fisher_mc``
    models softmax cross-entropy or MSE only, not our per-pixel BCE, so it is not used.
    ``ema_decay`` (asdl's): each curvature update mixes the new factors in with this weight
    (``None``: the new batch's factors replace the old)."""

    DEFAULTS = dict(damping=KFAC_DAMPING, preconditioner_upd_interval=10,
                    curvature_upd_interval=10, momentum=0.9, fisher_type="fisher_emp")
    FISHER_TYPES = ("fisher_emp", "fisher_mc")

    def __init__(self, name, lr, model, loss_fn, batch, **options):
        super().__init__(name, lr, model)
        self.hparams = dict(options)
        settings = {**self.DEFAULTS, **options}
        momentum, fisher_type = settings.pop("momentum"), settings.pop("fisher_type")
        if fisher_type not in self.FISHER_TYPES:
            raise ValueError(f"kfac: fisher_type must be one of {self.FISHER_TYPES}, "
                             f"got {fisher_type!r}")
        if settings.get("ema_decay", 0) is None:
            settings.pop("ema_decay")
        asdl = _import_asdl()
        config = asdl.PreconditioningConfig(data_size=batch, **settings)
        # Both kinds give asdl the empirical-Fisher machinery; "fisher_mc" feeds it sampled
        # targets, which makes the same computation the sampled true Fisher.
        self.grad_maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
        self.sampled = fisher_type == "fisher_mc"
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        self.loss_fn = loss_fn

    def _asdl_step(self, x, target):
        """asdl's forward and backward on loss_fn(model(x), target): curvature and inverse
        updates when due, then preconditioned gradients in ``.grad``."""
        self.optimizer.zero_grad(set_to_none=True)
        dummy = self.grad_maker.setup_model_call(self.model, x)
        self.grad_maker.setup_loss_call(self.loss_fn, dummy, target)
        return self.grad_maker.forward_and_backward()

    def step(self, x):
        if self.sampled and self.grad_maker.do_update_curvature():
            # The real loss's forward also gives the logits to sample the targets from.
            params = list(self.model.parameters())
            logits = self.model(x)
            loss = self.loss_fn(logits, x)
            grads = torch.autograd.grad(loss, params)
            target = torch.bernoulli(torch.sigmoid(logits.detach()))
            self._asdl_step(x, target)  # the factors; its gradients are not the loss's
            for p, g in zip(params, grads):
                p.grad = g
            self.grad_maker.precondition()
        else:
            _, loss = self._asdl_step(x, x)
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


def _check_hparams(name: str, family: Optional[str], hparams: dict) -> None:
    """A clear error for a setting ``name`` does not take (backprop methods: checked by torch)."""
    if family is None:
        return
    unknown = sorted(set(hparams) - set(HPARAMS[family]))
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {unknown}; it takes lr and "
                         f"{list(HPARAMS[family])}")


def _torch_optimizer(name: str, cls, params, lr: float, defaults: dict, hparams: dict):
    try:
        return cls(params, lr=lr, **{**defaults, **hparams})
    except TypeError as error:
        raise ValueError(f"{name}: bad setting for {cls.__name__}: {error}") from error


def build(name: str, lr: Optional[float], model: nn.Sequential, loss_fn: Callable, *,
          activations, batch: int, total_epochs: int, backend: Optional[str] = None,
          **hparams) -> Method:
    """The method ``name`` at learning rate ``lr`` over ``model`` (trained in place), with the
    optional settings ``hparams`` (``HPARAMS``; ``preset=`` for LocoProp). With no hparams
    every method is exactly what it was before they existed."""
    missing = available(name)
    if missing is not None:
        raise RuntimeError(f"{name} cannot run here: {missing}")
    if name in ("locoprop-m", "locoprop-s", "locoprop-m-fast"):
        _check_hparams(name, "locoprop", hparams)
        if name == "locoprop-m-fast":
            hparams = {"preset": "fast", **hparams}
        return LocoPropMethod(name, lr, model, loss_fn, total_epochs=total_epochs,
                              backend=backend, **hparams)
    params = model.parameters()
    if name in ("rmsprop", "adam", "sgd"):
        cls, defaults = dict(rmsprop=(torch.optim.RMSprop, {}), adam=(torch.optim.Adam, {}),
                             sgd=(torch.optim.SGD, dict(momentum=0.9)))[name]
        method = BackpropMethod(name, lr, model, loss_fn,
                                _torch_optimizer(name, cls, params, lr, defaults, hparams))
        method.hparams = dict(hparams)
        return method
    if name == "pypi-locoprop":
        _check_hparams(name, name, hparams)
        return PyPILocoPropMethod(name, lr, model, loss_fn, activations, **hparams)
    if name == "shampoo":
        _check_hparams(name, name, hparams)
        po = importlib.import_module("pytorch_optimizer")
        # AdaGrad grafting: the RMSProp graft (beta 0.999, no bias correction) takes ~30x
        # steps while its average fills and blew the loss up to ~1e3 in a probe.
        grafts = importlib.import_module(
            "pytorch_optimizer.optimizer.utils.graft").LayerWiseGrafting
        settings = dict(preconditioning_compute_steps=10, graft_type=grafts.ADAGRAD)
        settings.update(hparams)
        if isinstance(settings["graft_type"], str):  # "adagrad", "rmsprop", "sgd", ...
            settings["graft_type"] = grafts[settings["graft_type"].upper()]
        method = BackpropMethod(name, lr, model, loss_fn, po.ScalableShampoo(params, lr=lr,
                                                                              **settings))
        method.hparams = dict(hparams)
        return method
    if name == "kfac":
        _check_hparams(name, name, hparams)
        return KfacMethod(name, lr, model, loss_fn, batch, **hparams)
    raise ValueError(f"unknown optimizer {name!r}")


# ----------------------------------------------------------------------------- memory

def state_bytes(method: Method, exclude=(), detail: int = 0) -> dict:
    """Bytes of the tensors ``method`` holds beyond its model: every tensor reachable from it
    (attributes, containers, torch.optim state, objects such as Shampoo's preconditioners,
    K-FAC factors that asdl stores as module attributes), minus the storages of the model's
    parameters and buffers and of ``exclude`` (e.g. the data set and the last batch). Each
    storage counts once (an arena and its views: once). For ``lk.LocoProp``: its flat arenas
    (gradients, square averages, momentum: at least 3 x the parameters, and whatever other
    buffer it keeps between steps), plus the grouped inner loop's buffers where that runs.

    Returns ``dict(bytes=..., tensors=...)`` (``tensors``: distinct storages) and, with
    ``detail=n``, ``largest``: the n largest as ``[attribute path, bytes]``."""
    skip = set()
    for t in list(method.model.parameters()) + list(method.model.buffers()) + list(exclude):
        skip.add(_storage_key(t))
    seen_objects, storages = set(), {}
    atoms = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType,
             types.FunctionType, types.MethodType, types.BuiltinFunctionType, torch.device,
             torch.dtype)

    def visit(obj, path, depth):
        if depth > 12 or id(obj) in seen_objects or isinstance(obj, atoms):
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key is not None and key not in skip and key not in storages:
                storages[key] = (obj.untyped_storage().nbytes(), path)
            return
        if isinstance(obj, dict):
            for i, (k, v) in enumerate(obj.items()):
                name = k if isinstance(k, (str, int)) else f"<key {i}>"
                visit(k, f"{path}[{name}].key", depth + 1)
                visit(v, f"{path}[{name}]", depth + 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, v in enumerate(obj):
                visit(v, f"{path}[{i}]", depth + 1)
            return
        attrs = dict(getattr(obj, "__dict__", None) or {})
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
        if isinstance(obj, nn.Module):
            # Its parameters/buffers are the model's (skipped by storage anyway) and hooks
            # are callables; what a peer attaches as plain attributes (asdl's factors) counts.
            attrs = {k: v for k, v in attrs.items()
                     if k not in ("_parameters", "_buffers") and "hook" not in k}
        for k, v in attrs.items():
            visit(v, f"{path}.{k}", depth + 1)

    visit(method, "method", 0)
    out = dict(bytes=int(sum(n for n, _ in storages.values())), tensors=len(storages))
    if detail:
        biggest = sorted(storages.values(), key=lambda item: -item[0])[:detail]
        out["largest"] = [[path, n] for n, path in biggest]
    return out


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr())
    except (RuntimeError, NotImplementedError):  # meta, sparse, ...
        return None
