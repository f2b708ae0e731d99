"""The command line: ``python -m sven.bench`` or ``sven-bench``.

::

    sven-bench --task toy1d polynomial digits --optimizers sven adam sgd rmsprop lbfgs polyak sven-reference \\
               --seeds 3 --epochs 20 --out results/

Defaults: every task, every optimizer (each on the tasks it supports), 3
seeds, each task's own number of epochs (20 for the paper's tasks; 60 s per
run on the full-batch tasks), ``--threads auto``
(:func:`auto_threads`: one thread for the small models of these tasks),
``results/``. ``--quick`` is a smoke test of everything (see :data:`QUICK`).
See ``docs/sven-bench.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from truncpinv._optional import MissingExtraError, require_extra

from .merge import merge_results
from .optimizers import OPTIMIZERS
from .report import read_json, write_all, write_json, write_markdown
from .runner import BenchConfig, BenchResults, run_benchmark
from .tasks import TASKS

__all__ = ["QUICK", "SMALL_MODEL_PARAMS", "auto_threads", "build_parser", "main"]

#: Below this many parameters (the largest model of the selected tasks) ``--threads auto`` uses one
#: intra-op thread. The tasks' models have 593 to 116,705 parameters (charlm) and batches of 32 or 64: their
#: per-step kernels are far too small to split. On a busy 2-core machine 2 OpenMP threads waiting on each other
#: made ``sven-bench --quick`` take 8 minutes against 45 s with one thread, and an Adam step of mnist-subset,
#: mnist1d and charlm took 2.4 to 3.9 times as long with 2 threads as with 1 (same process, load average 5).
SMALL_MODEL_PARAMS = 200_000


def auto_threads(tasks: Sequence[str]) -> int:
    """``--threads auto``: torch's count if ``OMP_NUM_THREADS`` is set; else 1 below :data:`SMALL_MODEL_PARAMS`
    parameters, ``min(4, cores)`` above."""
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    largest = max(sum(p.numel() for p in TASKS[t]().model(0).parameters()) for t in tasks)
    return 1 if largest < SMALL_MODEL_PARAMS else max(1, min(4, os.cpu_count() or 1))


def blas_threads(n: int) -> contextlib.AbstractContextManager[object]:
    """NumPy's and SciPy's BLAS limited to ``n`` threads, as torch is, while the benchmark runs.

    Sven forms the Gram matrix with NumPy's ``dsyrk`` on the CPU (:mod:`sven.linearize.gram_factors`), and
    NumPy's BLAS keeps its own thread pool (all cores, unless ``OMP_NUM_THREADS`` says otherwise): a
    one-thread comparison must limit it too. Uses ``threadpoolctl`` (installed with scikit-learn, in the
    ``bench`` extra); without it, nothing is limited.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")  # type: ignore[no-any-return]


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}") from None


#: What ``--quick`` changes (documented in ``--help`` and docs/sven-bench.md).
QUICK = (
    "--quick: 1 seed, 5 epochs and 2 s per full-batch run (unless --seeds / --epochs / --seconds are given); "
    "toy1d and polynomial train on the first 2,000 of their 10,000 training points, mnist-subset(-mse, -cnn) and "
    "mnist1d on 256 of 4,000, gru on 128 of 4,000, charlm on 32 blocks (one step per epoch) (validation sets and "
    "digits unchanged); baseline grids "
    "reduced to lr in {1e-3, 1e-2} for adam/adamw/sgd/rmsprop and lr=1, max_iter in {1, 5} for lbfgs; with --grid, "
    "Sven's grid is reduced to k in {B/2, B} x lr in {0.1, 0.5} x rtol=1e-3."
)
QUICK_SEEDS = 1
QUICK_EPOCHS = 5


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``sven-bench``."""
    ap = argparse.ArgumentParser(
        prog="sven-bench",
        description="Benchmark Sven against Adam, AdamW, SGD, RMSprop, L-BFGS, Polyak SGD and the original Sven code "
        "on the tasks of docs/tasks.md; writes results.json, results.md and PNG plots.",
        epilog=QUICK,
    )
    ap.add_argument("--task", nargs="+", default=list(TASKS), metavar="NAME", help=f"tasks ({', '.join(TASKS)})")
    ap.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        metavar="NAME",
        help=f"optimizers ({', '.join(OPTIMIZERS)})",
    )
    ap.add_argument("--seeds", type=int, default=None, help="number of model seeds 0..N-1 (default 3; --quick: 1)")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per run on every mini-batch task (default: each task's own, 20 for the paper's tasks; --quick: 5)",
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="wall-time budget of each run on the full-batch tasks (poisson2d, heat1d; default: the task's, 60 s; "
        "--quick: 2 s)",
    )
    ap.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")
    ap.add_argument(
        "--threads",
        type=_threads,
        default="auto",
        help=f"torch.set_num_threads: a number, or 'auto' (default): 1 thread when every selected task's model has "
        f"fewer than {SMALL_MODEL_PARAMS:,} parameters (all of them do), else min(4, CPU count). More threads only "
        f"slow small models down, badly on a busy machine. Under 'auto' a set OMP_NUM_THREADS is respected",
    )
    ap.add_argument(
        "--grid",
        action="store_true",
        help="Sven's own grid: k in {B/4, B/2, B} x lr in {0.1, 0.3, 0.5, 1.0} x rtol in {1e-4, 1e-3, 1e-2}; "
        "the best point on validation is reported",
    )
    ap.add_argument(
        "--grid-all-seeds",
        action="store_true",
        help="run every grid point on every seed (default: grid points on seed 0, the selected one on all seeds)",
    )
    ap.add_argument("--quick", action="store_true", help="a fast smoke test of everything (see below)")
    ap.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        metavar="PATH",
        help="run nothing: rewrite the report and the plots in --out from the results.json of earlier runs "
        "(several files are merged, e.g. the parts of a run split over processes)",
    )
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --from-json: write the Markdown report here (default OUT/results.md); plots are linked relative "
        "to it",
    )
    ap.add_argument(
        "--notes",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --from-json: a Markdown file put into the report after its header (the reading of the numbers)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is not a TTY)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from command-line arguments.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 130 if interrupted by Ctrl-C (the finished
        runs are written in both cases).
    """
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.from_json is not None:
        for path in (*args.from_json, *([args.notes] if args.notes is not None else [])):
            if not path.is_file():
                ap.error(f"no such file: {path}")
        try:
            merged = merge_results([read_json(path) for path in args.from_json])
        except ValueError as e:
            ap.error(str(e))
        notes = args.notes.read_text(encoding="utf-8") if args.notes is not None else ""
        for p in write_all(merged, args.out, report=args.report, notes=notes):
            print(f"  {p}", file=sys.stderr)
        return 0
    if args.report is not None or args.notes is not None:
        ap.error("--report and --notes go with --from-json (a run writes its report into --out)")
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 3)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)  # None: the task's
    for name, value in (("--seeds", seeds), ("--epochs", epochs)):
        if value is not None and value < 1:
            ap.error(f"{name} must be a positive integer, got {value}")
    if args.seconds is not None and not args.seconds > 0:
        ap.error(f"--seconds must be a positive number, got {args.seconds:g}")
    unknown = [t for t in args.task if t not in TASKS]
    if args.threads == "auto":
        threads = 1 if unknown else auto_threads(args.task)  # unknown tasks: BenchConfig says which
    else:
        threads = args.threads
    if threads < 1:
        ap.error(f"--threads must be a positive integer or 'auto', got {threads}")
    try:
        config = BenchConfig(
            tasks=tuple(dict.fromkeys(args.task)),
            optimizers=tuple(dict.fromkeys(args.optimizers)),
            seeds=seeds,
            epochs=epochs,
            seconds=args.seconds,
            quick=args.quick,
            sven_grid=args.grid,
            grid_all_seeds=args.grid_all_seeds,
            threads=threads,
            progress=not args.no_progress,
        )
    except ValueError as e:
        ap.error(str(e))
    try:
        require_extra("bench", "sven-bench")
    except MissingExtraError as e:
        ap.exit(1, f"{e}\n")
    out: Path = args.out
    command = "sven-bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    def save(results: BenchResults) -> None:
        write_json(results, out / "results.json")
        write_markdown(results, out / "results.md", plots=[])

    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with blas_threads(config.threads):
            results = run_benchmark(config, on_run=save, command=command)
    finally:
        torch.set_num_threads(threads_before)
    paths = write_all(results, out)
    status = "interrupted after" if results.interrupted else "finished"
    print(f"sven-bench {status} {len(results.runs)} runs in {results.elapsed:.1f} s; wrote:", file=sys.stderr)
    for p in paths:
        print(f"  {p}", file=sys.stderr)
    return 130 if results.interrupted else 0
