"""SGD with Polyak step sizes, the baseline of the original package."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .._validation import _is_real, check_nonneg_float, check_positive_float

__all__ = ["PolyakSGD"]


class PolyakSGD(Optimizer):
    r"""SGD whose step size is the Polyak step, per parameter group.

    .. math::

        \eta = \min\Big(\eta_{max},\ \max\Big(0,\ \frac{f(\theta) - f^*}{\|\nabla f(\theta)\|^2 + \epsilon}\Big)\Big),
        \qquad \theta \leftarrow \theta - \eta\, \nabla f(\theta),

    where :math:`\|\nabla f\|^2` is summed over the group's parameters. It
    needs an estimate :math:`f^*` of the optimal loss (``0`` for models that
    can interpolate the data). A loss already below :math:`f^*` gives no step
    (the original took a step *up* the gradient there).

    Args:
        params: parameters or parameter groups.
        f_star: estimate of the minimal loss.
        max_lr: upper bound on the step size.
        eps: added to the squared gradient norm.

    Example:
        >>> import torch
        >>> x = torch.nn.Parameter(torch.tensor([2.0, -4.0]))
        >>> opt = PolyakSGD([x])
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = 0.5 * (x ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)  # eta = 0.5 |x|^2 / |x|^2 = 0.5
        >>> x.detach().tolist()
        [1.0, -2.0]
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        f_star: float = 0.0,
        max_lr: float = 1.0,
        eps: float = 1e-8,
    ) -> None:
        if not _is_real(f_star) or f_star != f_star:
            raise ValueError(f"`f_star` must be a float, got {f_star!r}")
        check_positive_float("max_lr", max_lr)
        check_nonneg_float("eps", eps)
        super().__init__(params, {"f_star": float(f_star), "max_lr": float(max_lr), "eps": float(eps)})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Evaluate ``closure`` (which must compute the gradients) and take the Polyak step.

        Args:
            closure: zeroes the gradients, computes the scalar loss, calls
                ``backward()`` and returns the loss.

        Returns:
            The loss returned by the closure.
        """
        if closure is None:
            raise ValueError("PolyakSGD.step needs a closure that computes the loss, calls backward() and returns it")
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                "the closure must return the scalar loss (after calling backward()), "
                f"got {type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
            )
        value = float(loss.detach())
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            # as the original: a sum of squared norms (``norm() ** 2``, in the gradients' dtype), then .item()
            sq = float(sum(g.detach().norm() ** 2 for g in grads))
            lr = (value - group["f_star"]) / (sq + group["eps"])
            lr = min(max(lr, 0.0), group["max_lr"])
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
        return loss
