"""Merging the ``results.json`` files of a benchmark run split over processes.

A long benchmark is best run as several ``sven-bench`` processes (one per core,
for example the mini-batch tasks in one and the PINN tasks in the other).
:func:`merge_results` turns their results into one :class:`BenchResults`;
:func:`sven.bench.report.write_all` then writes the report where the
documentation wants it (any Markdown path, plots linked relative to it, and an
optional hand-written text after the header).

``sven-bench --from-json A.json B.json --out docs/img/results --report docs/results.md --notes NOTES.md``
is the command-line form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .runner import BenchResults

__all__ = ["merge_results"]


def merge_results(parts: Sequence[BenchResults]) -> BenchResults:
    """One :class:`BenchResults` holding the runs of every part, in order.

    The configuration is the first part's, with the tasks and optimizers of all
    parts; the commands are joined with ``" && "``; the start is the earliest; the
    elapsed times add up (the sum of the processes' wall times, not the wall time of a
    parallel run).

    Raises:
        ValueError: if ``parts`` is empty, or two parts ran a different number of seeds or epochs.
    """
    if not parts:
        raise ValueError("nothing to merge: pass at least one results.json")
    first = parts[0]
    for p in parts[1:]:
        for name in ("seeds", "epochs", "quick"):
            a, b = getattr(first.config, name), getattr(p.config, name)
            if a != b:
                raise ValueError(f"cannot merge runs with different `{name}`: {a!r} and {b!r}")
    tasks = tuple(dict.fromkeys(t for p in parts for t in p.config.tasks))
    optimizers = tuple(dict.fromkeys(o for p in parts for o in p.config.optimizers))
    return BenchResults(
        replace(first.config, tasks=tasks, optimizers=optimizers, sven_grid=any(p.config.sven_grid for p in parts)),
        first.machine,
        tasks={k: v for p in parts for k, v in p.tasks.items()},
        runs=[r for p in parts for r in p.runs],
        interrupted=any(p.interrupted for p in parts),
        started=min((p.started for p in parts if p.started), default=first.started),
        elapsed=sum(p.elapsed for p in parts),
        command=" && ".join(p.command for p in parts if p.command),
    )
