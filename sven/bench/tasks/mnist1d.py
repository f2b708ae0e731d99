r"""``mnist1d``: the procedural MNIST-1D data set (Greydanus 2020), generated offline, MLP 40-256-256-10.

MNIST-1D (S. Greydanus, "Scaling down deep learning", arXiv:2011.14439) is a
small classification problem that separates models better than MNIST does:
ten 1-D templates of 12 points, one per digit, each turned into a sample of
40 points by random transformations and noise. :func:`make_mnist1d` is this
project's implementation of the paper's recipe (:class:`MNIST1DRecipe` holds
its constants, with the paper's defaults); it draws from
``numpy.random.default_rng(seed)`` instead of the reference code's global
``np.random.seed(42)``, so the samples are a fresh draw from the same
distribution, not the reference ``mnist1d_data.pkl``.

Per sample, for the template :math:`x` of its class (:func:`templates`):

1. **pad**: append :math:`p` zeros, :math:`p` uniform in ``padding = [36, 60]``
   (the template is first offset by ``1e-8`` so that its own zeros stay
   "signal");
2. **dilate**: linear interpolation to ``12 + padding[1] = 72`` points
   (the shorter the padding, the wider the digit);
3. **scale**: multiply by :math:`1 + 0.4 (u - 1/2)`, :math:`u \sim U[0, 1]`;
4. **translate**: a circular shift by :math:`k` uniform in ``{0, ..., 47}``;
5. **correlated noise**: the padding (the exact zeros) is replaced by white
   noise of standard deviation 0.25 smoothed by a Gaussian filter of width 2
   (``scipy.ndimage.gaussian_filter1d``);
6. **white noise**: add :math:`N(0, 0.02^2)` everywhere;
7. **shear**: subtract :math:`c\,\mathrm{linspace}(-1/2, 1/2)`,
   :math:`c = 0.75 (u - 1/2)`;
8. **subsample**: linear interpolation to 40 points.

``num_samples = 5000`` samples (500 per class, in class order), shuffled by one
permutation, standardised with the mean and standard deviation of all of them
(``(x - mean) / std``, as the reference does), and split 80 / 20: the first
4,000 train, the last 1,000 validate.

The task: MLP 40-256-256-10 with GELU (78,858 parameters), per-sample
cross-entropy, batch 64 shuffled by a generator seeded 0, 20 epochs, accuracy
reported; Sven ``k=32, lr=0.5, rtol=1e-4, kappa=2`` (the ``digits-ce``
settings, not tuned here). Time-to-target uses a validation cross-entropy of
``1.0``. The paper's MLP reaches about 68 % test accuracy, logistic
regression about 32 %, a CNN about 94 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from torch import nn

from .base import ClassifierTask, TaskData, mlp

__all__ = [
    "LOADER_SEED",
    "MNIST1D",
    "TEMPLATE_POINTS",
    "MNIST1DRecipe",
    "MNIST1DTask",
    "correlated_noise",
    "interpolate",
    "interpolate_rows",
    "make_mnist1d",
    "templates",
    "transform",
]

#: Seed of the training-batch shuffling generator.
LOADER_SEED = 0
N_CLASSES = 10
#: The ten digit templates of the paper (``get_templates`` of the reference code, github.com/greydanus/mnist1d),
#: 12 points each, before :func:`templates` whitens them.
TEMPLATE_POINTS = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ]
)
#: Offset of the template before padding, so that a template value of 0 is not taken for padding.
EPS = 1e-8


def templates() -> np.ndarray:
    """The ``(10, 12)`` templates: each row centred and scaled to unit standard deviation, shifted to start
    (and end) at 0, then divided by 6, as in the reference code."""
    x = TEMPLATE_POINTS - TEMPLATE_POINTS.mean(axis=1, keepdims=True)
    x = x / x.std(axis=1, keepdims=True)
    x = x - x[:, :1]
    return x / 6.0


@dataclass(frozen=True)
class MNIST1DRecipe:
    """The constants of the MNIST-1D recipe (the paper's defaults).

    Attributes:
        num_samples: samples in all, split evenly over the 10 classes.
        train_split: fraction of the shuffled samples that train (the rest validate).
        padding: ``(low, high)``: the number of zeros appended is uniform in ``low..high``.
        scale_coeff: amplitude scaling ``1 + scale_coeff * (u - 1/2)``.
        max_translation: circular shift uniform in ``0 .. max_translation - 1``.
        corr_noise_scale: standard deviation of the white noise that, Gaussian-smoothed (width 2), fills the padding.
        iid_noise_scale: standard deviation of the white noise added everywhere.
        shear_scale: slope amplitude of the shear ``c * linspace(-1/2, 1/2)``, ``c = shear_scale * (u - 1/2)``.
        final_seq_length: points of a sample.
        seed: seed of ``numpy.random.default_rng``.
    """

    num_samples: int = 5000
    train_split: float = 0.8
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    final_seq_length: int = 40
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_translation", "final_seq_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.num_samples < N_CLASSES:
            raise ValueError(f"`num_samples` must be at least {N_CLASSES}, got {self.num_samples}")
        low, high = self.padding
        if not 0 <= low <= high:
            raise ValueError(f"`padding` must be (low, high) with 0 <= low <= high, got {self.padding!r}")
        if not 0 < self.train_split < 1:
            raise ValueError(f"`train_split` must be in (0, 1), got {self.train_split!r}")
        for name in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)!r}")


def interpolate(x: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of the points ``x`` (on ``linspace(0, 1, len(x))``) at ``n`` equispaced points."""
    return np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, len(x)), x)


def interpolate_rows(x: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """Row by row, :func:`interpolate` of the first ``lengths[i]`` points of ``x[i]`` at ``n`` equispaced points.

    Args:
        x: ``(m, w)`` points.
        lengths: ``(m,)`` the number of points of each row that count, ``1 <= lengths[i] <= w``.
        n: output points per row.

    Returns:
        ``(m, n)`` values.
    """
    last = lengths.astype(np.int64)[:, None] - 1
    f = np.linspace(0.0, 1.0, n)[None, :] * last  # fractional positions
    lo = np.minimum(np.floor(f).astype(np.int64), np.maximum(last - 1, 0))
    hi = np.minimum(lo + 1, x.shape[1] - 1)
    w = f - lo
    rows = np.arange(x.shape[0])[:, None]
    return (1.0 - w) * x[rows, lo] + w * x[rows, hi]


def correlated_noise(shape: int | tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray:
    """White noise of standard deviation ``scale`` smoothed along the last axis by a Gaussian filter of width 2.

    The smoothing keeps the lag-1 correlation at about :math:`e^{-1/16} \\approx 0.94` and the standard deviation
    at about ``scale / (2 sqrt(pi) 2)^(1/2) = 0.38 scale`` (the L2 norm of the unit-sum Gaussian kernel).
    """
    return gaussian_filter1d(scale * rng.standard_normal(shape), sigma=2.0, axis=-1)


def transform(shapes: np.ndarray, recipe: MNIST1DRecipe, rng: np.random.Generator) -> np.ndarray:
    """One sample per row of ``shapes`` (``(m, 12)`` templates): steps 1-8 of the module docstring, vectorised.

    Returns:
        ``(m, recipe.final_seq_length)`` samples.
    """
    m, length = shapes.shape
    low, high = recipe.padding
    width = length + high
    rows = np.arange(m)[:, None]
    padded = np.zeros((m, width))
    padded[:, :length] = shapes + EPS  # 1. pad
    x = interpolate_rows(padded, length + rng.integers(low, high + 1, size=m), width)  # 2. dilate
    x = x * (1.0 + recipe.scale_coeff * (rng.random((m, 1)) - 0.5))  # 3. scale
    shift = rng.integers(recipe.max_translation, size=(m, 1))
    x = x[rows, (np.arange(width)[None, :] - shift) % width]  # 4. translate (np.roll by shift)
    x = np.where(x != 0, x, correlated_noise((m, width), recipe.corr_noise_scale, rng))  # 5. noise in the padding
    x = x + recipe.iid_noise_scale * rng.standard_normal((m, width))  # 6. white noise
    x = x - recipe.shear_scale * (rng.random((m, 1)) - 0.5) * np.linspace(-0.5, 0.5, width)  # 7. shear
    return interpolate_rows(x, np.full(m, width), recipe.final_seq_length)  # 8. subsample


@dataclass(frozen=True)
class MNIST1D:
    """A generated MNIST-1D data set.

    Attributes:
        x_train: ``(n_train, final_seq_length)`` standardised samples.
        y_train: ``(n_train,)`` labels 0..9.
        x_val: validation samples.
        y_val: validation labels.
        mean: mean of all raw samples (subtracted).
        std: standard deviation of all raw samples (divided by).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    mean: float
    std: float


def make_mnist1d(recipe: MNIST1DRecipe | None = None) -> MNIST1D:
    """Generate MNIST-1D (module docstring): ``num_samples // 10`` samples per class, shuffled, standardised, split.

    Args:
        recipe: the constants and the seed (default: the paper's, seed 42).

    Returns:
        The :class:`MNIST1D` arrays (float64 samples, int64 labels).
    """
    recipe = MNIST1DRecipe() if recipe is None else recipe
    rng = np.random.default_rng(recipe.seed)
    shapes = templates()
    per_class = recipe.num_samples // N_CLASSES
    ys = np.repeat(np.arange(N_CLASSES, dtype=np.int64), per_class)  # in class order, as the reference
    xs = transform(shapes[ys], recipe, rng)
    perm = rng.permutation(len(ys))
    xs, ys = xs[perm], ys[perm]
    mean, std = float(xs.mean()), float(xs.std())
    xs = (xs - mean) / std
    split = int(len(ys) * recipe.train_split)
    return MNIST1D(xs[:split], ys[:split], xs[split:], ys[split:], mean, std)


class MNIST1DTask(ClassifierTask):
    """The ``mnist1d`` task (see the module docstring for the recipe)."""

    name = "mnist1d"
    summary = (
        "MNIST-1D (Greydanus 2020) generated offline, seed 42, 4,000/1,000, per-sample cross-entropy, "
        "MLP 40-256-256-10 (78,858 params), batch 64, 20 epochs"
    )
    batch_size = 64
    loader_seed = LOADER_SEED
    target = 1.0
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.5, "rank": 32, "rtol": 1e-4, "kappa": 2.0}
    quick_n_train = 256
    epochs = 20
    sven_reference = False  # its step takes seconds on this model (base.Task.sven_reference)

    def build_data(self) -> TaskData:
        """The paper's recipe (:func:`make_mnist1d` with :class:`MNIST1DRecipe` defaults), as float32 / int64."""
        d = make_mnist1d()
        return TaskData(
            torch.tensor(d.x_train, dtype=torch.float32),
            torch.tensor(d.y_train),
            torch.tensor(d.x_val, dtype=torch.float32),
            torch.tensor(d.y_val),
            {"x_mean": d.mean, "x_std": d.std, "n_classes": N_CLASSES, **asdict(MNIST1DRecipe())},
        )

    def model(self, seed: int) -> nn.Module:
        """MLP 40-256-256-10 with GELU, 78,858 parameters."""
        return mlp(256, 2, seed=seed, n_in=40, n_out=N_CLASSES)
