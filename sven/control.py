r"""Step control: small policies that turn a factorisation into an applied step.

After the linearisation and the factorisation, a *policy* decides which
direction to apply and whether to keep it. Every policy has one interface:

.. code-block:: python

    outcome = policy.run(ctx)   # ctx: StepContext; outcome: Outcome

The :class:`StepContext` offers the factorisation ``F`` of :math:`M`, the
residuals :math:`R`, ``direction(lam)`` (the filtered Sven direction
:math:`d_\lambda = \sum_i \frac{\sigma_i}{\sigma_i^2 + \lambda\sigma_1^2} v_i u_i^\top R`,
preconditioned), ``apply(d, sign)``, ``predict(d)`` (the linear model's change of
:math:`R`), ``save()`` (a snapshot to restore), ``evaluate`` (the loss after
the step) and ``xnorm()`` (:math:`\|D\theta\|` in the column scaling). The
policy returns the applied direction and its diagnostics. :func:`sven.step_context.step_context`
wires a factorisation to the parameters as that context.

==============================  ===================================================================
policy                          rule
==============================  ===================================================================
:class:`Plain`                  apply :math:`d_0` (hard truncation only)
:class:`Tikhonov`               apply :math:`d_\lambda` for a fixed damping :math:`\lambda`
:class:`AdaptiveDamping`        Levenberg--Marquardt: gain ratio, Madsen--Nielsen update, rejection
:class:`CrossEntropyDamping`    the same, judged on the cross-entropy, never below a floor that doubles on a
                                plateau of the batches' loss (the loss rule's)
:class:`VariableK`              greedy rank: rank-one components while the loss does not increase
:class:`CheckStep`              wraps a policy: undo a step that makes the loss non-finite
:class:`TrustRadius`            wraps a policy: cap :math:`\|\eta d\|` at a radius
``TrustRegion``                 MINPACK's trust-region LM: the radius steers :math:`\lambda`
                                (:mod:`sven.trust_region`, its own file)
==============================  ===================================================================

A new step-control feature is a new class here with ``run``; it composes with
the wrappers. Pass it as ``sven.Sven(..., control=...)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from truncpinv import TruncatedPinv

from . import functional as SF
from ._validation import user_stacklevel
from .info import StepFault
from .linearize.base import RowSpec

__all__ = [
    "ADAPTIVE_DAMPING_START", "JUMP", "STALL_COSINE", "AdaptiveDamping", "CheckStep", "CrossEntropyDamping",
    "Evaluator", "Outcome", "Plain", "Policy", "StepContext", "Tikhonov", "TrustRadius", "VariableK", "evaluator",
    "make_policy", "stall_cosine", "warn_stall",
]  # fmt: skip

#: Starting damping of :class:`AdaptiveDamping` when none is given.
ADAPTIVE_DAMPING_START = 1e-3
#: A stall (every try rejected at the largest damping) warns when :math:`\|M^\top R\| / (\sigma_{max}\|R\|)`
#: exceeds this: far above the round-off of the gradient (``~ sqrt(eps)`` in float64) yet a stationary point's
#: angle can never reach it.
STALL_COSINE = 1e-4
#: :class:`CrossEntropyDamping` judges a step whose batch loss before it exceeds this many times the running level
#: of those losses, even where it could skip (batches of the sven-bench classifiers exceed 2x in 0-6 % of steps).
JUMP = 2.0


def stall_cosine(dtype: torch.dtype) -> float:
    r"""The angle :math:`\|M^\top R\| / (\sigma_{max}\|R\|)` above which a point is not stationary in ``dtype``.

    :data:`STALL_COSINE`, or :math:`10\sqrt{\epsilon}` of ``dtype`` when that is larger. Along the gradient the
    linear model promises to cut :math:`\|R\|^2` by the fraction :math:`\cos^2` at most; residuals rounded to
    :math:`\epsilon` give :math:`\|R\|^2` to a relative :math:`\epsilon` or worse, so every try is rejected once
    :math:`\cos \lesssim \sqrt{\epsilon}`: that angle is round-off, not a stall. float64 keeps ``1e-4``;
    float32 gets ``3.5e-3`` (converged float32 fits end at angles up to ``4e-4``).
    """
    return max(STALL_COSINE, 10.0 * math.sqrt(torch.finfo(dtype).eps))


@dataclass
class Evaluator:
    """Re-evaluates the closure after a step: ``rows()`` (every rank's), as residuals or as a mean loss."""

    rows: Callable[[], torch.Tensor]
    spec: RowSpec

    def residuals(self) -> torch.Tensor:
        return self.spec.residuals_of(self.rows())

    def mean_loss(self) -> float:
        return self.spec.mean_loss(self.rows())


@dataclass
class StepContext:
    """What a policy may use (see the module docstring)."""

    F: TruncatedPinv
    R: torch.Tensor
    loss: Callable[[], float]
    direction: Callable[[float], torch.Tensor]
    apply: Callable[[torch.Tensor, float], None]
    predict: Callable[[torch.Tensor], torch.Tensor]
    norm: Callable[[torch.Tensor], float]
    save: Callable[[], Callable[[], None]]
    reject: Callable[[], None]
    evaluate: Evaluator | None
    #: :math:`\|D\theta\|`: the parameters' norm in the preconditioner's column scaling (plain without one)
    xnorm: Callable[[], float] = lambda: 0.0
    #: ``resolve(lam)``: the factorisation whose damped step at ``lam`` (relative to :math:`\sigma_1^2`) is
    #: accurate: ``F``, or the SVD in its place when ``F`` came from normal equations that cannot resolve ``lam``
    #: (:mod:`sven.normal_equations`; ``F`` and ``direction`` use it from then on)
    resolve: Callable[[float], TruncatedPinv] | None = None
    #: :func:`sven.functional.gradient_cosine` of ``F`` and ``R`` (computed once, on first use)
    cosine: Callable[[], float] | None = None


@dataclass
class Outcome:
    """What a policy did: the applied direction (``None``: nothing applied) and its diagnostics."""

    direction: torch.Tensor | None = None
    damping: float = 0.0
    gain_ratio: float | None = None
    retries: int = 0
    rejected: bool = False
    capped: bool = False
    k_used: int | None = None
    substep_losses: list[float] | None = None
    stalled: bool = False
    #: the convergence tests a policy found met (:class:`sven.trust_region.TrustRegion`'s ``"ftol"``, ``"xtol"``)
    converged: tuple[str, ...] = ()


class Policy:
    """The policy interface: ``run(ctx) -> Outcome``; ``damping`` is the current :math:`\\lambda`."""

    #: The policy re-evaluates the loss (the closure, or the batch in the seed API).
    needs_evaluate: bool = False
    #: The policy's steps may carry heavy-ball momentum (``False``: :class:`sven.Sven` refuses ``momentum > 0``).
    takes_momentum: bool = True
    #: A tall Jacobian may be factorised from its normal equations, certified for each damping the policy asks
    #: for (:mod:`sven.normal_equations`; the SVD where they cannot resolve it). Off by default: the steps then
    #: differ from the SVD's by up to :data:`sven.normal_equations.ACCURACY`, not by round-off.
    normal_equations: bool = False

    @property
    def damping(self) -> float:
        return 0.0

    def expected_damping(self) -> float | None:
        """The damping the next step is expected to start from when it may use the normal equations, else ``None``.

        :class:`sven.Sven` factorises from the normal equations only when they resolve it (a hint: the step
        checks each damping it uses, ``StepContext.resolve``).
        """
        return self.damping if self.normal_equations else None

    def smallest_damping(self) -> float:
        """The smallest damping of the next step's directions if the policy uses only ``ctx.direction``, ``predict``
        and ``cosine``, else ``0``: a positive one lets the Gram route solve by Cholesky (:mod:`sven.damped_gram`)."""
        return 0.0

    def run(self, ctx: StepContext) -> Outcome:
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        """State to save with the optimizer (``damping`` and ``nu``)."""
        return {"damping": self.damping, "nu": 2.0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (stateless policies ignore it)."""


def warn_stall(ctx: StepContext, out: Outcome, loss: float, peak: float, where: str) -> None:
    r"""Warn about a stall (``out.stalled``) at a point that is not stationary, unless ``loss`` is at round-off.

    ``loss`` is :math:`\|R\|^2` before the step and ``peak`` the largest seen: residuals at
    ``(1e3 eps)^2`` of it (an exact fit) cannot be reduced by any step, which is convergence.
    """
    roundoff = (1e3 * torch.finfo(ctx.R.dtype).eps) ** 2 * peak
    if not out.stalled or loss <= roundoff:
        return
    cos = ctx.cosine() if ctx.cosine is not None else float(SF.gradient_cosine(ctx.F, ctx.R))
    if cos > stall_cosine(ctx.R.dtype):
        warnings.warn(
            f"Sven stalled: every try was rejected with {where}, but the point is not stationary "
            f"(|M^T R| / (sigma_max |R|) = {cos:.3g}). The Jacobian does not predict the closure's change: check that "
            f"the closure is differentiable in the parameters, deterministic (no dropout in training mode), and not "
            f"detached (or, with momentum, that the carried steps do not push every try uphill: "
            f"adaptive_damping=False, or momentum=0 with a `control` object such as TrustRegion).",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def evaluator(ctx: StepContext) -> Evaluator:
    """``ctx.evaluate``, or a ValueError saying that this step control needs the batch to re-evaluate the loss."""
    if ctx.evaluate is None:
        raise ValueError("this Sven configuration re-evaluates the loss after the step: pass the batch to step()")
    return ctx.evaluate


@dataclass
class Tikhonov(Policy):
    r"""Apply :math:`d_\lambda` with a fixed damping :math:`\lambda` (relative to :math:`\sigma_{max}^2`)."""

    lam: float = 0.0

    @property
    def damping(self) -> float:
        return self.lam

    def smallest_damping(self) -> float:
        return self.lam

    def run(self, ctx: StepContext) -> Outcome:
        d = ctx.direction(self.lam)
        ctx.apply(d, 1.0)
        return Outcome(direction=d, damping=self.lam)


class Plain(Tikhonov):
    """Apply the truncated pseudoinverse step :math:`d_0 = M_k^+ R` (no damping)."""

    def __init__(self) -> None:
        super().__init__(0.0)


class AdaptiveDamping(Policy):
    r"""Levenberg--Marquardt step control with rejection.

    Each try applies :math:`d_\lambda`, re-evaluates the loss and computes the
    gain ratio :math:`\rho` (actual over predicted decrease of :math:`\|R\|^2`,
    :func:`sven.functional.gain_ratio`). :math:`\lambda` is updated by the
    Madsen--Nielsen rule (:func:`sven.functional.madsen_nielsen_update`); a try
    with :math:`\rho \le 0` is undone and retried with the larger
    :math:`\lambda` on the *cached* factorisation, at most ``max_retries``
    times. When every try is rejected the parameters stay unchanged.
    ``floor`` is the smallest damping (``0``: pure Gauss--Newton steps are allowed).
    ``normal_equations=True`` lets a tall Jacobian be factorised from its normal equations
    (:mod:`sven.normal_equations`: :math:`M^\top M` instead of a QR of :math:`M`, certified for each damping).

    **Stalls are not silent.** When every try is rejected with :math:`\lambda`
    at its ceiling (:data:`sven.functional.DAMPING_MAX`), no step along the
    linear model reduces the loss; ``Outcome.stalled`` is set, and if the point
    is not stationary (:func:`sven.functional.gradient_cosine` above
    :func:`stall_cosine`) a ``RuntimeWarning`` says so: the Jacobian does not
    describe the closure (a detached or non-differentiable computation, a
    closure that changes between calls, noise). Residuals already at the
    round-off level of the largest :math:`\|R\|^2` seen (``(1e3 eps)^2`` of it: an
    exact fit) stay silent: no step can reduce them further.
    """

    needs_evaluate = True

    def __init__(
        self,
        start: float = ADAPTIVE_DAMPING_START,
        max_retries: int = 3,
        *,
        floor: float = SF.DAMPING_MIN,
        normal_equations: bool = False,
    ) -> None:
        self.state = SF.DampingState(lam=start)
        self.max_retries = max_retries
        self.floor = floor
        self.normal_equations = bool(normal_equations)
        self.peak = 0.0  # the largest ||R||^2 seen: a stall at round-off below it is convergence, not a stall

    @property
    def damping(self) -> float:
        return self.state.lam

    def smallest_damping(self) -> float:
        return min(self.state.lam, self.floor)  # (it starts at ``lam``, never falls below ``floor``)

    def state_dict(self) -> dict[str, float]:
        return {"damping": self.state.lam, "nu": self.state.nu, "peak": self.peak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "damping" in state:
            self.state = SF.DampingState(lam=float(state["damping"]), nu=float(state.get("nu", 2.0)))
        if "peak" in state:
            self.peak = float(state["peak"])

    def run(self, ctx: StepContext) -> Outcome:
        evaluate = evaluator(ctx)
        restore = ctx.save()
        tries = 1 + self.max_retries
        loss = SF.squared_norm(ctx.R)
        self.peak = max(self.peak, loss) if math.isfinite(loss) else self.peak
        gain = self.judge(ctx, evaluate, loss)
        out = Outcome(damping=self.state.lam)
        for attempt in range(tries):
            lam = out.damping = self.state.lam
            d = ctx.direction(lam)
            change = ctx.predict(d)  # first: a matrix-free M differentiates through the parameters as they were
            ctx.apply(d, 1.0)
            out.direction = d
            out.gain_ratio = gain(change)
            if SF.madsen_nielsen_update(self.state, out.gain_ratio, floor=self.floor):
                out.retries = attempt
                return out
            restore()
            ctx.reject()
        out.rejected, out.retries, out.direction = True, tries, None
        out.stalled = self.state.lam >= SF.DAMPING_MAX
        if not self.fitted(ctx):
            warn_stall(ctx, out, loss, self.peak, f"the damping at its ceiling ({SF.DAMPING_MAX:g} sigma_max^2)")
        return out

    def fitted(self, ctx: StepContext) -> bool:
        """Whether a stall here is convergence for another reason than residuals at round-off (none here)."""
        return False

    def judge(self, ctx: StepContext, evaluate: Evaluator, loss: float) -> Callable[[torch.Tensor], float]:
        r"""The gain ratio of the applied try, from the model's change ``M d`` (``loss`` = :math:`\|R\|^2`)."""

        def gain(change: torch.Tensor) -> float:
            return SF.gain_ratio_of(loss, SF.squared_norm(evaluate.residuals()), SF.squared_distance(ctx.R, change))

        return gain


class CrossEntropyDamping(AdaptiveDamping):
    r"""Levenberg--Marquardt judged on the true cross-entropy, the damping never below ``floor``: the loss rule's step.

    The GGN rows :math:`R` of softmax cross-entropy (:mod:`sven.loss_rule`) are built so that
    :math:`M^\top R` is the gradient :math:`g` and :math:`M^\top M` the GGN :math:`G` of the summed
    loss :math:`L`. Their quadratic model of a step :math:`\delta` is therefore the GGN model of :math:`L`,

    .. math::

        L(\theta + \delta) - L(\theta) \approx g^\top\delta + \tfrac12 \delta^\top G \delta
        = \tfrac12\|R + M\delta\|^2 - \tfrac12\|R\|^2,

    and each try is judged by the cross-entropy the closure returns after it (one forward pass), not by the
    rows' :math:`\chi^2`: :math:`\rho = (L_{old} - L_{new}) / (\tfrac12\|R\|^2 - \tfrac12\|R + M\delta\|^2)`.
    The damping follows the Madsen--Nielsen rule of :class:`AdaptiveDamping` but stays at or above
    ``floor`` (relative to :math:`\sigma_{max}^2`); a try with :math:`\rho \le 0` (the batch loss rose) is
    undone and retried with a larger damping, at most ``max_retries`` times; a stall warns, as there. So the
    step is the fixed-damping GGN step at ``floor`` while the model predicts the loss, and is damped further
    where it does not (the first steps from a random start, where the step overshoots and the logits blow up).
    ``evaluate.rows()`` must return the closure's per-sample cross-entropy losses after the step (as
    :class:`sven.Sven` does under the loss rule); ``ctx.loss()`` is their mean before it.

    **A floor that starts low** (``start < floor``, the loss rule's :data:`sven.loss_rows.RULE_PRESET`): the
    floor begins at ``start`` and doubles, up to ``floor``, whenever the batches stop improving: the mean of
    ``ctx.loss()`` (each batch's cross-entropy *before* its step, on a batch the step has not yet fitted) over
    a block of ``window`` steps is not at least ``gain`` (a fraction) below the previous block's
    (:meth:`observe`). A low floor takes long steps. Where the batches agree, they fit the data in fewer
    epochs; where they disagree (noisy or overlapping classes), each step fits its own batch and the next
    batch's loss stops falling: the noise floor that a too-large learning rate gives SGD, and the doubling is
    the step-size decay on that plateau. The current floor, the previous block's mean and the current block
    are saved by :meth:`state_dict`.

    **Judging only every** ``judge_every``-th step (``1``, the default: every step; the loss rule's is
    ``sven.config.SvenConfig.judge_every``). At the floor, an accepted try leaves the damping there exactly when
    :math:`\rho \ge \tfrac12` (the Madsen--Nielsen factor :math:`1 - (2\rho - 1)^3` is then at most 1), so
    judging it changes nothing and costs a forward pass. Once the last ``calm`` judged steps were all such (first
    try, the damping at the floor, :math:`\rho \ge \tfrac12`), only every ``judge_every``-th step is judged; the
    others apply the direction at the floor unjudged (``Outcome.gain_ratio`` ``None``). A judged step that is not
    calm (a rejected try, or :math:`\rho < \tfrac12`, which raises the damping) restarts the count: every step
    is judged until ``calm`` in a row are. A batch loss before the step above :data:`JUMP` times its running level
    (an exponential average over about ten steps) is judged too: an unjudged step that raised the loss shows
    there, one step late, and the judge then damps or undoes the next try before a run of unjudged steps can
    compound it. :meth:`observe` reads ``ctx.loss()``, the step's own forward pass, so the plateau test is
    unchanged. docs/results_notes.md ("Judging only every k-th step") has the gain ratios behind the rule.
    """

    def __init__(
        self, floor: float, max_retries: int = 3, *, start: float | None = None, window: int = 32, gain: float = 0.05,
        judge_every: int = 1, calm: int = 8,
    ) -> None:  # fmt: skip
        for name, value in (("judge_every", judge_every), ("calm", calm)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        self.judge_every, self.calm, self.calmed, self.unjudged = int(judge_every), int(calm), 0, 0
        self.level = math.nan
        if start is not None and not 0 < start <= floor:
            raise ValueError(f"`start` must lie in (0, floor] = (0, {floor:g}], got {start!r}")
        if isinstance(window, bool) or int(window) != window or window < 1:
            raise ValueError(f"`window` must be a positive integer, got {window!r}")
        if not 0 <= gain < 1:
            raise ValueError(f"`gain` must lie in [0, 1), got {gain!r}")
        low = floor if start is None else float(start)
        super().__init__(low, max_retries, floor=low)
        self.cap, self.window, self.gain = float(floor), int(window), float(gain)
        self.block: list[float] = []
        self.previous = math.nan

    def observe(self, loss: float) -> None:
        """Count one batch's mean cross-entropy before its step; double the floor (up to the cap) on a plateau."""
        if self.floor >= self.cap or not math.isfinite(loss):
            return
        self.block.append(float(loss))
        if len(self.block) < self.window:
            return
        mean = sum(self.block) / len(self.block)
        if mean > (1.0 - self.gain) * self.previous:  # False while ``previous`` is NaN (the first block)
            self.floor = min(self.cap, 2.0 * self.floor)
            self.state.lam = max(self.state.lam, self.floor)
        self.previous, self.block = mean, []

    def skips(self, loss: float) -> bool:
        """Whether this step goes unjudged: ``calm`` calm judged steps in a row, the damping at the floor, fewer
        than ``judge_every - 1`` unjudged steps since the last judged one, and the batch's loss before the step
        (``loss``) at most :data:`JUMP` times the running level of those losses (a jump: an unjudged step may
        have hurt)."""
        quiet = self.calmed >= self.calm and self.unjudged < self.judge_every - 1 and loss <= JUMP * self.level
        return self.judge_every > 1 and self.state.lam <= self.floor and quiet

    def run(self, ctx: StepContext) -> Outcome:
        loss = ctx.loss()
        self.observe(loss)
        skip = self.skips(loss)
        if math.isfinite(loss):  # the level: an exponential average over about ten steps
            self.level = loss if math.isnan(self.level) else 0.9 * self.level + 0.1 * loss
        if skip:
            self.unjudged += 1
            d = ctx.direction(self.state.lam)
            ctx.apply(d, 1.0)
            return Outcome(direction=d, damping=self.state.lam)
        out = super().run(ctx)
        quiet = out.retries == 0 and not out.rejected and out.damping <= self.floor and (out.gain_ratio or 0) >= 0.5
        self.calmed, self.unjudged = (self.calmed + 1 if quiet else 0), 0
        return out

    def state_dict(self) -> dict[str, float]:
        # the block is saved as its sum and count, so that every entry stays a float
        return {**super().state_dict(), "floor": self.floor, "previous": self.previous,
                "block_sum": float(sum(self.block)), "block_steps": float(len(self.block)),
                "calmed": float(self.calmed), "unjudged": float(self.unjudged), "level": self.level}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.calmed, self.unjudged = int(state.get("calmed", 0)), int(state.get("unjudged", 0))
        self.level = float(state.get("level", math.nan))
        if "floor" in state:
            self.floor, self.previous = float(state["floor"]), float(state.get("previous", math.nan))
            steps = int(state.get("block_steps", 0))
            self.block = [float(state.get("block_sum", 0.0)) / steps] * steps if steps else []

    def fitted(self, ctx: StepContext) -> bool:
        """The batch's mean cross-entropy is at most ``1e3 eps`` of its dtype: every sample is fitted (its true
        class at probability ``1 - 1e-4`` in float32), the losses are at their rounding (that of the logits'
        log-sum-exp), and no try can show a fall; a stall there is convergence, and stays silent."""
        return ctx.loss() <= 1e3 * torch.finfo(ctx.R.dtype).eps

    def judge(self, ctx: StepContext, evaluate: Evaluator, loss: float) -> Callable[[torch.Tensor], float]:
        """The gain ratio on the cross-entropy: its fall over the GGN model's predicted fall."""
        R, mean_before = ctx.R.double(), ctx.loss()

        def gain(change: torch.Tensor) -> float:
            predicted = 0.5 * (loss - SF.squared_norm(R - change.double()))
            after = evaluate.rows().double()  # the per-sample losses
            actual = after.numel() * mean_before - float(after.sum())
            return actual / predicted if predicted > 0 and math.isfinite(actual) else -math.inf

        return gain


@dataclass
class VariableK(Policy):
    r"""Greedy rank: add the rank-one components :math:`\sigma_i^{-1} v_i u_i^\top R` one at a time
    while the batch loss does not increase (:func:`sven.functional.variable_k_search`).

    The components are filtered by a fixed damping ``lam``. A trust radius does
    not apply to them (they are applied one by one).
    """

    lam: float = 0.0
    needs_evaluate = True

    @property
    def damping(self) -> float:
        return self.lam

    def run(self, ctx: StepContext) -> Outcome:
        if ctx.evaluate is None:
            raise ValueError("`variable_k=True` re-evaluates the loss after each component: pass the batch to step()")
        comps = SF.rank_one_components(ctx.F, ctx.R, damping=self.lam)
        vk = SF.variable_k_search(comps, apply=ctx.apply, evaluate=ctx.evaluate.mean_loss, reference=ctx.loss())
        applied = vk.applied if vk.applied is not None else torch.zeros(comps.shape[0], dtype=comps.dtype)
        return Outcome(direction=applied, damping=self.lam, k_used=vk.k_used, substep_losses=vk.substep_losses)


class _Wrapper(Policy):
    def __init__(self, inner: Policy) -> None:
        self.inner = inner

    @property
    def needs_evaluate(self) -> bool:  # type: ignore[override]
        return self.inner.needs_evaluate

    @property
    def damping(self) -> float:
        return self.inner.damping

    def smallest_damping(self) -> float:
        return self.inner.smallest_damping()

    def state_dict(self) -> dict[str, float]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class CheckStep(_Wrapper):
    """Re-evaluate the loss after ``inner``'s step (one forward pass) and undo a step that makes it non-finite."""

    @property
    def needs_evaluate(self) -> bool:  # type: ignore[override]
        return True

    def run(self, ctx: StepContext) -> Outcome:
        evaluate = evaluator(ctx)
        restore = ctx.save()
        out = self.inner.run(ctx)
        if SF.all_finite(evaluate.residuals()):
            return out
        restore()
        ctx.reject()
        raise StepFault("the loss after the step")


class TrustRadius(_Wrapper):
    r"""Cap the applied change at a radius: :math:`d \leftarrow d \min(1, r / \|\eta d\|)`.

    See :func:`sven.functional.cap_norm`; it wraps any policy that applies
    ``ctx.direction``.
    """

    def __init__(self, inner: Policy, radius: float) -> None:
        super().__init__(inner)
        self.radius = radius

    def run(self, ctx: StepContext) -> Outcome:
        capped = [False]

        def direction(lam: float) -> torch.Tensor:
            d = ctx.direction(lam)
            d, capped[0] = SF.cap_norm(d, radius=self.radius, norm=ctx.norm(d))
            return d

        out = self.inner.run(dataclasses.replace(ctx, direction=direction))
        out.capped = capped[0]
        return out


def make_policy(
    *,
    damping: float = 0.0,
    adaptive_damping: bool = False,
    max_retries: int = 3,
    variable_k: bool = False,
    check_step: bool = False,
    trust_radius: float | None = None,
    damping_floor: float = SF.DAMPING_MIN,
) -> Policy:
    """The policy that :class:`sven.Sven`'s keyword options describe.

    ``variable_k`` gives :class:`VariableK`; ``adaptive_damping`` gives
    :class:`AdaptiveDamping` (starting at ``damping``, or
    :data:`ADAPTIVE_DAMPING_START` when it is 0, never below ``damping_floor``), which already checks each
    step; otherwise :class:`Tikhonov` (:class:`Plain` for ``damping=0``),
    wrapped in :class:`CheckStep` if ``check_step``. ``trust_radius`` wraps
    the result in :class:`TrustRadius`.
    """
    policy: Policy
    if variable_k:
        policy = VariableK(damping)
    elif adaptive_damping:
        policy = AdaptiveDamping(damping if damping > 0 else ADAPTIVE_DAMPING_START, max_retries, floor=damping_floor)
    else:
        policy = Tikhonov(damping) if damping > 0 else Plain()
        if check_step:
            policy = CheckStep(policy)
    if trust_radius is not None:
        policy = TrustRadius(policy, trust_radius)
    return policy
