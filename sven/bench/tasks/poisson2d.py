r"""``poisson2d``: the 2-D Poisson PINN of Müller & Zeinhofer (ICML 2023), recipe in ``docs/tasks.md``.

.. math::

    -\Delta u = 2\pi^2 \sin(\pi x)\sin(\pi y) \text{ on } (0,1)^2, \qquad u = 0 \text{ on the boundary},

exact solution :math:`u^* = \sin(\pi x)\sin(\pi y)`.

* MLP 2-32-1 with tanh, float64 (129 parameters), weights from the model seed;
* 900 interior collocation points: the 30 x 30 interior nodes of the grid
  ``linspace(0, 1, 32)``; 120 boundary points: the same 30 interior nodes on
  each of the four sides (corners excluded). The points are fixed, so the
  model seed is the only randomness;
* residuals :math:`(\Delta u + f)/\sqrt{900}` and :math:`u/\sqrt{120}` through
  :mod:`sven.pinn`; the training loss is their squared norm, full batch;
* metric: the relative L2 error on the 100 x 100 grid ``linspace(0, 1, 100)^2``
  against :math:`u^*`; target ``1e-6`` (the order the paper reports for its
  natural-gradient method; Adam, SGD and BFGS stay around 1e-3 to 1e-4 there).

Goals: Sven reaches 1e-6 within 60 s, and Adam given the same wall time ends
at least 100 times worse.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ... import pinn
from .base import Goal
from .full_batch import FullBatchTask, pinn_mlp, relative_l2

__all__ = ["Poisson2DTask", "exact", "source", "square_points"]

PI = math.pi


def source(x: torch.Tensor) -> torch.Tensor:
    """:math:`f = 2\\pi^2 \\sin(\\pi x)\\sin(\\pi y)` at one point (or a batch, on the last axis)."""
    return 2 * PI**2 * torch.sin(PI * x[..., 0]) * torch.sin(PI * x[..., 1])


def exact(x: torch.Tensor) -> torch.Tensor:
    """:math:`u^* = \\sin(\\pi x)\\sin(\\pi y)`."""
    return torch.sin(PI * x[..., 0]) * torch.sin(PI * x[..., 1])


def square_points(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(n-2)^2`` interior nodes and the ``4 (n-2)`` side nodes (no corners) of ``linspace(0, 1, n)^2``."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    inner = t[1:-1]
    interior = torch.stack(torch.meshgrid(inner, inner, indexing="ij"), dim=-1).reshape(-1, 2)
    zero, one = torch.zeros_like(inner), torch.ones_like(inner)
    sides = [(inner, zero), (inner, one), (zero, inner), (one, inner)]
    boundary = torch.cat([torch.stack(s, dim=-1) for s in sides])
    return interior, boundary


class Poisson2DTask(FullBatchTask):
    """The ``poisson2d`` task (see the module docstring for the recipe)."""

    name = "poisson2d"
    summary = "2-D Poisson PINN, -Δu = 2π² sin(πx) sin(πy), u = 0 on ∂(0,1)², MLP 2-32-1 tanh (129 params), float64"
    target = 1e-6
    goals: ClassVar[tuple[Goal, ...]] = (Goal("time_to_target", 60.0), Goal("loss_ratio", 1e-2))

    def __init__(self) -> None:
        self._points = square_points(32)
        self._grid = pinn.Box([0, 0], [1, 1]).grid(100)
        self._exact = exact(self._grid)

    def model(self, seed: int) -> nn.Module:
        """MLP 2-32-1 with tanh, float64, 129 parameters."""
        return pinn_mlp(32, seed=seed, n_in=2)

    def problem(self, model: nn.Module) -> pinn.Residuals:
        """``(Δu + f)/√900`` at the interior nodes and ``u/√120`` on the sides."""
        interior, boundary = self._points
        pde = pinn.Term(lambda u, x: pinn.laplacian(u, x) + source(x), interior, name="pde")
        return pinn.Residuals(model, [pde, pinn.dirichlet(boundary)])

    def error(self, model: nn.Module) -> float:
        """Relative L2 error on the 100 x 100 grid."""
        return relative_l2(model, self._grid, self._exact)
