"""Block Golub–Kahan–Lanczos bidiagonalisation with thick restarts (Baglama & Reichel 2005)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._certify import Certificate, check_tol, default_tol
from .._factorization import Triplets
from .._operator import LinearOperator
from .._tolerance import Tolerance
from ._base import Solver, certify_triplets, check_seed, int_field, make_generator
from .lobpcg import short_side_products

__all__ = ["Lanczos"]

_F64 = torch.float64
#: Steps between two SVDs of the projected matrix (convergence tests); one is always done before a restart.
_CHECK_EVERY = 4


def _fresh_rows(Bt: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random orthonormal rows orthogonal to the orthonormal rows of ``Bt`` (room permitting)."""
    Z = torch.randn(count, Bt.shape[1], dtype=_F64, device=Bt.device, generator=gen)
    for _ in range(2):
        Z = Z - (Z @ Bt.T) @ Bt
        Z = torch.linalg.qr(Z.T).Q.T
    return Z


def _converged_prefix(sig: torch.Tensor, res: torch.Tensor, rtol: float, k: int) -> int:
    """At least ``k`` Ritz triplets, and beyond them the leading ones whose residual estimate is within
    ``rtol sigma_1`` (the certificate deflates those within ``sqrt(tol)``, see :mod:`truncpinv._certify`)."""
    ok = (res <= rtol * float(sig[0])).to(torch.int64).cumprod(0)
    return min(sig.numel(), max(k, int(ok.sum())))


def _orth_rows(
    Bt: torch.Tensor, Yt: torch.Tensor, room: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormalise the rows of ``Yt`` against the orthonormal rows of ``Bt`` and among themselves.

    Returns ``(Zt, C, R)`` with ``Yt = C Bt + R Zt`` and ``Zt`` at most ``room``
    orthonormal rows orthogonal to ``Bt``. Projection twice ("twice is enough"),
    then a QR factorisation. If a direction is small against the once projected
    ``Yt`` it may carry rounding noise from ``span(Bt)``: then an SVD sorts the
    directions, the orthonormal rows are projected and orthonormalised once more, and those
    that were mostly noise (breakdown: rank deficiency, an invariant subspace)
    are replaced by random ones with zero coefficient.
    """
    C = Yt @ Bt.T
    Y1 = Yt - C @ Bt
    C2 = Y1 @ Bt.T
    Y2, C = Y1 - C2 @ Bt, C + C2
    if Y2.shape[0] <= room:  # fast path: Householder QR, when Y2 is well conditioned against Y1
        Qy, Ry = torch.linalg.qr(Y2.T)
        if float(torch.linalg.svdvals(Ry)[-1]) > 0.01 * float(Y1.norm()):
            return Qy.T, C, Ry.T
    W, S, Ut = torch.linalg.svd(Y2, full_matrices=False)  # Y2 = W S Ut
    WS = W * S
    D = Ut @ Bt.T
    W2, S2, Zt = torch.linalg.svd(Ut - D @ Bt, full_matrices=False)  # Ut = D Bt + W2 S2 Zt
    C, R = C + WS @ D, (WS @ W2) * S2
    w = min(Zt.shape[0], room)
    Zt, R = Zt[:w], R[:, :w]
    bad = S2[:w] < 0.5
    if bool(bad.any()):
        Zt[bad] = _fresh_rows(torch.cat([Bt, Zt[~bad]]), int(bad.sum()), gen)
        R[:, bad] = 0
    return Zt, C, R


def one_sided_first(run: Callable[..., Triplets], A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
    """``run(A, tol, one_sided=True)`` (the long side kept orthogonal by the recurrence alone); if the
    certificate's residual check then fails, the long-side basis lost orthogonality (ill-conditioned ``A``),
    so ``run`` again with both sides fully reorthogonalised, counting the products of both runs."""
    trip = run(A, tol, one_sided=True)
    cert = trip.stats.get("_certificate")
    if isinstance(cert, Certificate) and not cert.certified and cert.residual > cert.tol:
        spent = int(trip.stats["matvecs"])
        trip = run(A, tol, one_sided=False)
        trip.stats.update(matvecs=int(trip.stats["matvecs"]) + spent, reorthogonalisation="full")
    return trip


@dataclass(frozen=True)
class Lanczos(Solver):
    r"""Truncated pseudoinverse by restarted block Golub–Kahan–Lanczos bidiagonalisation.

    With ``C = A^T`` for wide ``A`` and ``C = A`` for tall (the start block
    ``P_1`` lives on the short side, of dimension ``s``), each step of the block
    Golub–Kahan recurrence (Golub & Kahan 1965; Golub, Luk & Overton 1981)
    multiplies a block of ``b`` vectors by ``C`` and by ``C^T``:

    .. math::
        Q_j R_j = C P_j - \sum_{i<j} Q_i B_{ij}, \qquad
        P_{j+1} T_j = C^\top Q_j - P_j R_j^\top,

    giving orthonormal bases ``P``, ``Q`` and a block upper-triangular
    ``B = Q^T C P`` with ``C P = Q B`` and ``C^T Q = P B^T + P_{j+1} T_j E_j^T``.
    The short-side basis ``P`` is fully reorthogonalised, twice ("twice is
    enough", blocked classical Gram–Schmidt); the long-side ``Q`` only against the
    blocks the recurrence couples it to (one-sided reorthogonalisation, Simon &
    Zha 2000), which keeps the cost per step ``O(s j b + L b^2)`` instead of
    ``O((s + L) j b)``. When that loses too much orthogonality (the
    certificate's explicit residual fails, e.g. for ``cond(A) ~ 1e12``) the
    computation is repeated with both bases fully reorthogonalised
    (``stats["reorthogonalisation"] = "full"``). The SVD
    ``B = X \Sigma Y^T`` gives Ritz triplets ``(\sigma_i, Q x_i, P y_i)``
    whose residual is ``||C^T Q x_i - \sigma_i P y_i|| = ||T_j E_j^T x_i||``.
    With ``block_size=1`` this is the classical bidiagonalisation
    (``R_j = \alpha_j``, ``T_j = \beta_j``); a block of ``b`` vectors resolves
    singular values of multiplicity up to ``b`` (a single Krylov vector sees
    one copy of a repeated value) and multiplies ``A`` by ``b`` columns at once.

    When the basis is full it is *thick restarted* (Baglama & Reichel 2005):
    the ``l`` leading Ritz vectors are kept, ``B`` becomes ``diag(\sigma_{1..l})``
    coupled to the next block, and the recurrence continues; at each restart
    the basis grows by half (up to ``4 krylov_dim``). Iteration stops once the
    wanted pairs (at most ``rank``, above the cut-off) have recurrence residual
    ``<= tol / 10 * sigma_max`` and the first unwanted Ritz value is settled below
    the cut-off (tested every 4 steps and before each restart), *and* the
    result passes the a-posteriori certificate (:mod:`truncpinv._certify`:
    explicit residuals in both orientations within ``tol * sigma_max``, and no
    singular value above the kept ones left in ``A - U S V^T``); until then the
    recurrence continues with a tighter internal tolerance. A result still
    uncertified after ``max_restarts`` raises one
    :class:`~truncpinv.UncertifiedResultWarning`. On breakdown (an invariant subspace: rank deficiency, an
    all-zero matrix) random directions orthogonal to the basis continue the
    recurrence; once the basis spans the short side the result is exact.

    The bases and ``B`` are float64; only the products with ``A`` run in its
    dtype, so the accuracy is that of a backward-stable SVD (no squaring).
    Memory: up to ``(4 krylov_dim + b) * (m + n)`` float64 numbers (the basis grows on hard spectra).

    Args:
        krylov_dim: basis size before a restart (default ``2 rank + 2 b + 16``,
            at most ``min(m, n)``).
        block_size: ``b``, the number of vectors per step (default 8).
        max_restarts: restart limit (a warning is issued if reached).
        tol: certified residual tolerance relative to ``sigma_max`` (default
            :func:`truncpinv.default_tol`: ``max(1e-12, 8 sqrt(max(m, n)) eps)`` for
            float64, ``max(1e-5, ...)`` for float32).
        seed: seed or generator of the start block (and of breakdown directions).

    References:
        G. Golub and W. Kahan, *Calculating the singular values and
        pseudo-inverse of a matrix*, SIAM J. Numer. Anal. 2(2), 1965.
        G. Golub, F. Luk and M. Overton, *A block Lanczos method for computing
        the singular values and corresponding singular vectors of a matrix*,
        ACM Trans. Math. Softw. 7(2), 1981.
        H. D. Simon and H. Zha, *Low-rank matrix approximation using the
        Lanczos bidiagonalization process with applications*, SIAM J. Sci.
        Comput. 21(6), 2000.
        J. Baglama and L. Reichel, *Augmented implicitly restarted Lanczos
        bidiagonalization methods*, SIAM J. Sci. Comput. 27(1), 2005.
    """

    krylov_dim: int | None = None
    block_size: int = 8
    max_restarts: int = 100
    tol: float | None = None
    seed: int | torch.Generator | None = 0

    name: ClassVar[str] = "lanczos"
    matrix_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        int_field(self, "krylov_dim", 2, optional=True)
        int_field(self, "block_size", 1)
        int_field(self, "max_restarts", 0)
        check_tol(self.tol)
        check_seed(self.seed)

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        return one_sided_first(self._run, A, tol)

    def _run(self, A: torch.Tensor | LinearOperator, tol: Tolerance, *, one_sided: bool) -> Triplets:
        m, n = A.shape
        s, k, L = min(m, n), tol.rank, max(m, n)
        bs = min(self.block_size, s)
        K = min(s, max(self.krylov_dim or 2 * k + 2 * bs + 16, k + 2 * bs))
        rtol_res = self.tol if self.tol is not None else default_tol(A.dtype, (m, n))
        # the recurrence's own residual estimate (float64 arithmetic) is held to half of tol, and for float32
        # data to eps32: below what the certificate's float32 products resolve, but it buys accuracy of the
        # small kept values (sin theta ~ res sigma_1 / gap)
        rtol_rec = rtol_res / 2 if A.dtype == _F64 else min(rtol_res / 2, float(torch.finfo(A.dtype).eps))
        Cp, Ctq = short_side_products(A)  # row blocks: Cp(P^T) = (C P)^T (long side), Ctq(Q^T) = (C^T Q)^T
        dev = A.device
        gen = make_generator(self.seed, dev)
        K_max = min(s, 4 * K)
        # basis vectors as rows, allocated once for the largest basis (pages are touched only when used)
        Pt = torch.zeros(K_max + bs, s, dtype=_F64, device=dev)
        Qt = torch.empty(K_max, L, dtype=_F64, device=dev)
        Bm = torch.zeros(K_max, K_max, dtype=_F64, device=dev)
        Pt[:bs] = _fresh_rows(Pt[:0], bs, gen)
        j, w, matvecs, steps, restarts, done, q_lo = 0, bs, 0, 0, 0, False, 0
        T = Pt[:0, :0]
        trip: Triplets | None = None
        while True:
            # one block step: C P_j = Q_{<j} C^T + Q_j R^T, then C^T Q_j - P_j R = P_next^T T^T.
            # One-sided reorthogonalisation (Simon & Zha 2000): the short-side basis P against all of
            # itself, the long-side Q only against the blocks the recurrence couples to (the previous
            # one, and the kept Ritz vectors right after a restart); the certificate checks the result.
            Yt = Cp(Pt[j : j + w])
            Zt, C, R = _orth_rows(Qt[q_lo:j], Yt, L - j, gen)
            Qt[j : j + w], Bm[q_lo:j, j : j + w], Bm[j : j + w, j : j + w] = Zt, C.T, R.T
            Rt = Ctq(Zt) - R.T @ Pt[j : j + w]
            q_lo = j if one_sided else 0
            matvecs, steps, j = matvecs + 2 * w, steps + 1, j + w
            if j < s:
                Pn, _, T = _orth_rows(Pt[:j], Rt, s - j, gen)
                w = Pn.shape[0]
                Pt[j : j + w] = Pn
            full = j + w > K
            if not (j == s or full or steps % _CHECK_EVERY == 0):
                continue  # the small SVD only every few steps, and before a restart
            X, sig, Yh = torch.linalg.svd(Bm[:j, :j])
            res = (T.T @ X[j - T.shape[0] :]).norm(dim=0) if j < s else torch.zeros_like(sig)
            if j == s or self._converged(sig, res, tol, rtol_rec):
                if j == s:  # the basis spans the short side: an exact SVD in its coordinates
                    trip = self._exact(A, Pt[:j], k, matvecs, steps, restarts)
                    done = True
                    break
                t = _converged_prefix(sig, res, math.sqrt(rtol_res), k)
                trip = self._triplets(A, Pt[:j], Yh, sig, t, matvecs, steps, restarts, Qt[:j], X)
                cert = certify_triplets(A, trip, tol, rtol_res=rtol_res, seed=self.seed)
                matvecs = int(trip.stats["matvecs"])
                if cert.certified:
                    done = True
                    break
                rtol_rec = max(rtol_rec / 10, float(torch.finfo(_F64).eps))  # not yet: iterate further
                full = True  # restart now: keep the Ritz vectors, continue the recurrence
            if full:  # thick restart: keep the leading Ritz vectors and the next block
                if restarts == self.max_restarts:
                    break
                restarts += 1
                if K < K_max:  # hard spectrum: grow the basis (by half, up to 4 x krylov_dim)
                    K = min(K_max, K + K // 2)
                keep = min(K - w, max(k, (j + k) // 2), j)
                Pt[:keep], Pt[keep : keep + w] = Yh[:keep] @ Pt[:j], Pt[j : j + w].clone()
                Qt[:keep] = X[:, :keep].T @ Qt[:j]
                Bm.zero_()
                Bm[:keep, :keep] = torch.diag(sig[:keep])
                j, q_lo = keep, 0
        if trip is None or not done:
            X, sig, Yh = torch.linalg.svd(Bm[:j, :j])
            trip = self._triplets(A, Pt[:j], Yh, sig, min(k, j), matvecs, steps, restarts, Qt[:j], X)
            certify_triplets(A, trip, tol, rtol_res=rtol_res, seed=self.seed)
        trip.stats["converged"] = done
        return trip

    @staticmethod
    def _exact(
        A: torch.Tensor | LinearOperator, Pt: torch.Tensor, k: int, matvecs: int, steps: int, restarts: int
    ) -> Triplets:
        """``P`` spans the short side: the SVD of ``C P`` (``s`` products) is exact and backward stable
        (the long-side basis of a one-sided recurrence is not orthonormal enough to be used here)."""
        m, n = A.shape
        s = Pt.shape[0]
        Cp, _ = short_side_products(A)
        Ul, S, Yh = torch.linalg.svd(Cp(Pt).T, full_matrices=False)  # C P = Ul S Y^T
        t = min(k, s)
        Us, Ws = (Yh[:t] @ Pt).T, Ul[:, :t]
        U, V = (Us, Ws) if m <= n else (Ws, Us)
        stats = {
            "matvecs": matvecs + s,
            "iterations": steps,
            "restarts": restarts,
            "residual": 0.0,
            "exact": True,
            "certified": True,
        }
        return Triplets(U.to(A.dtype), S[:t].to(A.dtype), V.to(A.dtype), stats=stats)

    @staticmethod
    def _triplets(
        A: torch.Tensor | LinearOperator,
        Pt: torch.Tensor,
        Yh: torch.Tensor,
        sig: torch.Tensor,
        t: int,
        matvecs: int,
        steps: int,
        restarts: int,
        Qt: torch.Tensor,
        X: torch.Tensor,
    ) -> Triplets:
        """``t`` Ritz triplets: short-side vectors ``P y_i``, long-side vectors ``Q x_i``."""
        m, n = A.shape
        Us = (Yh[:t] @ Pt).T
        Ws = (X[:, :t].T @ Qt).T
        U, V = (Us, Ws) if m <= n else (Ws, Us)
        stats = {"matvecs": matvecs, "iterations": steps, "restarts": restarts}
        return Triplets(U.to(A.dtype), sig[:t].to(A.dtype), V.to(A.dtype), stats=stats)

    @staticmethod
    def _converged(sig: torch.Tensor, res: torch.Tensor, tol: Tolerance, rtol_res: float) -> bool:
        """Whether the wanted Ritz pairs have converged and the first unwanted one lies below the cut-off."""
        smax = float(sig[0])
        cut = tol.cutoff(smax)
        conv = res <= rtol_res * smax
        c = min(tol.rank, int((sig > cut).sum()))
        if c < tol.rank and c == sig.numel():  # every Ritz value is wanted, but more may exist
            return False
        settled = c == tol.rank or float(res[c]) <= max(rtol_res * smax, cut - float(sig[c]))
        return bool(conv[:c].all()) and settled
