"""``polynomial``: the authors' "random polynomial" with 6 inputs (recipe in ``docs/tasks.md``).

* ``x ~ N(0, I_6)``; 10,000 train and 10,000 validation points from
  ``numpy.random.default_rng(57728)``, drawn in this order: the coefficients
  (one per term, ``N(0, 1)``), then the training ``x``, then the validation ``x``;
* terms: for each ``d = 0..4``, every exponent tuple ``p`` in ``range(d)^6``
  with ``sum(p) == d``, in ``itertools.product`` order;
* each term contributes :math:`c_t \\big(1 + \\sum_j x_j^{p_{t,j}}\\big)`;
* targets standardised by the training mean and std (numpy, ``ddof=0``);
  inputs are left as drawn;
* MLP 6-16-16-16-1 with GELU (673 parameters), batch 32, loader seed 82464.

**The quirk, reproduced on purpose.** This is the authors' generator, and it
is not a degree-4 polynomial:

* the per-variable factors are *added*, not multiplied, so the function is
  **additive**: :math:`f(x) = \\sum_t c_t + \\sum_j g_j(x_j)` with no
  interaction between inputs;
* ``range(d)`` excludes the exponent ``d`` itself, so ``d = 0`` and ``d = 1``
  give no term at all and no exponent exceeds 3 (185 terms: 15 + 50 + 120
  for ``d = 2, 3, 4``);
* a zero exponent still adds :math:`x_j^0 = 1`.

Together the target collapses to
:math:`c_0 + \\sum_j (a_{1j} x_j + a_{2j} x_j^2 + a_{3j} x_j^3)`, an additive
cubic with 19 effective features. The authors' later code renamed it
``AdditiveCubicDataset``; the paper's "random polynomial" results used it.

Time-to-target uses a validation loss of ``1e-2``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .base import Goal, Task, TaskData, mlp

__all__ = ["DATA_SEED", "LOADER_SEED", "N_VARS", "PolynomialTask", "polynomial_terms", "polynomial_values"]

#: Seed of ``numpy.random.default_rng`` (coefficients, then train x, then validation x).
DATA_SEED = 57728
#: Seed of the training-batch shuffling generator.
LOADER_SEED = 82464
#: Number of inputs.
N_VARS = 6
#: Largest ``d`` of the term enumeration.
MAX_DEGREE = 4


def polynomial_terms(max_degree: int = MAX_DEGREE, n_vars: int = N_VARS) -> list[tuple[int, ...]]:
    """The authors' exponent tuples: for ``d = 0..max_degree``, ``p`` in ``range(d)^n_vars`` with ``sum(p) == d``.

    Args:
        max_degree: largest ``d``.
        n_vars: number of inputs.

    Returns:
        The tuples in ``itertools.product`` order (185 for the recipe's 4 and 6).
    """
    return [p for d in range(max_degree + 1) for p in itertools.product(range(d), repeat=n_vars) if sum(p) == d]


def polynomial_values(x: np.ndarray, coeffs: np.ndarray, terms: list[tuple[int, ...]]) -> np.ndarray:
    """:math:`f(x) = \\sum_t c_t (1 + \\sum_j x_j^{p_{t,j}})`, in float64.

    Args:
        x: ``(N, n_vars)`` inputs.
        coeffs: ``(T,)`` coefficients.
        terms: ``T`` exponent tuples.

    Returns:
        ``(N,)`` values.

    Raises:
        ValueError: if the shapes do not match.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(coeffs) != len(terms) or any(len(p) != x.shape[1] for p in terms):
        raise ValueError(
            f"`x` must be (N, n_vars) with one coefficient per term and n_vars exponents per term, got x of "
            f"shape {x.shape}, {len(coeffs)} coefficients and {len(terms)} terms"
        )
    y = np.zeros(x.shape[0])
    for c, p in zip(coeffs, terms):
        term = np.ones(x.shape[0])
        for j, pj in enumerate(p):
            term += x[:, j] ** pj  # added, not multiplied: the authors' quirk
        y += c * term
    return y


class PolynomialTask(Task):
    """The ``polynomial`` task (see the module docstring for the recipe and its quirk)."""

    name = "polynomial"
    summary = (
        "authors' additive 'random polynomial' (185 terms, 6 inputs), 10k/10k points, "
        "MLP 6-16-16-16-1 (673 params), batch 32"
    )
    batch_size = 32
    loader_seed = LOADER_SEED
    target = 1e-2
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.5, "rank": 32, "rtol": 1e-3, "kappa": 2.0}
    goals: ClassVar[tuple[Goal, ...]] = (Goal("loss_ratio", 0.1),)
    quick_n_train = 2_000

    def build_data(self) -> TaskData:
        """The recipe's data: coefficients, train x, validation x from one ``default_rng(57728)``."""
        rng = np.random.default_rng(DATA_SEED)
        terms = polynomial_terms()
        coeffs = rng.normal(size=(len(terms),))
        x_train = rng.normal(size=(10_000, N_VARS))
        x_val = rng.normal(size=(10_000, N_VARS))
        y_train = polynomial_values(x_train, coeffs, terms)
        y_val = polynomial_values(x_val, coeffs, terms)
        mean, std = float(np.mean(y_train)), float(np.std(y_train))

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(a, dtype=torch.float32)

        return TaskData(
            t(x_train),
            t((y_train - mean) / std).unsqueeze(1),
            t(x_val),
            t((y_val - mean) / std).unsqueeze(1),
            {"y_mean": mean, "y_std": std, "n_terms": len(terms)},
        )

    def model(self, seed: int) -> nn.Module:
        """MLP 6-16-16-16-1 with GELU, 673 parameters."""
        return mlp(16, 3, seed=seed, n_in=N_VARS, n_out=1)
