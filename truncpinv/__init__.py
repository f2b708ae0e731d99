"""truncpinv: truncated pseudoinverses for PyTorch, NumPy and matrix-free operators.

The truncated pseudoinverse keeps the ``r`` largest singular values of ``A``
above a cut-off, ``A_r^+ = V_r \\Sigma_r^{-1} U_r^T``, and ``x = A_r^+ b`` is the
minimum-norm least-squares solution of the truncated problem.

>>> import torch, truncpinv as tp
>>> A = torch.randn(64, 1000, dtype=torch.float64)
>>> b = torch.randn(64, dtype=torch.float64)
>>> x = tp.lstsq(A, b, rank=32, rtol=1e-3)
>>> F = tp.pinv(A, rank=32, rtol=1e-3)
>>> bool(torch.allclose(F @ b, x))
True
"""

from __future__ import annotations

from typing import Any

from ._batch import BatchedTruncatedPinv, is_batch, lstsq_batched, pinv_batched
from ._certify import Certificate, UncertifiedResultWarning, certify, default_tol
from ._factorization import Triplets, TruncatedPinv, no_tf32
from ._gram import pinv_from_gram
from ._lsmr import LSMR, LstsqResult, krylov_applies
from ._operator import CallableOperator, LinearOperator, ScipyOperator, TensorOperator, aslinearoperator
from ._tolerance import Tolerance, default_rtol, resolve_cutoff, select_rank
from .solvers import (
    IRLBA,
    LOBPCG,
    SOLVERS,
    Auto,
    DenseSVD,
    GramEigen,
    Lanczos,
    RandomizedSVD,
    ScipySVDS,
    Solver,
    SolverError,
    get_solver,
)

__all__ = [
    "IRLBA",
    "LOBPCG",
    "LSMR",
    "SOLVERS",
    "Auto",
    "BatchedTruncatedPinv",
    "CallableOperator",
    "Certificate",
    "DenseSVD",
    "GramEigen",
    "Lanczos",
    "LinearOperator",
    "LstsqResult",
    "RandomizedSVD",
    "ScipyOperator",
    "ScipySVDS",
    "Solver",
    "SolverError",
    "TensorOperator",
    "Tolerance",
    "Triplets",
    "TruncatedPinv",
    "UncertifiedResultWarning",
    "aslinearoperator",
    "certify",
    "default_rtol",
    "default_tol",
    "get_solver",
    "krylov_applies",
    "lstsq",
    "no_tf32",
    "pinv",
    "pinv_from_gram",
    "resolve_cutoff",
    "select_rank",
]

from ._version import __version__ as __version__


def pinv(
    A: Any,
    *,
    rank: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    solver: str | Solver = "auto",
    check_finite: bool = True,
) -> TruncatedPinv | BatchedTruncatedPinv:
    """Factorised truncated pseudoinverse of ``A``.

    Keeps at most ``rank`` singular values ``sigma > max(atol, rtol * sigma_max)``.
    The default ``rtol`` is ``max(m, n) * eps`` as in :func:`torch.linalg.pinv`.

    A dense batch ``(..., m, n)`` gives a :class:`BatchedTruncatedPinv`, one
    factorisation per matrix (as a loop would compute them).

    Args:
        A: ``m x n`` tensor, array, or matrix-free operator; or a dense batch ``(..., m, n)``.
        rank: maximum rank (default ``min(m, n)``; larger values are clamped).
        rtol: relative tolerance.
        atol: absolute tolerance (default 0).
        solver: a registry name (``"auto"``, ``"svd"``, ``"gram"``,
            ``"randomized"``, ``"lobpcg"``, ``"lanczos"``, ``"irlba"``, ``"svds"``) or a solver object.
        check_finite: reject NaN/Inf in a dense ``A``.

    Returns:
        A :class:`TruncatedPinv` (a :class:`BatchedTruncatedPinv` for a batch); ``F @ b`` solves,
        ``F.T`` is the pseudoinverse of ``A^T``, ``F.truncate(...)`` re-thresholds, ``F.to_dense()`` forms the
        matrix.
    """
    if isinstance(solver, LSMR) or solver == LSMR.name:
        raise ValueError(
            "solver 'lsmr' solves least-squares problems without factorising `A`, so it has no pseudoinverse "
            "to return; use tp.lstsq(A, b, solver='lsmr'), or an SVD solver here"
        )
    if is_batch(A):
        return pinv_batched(
            A, lambda Ai: pinv(Ai, rank=rank, rtol=rtol, atol=atol, solver=solver, check_finite=check_finite)
        )
    return get_solver(solver).factorize(A, rank=rank, rtol=rtol, atol=atol, check_finite=check_finite)


def lstsq(
    A: Any,
    b: Any,
    *,
    rank: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    solver: str | Solver | LSMR = "auto",
    check_finite: bool = True,
) -> Any:
    """Minimum-norm least-squares solution ``x = A_r^+ b`` of the truncated problem.

    ``x`` minimises ``||A_r x - b||`` and, among the minimisers, ``||x||``. With
    nothing truncated it equals :func:`numpy.linalg.lstsq`'s solution. ``b`` may
    be ``(m,)`` or ``(m, k)``; the result is ``(n,)`` or ``(n, k)``, of the same
    kind (tensor or array) as ``b``. A dense batch ``A`` ``(..., m, n)`` solves
    each matrix on its own, with ``b`` broadcast as in :func:`torch.linalg.solve`
    (a batch of vectors when ``b.ndim == 1`` or ``b.shape == A.shape[:-1]``,
    else of ``(m, k)`` matrices). The result is differentiable in ``b`` and in
    a dense ``A`` that requires grad (docs/gradients.md). Arguments as in :func:`pinv`, and:

    * ``solver="auto"`` with a **matrix-free** ``A`` (SciPy sparse matrix or
      ``LinearOperator``, truncpinv operator) and **no truncation asked for**
      (``rank``, ``rtol``, ``atol`` all ``None``) solves by :class:`LSMR`
      instead of computing every singular triplet: tens of products instead of
      thousands. Its answer is certified (backward error within
      :func:`default_tol`); when it is not, or when LSMR finds a singular value
      at or below the default cut-off ``max(m, n) eps sigma_max`` (so the
      truncation matters), the truncated SVD is computed as before. Dense input
      and explicit truncations always take the SVD path.
    * ``solver="lsmr"`` or ``solver=LSMR(tol=..., damp=...)`` always solves
      by LSMR (no truncation: ``rank``/``rtol``/``atol`` must stay ``None``);
      ``LSMR().solve(A, b)`` also returns the statistics.
    """
    if is_batch(A):
        return lstsq_batched(
            A,
            b,
            lambda Ai, bi: lstsq(Ai, bi, rank=rank, rtol=rtol, atol=atol, solver=solver, check_finite=check_finite),
        )
    if isinstance(solver, LSMR) or solver == LSMR.name:
        for name, val in (("rank", rank), ("rtol", rtol), ("atol", atol)):
            if val is not None:
                raise ValueError(
                    f"`{name}` truncates the SVD, which solver 'lsmr' never computes; leave it None (LSMR's "
                    f"stopping tolerance is LSMR(tol=...), its regulariser LSMR(damp=...)) or use an SVD solver"
                )
        krylov = solver if isinstance(solver, LSMR) else LSMR()
        return krylov.solve(A, b, check_finite=check_finite).x
    if (isinstance(solver, Auto) or solver == Auto.name) and krylov_applies(A, rank=rank, rtol=rtol, atol=atol):
        res = LSMR().solve_quietly(A, b, check_finite=check_finite)
        if res.certified and res.stats["cond_A"] < res.stats["conlim"]:
            return res.x
    F = get_solver(solver).factorize(A, rank=rank, rtol=rtol, atol=atol, check_finite=check_finite)
    return F.solve(b, check_finite=check_finite)
