r"""The damped step through the Gram route by a Cholesky factorisation, certified against the exact eigensolution.

A damped step control (:class:`sven.control.Tikhonov`, :class:`sven.control.AdaptiveDamping`,
:class:`sven.control.CrossEntropyDamping`: the loss rule's) applies, for each damping
:math:`\lambda = \text{damping}\cdot\lambda_1` it tries, the filtered direction of the kept part
:math:`M_r = U_r \Sigma_r V_r^\top` of :math:`M` (``m x n``, Gram matrix :math:`K = M M^\top = U \Lambda U^\top`),

.. math::

    d_\lambda = V_r \frac{\Sigma_r}{\Sigma_r^2 + \lambda} U_r^\top R
    = M^\top U_r (\Lambda_r + \lambda)^{-1} U_r^\top R .

The exact path (:func:`truncpinv.pinv_from_gram`) finds :math:`U` by the full eigendecomposition of
:math:`K` (LAPACK's divide and conquer, :math:`O(m^3)` with the vectors). Without truncation the same
direction is one Cholesky solve, with no eigenvectors:

.. math::

    d^{c}_\lambda = M^\top y, \qquad (K + \lambda I)\, y = R, \qquad
    M d^{c}_\lambda = K y \quad\text{(the control's prediction, no product with } M\text{)} .

:class:`DampedGram` takes the eigenvalues only (:class:`Tridiagonal`: the same spectrum, rank and cut-off as the
exact path, for ``opt.last_step``) and solves by Cholesky; each retry with a larger damping is one more
Cholesky. The two directions differ by the components the truncation drops,
:math:`d^{c}_\lambda - d_\lambda = M^\top P_{drop}\, y`, whose norm is at most
:math:`\sqrt{\lambda_{drop}}\,\|y\|` (:math:`\lambda_{drop}`: the largest dropped eigenvalue). Dropped values
that are round-off (:math:`\lambda \lesssim m\,\epsilon_{64}\lambda_1`: most of them, ``K``'s null space)
enter that bound; the few above round-off (values between it and the cut-off, where a residual's weight can
make the two directions differ by more than the step itself: seen on the MNIST MLP) are deflated, their
eigenvectors alone computed (:class:`DampedGram`). A direction is taken from the Cholesky solve only when the
bound, plus the solve's own rounding (:math:`m\,\epsilon_{64}(\lambda_1+\lambda)/(2\sqrt\lambda)\,\|y\|`, from
its backward error), is at most :func:`accuracy` :math:`= m\,\epsilon` of ``M``'s dtype times
:math:`\|d\| = \sqrt{y^\top K y}`: the rounding of the exact path's own products of length ``m`` in that dtype.
So the step is the exact path's to its round-off, or it *is* the exact path's: any other try (the bound
fails, the Cholesky factorisation fails, an eigenvalue lies within the eigensolver's accuracy of the cut-off,
more than :data:`BAND_MAX` values to deflate) computes the eigenvectors then, as before, and so does every
use of the factors (``F.U``, ``F.V``, ``F @ b``).

**Nothing to cut** (``untruncated=True``: the loss rule's GGN rows with the default ``rtol``,
:func:`sven.factorize.factorize`): the step is then :math:`d_\lambda = M^\top (K + \lambda I)^{-1} R` by
definition, every direction damped and none dropped, Levenberg--Marquardt's. :class:`Untruncated` needs no
spectrum at all, only :math:`\lambda_1` for the damping's scale (:func:`top_eigenvalue`, Lanczos on ``K``: a few
dozen products with the ``m x m`` matrix against the reduction's :math:`\tfrac43 m^3` flops, the spectrum and the
band). Directions ``K`` cannot resolve (its round-off, :math:`\lambda \lesssim \max(m, n)\,\epsilon_{64}
\lambda_1`) enter damped, at most :math:`\sqrt{\max(m,n)\,\epsilon_{64}}\,\sigma_1/\lambda` times their
residual: the bound then holds only the solve's rounding. What the factors serve stays the exact path's, with
the default cut.

Where it pays and where it does not: with float32 Jacobians the round-off eigenvalues contribute about
:math:`\sqrt{m\,\epsilon_{64}}\,\sigma_1\|y\|`, below :math:`m\,\epsilon_{32}\|d\|` while the damping is a
fair fraction of :math:`\lambda_1` (the loss rule's floor ``0.1``). A float64 ``M`` asks for
:math:`m\,\epsilon_{64}` accuracy, which those contributions of :math:`\sqrt{\epsilon_{64}}` never meet:
float64 keeps the exact path.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
import torch

import truncpinv
from truncpinv import TruncatedPinv
from truncpinv._gram import PARTIAL_MIN_ROWS, _singular_values
from truncpinv._tolerance import make_tolerance

from ._arrays import finite_array

__all__ = [
    "BAND_MAX", "MIN_DAMPING", "NAME", "UNTRUNCATED", "DampedGram", "Tridiagonal", "Untruncated", "accuracy",
    "applies", "factorize_damped", "top_eigenvalue",
]  # fmt: skip

#: ``stats["method"]`` of a :class:`DampedGram` (``stats["solver"]`` is ``"from_gram"``, as the exact path's).
NAME = "eigvalsh+cholesky"
#: ``stats["method"]`` of an :class:`Untruncated` factorisation: :math:`\lambda_1` by Lanczos, directions by Cholesky.
UNTRUNCATED = "lanczos+cholesky"
#: :func:`top_eigenvalue` stops when the top Ritz pair's residual is at most this fraction of its value.
LANCZOS_RTOL = 1e-6
_EPS64 = float(torch.finfo(torch.float64).eps)
#: At most this many dropped eigenvalues above round-off are deflated (their eigenvectors computed); more: the
#: exact path. On the MNIST MLP (128 rows) up to 25 occur, in about one step in eight; their vectors
#: (:meth:`Tridiagonal.band`) cost a fraction of the exact path's full eigendecomposition there, which a bound
#: of 16 sent those steps to after the spectrum had been computed for nothing.
BAND_MAX = 48
#: The smallest damping floor (relative to :math:`\sigma_1^2`) served. A residual's weight on the round-off
#: eigenvalues enters :math:`\|y\|` as :math:`1/\lambda`, so at small dampings the bound fails unless ``R`` is
#: nearly orthogonal to them, and the eigenvalues would be computed for nothing. Not tuned: the loss rule's floor
#: ``0.1`` is served, Levenberg--Marquardt's ``1e-12`` (residual mode's default) is not.
MIN_DAMPING = 1e-3


def accuracy(m: int, dtype: torch.dtype) -> float:
    """The relative accuracy a Cholesky direction must certify: ``m * eps(dtype)`` (the module docstring)."""
    return m * float(torch.finfo(dtype).eps)


def applies(M: Any, solver: truncpinv.Solver, *, rank: int | None, damping: float | None) -> bool:
    """Whether :func:`factorize_damped` may serve ``M``: a Gram operator (``M.gram``, on the CPU) of a float32
    Jacobian, an exact solver (``Auto``, ``DenseSVD``, ``GramEigen``) whose path is the full eigendecomposition,
    no rank cap below ``min(m, n)``, and a damping floor ``damping`` (the smallest the step control will try) of
    at least :data:`MIN_DAMPING`."""
    if isinstance(M, torch.Tensor) or not hasattr(M, "gram") or damping is None or not damping >= MIN_DAMPING:
        return False
    if getattr(M, "dtype", None) != torch.float32 or not isinstance(solver, (truncpinv.Auto, truncpinv.DenseSVD,
                                                                              truncpinv.GramEigen)):  # fmt: skip
        return False
    m, n = int(M.shape[0]), int(M.shape[1])
    if rank is not None and rank < min(m, n):
        return False
    partial = isinstance(solver, truncpinv.Auto) and m >= PARTIAL_MIN_ROWS  # (its Lanczos path)
    return not partial and M.gram.device.type == "cpu"


def factorize_damped(
    M: Any, solver: truncpinv.Solver, *, rank: int | None, rtol: float | None, atol: float, untruncated: bool = False
) -> DampedGram | None:
    r"""The eigenvalues of ``K = M.gram`` and a :class:`DampedGram` for Cholesky directions; ``None`` if ``K`` or its
    spectrum is not finite (the exact path then reports why), or if no direction can be certified
    (:meth:`DampedGram.certifiable`: nothing kept, a value at the cut-off, too many dropped values above round-off,
    or a remaining dropped eigenvalue above :math:`(\text{accuracy})^2 \lambda_1`, where the bound fails for any
    ``R`` because :math:`\|d\| \le \sigma_1 \|y\|`).

    ``untruncated``: nothing is cut from the Cholesky directions (an :class:`Untruncated`, :math:`\lambda_1` alone);
    ``rank``, ``rtol`` and ``atol`` are then the exact path's, for whatever the factors serve (``None`` if ``K`` is
    not finite or zero)."""
    K = M.gram
    K = K if K.dtype == torch.float64 and K.is_contiguous() else K.to(torch.float64).contiguous()
    if untruncated:  # nothing to cut: lambda_1 alone
        lam1 = top_eigenvalue(K.numpy())
        if not (math.isfinite(lam1) and lam1 > 0):
            return None
        return Untruncated(K, lam1, M, solver=solver, rank=rank, rtol=rtol, atol=atol)
    tri = Tridiagonal.of(K.numpy())
    if tri is None:
        return None
    lam = torch.from_numpy(tri.eigenvalues())
    m, n = int(M.shape[0]), int(M.shape[1])
    try:
        S = _singular_values(lam, min(m, n), eps_k=_EPS64, side=max(m, n), exact=True)
    except ValueError:
        return None
    tol = make_tolerance((m, n), M.dtype, rank=rank, rtol=rtol, atol=atol)
    D = DampedGram(K, lam, S.to(M.dtype), M, tol=tol, solver=solver, rank=rank, rtol=rtol, atol=atol, tri=tri)
    return D if D.certifiable() else None


def top_eigenvalue(K: np.ndarray) -> float:
    r"""The largest eigenvalue of the symmetric float64 ``K`` (``m x m``) by Lanczos with full reorthogonalisation.

    From a fixed random start (the same for every ``K`` of a size), the Krylov basis :math:`Q_j` of ``K`` grows one
    vector per product, orthogonalised against all before it (twice where the first pass cancels most of it),
    and :math:`T_j = Q_j^\top K Q_j` is tridiagonal. Every fourth step from the eighth, the largest eigenvalue
    :math:`\theta` of :math:`T_j` and its unit vector :math:`s` give the residual
    :math:`\|K Q_j s - \theta Q_j s\| = \beta_j |s_j|`. Lanczos stops when it is at most :data:`LANCZOS_RTOL`
    :math:`\theta`: some eigenvalue lies within it of :math:`\theta`, and :math:`\theta \le \lambda_1` (a
    Rayleigh quotient), so :math:`\lambda_1 - \theta \le \beta_j |s_j|`, and
    :math:`\le (\beta_j s_j)^2 / \text{gap}` once :math:`\lambda_1` is isolated (at most ``1e-12`` relative on
    the Gram matrices of three sven-bench classifiers, 300 steps, after 8-24 products, median 12). It stops too at
    ``j = m`` or where :math:`\beta_j` is at most that fraction of the largest diagonal entry of :math:`T_j` (itself
    at most :math:`\theta`): an invariant subspace to round-off. ``NaN`` if ``K`` is not finite.
    """
    m = K.shape[0]
    if not finite_array(K):
        return math.nan
    if m == 1:
        return float(K[0, 0])
    Q = np.empty((m, m))  # rows: the Lanczos vectors
    Q[0] = _lanczos_start(m)
    a, b = np.zeros(m), np.zeros(m)  # T's diagonal and off-diagonal
    theta = scale = 0.0
    for j in range(m):
        v = K @ Q[j]
        before = math.sqrt(float(v @ v))
        c = Q[: j + 1] @ v
        v -= c @ Q[: j + 1]
        beta = math.sqrt(float(v @ v))
        if beta < 0.7 * before:  # cancellation: once more ("twice is enough", Kahan--Parlett), or Q drifts
            c2 = Q[: j + 1] @ v
            v -= c2 @ Q[: j + 1]
            c += c2
            beta = math.sqrt(float(v @ v))
        a[j] = c[j]
        scale = max(scale, float(c[j]))  # theta >= every diagonal entry of T
        small = beta <= LANCZOS_RTOL * scale  # (so is the residual: an invariant subspace, to round-off)
        if ((j + 1) % 4 == 0 and j >= 7) or j + 1 == m or small:
            theta, last = _top_ritz(a[: j + 1], b[:j])
            if small or beta * last <= LANCZOS_RTOL * abs(theta):
                break
        if j + 1 < m:
            b[j] = beta
            Q[j + 1] = v / beta
    return theta


def _top_ritz(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The largest eigenvalue of the tridiagonal ``T`` (diagonal ``a``, off-diagonal ``b``) and the absolute last
    component of its unit eigenvector (LAPACK's ``dstev``; ``eigh`` of the dense ``T`` took twice as long)."""
    if a.shape[0] == 1:
        return float(a[0]), 1.0
    w, z, info = scipy.linalg.lapack.dstev(a, b, compute_v=1)
    if info != 0:  # (QL did not converge: the dense solver)
        w, z = np.linalg.eigh(np.diag(a) + np.diag(b, 1) + np.diag(b, -1))
    return float(w[-1]), abs(float(z[-1, -1]))


_STARTS: dict[int, np.ndarray] = {}


def _lanczos_start(m: int) -> np.ndarray:
    """A fixed unit vector of length ``m`` drawn once from a seeded normal distribution (deterministic steps)."""
    q = _STARTS.get(m)
    if q is None:
        q = np.random.default_rng(0x5E7E).standard_normal(m)
        q /= np.linalg.norm(q)
        _STARTS[m] = q
    return q


class Tridiagonal:
    r"""The Householder tridiagonalisation :math:`K = Q T Q^\top` (LAPACK's ``dsytrd``), shared by the spectrum
    and the eigenvectors of a few eigenvalues, so that ``K`` is reduced once.

    ``eigvalsh`` is this reduction (:math:`\tfrac43 m^3` flops) followed by ``dsterf``'s QR sweeps on
    :math:`T`, and the interval driver ``syevr`` starts with the same reduction: :class:`DampedGram` used to
    pay it twice, once for the spectrum and once for the deflated band. Here the spectrum is ``dsterf`` of
    :math:`T` (``dstemr``'s dqds where it fails; on the Gram matrices of the four sven-bench classifiers,
    ``m = 128``, ``dstemr`` took 1.6-1.9x ``dsterf``'s time per new :math:`T`, medians). A band's vectors are
    inverse iteration on :math:`T` (``dstein``) at those eigenvalues (no bisection: ``dstebz`` only where
    :math:`T` splits into blocks, whose numbering ``dstein`` needs), taken back by :math:`Q` (``dormqr`` on
    the reflectors below the subdiagonal, as ``dormtr`` applies them). The eigenvalues are accurate to the
    reduction's backward error :math:`O(m\,\epsilon_{64}\lambda_1)`, as ``eigvalsh``'s, and the vectors are
    judged a posteriori anyway (the residual and orthonormality terms of :meth:`DampedGram._plan`).
    """

    def __init__(self, reflectors: np.ndarray, d: np.ndarray, e: np.ndarray, tau: np.ndarray) -> None:
        self.reflectors, self.d, self.e, self.tau = reflectors, d, e, tau
        self._ascending: np.ndarray | None = None  # the spectrum of :meth:`eigenvalues`, ascending, once computed

    @classmethod
    def of(cls, K: np.ndarray) -> Tridiagonal | None:
        """The reduction of the symmetric float64 ``K`` (its lower triangle; ``K`` is not changed), or ``None``
        if it is not finite or LAPACK fails."""
        c, d, e, tau, info = scipy.linalg.lapack.dsytrd(K, lower=1)
        if info != 0 or not (np.isfinite(d).all() and np.isfinite(e).all()):
            return None
        return cls(c, d, e, tau)

    def eigenvalues(self) -> np.ndarray:
        """All eigenvalues of ``K``, descending: ``dsterf`` (:math:`O(m^2)`); ``dstemr`` without vectors (its dqds)
        where it fails; ``NaN`` where neither converged."""
        m = self.d.shape[0]
        if m == 1:  # (T is K; SciPy's wrappers refuse the empty off-diagonal)
            return self.d.copy()
        w, info = scipy.linalg.lapack.dsterf(self.d, self.e)
        if info != 0:
            k, w, _, info = scipy.linalg.lapack.dstemr(self.d, np.append(self.e, 0.0), 0, 0.0, 0.0, 0, 0, compute_v=0)
            if info != 0 or k != m:
                return np.full_like(self.d, np.nan)
        self._ascending = np.sort(w[:m])
        return np.ascontiguousarray(self._ascending[::-1])

    def band(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The eigenvalues ``first .. first + count - 1`` of the descending order (ascending) and their
        orthonormal eigenvectors ``(m, count)``; ``None`` if LAPACK fails."""
        m = self.d.shape[0]
        if m == 1:  # (T is K, its eigenvector 1; SciPy's wrappers refuse the empty off-diagonal)
            return self.d.copy(), np.ones((1, 1))
        il, iu = m - first - count + 1, m - first  # (1-based, ascending)
        if self._ascending is not None and not self._splits():
            # the values are known (to the reduction's accuracy, as bisection's): one block, no bisection
            w, k = self._ascending[il - 1 : iu], count
            iblock, isplit = np.ones(m, dtype=np.int32), np.zeros(m, dtype=np.int32)
            isplit[0] = m
        else:
            k, w, iblock, isplit, info = scipy.linalg.lapack.dstebz(self.d, self.e, 3, 0.0, 0.0, il, iu, 0.0, "B")
            if info != 0 or k != count:
                return None
        z, info = scipy.linalg.lapack.dstein(self.d, self.e, w[:k], iblock, isplit)
        if info != 0:
            return None
        W = np.empty((m, k))
        W[0] = z[0]
        W[1:], _, info = scipy.linalg.lapack.dormqr("L", "N", self.reflectors[1:, : m - 1], self.tau, z[1:],
                                                    lwork=max(1, 64 * k))  # fmt: skip
        if info != 0:
            return None
        order = np.argsort(w[:k])
        return w[:k][order], W[:, order]

    def _splits(self) -> bool:
        """Whether ``dstebz`` would split :math:`T` into blocks: an off-diagonal with
        :math:`e_j^2 < \text{ulp}^2 |d_j d_{j+1}| + \text{safmin}` (its criterion; ``dstein`` then needs the
        blocks' numbering, which only ``dstebz`` gives)."""
        ulp, safmin = np.finfo(np.float64).eps, np.finfo(np.float64).tiny  # (dlamch's 'P' and 'S')
        return bool(np.any(self.e**2 < ulp**2 * np.abs(self.d[:-1] * self.d[1:]) + safmin))


class DampedGram(TruncatedPinv):
    r"""The exact Gram factorisation of ``M`` with its eigenvectors formed on first use, and certified Cholesky
    directions (module docstring).

    ``S``, ``singular_values``, ``rank`` and ``cutoff`` are the exact path's (the eigenvalues of ``K``, computed
    alone). :meth:`damped_direction` and :meth:`model_change` are the Cholesky path; the factors (``U``, ``V``,
    ``F @ b`` and everything built on them) come from :func:`truncpinv.pinv_from_gram` on first access, which
    then also supplies ``S``, ``rank`` and ``cutoff`` (equal to round-off).

    **The dropped values above round-off** (a residual's weight on them can make the Cholesky direction differ
    from the exact one by more than the step itself: seen on the MNIST MLP) are deflated: their eigenvectors
    :math:`W` alone (:meth:`Tridiagonal.band`, from the reduction the spectrum was computed from, at most
    :data:`BAND_MAX` of them) and
    :math:`y \leftarrow y - W W^\top y`. The bound then holds the remaining dropped values (round-off) and the
    angle :math:`\theta` between :math:`W` and the exact eigenvectors, by Davis--Kahan
    :math:`\sin\theta \le \|K W - W \mathrm{M}\|_F / \text{gap}` (:math:`\mathrm{M}` the computed values, gap
    their distance from the other eigenvalues) plus the loss of orthonormality :math:`\|W^\top W - I\|_F`:
    :math:`\|d - d^\star\| \le (2\sigma_1\theta + \sqrt{\lambda_{rest}} + \text{rounding})\,\|y\|`.
    """

    _LAZY = frozenset({"_U", "_V", "_op", "_squares_safe"})

    def __init__(
        self,
        K: torch.Tensor,
        lam: torch.Tensor,
        S: torch.Tensor,
        M: Any,
        *,
        tol: Any,
        solver: truncpinv.Solver,
        rank: int | None,
        rtol: float | None,
        atol: float,
        tri: Tridiagonal | None,
    ) -> None:
        # (no TruncatedPinv.__init__: the factors it stores are the exact path's, formed on demand by __getattr__)
        self._K, self._lam, self._S, self._M = K, lam, S, M
        self._Kn, self._lamn = K.numpy(), lam.numpy()
        self._rank, self._rtol, self._atol, self._solver = rank, rtol, atol, solver
        self._exact: TruncatedPinv | None = None
        self._cache: tuple[float, torch.Tensor, torch.Tensor | None, np.ndarray, np.ndarray] | None = None
        self.tol, self.shape, self.numpy_out, self._source = tol, (int(M.shape[0]), int(M.shape[1])), False, None
        self.rank, self.cutoff = 0, 0.0  # (set by _plan)
        self.stats: dict[str, Any] = {"solver": "from_gram", "method": NAME, "matvecs": 0, "iterations": 1}
        self._W: np.ndarray | None = None
        self._rest, self._theta = math.inf, math.inf
        self._tri = tri
        self._plan()

    def __getattr__(self, name: str) -> Any:
        if name in DampedGram._LAZY:  # the factors: the exact path's
            return getattr(self.exact(), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def dtype(self) -> torch.dtype:
        return self._S.dtype

    @property
    def device(self) -> torch.device:
        return self._S.device

    def exact(self) -> TruncatedPinv:
        """The exact path's factorisation (:func:`truncpinv.pinv_from_gram`), computed once; it also replaces
        ``S``, ``rank`` and ``cutoff`` (and the directions are its own from then on)."""
        if self._exact is None:
            F = truncpinv.pinv_from_gram(self._K, self._M, rank=self._rank, rtol=self._rtol, atol=self._atol,
                                         check_finite=False, solver=self._solver)  # fmt: skip
            self._exact, self._S, self.rank, self.cutoff = F, F._S, F.rank, F.cutoff
            self.stats = dict(F.stats)
        return self._exact

    def certifiable(self) -> bool:
        """Whether some ``R`` can get a certified direction (the static part of the bound)."""
        lam1 = float(self._lamn[0])
        return self._rest + 4.0 * lam1 * self._theta**2 <= accuracy(self.shape[0], self.dtype) ** 2 * lam1

    def _plan(self) -> None:
        r"""Which dropped eigenvalues to deflate, their eigenvectors, and the terms of the bound (class docstring).

        The exact path keeps :math:`\lambda_i > t^2`, :math:`t = \max(\text{cutoff}, \text{floor})` (the Gram
        route's zero floor :math:`\sqrt{m' \epsilon_{64}}\,\sigma_1`, :math:`m' = \max(m, n)`), judged on its own
        eigenvalues, which are backward stable to :math:`\delta = m\,\epsilon_{64}\lambda_1`, with
        :math:`\sigma_i` rounded to ``M``'s dtype: a value within that of :math:`t^2` is a tie, left to the exact
        path. Dropped values above :math:`\tau = \max(4\delta, (\text{accuracy}/64)^2\lambda_1)` are deflated;
        the largest of the rest, plus :math:`\delta`, is :math:`\lambda_{rest}`.
        """
        self.rank, self.cutoff = self.tol.keep(self._S)
        lam, (m, n), r = self._lamn, self.shape, self.rank
        lam1 = float(lam[0])
        if r == 0 or not lam1 > 0:
            return
        delta = m * _EPS64 * lam1
        t = max(self.cutoff, math.sqrt(_EPS64 * max(m, n) * lam1))
        e = 4.0 * float(torch.finfo(self.dtype).eps)
        if bool(np.any((lam >= (t * (1 - e)) ** 2 - delta) & (lam <= (t * (1 + e)) ** 2 + delta))):
            return
        tau = max(4.0 * delta, (accuracy(m, self.dtype) / 64.0) ** 2 * lam1)
        k = int(np.count_nonzero(lam[r:] > tau))
        if k > BAND_MAX:
            return
        below = float(lam[r + k]) if r + k < m else 0.0
        self._rest = max(below, 0.0) + delta
        if k == 0:
            self._theta = 0.0
            return
        got = self._tri.band(r, k) if self._tri is not None else None
        if got is None:
            return
        mu, W = got
        gap = min(float(lam[r - 1]) - float(mu.max()), float(mu.min()) - below)
        rho = float(np.linalg.norm(self._Kn @ W - W * mu))
        ortho = float(np.linalg.norm(W.T @ W - np.eye(k)))
        self._W, self._theta = W, (rho / gap if gap > 0 else math.inf) + ortho

    def _solve(self, R: torch.Tensor, damping: float) -> tuple[torch.Tensor | None, np.ndarray]:
        """``(d, y)``: :math:`(K + \\lambda I) y = R`, deflated; ``d = M^T y`` or ``None`` when not certified.
        The last one is cached with :math:`K y` (the certificate's, then the prediction's: :meth:`model_change`)."""
        c = self._cache
        if c is not None and c[0] == damping and (c[1] is R or torch.equal(c[1], R)):
            return c[2], c[3]
        lam1 = float(self._lamn[0])
        lam_abs = damping * lam1
        m = self.shape[0]
        A = self._Kn.copy()
        A.flat[:: m + 1] += lam_abs  # K + lambda I
        L, info = scipy.linalg.lapack.dpotrf(A, lower=1, clean=0, overwrite_a=1)
        d: torch.Tensor | None = None
        y = Ky = np.zeros(m)
        if info == 0:
            y, info = scipy.linalg.lapack.dpotrs(L, R.detach().cpu().numpy().astype(np.float64), lower=1)
            W = self._W
            if W is not None:
                y = y - W @ (W.T @ y)
            Ky = self._Kn @ y
            if info == 0 and self._certified(y, Ky, lam_abs):
                Mop = self._M
                d = Mop.rmatmat(torch.from_numpy(y).to(Mop.dtype)[:, None])[:, 0]
        self._cache = (damping, R, d, y, Ky)
        return d, y

    def _certified(self, y: np.ndarray, Ky: np.ndarray, lam_abs: float) -> bool:
        """The bound of the class docstring within :func:`accuracy` of :math:`\\|d\\| = \\sqrt{y^\\top K y}`."""
        m, lam1 = self.shape[0], float(self._lamn[0])
        ynorm, dnorm2 = float(np.linalg.norm(y)), float(y @ Ky)
        if not (math.isfinite(ynorm) and math.isfinite(dnorm2)) or not lam_abs > 0:
            return False
        rounding = m * _EPS64 * (lam1 + lam_abs) / (2.0 * math.sqrt(lam_abs))
        bound = 2.0 * math.sqrt(lam1) * self._theta + math.sqrt(self._rest) + rounding
        return bound * ynorm <= accuracy(m, self.dtype) * math.sqrt(max(dnorm2, 0.0))

    def damped_direction(self, R: torch.Tensor, damping: float) -> torch.Tensor | None:
        r""":math:`d_\lambda = M^\top (K + \lambda I)^{-1} R` with :math:`\lambda = \text{damping}\cdot\lambda_1`, in
        ``M``'s dtype, deflated; ``None`` where the exact path must give it (not certified, or already formed)."""
        if self._exact is not None or not damping > 0:
            return None
        return self._solve(R, damping)[0]

    def model_change(self, R: torch.Tensor, damping: float) -> torch.Tensor | None:
        r""":math:`M d_\lambda = K y` of :meth:`damped_direction`'s direction (``None`` where it gave none)."""
        if self._exact is not None or not damping > 0:
            return None
        d, _ = self._solve(R, damping)
        assert self._cache is not None  # (set by _solve, with K y)
        return None if d is None else torch.from_numpy(self._cache[4]).to(self.dtype)

    def gradient_cosine(self, R: torch.Tensor) -> torch.Tensor:
        r""":math:`\|M^\top R\| / (\sigma_{max}\|R\|)` with :math:`\|M^\top R\|^2 = R^\top K R` (no eigenvectors)."""
        r = R.detach().cpu().numpy().astype(np.float64)
        g2, rn = float(r @ (self._Kn @ r)), float(np.linalg.norm(r))
        s1 = math.sqrt(max(float(self._lamn[0]), 0.0))
        return torch.tensor(math.sqrt(max(g2, 0.0)) / (s1 * rn) if s1 * rn > 0 else 0.0, dtype=R.dtype)


class Untruncated(DampedGram):
    r"""The damped step with nothing cut: :math:`d_\lambda = M^\top (K + \lambda I)^{-1} R`,
    :math:`\lambda = \text{damping}\cdot\lambda_1`, by Cholesky for every try, with :math:`\lambda_1` from
    :func:`top_eigenvalue` and no other eigenvalue (module docstring, "Nothing to cut").

    ``singular_values`` (and ``S``) hold :math:`\sigma_1` alone, ``rank`` is ``min(m, n)`` (no direction is cut)
    and ``cutoff`` is 0. The bound of :meth:`DampedGram._certified` keeps only the solve's rounding: a direction
    fails it where ``R`` lies (to that rounding) in the null space of ``K``, and then, like every use of the factors
    (``F.U``, ``F.V``, ``F @ b``), comes from the exact path with the given ``rank``, ``rtol`` and ``atol``
    (:func:`truncpinv.pinv_from_gram`; the caller's numerically-zero cut): re-filtering its factors by
    ``F.solve`` divides their round-off by the kept values, which values at ``K``'s round-off would blow up.
    """

    def __init__(
        self, K: torch.Tensor, lam1: float, M: Any, *, solver: truncpinv.Solver, rank: int | None,
        rtol: float | None, atol: float,
    ) -> None:  # fmt: skip
        m, n = int(M.shape[0]), int(M.shape[1])
        lam, S = torch.tensor([lam1], dtype=torch.float64), torch.tensor([math.sqrt(lam1)], dtype=M.dtype)
        tol = make_tolerance((m, n), M.dtype, rank=rank, rtol=rtol, atol=atol)
        super().__init__(K, lam, S, M, tol=tol, solver=solver, rank=rank, rtol=rtol, atol=atol, tri=None)
        self.stats["method"] = UNTRUNCATED

    def _plan(self) -> None:
        """Nothing is dropped: no value to deflate and none left over (the bound holds only the rounding)."""
        self.rank, self.cutoff = min(self.shape), 0.0
        self._rest, self._theta = 0.0, 0.0
