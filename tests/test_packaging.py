"""Packaging: we install our kernels as locoprop_kernels.triton_kernels and never own
`triton_kernels`; the sdist alone builds a wheel with the C++ extension."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- sdist -> wheel

_SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                    "*.so", "__pycache__", ".pytest_cache", ".hypothesis",
                                    ".benchmarks", "bench")


def _repo_files(folder: str, *suffixes: str) -> set:
    return {p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*")
            if p.is_file() and p.suffix in suffixes}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found: no C++ extension")
@pytest.mark.skipif(importlib.util.find_spec("pybind11") is None, reason="pybind11 missing")
def test_sdist_builds_a_wheel_with_the_extension(tmp_path):
    """The sdist carries everything the extension build needs (csrc/, CMakeLists.txt): a wheel
    built from it alone, offline, with this environment's setuptools / pybind11 / cmake (no
    build isolation), compiles and contains locoprop_kernels._C and every subpackage."""
    # Build from a copy: the sdist step writes an egg-info next to setup.py, and the checkout
    # is not ours to touch (nor may its _C*.so or build/ leak into what is tested).
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_SKIP_COPY)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LOCOPROP_NO_EXT", "LOCOPROP_CUDA")}
    env.update(LOCOPROP_REQUIRE_EXT="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    dist = tmp_path / "dist"
    dist.mkdir()

    # The PEP 517 hook `python -m build --sdist --no-isolation` calls.
    sdist_run = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         "print(b.build_sdist(sys.argv[1]))", str(dist)],
        cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert sdist_run.returncode == 0, sdist_run.stdout[-3000:] + sdist_run.stderr[-3000:]
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = (_repo_files("csrc", ".h", ".cpp", ".cu", ".cuh")
            | _repo_files("triton_kernels", ".py") | {"CMakeLists.txt", "README.md"})
    assert not want - names, sorted(want - names)
    assert not [n for n in names if n.endswith(".so")], "built artifacts in the sdist"

    wheels = tmp_path / "wheels"
    wheel_run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(wheels), str(sdist)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert wheel_run.returncode == 0, wheel_run.stdout[-5000:] + wheel_run.stderr[-5000:]
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert [n for n in names if re.fullmatch(r"locoprop_kernels/_C[^/]*\.so", n)], \
            sorted(names)
        # Every module of the package, its subpackages (backends/, ops/, optim/, ...) included:
        # a subpackage missing from setup.py's list would be left out of the wheel.
        want = (_repo_files("locoprop_kernels", ".py")
                | {"locoprop_kernels/" + p for p in _repo_files("triton_kernels", ".py")})
        assert not want - names, sorted(want - names)
        assert not [n for n in names if n.startswith("triton_kernels/")], "top-level name"
        zf.extractall(tmp_path / "installed")

    # The wheel's own module loads and is the one imported (not the checkout's).
    env["PYTHONPATH"] = str(tmp_path / "installed")
    probe = subprocess.run(
        [sys.executable, "-c", "import locoprop_kernels._C as c; print(c.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(tmp_path / "installed")), probe.stdout
