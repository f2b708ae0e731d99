"""The solvers, one per file, and the registry that maps names to them.

To add a solver: write ``solvers/my_solver.py`` with a frozen dataclass
subclassing :class:`Solver` that implements ``_compute``, then add it to
:data:`SOLVERS` below. The test registry (``tests/registry.py``) picks it up.
"""

from __future__ import annotations

from typing import Any

from ._base import Solver, SolverError
from .auto import Auto
from .dense_svd import DenseSVD
from .gram_eigen import GramEigen
from .irlba import IRLBA
from .lanczos import Lanczos
from .lobpcg import LOBPCG
from .randomized import RandomizedSVD
from .scipy_svds import ScipySVDS

__all__ = [
    "IRLBA",
    "LOBPCG",
    "SOLVERS",
    "Auto",
    "DenseSVD",
    "GramEigen",
    "Lanczos",
    "RandomizedSVD",
    "ScipySVDS",
    "Solver",
    "SolverError",
    "get_solver",
]

#: Registry name -> solver class. Strings are only used at the edge (configs,
#: the seed-compatible Sven API); inside, solvers are objects.
SOLVERS: dict[str, type[Solver]] = {
    "auto": Auto,
    "svd": DenseSVD,
    "gram": GramEigen,
    "randomized": RandomizedSVD,
    "lobpcg": LOBPCG,
    "lanczos": Lanczos,
    "irlba": IRLBA,
    "svds": ScipySVDS,
}


def get_solver(solver: str | Solver, **options: Any) -> Solver:
    """Resolve ``solver`` (a registry name or a solver object) to a solver object.

    ``options`` are passed to the solver class when a name is given.
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError("solver options can only be given together with a solver name, not a solver object")
        return solver
    if isinstance(solver, str):
        try:
            cls = SOLVERS[solver]
        except KeyError:
            raise ValueError(f"unknown solver {solver!r}; valid names are {sorted(SOLVERS)}") from None
        return cls(**options)
    raise TypeError(f"`solver` must be a solver name or a truncpinv Solver object, got {type(solver).__name__}")
