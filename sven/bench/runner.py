"""Run (task x optimizer x grid point x seed), record the per-epoch metrics, select and aggregate.

**What one run records** (:class:`RunResult`): the validation loss at epoch 0
and after every epoch, the training time of every epoch and its running sum
(only the training steps are timed; the validation is evaluated outside the
clock), the median time of one step, time-to-target and epochs-to-target
(the first epoch end whose validation loss is strictly below the task's
target, counted in cumulative training time), and the task's extra metrics
(accuracy for the digits tasks). A run whose validation loss becomes NaN or
Inf, or whose step raises an error, stops there and is marked ``diverged``.

**Full-batch tasks** (:func:`run_full_batch`, the PINNs) have no epochs: a
run steps on the task's residuals until its wall-time budget is spent and is
evaluated (outside the clock) after the first step past each of the task's
log-spaced checkpoint times. The same :class:`RunResult` fields then hold: in
``epochs`` the steps taken at each evaluation, in ``val_loss`` the task's
error (the relative L2 error), in ``train_time`` the clock; since every run
is evaluated at the same checkpoint times, the curves of different seeds
line up entry by entry.

**Grid selection** (:func:`select_config`): every grid point of an
optimizer is run on the *selection seeds* and the point with the lowest
median final validation loss is reported (ties: the first in grid order).
By default the selection seed is the first model seed only, and the
selected point is then run on the remaining seeds: the paper's way, which
keeps the default run within about half an hour on 2 cores.
``grid_all_seeds=True`` runs every grid point on every seed and selects on
the median over all of them.

**Aggregates** (:func:`aggregate`), per (task, optimizer), over the seeds
of the selected point: median, min and max of the final validation loss, of
the total training time and of the extra metrics; the median time-to-target
(a seed that never reached the target counts as infinitely slow, so the
median is "not reached" unless more than half the seeds reached it); the
median epochs-to-target; the median step time.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from truncpinv._optional import require

from .optimizers import Hparams, OptimizerFactory, format_hparams, get_optimizer, train_epoch
from .tasks import AnyTask, FullBatchTask, Task, TaskData, get_task

__all__ = [
    "BenchConfig",
    "BenchResults",
    "RunResult",
    "aggregate",
    "machine_info",
    "run_benchmark",
    "run_full_batch",
    "run_one",
    "select_config",
]


@dataclass
class RunResult:
    """Everything measured in one run (one task, optimizer, grid point and model seed).

    Attributes:
        task: task name.
        optimizer: optimizer name.
        hparams: the grid point.
        seed: model seed.
        epochs: ``[0, 1, ..., E]`` (shorter if the run diverged); for a full-batch task the steps taken
            at each evaluation.
        val_loss: validation loss at each entry of ``epochs``.
        train_time: cumulative training time in seconds at each entry of ``epochs`` (``0.0`` first).
        epoch_time: training time of each epoch, seconds (one fewer entry than ``epochs``).
        metrics: extra validation metrics (e.g. ``"accuracy"``) at each entry of ``epochs``.
        step_time_median: median wall time of one training step, seconds.
        n_steps: training steps taken.
        time_to_target: cumulative training time at the first epoch end with validation loss below the target.
        epochs_to_target: that epoch.
        diverged: the validation loss became non-finite, or a step raised an error.
        error: the error a step raised, if any.
    """

    task: str
    optimizer: str
    hparams: Hparams
    seed: int
    epochs: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_time: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    step_time_median: float | None = None
    n_steps: int = 0
    time_to_target: float | None = None
    epochs_to_target: int | None = None
    diverged: bool = False
    error: str | None = None

    @property
    def config(self) -> str:
        """The grid point as a label, e.g. ``"lr=0.001"``."""
        return format_hparams(self.hparams)

    @property
    def final_val_loss(self) -> float:
        """Validation loss after the last epoch (NaN if the run diverged)."""
        if self.diverged or not self.val_loss:
            return math.nan
        return self.val_loss[-1]

    def time_to(self, level: float) -> float | None:
        """Training time at the first evaluation with a validation loss <= ``level`` (``None``: never)."""
        return next((t for v, t in zip(self.val_loss, self.train_time) if v <= level), None)

    @property
    def total_train_time(self) -> float:
        """Training time of the whole run, seconds."""
        return self.train_time[-1] if self.train_time else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``config``, ``final_val_loss`` and ``total_train_time`` added)."""
        d = asdict(self)
        d.update(config=self.config, final_val_loss=self.final_val_loss, total_train_time=self.total_train_time)
        return d


@dataclass(frozen=True)
class BenchConfig:
    """What to run.

    Attributes:
        tasks: task names.
        optimizers: optimizer names.
        seeds: number of model seeds (``0 .. seeds - 1``).
        epochs: epochs per run on every mini-batch task (``None``: each task's own, :attr:`Task.epochs`).
        seconds: wall-time budget of a run on a full-batch task (``None``: the task's own).
        quick: ``--quick``: subsampled training sets and reduced baseline grids.
        sven_grid: ``--grid``: Sven's own hyperparameter grid.
        grid_all_seeds: run every grid point on every seed (default: grids on the first seed only).
        threads: ``torch.set_num_threads``.
        progress: show tqdm progress bars.
    """

    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    seeds: int = 3
    epochs: int | None = None
    seconds: float | None = None
    quick: bool = False
    sven_grid: bool = False
    grid_all_seeds: bool = False
    threads: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("seeds", "epochs", "threads"):
            value = getattr(self, name)
            if name == "epochs" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if self.seconds is not None and (isinstance(self.seconds, bool) or not self.seconds > 0):
            raise ValueError(f"`seconds` must be a positive number, got {self.seconds!r}")
        if not self.tasks:
            raise ValueError("`tasks` must name at least one task")
        if not self.optimizers:
            raise ValueError("`optimizers` must name at least one optimizer")
        for t in self.tasks:
            get_task(t)
        for o in self.optimizers:
            get_optimizer(o)

    def epochs_for(self, task: Task) -> int:
        """The epochs of a run on ``task``: ``epochs``, else the task's own (:attr:`Task.epochs`)."""
        return self.epochs if self.epochs is not None else task.epochs

    def budget(self, task: FullBatchTask) -> float:
        """The wall-time budget of a run on ``task``: ``seconds``, else the task's (quick) budget."""
        if self.seconds is not None:
            return float(self.seconds)
        return task.quick_time_budget if self.quick else task.time_budget

    @property
    def selection_seeds(self) -> list[int]:
        """The seeds on which grid points are compared."""
        return list(range(self.seeds)) if self.grid_all_seeds else [0]


@dataclass
class BenchResults:
    """All the runs so far, with the configuration and the machine.

    Attributes:
        config: the :class:`BenchConfig`.
        machine: :func:`machine_info`.
        tasks: per task, its settings and data sizes.
        runs: the finished runs, in the order they ran.
        interrupted: the benchmark was stopped by Ctrl-C before the end.
        started: start time (ISO 8601, local).
        elapsed: wall time of the whole benchmark so far, seconds.
        command: the command line, for the report.
    """

    config: BenchConfig
    machine: dict[str, Any]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    interrupted: bool = False
    started: str = ""
    elapsed: float = 0.0
    command: str = ""

    def runs_of(self, task: str, optimizer: str) -> list[RunResult]:
        """The runs of one (task, optimizer) pair."""
        return [r for r in self.runs if r.task == task and r.optimizer == optimizer]

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{task: {optimizer: aggregate(...)}}`` for every pair with at least one finished run."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for t in self.config.tasks:
            for o in self.config.optimizers:
                runs = self.runs_of(t, o)
                if runs:
                    out.setdefault(t, {})[o] = aggregate(runs, self.config.selection_seeds)
        return out


def machine_info() -> dict[str, Any]:
    """Platform, CPU, Python / torch / numpy versions, CPU count and torch threads."""
    import numpy

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def _finite(x: float) -> bool:
    return x == x and not math.isinf(x)


def run_one(
    task: Task,
    factory: OptimizerFactory,
    hparams: Hparams,
    seed: int,
    *,
    data: TaskData,
    epochs: int,
    progress: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train a fresh model of ``task`` (model seed ``seed``) for ``epochs`` epochs and record the metrics.

    Args:
        task: the task.
        factory: the optimizer.
        hparams: its grid point.
        seed: model seed.
        data: the (possibly subsampled) data of the task.
        epochs: number of epochs.
        progress: called after each epoch with ``(epoch, validation loss)``.

    Returns:
        The :class:`RunResult`.
    """
    model = task.model(seed)
    stepper = factory.make(model, task, hparams)
    generator = torch.Generator().manual_seed(task.loader_seed)
    res = RunResult(task.name, factory.name, dict(hparams), seed)

    def record(epoch: int, elapsed: float) -> bool:
        ev = task.evaluate(model, data.x_val, data.y_val)
        res.epochs.append(epoch)
        res.val_loss.append(ev.pop("loss"))
        res.train_time.append(elapsed)
        for k, v in ev.items():
            res.metrics.setdefault(k, []).append(v)
        if res.time_to_target is None and res.val_loss[-1] < task.target:
            res.time_to_target, res.epochs_to_target = elapsed, epoch
        if not _finite(res.val_loss[-1]):
            res.diverged = True
        return not res.diverged

    step_times: list[float] = []
    elapsed = 0.0
    record(0, 0.0)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        overhead = 0.0
        try:
            stats = train_epoch(stepper, task.batches(data, generator))
            step_times += stats.step_times
            overhead = stats.overhead
            if not stats.finite:
                res.diverged, res.error = True, "non-finite training loss"
        except (RuntimeError, ValueError, FloatingPointError) as e:  # a diverged model can break a solver
            res.diverged, res.error = True, f"{type(e).__name__}: {e}"
        dt = time.perf_counter() - t0 - overhead
        res.epoch_time.append(dt)
        elapsed += dt
        if res.diverged or not record(epoch, elapsed):
            break
        if progress is not None:
            progress(epoch, res.val_loss[-1])
    res.n_steps = len(step_times)
    res.step_time_median = statistics.median(step_times) if step_times else None
    return res


def run_full_batch(
    task: FullBatchTask,
    factory: OptimizerFactory,
    hparams: Hparams,
    seed: int,
    *,
    seconds: float,
    progress: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train a fresh model of the full-batch ``task`` for ``seconds`` of wall time and record its error.

    Args:
        task: the task.
        factory: the optimizer.
        hparams: its grid point.
        seed: model seed.
        seconds: wall-time budget (steps only; the evaluations are outside the clock).
        progress: called after each evaluation with ``(checkpoint index, error)``.

    Returns:
        The :class:`RunResult` (``epochs`` holds the step counts of the evaluations).
    """
    model = task.model(seed)
    problem = task.problem(model)
    stepper = factory.make_full_batch(model, problem, hparams)
    res = RunResult(task.name, factory.name, dict(hparams), seed)

    def record(steps: int, clock: float) -> None:
        ev = task.evaluate(model, problem)
        res.epochs.append(steps)
        res.val_loss.append(ev.pop("loss"))
        res.train_time.append(clock)
        for k, v in ev.items():
            res.metrics.setdefault(k, []).append(v)
        if res.time_to_target is None and res.val_loss[-1] < task.target:
            res.time_to_target, res.epochs_to_target = clock, steps
        res.diverged = res.diverged or not _finite(res.val_loss[-1])

    checkpoints = task.checkpoints(seconds)
    step_times: list[float] = []
    clock, nxt = 0.0, 0
    record(0, 0.0)
    while nxt < len(checkpoints) and not res.diverged:
        t0 = time.perf_counter()
        try:
            loss = stepper.step()
        except (RuntimeError, ValueError, FloatingPointError) as e:
            res.diverged, res.error = True, f"{type(e).__name__}: {e}"
            break
        dt = time.perf_counter() - t0
        step_times.append(dt)
        clock += dt
        if not bool(torch.isfinite(loss).all()):
            res.diverged, res.error = True, "non-finite training loss"
            break
        while nxt < len(checkpoints) and clock >= checkpoints[nxt]:  # one entry per checkpoint passed
            record(len(step_times), clock)
            nxt += 1
            if progress is not None:
                progress(nxt, res.val_loss[-1])
    res.epoch_time = [b - a for a, b in zip(res.train_time, res.train_time[1:])]
    res.n_steps = len(step_times)
    res.step_time_median = statistics.median(step_times) if step_times else None
    return res


def _score(runs: Sequence[RunResult]) -> float:
    """Median final validation loss; NaN (diverged) counts as +inf."""
    return statistics.median(r.final_val_loss if _finite(r.final_val_loss) else math.inf for r in runs)


def select_config(runs: Sequence[RunResult], selection_seeds: Sequence[int]) -> str | None:
    """The grid point (label) with the lowest median final validation loss over ``selection_seeds``.

    Grid points without a run on a selection seed are ignored; ties go to the
    first point in run order. ``None`` if there is nothing to select from.
    """
    by_config: dict[str, list[RunResult]] = {}
    for r in runs:
        if r.seed in selection_seeds:
            by_config.setdefault(r.config, []).append(r)
    if not by_config:
        return None
    return min(by_config, key=lambda c: _score(by_config[c]))


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def _median_or_none(values: Sequence[float | None]) -> float | None:
    """Median with ``None`` as +inf; ``None`` if the median is infinite."""
    if not values:
        return None
    m = statistics.median(math.inf if v is None else float(v) for v in values)
    return None if math.isinf(m) else m


def aggregate(runs: Sequence[RunResult], selection_seeds: Sequence[int]) -> dict[str, Any]:
    """Aggregate the runs of one (task, optimizer) pair over the seeds of its selected grid point.

    Args:
        runs: every run of the pair (all grid points and seeds).
        selection_seeds: the seeds the grid points are compared on.

    Returns:
        A JSON-ready dict: ``config``, ``hparams``, ``seeds``, ``final_val_loss``
        (median/min/max), ``wall_time`` (median/min/max total training time),
        ``time_to_target`` (median, ``None`` = not reached), ``reached``
        (seeds that reached the target), ``epochs_to_target``,
        ``step_time_median``, ``diverged``, per extra metric its final
        median/min/max, and ``curves`` (per epoch: median/min/max validation
        loss, median cumulative training time and median epoch, or step count of a full-batch task)
        for the plots.
    """
    config = select_config(runs, selection_seeds)
    if config is None:  # no run on a selection seed yet (cannot happen in run order): use what is there
        config = runs[0].config
    chosen = [r for r in runs if r.config == config]
    chosen.sort(key=lambda r: r.seed)
    out: dict[str, Any] = {
        "config": config,
        "hparams": chosen[0].hparams,
        "seeds": [r.seed for r in chosen],
        "n_grid_points": len({r.config for r in runs}),
        "final_val_loss": _stats([r.final_val_loss for r in chosen]),
        "wall_time": _stats([r.total_train_time for r in chosen]),
        "time_to_target": _median_or_none([r.time_to_target for r in chosen]),
        "reached": sum(r.time_to_target is not None for r in chosen),
        "epochs_to_target": _median_or_none([r.epochs_to_target for r in chosen]),
        "step_time_median": _median_or_none([r.step_time_median for r in chosen]),
        "diverged": sum(r.diverged for r in chosen),
        "metrics": {},
    }
    for name in chosen[0].metrics:
        out["metrics"][name] = _stats([r.metrics[name][-1] if not r.diverged else math.nan for r in chosen])
    n = max(len(r.val_loss) for r in chosen)
    curves: dict[str, list[float | None]] = {"epoch": [], "median": [], "min": [], "max": [], "train_time": []}
    for i in range(n):
        vals = [r.val_loss[i] for r in chosen if i < len(r.val_loss)]
        times = [r.train_time[i] for r in chosen if i < len(r.train_time)]
        s = _stats(vals)
        curves["epoch"].append(statistics.median(r.epochs[i] for r in chosen if i < len(r.epochs)))
        curves["median"].append(s["median"])
        curves["min"].append(s["min"])
        curves["max"].append(s["max"])
        curves["train_time"].append(statistics.median(times))
    out["curves"] = curves
    return out


def _plan(config: BenchConfig, task: AnyTask, factory: OptimizerFactory) -> tuple[list[Hparams], int]:
    """The grid of ``factory`` on ``task`` and the number of runs it will take (none if it does not apply)."""
    if not factory.supports(task):
        return [], 0
    points = factory.grid(task, quick=config.quick, sven_grid=config.sven_grid)
    if len(points) <= 1 or config.grid_all_seeds:
        return points, len(points) * config.seeds
    return points, len(points) + config.seeds - 1


def run_benchmark(
    config: BenchConfig,
    *,
    on_run: Callable[[BenchResults], None] | None = None,
    command: str = "",
) -> BenchResults:
    """Run the whole benchmark; Ctrl-C stops it cleanly and returns what finished.

    Args:
        config: what to run.
        on_run: called after every finished run with the results so far (to
            write them to disk).
        command: the command line, recorded in the results.

    Returns:
        The :class:`BenchResults` (``interrupted=True`` after a
        ``KeyboardInterrupt``).
    """
    require("tqdm", "bench", "sven-bench")
    from tqdm.auto import tqdm

    show = config.progress and sys.stderr.isatty()
    results = BenchResults(config, machine_info(), started=time.strftime("%Y-%m-%dT%H:%M:%S"), command=command)
    t_start = time.perf_counter()
    tasks = [get_task(name) for name in config.tasks]
    factories = [get_optimizer(name) for name in config.optimizers]
    total = sum(_plan(config, t, f)[1] for t in tasks for f in factories)
    bar = tqdm(total=total, desc="runs", unit="run", disable=not show, position=0)

    def finish(run: RunResult) -> None:
        results.runs.append(run)
        results.elapsed = time.perf_counter() - t_start
        bar.update(1)
        if on_run is not None:
            on_run(results)

    def one(task: AnyTask, data: TaskData | None, factory: OptimizerFactory, hparams: Hparams, seed: int) -> RunResult:
        desc = f"{task.name} {factory.name} {format_hparams(hparams)} seed {seed}"
        full = isinstance(task, FullBatchTask)
        total = task.n_checkpoints if isinstance(task, FullBatchTask) else config.epochs_for(task)
        unit = "checkpoint" if full else "epoch"
        ebar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not show, position=1)

        def progress(epoch: int, val: float) -> None:
            ebar.update(1)
            ebar.set_postfix(val=f"{val:.2e}")

        try:
            if isinstance(task, FullBatchTask):
                return run_full_batch(task, factory, hparams, seed, seconds=config.budget(task), progress=progress)
            assert data is not None
            epochs = config.epochs_for(task)
            return run_one(task, factory, hparams, seed, data=data, epochs=epochs, progress=progress)
        finally:
            ebar.close()

    try:
        for task in tasks:
            data: TaskData | None = None
            if isinstance(task, FullBatchTask):
                results.tasks[task.name] = {**task.describe(), "time_budget": config.budget(task)}
            else:
                data = task.data()
                if config.quick and task.quick_n_train is not None:
                    data = data.subsample(task.quick_n_train)
                results.tasks[task.name] = {
                    **task.describe(),
                    "epochs": config.epochs_for(task),
                    "n_train": data.n_train,
                    "n_val": data.n_val,
                }
                results.tasks[task.name]["data"] = dict(data.info)
            results.tasks[task.name]["n_params"] = sum(p.numel() for p in task.model(0).parameters())
            for factory in factories:
                points, _ = _plan(config, task, factory)
                first = range(config.seeds) if (len(points) <= 1 or config.grid_all_seeds) else [0]
                for hparams in points:
                    for seed in first:
                        finish(one(task, data, factory, hparams, seed))
                if len(points) > 1 and not config.grid_all_seeds and config.seeds > 1:
                    best = select_config(results.runs_of(task.name, factory.name), [0])
                    hp = next(p for p in points if format_hparams(p) == best)
                    for seed in range(1, config.seeds):
                        finish(one(task, data, factory, hp, seed))
    except KeyboardInterrupt:
        results.interrupted = True
    finally:
        bar.close()
        results.elapsed = time.perf_counter() - t_start
    return results
