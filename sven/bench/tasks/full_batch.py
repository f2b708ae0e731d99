"""The :class:`FullBatchTask` base class: full-batch, time-budgeted problems (the PINNs).

Unlike a :class:`~sven.bench.tasks.base.Task` (mini-batches, epochs, a
validation set), a full-batch task has one fixed residual vector
:math:`R(\\theta)` (:class:`sven.pinn.Residuals`, the closure every optimizer
steps on), a wall-time budget instead of epochs, and an error metric of its own
(:meth:`FullBatchTask.error`, e.g. the relative L2 error against the exact
solution) that plays the part of the validation loss in the runner and the report.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ...pinn import Residuals
from .base import Goal

__all__ = ["FullBatchTask", "pinn_mlp", "relative_l2"]


def pinn_mlp(width: int = 32, *, seed: int = 0, n_in: int = 2) -> nn.Sequential:
    """MLP ``n_in - width - 1`` with tanh in float64, initialised from ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, 1)).double()


@torch.no_grad()
def relative_l2(model: nn.Module, points: torch.Tensor, exact: torch.Tensor) -> float:
    """:math:`\\|u_\\theta - u^*\\|_2 / \\|u^*\\|_2` over ``points`` (``exact`` holds :math:`u^*` there)."""
    return float((model(points)[:, 0] - exact).norm() / exact.norm())


class FullBatchTask(abc.ABC):
    """A full-batch benchmark problem: residuals, a wall-time budget and an error metric.

    Subclasses set the class attributes and implement :meth:`model`,
    :meth:`problem` and :meth:`error`.

    Attributes:
        name: registry name (``"poisson2d"``, ...).
        summary: one line for the report.
        time_budget: wall time of one run in seconds (the runner's ``seconds`` overrides it).
        quick_time_budget: the budget under ``--quick``.
        target: error target of time-to-target (strictly below it counts).
        sven_defaults: the ``sven`` optimizer's grid point here (:data:`sven.pinn.PRESET`'s numbers).
        goals: what Sven should reach here (see :class:`~sven.bench.tasks.base.Goal`).
        metric_names: extra metrics of :meth:`evaluate` (the squared residual norm).
        loss_label: what the error is, for tables and plot axes.
        n_checkpoints: evaluations per run, at log-spaced wall times.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    time_budget: ClassVar[float] = 60.0
    quick_time_budget: ClassVar[float] = 2.0
    target: ClassVar[float]
    sven_defaults: ClassVar[Mapping[str, float | int | bool]] = {"lr": 1.0, "rtol": 1e-10, "adaptive_damping": True}
    goals: ClassVar[tuple[Goal, ...]] = ()
    metric_names: ClassVar[tuple[str, ...]] = ("residual_loss",)
    loss_label: ClassVar[str] = "relative L2 error on a 100x100 grid"
    n_checkpoints: ClassVar[int] = 40

    @abc.abstractmethod
    def model(self, seed: int) -> nn.Module:
        """A freshly initialised float64 model; ``seed`` controls the initial weights only."""

    @abc.abstractmethod
    def problem(self, model: nn.Module) -> Residuals:
        """The residuals of the problem on ``model`` (fixed collocation points; a closure for every optimizer)."""

    @abc.abstractmethod
    def error(self, model: nn.Module) -> float:
        """The task's error metric of ``model`` (the runner's "validation loss")."""

    def checkpoints(self, seconds: float) -> list[float]:
        """The wall times after which a run is evaluated: :attr:`n_checkpoints` log-spaced up to ``seconds``."""
        n = self.n_checkpoints
        lo = math.log(seconds / 1000.0)
        return [math.exp(lo + (math.log(seconds) - lo) * i / (n - 1)) for i in range(n)]

    def evaluate(self, model: nn.Module, problem: Residuals) -> dict[str, float]:
        """``{"loss": error, "residual_loss": ||R||^2}`` of ``model``."""
        with torch.no_grad():
            residual = float(problem().pow(2).sum())
        return {"loss": self.error(model), "residual_loss": residual}

    def describe(self) -> dict[str, Any]:
        """The task's settings, for the report."""
        return {
            "name": self.name,
            "kind": "full-batch",
            "summary": self.summary,
            "time_budget": self.time_budget,
            "target": self.target,
            "sven_defaults": dict(self.sven_defaults),
            "goals": [g.describe("error", self.target) for g in self.goals],
            "metrics": list(self.metric_names),
            "loss": self.loss_label,
            "unit": "step",
        }
