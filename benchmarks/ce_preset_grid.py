"""The grid behind the loss rule's classifier preset (``sven.loss_rows.RULE_PRESET``): four tasks, seed 0.

Every point is ``sven.Sven(params, ggn=True, lr=..., ...)`` on the GGN rows of ``classes`` kept classes per
sample (the rule's ``GGN_CLASSES``), with either a fixed ``damping`` or (``--judge``) the step control that
judges each try on the cross-entropy, :class:`sven.control.CrossEntropyDamping`, with that damping as its floor.
It trains with the sven-bench tasks' data, batches and epochs on the four cross-entropy tasks (mnist1d,
mnist-subset, mnist-subset-cnn, digits-ce), one thread. Adam at lr 1e-3 and 1e-2 runs beside it (the best of
sven-bench's Adam grid on these tasks is one of the two). The seed-0 points are ranked like
``sven.bench.defaults`` ranks defaults: the regret on a task is ``log10(loss / best point's loss)``, by the mean
over the tasks, the worst beside it; a point more than 10x above the best on a task (a blow-up) ranks last.
Points run on more seeds (``--point ... --seeds 1 2``) get a second table of medians. The training times
are not compared here: the grid ran on a shared machine (sven-bench's 3-seed run measures them).

    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --out runs/fixed.json            # fixed damping
    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --judge --no-adam --out runs/judge.json
    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --no-adam --seeds 1 2 --point 1,0.5,0.03 0,0.5,0.03 \\
        1,0.5,0.01 --out runs/seeds.json
    python benchmarks/ce_preset_grid.py --from-json docs/data/ce_preset_grid.json          # the stored runs

**Default candidates** (``--candidate``, :data:`CANDIDATES`: whole ``sven.Sven`` configurations, ``today`` the
loss rule itself) run on five tasks, the four above and ``heldout``, the classifier no default was chosen on
(:class:`benchmarks.ce_heldout.HeldOutTask`). ``--vs-adam`` ranks them by the log-ratio to the best Adam
instead of the best point; ``--adam-from`` runs Adam on other seeds at each task's best seed-0 lr, and a table
of the per-seed ratios to it (same seed), their medians, the best epoch's ratio and the accuracies follows;
``--step-cost`` times blocks of steps of each candidate against Adam's, interleaved in one process::

    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --candidate today seq-ce ... --adam-lrs 1e-3 3e-3 1e-2 \
        --vs-adam --out s0.json
    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --candidate today lr1-floor0.3 --seeds 1 2 \
        --adam-from s0.json --out s12.json
    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --step-cost --candidate today lr1-floor0.3 \
        --task mnist1d mnist-subset mnist-subset-cnn digits-ce heldout
    python benchmarks/ce_preset_grid.py --vs-adam --from-json docs/data/ce_candidates.json  # the stored screen

``--task`` also takes the other held-out classifiers of ``benchmarks/ce_heldout.py`` (``heldout-cnn``,
``heldout-quantiles``, ``heldout-shapes``). The screen of the damping floor's reference scale (candidates
``mean-*``, ``q0.95*``: :class:`ScaledFloor`) and the Gram spectra behind it (``--spectra EPOCHS``: the loss
rule's steps over a task's first epochs, :func:`spectra`)::

    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --spectra 1 --task mnist1d mnist-subset mnist-subset-cnn
    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --candidate today mean-3-cap0.3 mean-1-cap0.3 \\
        q0.95-cap0.3 --task digits-ce heldout-cnn heldout-quantiles heldout --adam-lrs 1e-3 3e-3 1e-2 --out s1.json
    python benchmarks/ce_preset_grid.py --vs-adam --from-json docs/data/ce_floor_screen.json   # the stored screen
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sven
import sven.loss_rule
from sven.bench.optimizers import OptimizerFactory, Stepper
from sven.bench.runner import run_one
from sven.bench.tasks import TASKS
from sven.bench.tasks.base import Task
from sven.control import CrossEntropyDamping

TASK_NAMES = ("mnist1d", "mnist-subset", "mnist-subset-cnn", "digits-ce")
ADAM_LRS = (1e-3, 1e-2)
#: the grid: classes x lr x damping (relative to sigma_max^2)
CLASSES = (0, 1)
LRS = (0.5, 1.0)
DAMPINGS = (0.03, 0.1, 0.3)
#: the damping floors of the control that judges each try on the cross-entropy (``--judge``)
JUDGE_FLOORS = (0.01, 0.03, 0.1, 0.3)
FLOORS_0 = (0.03, 0.1)  # and those of one row per sample (classes=0)


class _Adam(OptimizerFactory):
    name = "adam"
    description = "torch.optim.Adam"

    def grid(self, task: Any, *, quick: bool = False, sven_grid: bool = False) -> list[dict[str, Any]]:
        return []

    def make(self, model: nn.Module, task: Task, hparams: dict[str, Any]) -> Stepper:
        opt = torch.optim.Adam(model.parameters(), lr=hparams["lr"])

        class _S:
            def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = task.per_sample_loss(model(x), y)
                loss.mean().backward()
                opt.step()
                return loss.detach()

        return _S()


class _Ggn(OptimizerFactory):
    name = "sven-ggn"
    description = "sven.Sven(ggn=True) with the grid point's lr, damping and classes"

    def grid(self, task: Any, *, quick: bool = False, sven_grid: bool = False) -> list[dict[str, Any]]:
        return []

    def make(self, model: nn.Module, task: Task, hparams: dict[str, Any]) -> Stepper:
        opts = {k: v for k, v in hparams.items() if k not in ("classes", "judge")}
        if hparams.get("judge"):  # the damping is the floor of the control that judges the cross-entropy
            opts["control"] = CrossEntropyDamping(opts.pop("damping"))
        opt = sven.Sven(model.parameters(), ggn=True, **opts)
        classes = hparams["classes"]

        class _S:
            def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                sven.loss_rule.GGN_CLASSES = classes  # the rows the rule builds
                return opt.step(lambda: task.per_sample_loss(model(x), y))

        return _S()


#: The five tasks of the default candidates' screen (``--candidate``): the four above and ``heldout``, the
#: classifier no default was chosen on (:class:`benchmarks.ce_heldout.HeldOutTask`).
ALL_TASKS = (*TASK_NAMES, "heldout")


def _task(name: str) -> Task:
    from benchmarks.ce_heldout import HELD_OUT

    if name in HELD_OUT:
        return HELD_OUT[name]()
    task = TASKS[name]()
    assert isinstance(task, Task)
    return task


class AbsoluteFloor(CrossEntropyDamping):
    r""":class:`~sven.control.CrossEntropyDamping` whose floor is the first step's damping in absolute units.

    The loss rule's floor is relative, :math:`\lambda \ge f\,\sigma_{max}^2`. As the predictions turn
    confident the GGN :math:`\sum p(1-p)`-weighted rows shrink, and :math:`\sigma_{max}^2` with them, so the
    same relative floor lets the step in parameter space grow: the logits inflate. Here the floor is
    :math:`f \max(\sigma_{max}^2, \sigma_0^2)` with :math:`\sigma_0` that of the first step, i.e. relative
    :math:`f \max(1, \sigma_0^2 / \sigma_{max}^2)`: the proximal term :math:`\tfrac\lambda2\|\delta\|^2`
    never falls below the first step's, and the step anneals towards a gradient step of length
    :math:`\|g\| / (f \sigma_0^2)` as the batch is fitted. On the five tasks of the screen it changed nothing
    (the losses of ``today`` to every printed digit): the floor stayed at ``0.1``, so the GGN's :math:`\sigma_{max}`
    did not fall below the first step's.
    """

    def __init__(self, floor: float) -> None:
        super().__init__(floor)
        self.base, self.ref = floor, 0.0

    def run(self, ctx: Any) -> Any:
        top = float(ctx.F.S[0]) ** 2 if ctx.F.S.numel() else 0.0
        if top > 0 and math.isfinite(top):
            self.ref = self.ref or top
            self.floor = self.base * max(1.0, self.ref / top)
            self.state.lam = max(self.state.lam, self.floor)
        return super().run(ctx)


class LossFloor(CrossEntropyDamping):
    r""":class:`~sven.control.CrossEntropyDamping` whose floor grows as the batch loss falls.

    The floor is :math:`f \max(1, L_1 / \bar L)`, :math:`L_1` the first batch's mean cross-entropy and
    :math:`\bar L` an exponential average (factor 0.9) of the batches' losses before each step: a
    step that anneals as the batches are fitted, where the logits would otherwise keep growing.
    """

    def __init__(self, floor: float) -> None:
        super().__init__(floor)
        self.base, self.first, self.avg = floor, 0.0, 0.0

    def run(self, ctx: Any) -> Any:
        loss = ctx.loss()
        if loss > 0 and math.isfinite(loss):
            self.first = self.first or loss
            self.avg = 0.9 * self.avg + 0.1 * loss if self.avg else loss
            self.floor = self.base * max(1.0, self.first / self.avg)
            self.state.lam = max(self.state.lam, self.floor)
        return super().run(ctx)


class ScaledFloor(CrossEntropyDamping):
    r""":class:`~sven.control.CrossEntropyDamping` whose floor is ``c`` times another scale of the Gram spectrum.

    The loss rule's floor is :math:`\lambda \ge f \lambda_{max}` with :math:`\lambda_i = \sigma_i^2` the
    eigenvalues of the batch's Gram matrix :math:`K = M M^\top` (:math:`n` rows). A step filters the
    direction :math:`i` by :math:`\lambda_i / (\lambda_i + \lambda)`, so when :math:`\lambda_{max}` stands far
    above the rest every other direction is shrunk. Here the floor's reference is scale-free but not the top
    eigenvalue: ``ref="mean"``: :math:`c\,\mathrm{tr}(K) / n` (the mean eigenvalue); ``ref="quantile"``:
    :math:`c\,\lambda_{(q)}`, the eigenvalue at quantile ``q`` of the :math:`n` (missing ones are 0). (A floor
    :math:`f \lambda_{max} \min(1, r_{eff} / r_0)` from the effective rank :math:`r_{eff} = \mathrm{tr}(K) /
    \lambda_{max}` is ``ref="mean"`` with ``c = f n / r_0`` and ``cap = f``.) Each is turned into the damping
    relative to :math:`\lambda_{max}` at every step, and the Levenberg--Marquardt damping is kept as a multiple
    of the floor (the floor moving from step to step moves it with it); ``cap`` bounds the relative floor
    from above.
    """

    def __init__(self, c: float, ref: str = "mean", q: float = 0.5, cap: float = 1.0) -> None:
        super().__init__(0.3)
        if ref not in ("mean", "quantile"):
            raise ValueError(f"`ref` must be 'mean' or 'quantile', got {ref!r}")
        self.c, self.ref, self.q, self.cap = c, ref, q, cap

    def relative_floor(self, ctx: Any) -> float | None:
        r"""The floor relative to :math:`\lambda_{max}` from the step's singular values (``None``: no spectrum)."""
        lam = ctx.F.S.double() ** 2
        n = ctx.R.numel()
        if lam.numel() == 0 or not float(lam[0]) > 0 or not math.isfinite(float(lam[0])):
            return None
        top = float(lam[0])
        if self.ref == "mean":
            return self.c * float(lam.sum()) / (n * top)
        full = torch.cat([lam, lam.new_zeros(max(0, n - lam.numel()))])
        return self.c * float(torch.quantile(full, self.q)) / top

    def run(self, ctx: Any) -> Any:
        rel = self.relative_floor(ctx)
        if rel is not None:
            rel = min(max(rel, 1e-8), self.cap)
            self.state.lam = rel * max(1.0, self.state.lam / self.floor)
            self.floor = rel
        return super().run(ctx)


class Spectra(CrossEntropyDamping):
    r"""The loss rule's control that also records each step's Gram spectrum :math:`\lambda_i / \lambda_{max}`."""

    def __init__(self, floor: float, n_rows: list[int], spectra: list[torch.Tensor]) -> None:
        super().__init__(floor)
        self.n_rows, self.spectra = n_rows, spectra

    def run(self, ctx: Any) -> Any:
        lam = ctx.F.S.double() ** 2
        if lam.numel() and float(lam[0]) > 0:
            self.n_rows.append(ctx.R.numel())
            self.spectra.append(lam / lam[0])
        return super().run(ctx)


def spectra(task_name: str, *, epochs: int = 1, seed: int = 0) -> dict[str, float]:
    r"""Gram spectra of the loss rule's steps (``today``) over the first ``epochs`` epochs of a task.

    Per step: the effective rank :math:`\mathrm{tr}(K) / \lambda_{max}`, the mean eigenvalue over the
    :math:`n` rows relative to :math:`\lambda_{max}`, the count of eigenvalues above ``0.3`` :math:`\lambda_{max}`,
    the median :math:`\lambda_i / \lambda_{max}`, and the mean shrink factor :math:`\lambda_i / (\lambda_i +
    0.3\lambda_{max})` over the eigenvalues (the loss rule's floor); medians over the first ten steps
    (``early``) and the last ten (``late``).
    """
    torch.set_num_threads(1)
    task = _task(task_name)
    data, model = task.data(), task.model(seed)
    n_rows: list[int] = []
    spec: list[torch.Tensor] = []
    opt = sven.Sven(model.parameters(), ggn=True, lr=1.0, control=Spectra(0.3, n_rows, spec))
    gen = torch.Generator().manual_seed(task.loader_seed)
    for _ in range(epochs):
        for x, y in task.batches(data, gen):
            opt.step(lambda x=x, y=y: task.per_sample_loss(model(x), y))
    stats: dict[str, float] = {"params": sum(p.numel() for p in model.parameters()), "rows": n_rows[0],
                               "kept": spec[0].numel()}  # fmt: skip

    def per_step(i: int) -> dict[str, float]:
        r, n = spec[i], n_rows[i]
        return {"eff_rank": float(r.sum()), "mean/max": float(r.sum()) / n, "above_0.3": float((r > 0.3).sum()),
                "median/max": float(torch.quantile(torch.cat([r, r.new_zeros(n - r.numel())]), 0.5)),
                "shrink_0.3": float((r / (r + 0.3)).mean())}  # fmt: skip

    for part, idx in (("early", range(min(10, len(spec)))), ("late", range(max(0, len(spec) - 10), len(spec)))):
        rows = [per_step(i) for i in idx]
        for k in rows[0]:
            stats[f"{part} {k}"] = statistics.median(r[k] for r in rows)
    return stats


#: New default candidates for cross-entropy classifiers (issue #20), ``sven.Sven`` options: ``today`` is the
#: loss rule (``sven.Sven(params)``); ``classes`` sets the rule's ``GGN_CLASSES`` (``None``: all ``C``);
#: ``control="absolute-floor"`` / ``"loss-floor"`` is :class:`AbsoluteFloor` / :class:`LossFloor` at the rule's
#: floor ``0.1``.
CANDIDATES: dict[str, dict[str, Any]] = {
    "today": {},
    "seq-ce": {"ggn": False, "lr": 0.02, "momentum": 0.9, "nesterov": True, "adaptive_damping": False},
    "seq-ggn": {"ggn": True, "lr": 0.02, "momentum": 0.9, "nesterov": True, "adaptive_damping": False,
                "damping": 0.0},
    "ggn-nesterov": {"ggn": True, "lr": 0.05, "momentum": 0.9, "nesterov": True, "adaptive_damping": False,
                     "damping": 0.1},
    "wd-1e-3": {"weight_decay": 1e-3},
    "abs-floor": {"ggn": True, "control": "absolute-floor"},
    "all-classes": {"ggn": True, "classes": None},
    "one-row": {"ggn": True, "classes": 0},
    "lr1-floor0.3": {"ggn": True, "lr": 1.0, "damping": 0.3},
    "lr1-floor0.2": {"ggn": True, "lr": 1.0, "damping": 0.2},
    "ggn-nesterov-0.02": {"ggn": True, "lr": 0.02, "momentum": 0.9, "nesterov": True, "adaptive_damping": False,
                          "damping": 0.1},
    "wd-3e-3": {"weight_decay": 3e-3},
    "wd-3e-4": {"weight_decay": 3e-4},
    "lr1-floor0.3-wd5e-4": {"ggn": True, "lr": 1.0, "damping": 0.3, "weight_decay": 5e-4},
    "lr1-floor0.3-wd2e-4": {"ggn": True, "lr": 1.0, "damping": 0.3, "weight_decay": 2e-4},
    "lr1-floor0.3-wd1e-4": {"ggn": True, "lr": 1.0, "damping": 0.3, "weight_decay": 1e-4},
    "loss-floor": {"ggn": True, "control": "loss-floor"},
    "lr0.5-floor0.1": {"ggn": True, "lr": 0.5, "damping": 0.1},  # the loss rule's preset before lr1-floor0.3
    # the floor's reference scale (ScaledFloor: c, ref, q, cap), lr 1 as the rule's
    "mean-3": {"ggn": True, "control": (3.0, "mean", 0.5, 1.0)},
    "mean-3-cap0.3": {"ggn": True, "control": (3.0, "mean", 0.5, 0.3)},
    "mean-1-cap0.3": {"ggn": True, "control": (1.0, "mean", 0.5, 0.3)},
    "mean-10-cap0.3": {"ggn": True, "control": (10.0, "mean", 0.5, 0.3)},
    "mean-5-cap0.3": {"ggn": True, "control": (5.0, "mean", 0.5, 0.3)},
    "q0.95": {"ggn": True, "control": (1.0, "quantile", 0.95, 1.0)},
    "q0.95-cap0.3": {"ggn": True, "control": (1.0, "quantile", 0.95, 0.3)},
    # a lower floor with decoupled weight decay (lr 0.5, the judged damping)
    "floor0.01-wd3e-3": {"ggn": True, "damping": 0.01, "weight_decay": 3e-3},
    "floor0.01-wd2e-3": {"ggn": True, "damping": 0.01, "weight_decay": 2e-3},
    "floor0.02-wd2e-3": {"ggn": True, "damping": 0.02, "weight_decay": 2e-3},
    "floor0.02-wd3e-3": {"ggn": True, "damping": 0.02, "weight_decay": 3e-3},
    "floor0.03-wd1e-3": {"ggn": True, "damping": 0.03, "weight_decay": 1e-3},
    "floor0.03-wd2e-3": {"ggn": True, "damping": 0.03, "weight_decay": 2e-3},
    # the floor from damping_start doubled on a plateau of the batches' loss, up to 0.1 (CrossEntropyDamping's
    # ``start``; screened while weight decay was still part of the judged step: docs/results_notes.md)
    "plateau0.02-wd2e-3": {"ggn": True, "weight_decay": 2e-3, "damping_start": 0.02},
    "plateau0.03-wd1e-3": {"ggn": True, "weight_decay": 1e-3, "damping_start": 0.03},
    "plateau0.02-wd1e-3": {"ggn": True, "weight_decay": 1e-3, "damping_start": 0.02},
    "plateau0.03-wd2e-3": {"ggn": True, "weight_decay": 2e-3, "damping_start": 0.03},
    "plateau0.03-wd5e-4": {"ggn": True, "weight_decay": 5e-4, "damping_start": 0.03},
    "plateau0.02-wd5e-4": {"ggn": True, "weight_decay": 5e-4, "damping_start": 0.02},
    # the loss rule's preset before 2026-12-05 (a fixed floor 0.1, no weight decay); "today" is the new one
    "fixed-floor0.1": {"ggn": True, "damping_start": None, "weight_decay": 0.0},
    # no truncation above the Gram's round-off (rtol 0): every direction the damping keeps (docs/results_notes.md)
    "keep-all": {"rtol": 0.0},
}  # fmt: skip


class _Candidate(OptimizerFactory):
    name = "sven-ggn"  # ranked with the grid's points
    description = "sven.Sven with the options of a default candidate (CANDIDATES)"

    def grid(self, task: Any, *, quick: bool = False, sven_grid: bool = False) -> list[dict[str, Any]]:
        return []

    def make(self, model: nn.Module, task: Task, hparams: dict[str, Any]) -> Stepper:
        opts = dict(CANDIDATES[hparams["candidate"]])
        classes = opts.pop("classes", 1)
        if opts.get("control") in ("absolute-floor", "loss-floor"):
            opts["control"] = (AbsoluteFloor if opts["control"] == "absolute-floor" else LossFloor)(0.1)
        elif isinstance(opts.get("control"), tuple):
            opts["control"] = ScaledFloor(*opts["control"])
            opts.setdefault("lr", 1.0)
        opt = sven.Sven(model.parameters(), **opts)

        class _S:
            def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                sven.loss_rule.GGN_CLASSES = classes  # the rows the rule builds
                return opt.step(lambda: task.per_sample_loss(model(x), y))

        return _S()


def step_cost(task_name: str, names: list[str], *, rounds: int = 10, steps: int = 10, warmup: int = 20) -> dict:
    """Median time of a block of ``steps`` steps of each candidate over Adam's (lr 1e-3), interleaved.

    Model seed 0, the task's batch size, one thread; every optimizer first takes ``warmup`` steps (the loss rule
    decides at the first), then the blocks run in turn, the order rotated each round.
    """
    torch.set_num_threads(1)
    task = _task(task_name)
    data, b = task.data(), task.batch_size
    steppers = {"adam": _Adam().make(m := task.model(0), task, {"lr": 1e-3})}
    for n in names:
        steppers[n] = _Candidate().make(task.model(0), task, {"candidate": n})
    del m
    gen = torch.Generator().manual_seed(0)

    def block(st: Stepper, idx: torch.Tensor) -> None:
        for i in range(idx.shape[0] // b):
            j = idx[i * b : (i + 1) * b]
            st.step(data.x_train[j], data.y_train[j])

    warm = torch.randperm(data.n_train, generator=gen)[: warmup * b]
    for st in steppers.values():
        block(st, warm)
    times: dict[str, list[float]] = {n: [] for n in steppers}
    order = list(steppers)
    for k in range(rounds):
        idx = torch.randperm(data.n_train, generator=gen)[: steps * b]
        for n in order[k % len(order) :] + order[: k % len(order)]:
            t0 = time.perf_counter()
            block(steppers[n], idx)
            times[n].append(time.perf_counter() - t0)
    adam = statistics.median(times["adam"])
    return {n: statistics.median(times[n]) / adam for n in names}


def _points(judge: bool) -> list[dict[str, Any]]:
    if not judge:
        return [{"classes": c, "lr": lr, "damping": d} for c, lr, d in itertools.product(CLASSES, LRS, DAMPINGS)]
    pts = [{"classes": 1, "lr": lr, "damping": d, "judge": True} for lr, d in itertools.product(LRS, JUDGE_FLOORS)]
    return pts + [{"classes": 0, "lr": lr, "damping": d, "judge": True} for lr, d in itertools.product(LRS, FLOORS_0)]


def run(
    tasks: tuple[str, ...],
    points: list[dict[str, Any]],
    *,
    adam: bool | dict[str, float] = True,
    seeds: list[int] | None = None,
    adam_lrs: tuple[float, ...] = ADAM_LRS,
) -> list[dict[str, Any]]:
    """Run every point (a grid point, or ``{"candidate": name}``) and Adam on ``tasks`` and ``seeds``.

    ``adam``: ``True`` runs Adam at each of ``adam_lrs``; a ``{task: lr}`` mapping runs it at that lr only.
    """
    torch.set_num_threads(1)
    out = []
    for name in tasks:
        task = _task(name)
        data = task.data()
        lrs = [adam[name]] if isinstance(adam, dict) else list(adam_lrs) if adam else []
        jobs: list[tuple[OptimizerFactory, dict[str, Any]]] = [(_Adam(), {"lr": lr}) for lr in lrs]
        jobs += [(_Candidate() if "candidate" in p else _Ggn(), p) for p in points]
        for (factory, hp), seed in itertools.product(jobs, seeds or [0]):
            r = run_one(task, factory, hp, seed, data=data, epochs=task.epochs)
            acc = r.metrics.get("accuracy", [float("nan")])[-1]
            row = {"task": name, "optimizer": factory.name, "hparams": hp, "seed": seed, "loss": r.final_val_loss,
                   "accuracy": acc, "time": r.total_train_time, "diverged": r.diverged,
                   "best_loss": min(r.val_loss[1:], default=math.nan), "step_time": r.step_time_median}  # fmt: skip
            print(json.dumps(row), file=sys.stderr, flush=True)
            out.append(row)
    return out


def _key(row: dict[str, Any]) -> str:
    return json.dumps(row["hparams"], sort_keys=True)


def _label(key: str) -> str:
    p = json.loads(key)
    if "candidate" in p:
        return str(p["candidate"])
    what = "floor" if p.get("judge") else "damping"
    return f"classes={p['classes']} lr={p['lr']:g} {what}={p['damping']:g}"


def _tasks_of(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["task"] for r in rows}, key=lambda t: ALL_TASKS.index(t) if t in ALL_TASKS else 99)


def best_adam(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each task's seed-0 Adam run of the lowest loss (its lr is the one the other seeds run)."""
    adam = [r for r in rows if r["optimizer"] == "adam" and r.get("seed", 0) == 0]
    return {t: min((r for r in adam if r["task"] == t), key=lambda r: r["loss"]) for t in _tasks_of(adam)}


def ranking(rows: list[dict[str, Any]], *, vs_adam: bool = False) -> str:
    """The seed-0 grid as a Markdown table, best mean regret first (a diverged point last).

    The regret on a task is ``log10(loss / reference)``, the reference the best point's loss, or with
    ``vs_adam`` the best Adam's (the mean and worst log-ratio to Adam); a point more than 10x above the
    reference on a task is a blow-up.
    """
    rows = [r for r in rows if r.get("seed", 0) == 0]
    tasks = _tasks_of(rows)
    adam = best_adam(rows)
    sv = [r for r in rows if r["optimizer"] == "sven-ggn"]
    if vs_adam:
        ref = {t: adam[t]["loss"] for t in tasks}
    else:
        ref = {t: min(r["loss"] for r in sv if r["task"] == t and math.isfinite(r["loss"])) for t in tasks}
    table = []
    for k in sorted({_key(r) for r in sv}):
        by = {r["task"]: r for r in sv if _key(r) == k}
        if set(by) != set(tasks):
            continue
        ok = all(math.isfinite(by[t]["loss"]) and by[t]["loss"] < 10 * ref[t] for t in tasks)
        reg = [math.log10(by[t]["loss"] / ref[t]) if ok else math.inf for t in tasks]
        table.append((statistics.mean(reg), max(reg), k, by))
    table.sort(key=lambda x: (x[0], x[1]))
    what = "log10 ratio to Adam" if vs_adam else "regret"
    lines = ["| # | point | " + " | ".join(f"{t} (/ Adam)" for t in tasks) + f" | mean {what} | worst {what} |",
             "|" + "---|" * (len(tasks) + 4),
             "| | best Adam | " + " | ".join(f"{adam[t]['loss']:.3f} (lr {adam[t]['hparams']['lr']:g})"
                                            for t in tasks) + " | | |"]  # fmt: skip
    for i, (mean, worst, k, by) in enumerate(table, 1):
        cells = [f"{by[t]['loss']:.3g} ({by[t]['loss'] / adam[t]['loss']:.2f}x)" for t in tasks]
        lines.append(f"| {i} | {_label(k)} | " + " | ".join(cells) + f" | {mean:.3f} | {worst:.3f} |")
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """Points run on several seeds against Adam at its seed-0 lr on the same seed: per task the median ratio of
    the final losses (the ratio per seed), the median ratio of the best epochs' losses, and the accuracies."""
    sv = [r for r in rows if r["optimizer"] == "sven-ggn"]
    keys = sorted(k for k in {_key(r) for r in sv} if len({r.get("seed", 0) for r in sv if _key(r) == k}) > 1)
    tasks = _tasks_of(sv)
    lr = {t: r["hparams"]["lr"] for t, r in best_adam(rows).items()}
    adam = {
        (r["task"], r.get("seed", 0)): r
        for r in rows
        if r["optimizer"] == "adam" and r["hparams"]["lr"] == lr.get(r["task"])
    }
    lines = ["| point | " + " | ".join(f"{t}: median [per seed], best epoch, accuracy / Adam's" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]  # fmt: skip
    for k in keys:
        cells = []
        for t in tasks:
            mine = [r for r in sv if _key(r) == k and r["task"] == t and (t, r.get("seed", 0)) in adam]
            got = sorted(((r.get("seed", 0), r) for r in mine), key=lambda sr: sr[0])
            if not got:  # no run of this point, or no Adam beside it, on this task
                cells.append("-")
                continue
            ratios = [r["loss"] / adam[t, s]["loss"] for s, r in got]
            best = [r.get("best_loss", math.nan) / adam[t, s]["loss"] for s, r in got]
            acc = statistics.median(r["accuracy"] for _, r in got)
            acc_adam = statistics.median(adam[t, s]["accuracy"] for s, _ in got)
            cells.append(f"{statistics.median(ratios):.2f}x [{', '.join(f'{v:.2f}' for v in ratios)}], "
                         f"{statistics.median(best):.2f}x, {100 * acc:.1f}/{100 * acc_adam:.1f} %")  # fmt: skip
        lines.append(f"| {_label(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(rows: list[dict[str, Any]]) -> str:
    """Points run on several seeds: each task's losses by seed and their median."""
    sv = [r for r in rows if r["optimizer"] == "sven-ggn"]
    keys = sorted(k for k in {_key(r) for r in sv} if len({r.get("seed", 0) for r in sv if _key(r) == k}) > 1)
    tasks = _tasks_of(sv)
    lines = ["| point | " + " | ".join(f"{t}: median [by seed]" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]  # fmt: skip
    for k in keys:
        cells = []
        for t in tasks:
            got = sorted((r.get("seed", 0), r["loss"]) for r in sv if _key(r) == k and r["task"] == t)
            losses = [v for _, v in got]
            listed = ", ".join(f"{v:.3g}" for v in losses)
            cells.append(f"{statistics.median(losses):.3g} [{listed}]" if losses else "-")
        lines.append(f"| {_label(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="+", default=None, help="default: the four classifiers (all five with --candidate)")
    ap.add_argument("--out", help="write the runs here (JSON)")
    ap.add_argument("--judge", action="store_true", help="the grid of the control that judges the cross-entropy")
    ap.add_argument("--no-adam", action="store_true", help="skip the Adam runs (take them from another file)")
    ap.add_argument("--point", nargs="+", metavar="CLASSES,LR,FLOOR", help="run only these points of the --judge grid")
    ap.add_argument("--candidate", nargs="+", choices=list(CANDIDATES), help="run these default candidates instead")
    ap.add_argument("--adam-lrs", nargs="+", type=float, default=list(ADAM_LRS), help="Adam's lrs (default 1e-3 1e-2)")
    ap.add_argument("--adam-from", nargs="+", help="run Adam only at each task's best seed-0 lr in these JSON files")
    ap.add_argument("--vs-adam", action="store_true", help="rank by the log-ratio to the best Adam, not the best point")
    ap.add_argument("--step-cost", action="store_true", help="time the candidates' steps against Adam's instead")
    ap.add_argument("--spectra", type=int, metavar="EPOCHS", help="the Gram spectra of today's steps instead")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="model seeds (default 0)")
    ap.add_argument("--from-json", nargs="+", help="print the ranking of earlier runs, run nothing")
    args = ap.parse_args(argv)
    tasks = tuple(args.task or (ALL_TASKS if args.candidate else TASK_NAMES))
    if args.spectra:
        for t in tasks:
            print(t, json.dumps({k: round(v, 4) for k, v in spectra(t, epochs=args.spectra).items()}), flush=True)
        return
    if args.step_cost:
        for t in tasks:
            got = step_cost(t, args.candidate or list(CANDIDATES))
            print(t, ", ".join(f"{n} {v:.2f}x" for n, v in got.items()), "Adam's step", flush=True)
        return
    if args.from_json:
        rows = [r for f in args.from_json for r in json.load(open(f))]
    else:
        points = [{"candidate": c} for c in args.candidate] if args.candidate else _points(args.judge)
        if args.point:
            points = [{"classes": int(c), "lr": float(lr), "damping": float(d), "judge": True}
                      for c, lr, d in (p.split(",") for p in args.point)]  # fmt: skip
        adam: bool | dict[str, float] = not args.no_adam
        if args.adam_from:
            seed0 = [r for f in args.adam_from for r in json.load(open(f))]
            adam = {t: r["hparams"]["lr"] for t, r in best_adam(seed0).items()}
        rows = run(tasks, points, adam=adam, seeds=args.seeds, adam_lrs=tuple(args.adam_lrs))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
    if any(r.get("seed", 0) == 0 for r in rows) and any(r["optimizer"] == "adam" for r in rows):
        print(ranking(rows, vs_adam=args.vs_adam))
    if any(r.get("seed", 0) != 0 for r in rows):
        print()
        print(seeds_table(rows))
        if any(r["optimizer"] == "adam" and r.get("seed", 0) != 0 for r in rows):
            print()
            print(ratio_table(rows))


if __name__ == "__main__":
    main()
