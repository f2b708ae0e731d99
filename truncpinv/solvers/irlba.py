r"""Thick-restart Lanczos bidiagonalisation (Baglama & Reichel's IRLBA), single vector, bounded basis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._certify import Certificate, check_tol, default_tol
from .._factorization import Triplets
from .._operator import LinearOperator
from .._tolerance import Tolerance
from ._base import Solver, certify_triplets, check_seed, int_field, make_generator
from .lanczos import Lanczos, _converged_prefix, _fresh_rows, one_sided_first
from .lobpcg import Product, short_side_products

__all__ = ["IRLBA", "irlba_cycle"]

_F64 = torch.float64
_EPS = float(torch.finfo(_F64).eps)
#: Certificates tried (the recurrence tightened in between) before the block ``Lanczos`` takes over.
_MAX_ATTEMPTS = 4


def _orth(Bt: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = c^T Bt + z`` with ``z`` orthogonal to the orthonormal rows of ``Bt``: classical Gram–Schmidt twice."""
    c = Bt @ y
    z = y - c @ Bt
    c2 = Bt @ z
    return z - c2 @ Bt, c + c2


def _normalise(Bt: torch.Tensor, z: torch.Tensor, scale: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """``z / ||z||``, or on breakdown (``||z|| <= 64 eps scale``, ``scale`` an estimate of ``||A||``) a random
    unit vector orthogonal to the orthonormal rows of ``Bt``, with norm reported as 0 (the relation then holds
    with a zero coefficient; a normalised rounding residue would not be orthogonal to ``Bt``)."""
    nrm = float(z.norm())
    if nrm > 64 * _EPS * scale:
        return z / nrm, nrm
    return _fresh_rows(Bt, 1, gen)[0], 0.0


def irlba_cycle(
    Cp: Product,
    Ctq: Product,
    Pt: torch.Tensor,
    Qt: torch.Tensor,
    Bm: torch.Tensor,
    start: int,
    stop: int,
    gen: torch.Generator,
    scale: float,
    *,
    one_sided: bool = True,
) -> tuple[float, torch.Tensor, float]:
    r"""Extend a Golub–Kahan relation from ``start`` to ``stop`` vectors, fully reorthogonalised.

    On entry ``Pt[:start+1]``, ``Qt[:start]`` are orthonormal rows with
    ``C P_s = Q_s B_s`` (``B = Bm[:start, :start]``) and ``Pt[start]`` the next
    short-side vector (after a thick restart, ``B_s = diag(\sigma)`` and
    ``P_{s+1}`` the normalised residual). Step ``j``:

    .. math::
        \alpha_j q_j = C p_j - Q_{<j} c_j, \qquad
        \beta_j p_{j+1} = C^\top q_j - P_{\le j} d_j,

    with ``c_j = Q_{<j}^\top C p_j`` stored in column ``j`` of ``B`` (``\beta_{j-1}``
    in the bidiagonal part, the restart's ``\rho_i = \beta x_{i,m}`` in the arrow
    column). The short side ``P`` is orthogonalised against the whole current
    basis (at most ``stop`` vectors: the cost per step is bounded by the restart
    length, not by the products so far); with ``one_sided`` (Simon & Zha 2000)
    the long side ``Q`` only against the vectors the recurrence couples it to
    (``q_{j-1}``, with the recurrence's coefficient ``\beta_{j-1}``, or the kept
    Ritz vectors right after a restart), which saves
    ``O(L m)`` per step on the long side ``L``; otherwise against all of ``Q``. On
    exit ``C P = Q B`` and ``C^\top Q = P B^\top + \beta_m p_{m+1} e_m^\top``;
    returns ``(\beta_m, p_{m+1}, scale)``, ``scale`` the largest ``||C p_j||`` seen so far (an
    estimate of ``||A||``, against which a breakdown is judged).
    """
    beta, f = 0.0, Pt[start]
    for j in range(start, stop):
        y = Cp(Pt[j : j + 1])[0]
        scale = max(scale, float(y.norm()))
        if one_sided and j > start:  # the three-term recurrence: the coefficient of q_{j-1} is beta_{j-1}
            z = y - beta * Qt[j - 1]
            Bm[j - 1, j] = beta
        else:
            z, c = _orth(Qt[:j], y)
            Bm[:j, j] = c
        Qt[j], alpha = _normalise(Qt[:j], z, scale, gen)
        Bm[j, j] = alpha
        z, _ = _orth(Pt[: j + 1], Ctq(Qt[j : j + 1])[0])
        f, beta = _normalise(Pt[: j + 1], z, scale, gen)
        if j + 1 < stop:
            Pt[j + 1] = f
    return beta, f, scale


@dataclass(frozen=True)
class IRLBA(Solver):
    r"""Truncated pseudoinverse by thick-restart Lanczos bidiagonalisation (Baglama & Reichel 2005).

    With ``C`` the long-by-short orientation of ``A`` (``A`` for tall, ``A^T``
    for wide), one *cycle* runs the Golub–Kahan recurrence (:func:`irlba_cycle`)
    up to ``m = work`` vectors, giving ``C P = Q B`` and
    ``C^T Q = P B^T + \beta_m p_{m+1} e_m^T`` with orthonormal ``P``, ``Q``
    (full reorthogonalisation against the current basis only). The SVD
    ``B = X \Sigma Y^T`` gives Ritz triplets ``(\sigma_i, Q x_i, P y_i)`` with
    ``C P y_i = \sigma_i Q x_i`` exactly and

    .. math::
        \|C^\top Q x_i - \sigma_i P y_i\| = \beta_m |x_{m,i}| .

    *Thick restart:* the ``l`` leading Ritz vectors are kept,
    ``P \leftarrow [P Y_l, p_{m+1}]``, ``Q \leftarrow Q X_l`` and
    ``B \leftarrow [\mathrm{diag}(\sigma_{1..l}) \mid \rho]`` with
    ``\rho_i = \beta_m x_{m,i}``: the projected matrix is arrow-shaped, and the
    next cycle continues it as a bidiagonal. Memory and the work per step are
    bounded by ``m``, not by the number of products. ``l = k + (m - k) / 2``
    (``k`` the rank), shrinking to ``k`` plus the unconverged ones as the
    wanted triplets converge (Baglama–Reichel's adjusted ``k``).

    Iteration stops when the wanted triplets (at most ``rank``, above the
    cut-off) have ``\beta_m |x_{m,i}| \le tol / 2 \cdot \sigma_1`` and the first
    unwanted one is settled below the cut-off; the result must then pass
    the certificate (:mod:`truncpinv._certify`, one run of its missed-value
    check, up to 128 steps: products cost per column on sparse input), else the
    recurrence continues with a tighter tolerance (4 tries at most). A single Krylov vector sees one copy of a repeated
    singular value: if the certificate still finds a missed value after those
    tries (or ``max_restarts`` runs out) the problem is handed to the block :class:`Lanczos` (products
    summed, ``stats["fallback"] = "lanczos"``). Once ``m`` reaches the short
    side the result is exact (the SVD of ``C P``). ``stats["work"]`` is ``m``:
    the bases hold ``m (s + L)`` float64 numbers, whatever the number of restarts.

    Args:
        work: basis length ``m`` (default ``max(2 rank + 20, 3 rank)``, at most ``min(m, n)``).
        max_restarts: cycles before handing over to the block ``Lanczos``.
        tol: certified residual tolerance relative to ``sigma_max`` (default :func:`truncpinv.default_tol`).
        seed: seed or generator of the start vector (and of breakdown directions).

    References:
        J. Baglama and L. Reichel, *Augmented implicitly restarted Lanczos
        bidiagonalization methods*, SIAM J. Sci. Comput. 27(1), 2005.
        K. Wu and H. Simon, *Thick-restart Lanczos method for large symmetric
        eigenvalue problems*, SIAM J. Matrix Anal. Appl. 22(2), 2000.
    """

    work: int | None = None
    max_restarts: int = 200
    tol: float | None = None
    seed: int | torch.Generator | None = 0

    name: ClassVar[str] = "irlba"
    matrix_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        int_field(self, "work", 2, optional=True)
        int_field(self, "max_restarts", 0)
        check_tol(self.tol)
        check_seed(self.seed)

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        trip = one_sided_first(self._run, A, tol)
        cert = trip.stats.get("_certificate")
        if trip.stats.get("exact") or (isinstance(cert, Certificate) and cert.certified):
            return trip
        spent = int(trip.stats["matvecs"])  # a missed (repeated) value or no convergence: the block recurrence
        trip = Lanczos(tol=self.tol, seed=self.seed)._compute(A, tol)
        trip.stats.update(matvecs=int(trip.stats["matvecs"]) + spent, fallback="lanczos")
        return trip

    def _run(self, A: torch.Tensor | LinearOperator, tol: Tolerance, *, one_sided: bool) -> Triplets:
        m, n = A.shape
        s, k, L = min(m, n), tol.rank, max(m, n)
        M = min(s, max(self.work or max(2 * k + 20, 3 * k), k + 2))
        rtol_res = self.tol if self.tol is not None else default_tol(A.dtype, (m, n))
        rtol_rec = rtol_res / 2 if A.dtype == _F64 else min(rtol_res / 2, float(torch.finfo(A.dtype).eps))
        Cp, Ctq = short_side_products(A)
        dev = A.device
        gen = make_generator(self.seed, dev)
        Pt = torch.zeros(M, s, dtype=_F64, device=dev)
        Qt = torch.zeros(M, L, dtype=_F64, device=dev)
        Bm = torch.zeros(M, M, dtype=_F64, device=dev)
        Pt[0] = _fresh_rows(Pt[:0], 1, gen)[0]
        start, scale, restarts, matvecs, attempts = 0, 0.0, 0, 0, 0
        while True:
            beta, f, scale = irlba_cycle(Cp, Ctq, Pt, Qt, Bm, start, M, gen, scale, one_sided=one_sided)
            matvecs += 2 * (M - start)
            X, sig, Yh = torch.linalg.svd(Bm)
            scale = max(scale, float(sig[0]))
            if M == s:  # the basis spans the short side: exact in its coordinates
                trip = Lanczos._exact(A, Pt, k, matvecs, restarts, restarts)
                trip.stats["work"] = M
                return trip
            res = beta * X[-1].abs()
            if Lanczos._converged(sig, res, tol, rtol_rec):
                t = _converged_prefix(sig, res, math.sqrt(rtol_res), k)
                trip = Lanczos._triplets(A, Pt, Yh, sig, t, matvecs, restarts, restarts, Qt, X)
                trip.stats["work"] = M
                cert = certify_triplets(A, trip, tol, rtol_res=rtol_res, seed=self.seed, runs=1, max_steps=128)
                matvecs, attempts = int(trip.stats["matvecs"]), attempts + 1
                if cert.certified or cert.residual > cert.tol or attempts == _MAX_ATTEMPTS:
                    trip.stats["converged"] = cert.certified
                    return trip  # certified, lost orthogonality, or no progress
                # a missed value (not yet in the Krylov space) or an unresolved gap at the cut: converge further
                rtol_rec = max(rtol_rec / 10, _EPS)
            if restarts == self.max_restarts:
                X, sig, Yh = torch.linalg.svd(Bm)
                trip = Lanczos._triplets(A, Pt, Yh, sig, min(k, M), matvecs, restarts, restarts, Qt, X)
                trip.stats["work"] = M
                certify_triplets(A, trip, tol, rtol_res=rtol_res, seed=self.seed, runs=1, max_steps=128)
                trip.stats["converged"] = False
                return trip
            restarts += 1
            # adjusted k: keep the wanted values plus half the rest, never fewer than k + the unconverged
            nconv = int((res[:k] <= rtol_rec * float(sig[0])).sum())
            keep = min(M - 2, max(k + (M - k) // 2 - nconv // 2, k + 1))
            Pt[:keep] = Yh[:keep] @ Pt
            Qt[:keep] = X[:, :keep].T @ Qt
            Bm.zero_()
            Bm[:keep, :keep] = torch.diag(sig[:keep])
            Pt[keep] = f if beta > 0 else _fresh_rows(Pt[:keep], 1, gen)[0]
            start = keep
