"""The benchmark tasks of ``docs/tasks.md``, one per file, and their registry.

Two kinds: mini-batch tasks (:class:`~sven.bench.tasks.base.Task`: data,
batches, epochs, a validation loss) and full-batch, time-budgeted tasks
(:class:`~sven.bench.tasks.full_batch.FullBatchTask`: residuals, a wall-time
budget, an error metric), the PINNs. Adding a task: write a subclass of
either in a new file and add one line to :data:`TASKS`.
"""

from __future__ import annotations

from .base import Goal, Task, TaskData, batches, mlp, per_sample_mse
from .charlm import CharLMTask
from .digits import DigitsTask
from .digits_ce import DigitsCETask
from .full_batch import FullBatchTask
from .gru import GRUTask
from .heat1d import Heat1DTask
from .mnist1d import MNIST1DTask
from .mnist_subset import MnistSubsetTask
from .mnist_subset_cnn import MnistSubsetCNNTask
from .mnist_subset_mse import MnistSubsetMSETask
from .poisson2d import Poisson2DTask
from .polynomial import PolynomialTask
from .toy1d import Toy1DTask

__all__ = [
    "TASKS",
    "AnyTask",
    "FullBatchTask",
    "Goal",
    "Task",
    "TaskData",
    "batches",
    "get_task",
    "mlp",
    "per_sample_mse",
]

#: A task of either kind.
AnyTask = Task | FullBatchTask

#: Registry: task name -> task class.
TASKS: dict[str, type[Task] | type[FullBatchTask]] = {
    "toy1d": Toy1DTask,
    "polynomial": PolynomialTask,
    "digits": DigitsTask,
    "digits-ce": DigitsCETask,
    "poisson2d": Poisson2DTask,
    "heat1d": Heat1DTask,
    "mnist-subset": MnistSubsetTask,
    "mnist-subset-mse": MnistSubsetMSETask,
    "mnist-subset-cnn": MnistSubsetCNNTask,
    "mnist1d": MNIST1DTask,
    "charlm": CharLMTask,
    "gru": GRUTask,
}


def get_task(name: str) -> AnyTask:
    """A new instance of the task registered as ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()
