"""Turn a ``--benchmark-json`` export of ``bench_solvers.py`` into markdown tables (one per matrix group).

    TRUNCPINV_BENCH=full .venv/bin/python -m pytest benchmarks/bench_solvers.py --benchmark-only \\
        --benchmark-json=bench.json
    .venv/bin/python benchmarks/report.py bench.json [--plot errors.png]

``make bench`` runs both steps: one table per matrix group with the time and the
relative error (the accuracy) side by side.

Times are the minimum over rounds; ratios are against ``torch-svd-then-truncate``
of the same group (same matrix, same run). ``--plot`` draws relative error
against time, one panel per group.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

BASE = "torch-svd-then-truncate"


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


def markdown(groups: dict[str, list[tuple[str, float, float]]]) -> str:
    out = []
    for group, rows in groups.items():
        base = {m: t for m, t, _ in rows}.get(BASE)
        out += [f"**{group}**", "", f"| method | time [s] | time / {BASE} | rel. error |", "|---|---:|---:|---:|"]
        for method, t, err in sorted(rows, key=lambda r: r[1]):
            ratio = f"{t / base:.3f}" if base else ""
            out.append(f"| {method} | {t:.3f} | {ratio} | {err:.1e} |")
        out.append("")
    return "\n".join(out)


def plot(groups: dict[str, list[tuple[str, float, float]]], path: str) -> None:
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
    handles, labels = axes.flat[0].get_legend_handles_labels()  # one legend below the panels, over no data
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=7)
    fig.tight_layout(rect=(0, 0.1 if nrows == 1 else 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--plot", help="write an error-vs-time PNG here")
    args = p.parse_args()
    groups = load(args.json)
    print(markdown(groups))
    if args.plot:
        plot(groups, args.plot)


if __name__ == "__main__":
    main()
