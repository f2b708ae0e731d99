"""Automatic solver choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._factorization import Triplets
from .._operator import LinearOperator
from .._tolerance import Tolerance
from ._base import Solver, check_seed
from .dense_svd import DenseSVD
from .gram_eigen import GramEigen
from .lanczos import Lanczos
from .randomized import RandomizedSVD

__all__ = ["Auto", "choose_solver"]

#: Below this short side, every dense problem is cheap: use the exact Gram route.
SMALL_SIDE = 64
#: A request of ``rank <= short_side / LOW_RANK_FRACTION`` counts as low-rank.
LOW_RANK_FRACTION = 8
#: Gram route needs a sufficiently rectangular matrix to be cheaper than an SVD.
GRAM_ASPECT = 2.0
#: From this many entries on, the float32 Gram matrix plus refinement (``"mixed"``) beats
#: float64 accumulation; below it the float64 Gram matrix is cheap and slightly more accurate.
MIXED_SIZE = 1 << 22


def choose_solver(
    shape: tuple[int, int],
    rank: int,
    *,
    dense: bool,
    dtype: torch.dtype = torch.float32,
    seed: int | torch.Generator | None = 0,
) -> Solver:
    """The rule behind ``solver="auto"`` (measured in ``benchmarks/bench_solvers.py``).

    * **Matrix-free operator:** ``RandomizedSVD`` for low rank
      (``rank <= min(m, n) / 8``), ``Lanczos`` otherwise; exact Gram route when
      the short side is at most 64 (64 products build it exactly).
    * **Dense, low rank** (``rank <= min(m, n) / 8`` and ``min(m, n) > 64``):
      ``RandomizedSVD`` (a few passes over ``A`` with ``rank + p`` columns).
    * **Dense float32, rectangular** (aspect ratio >= 2): ``GramEigen``: one
      GEMM plus a small eigendecomposition, as accurate as a float32 SVD. From
      ``m n >= 2^22`` entries on with ``precision="mixed"`` (float32 Gram,
      refined through ``A``), below that accumulated in float64.
    * **Dense float64, or nearly square:** ``DenseSVD`` (QR-reduced when
      rectangular): backward stable, which a Gram matrix in float64 is not.
    """
    m, n = shape
    short, long_ = min(m, n), max(m, n)
    low_rank = short > SMALL_SIDE and rank * LOW_RANK_FRACTION <= short
    if not dense:
        if short <= SMALL_SIDE:
            return GramEigen()
        return RandomizedSVD(seed=seed) if low_rank else Lanczos()
    if low_rank:
        return RandomizedSVD(seed=seed)
    if dtype == torch.float32 and long_ >= GRAM_ASPECT * short:
        return GramEigen(precision="mixed" if m * n >= MIXED_SIZE else "float64")
    return DenseSVD()


def ritz_residual(A: torch.Tensor | LinearOperator, trip: Triplets, k: int) -> float:
    """``max_i ||A v_i - sigma_i u_i|| / sigma_1`` over the leading ``k`` computed triplets.

    One product with ``k`` columns. For Rayleigh–Ritz triplets ``A^T u_i = sigma_i v_i``
    holds by construction, so this is the whole SVD residual.
    """
    k = min(k, trip.S.numel())
    if k == 0 or trip.V is None or float(trip.S[0]) == 0.0:
        return 0.0
    V = trip.V[:, :k]
    AV = A @ V if isinstance(A, torch.Tensor) else A.matmat(V)
    R = AV - trip.U[:, :k] * trip.S[:k]
    return float(R.norm(dim=0).max()) / float(trip.S[0])


#: A randomized result whose relative SVD residual exceeds this is not trusted by ``Auto``.
RESIDUAL_TRUST = 1e-5
#: ... and so is one whose kept part has ``eps * kappa^2`` above this (measured: 512 x 200k float32,
#: decay 0.9, rank 64, ``kappa ~ 770``: error 8.9e-4 with a small residual).
KAPPA2_TRUST = 1e-3


@dataclass(frozen=True)
class Auto(Solver):
    """Chooses a solver from the shape, the requested rank and whether ``A`` is an operator.

    See :func:`choose_solver` for the rule; the chosen solver's name is recorded
    in ``F.stats["chosen"]``.

    A randomized sketch is only as good as the spectral gap at the requested
    rank (a flat spectrum has none). When ``Auto`` picks :class:`RandomizedSVD`
    it therefore checks the result a posteriori, at the cost of one product
    with ``rank`` columns: if ``max_i ||A v_i - sigma_i u_i|| > 1e-5 sigma_1``, or
    if the kept part is so ill-conditioned (``eps kappa^2 > 1e-3``, ``kappa > 91``
    in float32) that a sketch built from working-precision products cannot
    resolve its smallest values, it recomputes with the exact rule (``GramEigen``/``DenseSVD`` for dense input,
    ``Lanczos`` for operators) and records ``stats["fallback"]``.

    Args:
        seed: seed or ``torch.Generator`` passed to a randomized solver if one is chosen.
    """

    seed: int | torch.Generator | None = 0

    name: ClassVar[str] = "auto"
    exact: ClassVar[bool] = False
    matrix_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_seed(self.seed)

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        m, n = int(A.shape[0]), int(A.shape[1])
        dense = isinstance(A, torch.Tensor)
        chosen = choose_solver((m, n), tol.rank, dense=dense, dtype=A.dtype, seed=self.seed)
        trip = chosen._compute(A, tol)
        extra: dict[str, object] = {}
        if isinstance(chosen, RandomizedSVD):
            res = ritz_residual(A, trip, tol.rank)
            keep, _ = tol.keep(trip.S)
            kappa = float(trip.S[0] / trip.S[keep - 1]) if keep > 0 else 1.0
            extra["sketch_residual"] = res
            # a Krylov space built from working-precision products carries ~eps * kappa^2 error
            if res > RESIDUAL_TRUST or torch.finfo(A.dtype).eps * kappa * kappa > KAPPA2_TRUST:
                full = min(m, n)
                fallback = choose_solver((m, n), full, dense=dense, dtype=A.dtype) if dense else Lanczos()
                trip = fallback._compute(A, tol)
                extra["fallback"] = fallback.name
                chosen = fallback
        trip.stats = {**trip.stats, **extra, "chosen": chosen.name}
        return trip
