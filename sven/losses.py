r"""Gauss--Newton rows for softmax cross-entropy: what a classifier's closure returns to Sven.

Sven's step :math:`\delta = -\eta M_k^+ R` is a Gauss--Newton step for
:math:`\tfrac12\|R\|^2`. Cross-entropy is not a sum of squares. The per-sample
forms of :class:`sven.Sven` (``kappa``) ask the linear model of every loss to
reach zero (``kappa=2``) or ``-loss`` (``kappa=1``); they ignore how the loss
curves in the logits. :func:`cross_entropy` returns residual rows whose
Gauss--Newton step is the *generalised* Gauss--Newton (GGN) step of the loss,
which keeps that curvature.

**The GGN rows.** For one sample with logits :math:`z \in \mathbb{R}^C`,
probabilities :math:`p = \mathrm{softmax}(z)` and a target distribution
:math:`q` (one-hot for a class label), the loss
:math:`\ell = -\sum_c q_c \log p_c` has gradient :math:`g = p - q` and Hessian
:math:`H = \mathrm{diag}(p) - p p^\top` in :math:`z`. The ``C x C`` matrix

.. math::

    A = \mathrm{diag}(\sqrt p) - p \sqrt{p}^\top \quad\text{has}\quad A A^\top = H
    \quad(\text{because } \textstyle\sum_c p_c = 1),

and :math:`A r = p - q` has the minimum-norm solution :math:`r = (p - q)/\sqrt p`
(:math:`\ker A = \mathrm{span}(\sqrt p)`, and :math:`\sqrt p^\top r = \sum_c (p_c - q_c) = 0`).
Rows with the values :math:`r` and the Jacobian :math:`A^\top J_z`
(:math:`J_z = \partial z / \partial \theta`) give, summed over the batch,

.. math::

    M^\top M = \sum_i J_{z_i}^\top H_i J_{z_i} \;(\text{the GGN}), \qquad
    M^\top R = \sum_i J_{z_i}^\top (p_i - q_i) \;(\text{the gradient}),

so :math:`M^+ R = (M^\top M)^+ M^\top R` is the minimum-norm GGN step, solved
in the sample space: the Sherman--Morrison--Woodbury Gauss--Newton of Ren &
Goldfarb (2019). For softmax cross-entropy the GGN is also the Fisher
information, so it is the natural-gradient step too. The linear model
:math:`\tfrac12\|R + M\delta\|^2 - \tfrac12\|R\|^2 = g^\top J\delta + \tfrac12 \delta^\top J^\top H J \delta`
is the loss's second-order model in the logits. Another square root of
``H`` (the symmetric one, from an eigendecomposition) has the same
:math:`M^\top M` and :math:`M^\top R`, hence the same step, at a higher cost.

Autograd sees the Jacobian and Sven the values because, with ``p`` held
constant, the rows are ``A^T z - (A^T z).detach() + r``, with
:math:`A^\top dz = \sqrt p \circ (dz - p^\top dz) = \sqrt p \circ d \log p`: the rows are
built from :math:`\log p = \mathrm{log\_softmax}(z)` (:func:`sven.loss_rows.ggn_rows`). Return
them from the closure to a :func:`optimizer` (``sven.Sven`` with ``residuals=True`` and a fixed
damping). A plain ``sven.Sven()`` builds the same rows by itself when its closure returns
``F.cross_entropy(logits, y, reduction="none")`` (:mod:`sven.loss_rule`).

**Fewer rows** (``classes=k``). ``C`` rows per sample cost ``C`` backward
passes on the Gram route and a ``(B C)``-sized eigenproblem. With ``classes=k``
each sample keeps the rows of its ``k`` most probable classes and replaces
the others by one row along their residual: with :math:`U` the ``C x (k+1)``
orthonormal basis of the kept coordinates and the unit vector
:math:`u \propto r_{rest}`, the rows are :math:`U^\top A^\top J_z` with values
:math:`U^\top r`. Since :math:`r \in \mathrm{range}(U)`, :math:`M^\top R` is
still the exact gradient, and the curvature :math:`J^\top A U U^\top A^\top J`
is the GGN's restriction, below it (:math:`U U^\top \preceq I`). The dropped
rows are the classes with the least probability, whose rows are small
(:math:`\|A e_c\| \le \sqrt{2 p_c}`). The default is ``classes=1``: two rows per
sample. ``classes=0`` is a single row per sample,
value :math:`\|r\| = \sqrt{\chi^2(q\|p)}` and Jacobian
:math:`\nabla_\theta\ell / \|r\|`: the GGN along the gradient only. For a
vocabulary-sized ``C`` (a language model, one position per token) use a
small ``classes``.

**Weights and soft targets.** Class weights ``w`` and soft or smoothed
targets ``y`` give :math:`\ell = -\sum_c w_c y_c \log p_c = s\,\ell(q)` with
:math:`s = \sum_c w_c y_c` and :math:`q = w \circ y / s`; the rows above are
multiplied by :math:`\sqrt s` (the loss of
:func:`torch.nn.functional.cross_entropy` with ``reduction="none"``).

**Underflow.** Where a probability underflows, :math:`q_c/\sqrt{p_c}` would
overflow: ``p_c`` is raised to the smallest normal number of the logits'
dtype (``torch.finfo(dtype).tiny``) in that division only, so the rows are
exact wherever ``p_c`` is a normal number.

Example:
    >>> import torch, sven
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    >>> opt = sven.losses.optimizer(model.parameters())
    >>> loss = lambda: float(torch.nn.functional.cross_entropy(model(x), y).detach())
    >>> before = loss()
    >>> for _ in range(5):
    ...     _ = opt.step(lambda: sven.losses.cross_entropy(model(x), y))
    >>> loss() < before
    True
"""

from __future__ import annotations

from typing import Any

import torch

from ._validation import check_nonneg_int
from .loss_rows import GGN_CLASSES, PRESET, check_logits, cross_entropy_targets, ggn_rows
from .optim import Sven

__all__ = ["PRESET", "cross_entropy", "cross_entropy_targets", "optimizer"]


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    classes: int | None = GGN_CLASSES,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Gauss--Newton residual rows of softmax cross-entropy, to return from a ``residuals=True`` closure.

    A drop-in for :func:`torch.nn.functional.cross_entropy` (``target``,
    ``weight``, ``ignore_index`` and ``label_smoothing`` mean the same): the
    rows ``R`` and their Jacobian ``M`` satisfy :math:`M^\top R = \nabla_\theta \sum \ell`
    exactly, and :math:`M^\top M` is the generalised Gauss--Newton matrix
    (restricted to ``classes + 1`` directions per sample when ``classes < C``).
    The module docstring derives them. Train with :func:`optimizer` (or
    ``sven.Sven(..., residuals=True)`` and a damping of your own).

    Args:
        logits: ``(B, C)`` or ``(B, C, d1, ...)`` (class dimension 1), with their graph.
        target: class indices ``(B, d1, ...)`` or class probabilities of the logits' shape.
        classes: keep the rows of this many most probable classes per sample and
            fold the rest into one row (default 1: two rows per sample); ``None``: all
            ``C`` rows, the exact GGN (``C`` backward passes on the Gram route, and
            no better in the measurements of docs/sven.md).
        weight: optional ``(C,)`` non-negative class weights.
        ignore_index: a class-index target whose rows are zero.
        label_smoothing: in ``[0, 1]``.

    Returns:
        Rows of shape ``(B, C', d1, ...)``, ``C' = C`` or ``classes + 1``.
        Use with ``sven.Sven(..., residuals=True)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes or values, naming the argument.

    Example:
        >>> import torch, sven
        >>> z = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
        >>> r = sven.losses.cross_entropy(z, torch.tensor([0]), classes=None)
        >>> p = torch.softmax(z.detach(), -1)
        >>> bool(torch.allclose(r.detach(), (p - torch.tensor([[1.0, 0, 0]])) / p.sqrt()))
        True
    """
    logits = check_logits(logits)
    if classes is not None:
        classes = check_nonneg_int("classes", classes)
    q, s = cross_entropy_targets(
        logits, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    logp = torch.log_softmax(logits.movedim(1, -1), dim=-1)  # (B, d..., C), with its graph
    return ggn_rows(logp, q, s, classes).movedim(-1, 1)


def optimizer(params: Any, **overrides: Any) -> Sven:
    """A :class:`sven.Sven` configured for :func:`cross_entropy` rows (:data:`PRESET`), with ``overrides`` on top.

    Example: ``opt = sven.losses.optimizer(model.parameters())``; then
    ``opt.step(lambda: sven.losses.cross_entropy(model(x), y))``.
    """
    return Sven(params, **{**PRESET, **overrides})
