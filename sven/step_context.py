r"""The step context: a factorisation wired to the parameters, as the step-control policies see it.

:func:`step_context` builds the :class:`sven.control.StepContext` that :class:`sven.Sven` hands its policy
(:mod:`sven.control`): the filtered directions of the factorisation, their application through the update
stage (:mod:`sven.update`: momentum), the linear model's prediction, snapshots to undo a try, and the
re-evaluation of the closure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from truncpinv import TruncatedPinv

from . import functional as SF
from . import normal_equations as NE
from . import update
from .control import Evaluator, StepContext
from .info import StepFault
from .params import ParamBlock, apply_direction, lr_scaled, save_parameters
from .precondition import ColumnScaling, RMSProp

__all__ = ["step_context"]


def step_context(
    F: TruncatedPinv,
    R: torch.Tensor,
    M: Any,
    blocks: list[ParamBlock],
    *,
    state: Any,
    precondition: RMSProp | ColumnScaling | None,
    loss: Callable[[], float],
    evaluate: Evaluator | None,
    reject: Callable[[], None],
    exact: Callable[[], TruncatedPinv] | None = None,
    cosine: torch.Tensor | None = None,
) -> StepContext:
    """Wire a factorisation to the parameters: the :class:`StepContext` an optimizer hands its policy.

    ``M`` is the Jacobian *before* preconditioning (the linear model of ``R``);
    ``state`` holds the preconditioner's and the update stage's per-parameter
    buffers. Every ``apply`` goes through the update stage (:mod:`sven.update`:
    momentum; weight decay comes after the policy, outside the step it judges); its carry is added on the
    first ``apply`` and taken back by ``save()``'s restore; ``predict`` includes it. ``exact()``
    factorises ``M`` by the SVD, for a damping that ``F`` from the normal equations
    cannot resolve (``resolve``). ``cosine``: :func:`sven.functional.gradient_cosine` of
    ``F`` and ``R`` when the caller has it.
    """
    n = blocks[-1].stop if blocks else 0
    # the matrix-free route differentiates through the graph of the closure, recorded at these parameters:
    # a rejected try restores them, and the next prediction must still find the graph valid
    untracked = bool(getattr(M, "keeps_graph", False))
    carry = update.carry(blocks, state, n, like=blocks[0].param) if blocks else None
    carried = [carry is None]  # the carry is in the parameters (or there is none)

    def apply(d: torch.Tensor, sign: float) -> None:
        u = update.scaled(blocks, d)
        if not carried[0] and carry is not None:
            carried[0] = True
            u, sign = u * sign + carry.to(u.dtype), 1.0
        apply_direction(blocks, u, sign, untracked=untracked)

    current = [F]
    angle = [cosine]
    # Moré's D is fixed within a step (a new Jacobian updates it): read once, for every direction and xnorm
    scale = precondition.weights(blocks, state) if isinstance(precondition, ColumnScaling) else None

    def resolve(lam: float) -> TruncatedPinv:
        if exact is not None and not NE.resolves(current[0], lam):
            current[0] = ctx.F = exact()
            angle[0] = None
        return current[0]

    def cosine_of_f() -> float:
        cos = angle[0]
        if cos is None:
            cos = angle[0] = SF.gradient_cosine(current[0], R)
        return float(cos)

    def direction(lam: float) -> torch.Tensor:
        d = SF.filtered_direction(resolve(lam), R, damping=lam)
        if not SF.all_finite(d):
            raise StepFault("the Sven direction")
        if scale is not None:
            return d / (scale if scale.dtype == d.dtype else scale.to(d.dtype))
        return precondition.direction(d, blocks, state) if precondition is not None else d

    def predict(d: torch.Tensor) -> torch.Tensor:
        u = update.scaled(blocks, d)
        x = u if carry is None else u + carry.to(u.dtype)
        if any(b.lr != 1.0 for b in blocks):
            x = lr_scaled(blocks, x)
        x = x if x.dtype == M.dtype else x.to(M.dtype)
        return M @ x if isinstance(M, torch.Tensor) else M.matmat(x[:, None])[:, 0]

    def save() -> Callable[[], None]:
        params = save_parameters(blocks, untracked=untracked)
        buffers = precondition.save(blocks, state) if precondition is not None else None
        was_carried = carried[0]

        def restore() -> None:
            params()
            carried[0] = was_carried
            if buffers is not None:
                buffers()

        return restore

    def xnorm() -> float:
        x = torch.cat([b.param.detach().reshape(-1) if b.index is None else b.param.detach().reshape(-1)[b.index]
                       for b in blocks]).double()  # fmt: skip
        return SF.weighted_norm(x, scale)

    ctx = StepContext(
        F=F,
        R=R,
        loss=loss,
        direction=direction,
        apply=apply,
        predict=predict,
        norm=lambda d: float(lr_scaled(blocks, d).double().norm()),
        save=save,
        reject=reject,
        evaluate=evaluate,
        xnorm=xnorm,
        resolve=resolve,
        cosine=cosine_of_f,
    )
    return ctx
