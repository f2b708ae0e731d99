r"""What a Sven step reports: :class:`StepInfo` (diagnostics) and :class:`StepFault` (a step that cannot be taken)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StepFault", "StepInfo"]


class StepFault(Exception):
    """A step cannot be taken: non-finite values or a solver failure. The parameters are unchanged.

    Args:
        what: what was non-finite (``"the Jacobian"``, ...) or, with ``fault=True``, what failed.
        fault: a failure rather than NaN/Inf.
    """

    def __init__(self, what: str, *, fault: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.fault = fault


@dataclass
class StepInfo:
    r"""Diagnostics of the last step, recorded at no extra cost.

    Attributes:
        losses: ``(B,)`` the per-sample losses (or residuals) the step used, detached.
        singular_values: every singular value the solver computed (kept or
            not), descending; ``None`` if the step was skipped. Where nothing is cut
            (the loss rule's damped step, :class:`sven.damped_gram.Untruncated`), only
            :math:`\sigma_{max}`, the damping's scale, is computed.
        rank: number of singular values kept by the truncation (under
            ``variable_k`` the step uses the first ``k_used`` of them); ``min(B, P)``
            where nothing is cut.
        cutoff: the absolute singular-value cut-off that was applied (``0`` where nothing is cut).
        skipped: the step was skipped because of non-finite values.
        jacobian_method: how the Jacobian was computed (``"hooks"``, ``"autograd"``, ``"func"``, ...).
        k_used: components kept by ``variable_k`` (``None`` otherwise).
        substep_losses: the ``variable_k`` loss after each accepted component.
        damping: the damping :math:`\lambda/\sigma_{max}^2` of the applied
            (or last tried) step.
        gain_ratio: actual over predicted decrease of :math:`\|R\|^2`
            (``adaptive_damping`` only; ``None`` on a step the loss rule's control did not judge,
            :class:`sven.control.CrossEntropyDamping`'s ``judge_every``).
        retries: rejected tries before the applied step.
        rejected: every try was rejected; the parameters are unchanged.
        capped: the step was shortened to ``trust_radius``.
        stalled: every try was rejected with the damping at its ceiling: the step control can do no more
            from here (see :class:`sven.control.AdaptiveDamping`).
        ggn: the step used the generalised Gauss--Newton rows of the closure's softmax cross-entropy losses
            (:mod:`sven.loss_rule`); ``losses`` are then the cross-entropy losses (this rank's).
        converged: the convergence tests the step control found met (``"ftol"``, ``"xtol"``; only
            :class:`sven.trust_region.TrustRegion` with those tolerances makes them).
    """

    losses: torch.Tensor
    singular_values: torch.Tensor | None = None
    rank: int = 0
    cutoff: float = float("nan")
    skipped: bool = False
    jacobian_method: str = ""
    k_used: int | None = None
    substep_losses: list[float] | None = None
    damping: float = 0.0
    gain_ratio: float | None = None
    retries: int = 0
    rejected: bool = False
    capped: bool = False
    stalled: bool = False
    ggn: bool = False
    converged: tuple[str, ...] = ()
    _gradient_cosine: torch.Tensor | float | None = field(default=None, repr=False)
    _direction: torch.Tensor | None = field(default=None, repr=False)
    _lrs: list[tuple[int, int, float]] = field(default_factory=list, repr=False)

    def record(self, outcome: Any, lrs: list[tuple[int, int, float]]) -> None:
        """Copy a step-control :class:`~sven.control.Outcome` (and the blocks' learning rates) into this record, in
        one update of its attributes (a dataclass: they live in its ``__dict__``; a curve fit's step is
        microseconds, :mod:`sven.tiny`)."""
        o = outcome
        vars(self).update(
            damping=o.damping, gain_ratio=o.gain_ratio, retries=o.retries, rejected=o.rejected, capped=o.capped,
            k_used=o.k_used, substep_losses=o.substep_losses, stalled=o.stalled, converged=o.converged,
            _direction=o.direction, _lrs=lrs,
        )  # fmt: skip

    @property
    def gradient_cosine(self) -> float:
        r"""Stationarity before the step, :math:`\|M^\top R\| / (\sigma_{max}\|R\|)` in ``[0, 1]``
        (:func:`sven.functional.gradient_cosine`; of the preconditioned ``M``; from the kept values, or all of them
        where the step solved by Cholesky, :mod:`sven.damped_gram`: the two differ by at most ``rtol``); NaN if the
        step was skipped."""
        return float("nan") if self._gradient_cosine is None else float(self._gradient_cosine)

    @property
    def step_norm(self) -> float:
        r"""``||theta_new - theta_old||``: the norm of the applied change (computed on first access)."""
        if self._direction is None:
            return 0.0
        d = self._direction
        total = sum(float(lr * lr) * float(d[a:b].double().pow(2).sum()) for a, b, lr in self._lrs)
        return math.sqrt(total)
