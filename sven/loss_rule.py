r"""The loss rule of :class:`sven.Sven`: softmax cross-entropy losses get the generalised Gauss--Newton rows.

The per-sample form of Sven drives every residual :math:`R_i = \sqrt{\ell_i}`
towards zero in the linear model. That suits squared errors, but not
cross-entropy: it inflates the logits, and on the classifiers of
``docs/sven.md`` ("Classifiers") the default lost to the best-tuned Adam by
1.9--2.5x at equal epochs, while the GGN rows of :mod:`sven.losses` with
a fixed damping (:data:`sven.losses.PRESET`) came within 1.1x on the MLPs. One
default cannot serve both, so the choice is made from the loss the closure
returns:

* **Recognised**: a closure output that is, as autograd recorded it, the
  per-sample loss of ``F.cross_entropy(logits, y, reduction="none")`` or
  ``nn.CrossEntropyLoss(reduction="none")`` (equivalently
  ``F.nll_loss(F.log_softmax(logits, 1), y, reduction="none")``): logits of
  shape ``(B, C)``, class-index targets, optional class ``weight`` and
  ``ignore_index``. Its ``grad_fn`` is ``NllLossBackward0`` (reduction
  ``none``) whose input is the output of ``LogSoftmaxBackward0`` over the class
  dimension. That node holds :math:`\log p` with its graph, and
  :math:`\sqrt p \circ d\log p = A^\top dz`, so the GGN rows are built from it
  (:func:`sven.loss_rows.ggn_rows`), exactly as :func:`sven.losses.cross_entropy`
  builds them from the logits.
* **Not recognised** (anything else: squared errors, label smoothing,
  probability targets, a loss reduced over positions inside the sample, a loss
  plus a penalty): Sven's behaviour is unchanged, except for a per-sequence
  token cross-entropy, which :mod:`sven.sequence_rule` recognises.

**When the rule acts** (``ggn=None``, the default): only when the user left
the options that choose the rows and the step control at their defaults:
no ``lr``, ``momentum`` or ``nesterov`` (in the constructor or a parameter group), ``control``, ``residuals``,
``kappa``, ``damping``, ``adaptive_damping``, ``max_retries``, ``scale``,
``variable_k``, ``check_step`` or ``rmsprop`` (:data:`RULE_OPTIONS`). Any of
them turns the rule off (``ggn=False``), so an explicit configuration means
what it says. The closure's output at the first step decides for the whole
run: recognised, the optimizer switches to the rows and the settings of
:data:`sven.loss_rows.RULE_PRESET` (``residuals=True``, ``lr=0.5`` and, unless
a ``weight_decay`` was given, weight decay ``1e-3``, set on every parameter
group; :class:`sven.control.CrossEntropyDamping`: the damping judged on the
cross-entropy the closure returns after each try, never below a floor that
starts at ``0.03`` and doubles on each plateau of the batches' loss up to
``0.1``; :meth:`CrossEntropyRows.evaluated` hands it those losses); it
records the choice in ``opt.config.ggn`` and ``opt.last_step.ggn`` and logs it once
(``logging`` at level INFO, logger ``"sven"``). ``step`` still returns the
closure's per-sample losses. ``ggn=True`` asks for the rows from the start
(an unrecognised output is then an error), ``ggn=False`` never uses them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ._validation import check_bool
from .linearize import LinearRows, RowSpec
from .loss_rows import GGN_CLASSES, JUDGE_EVERY, RULE_PRESET, cross_entropy_targets, ggn_rows, top_class_coefficients

__all__ = [
    "GGN_SETTINGS", "RULE_OPTIONS", "CrossEntropyLosses", "CrossEntropyRows", "recognise", "rule_weight_decay",
    "with_ggn_rule",
]  # fmt: skip

log = logging.getLogger("sven")

#: The options with which Sven takes the GGN rows: :data:`sven.loss_rows.RULE_PRESET` (its ``lr`` and
#: ``weight_decay`` are per-group options, set on the parameter groups when the rule switches, :meth:`sven.Sven.step`).
GGN_SETTINGS: dict[str, Any] = {
    **{k: v for k, v in RULE_PRESET.items() if k not in ("lr", "weight_decay")},
    "ggn": True,
}
#: Options that choose the rows or the step control: setting any of them (or ``lr``, or ``control``) keeps the
#: per-sample losses unless ``ggn=True`` is asked for.
RULE_OPTIONS = (
    "residuals", "kappa", "damping", "adaptive_damping", "max_retries", "scale", "variable_k", "check_step", "rmsprop",
)  # fmt: skip


def _signed(value: Any) -> int:
    """An ``int64`` argument as autograd saves it (negative values read back as unsigned 64-bit integers)."""
    v = int(value)
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class CrossEntropyLosses:
    """What the graph of ``F.cross_entropy(logits, target, reduction="none")`` holds.

    Attributes:
        logp: ``(B, C)`` log-probabilities, with their graph.
        target: ``(B,)`` class indices.
        weight: ``(C,)`` class weights, or ``None``.
        ignore_index: the ignored class index.
    """

    logp: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    ignore_index: int

    def rows(self) -> torch.Tensor:
        """The ``(B, GGN_CLASSES + 1)`` GGN rows of these losses, flattened (sample-major)."""
        head = self.linear()
        if head is not None:  # the common graph: its own path, the same rows
            return head.graph().reshape(-1)
        q, s = cross_entropy_targets(self.logp, self.target, weight=self.weight, ignore_index=self.ignore_index)
        return ggn_rows(self.logp, q, s, GGN_CLASSES).reshape(-1)

    def linear(self) -> LinearRows | None:
        r"""The rows of :meth:`rows` as :class:`~sven.linearize.base.LinearRows` in :math:`\log p`, on the common
        graph (class-index targets, no class weight, none ignored: :func:`sven.loss_rows.top_class_rows`), else
        ``None``."""
        if GGN_CLASSES == 1 and self.weight is None and self.logp.shape[1] > 1:
            if _none_ignored(self.target, self.ignore_index):
                return LinearRows(self.logp, *top_class_coefficients(self.logp, self.target))
        return None


def _none_ignored(target: torch.Tensor, ignore_index: int) -> bool:
    """Whether no target is ``ignore_index`` (in NumPy on a view of a CPU target: one call, not three)."""
    if target.is_cpu and not target.requires_grad:
        try:
            return bool((target.numpy() != ignore_index).all())
        except RuntimeError:  # no storage of its own: inside a torch.func transform
            pass
    return bool((target != ignore_index).all())


def _shape(out: Any) -> str:
    return f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__


def recognise(out: Any) -> CrossEntropyLosses | None:
    """The softmax cross-entropy behind per-sample losses ``out``, read from their autograd graph; else ``None``.

    Recognised: ``out`` is the output of ``NllLossBackward0`` with ``reduction="none"`` on ``(B, C)`` input,
    and that input is the output of ``LogSoftmaxBackward0`` over dimension 1. Anything else, or a graph
    whose saved values cannot be read, is not recognised.
    """
    fn = getattr(out, "grad_fn", None)
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or type(fn).__name__ != "NllLossBackward0":
        return None
    try:
        if _signed(fn._saved_reduction) != 0:  # type: ignore[union-attr]
            return None
        logp, target = fn._saved_self, fn._saved_target  # type: ignore[union-attr]
        src = logp.grad_fn
        if logp.dim() != 2 or type(src).__name__ != "LogSoftmaxBackward0" or _signed(src._saved_dim) % 2 != 1:
            return None
        weight, ignore = fn._saved_weight, _signed(fn._saved_ignore_index)  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):  # another torch's node layout, or a freed graph
        return None
    if target.dim() != 1 or target.is_floating_point():
        return None
    return CrossEntropyLosses(logp, target, weight, ignore)


@dataclass(frozen=True)
class CrossEntropyRows(RowSpec):
    """The rows of a closure that returns softmax cross-entropy losses: their GGN rows, as residuals.

    With ``fallback`` (Sven's first step under the rule), an output that is not
    recognised goes through ``fallback`` instead and :attr:`found` is ``False``;
    without it, such an output is an error.
    """

    residuals: bool = True
    fallback: RowSpec | None = None
    _seen: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, out: Any) -> torch.Tensor:
        """The flattened GGN rows of the recognised losses ``out`` (kept, detached, for :meth:`output`)."""
        ce = recognise(out)
        self._seen["found"] = ce is not None
        if ce is None:
            if self.fallback is not None:
                return self.fallback(out)
            raise ValueError(
                "Sven uses the GGN rows of softmax cross-entropy (`ggn=True`, or the closure returned such losses at "
                "the first step), so the closure must return `F.cross_entropy(logits, y, reduction='none')` with its "
                "autograd graph, logits of shape (B, C) and class-index targets; pass ggn=False for other losses"
            )
        self._seen["losses"] = out.detach()
        return ce.rows()

    def linear(self, out: Any) -> LinearRows | None:
        r"""The GGN rows of the recognised losses ``out`` as :class:`~sven.linearize.base.LinearRows` in
        :math:`\log p` (kept for :meth:`output`, as by a call), where :meth:`CrossEntropyLosses.linear` gives them;
        else ``None`` (then the call gives the rows)."""
        ce = recognise(out)
        head = ce.linear() if ce is not None else None
        if head is not None:
            self._seen["found"], self._seen["losses"] = True, out.detach()
        return head

    @property
    def found(self) -> bool:
        """The last output was recognised as softmax cross-entropy losses."""
        return bool(self._seen.get("found", False))

    def mean_loss(self, rows: torch.Tensor) -> float:
        """The mean of per-sample cross-entropy losses (what :meth:`output` and :meth:`evaluated` give)."""
        return float(rows.mean())

    def evaluated(self, out: Any) -> torch.Tensor:
        """The closure's per-sample losses ``out`` after a step, detached: re-evaluated without the parameters'
        graph, they cannot give rows, and the step control judges the cross-entropy itself."""
        if not isinstance(out, torch.Tensor) or out.dim() != 1:
            raise ValueError(
                "under the loss rule the closure must keep returning the per-sample cross-entropy losses "
                f"F.cross_entropy(logits, y, reduction='none') of shape (B,), got {_shape(out)}"
            )
        return out.detach()

    def output(self, local: torch.Tensor) -> torch.Tensor:
        """The closure's per-sample losses (detached), not the rows, once they were recognised."""
        return self._seen["losses"] if self.found else local


def with_ggn_rule(options: dict[str, Any], params: Any, *, explicit: bool) -> dict[str, Any]:
    """The options with ``ggn`` resolved as far as the constructor can: ``True`` with the GGN settings, or ``False``.

    ``ggn=None`` stays ``None`` (decided at the first step) only if neither ``explicit`` (``lr``, ``control``,
    ``momentum`` or ``nesterov`` was given) nor any of :data:`RULE_OPTIONS` nor a parameter group's ``lr``,
    ``momentum`` or ``nesterov`` was set.
    """
    ggn = options.get("ggn")
    if ggn is not None and check_bool("ggn", ggn):
        return {**GGN_SETTINGS, **options, "ggn": True}
    groups = params if isinstance(params, list) else []
    group_lr = any(isinstance(g, dict) and any(k in g for k in ("lr", "momentum", "nesterov")) for g in groups)
    if ggn is None and (explicit or group_lr or any(k in options for k in RULE_OPTIONS)):
        return {**options, "ggn": False}
    return options


def decided(options: dict[str, Any], found: bool) -> dict[str, Any]:
    """The options after the first step: the GGN settings if the losses were recognised, else ``ggn=False``."""
    if found:
        log.info(
            "sven.Sven: the closure returns softmax cross-entropy losses, so Sven uses their Gauss-Newton rows "
            "with the settings of sven.loss_rows.RULE_PRESET (%s) and judge_every=%d; ggn=False turns this off",
            ", ".join(f"{k}={v}" for k, v in RULE_PRESET.items()),
            options.get("judge_every", JUDGE_EVERY),
        )
        kept = {"damping_start": options["damping_start"]} if "damping_start" in options else {}
        return {**options, **GGN_SETTINGS, **kept}
    return {**options, "ggn": False}


def rule_weight_decay(options: dict[str, Any], params: Any, weight_decay: Any) -> tuple[Any, bool]:
    """The constructor's ``weight_decay`` and whether the user set one (in the constructor or any group).

    Unset, it is :data:`sven.loss_rows.RULE_PRESET`'s with ``ggn=True`` and ``0`` otherwise; the loss rule sets
    the preset's on every group when it switches at the first step, unless the user set one.
    """
    groups = params if isinstance(params, list) else []
    given = weight_decay is not None or any(isinstance(g, dict) and "weight_decay" in g for g in groups)
    if weight_decay is not None:
        return weight_decay, given
    return (RULE_PRESET["weight_decay"] if options.get("ggn") is True else 0.0), given
