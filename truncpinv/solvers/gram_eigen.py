"""Eigendecomposition of the small Gram matrix on the short side."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .._factorization import Triplets, reciprocal_or_zero
from .._operator import LinearOperator, wide_products
from .._tolerance import Tolerance
from ._base import Solver

__all__ = ["GramEigen", "gram"]


def _syrk(X: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``X X^T`` computing only the block upper triangle (as BLAS ``syrk`` would).

    Row block ``i`` is multiplied with rows ``i..end`` in one GEMM and mirrored:
    ``(b+1)/(2b)`` of the flops of ``X @ X.T`` (5/8 for 4 blocks), with
    bit-identical results. Small matrices use one GEMM.
    """
    s = X.shape[0]
    if s < 128:
        return X @ X.T
    K = torch.empty(s, s, dtype=X.dtype, device=X.device)
    edges = [round(i * s / blocks) for i in range(blocks + 1)]
    for lo, hi in itertools.pairwise(edges):
        Kb = X[lo:hi] @ X[lo:].T
        K[lo:hi, lo:] = Kb
        K[lo:, lo:hi] = Kb.T
    return K


def gram(A: torch.Tensor | LinearOperator, *, accumulate: torch.dtype, chunk_size: int) -> torch.Tensor:
    """``A A^T`` for wide ``A`` (``A^T A`` for tall), accumulated in ``accumulate``.

    Dense float32 input is converted to float64 in column chunks of
    ``chunk_size``, so the extra memory is ``O(m * chunk_size)``, not a float64
    copy of ``A``. An operator is applied to the identity of the short side.
    """
    m, n = A.shape
    wide = m <= n
    if isinstance(A, torch.Tensor):
        X = A if wide else A.T
        if X.dtype == accumulate:
            return _syrk(X)
        s = X.shape[0]
        K = torch.zeros(s, s, dtype=accumulate, device=X.device)
        for j in range(0, X.shape[1], chunk_size):
            K += _syrk(X[:, j : j + chunk_size].to(accumulate))
        return K
    eye = torch.eye(min(m, n), dtype=A.dtype, device=A.device)
    W = A.rmatmat(eye) if wide else A.matmat(eye)  # (long, short)
    W = W.to(accumulate)
    return W.T @ W


#: ``"mixed"`` refines through ``A`` only when the refinement basis is at most this fraction of the
#: short side; a wider one costs more (three skinny products) than accumulating in float64.
REFINE_FRACTION = 0.2


def _zero_below(S: torch.Tensor, floor: float) -> torch.Tensor:
    """``S`` with the finite values ``<= floor`` set to zero; NaN and Inf stay (for the finiteness check)."""
    return torch.where((S <= floor) & torch.isfinite(S), torch.zeros_like(S), S)


def _lost_below_floor(
    A: torch.Tensor | LinearOperator, Q: torch.Tensor, S: torch.Tensor, floor: float, tol: Tolerance
) -> tuple[int, int]:
    r"""Directions the noise floor zeroed although ``A`` has values there that the tolerance keeps.

    ``Q`` holds the eigenvectors of the Gram matrix on the short side, ``S``
    the singular values after :func:`_zero_below`. When the tolerance's cut-off
    lies below ``floor`` and the rank cap still wants some of the zeroed
    directions, their norms :math:`\|A^\top q\|` (wide) or :math:`\|A q\|`
    (tall) are measured through ``A`` itself, whose products carry only
    ``eps * sigma_max`` absolute error (not the Gram matrix's squared one). A
    norm above both the cut-off and ``10 sqrt(max(m, n)) eps sigma_max`` is a
    singular value the user asked for and this method lost (a numerically
    rank-deficient matrix stays silent: its null directions measure at round-off).

    Returns ``(lost, products)``: the count, and the columns multiplied by ``A``.
    """
    smax = float(S[0]) if S.numel() else 0.0
    if smax == 0.0:
        return 0, 0
    cut = tol.cutoff(smax)
    if cut >= floor:
        return 0, 0
    kept = int((S > 0).sum())
    want = min(tol.rank, S.numel())
    if kept >= want:
        return 0, 0
    Z = Q[:, kept:want].to(A.dtype)
    m, n = A.shape
    if isinstance(A, torch.Tensor):
        W = A.T @ Z if m <= n else A @ Z
    else:
        W = A.rmatmat(Z) if m <= n else A.matmat(Z)
    norms = torch.linalg.vector_norm(W.double(), dim=0)
    noise = 10.0 * math.sqrt(max(m, n)) * float(torch.finfo(A.dtype).eps) * smax
    return int((norms > max(cut, noise)).sum()), Z.shape[1]


@dataclass(frozen=True)
class GramEigen(Solver):
    r"""Truncated pseudoinverse from the eigendecomposition of the Gram matrix.

    For wide ``A`` (``m <= n``), ``K = A A^T = U \Lambda U^T`` gives
    ``sigma = sqrt(lambda)`` and ``V = A^T U \Sigma^{-1}``. ``V`` is never formed
    for a solve: ``x = A^T U_r \Sigma_r^{-2} U_r^T b`` costs one product with
    ``A^T``. Tall matrices use ``A^T A`` symmetrically.

    Squaring ``A`` squares its condition number: a float32 Gram matrix has
    absolute eigenvalue error ``~ eps32 * sigma_max^2``, i.e. *relative* error
    ``eps32 / (sigma/sigma_max)^2``, about 6% at ``sigma/sigma_max = 1e-3``.
    Three precisions are offered:

    * ``"float64"`` (default): the Gram matrix is accumulated in float64 from
      the float32 data (exact products, in column chunks) and decomposed in
      float64; the relative error of ``sigma_i`` is ``~ eps64 (sigma_1/sigma_i)^2``.
      Costs about 2.5 float32 GEMMs on a CPU.
    * ``"mixed"``: the Gram matrix in float32 (one GEMM), its eigenvectors as a
      starting basis ``Q_0`` of ``r' = r + oversample`` columns, then one
      subspace-iteration step computed through ``A`` itself,
      ``Q_1 = orth(A (A^T Q_0))``, and a Rayleigh–Ritz step
      ``W = A^T Q_1``, ``W^T W = Z M Z^T`` (float64, small), ``U = Q_1 Z``,
      ``sigma = sqrt(mu)``, ``V = W Z \Sigma^{-1}``. Products with ``A`` carry
      only ``eps32 * sigma_1 / sigma_i`` relative error, so this reaches the
      accuracy of a float32 SVD at ``1 + 3 r'/min(m, n)`` GEMMs. The refinement
      is skipped when the kept part is so well conditioned
      (``kappa^2 eps < 2e-5``) that the float32 Gram matrix is accurate, and
      replaced by float64 accumulation when ``r'`` exceeds a fifth of the
      short side (measured: three skinny products then cost more).
    * ``"working"``: the Gram matrix in the dtype of ``A``, no refinement (fast,
      inaccurate for ill-conditioned float32 data; for comparison).

    Singular values below the method's noise floor
    ``sqrt(eps_acc * max(m, n)) * sigma_max`` are reported as zero, so an
    exactly rank-deficient matrix keeps its rank. For float64 *data* whose
    wanted singular values lie below about ``1e-7 sigma_max``, use
    :class:`DenseSVD` (``solver="auto"`` does).

    Args:
        precision: ``"float64"``, ``"mixed"`` or ``"working"`` (see above).
        oversample: extra columns of the ``"mixed"`` refinement.
        chunk_size: columns per float64 conversion chunk (memory bound of the
            ``"float64"`` path).

    Cost: one ``O(min(m,n)^2 max(m,n))`` GEMM plus an ``O(min(m,n)^3)``
    eigendecomposition; memory ``O(min(m,n)^2)`` beyond ``A``.
    """

    precision: Literal["float64", "mixed", "working"] = "float64"
    oversample: int = 16
    chunk_size: int = 8192

    name: ClassVar[str] = "gram"
    exact: ClassVar[bool] = True
    matrix_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.precision not in ("float64", "mixed", "working"):
            raise ValueError(f"`precision` must be 'float64', 'mixed' or 'working', got {self.precision!r}")
        for field in ("oversample", "chunk_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if field == "oversample" else 1):
                rule = "a non-negative" if field == "oversample" else "a positive"
                raise ValueError(f"`{field}` must be {rule} integer, got {v!r}")

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        m, n = A.shape
        short, long_ = min(m, n), max(m, n)
        dtype = A.dtype
        acc = torch.float64 if self.precision == "float64" else dtype
        K = gram(A, accumulate=acc, chunk_size=self.chunk_size)
        lam, Q = torch.linalg.eigh(K.double())
        lam, Q = lam.flip(0), Q.flip(1)
        S = lam.clamp_min(0).sqrt()
        smax = float(S[0])
        matvecs = 0 if isinstance(A, torch.Tensor) else short
        if self.precision == "mixed" and dtype != torch.float64 and smax > 0:
            keep, cut = tol.keep(S)
            kappa = smax / float(S[max(keep, 1) - 1])
            if keep > 0 and kappa * kappa * torch.finfo(dtype).eps > 2e-5:
                width = min(short, max(keep, int((S > 0.5 * cut).sum())) + self.oversample)
                if width <= REFINE_FRACTION * short:
                    return self._refine(A, Q[:, :width].to(dtype), matvecs)
                # a wide refinement costs more than float64 accumulation (skinny products are slow)
                acc = torch.float64
                K = gram(A, accumulate=acc, chunk_size=self.chunk_size)
                lam, Q = torch.linalg.eigh(K)
                lam, Q = lam.flip(0), Q.flip(1)
                S = lam.clamp_min(0).sqrt()
                smax = float(S[0])
                matvecs *= 2
        # Eigenvalues of K are only known to ~ eps_acc * max(m, n) * lambda_max (accumulation plus
        # eigh): singular values below sqrt of that are indistinguishable from zero for this method.
        floor = math.sqrt(torch.finfo(acc).eps * long_) * smax
        S = _zero_below(S, floor)
        lost, probes = _lost_below_floor(A, Q, S, floor, tol)
        matvecs += probes
        stats: dict[str, object] = {"iterations": 1}
        if probes:
            stats["floor"] = floor / smax
        if lost:
            stats["lost_below_floor"] = lost
            stats["_uncertified_reason"] = (
                f"the Gram matrix squares the condition number: singular values below {floor / smax:.1e} * "
                f"sigma_max are lost in its eigenvalues, but the tolerance keeps values down to "
                f"{max(tol.cutoff(smax), 0.0) / smax:.1e} * sigma_max, and {lost} direction(s) reported as zero "
                f"have ||A v|| above it; use solver='svd' (or 'auto', which does) for this matrix"
            )
        if m <= n:
            return Triplets(Q.to(dtype), S.to(dtype), None, stats={"matvecs": matvecs, **stats})
        # tall: Q holds V; form U = A V S^{-1} for the positive part.
        V = Q.to(dtype)
        inv = reciprocal_or_zero(S).to(dtype)
        AV = A @ V if isinstance(A, torch.Tensor) else A.matmat(V)
        return Triplets(AV * inv, S.to(dtype), V, stats={"matvecs": matvecs + n, **stats})

    @staticmethod
    def _refine(A: torch.Tensor | LinearOperator, Q0: torch.Tensor, matvecs: int) -> Triplets:
        """One subspace-iteration step through ``A`` and a float64 Rayleigh–Ritz step (``"mixed"``)."""
        m, n = A.shape
        rmm, mm = wide_products(A)
        dtype = Q0.dtype
        Q1 = torch.linalg.qr(mm(rmm(Q0)).double()).Q.to(dtype)
        W = rmm(Q1)  # long x r'
        Wd = W.double()
        mu, Z = torch.linalg.eigh(Wd.T @ Wd)
        mu, Z = mu.flip(0), Z.flip(1)
        S = mu.clamp_min(0).sqrt()
        S = _zero_below(S, torch.finfo(dtype).eps * math.sqrt(max(m, n)) * float(S[0]))
        inv = reciprocal_or_zero(S)
        U = (Q1.double() @ Z).to(dtype)
        V = W @ (Z * inv).to(dtype)
        if m > n:
            U, V = V, U
        stats = {"matvecs": matvecs + 3 * Q0.shape[1], "iterations": 2, "refined": True}
        return Triplets(U, S.to(dtype), V, stats=stats)
