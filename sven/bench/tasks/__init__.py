"""The benchmark tasks of ``docs/tasks.md``, one per file, and their registry.

Adding a task: write a :class:`~sven.bench.tasks.base.Task` subclass in a new
file and add one line to :data:`TASKS`.
"""

from __future__ import annotations

from .base import Task, TaskData, batches, mlp, per_sample_mse
from .digits import DigitsTask
from .digits_ce import DigitsCETask
from .polynomial import PolynomialTask
from .toy1d import Toy1DTask

__all__ = ["TASKS", "Task", "TaskData", "batches", "get_task", "mlp", "per_sample_mse"]

#: Registry: task name -> task class.
TASKS: dict[str, type[Task]] = {
    "toy1d": Toy1DTask,
    "polynomial": PolynomialTask,
    "digits": DigitsTask,
    "digits-ce": DigitsCETask,
}


def get_task(name: str) -> Task:
    """A new instance of the task registered as ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()
