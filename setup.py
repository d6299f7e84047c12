"""Build script: packages, and the top-level ``triton_kernels/`` folder installed as
``locoprop_kernels.triton_kernels`` (DESIGN.md section 3: PyPI and Triton already ship a
top-level ``triton_kernels``, so we never install one)."""
from setuptools import setup

setup(
    packages=["locoprop_kernels", "locoprop_kernels.triton_kernels"],
    package_dir={"locoprop_kernels": "locoprop_kernels",
                 "locoprop_kernels.triton_kernels": "triton_kernels"},
)
