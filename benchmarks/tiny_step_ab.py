"""A curve fit's Sven step before and after a change, both timed in one run (``--overhead``'s problems).

    OMP_NUM_THREADS=1 python benchmarks/tiny_step_ab.py --against 0517646 [--rounds 15] [--steps 40] [--clock cpu]

``--against REF`` extracts the project at the git revision ``REF`` (``git archive``, as
``benchmarks/ce_step_ab.py`` does) into a temporary folder. Two worker processes import ``sven`` from each tree,
"before" (``REF``) and "after" (this checkout), and build the problems of ``bench_least_squares --overhead``
(:func:`benchmarks.bench_least_squares._exponentials`: ``m = 100`` residuals, ``P = 3`` and ``10``) with each
Jacobian option (autograd, 2-point differences, a callable) and each step control (``AdaptiveDamping``,
``TrustRegion``), each optimizer at the fit's solution after 10 warm-up steps. Each round, the driver asks the
two workers in alternating order to time one block of ``--steps`` steps of every configuration and one block of
as many residual evaluations; the best block of each is kept (the load of a shared machine only adds time).
``--clock cpu`` times by the worker's CPU time (``time.thread_time``): time spent waiting for a core then does
not count. Both workers' steps are the same steps: the script also reports the largest relative difference of
the parameters the two reach.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ce_step_ab import JsonWorker, extract  # noqa: E402

#: The configurations: (P, Jacobian option, step control).
CONFIGS = [(p, way, control) for p in (3, 10) for way in ("autograd", "2-point", "callable")
           for control in ("AdaptiveDamping", "TrustRegion")]  # fmt: skip


def worker(src: str) -> None:
    """Serve the driver's requests on stdin/stdout with ``sven`` imported from ``src`` (one JSON line each)."""
    sys.path.insert(0, src)
    import time

    import torch

    import sven
    from benchmarks.bench_least_squares import _exponentials
    from sven.trust_region import TrustRegion

    torch.set_num_threads(1)
    setups: dict[str, Any] = {}
    for p, way, control in CONFIGS:
        fun, jac, start = _exponentials(p)
        x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
        j: Any = (lambda x=x, jac=jac: jac(x.detach())) if way == "callable" else way
        opt = sven.Sven([x], residuals=True, control=TrustRegion() if control == "TrustRegion" else None, jacobian=j)

        def closure(x: torch.Tensor = x, fun: Any = fun) -> torch.Tensor:
            return fun(x)

        for _ in range(10):
            opt.step(closure)
        setups[f"{p} {way} {control}"] = (opt, closure, fun, x.detach().clone(), x)
    clock = time.perf_counter
    for line in sys.stdin:
        req = json.loads(line)
        clock = time.thread_time if req.get("clock") == "cpu" else time.perf_counter
        opt, closure, fun, z, x = setups[req["config"]]
        t0 = clock()
        for _ in range(req["steps"]):
            opt.step(closure)
        step = (clock() - t0) / req["steps"]
        t0 = clock()
        for _ in range(req["steps"]):
            fun(z)
        evaluation = (clock() - t0) / req["steps"]
        sys.stdout.write(json.dumps({"step": step, "evaluation": evaluation, "x": x.detach().tolist()}) + "\n")
        sys.stdout.flush()


class Worker(JsonWorker):
    """A worker process importing ``sven`` from ``src`` (:func:`worker`)."""

    def __init__(self, src: Path) -> None:
        super().__init__([sys.executable, __file__, "--worker", str(src)], f"{src}{os.pathsep}{ROOT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="the git revision of 'before'")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not args.against:
        parser.error("--against REF is required")
    with tempfile.TemporaryDirectory() as tmp:
        workers = {"before": Worker(extract(args.against, Path(tmp))), "after": Worker(ROOT)}
        best: dict[tuple[str, str], dict[str, float]] = {}
        xs: dict[tuple[str, str], list[float]] = {}
        try:
            for k in range(args.rounds):
                for p, way, control in CONFIGS:
                    config = f"{p} {way} {control}"
                    order = list(workers) if k % 2 else list(reversed(workers))
                    for name in order:
                        r = workers[name].ask(config=config, steps=args.steps, clock=args.clock)
                        b = best.setdefault((config, name), {"step": float("inf"), "evaluation": float("inf")})
                        b["step"], b["evaluation"] = min(b["step"], r["step"]), min(b["evaluation"], r["evaluation"])
                        xs[(config, name)] = r["x"]
        finally:
            for w in workers.values():
                w.close()
    print(f"\n{args.clock} clock, best of {args.rounds} alternating rounds of {args.steps} steps, one thread")
    print(
        "| P | Jacobian | control | before us | after us | after / before | residuals us | after / residuals "
        "| goal 0.3 ms | largest relative difference of the iterates |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for p, way, control in CONFIGS:
        config = f"{p} {way} {control}"
        b, a = best[(config, "before")], best[(config, "after")]
        ev = min(a["evaluation"], b["evaluation"])
        diff = max(abs(u - v) / max(abs(v), 1e-300) for u, v in zip(xs[(config, "after")], xs[(config, "before")]))
        print(
            f"| {p} | {way} | {control} | {b['step'] * 1e6:.0f} | {a['step'] * 1e6:.0f} | {a['step'] / b['step']:.2f} "
            f"| {ev * 1e6:.0f} | {a['step'] / ev:.1f} | {'met' if a['step'] <= 3e-4 else 'missed'} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
