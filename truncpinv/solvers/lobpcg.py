r"""Block LOBPCG (Knyazev 2001) on the Gram operator of the short side."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._certify import check_tol, default_tol
from .._factorization import Triplets
from .._operator import LinearOperator
from .._tolerance import Tolerance
from ._base import Solver, certify_triplets, check_seed, int_field, make_generator, sort_desc
from .dense_svd import DenseSVD
from .gram_eigen import GramEigen

__all__ = ["LOBPCG"]

_F64 = torch.float64
_EPS64 = torch.finfo(_F64).eps
Product = Callable[[torch.Tensor], torch.Tensor]


def short_side_products(A: torch.Tensor | LinearOperator) -> tuple[Product, Product]:
    """Products with the short side in *row* form: ``(fwd, back)`` map a ``(w, short)``
    block ``X^T`` to ``(A^T X)^T`` and a ``(w, long)`` block ``W^T`` to ``(A W)^T`` for wide
    ``A`` (``(A X)^T`` and ``(A^T W)^T`` for tall). Blocks are float64; the products run
    in ``A``'s dtype. For a dense ``A`` the row form ``X^T A`` / ``W^T A^T`` avoids the
    slow skinny-GEMM layouts of ``A^T W`` on the CPU (up to 10x for tall ``A``)."""
    m, n = A.shape
    dt = A.dtype

    def rows(X: torch.Tensor) -> torch.Tensor:
        return X.to(dtype=dt, memory_format=torch.contiguous_format)

    if isinstance(A, torch.Tensor):
        M = A if m <= n else A.T  # (short, long)
        return (lambda Xt: (rows(Xt) @ M).to(_F64)), (lambda Wt: (rows(Wt) @ M.T).to(_F64))
    f, g = (A.rmatmat, A.matmat) if m <= n else (A.matmat, A.rmatmat)
    return (lambda Xt: f(rows(Xt.T)).T.to(_F64)), (lambda Wt: g(rows(Wt.T)).T.to(_F64))


def _orthonormalize(Z: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the part of ``span(Z)`` orthogonal to the orthonormal ``X``.

    Two passes of projection plus SVQB (Stathopoulos & Wu 2002: ``Z E D^{-1/2}``
    from ``eigh(Z^T Z)``), dropping numerically dependent directions.
    """
    for _ in range(2):
        Z = Z - X @ (X.T @ Z)
        nrm = Z.norm(dim=0)
        Z = Z[:, nrm > 0] / nrm[nrm > 0]
        if Z.shape[1] == 0:
            break
        d, E = torch.linalg.eigh(Z.T @ Z)
        keep = d > 1e-12 * float(d[-1])
        Z = Z @ (E[:, keep] / d[keep].sqrt())
    return Z


@dataclass(frozen=True)
class LOBPCG(Solver):
    r"""Truncated pseudoinverse by block LOBPCG on the short-side Gram operator.

    For wide ``A`` the eigenvalues ``lambda_i = sigma_i^2`` of ``G = A A^T``
    (``A^T A`` for tall ``A``) are found with a block of ``b = rank + guard``
    vectors without forming ``G``. Each iteration (Knyazev 2001) performs the
    Rayleigh–Ritz procedure on the trial subspace ``span[X, R, P]``:

    .. math::
        R = G X - X \Theta, \qquad
        [X, Z] C = \text{top-}b \text{ eigenvectors of } W_Q^\top W_Q, \quad
        W_Q = A^\top [X, Z],

    with ``Z`` the orthonormalised ``[R, P]`` and ``P`` the ``Z``-part of the
    update (the implicit conjugate direction). Converged columns are *soft
    locked*: they stay in ``X`` but contribute no residual or direction.

    Accuracy: the blocks live in float64 and the projected matrix
    ``W_Q^T W_Q`` is formed in float64 from ``W_Q = A^T Q``; only the products
    with ``A`` run in ``A``'s dtype. The error of ``sigma_i`` is then about
    ``eps sigma_max + eps64 sigma_max^2 / sigma_i``: that of a backward-stable
    SVD for float32 data (not the ``eps32 sigma_max^2`` of a float32 Gram
    matrix), and Gram-like for ill-conditioned float64 data. Values below
    ``sqrt(eps64 max(m, n)) sigma_max`` are reported as zero, as in
    :class:`GramEigen`. A pair converges when its SVD residual
    ``||A v - sigma u|| = ||G u - sigma^2 u|| / sigma`` is at most ``tol * sigma_max``.

    Never refuses a shape, and never costs much more than the exact method:

    * when the trial space (``3 b`` vectors) would cover the short side, one
      Rayleigh–Ritz step on the whole space is exact and is computed directly
      (``stats["fallback"] = "full_space"``; e.g. ``128 x 593`` at rank 64,
      which ``torch.lobpcg`` refuses);
    * when the iteration has used ``2 min(m, n)`` products (slow convergence:
      a flat spectrum, clustered values) it switches to the exact method
      (``stats["fallback"] = "slow_convergence"``);
    * when its result fails the a-posteriori certificate (:mod:`truncpinv._certify`)
      it switches to the exact method too (``stats["fallback"] = "uncertified"``),
      so LOBPCG always returns a certified or exact result.

    The exact method is the float64 :class:`GramEigen` for float32 data and a
    thin SVD (:class:`DenseSVD`; an operator is materialised with ``min(m, n)``
    products) for float64 data.

    Args:
        max_iters: iteration limit (a warning is issued if reached).
        tol: relative residual tolerance (default ``10 * eps`` of ``A``'s dtype,
            at least ``1e-13``).
        guard: extra block vectors beyond ``rank`` (speed up convergence of the last wanted pair).
        seed: seed or generator of the random start block.

    References:
        A. V. Knyazev, *Toward the optimal preconditioned eigensolver: Locally
        Optimal Block Preconditioned Conjugate Gradient method*, SIAM J. Sci.
        Comput. 23(2), 2001.
    """

    max_iters: int = 200
    tol: float | None = None
    guard: int = 8
    seed: int | torch.Generator | None = 0

    name: ClassVar[str] = "lobpcg"
    matrix_free: ClassVar[bool] = True
    randomized: ClassVar[bool] = True

    def __post_init__(self) -> None:
        int_field(self, "max_iters", 1)
        check_tol(self.tol)
        int_field(self, "guard", 1)
        check_seed(self.seed)

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        m, n = A.shape
        s, k = min(m, n), tol.rank
        b = min(s, k + self.guard)
        if 3 * b >= s:  # the trial space is all of R^s: one exact Rayleigh–Ritz step
            return _exact(A, tol, "full_space", 0, 0)
        rtol_res = self.tol if self.tol is not None else max(10 * torch.finfo(A.dtype).eps, 1e-13)
        fwd, back = short_side_products(A)  # the long-side block W is kept as rows Wt = W^T
        gen = make_generator(self.seed, A.device)
        X = _orthonormalize(torch.randn(s, b, dtype=_F64, device=A.device, generator=gen), _empty(s, A.device))
        Wt = fwd(X.T)
        theta, C = _rayleigh_ritz(Wt @ Wt.T, b)
        X, Wt = X @ C, C.T @ Wt
        P: torch.Tensor | None = None
        matvecs, it, done, c = b, 0, False, k
        rn = torch.zeros(b, dtype=_F64, device=A.device)
        for it in range(1, self.max_iters + 1):
            if matvecs >= 2 * s:  # slow convergence (flat spectrum): the exact method is now cheaper
                return _exact(A, tol, "slow_convergence", matvecs, it - 1)
            R = back(Wt).T - X * theta
            matvecs += b
            sig, rn = theta.clamp_min(0).sqrt(), R.norm(dim=0)
            smax = float(sig[0])
            cut = tol.cutoff(smax)
            conv = rn <= rtol_res * smax * sig
            c = min(k, int((sig > cut).sum()))
            # pair c (the first one not needed) settles when its Gram residual bound lies below the cut-off
            settled = c == k or bool(conv[c]) or float(theta[c] + rn[c]) <= cut * cut
            if bool(conv[:c].all()) and settled:
                done = True
                break
            active = ~conv
            Z = R[:, active] if P is None else torch.cat([R[:, active], P[:, active]], dim=1)
            Z = _orthonormalize(Z, X)
            if Z.shape[1] == 0:  # nothing left to add: the block spans an invariant subspace
                done = True
                break
            WZt = fwd(Z.T)
            matvecs += Z.shape[1]
            WXZ = Wt @ WZt.T
            H = torch.cat([torch.cat([torch.diag(theta), WXZ], 1), torch.cat([WXZ.T, WZt @ WZt.T], 1)], 0)
            theta, C = _rayleigh_ritz(H, b)
            P = Z @ C[b:]
            X, Wt = X @ C[:b] + P, C[:b].T @ Wt + C[b:].T @ WZt
        if not done:
            warnings.warn(
                f"LOBPCG did not converge in {self.max_iters} iterations; increase `max_iters` or `tol`",
                RuntimeWarning,
                stacklevel=3,
            )
        sig = theta.clamp_min(0).sqrt()
        # sigma^2 comes from a float64 Rayleigh quotient: below this floor it is rounding noise (as in GramEigen)
        # (only finite values are zeroed: NaN and Inf must reach the finiteness check)
        noise = (sig <= math.sqrt(_EPS64 * max(m, n)) * sig[0]) & torch.isfinite(sig)
        sig = torch.where(noise, torch.zeros_like(sig), sig)
        pos = sig > 0
        Y = (Wt / torch.where(pos, sig, torch.ones_like(sig))[:, None] * pos[:, None]).T  # long-side vectors
        U, V = (X, Y) if m <= n else (Y, X)
        U_, S_, V_ = sort_desc(U.to(A.dtype), sig.to(A.dtype), V.to(A.dtype))
        stats = {"matvecs": matvecs, "iterations": it, "converged": done}
        trip = Triplets(U_, S_, V_, stats=stats)
        cert = certify_triplets(A, trip, tol, rtol_res=max(rtol_res, default_tol(A.dtype, (m, n))), seed=self.seed)
        if not cert.certified:  # the budget of the exact method is still within 2 s products: use it
            return _exact(A, tol, "uncertified", int(trip.stats["matvecs"]), it)
        return trip


def _exact(A: torch.Tensor | LinearOperator, tol: Tolerance, why: str, matvecs: int, iters: int) -> Triplets:
    """The exact answer on the whole short side, recording why it was used.

    float32 data: the float64 Gram eigendecomposition (:class:`GramEigen`), accurate
    far below float32's default cut-off. float64 data: a thin SVD (:class:`DenseSVD`)
    of ``A`` (materialised from ``s`` products for an operator), which resolves
    singular values below GramEigen's ``sqrt(eps64)`` noise floor.
    """
    if A.dtype == torch.float32:
        trip = GramEigen()._compute(A, tol)
    else:
        m, n = A.shape
        if isinstance(A, torch.Tensor):
            M = A
        else:
            eye = torch.eye(min(m, n), dtype=A.dtype, device=A.device)
            M = A.rmatmat(eye).T if m <= n else A.matmat(eye)
            matvecs += min(m, n)
        trip = DenseSVD()._compute(M, tol)
    trip.stats = {**trip.stats, "matvecs": trip.stats["matvecs"] + matvecs, "iterations": iters, "fallback": why}
    return trip


def _empty(s: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(s, 0, dtype=_F64, device=device)


def _rayleigh_ritz(H: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``b`` largest eigenpairs of the symmetric ``H``, descending."""
    lam, E = torch.linalg.eigh(H)
    return lam.flip(0)[:b], E.flip(1)[:, :b]
