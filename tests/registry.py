"""The one registry of solvers the property tests run over, with capabilities and accuracy.

Adding a solver to ``truncpinv.SOLVERS`` adds it here automatically; its
accuracy demand goes in :data:`ACCURACY`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import truncpinv as tp

#: Accuracy demanded of each solver: ``(c, squares)`` allows a relative error of
#: ``c * (eps(dtype) * kappa_r + squares * eps64 * kappa_r^2)``, where
#: ``kappa_r = sigma_max / sigma_r`` is the condition number of the kept part.
#: A backward-stable SVD reaches ``eps * kappa_r``; a method that forms a Gram
#: matrix (even in float64) adds ``eps64 * kappa_r^2``, which is negligible for
#: float32 data and visible only for ill-conditioned float64 data.
ACCURACY: dict[str, tuple[float, bool]] = {
    "svd": (50.0, False),
    "gram": (50.0, True),
    "auto": (50.0, True),
    "randomized": (200.0, True),
    "lobpcg": (200.0, True),
    "lanczos": (200.0, False),
    "irlba": (200.0, False),
    "svds": (200.0, True),
}


@dataclass(frozen=True)
class SolverInfo:
    """A solver under test and what it can do."""

    name: str
    solver: tp.Solver
    exact: bool
    matrix_free: bool
    randomized: bool
    accuracy: float
    squares: bool

    def rel_tol(self, dtype: torch.dtype, kappa_r: float) -> float:
        """Relative error allowed for a kept part of condition number ``kappa_r``."""
        k = max(kappa_r, 1.0)
        eps64 = torch.finfo(torch.float64).eps
        return self.accuracy * (torch.finfo(dtype).eps * k + self.squares * eps64 * k * k)

    def __str__(self) -> str:
        return self.name


SOLVER_INFOS: list[SolverInfo] = [
    SolverInfo(
        name=name,
        solver=cls(),
        exact=cls.exact,
        matrix_free=cls.matrix_free,
        randomized=cls.randomized,
        accuracy=ACCURACY[name][0],
        squares=ACCURACY[name][1],
    )
    for name, cls in tp.SOLVERS.items()
] + [
    # solver variants whose code paths differ enough to need their own run
    SolverInfo("gram-mixed", tp.GramEigen(precision="mixed"), True, True, False, 50.0, True),
]

DTYPES = [torch.float32, torch.float64]
SHAPES = {"tall": (40, 17), "wide": (17, 40), "square": (24, 24)}
