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

:class:`DampedGram` takes the eigenvalues only (``eigvalsh``: the same spectrum, rank and cut-off as the
exact path, for ``opt.last_step``) and solves by Cholesky; each retry with a larger damping is one more
Cholesky. The two directions differ by the components the truncation drops,
:math:`d^{c}_\lambda - d_\lambda = M^\top P_{drop}\, y`, whose norm is at most
:math:`\sqrt{\lambda_{drop}}\,\|y\|` (:math:`\lambda_{drop}`: the largest dropped eigenvalue). A direction is
taken from the Cholesky solve only when that bound, plus the solve's own rounding
(:math:`m\,\epsilon_{64}(\lambda_1+\lambda)/(2\sqrt\lambda)\,\|y\|`, from its backward error), is at most
:data:`ACCURACY` :math:`= m\,\epsilon` of ``M``'s dtype times :math:`\|d\| = \sqrt{y^\top K y}`: the rounding
of the exact path's own products of length ``m`` in that dtype. So the step is the exact path's to its
round-off, or it *is* the exact path's: any other try (the bound fails, the Cholesky factorisation fails,
a kept eigenvalue lies within the eigensolver's accuracy of the cut-off) computes the eigenvectors then, as
before, and so does every use of the factors (``F.U``, ``F.V``, ``F @ b``).

Where it pays and where it does not: the dropped eigenvalues of float32 Jacobians are round-off
(:math:`\lambda_{drop} \lesssim m\,\epsilon_{64}\lambda_1`), so the bound holds while the damping is a fair
fraction of :math:`\lambda_1` (the loss rule's floor ``0.1``). A float64 ``M`` asks for
:math:`m\,\epsilon_{64}` accuracy, which round-off eigenvalues of size :math:`\epsilon_{64}\lambda_1`
(contributing :math:`\sqrt{\epsilon_{64}}`) never meet: float64 keeps the exact path.
And a residual whose weight lies on an eigenvalue between round-off and the cut-off (seen on the MNIST MLP:
the two directions then differ by more than the step itself) fails the bound and gets the exact path.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import truncpinv
from truncpinv import TruncatedPinv
from truncpinv._gram import PARTIAL_MIN_ROWS, _singular_values
from truncpinv._tolerance import make_tolerance

__all__ = ["MIN_DAMPING", "NAME", "DampedGram", "accuracy", "applies", "factorize_damped"]

#: ``stats["method"]`` of a :class:`DampedGram` (``stats["solver"]`` is ``"from_gram"``, as the exact path's).
NAME = "eigvalsh+cholesky"
_EPS64 = float(torch.finfo(torch.float64).eps)
#: The smallest damping floor (relative to :math:`\sigma_1^2`) served. A residual's weight outside the kept values
#: enters :math:`\|y\|` as :math:`1/\lambda`, so below this floor the bound rarely holds and the eigenvalues and
#: the Cholesky factorisation would be computed for nothing (Levenberg--Marquardt's floor ``1e-12`` keeps the
#: exact path; the loss rule's ``0.1`` is served).
MIN_DAMPING = 1e-3


def accuracy(m: int, dtype: torch.dtype) -> float:
    """The relative accuracy a Cholesky direction must certify: ``m * eps(dtype)`` (the module docstring)."""
    return m * float(torch.finfo(dtype).eps)


def applies(M: Any, solver: truncpinv.Solver, *, rank: int | None, damping: float | None) -> bool:
    """Whether :func:`factorize_damped` may serve ``M``: a Gram operator (``M.gram``) of a float32 Jacobian, an
    exact solver (``Auto``, ``DenseSVD``, ``GramEigen``) whose path is the full eigendecomposition, no rank cap
    below ``min(m, n)``, and a damping floor ``damping`` (the smallest the step control will try) of at least
    :data:`MIN_DAMPING`."""
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
    M: Any, solver: truncpinv.Solver, *, rank: int | None, rtol: float | None, atol: float
) -> DampedGram | None:
    r"""The eigenvalues of ``K = M.gram`` and a :class:`DampedGram` for Cholesky directions; ``None`` if ``K`` or its
    spectrum is not finite (the exact path then reports why), or if no direction can be certified: nothing is
    kept, or a dropped eigenvalue exceeds :math:`(\text{accuracy})^2 \lambda_1`, where the bound fails for any
    ``R`` (:math:`\|d\| \le \sigma_1 \|y\|`)."""
    K = M.gram.to(torch.float64)
    try:
        lam = torch.linalg.eigvalsh(K).flip(0)
    except torch.linalg.LinAlgError:
        return None
    m, n = int(M.shape[0]), int(M.shape[1])
    try:
        S = _singular_values(lam, min(m, n), eps_k=_EPS64, side=max(m, n), exact=True)
    except ValueError:
        return None
    tol = make_tolerance((m, n), M.dtype, rank=rank, rtol=rtol, atol=atol)
    D = DampedGram(K, lam, S.to(M.dtype), M, tol=tol, solver=solver, rank=rank, rtol=rtol, atol=atol)
    if D._drop is None or D._drop > accuracy(m, M.dtype) ** 2 * float(lam[0]):
        return None
    return D


class DampedGram(TruncatedPinv):
    r"""The exact Gram factorisation of ``M`` with its eigenvectors formed on first use, and certified Cholesky
    directions (module docstring).

    ``S``, ``singular_values``, ``rank`` and ``cutoff`` are the exact path's (the eigenvalues of ``K``, computed
    alone). :meth:`damped_direction` and :meth:`model_change` are the Cholesky path; the factors (``U``, ``V``,
    ``F @ b`` and everything built on them) come from :func:`truncpinv.pinv_from_gram` on first access, which
    then also supplies ``S``, ``rank`` and ``cutoff`` (equal to round-off).
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
    ) -> None:
        # (no TruncatedPinv.__init__: the factors it stores are the exact path's, formed on demand by __getattr__)
        self._K, self._lam, self._S, self._M = K, lam, S, M
        self._rank, self._rtol, self._atol, self._solver = rank, rtol, atol, solver
        self._exact: TruncatedPinv | None = None
        self._cache: dict[float, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self.tol, self.shape, self.numpy_out, self._source = tol, (int(M.shape[0]), int(M.shape[1])), False, None
        self.rank, self.cutoff = tol.keep(S)
        self.stats: dict[str, Any] = {"solver": "from_gram", "method": NAME, "matvecs": 0, "iterations": 1}
        self._drop = self._dropped()

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

    def _dropped(self) -> float | None:
        r"""A bound on every eigenvalue the exact path may drop (``None``: it keeps none, ``rank == 0``).

        The exact path keeps :math:`\lambda_i > t^2`, :math:`t = \max(\text{cutoff}, \text{floor})` (the Gram
        route's zero floor :math:`\sqrt{m' \epsilon_{64}}\,\sigma_1`, :math:`m' = \max(m, n)`), judged on its own
        eigenvalues, which are backward stable to :math:`\delta = m\,\epsilon_{64}\lambda_1`, with
        :math:`\sigma_i` rounded to ``M``'s dtype. So it may drop any :math:`\lambda_i \le t^2(1 + 4\epsilon)^2 +
        \delta`, besides those below the rank; their largest, plus :math:`\delta`, bounds them (a value in that
        tie band is often round-off at the floor, whose damped component is round-off too).
        """
        lam, (m, n), r = self._lam, self.shape, self.rank
        lam1 = float(lam[0])
        if r == 0 or not lam1 > 0:
            return None
        delta = m * _EPS64 * lam1
        t = max(self.cutoff, math.sqrt(_EPS64 * max(m, n) * lam1)) * (1.0 + 4.0 * float(torch.finfo(self.dtype).eps))
        tied = lam[:r][lam[:r] <= t * t + delta]
        drop = max(float(lam[r]) if r < m else 0.0, float(tied[0]) if tied.numel() else 0.0, 0.0)
        return drop + delta

    def _solve(self, R: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(R, d, y)`` for :math:`(K + \\lambda I) y = R` (``d``: ``None`` when not certified), cached by damping."""
        hit = self._cache.get(damping)
        if hit is not None and hit[0] is R:
            return hit
        K, lam1 = self._K, float(self._lam[0])
        lam_abs = damping * lam1
        R64 = R.to(torch.float64)
        L, info = torch.linalg.cholesky_ex(K + lam_abs * torch.eye(K.shape[0], dtype=K.dtype, device=K.device))
        d: torch.Tensor | None = None
        y = R64.new_zeros(R64.shape)
        if int(info) == 0:
            y = torch.cholesky_solve(R64[:, None], L)[:, 0]
            if self._certified(y, R64, lam_abs):
                M = self._M
                d = M.rmatmat(y.to(M.dtype)[:, None])[:, 0]
        self._cache = {damping: (R, d, y)}
        return R, d, y

    def _certified(self, y: torch.Tensor, R64: torch.Tensor, lam_abs: float) -> bool:
        """The bound of the module docstring: the dropped components and the rounding within :func:`accuracy`."""
        drop = self._drop
        if drop is None or not lam_abs > 0:
            return False
        m, lam1 = self.shape[0], float(self._lam[0])
        ynorm = float(torch.linalg.vector_norm(y))
        dnorm2 = float(y @ (self._K @ y))  # ||M^T y||^2 = y^T K y
        if not (math.isfinite(ynorm) and math.isfinite(dnorm2)):
            return False
        rounding = m * _EPS64 * (lam1 + lam_abs) / (2.0 * math.sqrt(lam_abs))
        return (math.sqrt(drop) + rounding) * ynorm <= accuracy(m, self.dtype) * math.sqrt(max(dnorm2, 0.0))

    def damped_direction(self, R: torch.Tensor, damping: float) -> torch.Tensor | None:
        r""":math:`d_\lambda = M^\top (K + \lambda I)^{-1} R` with :math:`\lambda = \text{damping}\cdot\lambda_1`, in
        ``M``'s dtype; ``None`` where the exact path must give it (not certified, or already formed)."""
        if self._exact is not None or not damping > 0:
            return None
        return self._solve(R, damping)[1]

    def model_change(self, R: torch.Tensor, damping: float) -> torch.Tensor | None:
        r""":math:`M d_\lambda = K y` of :meth:`damped_direction`'s direction (``None`` where it gave none)."""
        if self._exact is not None or not damping > 0:
            return None
        _, d, y = self._solve(R, damping)
        return None if d is None else (self._K @ y).to(self.dtype)

    def gradient_cosine(self, R: torch.Tensor) -> torch.Tensor:
        r""":math:`\|M^\top R\| / (\sigma_{max}\|R\|)` with :math:`\|M^\top R\|^2 = R^\top K R` (no eigenvectors)."""
        R64 = R.to(torch.float64)
        g2, r = float(R64 @ (self._K @ R64)), float(torch.linalg.vector_norm(R64))
        s1 = math.sqrt(max(float(self._lam[0]), 0.0))
        return torch.tensor(math.sqrt(max(g2, 0.0)) / (s1 * r) if s1 * r > 0 else 0.0, dtype=R.dtype)
