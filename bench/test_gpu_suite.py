"""CI smoke run of bench/gpu_suite.py: every entry runs (tiny shapes, one repetition)."""
import json

from bench import gpu_suite


def test_gpu_suite_smoke(tmp_path):
    results = gpu_suite.main(["--smoke", "--out", str(tmp_path)])
    failures = {who: ms for entries in results["outer"].values() for who, ms in entries.items()
                if isinstance(ms, str)}
    assert not failures, failures
    outer = next(iter(results["outer"].values()))
    for who in ("reference eager", "compile(reference inner loop)", "ours per-layer ops",
                "ours grouped", "Adam backprop step", "GEMM floor"):
        assert outer[who] > 0, who
    written = json.loads((tmp_path / "gpu-suite-smoke.json").read_text())
    assert written["device"] == results["device"]
