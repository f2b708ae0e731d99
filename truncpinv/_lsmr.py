r"""LSMR: least squares by Golub–Kahan bidiagonalisation, without a factorisation (Fong & Saunders 2011).

A least-squares solve does not need the singular value decomposition. LSMR
builds the Krylov space :math:`\mathcal K_k(A^\top A, A^\top b)` with one product
by ``A`` and one by ``A^T`` per iteration, and takes the iterate

.. math::
    x_k = \arg\min_{x \in \mathcal K_k} \|A^\top (b - A x)\|
    \quad\text{(with damping: } \bar A = [A; \lambda I],\ \bar b = [b; 0]\text{)},

so that the normal-equations residual ``||A^T r_k||`` decreases monotonically.
Started at ``x_0 = 0``, every iterate lies in ``range(A^T)``, so the limit is
the **minimum-norm** least-squares solution ``A^+ b``: the same ``x`` as the
truncated pseudoinverse when no singular value of ``A`` falls in ``(0, cutoff]``.

**Stopping rules** (Fong & Saunders, with ``atol = btol = tol``), on LSMR's
own estimates of ``||r||``, ``||A^T r||``, ``||A||_F`` and ``cond(A)``:

1. ``||r|| <= tol (||b|| + ||A|| ||x||)``: a compatible system is solved;
2. ``||A^T r|| <= tol ||A|| ||r||``: the least-squares solution is found;
3. ``cond(A) >= conlim``: the Krylov space reached a singular value at or
   below ``sigma_max / conlim`` (default ``conlim = 1 / (max(m, n) eps)``,
   the reciprocal of the default truncation ``rtol``): ``A`` is numerically
   rank-deficient and the problem needs a truncation (an SVD solver) or damping.

**Certificate.** When rule 1 or 2 fires, the residual is recomputed with
explicit products (``r = b - A x`` accumulated in float64, then ``A^T r``) and
the backward error

.. math::
    \eta = \min\Big(\frac{\|\bar A^\top \bar r\|}{\|\bar A\|\,\|\bar r\|},\;
    \frac{\|\bar r\|}{\|b\| + \|\bar A\|\,\|x\|}\Big)

is held to ``tol``, with ``||Abar||`` LSMR's estimate (a *lower* bound on the
Frobenius norm, so the test errs on the strict side). ``eta <= tol`` proves
that ``x`` is the exact least-squares solution of a problem within relative
``tol`` of the given one: ``A - r r^T A / ||r||^2`` (Stewart's rank-one
perturbation, of norm ``||A^T r|| / ||r||``) for the first term; for the
second, the compatible system ``(A + E) x = b + f`` with ``E`` a multiple of
``r x^T`` and ``f`` of ``r``, split so that ``||E|| / ||A||`` and ``||f|| / ||b||``
both equal that term (Fong & Saunders' first stopping rule). One
allowance: the explicit ``r`` carries rounding of relative size
``8 sqrt(max(m, n)) eps (||b|| + ||A|| ||x||) / ||r||``, so the first term is
held to the larger of ``tol`` and that level (``stats["attainable"]``; it
exceeds ``tol`` only for nearly compatible systems, where no solution in the
working precision can be verified to more). If the
explicit value misses its bound (LSMR's recurrences drifted), the iteration goes
on with a tighter internal tolerance; ``stats["certified"]`` is ``False``, and
:meth:`LSMR.solve` warns (:class:`~truncpinv.UncertifiedResultWarning`), when
the iteration limit, the condition limit or the rounding floor stops it first.

Reference:
    D. C.-L. Fong and M. A. Saunders, *LSMR: An iterative algorithm for sparse
    least-squares problems*, SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ._autograd import differentiable_solve, linear_in_rhs
from ._certify import default_tol, warn_from_caller
from ._factorization import no_tf32
from ._operator import AdjointOperator, LinearOperator, ScipyOperator, is_operator
from ._spectral_grad import Ridge, Truncated
from ._tolerance import default_rtol, is_int_scalar, is_real_scalar
from ._validation import FiniteCheckedOperator, prepare_matrix, prepare_rhs
from .solvers._base import _equilibrate, _ldexp

__all__ = ["LSMR", "LstsqResult", "krylov_applies"]

_F64 = torch.float64
#: ``max|b|`` outside ``[2^-E, 2^E]`` is scaled by a power of two first, so that no norm over- or underflows.
_SAFE_B_EXPONENT = {torch.float32: 32, torch.float64: 128}
Vec = Callable[[torch.Tensor], torch.Tensor]
_NONFINITE_PRODUCT = (
    "`A` must be finite, but its products with finite vectors contain NaN or Inf: `A` or the operator holds "
    "NaN/Inf (check_finite=False skips the scan of a dense or sparse `A`) or the products overflow in {dtype}. "
    "Clean the input"
)


def krylov_applies(A: Any, *, rank: Any, rtol: Any, atol: Any) -> bool:
    """Whether ``tp.lstsq(A, b, solver="auto")`` solves by LSMR instead of a truncated SVD.

    Yes when ``A`` is matrix-free (a SciPy sparse matrix or ``LinearOperator``,
    or an operator with ``matmat``/``rmatmat``) and no truncation was asked
    for (``rank``, ``rtol`` and ``atol`` all ``None``). An explicit truncation
    keeps its exact meaning on the SVD path, and dense input keeps its direct
    factorisation (cheap at the sizes that fit in memory).
    """
    return rank is None and rtol is None and atol is None and is_operator(A)


@dataclass
class LstsqResult:
    """What :meth:`LSMR.solve` returns.

    Attributes:
        x: ``(n,)`` or ``(n, k)`` solution, a NumPy array when ``b`` was one, else a tensor.
        stats: ``solver``, ``iterations`` (the most over the columns), ``matvecs``
            (columns multiplied by ``A`` or ``A^T``, certificate included),
            ``stop`` (the rule that stopped the worst column: ``"zero"``,
            ``"compatible"``, ``"normal"``, ``"cond"``, ``"maxiter"``,
            ``"noise"``, ``"breakdown"``), ``backward_error`` (``eta`` above,
            the largest over the columns), ``normal_residual``
            (``||Abar^T rbar|| / (||Abar|| ||rbar||)``), ``residual_norm``,
            ``norm_A``/``cond_A`` (LSMR's estimates), ``tol``, ``conlim``,
            ``certified`` and ``time``; ``columns`` holds the per-column values.
    """

    x: Any
    stats: dict[str, Any]

    @property
    def certified(self) -> bool:
        """Every column's backward error is within ``tol`` (see the module docstring)."""
        return bool(self.stats["certified"])


@dataclass(frozen=True)
class LSMR:
    r"""Minimum-norm least squares :math:`\min \|Ax - b\|^2 + \lambda^2 \|x\|^2` by LSMR, certified.

    Not a factorising :class:`~truncpinv.Solver`: it solves for the given
    right-hand sides and keeps nothing for another ``b``. Use it through
    ``tp.lstsq(A, b, solver="lsmr")`` (or ``solver=tp.LSMR(tol=...)``), or
    call :meth:`solve` for the statistics. ``tp.lstsq`` with ``solver="auto"``
    takes it for matrix-free ``A`` when no truncation is asked for
    (:func:`krylov_applies`).

    Args:
        tol: backward-error tolerance (``atol = btol`` of Fong & Saunders);
            default :func:`truncpinv.default_tol` (``max(1e-12, 8 sqrt(max(m, n)) eps)`` in float64).
        maxiter: iteration limit (default ``min(m, n) + 32``: exact arithmetic
            needs at most ``min(m, n)``).
        damp: Tikhonov damping ``lambda >= 0`` (default 0).
        conlim: stop when LSMR's estimate of ``cond(Abar)`` reaches it (default
            ``1 / (max(m, n) eps)``, the reciprocal of the default truncation
            ``rtol``); ``math.inf`` never stops on it.

    Example:
        >>> import scipy.sparse as sp, numpy as np, truncpinv as tp
        >>> A = sp.random(2000, 300, density=0.01, random_state=0, format="csr")
        >>> b = np.ones(2000)
        >>> res = tp.LSMR().solve(A, b)
        >>> res.certified, res.stats["stop"]
        (True, 'normal')
    """

    tol: float | None = None
    maxiter: int | None = None
    damp: float = 0.0
    conlim: float | None = None

    name: ClassVar[str] = "lsmr"

    def __post_init__(self) -> None:
        if self.tol is not None and (not is_real_scalar(self.tol) or not 0 < float(self.tol) < 1):
            raise ValueError(f"`tol` must be a float in (0, 1) or None, got {self.tol!r}")
        if self.maxiter is not None:
            if not is_int_scalar(self.maxiter):
                raise TypeError(f"`maxiter` must be a positive integer or None, got {self.maxiter!r}")
            if self.maxiter < 1:
                raise ValueError(f"`maxiter` must be a positive integer, got {self.maxiter}")
        if not is_real_scalar(self.damp) or not math.isfinite(float(self.damp)) or self.damp < 0:
            raise ValueError(f"`damp` must be a non-negative finite float, got {self.damp!r}")
        if self.conlim is not None and (not is_real_scalar(self.conlim) or not float(self.conlim) > 1):
            raise ValueError(f"`conlim` must be a float above 1 (math.inf for no limit) or None, got {self.conlim!r}")

    def resolved_conlim(self, shape: tuple[int, int], dtype: torch.dtype) -> float:
        """``conlim``, or its default ``1 / default_rtol(shape, dtype)``."""
        return float(self.conlim) if self.conlim is not None else 1.0 / default_rtol(shape, dtype)

    def solve(self, A: Any, b: Any, *, check_finite: bool = True) -> LstsqResult:
        """Solve ``min ||A x - b||`` (damped if ``damp > 0``) for each column of ``b``.

        Args:
            A: ``m x n`` tensor (CPU or CUDA, float32/float64), NumPy array, SciPy
                sparse matrix or ``LinearOperator``, or a truncpinv operator.
            b: ``(m,)`` or ``(m, k)`` tensor or array.
            check_finite: reject NaN/Inf in ``A`` and ``b`` (default ``True``).

        Returns:
            An :class:`LstsqResult`; warns (:class:`~truncpinv.UncertifiedResultWarning`)
            when a column stopped before its backward error met ``tol``.
        """
        res = self.solve_quietly(A, b, check_finite=check_finite)
        if not res.certified:
            s = res.stats
            why = {
                "maxiter": f"it reached the iteration limit maxiter = {s['iterations']}",
                "cond": f"its estimate of cond(A) reached conlim = {s['conlim']:.3g} (A is numerically "
                "rank-deficient: truncate with an SVD solver, e.g. tp.lstsq(A, b, rtol=...), or damp)",
            }.get(s["stop"], "its explicitly recomputed residual stayed above tol at the rounding floor")
            warn_from_caller(
                f"solver 'lsmr' returned an uncertified result: {why}; backward error "
                f"{s['backward_error']:.2e} > tol = {s['tol']:.1e} (attainable {s['attainable']:.1e}). "
                f"Increase `maxiter`, loosen `tol`, or use an SVD solver. See LSMR.solve(...).stats."
            )
        return res

    def solve_quietly(self, A: Any, b: Any, *, check_finite: bool = True) -> LstsqResult:
        """:meth:`solve` without the warning (``tp.lstsq`` with ``solver="auto"`` falls back instead)."""
        prep = prepare_matrix(A, allow_operator=True, solver=self.name, check_finite=check_finite)
        shape, dt = prep.shape, prep.dtype
        b2, vec, was_numpy = prepare_rhs(b, shape=shape, dtype=dt, device=prep.device, check_finite=check_finite)
        if b2.is_complex():
            raise TypeError(
                f"`b` must be real (float32 or float64) for solver 'lsmr'; complex dtype {b2.dtype} is not "
                f"supported by it: use solver='svd' (or 'auto' with a dense `A`)"
            )
        tol = float(self.tol) if self.tol is not None else default_tol(dt, shape)
        maxiter = int(self.maxiter) if self.maxiter is not None else min(shape) + 32
        conlim = self.resolved_conlim(shape, dt)
        t0 = time.perf_counter()
        with no_tf32(), torch.no_grad():
            A_work, shift = prep.A, 0
            if isinstance(A_work, torch.Tensor):  # x = A^+ b = 2^-e (2^-e A)^+ b, damp scaled alike
                A_work, shift = _equilibrate(A_work)
            mv, rmv = _vector_products(A_work)
            damp = math.ldexp(float(self.damp), -shift)
            cols, infos = [], []
            for j in range(b2.shape[1]):
                bj, f = _scaled(b2[:, j])
                xj, info = lsmr_column(mv, rmv, bj, damp=damp, tol=tol, maxiter=maxiter, conlim=conlim)
                cols.append(_ldexp(xj, f - shift) if f - shift else xj)
                # back to the units of the given A and b (the ratios are scale-free)
                info["norm_A"] = math.ldexp(info["norm_A"], shift)
                info["residual_norm"] = math.ldexp(info["residual_norm"], f)
                infos.append(info)
            X = torch.stack(cols, dim=1)
        if not bool(torch.isfinite(X).all()):
            raise ValueError(
                "solver 'lsmr' produced a non-finite solution: `A` (or the operator's products) contains NaN/Inf "
                f"(check_finite=False skipped the scan) or the solution overflows in {dt}"
            )
        worst = max(range(len(infos)), key=lambda j: (not infos[j]["certified"], infos[j]["backward_error"]))
        stats: dict[str, Any] = {
            "solver": self.name,
            "iterations": max(i["iterations"] for i in infos),
            "matvecs": sum(i["matvecs"] for i in infos),
            "stop": infos[worst]["stop"],
            "backward_error": max(i["backward_error"] for i in infos),
            "normal_residual": max(i["normal_residual"] for i in infos),
            "residual_norm": max(i["residual_norm"] for i in infos),
            "attainable": max(i["attainable"] for i in infos),
            "norm_A": max(i["norm_A"] for i in infos),
            "cond_A": max(i["cond_A"] for i in infos),
            "tol": tol,
            "conlim": conlim,
            "certified": all(i["certified"] for i in infos),
            "time": time.perf_counter() - t0,
            "columns": infos,
        }
        X = self._differentiable(prep, b2, X)
        x: Any = X[:, 0] if vec else X
        return LstsqResult(x.detach().cpu().numpy() if was_numpy else x, stats)

    def _differentiable(self, prep: Any, b2: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``X`` with gradients to a dense ``A`` that requires grad, and to ``b``.

        ``A``: the derivative of the damped pseudoinverse ``(A^H A + damp^2 I)^{-1} A^H`` (``damp > 0``), or of
        ``A^+`` at the default cut-off (``damp = 0``; LSMR's limit, see the class docstring), from a dense
        SVD in the backward pass (:mod:`truncpinv._autograd`). ``b`` alone (a matrix-free ``A``, or one
        without grad): ``bbar = P^H xbar`` is the same LSMR solve with the adjoint ``A^H``, which has the
        same damped pseudoinverse, transposed.
        """
        if prep.grad_source is not None:
            filt = Ridge(float(self.damp)) if self.damp else Truncated(None)
            return differentiable_solve(prep.grad_source, b2, X.clone, filt)
        if not (b2.requires_grad and torch.is_grad_enabled()):
            return X
        A = prep.A
        adj = A.mH if isinstance(A, torch.Tensor) else AdjointOperator(A)

        def adjoint(xbar: torch.Tensor) -> torch.Tensor:
            return self.solve_quietly(adj, xbar, check_finite=False).x  # type: ignore[no-any-return]

        return linear_in_rhs(b2, X.clone, adjoint)


def _vector_products(A: torch.Tensor | LinearOperator) -> tuple[Vec, Vec]:
    """``(v -> A v, u -> A^T u)`` on vectors.

    An operator's ``check_finite`` wrapper is dropped: :func:`lsmr_column`
    checks the norm of every product anyway. SciPy operators get their
    ``matvec``/``rmatvec`` on 1-D arrays, without the 2-D round trip.
    """
    if isinstance(A, torch.Tensor):
        return (lambda v: A @ v), (lambda u: A.T @ u)
    op: Any = A.op if isinstance(A, FiniteCheckedOperator) else A
    if isinstance(op, ScipyOperator):
        sop = op.op
        return (
            (lambda v: torch.as_tensor(np.asarray(sop.matvec(v.numpy())), dtype=v.dtype)),
            (lambda u: torch.as_tensor(np.asarray(sop.rmatvec(u.numpy())), dtype=u.dtype)),
        )
    return (lambda v: op.matmat(v[:, None])[:, 0].to(v.dtype)), (lambda u: op.rmatmat(u[:, None])[:, 0].to(u.dtype))


def _norm(v: torch.Tensor) -> float:
    """``||v||``, accumulated in float64."""
    return float(torch.linalg.vector_norm(v, dtype=_F64))


def _scaled(b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(2^-f b, f)`` with ``max|2^-f b|`` in ``[1/2, 1)`` if ``max|b|`` is outside the safe range, else ``(b, 0)``."""
    amax = float(b.abs().max()) if b.numel() else 0.0
    if amax == 0.0 or not math.isfinite(amax):
        return b, 0
    f = math.frexp(amax)[1]
    return (_ldexp(b, -f), f) if abs(f) > _SAFE_B_EXPONENT.get(b.dtype, 32) else (b, 0)


def _sym_ortho(a: float, b: float) -> tuple[float, float, float]:
    """A stable Givens rotation: ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``, ``r = hypot(a, b)``."""
    if b == 0:
        return math.copysign(1.0, a) if a else 1.0, 0.0, abs(a)
    if a == 0:
        return 0.0, math.copysign(1.0, b), abs(b)
    if abs(b) > abs(a):
        tau = a / b
        s = math.copysign(1.0, b) / math.sqrt(1 + tau * tau)
        return s * tau, s, b / s
    tau = b / a
    c = math.copysign(1.0, a) / math.sqrt(1 + tau * tau)
    return c, c * tau, a / c


#: The explicit residual ``r = b - A x`` carries rounding of about
#: ``ROUNDING sqrt(max(m, n)) eps (||b|| + ||A|| ||x||)``: the level that :func:`truncpinv.default_tol`
#: allows for a residual computed with products in the working dtype.
ROUNDING = 8.0


def backward_error(
    mv: Vec, rmv: Vec, b: torch.Tensor, x: torch.Tensor, *, damp: float, norm_A: float, tol: float
) -> dict[str, Any]:
    """The certificate of ``x`` from explicit products (see the module docstring).

    ``r = b - A x`` is accumulated in float64 from the working-precision
    product; ``||Abar||`` is ``sqrt(norm_A^2 + damp^2)``, a lower bound on its
    Frobenius norm when ``norm_A`` is LSMR's estimate. The normal-equations
    term cannot be verified below the rounding of ``r`` itself, ``attainable =
    8 sqrt(max(m, n)) eps (||b|| + ||Abar|| ||x||) / ||rbar||`` (large only for
    nearly compatible systems): it is held to ``max(tol, attainable)``.

    Returns:
        ``backward_error`` (``eta``), ``normal_residual``, ``residual_norm``
        (``||rbar||``), ``attainable`` and ``certified``.
    """
    x64 = x.to(_F64)
    r = b.to(_F64) - mv(x).to(_F64)
    ar = rmv(r.to(x.dtype)).to(_F64) - (damp * damp) * x64
    nx = float(x64.norm())
    nr = math.hypot(float(r.norm()), damp * nx)
    nar = float(ar.norm())
    nA = math.hypot(norm_A, damp)
    scale = _norm(b) + nA * nx
    normal = 0.0 if nar == 0 else (nar / (nA * nr) if nA * nr > 0 else math.inf)
    compatible = 0.0 if nr == 0 else (nr / scale if scale > 0 else math.inf)
    eps = float(torch.finfo(x.dtype).eps)
    attainable = ROUNDING * math.sqrt(max(b.shape[0], x.shape[0])) * eps * scale / nr if nr > 0 else 0.0
    return {
        "backward_error": min(normal, compatible),
        "normal_residual": normal,
        "residual_norm": nr,
        "attainable": attainable,
        "certified": compatible <= tol or normal <= max(tol, attainable),
    }


def lsmr_column(
    mv: Vec, rmv: Vec, b: torch.Tensor, *, damp: float, tol: float, maxiter: int, conlim: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """LSMR for one right-hand side ``b`` (the functional core of :class:`LSMR`).

    The recurrences are those of Fong & Saunders (2011), Algorithm LSMR, with
    scalars in float64 and vectors in ``b``'s dtype. Returns ``x`` and the
    per-column statistics of :class:`LstsqResult`.
    """
    dt = b.dtype
    normb = _norm(b)
    info: dict[str, Any] = {"iterations": 0, "matvecs": 0, "norm_A": 0.0, "cond_A": 1.0}
    if not math.isfinite(normb):
        raise ValueError("`b` must be finite, but it contains NaN or Inf (check_finite=False skipped the scan)")
    u = b / normb if normb > 0 else b
    v = rmv(u)
    x = torch.zeros_like(v)
    info["matvecs"] = 1
    alpha = _norm(v) if normb > 0 else 0.0
    if not math.isfinite(alpha):
        raise ValueError(_NONFINITE_PRODUCT.format(dtype=str(dt).replace("torch.", "")))
    if alpha == 0.0:  # b = 0 or A^T b = 0: x = 0 is the minimum-norm solution
        info.update(
            stop="zero", backward_error=0.0, normal_residual=0.0, residual_norm=normb, attainable=0.0, certified=True
        )
        return x, info
    v = v / alpha
    beta = normb
    zetabar, alphabar, rho, rhobar, cbar, sbar = alpha * beta, alpha, 1.0, 1.0, 1.0, 0.0
    h, hbar = v.clone(), torch.zeros_like(v)
    betadd, betad, rhodold, tautildeold, thetatilde, zeta, d = beta, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0
    normA2, maxrbar, minrbar, condA = alpha * alpha, 0.0, 1e100, 1.0
    normA = math.sqrt(normA2)
    inner = tol  # internal tolerance of the estimates; tightened when the explicit check disagrees
    floor = float(torch.finfo(dt).eps)
    stop, itn, cert = "maxiter", 0, None
    while itn < maxiter:
        itn += 1
        u.mul_(-alpha).add_(mv(v))  # in place on our own vectors only: an operator may return a view it keeps
        beta = _norm(u)
        if beta > 0:
            u.mul_(1.0 / beta)
            v.mul_(-beta).add_(rmv(u))
            alpha = _norm(v)
            if alpha > 0:
                v.mul_(1.0 / alpha)
        info["matvecs"] += 2
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise ValueError(_NONFINITE_PRODUCT.format(dtype=str(dt).replace("torch.", "")))
        try:
            chat, shat, alphahat = _sym_ortho(alphabar, damp)
            rhoold = rho
            c, s, rho = _sym_ortho(alphahat, beta)
            thetanew, alphabar = s * alpha, c * alpha
            rhobarold, zetaold = rhobar, zeta
            thetabar, rhotemp = sbar * rho, cbar * rho
            cbar, sbar, rhobar = _sym_ortho(cbar * rho, thetanew)
            zeta, zetabar = cbar * zetabar, -sbar * zetabar
            hbar.mul_(-(thetabar * rho / (rhoold * rhobarold))).add_(h)
            x.add_(hbar, alpha=zeta / (rho * rhobar))
            h.mul_(-(thetanew / rho)).add_(v)
            # ||r|| estimate
            betaacute, betacheck = chat * betadd, -shat * betadd
            betahat, betadd = c * betaacute, -s * betaacute
            thetatildeold = thetatilde
            ctildeold, stildeold, rhotildeold = _sym_ortho(rhodold, thetabar)
            thetatilde, rhodold = stildeold * rhobar, ctildeold * rhobar
            betad = -stildeold * betad + ctildeold * betahat
            tautildeold = (zetaold - thetatildeold * tautildeold) / rhotildeold
            taud = (zeta - thetatilde * tautildeold) / rhodold
            d += betacheck * betacheck
            normr = math.sqrt(d + (betad - taud) ** 2 + betadd * betadd)
        except ZeroDivisionError:  # an exact breakdown: the Krylov space is invariant, x is final
            stop = "breakdown"
            break
        # ||A||_F (lower) and cond(A) estimates
        normA2 += beta * beta
        normA = math.sqrt(normA2)
        normA2 += alpha * alpha
        if itn > 1:  # (rhobar starts at 1, which is not a value of A's scale: SciPy includes it in maxrbar)
            maxrbar, minrbar = max(maxrbar, rhobarold), min(minrbar, rhobarold)
        condA = max(maxrbar, rhotemp) / min(minrbar, rhotemp) if min(minrbar, rhotemp) > 0 else math.inf
        normar = abs(zetabar)
        normx = _norm(x)
        test2 = normar / (normA * normr) if normA * normr > 0 else math.inf
        compatible = normr <= inner * (normb + normA * normx)
        if compatible or test2 <= inner:
            cert = backward_error(mv, rmv, b, x, damp=damp, norm_A=normA, tol=tol)
            info["matvecs"] += 2
            if cert["certified"]:
                stop = "compatible" if compatible else "normal"
                break
            if inner <= floor or alpha == 0 or beta == 0:
                stop = "noise"
                break
            inner = max(inner * min(0.1, tol / cert["backward_error"]), floor)
            cert = None
            continue
        if condA >= conlim:
            stop = "cond"
            break
    if cert is None:
        cert = backward_error(mv, rmv, b, x, damp=damp, norm_A=normA, tol=tol)
        info["matvecs"] += 2
    info.update(iterations=itn, stop=stop, norm_A=normA, cond_A=condA, **cert)
    return x, info
