r"""The linear model's change of the rows from the factorisation, without a product with :math:`M`.

A damped step control (:class:`sven.control.CrossEntropyDamping`) predicts each try's change of the rows,
:math:`M\,\eta d_\lambda`, and compares it with the loss the closure returns. Through the Gram route that
product costs a pass over the layer factors (about a tenth of a step on the MNIST MLP). It is not needed:
for the filtered direction of an exact factorisation :math:`M_r = U_r \Sigma_r V_r^\top` (the kept part),

.. math::

    d_\lambda = V_r\, \phi(\Sigma_r)\, U_r^\top R, \qquad
    M V_r = U_r \Sigma_r \;\Rightarrow\;
    M d_\lambda = U_r \big(\Sigma_r \phi(\Sigma_r) \circ U_r^\top R\big),

with :math:`\phi(\sigma) = \sigma / (\sigma^2 + \lambda\sigma_1^2)` (:func:`sven.functional.filter_factors`).
:math:`M V_r = U_r \Sigma_r` holds because :math:`V_r = M^\top U_r \Sigma_r^{-1}` and
:math:`M M^\top U_r = K U_r = U_r \Sigma_r^2`: the eigenpairs of the Gram matrix :math:`K` that
:func:`truncpinv.pinv_from_gram` computed exactly (``stats["method"] == "eigh"``); the values it cut are
not in :math:`d_\lambda`, so they are not in :math:`M d_\lambda` either. That is an ``(m, r)`` product
instead of one with the ``m x n`` Jacobian; the two agree to round-off (the factors' dtype).

A :class:`sven.damped_gram.DampedGram` gives :math:`M d_\lambda = K y` of its Cholesky direction
(:math:`y = (K + \lambda I)^{-1} R`), and the product above where the direction came from its factors.

Only an exact eigendecomposition qualifies: a randomized or Lanczos factorisation gives :math:`M V_r`
only to its own accuracy, and the normal equations' :math:`U` need not be orthonormal. The direction must
also be the plain filtered one applied at one learning rate :math:`\eta`: no preconditioner (it rescales
:math:`d`), no momentum (its carry enters the prediction; weight decay does not, :mod:`sven.update`), one ``lr`` for
every parameter.
Anything else keeps the context's own ``predict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from truncpinv import TruncatedPinv

from . import functional as SF
from .control import StepContext
from .damped_gram import DampedGram
from .params import ParamBlock

__all__ = ["exact_model", "model_change", "with_factored_model"]


def exact_model(F: TruncatedPinv) -> bool:
    """Whether ``M V_r = U_r S_r`` holds to round-off for ``F``: the exact eigendecomposition of the Gram matrix
    (or a :class:`sven.damped_gram.DampedGram`, whose factors are that decomposition)."""
    return isinstance(F, DampedGram) or (F.stats.get("solver") == "from_gram" and F.stats.get("method") == "eigh")


def model_change(F: TruncatedPinv, R: torch.Tensor, *, damping: float) -> torch.Tensor:
    r""":math:`M d_\lambda = U_r (\Sigma_r \phi(\Sigma_r) \circ U_r^\top R)` for the filtered direction of ``F``.

    Equal to ``M @ sven.functional.filtered_direction(F, R, damping=damping)`` when :func:`exact_model` of
    ``F`` holds (module docstring), at the cost of two ``(m, r)`` products. In ``F``'s dtype.
    """
    Rf = R if R.dtype == F.dtype else R.to(F.dtype)
    if F.rank == 0:
        return torch.zeros_like(Rf)
    if isinstance(F, DampedGram):
        change = F.model_change(Rf, damping)
        if change is not None:
            return change
    U, S = F.U, F.S
    return U @ ((U.T @ Rf) * SF.filter_factors(S, damping=damping) * S)  # type: ignore[no-any-return]


def with_factored_model(ctx: StepContext, blocks: Sequence[ParamBlock], precondition: Any) -> StepContext:
    r"""``ctx`` whose ``predict`` of a direction from its own ``direction(lam)`` uses :func:`model_change`.

    Applies when ``precondition`` is ``None``, the blocks carry no momentum and share one
    learning rate :math:`\eta` (then ``predict(d)`` is :math:`M \eta d`); otherwise ``ctx`` is returned
    unchanged. Each ``direction(lam)`` remembers the direction it returned and the factorisation it came
    from; ``predict`` of that very tensor, if the factorisation is exact (:func:`exact_model`), is
    :math:`\eta\, M d_\lambda` from the factors, and of any other tensor (a wrapper's rescaled direction)
    the context's own product with :math:`M`. :class:`sven.Sven` applies it to every step that takes the GGN
    rows (the loss rule, or ``ggn=True``): their :class:`sven.control.CrossEntropyDamping` predicts each try.
    """
    lrs = {b.lr for b in blocks}
    if precondition is not None or any(b.momentum != 0.0 for b in blocks) or len(lrs) != 1:
        return ctx
    lr = float(lrs.pop())
    last: dict[str, Any] = {}

    def direction(lam: float) -> torch.Tensor:
        d = ctx.direction(lam)
        F = ctx.resolve(lam) if ctx.resolve is not None else ctx.F
        last.clear()
        if exact_model(F):
            last.update(d=d, F=F, lam=lam)
        return d

    def predict(d: torch.Tensor) -> torch.Tensor:
        if last.get("d") is not d:
            return ctx.predict(d)
        return lr * model_change(last["F"], ctx.R, damping=last["lam"])

    return dataclasses.replace(ctx, direction=direction, predict=predict)
