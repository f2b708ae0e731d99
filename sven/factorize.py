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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import truncpinv

from . import functional as SF
from .info import StepFault

__all__ = ["factorize", "solver_for_step"]


def solver_for_step(solver: truncpinv.Solver, seed: int, step: int) -> truncpinv.Solver:
    """The solver with a per-step seed ``seed + step`` if it is randomized (reproducible on resume)."""
    if dataclasses.is_dataclass(solver) and any(f.name == "seed" for f in dataclasses.fields(solver)):
        if not isinstance(getattr(solver, "seed", None), torch.Generator):
            return dataclasses.replace(solver, seed=(seed + step) % (1 << 62))  # type: ignore[type-var]
    return solver


def factorize(
    M: Any, solver: truncpinv.Solver, *, rank: int | None, rtol: float | None, atol: float
) -> truncpinv.TruncatedPinv:
    """``M_k^+``: keep at most ``rank`` singular values above ``max(atol, rtol * sigma_max)``.

    ``rtol=None``: numerically zero values only, :func:`truncpinv.default_rtol` of ``M``'s shape and dtype.

    Raises:
        StepFault: the solver failed, or ``M`` or its spectrum is not finite.
    """
    if rtol is None:
        rtol = truncpinv.default_rtol((int(M.shape[0]), int(M.shape[1])), M.dtype)
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
