"""RMSProp with ``param_fraction < 1`` in the seed API: averages by position in the subset or per entry?

The original code kept RMSProp's running average ``v`` (and the momentum
buffer) as one vector of the subset's size, indexed by *position* in the drawn
subset, so slot ``j`` mixes whichever entries are ``j``-th in successive
subsets. This package can also keep one slot per parameter *entry*
(``rmsprop_state="entry"``). This script trains the ``digits-ce`` recipe
(sklearn digits, MLP 64-32-32-32-10, batch 64, per-sample cross-entropy) with
the seed API at ``param_fraction=0.25`` under both rules, plus two references
(no RMSProp; RMSProp at ``param_fraction=1``), on the same seeds, one thread,
and prints a markdown table of the final validation accuracy and of what
explains it: the mean RMSProp scale ``1/(sqrt(v)+eps)`` over the slots a step
used, and the mean norm of the applied steps, both over the first epoch.

    python benchmarks/seed_rmsprop_fraction.py --seeds 5 --epochs 3 --lr 0.05 0.1
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from sven.bench.tasks.base import mlp
from sven.bench.tasks.digits import load_digits_split
from sven.nn import SvenWrapper
from sven.opt import Sven

#: name -> (param_fraction, Sven keyword arguments)
VARIANTS: dict[str, tuple[float, dict[str, Any]]] = {
    "RMSProp by position (original)": (0.25, {"use_rmsprop": True, "rmsprop_state": "position"}),
    "RMSProp per entry": (0.25, {"use_rmsprop": True, "rmsprop_state": "entry"}),
    "no RMSProp": (0.25, {}),
    "RMSProp, param_fraction=1": (1.0, {"use_rmsprop": True}),
}


def ce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(pred, y, reduction="none")


def run(seed: int, fraction: float, options: dict[str, Any], *, lr: float, epochs: int, k: int) -> dict[str, float]:
    """One training run; returns the final validation accuracy and the first-epoch diagnostics."""
    data = load_digits_split()
    torch.manual_seed(seed)  # as the authors' scans: one seed for the model and the masks after it
    model = mlp(width=32, depth=3, n_in=64, n_out=10, seed=seed)
    wrapped = SvenWrapper(model, ce, "cpu", param_fraction=fraction)
    opt = Sven(wrapped, lr=lr, k=k, rtol=1e-2, on_nonfinite="skip", **options)
    loader = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    scales: list[float] = []
    norms: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=loader)
        for i in range(0, n - 63, 64):
            idx = order[i : i + 64]
            before = wrapped.params.detach().clone()
            wrapped.loss_and_grad((data.x_train[idx], data.y_train[idx]))
            opt.step()
            if epoch == 0:
                v = opt.v
                if v is not None:
                    used = v if wrapped.param_mask is None or v.numel() != wrapped.n_params else v[wrapped.param_mask]
                    scales.append(float((1.0 / (used.sqrt() + opt.eps_rmsprop)).mean()))
                norms.append(float((wrapped.params.detach() - before).norm()))
    with torch.no_grad():
        pred = wrapped.evaluate(data.x_val)
    acc = float((pred.argmax(dim=1) == data.y_val).float().mean()) if torch.isfinite(pred).all() else float("nan")
    return {
        "acc": acc,
        "scale": statistics.fmean(scales) if scales else float("nan"),
        "step": statistics.fmean(norms),
        "skipped": float(opt.skipped_steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.05, 0.1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| lr | variant | val accuracy, mean (per seed) | mean RMSProp scale, epoch 1 | mean step norm, epoch 1 |")
    print("|---|---|---|---|---|")
    for lr in args.lr:
        for name, (fraction, options) in VARIANTS.items():
            rows = [run(s, fraction, options, lr=lr, epochs=args.epochs, k=args.k) for s in range(args.seeds)]
            accs = [r["acc"] for r in rows]
            per_seed = " / ".join(f"{a:.3f}" for a in accs)
            skipped = sum(r["skipped"] for r in rows)
            note = f", {skipped:.0f} steps skipped" if skipped else ""
            print(
                f"| {lr} | {name} | {statistics.fmean(accs):.3f} ({per_seed}){note} | "
                f"{statistics.fmean(r['scale'] for r in rows):.3g} | {statistics.fmean(r['step'] for r in rows):.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
