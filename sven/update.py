r"""The update stage: heavy-ball momentum and decoupled weight decay, per parameter group.

It sits between step control and the parameters: every ``apply`` of the
step-control policy (:mod:`sven.control`) goes through it. With the Sven
direction :math:`d_t` that the policy applies, momentum :math:`\mu`, weight
decay :math:`w` and learning rate :math:`\eta` of a group:

.. math::

    b_t = \mu\, b_{t-1} + d_t, \qquad
    \theta_{t+1} = \theta_t - \eta\,(s\, d_t + \mu' b_{t-1}) - \eta\, w\,\theta_t,

with :math:`s = 1,\ \mu' = \mu` (heavy ball) or, with ``nesterov``,
:math:`s = 1 + \mu,\ \mu' = \mu^2` (the step is :math:`d_t + \mu b_t`). The
weight decay is decoupled, as in AdamW: it shrinks :math:`\theta` and never
enters the buffer. The *carry* :math:`\mu' b_{t-1}` is fixed at the start of
the step and added once, on the first ``apply``; the part in :math:`d_t` is
linear, so the policies that apply a direction in pieces (variable-k) or undo
a try (adaptive damping, check-step: they restore the parameters, and with
them the carry) stay exact. The decay :math:`\eta w\,\theta_t` (:func:`decay`,
of the parameters before the step) is applied after the policy has kept a
step, outside the step it judges, as AdamW applies it outside its adaptive
step: a rejected step leaves the parameters unchanged, and the policy's
prediction of each try needs no product with :math:`M` for it (the factored
prediction of :mod:`sven.factored_model` stays available). The buffer
:math:`b` is written only after the policy has finished (:func:`commit`), so a
rejected or undone step leaves it unchanged.

The buffers (``"heavy_ball"``) live in the optimizer's per-parameter
``state`` and are saved by ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .params import ParamBlock, state_slice, store_slice

__all__ = ["BUFFER", "apply_decay", "carry", "commit", "decay", "scaled"]

#: Name of the momentum buffer in the optimizer's per-parameter state.
BUFFER = "heavy_ball"

_State = dict[Any, dict[str, torch.Tensor]]


def scaled(blocks: Sequence[ParamBlock], d: torch.Tensor) -> torch.Tensor:
    r"""``s_b d_b``: ``(1 + momentum) d`` for Nesterov blocks, ``d`` otherwise."""
    if not any(b.nesterov and b.momentum != 0.0 for b in blocks):
        return d
    out = d.clone()
    for b in blocks:
        if b.nesterov and b.momentum != 0.0:
            out[b.start : b.stop] *= 1.0 + b.momentum
    return out


def carry(blocks: Sequence[ParamBlock], state: _State, n: int, like: torch.Tensor) -> torch.Tensor | None:
    r"""The carry :math:`c = \mu' b_{t-1}` in Jacobian columns (``None`` when it is zero)."""
    if not any(b.momentum != 0.0 and BUFFER in state.get(b.param, {}) for b in blocks):
        return None
    c = torch.zeros(n, dtype=like.dtype, device=like.device)
    for b in blocks:
        if b.momentum != 0.0 and BUFFER in state.get(b.param, {}):
            mu = b.momentum * b.momentum if b.nesterov else b.momentum
            c[b.start : b.stop].add_(state_slice(state[b.param], b, BUFFER).to(c.dtype), alpha=mu)
    return c


def decay(blocks: Sequence[ParamBlock]) -> list[torch.Tensor | None] | None:
    r"""The decoupled weight decay :math:`w\,\theta_t` of each block, of the parameters now (``None`` for a block
    without decay; ``None`` when no block has one): each block's own tensor, the parameter's shape (its
    ``index`` entries for a gathered block), from one fused product per decay rate.

    :class:`sven.Sven` applies it (:func:`apply_decay`, times each block's ``lr``) once the step control has kept
    the step.
    """
    rates = {b.weight_decay for b in blocks if b.weight_decay != 0.0}
    if not rates:
        return None
    terms: list[torch.Tensor | None] = [None] * len(blocks)
    for w in rates:
        mine = [i for i, b in enumerate(blocks) if b.weight_decay == w]
        thetas = [_decayed(blocks[i]) for i in mine]
        for i, t in zip(mine, torch._foreach_mul(thetas, w)):
            terms[i] = t
    return terms


def _decayed(b: ParamBlock) -> torch.Tensor:
    theta = b.param.detach()
    return theta if b.index is None else theta.reshape(-1)[b.index]


def apply_decay(blocks: Sequence[ParamBlock], terms: Sequence[torch.Tensor | None]) -> None:
    r""":math:`\theta \leftarrow \theta - \eta\,(w\,\theta_t)` for the terms of :func:`decay` (one fused call per
    learning rate; ``index_add_`` for a gathered block), in place: call it under ``torch.no_grad()``."""
    by_lr: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for b, t in zip(blocks, terms):
        if t is None or b.lr == 0.0:
            continue
        if b.index is not None:
            b.param.view(-1).index_add_(0, b.index, t, alpha=-b.lr)
        else:
            ps, ts = by_lr.setdefault(b.lr, ([], []))
            ps.append(b.param)
            ts.append(t)
    for lr, (ps, ts) in by_lr.items():
        torch._foreach_add_(ps, ts, alpha=-lr)


def commit(blocks: Sequence[ParamBlock], state: _State, d: torch.Tensor | None) -> None:
    r"""After the step: :math:`b_t = \mu b_{t-1} + d_t` for the blocks with momentum (nothing if ``d`` is ``None``)."""
    if d is None:
        return
    for b in blocks:
        if b.momentum == 0.0:
            continue
        st = state[b.param]
        buf = state_slice(st, b, BUFFER)
        buf.mul_(b.momentum).add_(d[b.start : b.stop].to(buf.dtype))
        store_slice(st, b, BUFFER, buf)
