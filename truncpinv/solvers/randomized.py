r"""Randomized SVD: a Gaussian sketch refined by block Krylov or subspace iterations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._certify import check_tol, default_tol
from .._factorization import Triplets, reciprocal_or_zero
from .._operator import LinearOperator, wide_products
from .._tolerance import Tolerance
from ._base import Solver, certify_triplets, check_seed, make_generator
from .gram_eigen import gram

__all__ = ["RandomizedSVD"]

_F64 = torch.float64
_Op = Callable[[torch.Tensor], torch.Tensor]
#: Rows of ``W`` converted to float64 at a time for its Gram matrix (bounds the extra memory).
_CHUNK = 4096


def _gram64(Ws: list[torch.Tensor]) -> torch.Tensor:
    """``W^T W`` in float64 for ``W = [W_0, W_1, ...]`` (column blocks), converted a chunk of rows at a time."""
    if len(Ws) == 1 and not Ws[0].is_contiguous():  # X^T as a view of A: chunk the rows of X instead
        return gram(Ws[0].T, accumulate=_F64, chunk_size=_CHUNK)
    L = sum(W.shape[1] for W in Ws)
    G = torch.zeros(L, L, dtype=_F64, device=Ws[0].device)
    for r in range(0, Ws[0].shape[0], _CHUNK):
        Wc = torch.cat([W[r : r + _CHUNK] for W in Ws], dim=1).to(_F64)
        G.addmm_(Wc.T, Wc)
    return G


def _orth(Y: torch.Tensor, P: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis of ``Y`` orthogonal to the orthonormal ``P``: projection twice, QR, and the
    same again on the result, so that a block of rounding noise (or zeros) stays orthogonal to ``P``."""
    for _ in range(2):
        if P is not None:
            Y = Y - P @ (P.T @ Y)
            Y = Y - P @ (P.T @ Y)
        Y = torch.linalg.qr(Y).Q
    return Y


@dataclass(frozen=True)
class RandomizedSVD(Solver):
    r"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011; Musco & Musco 2015).

    All work happens on the short side. With ``X`` the wide orientation of
    ``A`` (``s x N``, ``s = min(m, n)``), ``K = X X^T``, ``k`` the rank and
    ``q = power_iters``, an orthonormal basis ``Q`` (``s x L``) of a search space of
    ``L \approx k + p`` dimensions (``p = oversample``, default ``k + 32``) is
    built from a Gaussian ``\Omega`` (drawn from ``seed``):

    * ``block_krylov=True`` (default): the block Krylov space
      ``[\Omega, K\Omega, \dots, K^q\Omega]``, ``q + 1`` blocks of
      ``b = \lceil (k+p)/(q+1) \rceil`` columns, each re-orthogonalised twice
      against the previous ones. The long-side products ``W = X^T Q`` come out
      of the build itself: ``2q + 1`` passes over ``A`` with ``b`` columns. For a
      gap ``\gamma = \sigma_k/\sigma_{L+1} - 1`` the error decays roughly like
      ``e^{-2q\sqrt{\gamma}}`` (a Chebyshev polynomial in ``K``), against
      ``e^{-2q\gamma}`` for subspace iteration.
    * ``block_krylov=False``: subspace iteration ``Q \leftarrow orth(K Q)``
      (QR after every pass), ``q`` times from ``Q = orth(\Omega)`` with
      ``b = L = k + p`` columns, then ``W = X^T Q``.

    Rayleigh–Ritz: ``W^T W = Q^T K Q = Z M Z^T``, ``\Sigma = M^{1/2}``,
    ``U = Q Z``, ``V = W Z \Sigma^{-1}``. For float32 ``A`` the small Gram
    matrix is accumulated in float64 from the float32 products (exact) and
    decomposed in float64, so squaring costs only ``eps_{64} (\sigma_1/\sigma_i)^2``;
    for float64 ``A`` it would cost ``\sqrt{eps_{64}}``, so ``W = Q_W R`` and the
    SVD of ``R^T`` are used instead. When ``L`` reaches ``s`` no sketch is
    drawn (``Q = I``, ``W = X^T``) and the result is exact.

    Accuracy: a converged triplet carries the error of the float32 products,
    ``eps \sigma_1/\sigma_i``, plus ``eps (\sigma_1/\sigma_i)^2`` times a small
    constant from building the space with products by ``K``. Measured on
    ``256 x 100k`` float32 Jacobian-like matrices (``\sigma_i \approx 0.9^i``) at
    rank 32 and ``rtol = 1e-3``: ``x = A_r^+ b`` to ``< 1e-5`` relative error with
    7 passes of 24 columns. Without decay beyond ``k`` (a flat spectrum) the
    leading subspace is ill-conditioned and no fixed budget resolves it: use an
    exact solver. Cost: ``(2q + 1) b`` products with ``A`` or ``A^T`` plus
    ``O(N L^2)`` for the Rayleigh–Ritz step.

    Args:
        oversample: ``p``, extra dimensions of the search space (``None``: ``k + 32``).
        power_iters: ``q``, Krylov steps or power iterations (``2q + 1`` passes over ``A``).
        block_krylov: block Krylov space (default) or subspace iteration.
        seed: seed or ``torch.Generator`` of the sketch; the same seed gives
            bit-identical results (a generator is advanced by each call).
        tol: residual tolerance of the certificate, relative to ``sigma_1``
            (default :func:`truncpinv._certify.default_tol`: ``1e-5`` float32, ``1e-12`` float64).
        max_power_iters: budget: ``q`` grows by half (more Krylov blocks or power passes) while the
            result is not certified, up to this (default ``max(4 q, 16)``); once the Krylov space
            would span the short side the exact Rayleigh–Ritz step on all of it is used.

    Certificate: every result is checked a posteriori (:mod:`truncpinv._certify`:
    residuals ``||A v - sigma u||`` and ``||A^T u - sigma v||`` within ``tol sigma_1``,
    and no singular value above the kept ones left in ``A - U S V^T``); an
    uncertified result after the budget raises one
    :class:`~truncpinv.UncertifiedResultWarning` and ``F.stats["certified"]`` is ``False``.
    """

    oversample: int | None = None
    power_iters: int = 3
    block_krylov: bool = True
    seed: int | torch.Generator | None = 0
    tol: float | None = None
    max_power_iters: int | None = None

    name: ClassVar[str] = "randomized"
    randomized: ClassVar[bool] = True
    matrix_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for field, v in (("oversample", self.oversample), ("power_iters", self.power_iters)):
            if (v is not None or field == "power_iters") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"`{field}` must be a non-negative integer, got {v!r}")
        if not isinstance(self.block_krylov, bool):
            raise ValueError(f"`block_krylov` must be True or False, got {self.block_krylov!r}")
        if self.max_power_iters is not None and (
            isinstance(self.max_power_iters, bool)
            or not isinstance(self.max_power_iters, int)
            or self.max_power_iters < self.power_iters
        ):
            raise ValueError(
                f"`max_power_iters` must be an integer >= `power_iters` ({self.power_iters}) or None, "
                f"got {self.max_power_iters!r}"
            )
        check_tol(self.tol)
        check_seed(self.seed)

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        m, n = A.shape
        s, k, q, dtype, dev = min(m, n), tol.rank, self.power_iters, A.dtype, A.device
        rtol_res = self.tol if self.tol is not None else default_tol(dtype, (m, n))
        xt, x = wide_products(A)
        width = k + (k + 32 if self.oversample is None else self.oversample)
        b = -(-width // (q + 1)) if self.block_krylov else width
        L = (q + 1) * b if self.block_krylov else b
        if L >= s:  # the search space would be all of R^s: no sketch, exact
            return self._exact(A, k)
        Q = _orth(torch.randn(s, b, dtype=_F64, device=dev, generator=make_generator(self.seed, dev)))
        Qs, Ws, passes = [Q], list[torch.Tensor](), 0
        budget = self.max_power_iters if self.max_power_iters is not None else max(4 * q, 16)
        target, rounds = q, 0
        while True:
            if self.block_krylov:  # extend [Q0, K Q0, ..., K^target Q0] block by block
                while len(Ws) < target + 1:
                    if len(Qs) == len(Ws):
                        Qs.append(_orth(x(Ws[-1]).to(_F64), torch.cat(Qs, dim=1)))
                        passes += 1
                    Ws.append(xt(Qs[-1].to(dtype)))
                    passes += 1
                Qcat = torch.cat(Qs, dim=1)
            else:  # subspace iteration: more passes Q <- orth(K Q)
                while passes < 2 * target:
                    Qs = [_orth(x(xt(Qs[0].to(dtype))).to(_F64))]
                    passes += 2
                Ws = [xt(Qs[0].to(dtype))]
                passes += 1
                Qcat = Qs[0]
            U, S, V = self._rayleigh_ritz(Qcat, Ws, Qcat.shape[1])
            stats = {"matvecs": passes * b, "iterations": passes, "exact": False, "power_iters": target}
            trip = Triplets(U, S, V, stats=stats) if m <= n else Triplets(V, S, U, stats=stats)
            rounds += 1
            cert = certify_triplets(A, trip, tol, rtol_res=rtol_res, seed=self.seed)
            if cert.certified or target >= budget:
                break
            # not yet: more Krylov blocks / power passes (by half), exact once they would span R^s
            target = min(budget, target + max(1, (target + 1) // 2))
            if self.block_krylov and (target + 1) * b >= s:
                return self._exact(A, k)
        trip.stats["rounds"] = rounds
        return trip

    def _exact(self, A: torch.Tensor | LinearOperator, k: int) -> Triplets:
        """``Q = I``: the Rayleigh–Ritz step on the whole short side is an exact SVD."""
        m, n = A.shape
        s, dev = min(m, n), A.device
        xt, _ = wide_products(A)
        Q = torch.eye(s, dtype=_F64, device=dev)
        if isinstance(A, torch.Tensor):
            Ws = [A.T if m <= n else A]  # X^T, no product needed
        else:
            Ws = [xt(Q.to(A.dtype))]
        stats = {"matvecs": 0 if isinstance(A, torch.Tensor) else s, "iterations": 1, "exact": True, "certified": True}
        U, S, V = self._rayleigh_ritz(Q, Ws, k)
        return Triplets(U, S, V, stats=stats) if m <= n else Triplets(V, S, U, stats=stats)

    @staticmethod
    def _krylov(
        xt: _Op, x: _Op, Q0: torch.Tensor, q: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Orthonormal basis ``Q`` of ``[Q0, K Q0, ..., K^q Q0]`` and the blocks of ``W = X^T Q``."""
        Qs, Ws = [Q0], []
        for j in range(q + 1):
            Ws.append(xt(Qs[j].to(dtype)))
            if j < q:
                Qs.append(_orth(x(Ws[j]).to(_F64), torch.cat(Qs, dim=1)))
        return torch.cat(Qs, dim=1), Ws

    @staticmethod
    def _rayleigh_ritz(
        Q: torch.Tensor, Ws: list[torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Leading ``k`` triplets of ``Q^T X = W^T`` (``W`` given by column blocks), lifted by ``Q``."""
        dtype, dev, N = Ws[0].dtype, Ws[0].device, Ws[0].shape[0]
        if dtype == _F64:  # a float64 eigensolver cannot resolve a float64 Gram matrix: QR, then SVD
            Qw, R = torch.linalg.qr(torch.cat(Ws, dim=1))  # W = Qw R, Q^T X = R^T Qw^T
            Ur, S, Zh = torch.linalg.svd(R.T)
            return Q @ Ur[:, :k], S[:k], Qw @ Zh[:k].T
        mu, Z = torch.linalg.eigh(_gram64(Ws))  # exact products of the float32 data, float64 eigensolver
        mu, Z = mu.flip(0)[:k], Z.flip(1)[:, :k]
        S = mu.clamp_min(0).sqrt()
        inv = reciprocal_or_zero(S)
        Zs, V, j = (Z * inv).to(dtype), torch.zeros(N, Z.shape[1], dtype=dtype, device=dev), 0
        for W in Ws:  # V = W Z S^{-1}, block by block
            V.addmm_(W, Zs[j : j + W.shape[1]])
            j += W.shape[1]
        return (Q @ Z).to(dtype), S.to(dtype), V
