"""Build script: packages, and the top-level ``triton_kernels/`` folder installed as
``locoprop_kernels.triton_kernels`` (docs/design.md section 3: PyPI and Triton already ship a
top-level ``triton_kernels``, so we never install one).

The C++ extension ``locoprop_kernels._C`` (``csrc/``, ``CMakeLists.txt``) is built with CMake
and pybind11. Without a compiler or cmake the package still installs, pure Python, with a
warning (CPU ops then run on the reference backend). Environment:
    LOCOPROP_REQUIRE_EXT=1   a failed extension build is an error
    LOCOPROP_NO_EXT=1        skip the extension
    LOCOPROP_CUDA=ON         build the CUDA kernels too (needs nvcc; CUDA_ARCHS, default 90)
"""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt lists; setuptools only names it."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt so the module lands where setuptools expects it
    (``get_ext_fullpath``; an editable install then copies it next to the sources)."""

    failed = ()

    def run(self):
        self.failed = []
        super().run()

    def build_extension(self, ext):
        try:
            self._cmake(ext)
        except Exception as error:  # no cmake, no compiler, a compile error
            if os.environ.get("LOCOPROP_REQUIRE_EXT") == "1":
                raise
            self.failed.append(ext.name)
            warnings.warn(f"locoprop-kernels: building the C++ extension {ext.name} failed "
                          f"({error}); installing pure Python: CPU ops will use the "
                          f"'reference' backend. Set LOCOPROP_REQUIRE_EXT=1 to make this an "
                          f"error.")
            print(f"WARNING: locoprop-kernels: C++ extension not built: {error}",
                  file=sys.stderr)

    def _cmake(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("LOCOPROP_CUDA", "OFF").upper() in ("1", "ON", "TRUE", "YES")
        args = [f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                f"-DLOCOPROP_OUTPUT_DIR={out_dir}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DLOCOPROP_CUDA={'ON' if cuda else 'OFF'}"]
        if cuda:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CUDA_ARCHS', '90')}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)

    def _built(self):
        return [e for e in self.extensions if e.name not in self.failed]

    def copy_extensions_to_source(self):
        # Editable installs copy the built module next to the sources; skip a failed one.
        kept, self.extensions = self.extensions, self._built()
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = kept

    def get_outputs(self):
        return [o for o in super().get_outputs() if os.path.exists(o)]

    def get_output_mapping(self):
        return {k: v for k, v in super().get_output_mapping().items() if os.path.exists(v)}


ext_modules = [] if os.environ.get("LOCOPROP_NO_EXT") == "1" else [
    CMakeExtension("locoprop_kernels._C")]

setup(
    packages=["locoprop_kernels", "locoprop_kernels.backends", "locoprop_kernels.experiments",
              "locoprop_kernels.ops", "locoprop_kernels.optim",
              "locoprop_kernels.triton_kernels"],
    package_dir={"locoprop_kernels": "locoprop_kernels",
                 "locoprop_kernels.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
