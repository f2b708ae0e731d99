"""The solver protocol shared by every truncated-pseudoinverse solver.

A solver is a small frozen dataclass that holds only hyperparameters. Its one
public method, :meth:`Solver.factorize`, validates the input, resolves the
tolerances (:mod:`truncpinv._tolerance`), switches TF32 off, and calls the
solver's own :meth:`Solver._compute`, which returns the leading singular
triplets. Adding a solver means writing one file with one ``_compute``.
"""

from __future__ import annotations

import abc
import time
from typing import Any, ClassVar

import torch

from .._factorization import Triplets, TruncatedPinv, no_tf32
from .._operator import LinearOperator
from .._tolerance import Tolerance, make_tolerance
from .._validation import prepare_matrix

__all__ = ["Solver", "SolverError", "check_seed", "make_generator"]


class SolverError(RuntimeError):
    """A solver failed to converge or broke down on valid, finite input."""


class Solver(abc.ABC):
    """Base class of all solvers.

    Class attributes describe capabilities (used by ``solver="auto"`` and by the
    test registry):

    * ``name``: the registry name;
    * ``exact``: computes the singular triplets to working accuracy by a direct method;
    * ``matrix_free``: accepts an operator with ``matmat``/``rmatmat`` only;
    * ``randomized``: uses random numbers (always from an explicit ``seed``).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    matrix_free: ClassVar[bool] = False
    randomized: ClassVar[bool] = False

    def factorize(
        self,
        A: Any,
        *,
        rank: int | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        check_finite: bool = True,
    ) -> TruncatedPinv:
        """Factorise the truncated pseudoinverse of ``A``.

        Args:
            A: ``m x n`` matrix: ``torch.Tensor`` (CPU or CUDA, float32/float64),
                ``numpy.ndarray`` (NumPy results), or, for matrix-free solvers,
                an operator (see :class:`truncpinv.LinearOperator`).
            rank: keep at most this many singular values (default ``min(m, n)``;
                larger values are clamped, see ``F.rank`` for the rank used).
            rtol: relative cut-off; keep ``sigma > max(atol, rtol * sigma_max)``.
                Default ``max(m, n) * eps`` as in :func:`torch.linalg.pinv`.
            atol: absolute cut-off (default 0).
            check_finite: reject NaN/Inf entries of a dense ``A`` (default ``True``).

        Returns:
            A :class:`truncpinv.TruncatedPinv`.
        """
        prep = prepare_matrix(A, allow_operator=self.matrix_free, solver=self.name, check_finite=check_finite)
        tol = make_tolerance(prep.shape, prep.dtype, rank=rank, rtol=rtol, atol=atol)
        t0 = time.perf_counter()
        try:
            with no_tf32(), torch.no_grad():
                trip = self._compute(prep.A, tol)
        except torch.linalg.LinAlgError as e:
            if prep.dense and not bool(torch.isfinite(prep.A).all()):  # type: ignore[arg-type]
                raise ValueError(
                    "`A` must be finite, but it contains NaN or Inf (check_finite=False skipped the scan)"
                ) from e
            raise SolverError(f"solver {self.name!r} failed on a {prep.shape[0]}x{prep.shape[1]} matrix: {e}") from e
        S = trip.S
        if not bool(torch.isfinite(S).all()):
            raise ValueError(
                f"solver {self.name!r} produced non-finite singular values: `A` (or the operator's products) "
                f"contains NaN/Inf or overflows in {prep.dtype}"
            )
        stats = {"solver": self.name, **trip.stats, "time": time.perf_counter() - t0}
        return TruncatedPinv(
            trip.U,
            S,
            trip.V,
            tol=tol,
            shape=prep.shape,
            stats=stats,
            operator=prep.A,
            numpy_out=prep.numpy_out,
        )

    @abc.abstractmethod
    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        """Return at least the ``tol.rank`` leading triplets of ``A`` whose
        singular values exceed ``tol.cutoff(sigma_max)`` (more is allowed),
        with ``S`` sorted descending."""


def check_seed(seed: Any) -> None:
    """Validate a ``seed`` field: ``None``, a non-negative int, or a ``torch.Generator``."""
    if seed is None or isinstance(seed, torch.Generator):
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, a torch.Generator or None, got {seed!r}")


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator for ``device``: the given one, or a fresh one seeded with ``seed`` (0 if ``None``).

    Randomness never comes from the global RNG, so the same seed always gives
    the same factorisation.
    """
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def sort_desc(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sort triplets by descending singular value (clamping tiny negatives to 0)."""
    S = S.clamp_min(0)
    order = torch.argsort(S, descending=True)
    return U[:, order], S[order], (None if V is None else V[:, order])
