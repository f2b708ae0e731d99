"""Automatic solver choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._certify import Certificate
from .._factorization import Triplets
from .._operator import LinearOperator
from .._tolerance import Tolerance
from ._base import Solver, SolverError, check_seed
from .dense_svd import DenseSVD
from .gram_eigen import GramEigen
from .lanczos import Lanczos
from .lobpcg import _exact
from .randomized import RandomizedSVD
from .scipy_svds import ScipySVDS, svds_serves

__all__ = ["Auto", "choose_solver"]

#: Below this short side, every dense problem is cheap: use the exact Gram route.
SMALL_SIDE = 64
#: A request of ``rank <= short_side / LOW_RANK_FRACTION`` counts as low-rank.
LOW_RANK_FRACTION = 8
#: Gram route needs a sufficiently rectangular matrix to be cheaper than an SVD.
GRAM_ASPECT = 2.0
#: ``Auto`` gives a randomized sketch this many Krylov blocks before it falls back to an exact method.
AUTO_POWER_BUDGET = 3
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
    cpu_operator: bool = False,
) -> Solver:
    """The rule behind ``solver="auto"`` (measured in ``benchmarks/bench_solvers.py`` and
    ``benchmarks/sparse_table.py``).

    * **Matrix-free input on the CPU** (``cpu_operator=True``: a SciPy sparse matrix or
      ``LinearOperator``, a ``TensorOperator`` over a CPU torch sparse or dense tensor, a
      ``CallableOperator`` or any protocol object on the CPU), low rank
      (``rank <= min(m, n) / 8``): ``ScipySVDS`` (ARPACK), certified by truncpinv.
      ARPACK's implicit restarts need fewer products than our ``Lanczos`` on the
      flat spectra of sparse data (``benchmarks/sparse_table.py``: on SciPy input
      ARPACK plus the certificate took 0.1x to 0.6x ``Lanczos``'s time, on torch operators
      see docs/solvers.md). A torch sparse tensor reaches SciPy's kernels without a copy (CSR).
    * **Other matrix-free operators** (CUDA, where each of ARPACK's single-vector
      products would cross to the CPU; any operator at a high rank): ``Lanczos``
      (certified, and faster than a randomized sketch on the flat spectra of sparse
      data); exact Gram route when the short side is at most 64 (64 products build it
      exactly).
    * **Dense, low rank** (``rank <= min(m, n) / 8`` and ``min(m, n) > 64``):
      ``RandomizedSVD`` (a few passes over ``A`` with ``rank + p`` columns).
    * **Dense float32, rectangular** (aspect ratio >= 2): ``GramEigen``: one
      GEMM plus a small eigendecomposition, as accurate as a float32 SVD. From
      ``m n >= 2^22`` entries on with ``precision="mixed"`` (float32 Gram,
      refined through ``A``), below that accumulated in float64.
    * **Dense float64, or nearly square:** ``DenseSVD`` (QR-reduced when
      rectangular): backward stable, which a Gram matrix in float64 is not.
    * **Dense complex:** ``DenseSVD``, the one solver that takes complex input.
    """
    m, n = shape
    short, long_ = min(m, n), max(m, n)
    low_rank = short > SMALL_SIDE and rank * LOW_RANK_FRACTION <= short
    if dense and dtype.is_complex:
        return DenseSVD()
    if not dense:
        if short <= SMALL_SIDE:
            return GramEigen()
        if cpu_operator and low_rank:
            return ScipySVDS(seed=seed if isinstance(seed, int) else 0)
        return Lanczos(seed=seed if isinstance(seed, int) else 0)
    if low_rank:
        return RandomizedSVD(seed=seed, max_power_iters=AUTO_POWER_BUDGET)
    if dtype == torch.float32 and long_ >= GRAM_ASPECT * short:
        return GramEigen(precision="mixed" if m * n >= MIXED_SIZE else "float64")
    return DenseSVD()


#: A randomized result is not trusted by ``Auto`` when uncertified (:mod:`truncpinv._certify`), nor when
#: its kept part has ``eps * kappa^2`` above this (measured: 512 x 200k float32,
#: decay 0.9, rank 64, ``kappa ~ 770``: error 8.9e-4 with a small residual).
KAPPA2_TRUST = 1e-3


@dataclass(frozen=True)
class Auto(Solver):
    """Chooses a solver from the shape, the requested rank and whether ``A`` is an operator.

    See :func:`choose_solver` for the rule; the chosen solver's name is recorded
    in ``F.stats["chosen"]``.

    ``Auto`` never returns an uncertified result. The iterative and randomized
    solvers certify their answers a posteriori (:mod:`truncpinv._certify`:
    residuals in both orientations within ``tol sigma_1`` and no singular value
    above the kept ones in ``A (I - V V^T)``) and keep going within a budget;
    a result that is still uncertified, or a randomized one whose kept part is so
    ill-conditioned (``eps kappa^2 > 1e-3``) that float32 products cannot
    resolve its smallest values, is recomputed (an ARPACK answer by ``Lanczos`` first), and
    then by an exact method (``GramEigen``/``DenseSVD``
    for dense input, the operator materialised with ``min(m, n)`` products and an
    exact decomposition otherwise). ``stats["fallback"]`` names it and
    ``stats["uncertified"]`` holds the rejected attempt's statistics.

    Args:
        seed: seed or ``torch.Generator`` passed to a randomized solver if one is chosen.
    """

    seed: int | torch.Generator | None = 0

    name: ClassVar[str] = "auto"
    exact: ClassVar[bool] = False
    matrix_free: ClassVar[bool] = True
    complex_ok: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_seed(self.seed)

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        m, n = int(A.shape[0]), int(A.shape[1])
        dense = isinstance(A, torch.Tensor)
        chosen = choose_solver(
            (m, n), tol.rank, dense=dense, dtype=A.dtype, seed=self.seed, cpu_operator=svds_serves(A)
        )
        extra: dict[str, object] = {}
        trip = _attempt(chosen, A, tol)
        if isinstance(chosen, ScipySVDS) and not _certified(trip):  # uncertified or not converged: our Lanczos
            extra["uncertified"] = {k: v for k, v in trip.stats.items() if not k.startswith("_")}
            extra["fallback"] = "lanczos"
            chosen = Lanczos(seed=self.seed if isinstance(self.seed, int) else 0)
            trip = chosen._compute(A, tol)
        bad = not _certified(trip)
        if isinstance(chosen, RandomizedSVD) and not bad:
            keep, _ = tol.keep(trip.S)
            kappa = float(trip.S[0] / trip.S[keep - 1]) if keep > 0 else 1.0
            # a Krylov space built from working-precision products carries ~eps * kappa^2 error
            bad = torch.finfo(A.dtype).eps * kappa * kappa > KAPPA2_TRUST
        if bad:  # never return an uncertified result: fall back to an exact method
            extra["uncertified"] = {k: v for k, v in trip.stats.items() if not k.startswith("_")}
            if dense and isinstance(chosen, GramEigen):
                fallback: Solver = DenseSVD()  # backward stable: resolves what the Gram matrix squared away
                trip = fallback._compute(A, tol)
                name = fallback.name
            elif dense:
                fallback = choose_solver((m, n), min(m, n), dense=True, dtype=A.dtype)
                trip = fallback._compute(A, tol)
                name = fallback.name
            else:
                # materialised and decomposed exactly (a thin SVD for float64 data, which resolves what
                # GramEigen's floor loses; float32 data never loses values to it, see gram_eigen)
                trip = _exact(A, tol, "uncertified", int(trip.stats.get("matvecs", 0)), 0)
                name = "exact"
            trip.stats = {k: v for k, v in trip.stats.items() if k != "_certificate"}
            extra["fallback"] = name
            extra["certified"] = True
            chosen_name = name
        else:
            chosen_name = chosen.name
        trip.stats = {**trip.stats, **extra, "chosen": chosen_name}
        return trip


def _attempt(solver: Solver, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
    """``solver``'s triplets; SciPy's ``svds`` failing to converge counts as an uncertified result."""
    if not isinstance(solver, ScipySVDS):
        return solver._compute(A, tol)
    try:
        return solver._compute(A, tol)
    except SolverError as e:
        empty = A.new_zeros(0) if isinstance(A, torch.Tensor) else torch.zeros(0, dtype=A.dtype, device=A.device)
        return Triplets(empty[:, None], empty, None, {"_uncertified_reason": str(e), "error": str(e)})


def _certified(trip: Triplets) -> bool:
    """Whether a solver's result carries no failed certificate (exact results carry none)."""
    cert = trip.stats.get("_certificate")
    bad = isinstance(cert, Certificate) and not cert.certified
    return not (bad or "_uncertified_reason" in trip.stats)  # GramEigen lost requested values below its floor
