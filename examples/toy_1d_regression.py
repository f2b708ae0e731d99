"""Sven against Adam on the 1-D toy regression of the Sven paper (``toy1d``).

For each model seed, both optimizers start from the same initial weights and
see the same batches (10k training points, batch 32, shuffled by a generator
seeded 51159; the recipe is in ``sven.tasks``). Sven (``--api torch``, the
default) runs with its defaults, ``sven.Sven(model.parameters())``: no option
is tuned for this task. ``--api seed`` runs the original API with the
paper-era settings ``k=16, lr=0.1, rtol=1e-3, kappa=2``. Adam uses ``lr=1e-3``.

Prints a table of the final training and validation losses, the training
wall time and the time to reach a validation loss of 1e-4 (first the run of the
median seed by final validation loss, labelled "med. sN", then each seed), and
saves a figure with the validation loss against epochs and against wall time, and the learned functions::

    python examples/toy_1d_regression.py            # 3 seeds x 20 epochs, well under 2 minutes
    python examples/toy_1d_regression.py --full     # the notebook's 100 epochs
    python examples/toy_1d_regression.py --out figures --api seed --seeds 0

Wall time counts the training steps only; the losses are evaluated on the
full sets at the end of every epoch, outside the clock. The model is tiny,
so one thread is used by default (``--threads N`` to change it; it calls
``torch.set_num_threads``): more threads only add synchronisation (and, on a
busy machine, OpenMP threads competing for cores can make every step 100x
slower). The same rule is ``sven-bench --threads auto``: one thread below
100,000 parameters (``sven.bench.cli.SMALL_MODEL_PARAMS``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import sven
from sven.nn import SvenWrapper
from sven.tasks import LOADER_SEED, Toy1D, batches, make_toy1d, mlp, per_sample_mse, target_fn
from truncpinv._optional import require_extra

TARGET = 1e-4


@dataclass
class History:
    """Per-epoch record of one run."""

    name: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # cumulative training time, seconds

    def time_to(self, target: float) -> float | None:
        """Training time at the end of the first epoch whose validation loss is below ``target``."""
        for v, t in zip(self.val, self.wall):
            if v < target:
                return t
        return None


def _mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(per_sample_mse(model(x), y).mean())


def train(name: str, model: torch.nn.Module, data: Toy1D, epochs: int, *, api: str, seed: int) -> History:
    """Train ``model`` in place with ``name`` ("Sven" or "Adam") and record the losses."""
    hist = History(name, seed)
    gen = torch.Generator().manual_seed(LOADER_SEED)
    if name == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            opt.zero_grad()
            per_sample_mse(model(xb), yb).mean().backward()
            opt.step()

    elif api == "seed":
        wrapped = SvenWrapper(model, per_sample_mse, "cpu", kappa=2.0)
        seed_opt = sven.opt.Sven(wrapped, lr=0.1, k=16, rtol=1e-3)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            wrapped.loss_and_grad((xb, yb))
            seed_opt.step()

    else:
        sven_opt = sven.Sven(model.parameters())  # the defaults (lr=0.5, rtol=1e-4, adaptive damping)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            sven_opt.step(lambda: per_sample_mse(model(xb), yb))

    from tqdm import tqdm

    elapsed = 0.0
    bar = tqdm(range(1, epochs + 1), desc=f"{name} seed {seed}", leave=True, unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        for xb, yb in batches(data.x_train, data.y_train, 32, gen):
            step(xb, yb)
        elapsed += time.perf_counter() - t0
        hist.epochs.append(epoch)
        hist.wall.append(elapsed)
        hist.train.append(_mean_loss(model, data.x_train, data.y_train))
        hist.val.append(_mean_loss(model, data.x_val, data.y_val))
        bar.set_postfix(val=f"{hist.val[-1]:.2e}", time=f"{elapsed:.1f}s")
    return hist


def _row(name: str, train: float, val: float, wall: float, tt: list[float | None]) -> str:
    reached = [t for t in tt if t is not None]
    if len(reached) == len(tt):
        tt_s = f"{statistics.median(reached):.1f} s"
    elif reached and len(tt) > 1:
        tt_s = f"{statistics.median(reached):.1f} s ({len(reached)}/{len(tt)})"
    else:
        tt_s = "not reached"
    return f"{name:<16}{train:>12.2e}{val:>12.2e}{wall:>9.1f} s{tt_s:>22}"


def table(histories: list[History]) -> str:
    """The summary table as text: the run of the median seed (by final validation loss), then every run.

    The median seed's row is one real run; taking each column's median separately would mix seeds.
    """
    head = f"{'optimizer':<16}{'train loss':>12}{'val loss':>12}{'wall time':>11}{f'time to val<{TARGET:g}':>22}"
    lines = [head, "-" * len(head)]
    names = list(dict.fromkeys(h.name for h in histories))
    seeds = sorted({h.seed for h in histories})
    for name in names:
        hs = sorted((h for h in histories if h.name == name), key=lambda h: h.val[-1])
        med = hs[(len(hs) - 1) // 2]
        label = f"{name} (med. s{med.seed})" if len(seeds) > 1 else name
        lines.append(_row(label, med.train[-1], med.val[-1], med.wall[-1], [med.time_to(TARGET)]))
    if len(seeds) > 1:
        lines.append("")
        for seed in seeds:
            for h in (h for h in histories if h.seed == seed):
                lines.append(_row(f"{h.name} seed {seed}", h.train[-1], h.val[-1], h.wall[-1], [h.time_to(TARGET)]))
    return "\n".join(lines)


def plot(histories: list[History], models: dict[str, torch.nn.Module], data: Toy1D, path: Path) -> None:
    """Validation (and training) loss against epochs and wall time, and the learned functions of the first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"Adam": "tab:blue", "Sven": "tab:red"}
    labelled: set[str] = set()
    for h in histories:
        c = colors.get(h.name)
        label = None if h.name in labelled else h.name
        labelled.add(h.name)
        val_label = None if label is None else f"{label} validation"
        train_label = None if label is None else f"{label} train"
        axes[0].semilogy(h.epochs, h.val, color=c, label=val_label)
        axes[0].semilogy(h.epochs, h.train, color=c, ls="--", alpha=0.5, label=train_label)
        axes[1].semilogy(h.wall, h.val, color=c, marker=".", label=label)
    for ax in axes[:2]:
        ax.axhline(TARGET, color="grey", lw=0.8, ls=":")
        ax.set_ylabel("mean per-sample MSE")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    n_seeds = len({h.seed for h in histories})
    axes[0].set_xlabel("epoch")
    axes[0].set_title(f"loss per epoch ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
    axes[1].set_xlabel("training wall time [s]")
    axes[1].set_title("validation loss against wall time")

    x = torch.linspace(-1, 1, 500).unsqueeze(1)
    truth = (target_fn(x) - data.mean) / data.std
    axes[2].plot(x[:, 0], truth[:, 0], "k-", lw=2, label="target")
    with torch.no_grad():
        for name, model in models.items():
            axes[2].plot(x[:, 0], model(x)[:, 0], "--", color=colors.get(name), lw=1.5, label=name)
    axes[2].set_xlabel("x")
    axes[2].set_ylabel("standardised f(x)")
    axes[2].set_title(f"learned functions, seed {histories[0].seed}, after {histories[0].epochs[-1]} epochs")
    axes[2].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[History]:
    require_extra("bench", "examples/toy_1d_regression.py")  # tqdm and matplotlib
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full 100-epoch run (default: 20 epochs)")
    ap.add_argument("--epochs", type=int, default=None, help="number of epochs (overrides --full)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (default: 0 1 2)")
    ap.add_argument("--out", type=Path, default=Path("results"), help="directory for the PNG (default: results/)")
    ap.add_argument("--api", choices=("torch", "seed"), default="torch", help="Sven's torch.optim API or the seed API")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    args = ap.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (100 if args.full else 20)
    if epochs < 1:
        ap.error(f"--epochs must be positive, got {epochs}")
    if args.threads < 1:
        ap.error(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)

    data = make_toy1d()
    print(
        f"toy1d: {data.x_train.shape[0]} train / {data.x_val.shape[0]} validation points, MLP 1-16-16-16-1 "
        f"({sum(p.numel() for p in mlp().parameters())} parameters), batch 32, {epochs} epochs, "
        f"seeds {args.seeds}, {torch.get_num_threads()} thread(s), Sven via the {args.api} API"
    )
    histories: list[History] = []
    first_models: dict[str, torch.nn.Module] = {}
    for seed in args.seeds:
        base = mlp(seed=seed)
        for name in ("Adam", "Sven"):
            model = copy.deepcopy(base)
            histories.append(train(name, model, data, epochs, api=args.api, seed=seed))
            first_models.setdefault(name, model)
    print()
    print(table(histories))
    path = args.out / "toy_1d_regression.png"
    plot(histories, first_models, data, path)
    print(f"\nfigure saved to {path}")
    return histories


if __name__ == "__main__":
    main()
