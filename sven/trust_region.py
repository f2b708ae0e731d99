r"""MINPACK's trust-region Levenberg--Marquardt step control (Moré 1978), as a :mod:`sven.control` policy.

:class:`sven.control.AdaptiveDamping` steers the damping :math:`\lambda`
directly (multiply on success, divide on failure). MINPACK's ``lmder``
steers a *radius* :math:`\Delta` instead and lets :math:`\lambda` follow:
each try takes the step of the damped problem whose length is the radius,

.. math::

    q(\lambda) = -\big(\hat J^\top \hat J + \lambda I\big)^{-1} \hat J^\top r, \qquad
    \|q(\lambda)\| = \Delta \ \ (\text{within } 10\%), \qquad \delta = D^{-1} q,

with :math:`\hat J = J D^{-1}` the column-scaled Jacobian
(:class:`sven.precondition.ColumnScaling`; :math:`D = I` without scaling),
or :math:`\lambda = 0` when the Gauss--Newton step is already shorter than
:math:`1.1\Delta`. On the step's factorisation :math:`\hat J = U \Sigma V^\top`
the length is a sum over the kept singular values,
:math:`\|q(\lambda)\|^2 = \sum_i \sigma_i^2 c_i^2 / (\sigma_i^2 + \lambda)^2`
with :math:`c = U^\top r`, so the secular equation costs a few scalar
operations per Newton iteration (:func:`lm_parameter`). The radius follows the
gain ratio :math:`\rho` (actual over predicted reduction of :math:`\|r\|^2`):

* :math:`\rho \le 1/4`: :math:`\Delta \leftarrow \mu \min(\Delta, 10\|q\|)` with
  :math:`\mu = 1/2`, or the minimiser of the quadratic through the directional
  derivative when the cost grew, clipped to :math:`[1/10, 1/2]`;
* :math:`\rho \ge 3/4`, or a Gauss--Newton step (:math:`\lambda = 0`):
  :math:`\Delta \leftarrow 2\|q\|`;
* a try with :math:`\rho < 10^{-4}` is undone and retried on the cached
  factorisation with the smaller radius.

The first radius is :math:`\|D\theta\|` (1 if that is 0; MINPACK's ``factor``
is 1 here, not its suggested 100, see :data:`FACTOR`), cut to the
length of the first step. On the Moré--Garbow--Hillstrom set this needs
fewer evaluations than the multiplicative update where the scales of the
parameters differ by orders of magnitude (Powell's badly scaled function: 18
evaluations against 75; ``benchmarks/bench_least_squares.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import functional as SF
from ._arrays import vector_norm
from ._validation import check_nonneg_float, check_nonneg_int, check_positive_float
from .control import Outcome, Policy, StepContext, evaluator, stall_cosine, warn_stall

__all__ = ["TrustRegion", "lm_parameter"]

#: MINPACK's ``factor``: the first radius is this times ``||D theta||``. MINPACK suggests 100; 1 solves all 35
#: problems of the Moré--Garbow--Hillstrom set (``benchmarks/bench_least_squares.py --mgh``), each within 2x the
#: evaluations of scipy's ``lm``, where 100 leaves Gulf research at 400 evaluations (scipy's ``lm`` fails it at 300;
#: 1: 225), and needs 100 rather than 33 for Penalty II and 49 rather than 13 for Biggs EXP6; elsewhere the two
#: differ by at most 7 evaluations.
FACTOR = 1.0
#: A try is kept when its gain ratio is at least this (MINPACK: ``ratio >= 1e-4``).
ACCEPT = 1e-4
#: The smallest radius (far below any round-off of ``||D theta||``, far above the float64 underflow).
_TINY = 1e-280


def lm_parameter(S: np.ndarray, c: np.ndarray, radius: float, *, rtol: float = 1e-6, max_iter: int = 50) -> float:
    r"""The Levenberg--Marquardt parameter :math:`\lambda \ge 0` whose step has length ``radius`` (within ``rtol``).

    With :math:`q_i(\lambda) = \sigma_i c_i / (\sigma_i^2 + \lambda)` (the step in the basis of the right
    singular vectors), returns 0 if :math:`\|q(0)\| \le (1 + rtol)\,\Delta`, and otherwise the root of
    :math:`1/\|q(\lambda)\| = 1/\Delta` by Newton's method from :math:`\lambda = 0` (Hebden; Moré 1978, eq. 5.5):

    .. math::

        \lambda \leftarrow \lambda + \Big(\frac{\|q\|}{\Delta} - 1\Big)
        \frac{\|q\|^2}{\sum_i \sigma_i^2 c_i^2 / (\sigma_i^2 + \lambda)^3}.

    :math:`1/\|q(\lambda)\|` is concave and increasing, so the iterates rise monotonically to the root and
    never overshoot it; each costs :math:`O(k)` for ``k`` singular values.

    Args:
        S: the kept singular values of the scaled Jacobian (``> 0``).
        c: :math:`U^\top r`, the residuals in the left singular basis.
        radius: :math:`\Delta > 0`.
        rtol: the relative accuracy of the length. MINPACK stops at 0.1; the root itself costs a few more
            scalar iterations here and follows a curved valley better (Meyer's function: 120 evaluations
            with ``1e-6`` against 212 with ``0.1``; scipy's ``lm``: 126).
        max_iter: the most Newton iterations (each one gains at least the quadratic rate near the root).
    """
    if not radius > 0:
        raise ValueError(f"`radius` must be positive, got {radius!r}")
    if S.size <= _SCALAR_SIZE:
        return _lm_parameter_scalar(S.tolist(), c.tolist(), radius, rtol=rtol, max_iter=max_iter)
    keep = S > 0  # a zero singular value (nothing truncated at all) adds nothing to the step
    w = (S[keep] * c[keep]) ** 2
    s2 = S[keep] ** 2
    norm = math.sqrt(float(np.sum(w / (s2 * s2)))) if w.size else 0.0
    if norm <= (1.0 + rtol) * radius:
        return 0.0
    lam = 0.0
    sc = np.sqrt(w)
    for _ in range(max_iter):
        den = s2 + lam
        q = sc / den
        top = float(q.max()) if q.size else 0.0
        if top == 0.0:
            break
        u = q / top  # the squares of q itself would overflow or lose digits to underflow at extreme radii
        uu = float(u.dot(u))
        norm = top * math.sqrt(uu)
        if norm - radius <= rtol * radius:
            break
        # ||q||^2 / sum(q_i^2 / den_i), with q scaled by its largest entry
        lam += (norm / radius - 1.0) * uu / float(u.dot(u / den))
    return lam


#: Spectra of at most this many values take :func:`lm_parameter` in Python floats (a curve fit's few
#: parameters: a NumPy call on a handful of entries costs more than the arithmetic).
_SCALAR_SIZE = 16


def _lm_parameter_scalar(S: list[float], c: list[float], radius: float, *, rtol: float, max_iter: int) -> float:
    """:func:`lm_parameter` on Python floats: the same operations, one value at a time (the same to round-off)."""
    s2 = [s * s for s, _ in zip(S, c) if s > 0]
    w = [(s * x) ** 2 for s, x in zip(S, c) if s > 0]
    norm = math.sqrt(sum(wi / (si * si) for wi, si in zip(w, s2))) if w else 0.0
    if norm <= (1.0 + rtol) * radius:
        return 0.0
    lam = 0.0
    sc = [math.sqrt(wi) for wi in w]
    for _ in range(max_iter):
        den = [si + lam for si in s2]
        q = [a / b for a, b in zip(sc, den)]
        top = max(q, default=0.0)
        if top == 0.0:
            break
        u = [qi / top for qi in q]
        uu = sum(ui * ui for ui in u)
        norm = top * math.sqrt(uu)
        if norm - radius <= rtol * radius:
            break
        lam += (norm / radius - 1.0) * uu / sum(ui * ui / d for ui, d in zip(u, den))
    return lam


class TrustRegion(Policy):
    r"""Levenberg--Marquardt with MINPACK's trust-region control of the damping (see the module docstring).

    Pass it as ``sven.Sven(params, residuals=True, control=TrustRegion())``; :func:`sven.least_squares`
    uses it by default. The radius measures the direction before the learning rate (MINPACK's step is
    ``lr=1``, residual mode's default); the gain ratio uses the step actually applied. Each try
    re-evaluates the residuals once. When every try of a step is rejected the
    parameters stay unchanged; the radius keeps shrinking at the next step (on its new Jacobian).

    **Stalls are not silent**, as in :class:`sven.control.AdaptiveDamping`: a step whose every try is
    rejected with the radius below round-off of :math:`\|D\theta\|`, or whose try leaves the residuals
    bit-identical (a step lost in round-off; it is undone), sets ``Outcome.stalled`` and warns if the point
    is not stationary.

    **Convergence inside the step**, as ``lmder`` tests it after every try (kept or not), when ``ftol`` or
    ``xtol`` is positive: ``ftol`` holds when the actual and the predicted relative reductions of
    :math:`\|r\|^2` are both at most ``ftol`` (and :math:`\rho \le 2`); ``xtol`` when the radius is at most
    ``xtol`` :math:`\|D\theta\|`. The step then ends at once (a rejected try undone) and
    ``Outcome.converged`` names the tests that held; :func:`sven.least_squares` stops there. Without
    these tests a step whose tries all change the cost at round-off retries until ``max_retries``.

    **No momentum.** Each try must be the step of the damped problem, of length the radius, so that the gain
    ratio judges the model the radius bounds. Heavy-ball momentum adds the previous steps to every try: the
    step is then neither bounded by the radius nor predicted by the model, and every try is rejected.
    :class:`sven.Sven` refuses ``momentum > 0`` (the constructor's, a parameter group's, or one a scheduler
    sets before a step) together with this policy (``takes_momentum = False``).

    Args:
        max_retries: retries after a rejected try within one step (each on the cached factorisation, with
            the radius cut by 2 to 10).
        factor: the first radius, relative to :math:`\|D\theta\|` (MINPACK's ``factor``; :data:`FACTOR`).
        ftol, xtol: the convergence tests above (``0``: off, the default for :class:`sven.Sven`).
        normal_equations: a tall Jacobian (at least 16 columns, 8 times as many rows) may be factorised from
            :math:`M^\top M` when that resolves the try's :math:`\lambda` (:mod:`sven.normal_equations`); a try
            whose :math:`\lambda` it cannot resolve takes the SVD. ``False``: always the SVD.

    Example:
        >>> import torch, sven
        >>> from sven.trust_region import TrustRegion
        >>> x = torch.nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
        >>> rosenbrock = lambda: torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])
        >>> opt = sven.Sven([x], residuals=True, control=TrustRegion())
        >>> for _ in range(30):
        ...     _ = opt.step(rosenbrock)
        >>> [round(v, 8) for v in x.tolist()]
        [1.0, 1.0]
    """

    needs_evaluate = True
    takes_momentum = False

    def __init__(
        self,
        max_retries: int = 10,
        *,
        factor: float = FACTOR,
        ftol: float = 0.0,
        xtol: float = 0.0,
        normal_equations: bool = True,
    ) -> None:
        self.max_retries = int(check_nonneg_int("max_retries", max_retries))
        self.normal_equations = bool(normal_equations)
        self.factor = check_positive_float("factor", factor)
        self.ftol = check_nonneg_float("ftol", ftol)
        self.xtol = check_nonneg_float("xtol", xtol)
        self.radius: float | None = None  # Delta, in the scaled coordinates; set at the first step
        self.lam = 0.0  # the last lambda, relative to sigma_max^2 (as StepInfo.damping)
        self.peak = 0.0  # the largest ||R||^2 seen: a stall at round-off below it is convergence

    @property
    def damping(self) -> float:
        return self.lam

    def expected_damping(self) -> float | None:
        """The last step's :math:`\\lambda` (a hint only: each try's own is checked, ``StepContext.resolve``)."""
        return self.lam if self.normal_equations else None

    def state_dict(self) -> dict[str, float]:
        """The damping, the radius (``nan`` before the first step) and ``peak``, the largest :math:`\\|R\\|^2` seen."""
        return {"damping": self.lam, "nu": 2.0, "radius": math.nan if self.radius is None else self.radius,
                "peak": self.peak}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "radius" in state:
            r = float(state["radius"])
            self.radius = r if math.isfinite(r) and r > 0 else None
        if "damping" in state:
            self.lam = float(state["damping"])
        if "peak" in state:
            self.peak = float(state["peak"])

    def run(self, ctx: StepContext) -> Outcome:
        evaluate = evaluator(ctx)
        restore = ctx.save()
        F = ctx.F
        S, c = _spectrum(F, ctx.R)
        fnorm2 = SF.squared_norm(ctx.R)
        self.peak = max(self.peak, fnorm2) if math.isfinite(fnorm2) else self.peak
        xnorm = ctx.xnorm()
        first = self.radius is None
        if self.radius is None:
            self.radius = self.factor * xnorm if xnorm > 0 else self.factor
        sigma2 = float(S[0] ** 2) if S.size else 1.0
        out = Outcome(damping=self.lam)
        for attempt in range(1 + self.max_retries):
            lam = lm_parameter(S, c, self.radius)
            resolved = F if ctx.resolve is None else ctx.resolve(lam / sigma2)
            if resolved is not F:  # normal equations that cannot resolve lam: the SVD instead
                F = resolved
                S, c = _spectrum(F, ctx.R)
                sigma2 = float(S[0] ** 2) if S.size else 1.0
                lam = lm_parameter(S, c, self.radius)
            den = S * S + lam
            q = S * c / np.where(den > 0, den, 1.0)  # (a zero singular value gives a zero component)
            pnorm = vector_norm(q)
            if first:
                self.radius = min(self.radius, pnorm) if pnorm > 0 else self.radius
                first = False
            self.lam = out.damping = lam / sigma2
            d = ctx.direction(self.lam)
            pred = ctx.predict(d)  # before the step: a matrix-free M needs the old graph
            ctx.apply(d, 1.0)
            out.direction = d
            R_new = evaluate.residuals()
            jnorm = vector_norm(S * q)
            if pnorm > 0 and R_new.dtype == ctx.R.dtype and torch.equal(R_new, ctx.R):
                # the step is lost in round-off: converged by the tests that hold, else a stall
                restore()
                ctx.reject()
                out.rejected, out.direction, out.retries = True, None, attempt
                out.converged = self._converged(0.0, lam, pnorm, jnorm, fnorm2, fnorm2, xnorm)
                out.stalled = not out.converged
                warn_stall(ctx, out, fnorm2, self.peak, f"the step lost in round-off (radius {self.radius:.3g})")
                return out
            fnew2 = SF.squared_norm(R_new)
            rho = out.gain_ratio = SF.gain_ratio_of(fnorm2, fnew2, SF.squared_distance(ctx.R, pred))
            self._update(rho, lam, pnorm, jnorm, fnorm2, fnew2)
            kept = rho >= ACCEPT
            out.converged = self._converged(rho, lam, pnorm, jnorm, fnorm2, fnew2, ctx.xnorm() if kept else xnorm)
            if kept or out.converged:
                out.retries = attempt
                if not kept:
                    restore()
                    ctx.reject()
                    out.rejected, out.direction = True, None
                    # the radius fell to xtol because every try went uphill: a stall unless the point is stationary
                    cos = _cosine(ctx) if "xtol" in out.converged else 0.0
                    out.stalled = cos > stall_cosine(ctx.R.dtype)
                    warn_stall(ctx, out, fnorm2, self.peak, f"the trust radius at `xtol` ({self.radius:.3g})")
                return out
            restore()
            ctx.reject()
        out.rejected, out.retries, out.direction = True, 1 + self.max_retries, None
        out.stalled = self.radius <= torch.finfo(F.dtype).eps * max(xnorm, 1.0)
        warn_stall(ctx, out, fnorm2, self.peak, f"the trust radius below round-off ({self.radius:.3g})")
        return out

    def _converged(
        self, rho: float, lam: float, pnorm: float, jnorm: float, fnorm2: float, fnew2: float, xnorm: float
    ) -> tuple[str, ...]:
        """MINPACK's ``ftol`` and ``xtol`` tests after a try (see the class docstring); ``()`` when neither holds."""
        held: list[str] = []
        if self.ftol > 0 and fnorm2 > 0:
            actred = 1.0 - fnew2 / fnorm2 if 0.01 * fnew2 < fnorm2 else -1.0
            prered = (jnorm * jnorm + 2.0 * lam * pnorm * pnorm) / fnorm2
            if abs(actred) <= self.ftol and prered <= self.ftol and 0.5 * rho <= 1.0:
                held.append("ftol")
        if self.xtol > 0 and self.radius is not None and self.radius <= self.xtol * xnorm:
            held.append("xtol")
        return tuple(held)

    def _update(self, rho: float, lam: float, pnorm: float, jnorm: float, fnorm2: float, fnew2: float) -> None:
        r"""MINPACK's radius update from the gain ratio (``lmder``, after the step's evaluation)."""
        if pnorm == 0.0:  # nothing to move: the gradient is zero in the kept directions
            return
        if rho <= 0.25:
            fnorm, fnew = math.sqrt(fnorm2), math.sqrt(fnew2) if math.isfinite(fnew2) else math.inf
            actred = 1.0 - (fnew / fnorm) ** 2 if 0.1 * fnew < fnorm else -1.0
            # MINPACK's dirder: the directional derivative of ||r||^2 / (2 ||r_0||^2) along the step
            dirder = -((jnorm / fnorm) ** 2 + lam * pnorm * pnorm / fnorm2) if fnorm > 0 else 0.0
            # the minimiser of the quadratic through 1, dirder and 1 - actred (below 1/2 when the cost grew)
            mu = 0.5 if actred >= 0 else 0.5 * dirder / (dirder + 0.5 * actred)
            if 0.1 * fnew >= fnorm or not mu >= 0.1:
                mu = 0.1
            # never 0: a radius that underflowed could not grow again (the stall is reported long before)
            self.radius = max(mu * min(self.radius or math.inf, pnorm / 0.1), _TINY)
        elif lam == 0.0 or rho >= 0.75:
            self.radius = pnorm / 0.5


def _cosine(ctx: Any) -> float:
    """:func:`sven.functional.gradient_cosine` of the step (cached by the context when it offers it)."""
    return ctx.cosine() if ctx.cosine is not None else float(SF.gradient_cosine(ctx.F, ctx.R))


def _spectrum(F: Any, R: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The kept singular values of ``F`` and :math:`c = U^\\top R`, as float64 arrays (``c = S`` at rank 0)."""
    S_, Rf = F.S, R if R.dtype == F.dtype else R.to(F.dtype)
    arrays = getattr(F, "arrays", None)  # (factors that carry their NumPy arrays: sven.tiny.TinyFactors)
    u, s, _ = arrays if arrays else (SF.host(F.U), SF.host(S_), None)
    r = SF.host(Rf)
    if s is not None and r is not None and u is not None:  # small CPU factors: in NumPy
        S = s.astype(np.float64)
        return S, (r @ u).astype(np.float64) if F.rank else S
    S = S_.detach().double().cpu().numpy()
    c = (F.U.T @ Rf).detach().double().cpu().numpy() if F.rank else S
    return S, c
