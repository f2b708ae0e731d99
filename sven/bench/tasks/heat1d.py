r"""``heat1d``: the 1-D heat equation as a space-time PINN (the second problem of the PINN work).

.. math::

    u_t = u_{xx} \text{ on } (0,1) \times (0,1), \qquad u(x, 0) = \sin(\pi x), \qquad u(0, t) = u(1, t) = 0,

exact solution :math:`u^* = e^{-\pi^2 t}\sin(\pi x)`.

* MLP 2-32-1 with tanh on :math:`(x, t)`, float64 (129 parameters);
* collocation points on the grid ``linspace(0, 1, 32)^2`` of :math:`(x, t)`:
  the 30 x 30 interior nodes for the equation, the 30 interior nodes of
  :math:`t = 0` for the initial condition, and the 30 interior nodes of
  each of :math:`x = 0` and :math:`x = 1` for the boundary (60);
* residuals :math:`(u_t - u_{xx})/\sqrt{900}`, :math:`(u(x,0) - \sin\pi x)/\sqrt{30}`
  and :math:`u/\sqrt{60}` (:mod:`sven.pinn`, ``derivative``);
* metric: the relative L2 error on the 100 x 100 grid of :math:`[0,1]^2`;
  target ``1e-5``.

No goal of its own beyond the no-stalling check; it shows whether what
holds for ``poisson2d`` carries over to a time-dependent problem.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ... import pinn
from .full_batch import FullBatchTask, pinn_mlp, relative_l2
from .poisson2d import square_points

__all__ = ["Heat1DTask", "exact"]

PI = math.pi


def exact(z: torch.Tensor) -> torch.Tensor:
    """:math:`u^* = e^{-\\pi^2 t}\\sin(\\pi x)` at ``z = (x, t)``."""
    return torch.exp(-(PI**2) * z[..., 1]) * torch.sin(PI * z[..., 0])


class Heat1DTask(FullBatchTask):
    """The ``heat1d`` task (see the module docstring for the recipe)."""

    name = "heat1d"
    summary = "1-D heat equation PINN, u_t = u_xx, u(x,0) = sin(πx), u(0,t) = u(1,t) = 0, MLP 2-32-1 tanh, float64"
    target = 1e-5

    def __init__(self) -> None:
        interior, sides = square_points(32)
        n = sides.shape[0] // 4
        self._interior = interior
        self._initial = sides[:n]  # t = 0
        self._boundary = sides[2 * n :]  # x = 0 and x = 1
        self._grid = pinn.Box([0, 0], [1, 1]).grid(100)
        self._exact = exact(self._grid)

    def model(self, seed: int) -> nn.Module:
        """MLP 2-32-1 with tanh on ``(x, t)``, float64, 129 parameters."""
        return pinn_mlp(32, seed=seed, n_in=2)

    def problem(self, model: nn.Module) -> pinn.Residuals:
        """The equation, initial and boundary residuals."""
        pde = pinn.Term(lambda u, z: pinn.derivative(u, z, 1) - pinn.derivative(u, z, 0, 0), self._interior, name="pde")
        initial = pinn.dirichlet(self._initial, lambda z: torch.sin(PI * z[0]), name="initial")
        return pinn.Residuals(model, [pde, initial, pinn.dirichlet(self._boundary)])

    def error(self, model: nn.Module) -> float:
        """Relative L2 error on the 100 x 100 grid."""
        return relative_l2(model, self._grid, self._exact)
