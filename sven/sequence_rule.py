r"""The sequence rule of :class:`sven.Sven`: per-sequence token cross-entropy gets Nesterov momentum and a short step.

A language model's per-sample loss is the cross-entropy of its tokens reduced
over the positions of the sequence,
``F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(-1)``.
The loss rule of :mod:`sven.loss_rule` does not take it (the GGN rows of
every position diverged or became scaled gradient steps, docs/results_notes.md),
so Sven's per-sample step is used, :math:`\delta = -lr\, M^+ R` with
:math:`R_i = \ell_i` (``kappa=2``). With the defaults (``lr=0.5`` and the
adaptive Levenberg--Marquardt damping, which judges a step by
:math:`\sum_i \ell_i^2`), the damping settles at 10 to 30 times
:math:`\sigma_{max}^2` on the ``charlm`` task: the step is a scaled gradient
step, and the run stalled at 1.23x AdamW's validation loss after 300 steps.
The undamped step, shortened and accumulated with Nesterov momentum, reached
AdamW's loss there (docs/results_notes.md has the runs):

* **Recognised** (:func:`recognise_sequence`): the closure's ``(B,)`` output is,
  as autograd recorded it, a mean (or sum) over the last dimension of a
  ``(B, T)`` tensor, ``T >= 2``, that is (through views only) the output of
  ``NllLossBackward0`` or ``NllLoss2DBackward0`` with ``reduction="none"``,
  whose input is (through views only) the output of ``LogSoftmaxBackward0``
  over its class dimension (dimension 1 of that input, negative or not, or the
  last dimension of ``(B, T, C)`` logits viewed as ``(B T, C)``):
  ``F.cross_entropy(z.transpose(1, 2), y, reduction="none")``
  or ``F.cross_entropy(z.reshape(-1, C), y.reshape(-1), reduction="none").view(B, T)``,
  and ``F.nll_loss(F.log_softmax(...), ...)`` written the same ways.
* **What changes**: the step control becomes the plain step (no adaptive
  damping, :data:`SEQUENCE_OPTIONS`), and every parameter group still at the
  constructor's defaults (``lr`` the default, no momentum, no Nesterov) gets
  :data:`SEQUENCE_GROUP`: ``lr=0.02``, ``momentum=0.9``, ``nesterov=True``.
  The long-run step is then :math:`lr / (1 - \mu) = 0.2` of the pseudoinverse
  step. The rows stay the per-sample losses: the scale of the losses does not
  matter, since :math:`M^+ R` is unchanged when both are multiplied by a
  constant (so a sum over the positions gets the same step as the mean).
* **When it acts**: where the loss rule acts (``ggn=None`` and none of the
  options of :data:`sven.loss_rule.RULE_OPTIONS`, ``lr``, ``momentum``, ``nesterov`` or ``control`` given),
  at the first step, from the closure's output. A group that a learning-rate
  scheduler was attached to before the first step (it holds ``initial_lr``) keeps
  today's settings, and the optimizer warns: the scheduler would scale the
  constructor's ``lr`` of 0.5, not the preset's.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ._validation import user_stacklevel
from .loss_rule import _signed  # an int64 argument as autograd saves it

__all__ = ["SEQUENCE_GROUP", "SEQUENCE_OPTIONS", "apply_sequence_rule", "recognise_sequence"]

log = logging.getLogger("sven")

#: The global options of the sequence rule: the plain step (no adaptive damping), decided (``ggn=False``).
SEQUENCE_OPTIONS: dict[str, Any] = {"adaptive_damping": False, "ggn": False}
#: The parameter-group settings of the sequence rule. On ``charlm`` (300 steps, one seed each; docs/results_notes.md)
#: heavy-ball momentum 0.9 with ``lr`` 0.01, 0.015, 0.02 and 0.03 reached 1.06x, 1.08x, 1.05x and 1.12x AdamW's
#: validation loss, momentum 0.95 with 0.01 1.07x, the plain step with ``lr=0.1`` 1.14x, and Nesterov momentum 0.9
#: with ``lr=0.02`` 0.99x (0.99x and 0.98x on seeds 1 and 2; with ``lr=0.01`` and ``0.03``, run after the choice,
#: 1.05x and 0.98x).
SEQUENCE_GROUP: dict[str, Any] = {"lr": 0.02, "momentum": 0.9, "nesterov": True}

_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward1",
                    "UnsqueezeBackward0"})  # fmt: skip


def _through_views(fn: Any) -> Any:
    """The first node below ``fn`` (itself included) that is not a view; view nodes have one input."""
    while fn is not None and type(fn).__name__ in _VIEWS:
        fn = fn.next_functions[0][0]
    return fn


def _over_classes(source: tuple[int, ...], dim: int, seen: tuple[int, ...]) -> bool:
    """Whether a log-softmax over ``dim`` of a ``source``-shaped tensor is over the class dimension (1) of the
    ``seen``-shaped tensor that the views between them hand to ``nll_loss``. A view keeps the row-major order,
    so it maps dimension 1 to dimension 1 when both shapes start with the same two sizes (``(B, C, T)`` seen
    as ``(B, C, 1, T)`` by ``NllLoss2d``), and the fibres of the last dimension to the rows of a ``(N, C)``
    view (``(B, T, C)`` seen as ``(B T, C)``). ``dim`` may be negative."""
    d = dim % len(source) if source else -1
    return (d == 1 and source[:2] == seen[:2]) or (len(seen) == 2 and d == len(source) - 1 and seen[1] == source[-1])


def recognise_sequence(out: Any) -> bool:
    """Whether ``out`` is, as autograd recorded it, per-sequence token cross-entropy (the module docstring's form)."""
    fn = getattr(out, "grad_fn", None)
    if (
        not isinstance(out, torch.Tensor)
        or out.dim() != 1
        or type(fn).__name__ not in ("MeanBackward1", "SumBackward1")
    ):
        return False
    try:
        sizes = tuple(fn._saved_self_sym_sizes)  # type: ignore[union-attr]
        dims = tuple(_signed(d) for d in fn._saved_dim)  # type: ignore[union-attr]
        if len(sizes) != 2 or sizes[1] < 2 or fn._saved_keepdim or dims not in ((1,), (-1,)):  # type: ignore[union-attr]
            return False
        nll = _through_views(fn.next_functions[0][0])  # type: ignore[union-attr]
        if type(nll).__name__ not in ("NllLossBackward0", "NllLoss2DBackward0") or _signed(nll._saved_reduction):
            return False
        src = _through_views(nll._saved_self.grad_fn)
        if type(src).__name__ != "LogSoftmaxBackward0":
            return False
        return _over_classes(tuple(src._saved_result.shape), _signed(src._saved_dim), tuple(nll._saved_self.shape))
    except (AttributeError, RuntimeError, TypeError, IndexError):  # another torch's node layout, or a freed graph
        return False


def apply_sequence_rule(options: dict[str, Any], groups: list[dict[str, Any]], default_lr: float) -> dict[str, Any]:
    """Apply the rule to ``groups`` (in place) and return the options the run continues with.

    Args:
        options: the optimizer's options (``ggn`` still undecided).
        groups: its parameter groups; each one at the defaults (``lr == default_lr``, no momentum, no Nesterov)
            gets :data:`SEQUENCE_GROUP`.
        default_lr: the constructor's default ``lr``.

    Returns:
        ``options`` with :data:`SEQUENCE_OPTIONS`, or, if a scheduler holds a group at the default (it has
        ``initial_lr``), ``options`` with ``ggn=False`` only (today's step; a ``UserWarning`` says why).
    """
    fresh = [g for g in groups if g["lr"] == default_lr and not g.get("momentum") and not g.get("nesterov")]
    if any("initial_lr" in g for g in fresh):
        warnings.warn(
            "sven.Sven: the closure returns per-sequence token cross-entropy, whose default is lr=0.02 with Nesterov "
            "momentum 0.9 and no adaptive damping, but a learning-rate scheduler was attached before the first step "
            "and would scale lr=0.5; the defaults stay as they were. Pass lr=0.02, momentum=0.9, nesterov=True, "
            "adaptive_damping=False to the constructor to use them with the scheduler",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return {**options, "ggn": False}
    for g in fresh:
        g.update(SEQUENCE_GROUP)
    log.info(
        "sven.Sven: the closure returns per-sequence token cross-entropy, so Sven takes the plain step with "
        "lr=0.02 and Nesterov momentum 0.9 (sven.sequence_rule); ggn=False or an explicit lr turns this off"
    )
    return {**options, **SEQUENCE_OPTIONS}
