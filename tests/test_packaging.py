"""We install our kernels as locoprop_kernels.triton_kernels and never own `triton_kernels`."""
import os
import subprocess
import sys
from pathlib import Path

import locoprop_kernels

REPO = Path(locoprop_kernels.__file__).resolve().parents[1]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_subpackage_imports_and_top_level_name_is_not_ours(tmp_path):
    # Run outside the checkout: Python puts the working directory on sys.path, and from the
    # repository root the source folder itself would be importable by its folder name.
    ok = _run("import locoprop_kernels.triton_kernels as t; print(t.__file__)", tmp_path)
    assert ok.returncode == 0, ok.stderr
    probe = _run("import triton_kernels, sys; print(triton_kernels.__file__)", tmp_path)
    if probe.returncode == 0:  # someone else's package of that name is installed: fine
        assert str(REPO) not in probe.stdout, probe.stdout
    else:
        assert "No module named 'triton_kernels'" in probe.stderr, probe.stderr


def test_public_names():
    import locoprop_kernels as lk
    for name in ("matched_loss_grad", "local_targets", "rmsprop_step_", "reference", "Arena",
                 "testing", "ACTIVATIONS"):
        assert hasattr(lk, name), name
