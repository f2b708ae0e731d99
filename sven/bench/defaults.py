r"""Choosing ONE configuration for every task: the ranking behind :class:`sven.Sven`'s defaults.

A configuration is good as a default when it is close to the best grid point
on *every* task, not when it wins one task by a mile and stalls on another. So
each grid point :math:`c` is scored by its *regret* on each task :math:`t`,

.. math::

    r(c, t) = \log_{10} \frac{L(c, t)}{\min_{c'} L(c', t)} \ \ge 0,

where :math:`L` is the final validation loss (the relative L2 error on the
PINN tasks), and the points are ranked by the mean regret over the tasks,
:math:`\bar r(c) = \frac1T \sum_t r(c, t)` (the log of the geometric mean of
the loss ratios); the worst regret :math:`\max_t r(c, t)` is reported beside
it. A point that diverged, or did not finish, on any task cannot be a default:
it ranks after every point that finished everywhere.

Run the grid with ``sven-bench --optimizers sven-native --grid`` (one or
several runs, for example split over two processes), then::

    python -m sven.bench.defaults results/gridA/results.json results/gridB/results.json

prints the ranking as a Markdown table (``--top N`` rows, ``--out FILE`` to
write it). docs/results.md shows the run that chose the defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .optimizers import Hparams, format_hparams
from .report import read_json
from .runner import RunResult

__all__ = ["Ranked", "main", "rank_configurations", "ranking_markdown"]


@dataclass
class Ranked:
    """One grid point's losses and regrets across the tasks.

    Attributes:
        hparams: the grid point.
        losses: task -> final loss (``None``: diverged or missing).
        regrets: task -> :math:`r(c, t)` (``inf``: diverged or missing).
    """

    hparams: Hparams
    losses: dict[str, float | None] = field(default_factory=dict)
    regrets: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Finite on every task."""
        return all(math.isfinite(r) for r in self.regrets.values())

    @property
    def mean_regret(self) -> float:
        """:math:`\\bar r(c)`; ``inf`` when a task diverged."""
        vals = list(self.regrets.values())
        return sum(vals) / len(vals) if vals else math.inf

    @property
    def worst_regret(self) -> float:
        """:math:`\\max_t r(c, t)`."""
        return max(self.regrets.values(), default=math.inf)


def _key(hparams: Hparams) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in hparams.items()))


def rank_configurations(
    runs: Sequence[RunResult], *, optimizer: str = "sven-native", seed: int = 0
) -> tuple[list[str], list[Ranked]]:
    """Rank the grid points of ``optimizer`` (on ``seed``) by their mean regret across the tasks.

    Args:
        runs: the runs of one or more ``results.json`` (:func:`sven.bench.report.read_json`).
        optimizer: whose grid points to rank.
        seed: the model seed the grid ran on.

    Returns:
        ``(tasks, ranked)``: the tasks in the order met, and the points best first (finished
        everywhere before the rest; then by mean regret, then by worst regret).

    Raises:
        ValueError: if ``runs`` holds no run of ``optimizer`` on ``seed``.
    """
    tasks: list[str] = []
    points: dict[tuple[tuple[str, str], ...], Ranked] = {}
    for run in runs:
        if run.optimizer != optimizer or run.seed != seed:
            continue
        if run.task not in tasks:
            tasks.append(run.task)
        point = points.setdefault(_key(run.hparams), Ranked(dict(run.hparams)))
        loss = run.final_val_loss
        ok = not run.diverged and run.error is None and loss is not None and math.isfinite(loss)
        point.losses[run.task] = float(loss) if ok and loss is not None else None
    if not points:
        raise ValueError(f"no run of optimizer {optimizer!r} on seed {seed} in the results")
    for task in tasks:
        finite = [v for p in points.values() if (v := p.losses.get(task)) is not None]
        best: float | None = min(finite) if finite else None
        for p in points.values():
            val = p.losses.get(task)
            if val is None or best is None:
                p.losses.setdefault(task, None)
                p.regrets[task] = math.inf
            else:
                p.regrets[task] = math.log10(max(val, 1e-300) / max(best, 1e-300))
    ranked = sorted(points.values(), key=lambda p: (not p.finished, p.mean_regret, p.worst_regret))
    return tasks, ranked


def ranking_markdown(tasks: Sequence[str], ranked: Sequence[Ranked], *, top: int | None = None) -> str:
    """The ranking as a Markdown table: the point, its loss per task, mean and worst regret."""
    head = ["#", "configuration", *tasks, "mean regret", "worst regret"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", "---", *["---:"] * (len(tasks) + 2)]) + "|"]
    for i, p in enumerate(ranked[:top] if top else ranked, 1):
        cells = [str(i), format_hparams(p.hparams)]
        for t in tasks:
            loss = p.losses.get(t)
            cells.append("diverged" if loss is None else f"{loss:.3g}")
        cells += [f"{p.mean_regret:.2f}", f"{p.worst_regret:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sven.bench.defaults RESULTS.json [...] [--top N] [--out FILE]``."""
    ap = argparse.ArgumentParser(
        prog="python -m sven.bench.defaults",
        description="Rank the sven-native grid points of sven-bench runs by their mean log10 regret across tasks.",
    )
    ap.add_argument("results", nargs="+", type=Path, help="results.json files of sven-bench --grid runs")
    ap.add_argument("--optimizer", default="sven-native", help="whose grid points to rank (default: sven-native)")
    ap.add_argument("--top", type=int, default=None, help="print only the N best points")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.top is not None and args.top < 1:
        ap.error(f"--top must be a positive integer, got {args.top}")
    runs: list[RunResult] = []
    for path in args.results:
        if not path.is_file():
            ap.error(f"no such file: {path}")
        runs += read_json(path).runs
    try:
        tasks, ranked = rank_configurations(runs, optimizer=args.optimizer)
    except ValueError as exc:
        ap.error(str(exc))
    table = ranking_markdown(tasks, ranked, top=args.top)
    sys.stdout.write(table)
    if args.out is not None:
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
