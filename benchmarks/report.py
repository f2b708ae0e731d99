"""Turn a ``--benchmark-json`` export of ``bench_solvers.py`` into markdown tables (one per matrix group).

    TRUNCPINV_BENCH=full .venv/bin/python -m pytest benchmarks/bench_solvers.py --benchmark-only \\
        --benchmark-json=bench.json
    .venv/bin/python benchmarks/report.py bench.json [--plot errors.png]

``make bench`` runs both steps: one table per matrix group with the time and the
relative error (the accuracy) side by side.

Times are the minimum over rounds; ratios are against ``torch-svd-then-truncate``
of the same group (same matrix, same run), or, in a group without it (the
Sven step-cost groups), against its Adam step, else its fastest entry. A group
whose entries carry no relative error (step costs) gets a time-only table and
no panel: ``--plot`` draws relative error against time, one panel per group
that has errors, and says so when no group has any.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from typing import Any

BASE = "torch-svd-then-truncate"


def threads(path: str) -> int | None:
    """The thread count the benchmarks ran on (``machine_info.bench_threads``, set by ``benchmarks/conftest.py``)."""
    with open(path) as f:
        value = json.load(f).get("machine_info", {}).get("bench_threads")
    return int(value) if value is not None else None


def load(path: str) -> dict[str, list[tuple[str, float, float]]]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        groups[bench["group"]].append(
            (info.get("method", bench["name"]), bench["stats"]["min"], info.get("rel_err", float("nan")))
        )
    return groups


def _baseline(rows: list[tuple[str, float, float]]) -> tuple[str, float] | None:
    """The entry a group's ratios are against: ``BASE``, else an Adam step, else the fastest entry."""
    times = {m: t for m, t, _ in rows}
    for name in [BASE, *sorted(m for m in times if "adam" in m.lower())]:
        if name in times and times[name] > 0:
            return name, times[name]
    positive = [(t, m) for m, t, _ in rows if t > 0]
    return (min(positive)[1], min(positive)[0]) if positive else None


def _has_errors(rows: list[tuple[str, float, float]]) -> bool:
    return any(math.isfinite(err) for _, _, err in rows)


def markdown(groups: dict[str, list[tuple[str, float, float]]]) -> str:
    out = []
    for group, rows in groups.items():
        base = _baseline(rows)
        name = base[0] if base else "-"
        errors = _has_errors(rows)
        head = f"| method | time [s] | time / {name} |" + (" rel. error |" if errors else "")
        out += [f"**{group}**", "", head, "|---|---:|---:|" + ("---:|" if errors else "")]
        for method, t, err in sorted(rows, key=lambda r: r[1]):
            ratio = f"{t / base[1]:.3f}" if base else ""
            cell = (f" {err:.1e} |" if math.isfinite(err) else " - |") if errors else ""
            out.append(f"| {method} | {t:.3f} | {ratio} |{cell}")
        out.append("")
    return "\n".join(out)


def plot(groups: dict[str, list[tuple[str, float, float]]], path: str) -> bool:
    """Relative error against time, one panel per group with errors; ``False`` (nothing written) if none has any."""
    groups = {
        g: [r for r in rows if math.isfinite(r[2]) and r[1] > 0] for g, rows in groups.items() if _has_errors(rows)
    }
    groups = {g: rows for g, rows in groups.items() if rows}
    if not groups:
        return False
    from truncpinv._optional import require

    require("matplotlib", "bench", "benchmarks/report.py")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    n = len(groups)
    cols = min(n, 4)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (group, rows) in zip(axes.flat, groups.items()):
        for method, t, err in rows:
            ax.scatter(t, max(err, 1e-12), label=method, marker="o" if method.startswith("truncpinv") else "x")
        ax.set(xscale="log", yscale="log", xlabel="time [s]", ylabel="relative error")
        # a narrow time range on a log axis gets labelled minor ticks that overlap: majors only, few, turned
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(base=10, numticks=5))
            axis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="both", labelsize=7)
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(group, fontsize=9)
        ax.axhline(1e-4, color="grey", lw=0.5, ls="--")
    legend: dict[str, Any] = {}  # one legend below the panels, over no data: every method of every panel, once
    for ax in axes.flat[:n]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=7)
    fig.tight_layout(rect=(0, 0.1 if nrows == 1 else 0.04 + 0.02 * -(-len(labels) // 7), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--plot", help="write an error-vs-time PNG here")
    args = p.parse_args(argv)
    groups = load(args.json)
    n = threads(args.json)
    print(f"{n} thread(s) (BENCH_THREADS)\n" if n is not None else "threads: not recorded\n")
    print(markdown(groups))
    if args.plot and not plot(groups, args.plot):
        print(f"no group has relative errors: {args.plot} not written")


if __name__ == "__main__":
    main()
