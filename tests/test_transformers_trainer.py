"""The worked example of docs/transformers.md runs: ``transformers.Trainer`` driving
``lk.optim.LocoProp`` on a tiny GPT-2 (a few steps here), with a finite, falling loss.

The script is taken from the page itself (its one python block), so the page and the test
cannot drift apart.
"""
import math
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

PAGE = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"
STEPS = 16
LR = 5e-4


def example() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/transformers.md should hold exactly one python script"
    namespace = {"__name__": "docs_transformers_example"}  # not __main__: define, do not run
    exec(compile(blocks[0], str(PAGE), "exec"), namespace)
    return namespace


def test_trainer_example_trains(tmp_path, capsys):
    ns = example()
    trainer, opt = ns["train"](max_steps=STEPS, lr=LR, logging_steps=1,
                               output_dir=str(tmp_path))
    assert trainer.state.global_step == STEPS
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS, trainer.state.log_history
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.95 * first, losses

    # Trainer delivered every step to our optimizer (torch.optim's per-parameter step count).
    counts = {float(s["step"]) for s in opt.state.values()}
    assert counts == {float(STEPS)}, counts
    # Trainer's default schedule (linear decay to 0 over max_steps) moved our lr.
    assert all(g["lr"] < LR for g in opt.param_groups)

    capsys.readouterr()
    ns["print_layers"](opt)
    out = capsys.readouterr().out
    assert "lm_head" in out
    assert len(out.strip().splitlines()) == len(opt.layers)
