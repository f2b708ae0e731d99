"""From ``results.json`` files to the published report (``docs/results.md``), without running anything.

A long benchmark is best run as several ``sven-bench`` processes (one per core,
for example the mini-batch tasks in one and the PINN tasks in the other). This
module merges their ``results.json`` files into one :class:`BenchResults`
(:func:`merge_results`) and writes the report where the documentation wants it
(:func:`publish`): the Markdown file at any path, the plots in a folder of their
own and linked relative to the Markdown file, and an optional hand-written
Markdown text (the reading of the numbers) put after the header.

``sven-bench --from-json A.json B.json --out docs/img/results --report docs/results.md --notes NOTES.md``
is the command-line form.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .report import _write_text as write_text
from .report import markdown, write_json, write_plots
from .runner import BenchResults

__all__ = ["merge_results", "publish"]


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
    merged = BenchResults(
        replace(first.config, tasks=tasks, optimizers=optimizers, sven_grid=any(p.config.sven_grid for p in parts)),
        first.machine,
        tasks={k: v for p in parts for k, v in p.tasks.items()},
        runs=[r for p in parts for r in p.runs],
        interrupted=any(p.interrupted for p in parts),
        started=min((p.started for p in parts if p.started), default=first.started),
        elapsed=sum(p.elapsed for p in parts),
        command=" && ".join(p.command for p in parts if p.command),
    )
    return merged


def publish(
    results: BenchResults,
    plot_dir: Path,
    report: Path | None = None,
    *,
    notes: str = "",
    plots: bool = True,
) -> list[Path]:
    """Write ``results.json`` and the plots into ``plot_dir`` and the Markdown report to ``report``.

    Args:
        results: the (merged) results.
        plot_dir: folder of ``results.json`` and the PNGs.
        report: path of the Markdown file (default ``plot_dir / "results.md"``); the plots are
            linked relative to it.
        notes: Markdown put after the report's header (e.g. how to read the numbers, why a goal is missed).
        plots: draw the plots.

    Returns:
        The paths written.
    """
    plot_dir = Path(plot_dir)
    report = Path(report) if report is not None else plot_dir / "results.md"
    paths = [plot_dir / "results.json"]
    write_json(results, paths[0])
    pngs = write_plots(results, plot_dir) if plots else []
    links = [Path(os.path.relpath(p, report.parent)).as_posix() for p in pngs]
    text = markdown(results, links if plots else [])
    if notes.strip():
        head, sep, rest = text.partition("\n## ")
        text = f"{head.rstrip()}\n\n{notes.strip()}\n{sep}{rest}" if sep else f"{text.rstrip()}\n\n{notes.strip()}\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    write_text(report, text)
    return [*paths, report, *pngs]
