"""The deep-autoencoder experiment (LocoProp vs backprop and second-order peers).

A thin runner: the experiment lives in ``locoprop_kernels/experiments/`` so that the console
script ``locoprop-autoencoder`` (installed with ``pip install -e .[bench]``) runs the same code.

    python bench/autoencoder.py --dataset mnist --epochs 6 --optimizers locoprop-m,adam
    python bench/autoencoder.py --help

See docs/autoencoder.md for the options, the data sets and the results.
"""
from locoprop_kernels.experiments.autoencoder import main

if __name__ == "__main__":
    main()
