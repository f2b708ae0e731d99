r"""The factorisation stage: the truncated pseudoinverse of :math:`M` from :mod:`truncpinv`.

A materialised ``M`` goes to the configured solver; an operator with a Gram
matrix (the Gram and matrix-free routes) to :func:`truncpinv.pinv_from_gram`,
``V = M^T U S^{-1}`` kept implicit. There the solver factorises ``K = M M^T``:
``Auto`` (the default), ``DenseSVD`` and ``GramEigen`` (the seed API's
``svd_mode="torch"``) take the exact float64 eigendecomposition; any other
solver (``RandomizedSVD``, ``Lanczos``, ``LOBPCG``: the seed API's randomized,
``scipy`` and ``lobpcg`` modes) computes the top ``rank`` eigenpairs of ``K``
with its own accuracy guarantee, which pays off when ``rank`` is much smaller
than the batch.
Failures and non-finite spectra become a :class:`~sven.info.StepFault`, so
the step is skipped with the parameters unchanged.

Two shortcuts for a materialised ``M`` under the default ``Auto`` solver, the same mathematics:

* an ``M`` of at most :data:`DIRECT_SIDE` columns (parameters: the Jacobian of a curve fit) is
  factorised by one LAPACK SVD in float64 directly: what ``Auto`` computes (``DenseSVD``; for a
  float32 ``M`` at least as accurately as its float64 Gram matrix), without the dispatch, validation and
  equilibration that cost more than the SVD of a 100 x 3 matrix;
* a tall ``M`` (:func:`sven.normal_equations.applies`) is factorised from its normal equations when
  they resolve the step's damping (:mod:`sven.normal_equations`), with the SVD as the fallback.

And one for the Gram route, when every direction of the step is damped (``floor > 0``: the loss rule's
step control): the eigenvalues of ``K`` alone and a Cholesky solve for each damping
(:mod:`sven.damped_gram`), each direction certified equal to the exact path's to round-off, the
eigenvectors formed where it is not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import truncpinv

from . import damped_gram as DG
from . import functional as SF
from . import normal_equations as NE
from .info import StepFault

__all__ = ["DIRECT_SIDE", "factorize", "solver_for_step"]

#: A materialised ``M`` with at most this many columns is factorised by one float64 SVD directly.
DIRECT_SIDE = 10


def solver_for_step(solver: truncpinv.Solver, seed: int, step: int) -> truncpinv.Solver:
    """The solver with a per-step seed ``seed + step`` if it is randomized (reproducible on resume)."""
    if dataclasses.is_dataclass(solver) and any(f.name == "seed" for f in dataclasses.fields(solver)):
        if not isinstance(getattr(solver, "seed", None), torch.Generator):
            return dataclasses.replace(solver, seed=(seed + step) % (1 << 62))  # type: ignore[type-var]
    return solver


def factorize(
    M: Any,
    solver: truncpinv.Solver,
    *,
    rank: int | None,
    rtol: float | None,
    atol: float,
    damping: float | None = None,
    seed: tuple[int, int] | None = None,
    floor: float | None = None,
    untruncated: bool = False,
) -> truncpinv.TruncatedPinv:
    """``M_k^+``: keep at most ``rank`` singular values above ``max(atol, rtol * sigma_max)``.

    ``rtol=None``: numerically zero values only, :func:`truncpinv.default_rtol` of ``M``'s shape and dtype.
    ``damping``: the smallest damping (relative to :math:`\\sigma_1^2`) the step expects to use, when it
    expects one: a tall ``M`` is then factorised from its normal equations if they resolve it
    (:mod:`sven.normal_equations`); ``None`` keeps the SVD.
    ``seed``: ``(seed, step)`` for a randomized ``solver`` (:func:`solver_for_step`), applied where it is used.
    ``floor``: the smallest damping every direction of the step uses (:meth:`sven.control.Policy.smallest_damping`),
    when it is positive: a float32 Gram operator then gets a :class:`sven.damped_gram.DampedGram` (Cholesky
    directions; :func:`sven.damped_gram.applies`).
    ``untruncated``: with ``rtol=None`` and ``atol=0``, that Cholesky path cuts nothing
    (:class:`sven.damped_gram.Untruncated`: every direction damped, :math:`\\sigma_{max}` alone computed), where
    the default would cut the numerically-zero values of ``M``'s dtype; every other path keeps that cut.

    Raises:
        StepFault: the solver failed, or ``M`` or its spectrum is not finite.
    """
    whole = untruncated and rtol is None and atol == 0
    if rtol is None:
        rtol = truncpinv.default_rtol((int(M.shape[0]), int(M.shape[1])), M.dtype)
    if isinstance(M, torch.Tensor) and isinstance(solver, truncpinv.Auto) and not M.is_complex():
        with torch.no_grad():
            F = _shortcut(M, rank=rank, rtol=rtol, atol=atol, damping=damping)
        if F is not None:
            return F
    if DG.applies(M, solver, rank=rank, damping=floor):
        D = DG.factorize_damped(M, solver, rank=rank, rtol=rtol, atol=atol, untruncated=whole)
        if D is not None:
            return D
    if seed is not None:
        solver = solver_for_step(solver, *seed)
    try:
        if isinstance(M, torch.Tensor):
            F = solver.factorize(M, rank=rank, rtol=rtol, atol=atol, check_finite=False)
        else:
            F = truncpinv.pinv_from_gram(M.gram, M, rank=rank, rtol=rtol, atol=atol, check_finite=False, solver=solver)
    except (truncpinv.SolverError, torch.linalg.LinAlgError) as err:
        raise StepFault(f"the solver failed ({type(err).__name__}: {err})", fault=True) from err
    except (ValueError, RuntimeError):
        if not isinstance(M, torch.Tensor) or SF.all_finite(M):
            raise
        raise StepFault("the Jacobian") from None
    if not SF.all_finite(F.S):
        raise StepFault("the Jacobian")
    return F


def _shortcut(
    M: torch.Tensor, *, rank: int | None, rtol: float, atol: float, damping: float | None
) -> truncpinv.TruncatedPinv | None:
    """The small direct SVD or the normal equations (module docstring); ``None``: the solver's path."""
    if M.shape[1] <= DIRECT_SIDE:
        return _direct_svd(M, rank=rank, rtol=rtol, atol=atol)
    if damping is not None and NE.applies(M):
        return NE.factorize_normal(M, rank=rank, rtol=rtol, atol=atol, damping=damping)
    return None


def _direct_svd(M: torch.Tensor, *, rank: int | None, rtol: float, atol: float) -> truncpinv.TruncatedPinv | None:
    """One thin SVD of ``M`` in float64 (``None`` if it is not finite: the solver's path then says why)."""
    m, n = M.shape
    dt = M.dtype
    U, S, Vh = torch.linalg.svd(M if dt == torch.float64 else M.double(), full_matrices=False)
    if not SF.all_finite(S, U, Vh):
        return None
    if dt != torch.float64:
        U, S, Vh = U.to(dt), S.to(dt), Vh.to(dt)
    # the options were validated by SvenConfig and rtol resolved above: the truncation of every solver
    tol = truncpinv.Tolerance(rank=min(m, n) if rank is None else min(int(rank), m, n), rtol=rtol, atol=atol)
    stats = {"solver": "svd", "direct": True}
    return truncpinv.TruncatedPinv(U, S, Vh.mT, tol=tol, shape=(m, n), stats=stats, operator=M)
