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
:math:`A^\top z = \sqrt p \circ (z - p^\top z)`. Return them from the closure
to a :func:`optimizer` (``sven.Sven`` with ``residuals=True`` and a fixed damping).

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

import math
import numbers
from typing import Any

import numpy as np
import torch

from ._validation import check_nonneg_int, check_unit_interval
from .optim import Sven

__all__ = ["PRESET", "cross_entropy", "cross_entropy_targets", "optimizer"]

#: The :class:`sven.Sven` options of :func:`optimizer`, for a closure that returns :func:`cross_entropy` rows:
#:
#: * ``residuals=True``: the rows are residuals;
#: * a fixed damping ``0.1`` (relative to :math:`\sigma_{max}^2`), ``lr=0.5``, no adaptive damping. Of the
#:   damping and ``lr`` pairs run on the MNIST-5000 MLP and the sklearn digits MLP (three seeds each), it had
#:   the lowest worst-case test loss relative to the best-tuned Adam (1.11x and 1.08x; damping ``0.3`` with
#:   ``lr=1``: 1.07x and 1.28x). The undamped GGN step diverged on digits, and so did damping ``0.03`` at
#:   ``lr=1``. The adaptive Levenberg--Marquardt damping judges a step by the squared rows
#:   (:math:`\chi^2(q\|p)`), not by the cross-entropy: it rejected half the steps on digits, and with rows
#:   rescaled to make that judgement exact it let the damping fall and overfitted (MNIST-5000 test loss
#:   0.99 against Adam's 0.27). docs/sven.md ("Classifiers") has the measurements.
PRESET: dict[str, Any] = {"lr": 0.5, "residuals": True, "damping": 0.1, "adaptive_damping": False}


def _check_logits(logits: Any) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"`logits` must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            f"`logits` must have shape (B, C) or (B, C, d1, ...) with B >= 1 samples and C >= 1 classes "
            f"(the class dimension is 1, as in torch.nn.functional.cross_entropy), got {tuple(logits.shape)}"
        )
    return logits


def cross_entropy_targets(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The normalised target distribution ``q`` and the weight ``s`` of each sample (and position).

    :func:`torch.nn.functional.cross_entropy` with ``reduction="none"`` is
    :math:`\ell = -\sum_c w_c y_c \log p_c = s \cdot (-\sum_c q_c \log p_c)`
    with :math:`y` the (smoothed) target distribution, :math:`s = \sum_c w_c y_c`
    and :math:`q = w \circ y / s`; an ignored position has :math:`s = 0`.

    Args:
        logits: ``(B, C)`` or ``(B, C, d1, ...)``, as for ``F.cross_entropy``.
        target: class indices ``(B,)`` / ``(B, d1, ...)`` (integers in ``[0, C)``
            or ``ignore_index``), or class probabilities of the logits' shape.
        weight: optional ``(C,)`` non-negative class weights.
        ignore_index: a class-index target that contributes nothing.
        label_smoothing: :math:`\varepsilon \in [0, 1]`: :math:`y \leftarrow (1-\varepsilon) y + \varepsilon / C`.

    Returns:
        ``(q, s)``: ``q`` with the class dimension *last*, ``(B, d1, ..., C)``,
        detached and in the logits' dtype; ``s`` of shape ``(B, d1, ...)``.
    """
    logits = _check_logits(logits)
    label_smoothing = check_unit_interval("label_smoothing", label_smoothing, closed_right=True)
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"`ignore_index` must be an integer, got {ignore_index!r}")
    C = logits.shape[1]
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"`target` must be a tensor of class indices or probabilities, got {type(target).__name__}")
    dtype, device = logits.dtype, logits.device
    target = target.detach().to(device)
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"`target` as class probabilities must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        y = target.to(dtype).movedim(1, -1)
        if not bool(torch.isfinite(y).all()) or bool((y < 0).any()):
            raise ValueError("`target` probabilities must be finite and non-negative")
        keep = torch.ones(y.shape[:-1], dtype=torch.bool, device=device)
    else:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"`target` must hold integer class indices or float probabilities, got {target.dtype}")
        want = logits.shape[:1] + logits.shape[2:]
        if target.shape != want:
            raise ValueError(
                f"`target` as class indices must have shape {tuple(want)} (the logits' shape without the class "
                f"dimension 1), got {tuple(target.shape)}"
            )
        keep = target != ignore_index
        bad = keep & ((target < 0) | (target >= C))
        if bool(bad.any()):
            raise ValueError(
                f"`target` class indices must lie in [0, {C}) (C = {C} classes) or equal `ignore_index` "
                f"({ignore_index}), got {int(target[bad][0])}"
            )
        y = torch.nn.functional.one_hot(torch.where(keep, target, 0).long(), C).to(dtype)
    if label_smoothing > 0:
        y = (1 - label_smoothing) * y + label_smoothing / C
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (C,):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"`weight` must be a tensor of shape ({C},), one weight per class, got {got}")
        w = weight.detach().to(device=device, dtype=dtype)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("`weight` must hold finite, non-negative class weights")
        y = y * w
    s = y.sum(-1) * keep.to(dtype)
    q = torch.where(s[..., None] > 0, y / torch.where(s > 0, s, 1.0)[..., None], 0.0)
    return q, s


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    classes: int | None = 1,
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
    logits = _check_logits(logits)
    C = logits.shape[1]
    if classes is not None:
        classes = check_nonneg_int("classes", classes)
    q, s = cross_entropy_targets(
        logits, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    z = logits.movedim(1, -1)  # (B, d..., C)
    logp = torch.log_softmax(z.detach(), dim=-1)
    p = logp.exp()
    # the division by sqrt(p) is the one place an underflowed probability would overflow (module docstring)
    inv_root_p = torch.exp(-0.5 * logp.clamp(min=math.log(torch.finfo(z.dtype).tiny)))
    root_p = p.sqrt()
    root_s = s.sqrt()[..., None]
    lin = root_s * (root_p * (z - (p * z).sum(-1, keepdim=True)))  # sqrt(s) A^T z, p held constant
    value = root_s * (root_p - q * inv_root_p)  # sqrt(s) A^+ (p - q) = sqrt(s) (p - q) / sqrt(p)
    if classes is not None and classes < C:
        lin, value = _compress(lin, value, p, classes)
    return (lin - lin.detach() + value).movedim(-1, 1)


def _compress(lin: torch.Tensor, value: torch.Tensor, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the rows of the ``k`` most probable classes; the others become one row along their residual."""
    top = p.topk(k, dim=-1).indices
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
    r_rest = torch.where(rest, value, 0.0)
    norm = r_rest.norm(dim=-1, keepdim=True)
    u = r_rest / torch.where(norm > 0, norm, 1.0)
    lin_rest = (u * lin).sum(-1, keepdim=True)
    return torch.cat([lin.gather(-1, top), lin_rest], -1), torch.cat([value.gather(-1, top), norm], -1)


def optimizer(params: Any, **overrides: Any) -> Sven:
    """A :class:`sven.Sven` configured for :func:`cross_entropy` rows (:data:`PRESET`), with ``overrides`` on top.

    Example: ``opt = sven.losses.optimizer(model.parameters())``; then
    ``opt.step(lambda: sven.losses.cross_entropy(model(x), y))``.
    """
    return Sven(params, **{**PRESET, **overrides})
