r"""SciPy's ``svds`` (ARPACK or PROPACK) behind truncpinv's protocol, certified by truncpinv."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .._certify import check_steps, check_tol, default_tol, orthonormal_basis, predicted_gap
from .._factorization import Triplets
from .._operator import LinearOperator, ScipyOperator, TensorOperator
from .._tolerance import Tolerance
from .._validation import FiniteCheckedOperator
from ._base import Solver, SolverError, certify_triplets, check_seed, int_field
from .lobpcg import _exact

__all__ = ["ScipySVDS", "scipy_view", "svds_serves"]

#: ``svds`` back ends.
METHODS = ("arpack", "propack")
#: At most this many further Ritz pairs of ARPACK's last basis per requested triplet go to the certificate...
EXTRA_PER_RANK = 1.0
#: ...each costing about this many single-vector product columns: two block columns (Rayleigh-Ritz and
#: residual), at about 0.6 of a single column's time each with SciPy's sparse kernels (measured, 20000 x 3000).
EXTRA_COST = 1.2
#: ARPACK is asked for ``tol / ARPACK_MARGIN`` on the Gram operator (see ``ScipySVDS``).
ARPACK_MARGIN = 10.0
#: ARPACK's Krylov dimension at low ranks (:func:`arpack_ncv`).
NCV_LOW_RANK = 40
#: ``C^T C`` is formed for ARPACK when its entries are bounded by ``GRAM_BOUND nnz(C)``... (:func:`formed_gram`)
GRAM_BOUND = 4.0
#: ...and kept when it has at most ``GRAM_NNZ nnz(C)`` entries (one pass over them against two over ``C``).
GRAM_NNZ = 1.5
#: ARPACK's ``info`` when the operator maps its start vector to zero.
_ZERO_START = -9


def scipy_view(A: torch.Tensor | LinearOperator) -> Any:
    """What ``svds`` multiplies: the SciPy sparse matrix, the CPU array that ``A`` holds, or the SciPy CSR
    matrix sharing the storage of a CPU torch sparse tensor that ``A`` holds (``TensorOperator``; with
    finite entries where ``check_finite``), else a :class:`scipy.sparse.linalg.LinearOperator` whose
    products go through ``A`` (with its finite checks, which name a NaN), on ``A``'s device."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import LinearOperator as SpLinOp

    if isinstance(A, torch.Tensor) and A.device.type == "cpu":
        return A.numpy()
    checked = isinstance(A, FiniteCheckedOperator)
    inner = A.op if isinstance(A, FiniteCheckedOperator) else A
    M = getattr(inner.op, "A", None) if isinstance(inner, ScipyOperator) else None
    if isinstance(inner, TensorOperator):
        M = _as_scipy(inner.A)
    if sp.issparse(M) or isinstance(M, np.ndarray):  # entries scanned once instead of every product checked
        entries: Any = M.data if sp.issparse(M) else M  # type: ignore[union-attr]
        if not checked or bool(np.isfinite(entries).all()):
            return M
    dt, dev = A.dtype, A.device
    fwd, back = (A.__matmul__, A.T.__matmul__) if isinstance(A, torch.Tensor) else (A.matmat, A.rmatmat)

    def call(f: Any, X: np.ndarray) -> np.ndarray:
        X2 = np.ascontiguousarray(X.reshape(X.shape[0], -1))
        return np.asarray(f(torch.from_numpy(X2).to(device=dev, dtype=dt)).cpu().numpy())

    np_dt = np.float64 if dt == torch.float64 else np.float32
    return SpLinOp(
        tuple(A.shape),
        matvec=lambda x: call(fwd, x),
        matmat=lambda X: call(fwd, X),
        rmatvec=lambda y: call(back, y),
        rmatmat=lambda Y: call(back, Y),
        dtype=np_dt,
    )


def _as_scipy(T: torch.Tensor) -> Any:
    """A CPU torch matrix as SciPy sees it: a dense one as its NumPy view, a sparse one (COO, CSR or CSC) as
    a SciPy CSR matrix (sharing the CSR storage; COO and CSC converted once); ``None`` on other devices."""
    import scipy.sparse as sp

    if T.device.type != "cpu" or T.requires_grad:
        return None
    if T.layout == torch.strided:
        return T.numpy()
    if T.layout == torch.sparse_coo:
        T = T.coalesce()
        i = T.indices().numpy()
        return sp.csr_matrix((T.values().numpy(), (i[0], i[1])), shape=tuple(T.shape))
    if T.layout == torch.sparse_csc:
        return sp.csc_matrix(
            (T.values().numpy(), T.row_indices().numpy(), T.ccol_indices().numpy()), shape=tuple(T.shape)
        ).tocsr()
    if T.layout == torch.sparse_csr:
        return sp.csr_matrix(
            (T.values().numpy(), T.col_indices().numpy(), T.crow_indices().numpy()), shape=tuple(T.shape)
        )
    return None


@dataclass(frozen=True)
class ScipySVDS(Solver):
    r"""Truncated pseudoinverse from SciPy's ARPACK (or PROPACK), certified like every iterative solver.

    ``method="arpack"`` runs ARPACK's implicitly restarted Lanczos method
    (Lehoucq & Sorensen 1996, :func:`scipy.sparse.linalg.eigsh`) on the short-side
    Gram operator ``G = A^T A`` (``A A^T`` for wide ``A``) and then a Rayleigh–Ritz
    step through ``A`` itself (:func:`arpack_triplets`), as
    :func:`scipy.sparse.linalg.svds` does, with a ``k x k`` eigendecomposition
    in place of the SVD of an ``m x k`` matrix (on a sparse matrix whose rows hold one or two
    entries, a graph's incidence matrix, ARPACK multiplies ``G`` formed once: :func:`formed_gram`).
    ARPACK stops when
    ``||G v - \theta v|| \le t^2 \theta``; for a triplet this means
    ``||A^T u - \sigma v|| = ||G v - \sigma^2 v|| / \sigma \le t^2 \sigma``,
    so ``t^2 = tol / 10`` asks for a tenth of the certified residual
    ``tol \sigma_1``. ``method="propack"`` runs PROPACK's Lanczos
    bidiagonalisation of ``A`` itself through ``svds`` (Larsen 1998), which does not square ``A``;
    its stopping rule bounds the error of ``sigma`` rather than the residual, and
    below an internal tolerance of ``1e-14`` it stops converging, so its
    residuals stall between ``2e-11`` and ``7e-9 sigma_1`` (measured): it is
    certified for a loose ``tol`` (``1e-6``), not at the float64 default ``1e-12``.

    The answer is then certified (:mod:`truncpinv._certify`): explicit residuals
    in both orientations within ``tol * sigma_1`` (the Rayleigh–Ritz step's block
    product ``A V``, ``A^T U`` for wide ``A``, is that side's residual product; the
    other side is one more block product), and no missed singular value above
    the kept ones, checked by **one** Lanczos run on the deflated operator
    (``runs=1``: SciPy's sparse kernels cost per column, and one run needs the fewest
    of them for the same bound) of at most ``check_steps`` steps, which multiplies ARPACK's
    formed ``C^T C`` where there is one (:func:`formed_gram`; ``certify(gram=...)``). Further triplets that
    are accurate and clearly below the kept ones are deflated too, which widens the gap the
    check has to resolve (on a flat spectrum its length goes like
    ``1 / sqrt(1 - (sigma_{d+1} / sigma_k)^2)`` for ``d`` deflated triplets). They come
    nearly free: ARPACK's final Lanczos factorisation holds ``ncv`` Ritz pairs (``2k + 1``, 40 at
    ranks 10 to 19: :func:`arpack_ncv`) with free residual bounds, and the first ``e`` after the ``k``
    converged ones join the Rayleigh–Ritz
    step, for the ``e`` (at most ``k``) that minimises the predicted cost, two block columns
    each plus the check's predicted length (:func:`extra_pairs`, :func:`arpack_ritz`,
    :func:`arpack_triplets`). On the 20000 x 3000 matrix of ``benchmarks/sparse_table.py`` at
    rank 50 the check shrinks from 125 steps (5 guard triplets that ARPACK converged fully) to
    95 with the 10 pairs resolved to ``2.5e-7 sigma_1``, and to 84 with 6 more resolved only to
    about ``1e-5 sigma_1`` (their larger Weyl margin costs less than the gap they open). At rank
    10 the prediction can be optimistic (an unconverged Ritz value underestimates the next
    singular value): there the products grew by up to 3.3% (``benchmarks/sparse_table.py``).
    ``guard`` triplets (default 0) are still computed to full accuracy when asked for; guard
    triplets below ARPACK's resolution, ``sqrt(eps) sigma_1`` on the Gram operator, may not
    converge: then ARPACK runs again without them. An
    uncertified result raises one :class:`~truncpinv.UncertifiedResultWarning`
    (``solver="auto"`` falls back instead). ARPACK squares ``A``: its residuals carry
    ``eps sigma_1^2 / sigma_i``, so kept parts with ``sigma_1 / sigma_k``
    above about ``tol / eps`` are not certified (use ``Lanczos``).

    When ARPACK's Krylov space (``2 rank + 1`` vectors) would not fit in the
    short side ``s``, the short side is materialised (``s`` products) and
    decomposed exactly instead (``stats["fallback"] = "rank"``).

    Runs on the CPU. A SciPy sparse matrix, and a ``TensorOperator`` over a CPU
    torch sparse (CSR shared without a copy; COO and CSC converted once) or dense
    tensor, are multiplied by SciPy's own kernels; any other operator through its
    products, one vector at a time (a CUDA operator would cross to the CPU at every
    product: use ``Lanczos`` there, as ``auto`` does). Results are tensors of ``A``'s
    dtype and device (NumPy for SciPy input, as everywhere).

    Args:
        method: ``"arpack"`` (default) or ``"propack"``.
        tol: certified residual tolerance relative to ``sigma_max`` (default
            :func:`truncpinv.default_tol`).
        seed: seed or generator of ARPACK's start vector and of the certificate.
        check_steps: step limit of the missed-value check (default 400).
        guard: triplets that ARPACK converges beyond the rank (default 0: the free further Ritz pairs serve
            the check instead), as room permits.

    References:
        R. B. Lehoucq, D. C. Sorensen and C. Yang, *ARPACK Users' Guide*, SIAM, 1998.
        R. M. Larsen, *Lanczos bidiagonalization with partial reorthogonalization*,
        DAIMI PB-357, 1998.
    """

    method: str = "arpack"
    tol: float | None = None
    seed: int | torch.Generator | None = 0
    check_steps: int = 400
    guard: int | None = None

    name: ClassVar[str] = "svds"
    matrix_free: ClassVar[bool] = True
    randomized: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}")
        check_tol(self.tol)
        check_seed(self.seed)
        int_field(self, "check_steps", 1)
        int_field(self, "guard", 0, optional=True)

    def _seed(self) -> int:
        if isinstance(self.seed, torch.Generator):
            return int(torch.randint(0, 2**62, (1,), generator=self.seed))
        return 0 if self.seed is None else int(self.seed)

    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        import scipy.sparse as sp

        m, n = int(A.shape[0]), int(A.shape[1])
        s, k = min(m, n), tol.rank
        rtol_res = self.tol if self.tol is not None else default_tol(A.dtype, (m, n))
        if 2 * k + 1 > s:  # ARPACK's 2k + 1 Lanczos vectors would span the short side
            trip = _exact(A, tol, "rank", 0, 0)
            trip.stats.update(exact=True, certified=True)
            return trip
        seed = self._seed()
        g = 0 if self.guard is None else self.guard
        k = k + max(0, min(g, (s - 1) // 2 - k))  # the guard triplets, as far as ARPACK has room
        if self.method == "arpack":
            t_svds, maxiter = math.sqrt(rtol_res / ARPACK_MARGIN), None
        else:  # PROPACK's tolerance t^2 bounds the error of sigma, and a residual r moves sigma by only
            # r^2 / gap: ask t ~ tol; below t^2 = 1e-14 it stops converging
            t_svds, maxiter = max(rtol_res / 10, 1e-7), 20 * k + 200
        M = scipy_view(A)
        count = _Counted(M)
        wide = m < n
        # ARPACK's Gram operator, formed once where that is cheaper (formed_gram); the check multiplies it too
        G = _Gram(count.T if wide else count) if self.method == "arpack" else None
        try:
            U, S, V, CV = self._triplets(count, k, t_svds, maxiter, seed, wide, rtol_res, G)
        except SolverError:
            if k == tol.rank:
                raise
            # guard triplets below ARPACK's resolution (sqrt(eps) sigma_1 on the Gram operator) need not
            # converge: without them
            U, S, V, CV = self._triplets(count, tol.rank, t_svds, maxiter, seed, wide, rtol_res, G)
        dev, dt = A.device, A.dtype
        U_t, S_t, V_t = (torch.from_numpy(np.ascontiguousarray(X)).to(device=dev, dtype=dt) for X in (U, S, V))
        stats = {"matvecs": count.columns[0], "method": self.method, "triplets": int(S.size)}
        trip = Triplets(U_t, S_t.clamp_min(0), V_t, stats=stats)
        # the certificate multiplies the sparse matrix itself when svds did (no per-product finite check:
        # its entries were scanned); anything else through A. The Rayleigh-Ritz product C V of the ARPACK
        # route is that side's residual product (A V tall, A^T U wide): one block product remains.
        A_cert = _SparseProducts(M, A.dtype) if sp.issparse(M) else A
        own: dict[str, Any] = {}
        if CV is not None:
            own["AtU" if wide else "AV"] = torch.from_numpy(np.ascontiguousarray(CV)).to(device=dev, dtype=dt)
        if G is not None and G.formed is not None and wide == (m <= n) and dev.type == "cpu":
            # the check's short-side Gram operator is ARPACK's (a square A: the certificate takes A A^T,
            # ARPACK A^T A, and the pair is multiplied)
            own["gram"] = G.formed
        certify_triplets(A_cert, trip, tol, rtol_res=rtol_res, seed=seed, runs=1, max_steps=self.check_steps, **own)
        trip.stats["converged"] = True
        return trip

    def _triplets(
        self,
        op: _Counted,
        k: int,
        t: float,
        maxiter: int | None,
        seed: int,
        wide: bool,
        rtol_res: float,
        G: _Gram | None = None,
    ) -> tuple[Any, Any, Any, Any]:
        """``(U, S, V, C V)``, ``S`` descending: ARPACK through :func:`arpack_triplets` on the Gram operator
        ``G`` of ``C`` (``C V`` its Rayleigh–Ritz product, ``C = A``, or ``A^T`` for wide ``A``), PROPACK
        through ``svds`` (``C V = None``).
        Zero triplets when ARPACK's start vector maps to zero (``A = 0`` almost surely: the certificate then
        checks it), a :class:`SolverError` when it does not converge."""
        from scipy.sparse.linalg import ArpackError, svds

        m, n = op.shape
        try:
            if self.method == "propack":
                rng = np.random.default_rng(seed)
                U, S, Vh = svds(op.linear_operator(), k=k, tol=t, solver="propack", maxiter=maxiter, random_state=rng)
                order = np.argsort(-S, kind="stable")
                return U[:, order], S[order], Vh[order].T, None
            Uc, S, Vc, CV = arpack_triplets(op.T if wide else op, k, t * t, seed, rtol_res, G)
            return (Vc, S, Uc, CV) if wide else (Uc, S, Vc, CV)
        except (ArpackError, np.linalg.LinAlgError) as e:
            if not str(e).startswith(f"ARPACK error {_ZERO_START}:"):  # ArpackError keeps no code
                raise SolverError(
                    f"scipy svds ({self.method}) did not converge on a {m}x{n} operator at rank {k}: {e}; "
                    f"use solver='lanczos' or solver='auto'"
                ) from e
        np_dt = op.dtype
        return np.eye(m, k, dtype=np_dt), np.zeros(k, dtype=np_dt), np.eye(n, k, dtype=np_dt), None


#: The Rayleigh–Ritz rotation comes from the ``k x k`` Gram matrix of ``C V`` while ``eps kappa^2`` (the
#: orthonormality error of ``U = C V W / sigma``) stays below this; else from a QR of ``C V``.
_GRAM_RR = 1e-10


def arpack_triplets(
    C: Any, k: int, tol: float, seed: int, rtol_res: float = 0.0, G: _Gram | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""The ``k`` largest singular triplets of a tall ``C`` (``m >= n``; anything with ``@`` and ``.T``: a
    SciPy sparse matrix or ``LinearOperator``, a NumPy array) by ARPACK, plus the further triplets of
    ARPACK's last Lanczos basis that shorten the certificate's check at residual tolerance ``rtol_res``
    (:func:`extra_pairs`; none for ``rtol_res = 0``).

    ARPACK (implicitly restarted Lanczos, Lehoucq & Sorensen 1996, :func:`arpack_ritz`)
    finds the ``k`` largest eigenpairs of ``G = C^T C`` to ``||G e - \theta e|| \le tol\,\theta``
    from a Gaussian start (``seed``); its final factorisation yields further Ritz pairs with a free
    residual bound, as a triplet residual ``||G e - \theta e|| / \sqrt{\theta \theta_1}`` (the
    certificate deflates them: a wider gap for its check, no product spent on them but two block columns).
    Then a Rayleigh–Ritz step through ``C``: with ``E`` all these Ritz vectors (orthonormalised)
    and ``Y = C E`` (one block product),

    .. math::
        Y^\top Y = W \Lambda W^\top, \qquad
        \sigma = \Lambda^{1/2}, \quad V = E W, \quad U = Y W \Sigma^{-1},

    so that ``C V = Y W = U \Sigma``. This is what :func:`scipy.sparse.linalg.svds`
    computes, with a ``k x k`` eigendecomposition in place of the SVD of the
    ``m x k`` matrix ``Y`` (``U``'s orthonormality then carries
    ``eps (\sigma_1 / \sigma_i)^2``, within :data:`_GRAM_RR`; else ``Y = Q R`` and
    the SVD of ``R``). Returns ``(U, S, V, C V)`` with ``S`` descending (at least ``k`` triplets):
    ``C V`` is the product that the residual ``C v - \sigma u`` needs, already computed.
    ``G`` is ARPACK's operator ``C^T C`` (:class:`_Gram`), built here when not given.
    """
    from scipy.linalg import eigh, qr, svd

    n = int(C.shape[1])
    G = _Gram(C) if G is None else G
    v0 = np.random.default_rng(seed).standard_normal(n).astype(C.dtype)
    theta, E, est = arpack_ritz(G, k, tol, v0)
    t = k
    if rtol_res > 0 and theta[0] > 0:
        # triplet residual of a Ritz pair: ||A^T u - s v|| / s_1 = ||G e - theta e|| / sqrt(theta theta_1)
        res = est / np.sqrt(np.maximum(theta, np.finfo(theta.dtype).tiny) * theta[0])
        t = extra_pairs(np.sqrt(np.maximum(theta, 0.0)), res, k, rtol_res, n)
    # ARPACK's vectors of clustered values need not be orthonormal (svds takes a QR too)
    E = orthonormal_basis(torch.from_numpy(np.ascontiguousarray(E[:, :t]))).numpy()
    Y = np.asarray(C @ E)
    lam, W = eigh(Y.T @ Y)
    lam, W = lam[::-1].clip(min=0.0), W[:, ::-1]
    eps = float(np.finfo(Y.dtype).eps)
    if lam[-1] > 0 and eps * lam[0] / lam[-1] <= _GRAM_RR:
        S = np.sqrt(lam)
        CV = Y @ W
        # U = C V / sigma into Y's memory (no longer needed): a fresh tall array costs its first touches
        return np.divide(CV, S, out=Y), S, E @ W, CV
    Q, R = qr(Y, mode="economic")
    Ur, S, Wt = svd(R)
    return Q @ Ur, S, E @ Wt.T, Y @ Wt.T


def extra_pairs(sv: np.ndarray, res: np.ndarray, k: int, rtol_res: float, s: int) -> int:
    r"""How many of the Ritz pairs (values ``sv``, descending, free residual bounds ``res`` relative to
    ``sv[0]``) go to the Rayleigh–Ritz step and the certificate: ``k`` plus the ``e`` further ones that
    minimise the predicted cost ``2 q(e) + EXTRA_COST e`` in single-vector product columns, ``q(e)`` the
    check's length (:func:`truncpinv._certify.check_steps`) for the gap
    :func:`truncpinv._certify.predicted_gap` after deflating them, the next Ritz value standing in for the
    largest value left out. Each further pair must lie below ``sv[k - 1]`` by more than four times its
    residual, as the certificate asks; at most ``EXTRA_PER_RANK k`` of them. When ``e > 0``, one more pair
    is returned: the certificate predicts the gap from the largest value left out in its own turn
    (:func:`truncpinv._certify._deflated`).
    """
    top = min(k + int(EXTRA_PER_RANK * k), sv.size - 1)
    best, best_cost = k, math.inf
    sel = np.zeros(sv.size, dtype=bool)
    sel[:k] = True
    for t in range(k, top + 1):
        if t > k:
            if not (sv[t - 1] > 0 and sv[t - 1] + 4 * res[t - 1] * sv[0] < sv[k - 1]):
                break
            sel[t - 1] = True
        gap = predicted_gap(sv[: t + 1], res[: t + 1], sel[: t + 1], k, float(sv[k - 1]), float(sv[0]), rtol_res)
        cost = 2 * check_steps(gap, s) + EXTRA_COST * (t - k)
        if cost < best_cost:
            best, best_cost = t, cost
    return best + 1 if best > k else k


def arpack_ritz(G: Any, k: int, tol: float, v0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""ARPACK's Ritz pairs of the symmetric ``G`` (a SciPy ``LinearOperator``; ``k`` largest wanted, to
    ``||G e - \theta e|| \le tol\,\theta``, from the start ``v0``), descending: ``(theta, E, est)``.

    At convergence ARPACK (``dsaupd``, through SciPy's driver) holds its final Lanczos
    factorisation ``G V = V T + f e_m^\top`` of ``m = ncv`` steps (``V`` orthonormal,
    ``T`` tridiagonal). All ``m`` Ritz pairs come from it: ``T = Y \Theta Y^\top``,
    ``E = V Y``, and ``||G E_i - \theta_i E_i|| = ||f|| |Y_{m i}|`` (``est``; no product).
    The first ``k`` are ARPACK's converged ones (what ``eigsh`` returns); the ones after
    them are the closest unwanted values, often resolved far beyond what a guard needs.
    Where SciPy's driver is not there as expected, :func:`scipy.sparse.linalg.eigsh` gives
    the ``k`` wanted pairs alone (``est`` then ``tol * theta``, its stopping rule).
    """
    from scipy.linalg import eigh_tridiagonal
    from scipy.sparse.linalg import eigsh

    n = int(G.shape[0])
    try:
        from scipy.sparse.linalg._eigen.arpack.arpack import _SymmetricArpackParams
    except ImportError:  # SciPy moved its ARPACK driver: eigsh's k wanted pairs alone
        lam, E = eigsh(G, k=k, tol=tol, v0=v0)
        return _descending(lam, E, tol)
    p = _SymmetricArpackParams(n, k, np.dtype(G.dtype).char, G.matvec, tol=tol, v0=v0, ncv=arpack_ncv(k, n))
    while not p.converged:
        p.iterate()
    m = int(p.ncv)
    # dsaupd's arrays in Fortran order: V is column-major with leading dimension n (SciPy allocates it
    # C-ordered), T's off-diagonal in workl[1:m], its diagonal in workl[m:2m]
    V = p.v[:, :m] if p.v.flags.f_contiguous else p.v.reshape(-1)[: n * m].reshape(m, n).T
    off, diag = p.workl[1:m], p.workl[m : 2 * m]
    if np.abs(V[:, :2].T @ V[:, :2] - np.eye(2)).max() > 1e-8 or not np.isfinite(p.workl[: 2 * m]).all():
        lam, E = p.extract(True)  # pragma: no cover - a SciPy whose layout differs: its own extraction
        return _descending(lam, E, tol)  # pragma: no cover
    theta, Y = eigh_tridiagonal(diag, off)
    theta, Y = theta[::-1], Y[:, ::-1]
    return theta, V @ Y, float(np.linalg.norm(p.resid)) * np.abs(Y[-1])


def arpack_ncv(k: int, n: int) -> int:
    """ARPACK's Krylov dimension ``ncv`` for ``k`` wanted pairs of an ``n x n`` operator:
    ``max(2 k + 1, 20, min(NCV_LOW_RANK, 4 k))``, at most ``n``.

    SciPy's default is ``max(2 k + 1, 20)``. At ranks 10 to 19 a space of 40 shortens both ARPACK's
    restarts and the certificate's check (more further Ritz pairs resolved well enough to deflate):
    on the rank-10 and rank-15 cases of ``benchmarks/sparse_table.py``'s matrices 828 products against
    992 and 906 against 956 (random 20000 x 3000), 554 against 628 and 676 against 750 (incidence), time
    0.89x to 0.95x; at rank 5 a space of 40 cost more than it saved (1.05x to 1.13x on the power-law and
    incidence matrices), hence ``4 k`` below rank 10.
    """
    return min(n, max(2 * k + 1, 20, min(NCV_LOW_RANK, 4 * k)))


def _descending(lam: np.ndarray, E: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``eigsh``'s pairs in descending order, with its stopping rule ``tol * theta`` as their bound."""
    order = np.argsort(-lam, kind="stable")
    return lam[order], E[:, order], tol * np.abs(lam[order])


def vector_product(M: Any) -> Any:
    """``x -> M @ x`` for a 1-D float64 ``x``: for a SciPy CSR or CSC float64 matrix its own kernel
    (``csr_matvec`` / ``csc_matvec``, what ``M @ x`` runs) called directly, without the dispatch around it;
    that dispatch cost about 8 microseconds a product, 1.5% of a product pair ``A^T (A x)`` on the
    20000 x 3000 matrix of issue #22 and of ARPACK's and the certificate's hundreds of them. Anything else
    (another format or dtype, a SciPy without that module) goes through ``M @ x``."""
    import scipy.sparse as sp

    try:
        from scipy.sparse import _sparsetools
    except ImportError:  # pragma: no cover - SciPy moved its kernels
        _sparsetools = None
    fmt = getattr(M, "format", None)
    kernel = getattr(_sparsetools, f"{fmt}_matvec", None) if fmt in ("csr", "csc") else None
    if kernel is None or not sp.issparse(M) or M.dtype != np.float64 or M.indptr.dtype != M.indices.dtype:
        return lambda x: np.asarray(M @ x)
    rows, cols = int(M.shape[0]), int(M.shape[1])
    indptr, indices, data = M.indptr, M.indices, M.data

    def product(x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float64 or x.shape != (cols,):
            return np.asarray(M @ x)
        y = np.zeros(rows)  # the kernels accumulate into y
        kernel(rows, cols, indptr, indices, data, np.ascontiguousarray(x), y)
        return y

    return product


class _Gram:
    """``G = C^T C`` for ARPACK: ``shape``, ``dtype`` and ``matvec`` (``x -> C^T (C x)``, or ``G x`` with ``G``
    formed where that is cheaper: :func:`formed_gram`), without the checks of a SciPy ``LinearOperator`` around
    each of ARPACK's hundreds of products (``eigsh`` takes it through ``aslinearoperator`` where it needs one).
    A product with a formed ``G`` counts as the two columns it replaces in ``C``'s counter."""

    def __init__(self, C: Any) -> None:
        n = int(C.shape[1])
        self.C, self.CT, self.shape, self.dtype = C, C.T, (n, n), np.dtype(C.dtype)
        #: ``x -> (C^T C) x`` with ``C^T C`` formed, or ``None`` (:func:`formed_gram`)
        self.formed = formed_gram(C)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        if self.formed is not None:
            self.C.columns[0] += 2
            return np.asarray(self.formed(x))
        return np.asarray(self.CT @ (self.C @ x))


def formed_gram(C: Any) -> Any:
    r"""``x -> (C^T C) x`` with ``C^T C`` formed as a sparse matrix, or ``None`` where the pair of products
    ``C^T (C x)`` is as cheap: ``C`` is a :class:`_Counted` SciPy CSR or CSC matrix.

    ``C^T C = \sum_i c_i c_i^\top`` over the rows ``c_i`` of ``C``, so it has at most ``\sum_i nnz(c_i)^2``
    entries, and forming it costs about as many operations. Where that bound is within
    :data:`GRAM_BOUND` ``nnz(C)`` (rows of one to two entries, as in the incidence matrix of a graph,
    whose ``C^T C`` is the graph's Laplacian) it is formed, and kept when it has at most
    :data:`GRAM_NNZ` ``nnz(C)`` entries: one pass over them replaces the two passes over ``C`` (a gather and
    a scatter). On the 30000-edge incidence matrix of ``benchmarks/sparse_table.py`` ``C^T C`` has 64932
    entries against ``C``'s 60000, a product costs 0.068 ms against 0.143 ms for the pair, and forming it
    2.6 ms (about 18 pairs; ARPACK takes 200 to 1300 of them there). ARPACK already squares ``C``, so its
    products carry the same rounding ``eps \|C\|^2`` either way; the Rayleigh–Ritz step and the certificate's
    residuals multiply ``C`` itself (its missed-value check multiplies the formed ``C^T C`` too:
    ``certify(gram=...)``).
    """
    import scipy.sparse as sp

    M: Any = getattr(C, "M", None)
    if getattr(C, "columns", None) is None or not sp.issparse(M) or M.format not in ("csr", "csc") or M.nnz == 0:
        return None
    rows = int(M.shape[0])
    per_row = np.diff(M.indptr) if M.format == "csr" else np.bincount(M.indices, minlength=rows)
    if float(np.square(per_row, dtype=np.float64).sum()) > GRAM_BOUND * M.nnz:
        return None
    G = (M.T @ M).tocsr()
    if G.nnz > GRAM_NNZ * M.nnz:
        return None
    return vector_product(G)


class _SparseProducts:
    """A SciPy sparse matrix under the :class:`~truncpinv.LinearOperator` protocol, with no adapter layers
    (one column at a time through :func:`vector_product`)."""

    def __init__(self, M: Any, dtype: torch.dtype) -> None:
        self.M, self.MT, self.dtype = M, M.T, dtype
        self.shape = (int(M.shape[0]), int(M.shape[1]))
        self.device = torch.device("cpu")
        self._mv, self._rmv = vector_product(self.M), vector_product(self.MT)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._product(self.M, self._mv, X)

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self._product(self.MT, self._rmv, Y)

    @staticmethod
    def _product(M: Any, mv: Any, X: torch.Tensor) -> torch.Tensor:
        x = X.numpy()
        if x.shape[1] == 1:
            return torch.from_numpy(mv(x[:, 0])[:, None])
        return torch.from_numpy(np.asarray(M @ x))


class _Counted:
    """``M`` (SciPy sparse matrix, NumPy array or SciPy ``LinearOperator``) with ``@`` and ``.T``, counting
    the columns multiplied by ``M`` or ``M^T`` (``stats["matvecs"]``) in a counter that ``.T`` shares; no
    ``LinearOperator`` layers between ARPACK and a sparse kernel."""

    def __init__(self, M: Any, MT: Any = None, columns: list[int] | None = None) -> None:
        self.M, self.MT = M, (M.T if MT is None else MT)
        self.shape, self.dtype = (int(M.shape[0]), int(M.shape[1])), M.dtype
        self.columns = [0] if columns is None else columns
        self._mv = vector_product(M)

    @property
    def T(self) -> _Counted:
        return _Counted(self.MT, self.M, self.columns)

    def __matmul__(self, X: np.ndarray) -> np.ndarray:
        if X.ndim == 1:
            self.columns[0] += 1
            return self._mv(X)
        self.columns[0] += int(X.shape[1])
        return np.asarray(self.M @ X)

    def linear_operator(self) -> Any:
        """The same products as a SciPy ``LinearOperator`` (for ``svds``)."""
        from scipy.sparse.linalg import LinearOperator as SpLinOp

        mm, rmm = self.__matmul__, self.T.__matmul__
        return SpLinOp(self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=self.dtype)


def svds_serves(A: torch.Tensor | LinearOperator) -> bool:
    """Whether ``svds`` serves ``A`` (as prepared by ``factorize``) on the CPU: a SciPy sparse matrix or
    ``LinearOperator``, or a matrix-free torch operator on the CPU (a ``TensorOperator`` over a sparse or
    dense tensor, a ``CallableOperator``, any protocol object), whose products ``svds`` calls
    one vector at a time. A dense tensor is not (the dense solvers serve it), nor a CUDA operator (each
    of ARPACK's products would cross to the CPU and back)."""
    if isinstance(A, torch.Tensor):
        return False
    inner = A.op if isinstance(A, FiniteCheckedOperator) else A
    return isinstance(inner, ScipyOperator) or A.device.type == "cpu"
