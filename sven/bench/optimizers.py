r"""One small factory per optimizer name, with its hyperparameter grid and its training-step adapter.

Every factory turns ``(model, task, hparams)`` into a :class:`Stepper`, whose
``step(x, y)`` takes one training step on one batch:

* ``sven``: :class:`sven.Sven` with the task's defaults
  (:attr:`~sven.bench.tasks.base.Task.sven_defaults`); the closure returns
  the per-sample losses, shape ``(B,)``. With ``--grid``: every combination
  of ``k`` in ``{B/4, B/2, B}``, ``lr`` in ``{0.1, 0.3, 0.5, 1.0}`` and
  ``rtol`` in ``{1e-4, 1e-3, 1e-2}`` (36 points, as in the paper);
* ``adam``, ``adamw`` (torch's ``weight_decay=0.01``), ``sgd``, ``rmsprop``: ``torch.optim`` with ``lr`` in
  ``{1e-4, 1e-3, 1e-2, 1e-1}`` on the mean loss;
* ``lbfgs``: ``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` with
  ``lr`` in ``{0.1, 0.5, 1}`` and ``max_iter`` in ``{1, 5}``, one
  ``LBFGS.step(closure)`` per batch;
* ``polyak``: :class:`sven.PolyakSGD` with ``f_star=0, max_lr=1``;
* ``sven-native`` (mini-batch tasks only): :class:`sven.Sven` with ONE
  configuration for every task (:data:`SVEN_NATIVE`; ``--grid``: the
  candidates of :data:`SVEN_NATIVE_GRID`), against the per-task ``sven`` defaults;
* ``sven-plain`` (full-batch tasks only): plain :class:`sven.Sven` on the
  residuals with a fixed damping and no step control (:data:`SVEN_PLAIN`);
* ``sven-reference``: Sven as the original research code computed it
  (:class:`ReferenceSven`): the per-sample Jacobian materialised by
  ``torch.func.jacrev`` of a ``functional_call`` on the flat parameter
  vector, a **full** ``torch.linalg.svd(full_matrices=False)``, then
  truncation to ``k`` and ``rtol``. Same hyperparameters as ``sven``; only where ``Task.sven_reference``.

On the full-batch tasks (:class:`~sven.bench.tasks.full_batch.FullBatchTask`,
the PINNs) a factory builds a :class:`FullBatchStepper` instead
(:meth:`OptimizerFactory.make_full_batch`), whose ``step()`` takes one step on
the task's residuals :math:`R`: the first-order baselines, L-BFGS and Polyak
minimise :math:`\|R\|^2` with their usual grids; ``sven`` is
:func:`sven.pinn.optimizer` (the full-batch preset) and, with ``--grid``, the
variants of :data:`SVEN_FULL_BATCH_GRID` (the preset at other ``rtol``, plain
Sven with a fixed damping). ``sven-reference`` has no full-batch form
(:meth:`OptimizerFactory.supports`).

Under ``--quick`` the baseline grids shrink (:meth:`OptimizerFactory.grid`):
``lr`` in ``{1e-3, 1e-2}`` for Adam, AdamW, SGD and RMSprop; ``lr=1, max_iter`` in
``{1, 5}`` for L-BFGS; Sven's ``--grid`` to ``k`` in ``{B/2, B}``, ``lr`` in
``{0.1, 0.5}``, ``rtol=1e-3``.
"""

from __future__ import annotations

import abc
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn
from torch.func import functional_call, jacrev

import sven

from ..pinn import PRESET, Residuals
from .tasks import AnyTask
from .tasks.base import Task
from .tasks.full_batch import FullBatchTask

__all__ = [
    "OPTIMIZERS",
    "EpochStats",
    "FullBatchStepper",
    "Hparams",
    "OptimizerFactory",
    "ReferenceSven",
    "Stepper",
    "format_hparams",
    "get_optimizer",
    "reference_direction",
    "train_epoch",
]

#: One grid point: hyperparameter name -> value.
Hparams = dict[str, float | int | bool]

#: Learning rates of the first-order baselines (docs/tasks.md).
BASELINE_LRS = (1e-4, 1e-3, 1e-2, 1e-1)
QUICK_BASELINE_LRS = (1e-3, 1e-2)
#: L-BFGS grid (docs/tasks.md).
LBFGS_LRS = (0.1, 0.5, 1.0)
LBFGS_MAX_ITERS = (1, 5)
QUICK_LBFGS = ((1.0, 1), (1.0, 5))
#: Sven's ``--grid`` (the paper's): rank as a fraction of the batch, lr, rtol.
SVEN_GRID_RANK_FRACTIONS = (0.25, 0.5, 1.0)
SVEN_GRID_LRS = (0.1, 0.3, 0.5, 1.0)
SVEN_GRID_RTOLS = (1e-4, 1e-3, 1e-2)
QUICK_SVEN_GRID = ((0.5, 1.0), (0.1, 0.5), (1e-3,))
#: Sven's ``--grid`` on the full-batch tasks: the preset (:data:`sven.pinn.PRESET`, adaptive
#: Levenberg--Marquardt damping) at two cut-offs, and plain Sven with a fixed damping and no adaptation.
SVEN_FULL_BATCH_GRID: tuple[Hparams, ...] = (
    {"lr": 1.0, "rtol": 1e-10, "adaptive_damping": True},
    {"lr": 1.0, "rtol": 1e-6, "adaptive_damping": True},
    {"lr": 1.0, "rtol": 1e-10, "adaptive_damping": False, "damping": 1e-3},
    {"lr": 1.0, "rtol": 1e-10, "adaptive_damping": False, "damping": 1e-6},
)
#: ``sven-native``: ONE configuration of the native :class:`sven.Sven` for every task (no per-task
#: tuning). ``rank_fraction`` is the rank cap as a fraction of the rows ``B`` (``0``: no cap).
#: :data:`SVEN_NATIVE_GRID` is the grid the defaults were chosen from (``sven-bench --optimizers
#: sven-native --grid``, docs/results.md): the damping policy (none, fixed Tikhonov, adaptive
#: Levenberg--Marquardt) x ``lr`` x the rank fraction x ``rtol``, then momentum and weight decay on two base
#: points (momentum with ``lr`` scaled by ``1 - momentum``, so that the long-run step length is unchanged).
SVEN_NATIVE_FRACTIONS = (0.25, 0.5, 1.0)
SVEN_NATIVE_RTOLS = (1e-4, 1e-3, 1e-2)


def _native_grid() -> tuple[Hparams, ...]:
    points: list[Hparams] = []
    for lr in (0.1, 0.3, 0.5):
        for f, rtol in itertools.product(SVEN_NATIVE_FRACTIONS, SVEN_NATIVE_RTOLS):
            points.append({"lr": lr, "rank_fraction": f, "rtol": rtol})
    for lr in (0.5, 1.0):
        for f, rtol in itertools.product(SVEN_NATIVE_FRACTIONS, SVEN_NATIVE_RTOLS):
            points.append({"lr": lr, "rank_fraction": f, "rtol": rtol, "adaptive_damping": True})
    for lr in (0.5, 1.0):
        points.append({"lr": lr, "rank_fraction": 0.5, "rtol": 1e-3, "damping": 1e-3})
    bases: tuple[Hparams, ...] = (
        {"lr": 0.3, "rank_fraction": 0.5, "rtol": 1e-3},
        {"lr": 1.0, "rank_fraction": 0.5, "rtol": 1e-3, "adaptive_damping": True},
    )
    for base in bases:
        lr = float(base["lr"])
        for extra in (
            {"lr": lr * 0.5, "momentum": 0.5},
            {"lr": lr * 0.1, "momentum": 0.9},
            {"weight_decay": 1e-5},
            {"weight_decay": 1e-4},
            {"lr": lr * 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        ):
            points.append({**base, **extra})
    return tuple(points)


SVEN_NATIVE_GRID: tuple[Hparams, ...] = _native_grid()
#: ``sven-native`` without ``--grid``: the defaults of :class:`sven.Sven` (no option passed), which are the
#: winner of that grid (:data:`sven.config.DEFAULT_LR`).
SVEN_NATIVE: Hparams = {}
#: ``sven-plain`` on the full-batch tasks: plain Sven on the residuals with a fixed Tikhonov damping
#: (no step control); the best of lr=1 x damping in {1e-3, 1e-6} and lr=0.5, damping=1e-8 in a
#: probe on poisson2d (seed 0, 8 s each).
SVEN_PLAIN: Hparams = {"lr": 1.0, "rtol": 1e-10, "damping": 1e-3}


class Stepper(Protocol):
    """Takes one training step on one batch."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Update the model's parameters from the batch ``(x, y)``.

        Returns:
            The batch loss(es) the step saw, detached (used to stop a diverged run early).
        """


class FullBatchStepper(Protocol):
    """Takes one step on a full-batch problem (the residuals it was built with)."""

    def step(self) -> torch.Tensor:
        r"""Update the model's parameters; returns the loss :math:`\|R\|^2` the step saw, detached."""


@dataclass
class EpochStats:
    """What :func:`train_epoch` measured.

    Attributes:
        step_times: wall time of each step, seconds.
        overhead: time spent outside the steps on the divergence check, seconds
            (to subtract from an epoch's wall time).
        finite: every batch loss was finite (``False``: the epoch stopped at the first that was not).
    """

    step_times: list[float] = field(default_factory=list)
    overhead: float = 0.0
    finite: bool = True


def train_epoch(stepper: Stepper, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> EpochStats:
    """Train one epoch: one ``stepper.step`` per batch, each timed.

    The uniform loop for every optimizer. The batch loss each step returns is
    checked for NaN/Inf (outside the timed steps); the epoch stops at the
    first non-finite one, so that a diverged run does not grind on.

    Args:
        stepper: the optimizer's adapter.
        batches: the epoch's ``(x, y)`` batches.

    Returns:
        The :class:`EpochStats`.
    """
    stats = EpochStats()
    for xb, yb in batches:
        t0 = time.perf_counter()
        loss = stepper.step(xb, yb)
        t1 = time.perf_counter()
        stats.step_times.append(t1 - t0)
        finite = bool(torch.isfinite(loss).all())
        stats.overhead += time.perf_counter() - t1
        if not finite:
            stats.finite = False
            break
    return stats


def format_hparams(hparams: Hparams) -> str:
    """``"lr=0.001 max_iter=5"``: a short label of a grid point (``"defaults"`` when it sets nothing)."""
    if not hparams:
        return "defaults"
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items())


# --------------------------------------------------------------------------- steppers
class _MeanLoss:
    """``zero_grad``, mean loss, ``backward``, ``step``: the usual ``torch.optim`` loop."""

    def __init__(self, model: nn.Module, task: Task, opt: torch.optim.Optimizer) -> None:
        self.model, self.task, self.opt = model, task, opt

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.task.per_sample_loss(self.model(x), y).mean()
        loss.backward()
        self.opt.step()
        return loss.detach()


class _MeanLossClosure(_MeanLoss):
    """``opt.step(closure)`` with a closure that computes the mean loss and its gradient (L-BFGS, Polyak)."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def closure() -> torch.Tensor:
            self.opt.zero_grad(set_to_none=True)
            loss = self.task.per_sample_loss(self.model(x), y).mean()
            loss.backward()
            return loss

        return torch.as_tensor(self.opt.step(closure)).detach()  # type: ignore[arg-type]


class _PerSampleClosure:
    """``sven.Sven.step(closure)`` with a closure that returns the per-sample losses, shape ``(B,)``."""

    def __init__(self, model: nn.Module, task: Task, opt: sven.Sven) -> None:
        self.model, self.task, self.opt = model, task, opt

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.opt.step(lambda: self.task.per_sample_loss(self.model(x), y))


class _FullBatch:
    r"""``opt.step`` on :math:`\|R\|^2`: plain (``closure=False``) or through a closure (L-BFGS, Polyak)."""

    def __init__(self, problem: Residuals, opt: torch.optim.Optimizer, *, closure: bool) -> None:
        self.problem, self.opt, self.closure = problem, opt, closure

    def _loss(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.problem().pow(2).sum()
        loss.backward()
        return loss

    def step(self) -> torch.Tensor:
        if self.closure:
            return torch.as_tensor(self.opt.step(self._loss)).detach()  # type: ignore[arg-type]
        loss = self._loss()
        self.opt.step()
        return loss.detach()


class _SvenFullBatch:
    """``sven.Sven.step(problem)``: the residuals are the closure."""

    def __init__(self, problem: Residuals, opt: sven.Sven) -> None:
        self.problem, self.opt = problem, opt

    def step(self) -> torch.Tensor:
        loss = self.opt.step(self.problem)
        return loss.pow(2).sum().detach() if loss is not None else torch.tensor(0.0)


# --------------------------------------------------------------------------- the original Sven step
@torch.no_grad()
def reference_direction(
    M: torch.Tensor, R: torch.Tensor, *, rank: int, rtol: float, atol: float = 1e-10
) -> torch.Tensor:
    r"""The original code's Sven direction :math:`M_k^+ R` (``svd_mode="torch"``).

    A full ``torch.linalg.svd(M, full_matrices=False)``, then: keep the first
    ``rank`` triplets; of those, keep up to the last singular value
    :math:`\sigma_i > rtol\,\sigma_1`; invert the kept values above ``atol``
    (the original's ``tol=1e-10``) and zero the others;
    :math:`d = V \operatorname{diag}(\sigma^{-1}) U^\top R`.

    Args:
        M: ``(B, P)`` Jacobian of the residuals.
        R: ``(B,)`` residuals.
        rank: ``k``, the most singular values kept.
        rtol: relative cut-off.
        atol: absolute cut-off of the inversion.

    Returns:
        ``(P,)`` direction; the step is ``-lr * d``.
    """
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    kept = (S > rtol * S[0]).nonzero()
    r = int(kept.max()) + 1 if kept.numel() else 0
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    S_inv = torch.where(S > atol, 1.0 / S, torch.zeros_like(S))
    return Vh.T @ (S_inv * (U.T @ R))


class ReferenceSven:
    r"""Sven configured like the original research code, as a plain step function on a model.

    Each step: the residuals :math:`R = \ell^{\kappa/2}` of the batch and
    their ``(B, P)`` Jacobian by ``torch.func.jacrev`` of a
    ``functional_call`` with respect to the flat parameter vector (the
    original ``SvenWrapper``), then :func:`reference_direction` (full SVD,
    then truncation), then :math:`\theta \leftarrow \theta - \eta\, d`.
    No hooks, no Gram matrix, no :mod:`truncpinv`: this is the baseline that
    ``sven.Sven`` is measured against.

    Args:
        model: the module; its parameters are updated in place.
        loss_fn: ``loss_fn(pred, y) -> (B,)`` per-sample losses.
        lr: learning rate.
        rank: ``k``.
        rtol: relative cut-off.
        kappa: residual exponent.
        atol: absolute cut-off of the inversion (the original's ``tol``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        lr: float,
        rank: int,
        rtol: float,
        kappa: float = 2.0,
        atol: float = 1e-10,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.lr, self.rank, self.rtol, self.kappa, self.atol = float(lr), int(rank), float(rtol), float(kappa), atol
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, p in zip(self.names, self.params):
            out[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One reference Sven step on the batch ``(x, y)``; returns the per-sample losses before it."""
        theta = torch.cat([p.detach().reshape(-1) for p in self.params])

        def residuals(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss = self.loss_fn(functional_call(self.model, self._unflatten(flat), (x,)), y)
            return loss.pow(self.kappa / 2.0), loss

        M, loss = jacrev(residuals, has_aux=True)(theta)
        R = loss.detach().pow(self.kappa / 2.0)
        d = reference_direction(M.detach(), R, rank=self.rank, rtol=self.rtol, atol=self.atol)
        with torch.no_grad():
            for p, new in zip(self.params, self._unflatten(theta - self.lr * d).values()):
                p.copy_(new)
        return loss.detach()


# --------------------------------------------------------------------------- factories
class OptimizerFactory(abc.ABC):
    """An optimizer name of the benchmark: its grid and how to build its :class:`Stepper`.

    Attributes:
        name: registry name (``"adam"``, ...).
        description: one line for the report.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def supports(self, task: AnyTask) -> bool:
        """Whether this optimizer runs on ``task`` (default: both kinds)."""
        return True

    def make_full_batch(self, model: nn.Module, problem: Residuals, hparams: Hparams) -> FullBatchStepper:
        """A :class:`FullBatchStepper` that trains ``model`` on the residuals ``problem``."""
        raise NotImplementedError(f"{self.name} has no full-batch form")

    @abc.abstractmethod
    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        """The grid points to run on ``task`` (the best one on validation is reported).

        Args:
            task: the task (its batch size and Sven defaults).
            quick: the reduced grid of ``--quick``.
            sven_grid: ``--grid``: Sven's own hyperparameter grid (other optimizers ignore it).
        """

    @abc.abstractmethod
    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        """A :class:`Stepper` that trains ``model`` on ``task`` with the grid point ``hparams``."""


@dataclass(frozen=True)
class _FirstOrder(OptimizerFactory):
    """A ``torch.optim`` first-order optimizer on the mean loss, over a learning-rate grid."""

    cls: type[torch.optim.Optimizer]
    label: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.label)

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"torch.optim.{self.cls.__name__}, lr in {{1e-4, 1e-3, 1e-2, 1e-1}}"

    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        return [{"lr": lr} for lr in (QUICK_BASELINE_LRS if quick else BASELINE_LRS)]

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        return _MeanLoss(model, task, self.cls(model.parameters(), lr=float(hparams["lr"])))  # type: ignore[call-arg]

    def make_full_batch(self, model: nn.Module, problem: Residuals, hparams: Hparams) -> FullBatchStepper:
        return _FullBatch(problem, self.cls(model.parameters(), lr=float(hparams["lr"])), closure=False)  # type: ignore[call-arg]


class _LBFGS(OptimizerFactory):
    name = "lbfgs"
    description = 'torch.optim.LBFGS(line_search_fn="strong_wolfe"), lr in {0.1, 0.5, 1} x max_iter in {1, 5}'

    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        points: Sequence[tuple[float, int]] = (
            QUICK_LBFGS if quick else tuple(itertools.product(LBFGS_LRS, LBFGS_MAX_ITERS))
        )
        return [{"lr": lr, "max_iter": it} for lr, it in points]

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        lr, max_iter = float(hparams["lr"]), int(hparams["max_iter"])
        opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")
        return _MeanLossClosure(model, task, opt)

    def make_full_batch(self, model: nn.Module, problem: Residuals, hparams: Hparams) -> FullBatchStepper:
        lr, max_iter = float(hparams["lr"]), int(hparams["max_iter"])
        opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")
        return _FullBatch(problem, opt, closure=True)


class _Polyak(OptimizerFactory):
    name = "polyak"
    description = "sven.PolyakSGD(f_star=0, max_lr=1)"

    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        return [{"f_star": 0.0, "max_lr": 1.0}]

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        opt = sven.PolyakSGD(model.parameters(), f_star=float(hparams["f_star"]), max_lr=float(hparams["max_lr"]))
        return _MeanLossClosure(model, task, opt)

    def make_full_batch(self, model: nn.Module, problem: Residuals, hparams: Hparams) -> FullBatchStepper:
        opt = sven.PolyakSGD(model.parameters(), f_star=float(hparams["f_star"]), max_lr=float(hparams["max_lr"]))
        return _FullBatch(problem, opt, closure=True)


def _sven_grid(task: Task, quick: bool) -> list[Hparams]:
    fractions, lrs, rtols = QUICK_SVEN_GRID if quick else (SVEN_GRID_RANK_FRACTIONS, SVEN_GRID_LRS, SVEN_GRID_RTOLS)
    kappa = float(task.sven_defaults.get("kappa", 2.0))
    return [
        {"lr": lr, "rank": max(1, int(f * task.batch_size)), "rtol": rtol, "kappa": kappa}
        for f, lr, rtol in itertools.product(fractions, lrs, rtols)
    ]


class _Sven(OptimizerFactory):
    name = "sven"
    description = "sven.Sven (truncpinv, per-sample Jacobian by hooks), the task's defaults or --grid"

    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        if isinstance(task, FullBatchTask):
            return [dict(p) for p in SVEN_FULL_BATCH_GRID] if sven_grid else [dict(task.sven_defaults)]
        return _sven_grid(task, quick) if sven_grid else [dict(task.sven_defaults)]

    def make_full_batch(self, model: nn.Module, problem: Residuals, hparams: Hparams) -> FullBatchStepper:
        """:func:`sven.pinn.optimizer` (:data:`sven.pinn.PRESET`) with the grid point's options on top."""
        return _SvenFullBatch(problem, sven.Sven(model.parameters(), **{**PRESET, **hparams}))

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        opt = sven.Sven(
            model.parameters(),
            lr=float(hparams["lr"]),
            rank=int(hparams["rank"]),
            rtol=float(hparams["rtol"]),
            kappa=float(hparams.get("kappa", 2.0)),
            adaptive_damping=False,  # the paper-era plain Sven step
        )
        return _PerSampleClosure(model, task, opt)


class _SvenNative(OptimizerFactory):
    name = "sven-native"
    description = "sven.Sven with one configuration for every task (SVEN_NATIVE), or --grid (SVEN_NATIVE_GRID)"

    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        return [dict(p) for p in SVEN_NATIVE_GRID] if sven_grid else [dict(SVEN_NATIVE)]

    @staticmethod
    def _options(hparams: Hparams) -> dict[str, float | int | bool | None]:
        """The grid point as :class:`sven.Sven` options: ``rank_fraction`` f becomes ``rank=f`` (0: no cap)."""
        opts: dict[str, float | int | bool | None] = dict(hparams)
        fraction = float(opts.pop("rank_fraction", 0.0) or 0.0)
        if fraction > 0:
            opts["rank"] = fraction  # sven.Sven keeps at most ceil(f * rows) singular values
        return opts

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        opt = sven.Sven(model.parameters(), **self._options(hparams))  # type: ignore[arg-type]
        return _PerSampleClosure(model, task, opt)

    def make_full_batch(self, model: nn.Module, problem: Residuals, hparams: Hparams) -> FullBatchStepper:
        opt = sven.Sven(model.parameters(), residuals=True, **self._options(hparams))  # type: ignore[arg-type]
        return _SvenFullBatch(problem, opt)


class _SvenPlain(OptimizerFactory):
    name = "sven-plain"
    description = "sven.Sven(residuals=True) with a fixed damping, no step control (full-batch tasks only)"

    def supports(self, task: AnyTask) -> bool:
        return isinstance(task, FullBatchTask)

    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        return [dict(SVEN_PLAIN)] if self.supports(task) else []

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        raise NotImplementedError("sven-plain runs on the full-batch tasks only")

    def make_full_batch(self, model: nn.Module, problem: Residuals, hparams: Hparams) -> FullBatchStepper:
        opt = sven.Sven(model.parameters(), residuals=True, rank=None, **hparams)  # type: ignore[arg-type]
        return _SvenFullBatch(problem, opt)


class _SvenReference(OptimizerFactory):
    name = "sven-reference"
    description = "the original code's Sven: jacrev Jacobian, full torch.linalg.svd, then truncation (task defaults)"

    def supports(self, task: AnyTask) -> bool:
        return isinstance(task, Task) and task.sven_reference  # off where its step takes seconds

    def grid(self, task: AnyTask, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        return [dict(task.sven_defaults)] if self.supports(task) else []

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        return ReferenceSven(
            model,
            task.per_sample_loss,
            lr=float(hparams["lr"]),
            rank=int(hparams["rank"]),
            rtol=float(hparams["rtol"]),
            kappa=float(hparams.get("kappa", 2.0)),
        )


#: Registry: optimizer name -> factory, in the default order of the report.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    f.name: f
    for f in (
        _Sven(),
        _FirstOrder(torch.optim.Adam, "adam"),
        _FirstOrder(torch.optim.AdamW, "adamw"),
        _FirstOrder(torch.optim.SGD, "sgd"),
        _FirstOrder(torch.optim.RMSprop, "rmsprop"),
        _LBFGS(),
        _Polyak(),
        _SvenReference(),
        _SvenPlain(),
        _SvenNative(),
    )
}


def get_optimizer(name: str) -> OptimizerFactory:
    """The factory registered as ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
