"""Scale: the Gram route against the materialised Jacobian and Adam, memory and step time.

Four measurements, each compared side by side in the same run (ratios, not
absolute seconds, are what carries over between machines):

1. **Peak memory of one step** of an MLP 784-2048-2048-2048-10 (GELU, 10.0M
   parameters) at B=256, float32, random data. Every configuration runs in a
   fresh subprocess that reports ``getrusage(RUSAGE_SELF).ru_maxrss`` after
   one step (on CUDA also ``torch.cuda.max_memory_allocated``):

   * ``baseline``: builds the model and the data only (the increment of the
     others over it is what the step costs);
   * ``gram``: ``sven.Sven(..., jacobian="gram")``, the Gram route;
   * ``dense``: ``sven.Sven(..., jacobian="hooks")``, the materialised ``B x P``
     Jacobian (10.3 GB at B=256) and a truncpinv solver;
   * ``adam``: one forward + backward + ``Adam.step()``.

   On the CPU the children run under ``RLIMIT_AS`` (``--mem-limit-gib``,
   default 20 GiB, lowered to the memory available) so that the dense path
   fails with ``MemoryError``/``RuntimeError`` instead of waking the OOM
   killer. If it fails at B=256, the dense path (and the Gram route, for
   comparison) is measured at B=32 and B=64 and its peak is extrapolated
   linearly to B=256; every such number is labelled *extrapolated*.
2. **Step time** of the same MLP at B=256: Gram route, Adam and, if it fits,
   the dense path. If the dense path does not fit at B=256, the dense path and
   the Gram route are also timed at B=64 and that ratio is reported, labelled.
   Medians over rounds after one warm-up step, the methods interleaved (run in
   a subprocess under the same memory limit).
3. **Step time on toy1d** (MLP 1-16-16-16-1, GELU, 593 parameters) at B=32 and
   B=128, one thread: ``jacobian="gram"``, ``"hooks"``, ``"auto"`` (which moves
   to the hook path after its first step, as ``B * P`` is tiny) and Adam.
   Per-step medians over 200 interleaved rounds.

Usage::

    python benchmarks/bench_scale.py [--quick] [--device cpu|cuda] [--json out.json]

``--quick`` shrinks every size so that the whole run takes seconds (the smoke
test in ``tests/test_bench_scale.py``). Every Sven step uses ``rank = B/2``,
``rtol = 1e-3``; every "step" is a whole training step (forward, Jacobian or
backward, update).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sven  # noqa: E402
from sven.tasks import make_toy1d, mlp, per_sample_mse  # noqa: E402

#: Prefix of the one line of JSON a child process prints.
MARK = "BENCH_SCALE_RESULT "
GiB = 1 << 30
MiB = 1 << 20
RTOL = 1e-3
LR = 1e-3
#: Sven's ``jacobian=`` option for each method name of this benchmark.
ROUTES = {"gram": "gram", "dense": "hooks", "hooks": "hooks", "auto": "auto"}
MEM_CONFIGS = ("baseline", "gram", "adam", "dense")
TOY_METHODS = ("gram", "hooks", "auto", "adam")
#: The issue's targets.
MEM_TARGET = 0.1  # peak memory: gram <= 0.1x dense
MLP_ADAM_TARGET = 2.5  # step time: gram <= 2.5x adam
MLP_DENSE_TARGET = 10.0  # step time: dense >= 10x gram
TOY_ADAM_TARGET = 2.0  # step time: gram <= 2x adam


@dataclass(frozen=True)
class Preset:
    """The sizes of one run."""

    name: str
    n_in: int
    width: int
    depth: int
    n_out: int
    batch: int  # the MLP's batch
    fallback: tuple[int, int]  # dense batches measured when the dense path does not fit at ``batch``
    time_fallback: int  # batch of the dense-vs-gram timing when the dense path does not fit at ``batch``
    mlp_rounds: int
    toy_batches: tuple[int, ...]
    toy_rounds: int
    toy_warmup: int


FULL = Preset("full", 784, 2048, 3, 10, 256, (32, 64), 64, 7, (32, 128), 200, 5)
QUICK = Preset("quick", 16, 32, 3, 4, 16, (4, 8), 8, 3, (8, 16), 10, 3)
PRESETS = {p.name: p for p in (FULL, QUICK)}


# --------------------------------------------------------------------------- shared helpers
def n_params(p: Preset) -> int:
    dims = [p.n_in] + [p.width] * p.depth + [p.n_out]
    return sum(a * b + b for a, b in itertools.pairwise(dims))


def build_mlp(p: Preset, batch: int, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The MLP of preset ``p`` and random float32 data (fixed seeds)."""
    model = mlp(width=p.width, depth=p.depth, seed=0, n_in=p.n_in, n_out=p.n_out).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, p.n_in, generator=g).to(device)
    y = torch.randn(batch, p.n_out, generator=g).to(device)
    return model, x, y


class Stepper:
    """One whole training step of ``method`` on ``model`` (its own optimizer)."""

    def __init__(self, method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.method, self.model, self.x, self.y = method, model, x, y
        self.opt: torch.optim.Optimizer
        if method == "adam":
            self.opt = torch.optim.Adam(model.parameters(), lr=LR)
        else:
            batch = int(x.shape[0])
            self.opt = sven.Sven(
                model.parameters(),
                lr=LR,
                rank=max(1, batch // 2),
                rtol=RTOL,
                jacobian=ROUTES[method],
                adaptive_damping=False,
            )

    def __call__(self) -> None:
        if isinstance(self.opt, sven.Sven):
            self.opt.step(lambda: per_sample_mse(self.model(self.x), self.y))
        else:
            self.opt.zero_grad()
            per_sample_mse(self.model(self.x), self.y).mean().backward()
            self.opt.step()

    @property
    def route(self) -> str:
        """How the last step got its Jacobian (``"gram"``, ``"hooks"``...; ``"backward"`` for Adam)."""
        if isinstance(self.opt, sven.Sven):
            return self.opt.last_step.jacobian_method if self.opt.last_step is not None else ""
        return "backward"

    @property
    def skipped(self) -> int:
        return int(self.opt.skipped_steps) if isinstance(self.opt, sven.Sven) else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per step; each round runs one step of every method, in an order rotated per round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    _sync(device)
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def time_methods(
    methods: Sequence[str], model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int
) -> dict[str, Any]:
    """Interleaved step times of ``methods``, each on its own copy of ``model``, after one warm-up step."""
    steppers = {m: Stepper(m, copy.deepcopy(model), x, y) for m in methods}
    seconds = time_interleaved(dict(steppers.items()), rounds=rounds, warmup=1, device=x.device)
    return {
        "seconds": seconds,
        "route": {m: s.route for m, s in steppers.items()},
        "skipped": {m: s.skipped for m, s in steppers.items()},
    }


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    msg = str(err).lower()
    return any(s in msg for s in ("out of memory", "can't allocate", "cannot allocate", "failed to allocate", "alloc"))


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # bytes on macOS, KiB on Linux


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- the child process
def child_main(args: argparse.Namespace) -> None:
    """One measurement in a fresh process; prints one line ``MARK + json``."""
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = int(args.mem_limit_bytes or 0)
    if device.type == "cpu" and limit > 0:  # CUDA reserves a huge address space: no RLIMIT_AS there
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    res: dict[str, Any] = {
        "child": args.child,
        "config": args.config,
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rlimit_as_bytes": limit if device.type == "cpu" and limit > 0 else None,
        "status": "ok",
        "error": None,
    }
    try:
        model, x, y = build_mlp(preset, args.batch, device)
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            res["gpu_base_bytes"] = int(torch.cuda.memory_allocated(device))
        if args.child == "mem":
            if args.config != "baseline":
                step = Stepper(args.config, model, x, y)
                step()
                _sync(device)
                res["route"], res["skipped"] = step.route, step.skipped
        else:  # "time": the methods in args.config, comma separated, interleaved
            res.update(time_methods(args.config.split(","), model, x, y, preset.mlp_rounds))
            del model
    except (MemoryError, RuntimeError) as err:
        res["status"] = "oom" if _is_oom(err) else "error"
        res["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    res["peak_rss_bytes"] = _max_rss_bytes()
    if device.type == "cuda":
        res["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    print(MARK + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- the parent
ChildRunner = Callable[[str, str, int], dict[str, Any]]


def make_runner(args: argparse.Namespace, preset: Preset, mem_limit: int) -> ChildRunner:
    """``run(kind, config, batch)``: one child process, its result (status ``killed``/``error`` if it died)."""

    def run(kind: str, config: str, batch: int) -> dict[str, Any]:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            kind,
            "--config",
            config,
            "--batch",
            str(batch),
            "--preset",
            preset.name,
            "--device",
            args.device,
            "--mem-limit-bytes",
            str(mem_limit),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            return {"child": kind, "config": config, "batch": batch, "status": "timeout", "error": "timed out"}
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(MARK):
                return dict(json.loads(line[len(MARK) :]))
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        status = "killed" if proc.returncode < 0 else "error"
        return {
            "child": kind,
            "config": config,
            "batch": batch,
            "status": status,
            "error": f"exit code {proc.returncode}: " + " | ".join(tail),
        }

    return run


def make_inprocess_time_runner(preset: Preset, device: torch.device, threads: int | None) -> ChildRunner:
    """The ``"time"`` child's work in this process (``--quick``: tiny sizes, no memory risk, no start-up cost)."""

    def run(kind: str, config: str, batch: int) -> dict[str, Any]:
        assert kind == "time"
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            model, x, y = build_mlp(preset, batch, device)
            res: dict[str, Any] = {
                "child": kind,
                "config": config,
                "batch": batch,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "status": "ok",
                "error": None,
            }
            res.update(time_methods(config.split(","), model, x, y, preset.mlp_rounds))
            return res
        finally:
            torch.set_num_threads(before)

    return run


def mem_metric(row: dict[str, Any], device: str) -> int | None:
    """The peak compared: GPU memory on CUDA, RSS on the CPU."""
    key = "gpu_peak_bytes" if device == "cuda" else "peak_rss_bytes"
    v = row.get(key)
    return int(v) if v is not None and row.get("status") == "ok" else None


def extrapolate(points: Sequence[tuple[int, float]], batch: int) -> float:
    """Linear extrapolation through the first and last ``(batch, value)`` points."""
    (b1, v1), (b2, v2) = points[0], points[-1]
    if b1 == b2:
        raise ValueError("need two different batch sizes")
    return v2 + (v2 - v1) * (batch - b2) / (b2 - b1)


def memory_section(
    run: ChildRunner, preset: Preset, device: str, *, jobs: int = 1, dense_max_batch: int | None = None
) -> dict[str, Any]:
    """Peak memory of one step per configuration (fresh processes), with the dense fallback."""
    B = preset.batch

    def one(config: str, batch: int) -> dict[str, Any]:
        if config == "dense" and dense_max_batch is not None and batch > dense_max_batch:
            return {
                "child": "mem",
                "config": config,
                "batch": batch,
                "status": "skipped",
                "error": f"batch > --dense-max-batch {dense_max_batch}",
            }
        return run("mem", config, batch)

    def run_all(specs: list[tuple[str, int]]) -> list[dict[str, Any]]:
        if jobs <= 1:
            return [one(c, b) for c, b in specs]
        with ThreadPoolExecutor(max_workers=jobs) as ex:
            return list(ex.map(lambda s: one(*s), specs))

    rows = run_all([(c, B) for c in MEM_CONFIGS])
    by = {(r["config"], r["batch"]): r for r in rows}
    base = mem_metric(by[("baseline", B)], device)
    dense_fits = by[("dense", B)]["status"] == "ok"
    if not dense_fits:
        rows += run_all([(c, b) for b in preset.fallback for c in ("gram", "dense")])
        by = {(r["config"], r["batch"]): r for r in rows}
    for r in rows:
        m = mem_metric(r, device)
        r["peak_mib"] = None if m is None else m / MiB
        r["increment_mib"] = None if m is None or base is None else (m - base) / MiB
        r["extrapolated"] = False

    out: dict[str, Any] = {"batch": B, "metric": "gpu_peak" if device == "cuda" else "peak_rss", "rows": rows}
    gram = mem_metric(by[("gram", B)], device)
    adam = mem_metric(by[("adam", B)], device)
    dense: float | None = mem_metric(by[("dense", B)], device)
    basis = f"measured at B={B}"
    extra = None
    if not dense_fits:
        pts = [(b, mem_metric(by[("dense", b)], device)) for b in preset.fallback]
        if all(v is not None for _, v in pts):
            dense = extrapolate([(b, float(v)) for b, v in pts if v is not None], B)
            basis = f"EXTRAPOLATED linearly from B={preset.fallback[0]},{preset.fallback[1]} to B={B}"
            extra = {
                "config": "dense",
                "batch": B,
                "status": "extrapolated",
                "extrapolated": True,
                "peak_mib": dense / MiB,
                "increment_mib": None if base is None else (dense - base) / MiB,
            }
            rows.append(extra)
        else:
            dense, basis = None, "dense path failed at every batch size"
    out["dense_basis"] = basis
    ratios: dict[str, float | None] = {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    ratios["gram_over_dense_peak"] = ratio(gram, dense)
    ratios["gram_over_dense_increment"] = ratio(
        None if gram is None or base is None else gram - base, None if dense is None or base is None else dense - base
    )
    ratios["gram_over_adam_peak"] = ratio(gram, adam)
    ratios["gram_over_adam_increment"] = ratio(
        None if gram is None or base is None else gram - base, None if adam is None or base is None else adam - base
    )
    if not dense_fits:  # the measured ratios at the smaller batches, for comparison
        for b in preset.fallback:
            g, d = mem_metric(by[("gram", b)], device), mem_metric(by[("dense", b)], device)
            ratios[f"gram_over_dense_peak_B{b}"] = ratio(g, d)
            ratios[f"gram_over_dense_increment_B{b}"] = ratio(
                None if g is None or base is None else g - base, None if d is None or base is None else d - base
            )
    out["ratios"] = ratios
    out["dense_fits"] = dense_fits
    return out


def mlp_time_section(run: ChildRunner, preset: Preset, dense_fits: bool, why: str = "") -> dict[str, Any]:
    """Step times of the MLP: gram, adam and dense at ``batch``, interleaved in one child process.

    If the dense path does not fit at ``batch`` (in the memory run, or next to the other two methods
    in the timing child), gram and adam are timed at ``batch`` and the three methods again at
    ``time_fallback``; where one dense step did fit on its own, the dense path is also timed alone
    at ``batch`` (not interleaved; labelled).
    """
    B = preset.batch
    runs: list[dict[str, Any]] = []
    main = dense_run = alone = clean = None
    if dense_fits:
        main = dense_run = run("time", "gram,adam,dense", B)
        runs.append(main)
        if main["status"] != "ok":
            why = f"{main['status']} next to the other methods in the timing process"
    if main is None or main["status"] != "ok":
        main = run("time", "gram,adam", B)
        dense_run = run("time", "gram,adam,dense", preset.time_fallback)
        # the same batch without the dense path in the process: its multi-GB allocations slow the steps after them
        clean = run("time", "gram,adam", preset.time_fallback)
        runs += [main, dense_run, clean]
        if dense_fits:
            alone = run("time", "dense", B)
            runs.append(alone)
    assert dense_run is not None
    sec = main.get("seconds") or {}
    g, a = sec.get("gram"), sec.get("adam")
    out: dict[str, Any] = {"batch": B, "runs": runs, "gram_over_adam": g / a if g and a else None}
    dsec = dense_run.get("seconds") or {}
    gd, dd = dsec.get("gram"), dsec.get("dense")
    out["dense_over_gram"] = dd / gd if gd and dd else None
    out["dense_batch"] = dense_run["batch"]
    out["dense_basis"] = f"measured at B={dense_run['batch']}, interleaved"
    if dense_run["batch"] != B:
        out["dense_basis"] += f" (no interleaved dense step at B={B}: {why or 'it does not fit'})"
    if dense_run["status"] != "ok":
        out["dense_basis"] = f"dense timing failed: {dense_run.get('status')} {dense_run.get('error') or ''}".strip()
    out["dense_over_clean_gram"] = None
    if clean is not None and dd:
        cg = (clean.get("seconds") or {}).get("gram")
        out["dense_over_clean_gram"] = dd / cg if cg else None
    out["dense_alone_over_gram"] = None
    if alone is not None and alone["status"] == "ok" and g:
        out["dense_alone_over_gram"] = alone["seconds"]["dense"] / g
    return out


def toy_time_section(preset: Preset, device: torch.device, threads: int) -> dict[str, Any]:
    """toy1d step times (in this process, ``threads`` threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for B in preset.toy_batches:
            data = make_toy1d(n_train=B, n_val=1)
            x, y = data.x_train.to(device), data.y_train.to(device)
            steppers = {m: Stepper(m, mlp(seed=0).to(device), x, y) for m in TOY_METHODS}
            sec = time_interleaved(
                dict(steppers.items()), rounds=preset.toy_rounds, warmup=preset.toy_warmup, device=device
            )
            a = sec["adam"]
            results.append(
                {
                    "batch": B,
                    "params": sum(p.numel() for p in steppers["adam"].model.parameters()),
                    "seconds": sec,
                    "over_adam": {m: sec[m] / a for m in TOY_METHODS},
                    "gram_over_hooks": sec["gram"] / sec["hooks"],
                    "route": {m: s.route for m, s in steppers.items()},
                    "skipped": {m: s.skipped for m, s in steppers.items()},
                }
            )
        return {"threads": threads, "rounds": preset.toy_rounds, "results": results}
    finally:
        torch.set_num_threads(before)


def targets(mem: dict[str, Any], mt: dict[str, Any], toy: dict[str, Any], preset: Preset) -> list[dict[str, Any]]:
    def t(name: str, value: float | None, op: str, thr: float, basis: str) -> dict[str, Any]:
        met = None if value is None else (value <= thr if op == "<=" else value >= thr)
        return {"target": name, "value": value, "op": op, "threshold": thr, "met": met, "basis": basis}

    B = preset.batch
    out = [
        t(
            f"peak memory, MLP B={B}: gram / dense",
            mem["ratios"]["gram_over_dense_peak"],
            "<=",
            MEM_TARGET,
            mem["dense_basis"],
        ),
        t(f"step time, MLP B={B}: gram / adam", mt["gram_over_adam"], "<=", MLP_ADAM_TARGET, f"measured at B={B}"),
        t(
            f"step time, MLP: dense / gram (B={mt['dense_batch']})",
            mt["dense_over_gram"],
            ">=",
            MLP_DENSE_TARGET,
            mt["dense_basis"],
        ),
    ]
    if mt.get("dense_alone_over_gram") is not None:
        out.append(
            t(
                f"step time, MLP B={B}: dense (alone) / gram",
                mt["dense_alone_over_gram"],
                ">=",
                MLP_DENSE_TARGET,
                "dense timed alone in its own process, NOT interleaved",
            )
        )
    for r in toy["results"]:
        out.append(
            t(
                f"step time, toy1d B={r['batch']}: gram / adam",
                r["over_adam"]["gram"],
                "<=",
                TOY_ADAM_TARGET,
                f"measured, {toy['threads']} thread(s)",
            )
        )
    return out


# --------------------------------------------------------------------------- printing
def _f(v: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def print_report(res: dict[str, Any]) -> None:
    meta, mem, mt, toy = res["meta"], res["memory"], res["mlp_time"], res["toy1d_time"]
    print(f"\n# bench_scale ({meta['preset']}), device {meta['device_name']}, torch {meta['torch']}")
    print(f"MLP {meta['mlp']} ({meta['mlp_params']:,} parameters), float32, rank = B/2, rtol {RTOL}")
    lim = meta.get("mem_limit_bytes")
    if lim:
        print(f"children under RLIMIT_AS = {lim / GiB:.1f} GiB")
    metric = "GPU max_memory_allocated" if mem["metric"] == "gpu_peak" else "peak RSS (ru_maxrss)"
    print(f"\n## Peak memory of one step ({metric}; increment = minus the baseline process)\n")
    print("| config | B | status | peak [MiB] | increment [MiB] | route |")
    print("|---|---:|---|---:|---:|---|")
    for r in mem["rows"]:
        label = r["config"] + (" (extrapolated)" if r.get("extrapolated") else "")
        status = r["status"] if r["status"] in ("ok", "extrapolated") else f"{r['status']}: {r.get('error') or ''}"
        print(
            f"| {label} | {r['batch']} | {status} | {_f(r.get('peak_mib'), '{:.0f}')} | "
            f"{_f(r.get('increment_mib'), '{:.0f}')} | {r.get('route') or ''} |"
        )
    print(f"\ndense at B={mem['batch']}: {mem['dense_basis']}")
    for k, v in mem["ratios"].items():
        print(f"  {k}: {_f(v, '{:.4f}')}")
    print("\n## Step time, MLP (median seconds per whole training step)\n")
    print("| B | method | s/step | route |")
    print("|---:|---|---:|---|")
    for run in mt["runs"]:
        if run.get("status") != "ok":
            print(f"| {run['batch']} | {run['config']} | {run['status']}: {run.get('error') or ''} | |")
            continue
        for m, s in run["seconds"].items():
            print(f"| {run['batch']} | {m} | {s:.4f} | {run['route'][m]} |")
    print(f"\ngram / adam (B={mt['batch']}): {_f(mt['gram_over_adam'], '{:.2f}')}x")
    print(f"dense / gram ({mt['dense_basis']}): {_f(mt['dense_over_gram'], '{:.1f}')}x")
    if mt.get("dense_over_clean_gram") is not None:
        print(
            f"dense / gram at B={mt['dense_batch']} (gram timed in a process without the dense path): "
            f"{mt['dense_over_clean_gram']:.1f}x"
        )
    if mt.get("dense_alone_over_gram") is not None:
        print(
            f"dense / gram at B={mt['batch']} (dense timed ALONE in its own process, not interleaved, "
            f"against the interleaved gram median): {mt['dense_alone_over_gram']:.1f}x"
        )
    print(f"\n## Step time, toy1d ({toy['threads']} thread(s), median of {toy['rounds']} interleaved steps)\n")
    print("| B | method | ms/step | x Adam | route after warm-up |")
    print("|---:|---|---:|---:|---|")
    for r in toy["results"]:
        for m in TOY_METHODS:
            print(f"| {r['batch']} | {m} | {r['seconds'][m] * 1e3:.3f} | {r['over_adam'][m]:.2f} | {r['route'][m]} |")
    quick = " (--quick sizes: NOT the issue's sizes, only a smoke test)" if meta["preset"] == "quick" else ""
    print(f"\n## Targets{quick}\n")
    print("| target | measured | target | met? | basis |")
    print("|---|---:|---:|---|---|")
    for t in res["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        print(f"| {t['target']} | {_f(t['value'], '{:.3g}')} | {t['op']} {t['threshold']:g} | {met} | {t['basis']} |")


# --------------------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): the smoke test")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the MLP runs (default: torch's)")
    ap.add_argument("--toy-threads", type=int, default=1, help="torch threads of the toy1d timings")
    ap.add_argument(
        "--mem-limit-gib",
        type=float,
        default=20.0,
        help="RLIMIT_AS of the CPU children (lowered to MemAvailable - 1.5 GiB); 0: none",
    )
    ap.add_argument(
        "--dense-max-batch",
        type=int,
        default=None,
        help="do not try the dense path above this batch (treated as not fitting)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="memory children run at once (default 1; --quick: 4). Peaks are per process",
    )
    ap.add_argument("--child-timeout", type=float, default=1800.0, help=argparse.SUPPRESS)
    # the child process
    ap.add_argument("--child", choices=("mem", "time"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default="", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="full", help=argparse.SUPPRESS)
    ap.add_argument("--mem-limit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench_scale.py: --device cuda, but torch {torch.__version__} sees no CUDA GPU "
            f"(torch.cuda.is_available() is False); run with --device cpu or on a machine with a GPU"
        )
    preset = QUICK if args.quick else FULL
    device = torch.device(args.device)
    mem_limit = 0
    if args.device == "cpu" and args.mem_limit_gib > 0:
        mem_limit = int(args.mem_limit_gib * GiB)
        avail = mem_available_bytes()
        if avail is not None:
            mem_limit = min(mem_limit, max(avail - int(1.5 * GiB), 1 * GiB))
    jobs = args.jobs if args.jobs is not None else (4 if args.quick else 1)
    run = make_runner(args, preset, mem_limit)
    t0 = time.perf_counter()
    mem = memory_section(run, preset, args.device, jobs=jobs, dense_max_batch=args.dense_max_batch)
    t_mem = time.perf_counter()
    # the timing runs in a child too (same memory limit), except in --quick mode
    time_run = make_inprocess_time_runner(preset, device, args.threads) if args.quick else run
    dense_row = next(r for r in mem["rows"] if r["config"] == "dense" and r["batch"] == preset.batch)
    mt = mlp_time_section(time_run, preset, mem["dense_fits"], why=f"{dense_row['status']} in the memory run")
    t_mlp = time.perf_counter()
    toy = toy_time_section(preset, device, args.toy_threads)
    res: dict[str, Any] = {
        "meta": {
            "preset": preset.name,
            "sizes": asdict(preset),
            "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "mlp": "-".join(str(d) for d in [preset.n_in] + [preset.width] * preset.depth + [preset.n_out]),
            "mlp_params": n_params(preset),
            "mem_limit_bytes": mem_limit or None,
            "rank": "B/2",
            "rtol": RTOL,
        },
        "memory": mem,
        "mlp_time": mt,
        "toy1d_time": toy,
    }
    res["targets"] = targets(mem, mt, toy, preset)
    t_end = time.perf_counter()
    res["meta"]["wall_s"] = {"memory": t_mem - t0, "mlp_time": t_mlp - t_mem, "toy1d_time": t_end - t_mlp}
    print_report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    main()
