"""BatchNorm on the Gram route: step time against Adam, and the direction against the exact one.

The digits CNN of issue #12: ``Conv2d(1, 8, 3, padding=1) + BatchNorm2d(8) + ReLU + Linear``
on the 8x8 sklearn digits, batch 64, per-sample MSE against one-hot labels.
Run ``python benchmarks/bench_batchnorm.py`` (one thread; times are medians
over interleaved rounds, quoted as ratios to an Adam step of the same run).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sven
from sven.linearize import GramRoute, LayerGram
from sven.linearize.dense import autograd_jacobian


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits as ``(1797, 1, 8, 8)`` images (scaled, standardised) and one-hot targets."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X, dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return x.reshape(-1, 1, 8, 8), nn.functional.one_hot(torch.tensor(y), 10).float()


def cnn(seed: int = 0, batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    norm: nn.Module = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))


def make_sven(model: nn.Module, route: str) -> sven.Sven:
    """Sven with the settings of the digits task; ``route``: a ``jacobian`` name or ``"frozen"``."""
    if route == "frozen":
        return sven.Sven(
            model.parameters(), lr=0.5, rank=64, rtol=1e-4, route=GramRoute(batchnorm="frozen"), adaptive_damping=False
        )
    return sven.Sven(model.parameters(), lr=0.5, rank=64, rtol=1e-4, jacobian=route, adaptive_damping=False)


def _direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batchnorm: str | None, rank: int) -> torch.Tensor:
    """Sven's direction ``pinv_k(J) R`` (``R`` = losses, kappa=1) for one batch; ``None``: the autograd Jacobian."""
    import truncpinv

    model = copy.deepcopy(model)
    params = list(model.parameters())
    closure = lambda: ((model(x) - y) ** 2).sum(-1)  # noqa: E731
    if batchnorm is None:
        out = closure()
        J = autograd_jacobian(out, params).double()
        return truncpinv.lstsq(J, out.detach().double(), rank=rank, rtol=1e-4)
    G = LayerGram(batchnorm=batchnorm)(closure, params, rows=lambda t: t)
    assert not isinstance(G, sven.linearize.Unsupported), G
    F = truncpinv.pinv_from_gram(G.gram, G, rank=rank, rtol=1e-4)
    return (F @ G.output.to(G.dtype)).double()


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    c = float(a @ b / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=0, help="also train this many epochs and print the curves")
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, Y = digits()
    B = args.batch
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(X), generator=gen)[:B] for _ in range(8)]

    def sven_step(route: str, batchnorm: bool = True) -> Callable[[int], None]:
        model = cnn(batchnorm=batchnorm)
        opt = make_sven(model, route)

        def step(i: int) -> None:
            idx = batches[i % len(batches)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(lambda: ((model(X[idx]) - Y[idx]) ** 2).sum(-1))

        return step

    def adam_step() -> Callable[[int], None]:
        model = cnn()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(i: int) -> None:
            idx = batches[i % len(batches)]
            opt.zero_grad()
            ((model(X[idx]) - Y[idx]) ** 2).sum(-1).mean().backward()
            opt.step()

        return step

    fns = {
        "adam": adam_step(),
        "sven gram, exact BN term": sven_step("gram"),
        "sven gram, frozen stats": sven_step("frozen"),
        "sven autograd (old fallback)": sven_step("autograd"),
        "sven gram, CNN without BN": sven_step("gram", batchnorm=False),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        for i in range(3):
            f(i)
    for r in range(args.rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            f(r)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["adam"])
    print(
        f"digits CNN, {sum(p.numel() for p in cnn().parameters())} parameters, B={B}, 1 thread, "
        f"median of {args.rounds} interleaved rounds"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:30s} {1e3 * med:7.2f} ms  {med / base:5.1f} x Adam")
    model = cnn()
    angles: dict[str, list[float]] = {"exact": [], "frozen": []}
    for idx in batches:
        ref = _direction(model, X[idx], Y[idx], None, 64)
        for mode in angles:
            angles[mode].append(angle(_direction(model, X[idx], Y[idx], mode, 64), ref))
    for mode, a in angles.items():
        print(
            f"  angle to the exact direction, batchnorm={mode!r}: median {statistics.median(a):.3g} deg, "
            f"max {max(a):.3g} deg over {len(a)} batches"
        )
    if args.epochs:
        curves(X, Y, args.epochs, B)


def curves(X: torch.Tensor, Y: torch.Tensor, epochs: int, B: int) -> None:
    """Validation loss per epoch (stratified 80/20 split, random_state=0): the median of seeds 0-2 by final loss."""
    from sklearn.model_selection import train_test_split

    labels = Y.argmax(1).numpy()
    tr, va = train_test_split(list(range(len(X))), test_size=0.2, stratify=labels, random_state=0)
    tr_t, va_t = torch.tensor(tr), torch.tensor(va)
    print(f"validation MSE (accuracy) after each epoch, B={B}; the run of the median seed (0-2) by final loss")
    for route in ("gram", "frozen", "adam"):
        runs = []
        for seed in range(3):
            model = cnn(seed)
            opt: Any = torch.optim.Adam(model.parameters(), lr=1e-2) if route == "adam" else make_sven(model, route)
            gen = torch.Generator().manual_seed(seed)
            curve = []
            for _ in range(epochs):
                model.train()
                perm = tr_t[torch.randperm(len(tr_t), generator=gen)]
                for k in range(0, len(perm) - B + 1, B):
                    idx = perm[k : k + B]
                    closure = lambda idx=idx, model=model: ((model(X[idx]) - Y[idx]) ** 2).sum(-1)  # noqa: E731
                    if route == "adam":
                        opt.zero_grad()
                        closure().mean().backward()
                        opt.step()
                    else:
                        opt.step(closure)
                model.eval()
                with torch.no_grad():
                    pred = model(X[va_t])
                    loss = float(((pred - Y[va_t]) ** 2).sum(-1).mean())
                    acc = float((pred.argmax(1) == Y[va_t].argmax(1)).float().mean())
                curve.append((loss, acc))
            runs.append(curve)
        runs.sort(key=lambda c: c[-1][0])
        med = runs[len(runs) // 2]
        label = {"gram": "sven, exact BN term", "frozen": "sven, frozen stats", "adam": "adam lr=1e-2"}[route]
        print(f"  {label:20s} " + "  ".join(f"{loss:.4f} ({100 * acc:.1f}%)" for loss, acc in med))


if __name__ == "__main__":
    main()
