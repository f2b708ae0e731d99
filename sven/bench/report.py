"""Write the benchmark's outputs: ``results.json``, ``results.md`` and the PNG plots.

Every file is written atomically (to a temporary file in the same folder,
then ``os.replace``), so an interrupted benchmark never leaves a half-written
file behind.

* ``results.json``: the configuration, the machine, the task settings, every
  run (full loss histories, times, metrics), the per-(task, optimizer)
  aggregates and the goals. NaN and infinities are written as ``null``.
* ``results.md``: one table per task (the selected grid point of each
  optimizer, medians over seeds; the best value of each column in bold),
  the grid points, the task goals (:class:`~sven.bench.tasks.base.Goal`, and
  for every task "no stalling seed": Sven's worst seed within 10 times its
  median), each met or missed with its numbers, and Sven against the best
  Adam (ratio of final validation losses and of training times) and Sven's
  time-to-target speedup over the best baseline.
* ``val_loss_vs_epoch.png``, ``val_loss_vs_time.png``: one panel per task,
  the median validation loss over seeds with a min/max band, log scale.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from truncpinv._optional import require

from .runner import BenchConfig, BenchResults, RunResult
from .tasks import get_task

__all__ = [
    "PLOTS",
    "STALL_FACTOR",
    "check_goals",
    "goals",
    "markdown",
    "read_json",
    "to_jsonable",
    "write_all",
    "write_json",
    "write_markdown",
    "write_plots",
]

#: File names of the plots.
PLOTS = ("val_loss_vs_epoch.png", "val_loss_vs_time.png")
#: Optimizers that are Sven itself (excluded from "best baseline").
SVEN_NAMES = ("sven", "sven-reference", "sven-plain", "sven-native")
#: Which Sven run the goals are checked on, in order of preference: on the mini-batch tasks the native
#: defaults (``sven-native``, one configuration for every task), on the full-batch PINN tasks the
#: documented preset (``sven``, :func:`sven.pinn.optimizer`).
GOAL_SVEN = {"mini-batch": ("sven-native", "sven"), "full-batch": ("sven", "sven-native")}
#: "No stalling seed": Sven's worst seed ends within this factor of its median.
STALL_FACTOR = 10.0
COLORS = {
    "sven": "tab:red",
    "sven-reference": "tab:pink",
    "adam": "tab:blue",
    "sgd": "tab:green",
    "rmsprop": "tab:orange",
    "lbfgs": "tab:purple",
    "polyak": "tab:brown",
    "sven-plain": "tab:olive",
    "sven-native": "tab:cyan",
}


# --------------------------------------------------------------------------- atomic writes
def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` on a temporary file next to ``path``, then move it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


# --------------------------------------------------------------------------- JSON
def _clean(obj: Any) -> Any:
    """Replace NaN and infinities by ``None`` (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def goal_sven(results: BenchResults, task: str, per_opt: dict[str, Any]) -> str | None:
    """The name of the Sven run the goals of ``task`` are checked on (:data:`GOAL_SVEN`), or ``None``.

    ``per_opt`` is the task's entry of ``results.summary()`` (the optimizers that ran on it).
    """
    kind = "full-batch" if results.tasks.get(task, {}).get("unit") == "step" else "mini-batch"
    return next((name for name in GOAL_SVEN[kind] if name in per_opt), None)


def goals(results: BenchResults) -> dict[str, dict[str, Any]]:
    """Per task: Sven against the best Adam, and Sven's time-to-target against the best baseline.

    Returns:
        ``{task: {...}}`` with ``loss_ratio`` (Sven / Adam final validation
        loss, medians; below 1: Sven is better), ``wall_ratio`` (Sven / Adam
        training time), ``sven_time_to_target``, ``best_baseline`` and
        ``best_baseline_time_to_target`` (fastest non-Sven optimizer to the
        target), ``speedup`` (baseline / Sven time-to-target; ``inf`` if only
        Sven reached it, ``None`` if Sven did not), and
        ``step_speedup_vs_reference`` (reference Sven step time / Sven step time).
    """
    out: dict[str, dict[str, Any]] = {}
    for task, per_opt in results.summary().items():
        g: dict[str, Any] = {}
        name = goal_sven(results, task, per_opt)
        s, a = (per_opt[name] if name else None), per_opt.get("adam")
        if name is not None:
            g["sven"] = name
        if s is not None and a is not None:
            g["adam_config"] = a["config"]
            g["loss_ratio"] = _ratio(s["final_val_loss"]["median"], a["final_val_loss"]["median"])
            g["wall_ratio"] = _ratio(s["wall_time"]["median"], a["wall_time"]["median"])
        if s is not None:
            g["sven_time_to_target"] = s["time_to_target"]
            base = {o: v for o, v in per_opt.items() if o not in SVEN_NAMES and v["time_to_target"] is not None}
            if base:
                best = min(base, key=lambda o: base[o]["time_to_target"])
                g["best_baseline"] = best
                g["best_baseline_time_to_target"] = base[best]["time_to_target"]
                g["speedup"] = _ratio(base[best]["time_to_target"], s["time_to_target"])
            elif s["time_to_target"] is not None and any(o not in SVEN_NAMES for o in per_opt):
                g["best_baseline"] = None
                g["speedup"] = math.inf
            ref = per_opt.get("sven-reference")
            if ref is not None:
                g["step_speedup_vs_reference"] = _ratio(ref["step_time_median"], s["step_time_median"])
        if g:
            out[task] = g
    return out


def check_goals(results: BenchResults) -> dict[str, list[dict[str, Any]]]:
    """Per task, each of its goals (and "no stalling seed") checked on the medians of this run.

    Returns:
        ``{task: [{"goal": text, "measured": text, "met": bool | None}, ...]}``;
        ``met`` is ``None`` when the run lacks what the goal needs (e.g. no Adam run).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for task, per_opt in results.summary().items():
        name = goal_sven(results, task, per_opt)
        if name is None:
            continue
        s, a = per_opt[name], per_opt.get("adam")
        t = get_task(task)
        loss_name = "error" if results.tasks.get(task, {}).get("unit") == "step" else "validation loss"
        rows: list[dict[str, Any]] = []
        for goal in t.goals:
            value: float | None = None
            if goal.kind == "loss":
                value = s["final_val_loss"]["median"]
                measured = f"{_sci(value)}"
            elif goal.kind == "time_to_target":
                value = math.inf if s["time_to_target"] is None else s["time_to_target"]
                budget = s["wall_time"]["median"]
                measured = (
                    f"not reached in {_secs(budget)} s (median final {_sci(s['final_val_loss']['median'])})"
                    if math.isinf(value)
                    else f"{_secs(value)} s"
                )
            elif a is None:
                measured = "no adam run"
            elif goal.kind == "time_to_loss_ratio":
                times = [r.time_to(goal.level) for r in results.runs_of(task, name) if r.config == s["config"]]
                med = statistics.median([math.inf if t is None else t for t in times]) if times else math.inf
                value = _ratio(med, a["wall_time"]["median"]) if math.isfinite(med) else math.inf
                reached = f"{_secs(med)} s" if math.isfinite(med) else "not reached by most seeds"
                measured = f"{_num(value)} ({reached} vs Adam's {_secs(a['wall_time']['median'])} s)"
            elif goal.kind == "loss_ratio":
                value = _ratio(s["final_val_loss"]["median"], a["final_val_loss"]["median"])
                measured = (
                    f"{_num(value)} (Sven {_sci(s['final_val_loss']['median'])}, Adam {a['config']} "
                    f"{_sci(a['final_val_loss']['median'])})"
                )
            else:  # time_ratio
                value = _ratio(s["wall_time"]["median"], a["wall_time"]["median"])
                measured = f"{_num(value)} ({_secs(s['wall_time']['median'])} s vs {_secs(a['wall_time']['median'])} s)"
            met = None if value is None else bool(value <= goal.value)
            rows.append({"goal": goal.describe(loss_name, t.target), "measured": measured, "met": met})
        finals = [r.final_val_loss for r in results.runs_of(task, name) if r.config == s["config"]]
        if len(finals) > 1:
            med = statistics.median(finals)
            worst = max(finals) if all(math.isfinite(f) for f in finals) else math.inf
            factor = _ratio(worst, med) if math.isfinite(worst) else math.inf
            rows.append(
                {
                    "goal": f"no stalling seed: Sven's worst seed <= {STALL_FACTOR:g} x its median",
                    "measured": f"worst / median = {_num(factor)} ({_sci(worst)} / {_sci(med)})",
                    "met": factor is not None and factor <= STALL_FACTOR,
                }
            )
        out[task] = rows
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{x:.3g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def to_jsonable(results: BenchResults) -> dict[str, Any]:
    """Everything in ``results`` as a strict-JSON-ready dict."""
    return _clean(
        {
            "command": results.command,
            "started": results.started,
            "elapsed_s": results.elapsed,
            "interrupted": results.interrupted,
            "config": {**asdict(results.config), "selection_seeds": results.config.selection_seeds},
            "machine": results.machine,
            "tasks": results.tasks,
            "summary": results.summary(),
            "goals": goals(results),
            "goal_checks": check_goals(results),
            "runs": [r.to_dict() for r in results.runs],
        }
    )


def read_json(path: Path) -> BenchResults:
    """The :class:`BenchResults` of a ``results.json`` written by :func:`write_json` (to redo the report)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = {k: v for k, v in d["config"].items() if k != "selection_seeds"}
    cfg["tasks"], cfg["optimizers"] = tuple(cfg["tasks"]), tuple(cfg["optimizers"])
    names = set(RunResult.__dataclass_fields__)
    runs = []
    for r in d["runs"]:
        run = RunResult(**{k: v for k, v in r.items() if k in names})
        run.val_loss = [math.nan if v is None else v for v in run.val_loss]
        runs.append(run)
    return BenchResults(
        BenchConfig(**cfg),
        d["machine"],
        tasks=d["tasks"],
        runs=runs,
        interrupted=d["interrupted"],
        started=d["started"],
        elapsed=d["elapsed_s"] or 0.0,
        command=d["command"],
    )


def write_json(results: BenchResults, path: Path) -> None:
    """Write :func:`to_jsonable` to ``path`` (atomically)."""
    _write_text(path, json.dumps(to_jsonable(results), indent=1, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- markdown
def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.2e}"


def _secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _bold_best(cells: list[str], values: Sequence[float | None], *, higher: bool = False) -> list[str]:
    """Bold the cells whose value is the best of the column (ties: all of them)."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return cells
    best = max(vals) if higher else min(vals)
    return [f"**{c}**" if v is not None and v == best else c for c, v in zip(cells, values)]


def _task_table(results: BenchResults, task: str, per_opt: dict[str, dict[str, Any]]) -> list[str]:
    metric_names = list(results.tasks.get(task, {}).get("metrics", []))
    n_seeds = results.config.seeds
    unit = results.tasks.get(task, {}).get("unit", "epoch")
    loss = "final error" if unit == "step" else "final val loss"
    head = ["optimizer", "selected", f"{loss}: median [min, max]", "train time [s]"]
    head += ["time to target [s]", f"{unit}s to target", "step [ms]", *metric_names]
    columns: list[tuple[list[str], list[float | None], bool]] = []
    names = list(per_opt)
    finals = [per_opt[o]["final_val_loss"] for o in names]
    columns.append(
        (
            [f"{_sci(x['median'])} [{_sci(x['min'])}, {_sci(x['max'])}]" for x in finals],
            [x["median"] for x in finals],
            False,
        )
    )
    wall = [per_opt[o]["wall_time"]["median"] for o in names]
    columns.append(([_secs(w) for w in wall], wall, False))
    ttt_cells = []
    for o in names:
        a = per_opt[o]
        runs = len(a["seeds"])
        cell = "not reached" if a["time_to_target"] is None else _secs(a["time_to_target"])
        if runs > 1 and a["reached"] not in (0, runs):
            cell += f" ({a['reached']}/{runs})"
        ttt_cells.append(cell)
    ttt = [per_opt[o]["time_to_target"] for o in names]
    columns.append((ttt_cells, ttt, False))
    ett = [per_opt[o]["epochs_to_target"] for o in names]
    columns.append((["–" if e is None else f"{e:g}" for e in ett], ett, False))
    step = [None if per_opt[o]["step_time_median"] is None else per_opt[o]["step_time_median"] * 1e3 for o in names]
    columns.append((["–" if s is None else f"{s:.2f}" for s in step], step, False))
    for m in metric_names:
        vals = [per_opt[o]["metrics"].get(m, {}).get("median") for o in names]
        if m == "accuracy":
            columns.append((["–" if v is None else f"{v:.4f}" for v in vals], vals, True))
        else:
            columns.append(([_sci(v) for v in vals], vals, False))
    bolded = [_bold_best(cells, values, higher=higher) for cells, values, higher in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for i, o in enumerate(names):
        a = per_opt[o]
        sel = a["config"] + (f" (best of {a['n_grid_points']})" if a["n_grid_points"] > 1 else "")
        seeds = len(a["seeds"])
        label = o + (f" ({seeds} seed{'s' if seeds > 1 else ''})" if seeds != n_seeds else "")
        if a["diverged"]:
            label += f" ⚠ {a['diverged']} diverged"
        lines.append("| " + " | ".join([label, sel, *(col[i] for col in bolded)]) + " |")
    return lines


def _grid_table(results: BenchResults, task: str, per_opt: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for o, a in per_opt.items():
        if a["n_grid_points"] < 2:
            continue
        by_config: dict[str, list[Any]] = {}
        for r in results.runs_of(task, o):
            if r.seed in results.config.selection_seeds:
                by_config.setdefault(r.config, []).append(r)
        for config, runs in by_config.items():
            med = statistics.median(r.final_val_loss if math.isfinite(r.final_val_loss) else math.inf for r in runs)
            wall = statistics.median(r.total_train_time for r in runs)
            ttt = statistics.median(math.inf if r.time_to_target is None else r.time_to_target for r in runs)
            mark = " ✔" if config == a["config"] else ""
            rows.append(
                f"| {o} | {config}{mark} | {_sci(med) if math.isfinite(med) else 'diverged'} | {wall:.2f} | "
                f"{_secs(ttt) if math.isfinite(ttt) else 'not reached'} |"
            )
    if not rows:
        return []
    seeds = results.config.selection_seeds
    what = "seed 0" if seeds == [0] else f"median over seeds {seeds}"
    return [
        "",
        f"Grid points ({what}; ✔ = selected, on final validation loss):",
        "",
        "| optimizer | grid point | final val loss | train time [s] | time to target [s] |",
        "|---|---|---:|---:|---:|",
        *rows,
    ]


def _goal_checks_table(results: BenchResults) -> list[str]:
    checks = check_goals(results)
    rows = [(t, c) for t, cs in checks.items() for c in cs]
    if not rows:
        return []
    mark = {True: "**met**", False: "**missed**", None: "–"}
    lines = [
        "## Goals",
        "",
        "Each task's goals for Sven, checked on the medians of this run. The Sven checked is named per "
        "task: `sven-native` (the defaults of `sven.Sven`, one configuration for every task) on the "
        "mini-batch tasks when it ran, `sven` (the `sven.pinn` preset) on the PINN tasks; Adam = its best "
        "grid point.",
        "",
        "| task | Sven | goal | measured | |",
        "|---|---|---|---|---|",
    ]
    summary = results.summary()
    name = {t: goal_sven(results, t, summary.get(t, {})) for t in checks}
    lines += [f"| {t} | {name[t]} | {c['goal']} | {c['measured']} | {mark[c['met']]} |" for t, c in rows]
    return [*lines, ""]


def _goals_table(results: BenchResults) -> list[str]:
    g = goals(results)
    if not g:
        return []

    def r(x: float | None, fmt: str = "{:.3g}") -> str:
        if x is None:
            return "–"
        return "∞" if math.isinf(x) else fmt.format(x)

    lines = [
        "## Sven against the best Adam and the best baseline",
        "",
        "Loss ratio = Sven / best-Adam median final validation loss (below 1: Sven is better). "
        "Time ratio = Sven / best-Adam median training time. Speedup = time-to-target of the fastest "
        "baseline (Adam, SGD, RMSprop, L-BFGS, Polyak; best grid point each) / Sven's (above 1: Sven "
        "reaches the target first). Step speedup = reference-Sven / Sven median step time.",
        "",
        "| task | Sven | best Adam | loss ratio | time ratio | Sven time to target [s] | fastest baseline | "
        "its time to target [s] | speedup | step speedup vs reference |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for task, x in g.items():
        sven_ttt = x.get("sven_time_to_target")
        lines.append(
            f"| {task} | {x.get('sven', '–')} | {x.get('adam_config', '–')} | {r(x.get('loss_ratio'))} | "
            f"{r(x.get('wall_ratio'))} | "
            f"{'not reached' if sven_ttt is None else _secs(sven_ttt)} | {x.get('best_baseline') or '–'} | "
            f"{_secs(x.get('best_baseline_time_to_target'))} | {r(x.get('speedup'))} | "
            f"{r(x.get('step_speedup_vs_reference'))} |"
        )
    return lines


def markdown(results: BenchResults, plots: Sequence[str] = PLOTS) -> str:
    """The ``results.md`` text.

    Args:
        results: the results.
        plots: plot file names (relative to the markdown file) to embed.
    """
    c = results.config
    m = results.machine
    kind = "**Quick run** (`--quick`: a smoke test, not the benchmark)" if c.quick else "Full run"
    own = ", ".join(f"{name} {t['epochs']}" for name, t in results.tasks.items() if t.get("unit") == "epoch")
    epochs = f"{c.epochs} epochs" if c.epochs else f"each task's own epochs ({own})"  # no --epochs: the tasks'
    lines = [
        "# Sven benchmark results",
        "",
        f"{kind}{' — **interrupted**: only the finished runs are shown' if results.interrupted else ''}.",
        "",
        f"* command: `{results.command}`" if results.command else "* command: (library call)",
        f"* started {results.started}, {results.elapsed:.0f} s in total, {len(results.runs)} runs",
        f"* {c.seeds} model seed(s), {epochs}, grid selection on "
        + ("every seed" if c.grid_all_seeds else "seed 0, then the selected point on every seed")
        + (", Sven's `--grid`" if c.sven_grid else ""),
        f"* machine: {m.get('cpu')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads), Python {m.get('python')}, {m.get('platform')}",
        "",
        "Times are training time only (validation is evaluated outside the clock), medians over seeds. "
        "Time to target: cumulative training time at the first epoch end with validation loss below the "
        "task's target. Bold: the best value of each column.",
    ]
    summary = results.summary()
    for task, per_opt in summary.items():
        t = results.tasks.get(task, {})
        n_train = t.get("n_train")
        full = t.get("data", {}).get("n_train_full")
        sizes = f"{n_train} train" + (f" (subsampled from {full})" if full else "") + f" / {t.get('n_val')} validation"
        if t.get("unit") == "step":
            sizes = f"full batch, {t.get('time_budget'):g} s of training per run"
        lines += [
            "",
            f"## {task}",
            "",
            f"{t.get('summary', '')}. {sizes}; {t.get('n_params')} parameters. "
            f"{'Error' if t.get('unit') == 'step' else 'Validation loss'}: "
            f"{t.get('loss', '')}; target {t.get('target'):g}.",
            "",
            *_task_table(results, task, per_opt),
            *_grid_table(results, task, per_opt),
        ]
    lines += ["", *_goal_checks_table(results), *_goals_table(results)]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(results: BenchResults, path: Path, plots: Sequence[str] = PLOTS) -> None:
    """Write :func:`markdown` to ``path`` (atomically)."""
    _write_text(path, markdown(results, plots))


# --------------------------------------------------------------------------- plots
def write_plots(results: BenchResults, out_dir: Path) -> list[Path]:
    """Validation loss against epochs and against training time, one panel per task.

    Median over seeds of the selected grid point of each optimizer, with a
    min/max band; log scale; the task's target as a dotted line.

    Returns:
        The paths written (none if there is no finished run).
    """
    require("matplotlib", "bench", "sven-bench's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.summary()
    if not summary:
        return []
    paths = []
    n = len(summary)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    nan = float("nan")
    for fname, xkey, xlabel in (
        (PLOTS[0], "epoch", "epoch"),
        (PLOTS[1], "train_time", "training time [s]"),
    ):
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.0 * nrows + 0.6), squeeze=False)
        handles: dict[str, Any] = {}
        for ax, (task, per_opt) in zip(axes.flat, summary.items()):
            for o, a in per_opt.items():
                cv = a["curves"]
                x = cv[xkey]
                med = [nan if v is None else v for v in cv["median"]]
                color = COLORS.get(o)
                style = "--" if o == "sven-reference" else "-"
                (line,) = ax.plot(x, med, style, color=color, lw=1.6, marker="." if len(x) < 30 else None)
                handles.setdefault(o, line)
                if len(a["seeds"]) > 1:
                    lo = [nan if v is None else v for v in cv["min"]]
                    hi = [nan if v is None else v for v in cv["max"]]
                    ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
            t = results.tasks.get(task, {})
            ax.set_yscale("log")
            ax.axhline(t.get("target", nan), color="grey", lw=0.8, ls=":")
            ax.set_title(f"{task} (target {t.get('target', nan):g}, dotted)", fontsize=10)
            ax.set_xlabel("step" if xkey == "epoch" and t.get("unit") == "step" else xlabel)
            ax.set_ylabel(t.get("loss", "validation loss") if t.get("unit") == "step" else "validation loss")
            if xkey == "train_time" and t.get("unit") == "step":
                ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        seeds = results.config.seeds
        fig.suptitle(
            f"validation loss (full-batch tasks: error) of each optimizer's selected grid point, "
            f"median over {seeds} seed"
            + ("s (band: min to max)" if seeds > 1 else "")
            + (" — quick run" if results.config.quick else ""),
            fontsize=11,
        )
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = out_dir / fname

        def save(tmp: str, fig: Any = fig) -> None:
            fig.savefig(tmp, dpi=100, format="png")

        _atomic_write(path, save)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(
    results: BenchResults, out_dir: Path, *, plots: bool = True, report: Path | None = None, notes: str = ""
) -> list[Path]:
    """Write ``results.json`` and (if ``plots``) the PNGs into ``out_dir``, and the Markdown ``report``
    (default ``out_dir / "results.md"``; plots linked relative to it) with ``notes`` (Markdown, e.g. the
    reading of the numbers) after its header. Returns the paths written: JSON, report, plots."""
    out_dir = Path(out_dir)
    report = Path(report) if report is not None else out_dir / "results.md"
    write_json(results, out_dir / "results.json")
    pngs = write_plots(results, out_dir) if plots else []
    text = markdown(results, [Path(os.path.relpath(p, report.parent)).as_posix() for p in pngs])
    if notes.strip():
        head, sep, rest = text.partition("\n## ")
        text = f"{head.rstrip()}\n\n{notes.strip()}\n{sep}{rest}" if sep else f"{text.rstrip()}\n\n{notes.strip()}\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    _write_text(report, text)
    return [out_dir / "results.json", report, *pngs]
