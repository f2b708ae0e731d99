r"""The two step controls of the lean step (:mod:`sven.tiny`), on NumPy arrays: the same decisions, fewer calls.

A curve fit's step is made of microseconds of arithmetic and of the calls around it. The general
controls, :meth:`sven.control.AdaptiveDamping.run` and :meth:`sven.trust_region.TrustRegion.run`, talk to the
step through a :class:`~sven.control.StepContext` of closures that hand tensors back and forth; each try of a
step then costs about 25 calls (a tensor made from an array and viewed again as one, the evaluator's layers,
the host views of :func:`sven.functional.squared_norm` and :func:`~sven.functional.squared_distance`).
:func:`run` takes the same tries on the arrays of :class:`Lean` directly:

* the same policy objects and state (``AdaptiveDamping.state``, ``TrustRegion.radius``, ``lam``, ``peak``),
  changed by the same functions (:func:`sven.functional.madsen_nielsen_update`,
  :func:`sven.trust_region.lm_parameter`, ``TrustRegion._update`` and ``_converged``), in the same order;
* the same arithmetic in the same dtypes: the direction
  :math:`d_\lambda = D^{-1} V \frac{\Sigma}{\Sigma^2 + \lambda\sigma_1^2} U^\top R`, the predicted change
  :math:`M(\eta\,d)`, :math:`\|R\|^2`, :math:`\|R - M\eta d\|^2` and the gain ratio
  (:func:`sven.functional.gain_ratio_of`), so that the iterates, damping, radius and decisions are the general
  controls' to round-off (``tests/test_tiny.py`` runs both over multi-step trajectories, float64 and
  float32, both controls);
* a stall, a non-finite direction and the trust region's convergence tests behave as there: the stall
  warning comes from :func:`sven.control.warn_stall` on the full :class:`~sven.control.StepContext`
  (built only then, :meth:`Lean.context`), a non-finite direction raises the same
  :class:`~sven.info.StepFault`.

:class:`Lean` also serves the general controls (:meth:`Lean.context`) wherever the lean step hands a step
to a policy other than those two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import increment_version

from . import functional as SF
from ._arrays import finite_array, squared_norm_of, vector_norm
from .control import AdaptiveDamping, Evaluator, Outcome, StepContext, stall_cosine, warn_stall
from .info import StepFault
from .linearize import RowSpec
from .params import lr_scaled
from .trust_region import ACCEPT, TrustRegion, lm_parameter

__all__ = ["Lean", "run"]

_F64 = np.dtype(np.float64)  # (a builtin dtype is one object: compared by identity)


class Lean:
    """One lean step's arrays and its actions on the parameters (the closures of a :class:`StepContext`).

    Args:
        opt: the optimizer (its counters, rows and control).
        tp: its :class:`sven.tiny.TinyPlan`.
        F: the step's :class:`sven.tiny.TinyFactors` of :math:`\\hat M = M D^{-1}`.
        R: the residuals (a tensor) and ``r`` their array, ``rr`` :math:`\\|R\\|^2` (float64).
        a: the Jacobian's array; ``c`` :math:`U^\\top R` in the factors' dtype; ``D`` the column scaling
            (``None``: none); ``cos`` the gradient angle.
        closure, spec: the closure and its :class:`~sven.linearize.RowSpec` (residual mode): the residuals
            after a try (:meth:`residuals_after`, what :class:`sven.control.Evaluator` gives).
    """

    __slots__ = ("D", "F", "R", "a", "c", "closure", "cos", "cs", "last", "lrs", "opt", "plain", "r", "rr", "s0sq",
                 "spec", "ss", "tp", "unit", "whole")  # fmt: skip

    def __init__(
        self,
        opt: Any,
        tp: Any,
        F: Any,
        R: torch.Tensor,
        r: np.ndarray,
        rr: float,
        a: np.ndarray,
        *,
        c: np.ndarray,
        D: np.ndarray | None,
        cos: float,
        closure: Callable[[], torch.Tensor],
        spec: Any,
    ) -> None:
        self.opt, self.tp, self.F, self.R, self.r, self.rr, self.a = opt, tp, F, R, r, rr, a
        self.c, self.D, self.cos, self.closure, self.spec = c, D, cos, closure, spec
        self.plain = type(spec) is RowSpec and spec.residuals  # (the rows are the residuals, checked as R was)
        s = F.arrays[1]
        self.s0sq = s[0] ** 2 if F.rank else 0.0
        if s.dtype is _F64:  # (the values of s and c as floats: direction_array)
            self.ss, self.cs, self.s0sq = s.tolist(), c.tolist(), float(self.s0sq)
        self.lrs = tp.column_lrs(a.dtype)
        params = tp.params
        # one flat parameter of the directions' dtype: a direction is added to it as it is
        self.whole = len(params) == 1 and params[0].dim() == 1 and params[0].dtype == F.dtype
        # ... with a learning rate of 1: a direction is subtracted from its array (apply_array)
        self.unit = self.whole and tp.blocks[0].lr == 1.0
        self.last: tuple[Any, Any] = (None, None)  # the last direction and its array

    # ------------------------------------------------------------------ the actions
    def direction_array(self, lam: float) -> np.ndarray:
        """:math:`d_\\lambda` (module docstring) as an array; a StepFault where it is not finite."""
        _, s, v = self.F.arrays
        if self.F.rank == 0:
            d = np.zeros(v.shape[0], dtype=v.dtype)
        elif s.dtype is _F64:  # the same float64 operations, one value at a time (fewer NumPy calls)
            m = lam * self.s0sq
            w = [x * (1.0 / y) for x, y in zip(self.cs, self.ss)] if lam == 0.0 else [
                x * (y / (y * y + m)) for x, y in zip(self.cs, self.ss)]  # fmt: skip
            d = v @ np.array(w)
        else:  # (every kept value is above the cut-off, so positive)
            d = v @ (self.c * (1.0 / s if lam == 0.0 else s / (s * s + lam * self.s0sq)))
        if not (math.isfinite(sum(d.tolist())) or finite_array(d)):
            raise StepFault("the Sven direction")
        return d if self.D is None else d / self.D  # (D is in the Jacobian's dtype, as d)

    def direction(self, lam: float) -> torch.Tensor:
        """:meth:`direction_array` as a tensor over its memory (``StepContext.direction``)."""
        d = self.direction_array(lam)
        t = torch.from_numpy(d)
        self.last = (t, d)
        return t

    def predicted(self, x: np.ndarray) -> np.ndarray:
        """The linear model's change :math:`M(\\eta\\,x)` of the residuals, in the Jacobian's dtype."""
        x = x if self.lrs is None else x * self.lrs
        return self.a @ (x if x.dtype == self.a.dtype else x.astype(self.a.dtype))  # type: ignore[no-any-return]

    def predict(self, d: torch.Tensor) -> torch.Tensor:
        """:meth:`predicted` of a tensor (``StepContext.predict``; the direction just made: its array)."""
        return torch.from_numpy(self.predicted(self.last[1] if d is self.last[0] else d.numpy()))

    def apply(self, d: torch.Tensor, sign: float) -> None:
        """:func:`sven.params.apply_direction`, one block at a time: :math:`\\theta_b \\mathrel{-}= s\\,\\eta_b d_b`.

        On the plan's detached aliases of the parameters (``TinyPlan.targets``): the in-place change bumps the
        parameters' version counters, as on the parameters themselves.
        """
        tp = self.tp
        if self.whole:
            tp.targets[0].add_(d, alpha=-sign * tp.blocks[0].lr)
            return
        for b, target in zip(tp.blocks, tp.targets):
            piece = d[b.start : b.stop]
            piece = piece if piece.dtype == b.param.dtype else piece.to(b.param.dtype)
            target.add_(piece.view_as(target), alpha=-sign * b.lr)

    def apply_array(self, d: np.ndarray) -> None:
        """:meth:`apply` of an array (``sign`` 1). One flat parameter with ``lr = 1`` (:attr:`unit`) is changed on
        its NumPy view, :math:`\\theta \\leftarrow \\theta - d`, its version counter bumped as an in-place torch
        operation bumps it (:func:`torch.autograd.graph.increment_version`): the same values as ``add_`` with
        ``alpha = -1``, whose fused :math:`\\theta + \\alpha d` rounds :math:`\\theta - d` once, as the subtraction."""
        if self.unit:
            view = self.tp.views[0]
            np.subtract(view, d, out=view)
            increment_version(self.tp.targets)
        else:
            self.apply(torch.from_numpy(d), 1.0)

    def save(self) -> Callable[[], None]:
        """A snapshot of the parameters (:func:`sven.params.save_parameters`: bit for bit) and its restore."""
        tp = self.tp
        saved = [x.copy() for x in tp.views]

        def restore() -> None:  # on the NumPy views, the version counters bumped (as ``apply_array``)
            for view, x in zip(tp.views, saved):
                np.copyto(view, x)
            increment_version(tp.targets)

        return restore

    def xnorm(self) -> float:
        """:math:`\\|D\\theta\\|` (plain without the scaling)."""
        x = self.tp.flat()
        return vector_norm(x if self.D is None else x * self.D)

    def residuals_after(self) -> torch.Tensor:
        """The residuals after a try: the closure's rows (``RowSpec.evaluated``), detached (in residual mode the
        rows are the residuals: :class:`sven.control.Evaluator`'s ``residuals()``, without its layers).

        A plain tensor of the shape and dtype of the step's residuals passes ``RowSpec``'s checks (which ``R``
        passed): it is taken as it is."""
        out, R = self.closure(), self.R
        if type(out) is not torch.Tensor or out.shape != R.shape or out.dtype != R.dtype or not self.plain:
            out = self.spec.evaluated(out)
        return out.detach() if out.requires_grad else out

    def reject(self) -> None:
        self.opt._counters["rejected_steps"] += 1

    def context(self) -> StepContext:
        """The :class:`~sven.control.StepContext` of :func:`sven.step_context.step_context`, on these arrays."""
        opt, R, blocks = self.opt, self.R, self.tp.blocks
        return StepContext(
            F=self.F,
            R=R,
            loss=lambda: opt.rows.mean_loss(R),
            direction=self.direction,
            apply=self.apply,
            predict=self.predict,
            norm=lambda d: float(lr_scaled(blocks, d).double().norm()),
            save=self.save,
            reject=self.reject,
            evaluate=Evaluator(self.residuals_after, self.spec),
            xnorm=self.xnorm,
            resolve=None,
            cosine=lambda: self.cos,
        )


def run(policy: Any, lean: Lean) -> Outcome:
    """``policy.run`` on ``lean``: the twin of :class:`~sven.control.AdaptiveDamping` or
    :class:`~sven.trust_region.TrustRegion` (module docstring), the policy's own ``run`` for any other."""
    kind = type(policy)
    if kind is AdaptiveDamping:
        return _adaptive(policy, lean)
    if kind is TrustRegion:
        return _trust_region(policy, lean)
    return policy.run(lean.context())  # type: ignore[no-any-return]


def _tried(lean: Lean, d: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Apply ``d`` (after its predicted change, taken first as the general controls do) and re-evaluate:
    the predicted change and the residuals after the try."""
    change = lean.predicted(d)
    lean.apply_array(d)
    return change, lean.residuals_after()


def _squared_norm(t: torch.Tensor) -> float:
    """:func:`sven.functional.squared_norm` of the residuals after a try (detached): on their array where they are
    float64 and small, as there (:func:`sven.functional.host`), without its dispatch."""
    if t.dtype == torch.float64 and t.dim() == 1 and t.is_cpu and t.numel() <= SF.HOST_SMALL:
        a = t.numpy()
        return float(a.dot(a))
    return SF.squared_norm(t)


def _model_distance(lean: Lean, change: np.ndarray) -> float:
    """:math:`\\|R - M\\eta d\\|^2` (:func:`sven.functional.squared_distance` of the arrays)."""
    r = lean.r
    return squared_norm_of(r - (change if change.dtype == r.dtype else change.astype(r.dtype)))


def _adaptive(policy: AdaptiveDamping, lean: Lean) -> Outcome:
    """:meth:`sven.control.AdaptiveDamping.run`, step for step (its gain ratio: ``judge``)."""
    restore = lean.save()
    tries = 1 + policy.max_retries
    loss = lean.rr  # (SF.squared_norm(ctx.R): the same float64 sum)
    policy.peak = max(policy.peak, loss) if math.isfinite(loss) else policy.peak
    out = Outcome(damping=policy.state.lam)
    for attempt in range(tries):
        lam = out.damping = policy.state.lam
        d = lean.direction_array(lam)
        change, after = _tried(lean, d)
        out.gain_ratio = SF.gain_ratio_of(loss, _squared_norm(after), _model_distance(lean, change))
        if SF.madsen_nielsen_update(policy.state, out.gain_ratio, floor=policy.floor):
            out.retries, out.direction = attempt, torch.from_numpy(d)
            return out
        restore()
        lean.reject()
    out.rejected, out.retries, out.direction = True, tries, None
    out.stalled = policy.state.lam >= SF.DAMPING_MAX
    # (AdaptiveDamping.fitted is False: a subclass that overrides it never comes here, run dispatches on the type)
    _warn(lean, out, loss, policy.peak, f"the damping at its ceiling ({SF.DAMPING_MAX:g} sigma_max^2)")
    return out


def _trust_region(policy: TrustRegion, lean: Lean) -> Outcome:
    """:meth:`sven.trust_region.TrustRegion.run`, step for step (no normal equations: ``resolve`` is ``None``)."""
    restore = lean.save()
    F, R = lean.F, lean.R
    s = F.arrays[1]
    S = s.astype(np.float64, copy=False)  # (sven.trust_region._spectrum of the factors' arrays; only read)
    c = lean.c.astype(np.float64, copy=False) if F.rank else S
    fnorm2 = lean.rr
    policy.peak = max(policy.peak, fnorm2) if math.isfinite(fnorm2) else policy.peak
    xnorm = lean.xnorm()
    first = policy.radius is None
    if policy.radius is None:
        policy.radius = policy.factor * xnorm if xnorm > 0 else policy.factor
    sigma2 = float(S[0] ** 2) if S.size else 1.0
    out = Outcome(damping=policy.lam)
    for attempt in range(1 + policy.max_retries):
        lam = lm_parameter(S, c, policy.radius)
        # (every kept value is positive and lam >= 0: no zero denominator, which trust_region guards against)
        q = S * c / (S * S + lam)
        pnorm = vector_norm(q)
        if first:
            policy.radius = min(policy.radius, pnorm) if pnorm > 0 else policy.radius
            first = False
        policy.lam = out.damping = lam / sigma2
        d = lean.direction_array(policy.lam)
        pred, R_new = _tried(lean, d)
        jnorm = vector_norm(S * q)
        if pnorm > 0 and R_new.dtype == R.dtype and torch.equal(R_new, R):
            # the step is lost in round-off: converged by the tests that hold, else a stall
            restore()
            lean.reject()
            out.rejected, out.direction, out.retries = True, None, attempt
            out.converged = policy._converged(0.0, lam, pnorm, jnorm, fnorm2, fnorm2, xnorm)
            out.stalled = not out.converged
            _warn(lean, out, fnorm2, policy.peak, f"the step lost in round-off (radius {policy.radius:.3g})")
            return out
        fnew2 = _squared_norm(R_new)
        rho = out.gain_ratio = SF.gain_ratio_of(fnorm2, fnew2, _model_distance(lean, pred))
        policy._update(rho, lam, pnorm, jnorm, fnorm2, fnew2)
        kept = rho >= ACCEPT
        out.converged = policy._converged(rho, lam, pnorm, jnorm, fnorm2, fnew2, lean.xnorm() if kept else xnorm)
        if kept or out.converged:
            out.retries = attempt
            out.direction = torch.from_numpy(d) if kept else None
            if not kept:
                restore()
                lean.reject()
                out.rejected, out.direction = True, None
                # the radius fell to xtol because every try went uphill: a stall unless the point is stationary
                cos = lean.cos if "xtol" in out.converged else 0.0
                out.stalled = cos > stall_cosine(R.dtype)
                _warn(lean, out, fnorm2, policy.peak, f"the trust radius at `xtol` ({policy.radius:.3g})")
            return out
        restore()
        lean.reject()
    out.rejected, out.retries, out.direction = True, 1 + policy.max_retries, None
    out.stalled = policy.radius <= torch.finfo(F.dtype).eps * max(xnorm, 1.0)
    _warn(lean, out, fnorm2, policy.peak, f"the trust radius below round-off ({policy.radius:.3g})")
    return out


def _warn(lean: Lean, out: Outcome, loss: float, peak: float, where: str) -> None:
    """:func:`sven.control.warn_stall` on the full context, built only where it warns: a stall (``out.stalled``)
    above round-off (``loss`` over ``(1e3 eps)^2 peak``) at a point that is not stationary (its two tests)."""
    dtype = lean.R.dtype
    if out.stalled and loss > (1e3 * torch.finfo(dtype).eps) ** 2 * peak and lean.cos > stall_cosine(dtype):
        warn_stall(lean.context(), out, loss, peak, where)
