"""The :class:`Task` base class and the helpers every task shares.

A task is one benchmark problem of ``docs/tasks.md``: a data recipe with fixed
seeds, a model built from a *model* seed, a per-sample loss, a batch size, the
seed of the batch shuffling, a validation-loss target for time-to-target and
Sven's default hyperparameters. Adding a task means adding one file with a
:class:`Task` subclass and one line in :data:`sven.bench.tasks.TASKS`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GOAL_KINDS", "ClassifierTask", "Goal", "Task", "TaskData", "accuracy", "batches", "mlp", "per_sample_mse"]


#: What a :class:`Goal` bounds, and how it reads in the report.
GOAL_KINDS = {
    "loss": "Sven's median final {loss} <= {value:g}",
    "loss_ratio": "Sven / best Adam median final {loss} <= {value:g}",
    "time_ratio": "Sven / best Adam median training time <= {value:g}",
    "time_to_target": "Sven's median time to {target:g} <= {value:g} s",
    "time_to_loss_ratio": "Sven's median time to a {loss} <= {level:g} / best Adam's training time <= {value:g}",
}


@dataclass(frozen=True)
class Goal:
    """One goal of a task for Sven (the issue's goals), checked by :func:`sven.bench.report.goals`.

    Attributes:
        kind: one of :data:`GOAL_KINDS`: an upper bound on Sven's median final
            loss, on its ratio to the best Adam's, on the ratio of training
            times, or on Sven's time to the task's target.
        value: the bound.
        level: the loss level of ``"time_to_loss_ratio"`` (Sven's time to reach it, at epoch ends).
    """

    kind: str
    value: float
    level: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in GOAL_KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(GOAL_KINDS)}, got {self.kind!r}")
        if not self.value > 0:
            raise ValueError(f"`value` must be positive, got {self.value!r}")

    def describe(self, loss: str = "loss", target: float = 0.0) -> str:
        """The goal as a sentence fragment, e.g. ``"Sven's median final loss <= 1e-08"``."""
        return GOAL_KINDS[self.kind].format(loss=loss, value=self.value, target=target, level=self.level)


def per_sample_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``((pred - y) ** 2).sum(-1)``: one loss per sample, shape ``(B,)``."""
    return ((pred - y) ** 2).sum(dim=-1)


def mlp(width: int = 16, depth: int = 3, *, seed: int = 0, n_in: int = 1, n_out: int = 1) -> nn.Sequential:
    """MLP ``n_in - width x depth - n_out`` with GELU, initialised from ``seed`` (the global RNG is untouched).

    Args:
        width: hidden width.
        depth: number of hidden layers.
        seed: seed of the default ``nn.Linear`` initialisation.
        n_in: input features.
        n_out: outputs.

    Returns:
        The ``nn.Sequential`` model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        d = n_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.GELU()]
            d = width
        layers.append(nn.Linear(d, n_out))
        return nn.Sequential(*layers)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches, in exactly the order of
    ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True, generator=generator)``
    (which draws one number for its worker seed, then a ``randperm`` for the
    epoch, then one more, unused, ``randperm`` when its sampler runs out),
    without the per-sample collation overhead.

    Args:
        x: ``(N, ...)`` inputs.
        y: ``(N, ...)`` targets.
        batch_size: samples per batch (the last batch may be smaller).
        generator: the loader's generator; its state carries over between epochs.

    Yields:
        ``(x_batch, y_batch)`` pairs.
    """
    n = x.shape[0]
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # DataLoader's _base_seed draw
    perm = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)  # RandomSampler's trailing randperm(n)[: num_samples % n]
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


@dataclass(frozen=True)
class TaskData:
    """Training and validation tensors of a task.

    Attributes:
        x_train: ``(N, d_in)`` float32 training inputs.
        y_train: ``(N, d_out)`` float32 targets, or ``(N,)`` int64 labels.
        x_val: validation inputs.
        y_val: validation targets.
        info: scalars of the recipe (standardisation constants, sizes, ...), for the report.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    info: Mapping[str, Any]

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation samples."""
        return int(self.x_val.shape[0])

    def subsample(self, n_train: int) -> TaskData:
        """The first ``n_train`` training samples (the validation set is kept whole).

        The recipes draw their training points i.i.d. (or, for ``digits``,
        from a shuffled stratified split), so a prefix is a fair subsample.

        Raises:
            ValueError: if ``n_train`` is not a positive int.
        """
        if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
            raise ValueError(f"`n_train` must be a positive int, got {n_train!r}")
        if n_train >= self.n_train:
            return self
        info = {**self.info, "n_train_full": self.n_train, "n_train": n_train}
        return TaskData(self.x_train[:n_train], self.y_train[:n_train], self.x_val, self.y_val, info)


class Task(abc.ABC):
    """A benchmark task: data recipe, model, per-sample loss and benchmark settings.

    Subclasses set the class attributes and implement :meth:`build_data` and
    :meth:`model`; :meth:`per_sample_loss` defaults to :func:`per_sample_mse`.
    The data are built once per instance (:meth:`data`) from the recipe's
    fixed seeds; the *model* seed only changes the initial weights.

    Attributes:
        name: registry name (``"toy1d"``, ...).
        summary: one line for the report.
        batch_size: training batch size.
        loader_seed: seed of the batch-shuffling generator (one per run, shared by its epochs).
        target: validation-loss target of time-to-target (strictly below it counts).
        sven_defaults: Sven's keyword arguments for this task (``lr``, ``rank``, ``rtol``, ``kappa``).
        metric_names: extra metrics returned by :meth:`metrics` (e.g. ``("accuracy",)``).
        quick_n_train: training-set size under ``--quick`` (``None``: the whole set).
        loss_label: what the validation loss is, for tables and plot axes.
        goals: what Sven should reach on this task (:class:`Goal`).
        epochs: the recipe's number of epochs, run when ``--epochs`` is not given.
        sven_reference: whether ``sven-reference`` (the original code's step: a ``jacrev`` Jacobian and a full
            SVD) runs on this task. Off for the larger models of issue #20, where its step takes seconds
            (1.7 s on the 9k-parameter CNN, 1.8 to 3.4 s on the MLPs, on a busy 2-core machine), so a run
            would take hours.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    batch_size: ClassVar[int]
    loader_seed: ClassVar[int]
    target: ClassVar[float]
    sven_defaults: ClassVar[Mapping[str, float | int]]
    metric_names: ClassVar[tuple[str, ...]] = ()
    quick_n_train: ClassVar[int | None] = None
    loss_label: ClassVar[str] = "mean per-sample MSE"
    goals: ClassVar[tuple[Goal, ...]] = ()
    epochs: ClassVar[int] = 20
    sven_reference: ClassVar[bool] = True

    def __init__(self) -> None:
        self._data: TaskData | None = None

    def data(self) -> TaskData:
        """The task's data, built on first use and cached."""
        if self._data is None:
            self._data = self.build_data()
        return self._data

    @abc.abstractmethod
    def build_data(self) -> TaskData:
        """Build the data set from the recipe's fixed seeds (deterministic)."""

    @abc.abstractmethod
    def model(self, seed: int) -> nn.Module:
        """A freshly initialised model; ``seed`` controls the initial weights only."""

    def per_sample_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses, shape ``(B,)``; the mean over the batch is the training objective."""
        return per_sample_mse(pred, y)

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Extra validation metrics named in :attr:`metric_names` (none by default)."""
        return {}

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled training batches (see :func:`batches`)."""
        return batches(data.x_train, data.y_train, self.batch_size, generator)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """``{"loss": mean per-sample loss, **metrics}`` of ``model`` on ``(x, y)``."""
        pred = model(x)
        return {"loss": float(self.per_sample_loss(pred, y).mean()), **self.metrics(pred, y)}

    def describe(self) -> dict[str, Any]:
        """The task's settings, for the report."""
        return {
            "name": self.name,
            "summary": self.summary,
            "batch_size": self.batch_size,
            "loader_seed": self.loader_seed,
            "target": self.target,
            "sven_defaults": dict(self.sven_defaults),
            "metrics": list(self.metric_names),
            "loss": self.loss_label,
            "goals": [g.describe("validation loss", self.target) for g in self.goals],
            "unit": "epoch",
            "epochs": self.epochs,
        }


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"accuracy": fraction of argmax predictions equal to the label}``."""
    return {"accuracy": float((pred.argmax(dim=-1) == y).float().mean())}


class ClassifierTask(Task):
    """A task whose model returns logits and whose labels are class indices: per-sample cross-entropy, accuracy."""

    metric_names: ClassVar[tuple[str, ...]] = ("accuracy",)
    loss_label: ClassVar[str] = "mean per-sample cross-entropy"

    def per_sample_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``cross_entropy(pred, y, reduction="none")``."""
        return F.cross_entropy(pred, y, reduction="none")

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """See :func:`accuracy`."""
        return accuracy(pred, y)
