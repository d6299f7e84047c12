"""One configuration for both LocoProp APIs (``config.LocoPropConfig``): the same keywords are
refused by ``lk.LocoProp`` and ``lk.optim.LocoProp`` with the same message after the prefix,
and both hold the same checked config."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import locoprop_kernels as lk
from locoprop_kernels.config import LocoPropConfig, Variant

BAD = [dict(lr=-1.0), dict(lr=float("nan")), dict(variant="X"), dict(gamma=0.0),
       dict(gamma=-1.0), dict(inner_steps=0), dict(inner_steps=2.0), dict(lr_floor=1.5),
       dict(lr_floor=-0.1), dict(eta=0.0), dict(scale=0.0), dict(scale=float("inf")),
       dict(style="keras"), dict(alpha=1.5), dict(eps=-1.0), dict(momentum=-0.5),
       dict(backend="cuda-ish")]


def model():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _error(make):
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("kw", BAD, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_both_apis_refuse_the_same_way(kw):
    t_type, t_msg = _error(lambda: lk.LocoProp(model(), nn.functional.mse_loss, **kw))
    o_type, o_msg = _error(lambda: lk.optim.LocoProp(model(), **kw))
    assert t_msg.startswith("locoprop.LocoProp: ") and o_msg.startswith(
        "locoprop.optim.LocoProp: ")
    assert t_type is o_type
    assert t_msg.split(": ", 1)[1] == o_msg.split(": ", 1)[1]
    assert next(iter(kw)) in t_msg


def test_both_apis_hold_the_same_config():
    kw = dict(lr=3e-4, variant="S", gamma=2, inner_steps=4, lr_floor=0.5, eta=0.1, scale=0.5,
              alpha=0.8, eps=1e-4, momentum=0.9, style="tf")
    trainer = lk.LocoProp(model(), nn.functional.mse_loss, **kw)
    opt = lk.optim.LocoProp(model(), **kw)
    assert trainer.config == opt.config
    assert trainer.config.variant is Variant.S and isinstance(trainer.config.gamma, float)
    assert LocoPropConfig().check("x") == LocoPropConfig(variant=Variant.M)


def test_variant_local_activation():
    assert Variant.M.local_activation("tanh") == "tanh"
    assert Variant.S.local_activation("tanh") == "identity"
    assert Variant("S") == "S"


def test_one_rmsprop_default_set_per_style():
    """torch's defaults (lk.optim.RMSprop mirrors torch.optim.RMSprop's signature) and TF1's
    official ones (lk.rmsprop_step_, both LocoProp APIs) come from rmsprop_options.DEFAULTS."""
    import inspect

    from locoprop_kernels.config import OFFICIAL_RMSPROP
    from locoprop_kernels.rmsprop_options import DEFAULTS

    def defaults(fn, names=("alpha", "eps", "momentum", "style")):
        params = inspect.signature(fn).parameters
        return {n: params[n].default for n in names}

    torch_opt = defaults(torch.optim.RMSprop.__init__, ("alpha", "eps", "momentum"))
    assert defaults(lk.optim.RMSprop.__init__) == dict(torch_opt, style="torch")
    assert {k: getattr(DEFAULTS["torch"], k) for k in torch_opt} == torch_opt
    tf = {k: getattr(DEFAULTS["tf"], k) for k in ("alpha", "eps", "momentum", "style")}
    assert defaults(lk.rmsprop_step_) == tf
    assert defaults(lk.LocoProp.__init__) == tf == defaults(lk.optim.LocoProp.__init__)
    assert OFFICIAL_RMSPROP is DEFAULTS["tf"] and LocoPropConfig().rmsprop is DEFAULTS["tf"]
