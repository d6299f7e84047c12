"""Experiments run with the LocoProp trainer: the paper's deep autoencoder (``autoencoder``),
its data sets (``data``), the optimizers it compares (``optimizers``) and the plot (``plot``).

Nothing here is imported by ``locoprop_kernels`` itself: the experiment's extras (tqdm,
matplotlib, the peers) are needed only to run it (``pip install -e .[bench]``).
"""
