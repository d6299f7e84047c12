"""The soak test's smoke version (bench/soak.py runs 2000 steps outside CI): evaluation
forwards, a switch to SGD and back, checkpoints, bit-exact resume, nothing accumulating."""
import importlib.util
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_soak_smoke(kind):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    r = soak.soak(kind, 80, every=20, warmup=20)
    assert r["finite"] and r["last_loss"] < r["first_loss"]
    assert r["resume_bit_exact"], r
    assert r["records_held_at_end"] == 0
    assert r["live_tensor_growth"] <= 0, r
