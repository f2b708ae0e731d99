"""Held-out check of the cross-entropy defaults on a classifier that no default was chosen on.

An 8-class MLP 40-128-128-8 on ``sklearn.datasets.make_classification`` (4,000 train / 1,000 test), batch 64,
10 epochs, one thread. Adam's lr is chosen on seed 0 from {1e-3, 3e-3, 1e-2}; Sven runs with its defaults, or
with ``--floor X`` the loss rule's settings at damping floor ``X``. Prints, per seed, the test losses at equal
epochs and at equal wall time (Sven's last epoch end within Adam's training time), all from the same run::

    OMP_NUM_THREADS=1 python benchmarks/ce_heldout.py [--floor 0.03]
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import make_classification

import sven

torch.set_num_threads(1)
X, y = make_classification(
    n_samples=5000,
    n_features=40,
    n_informative=20,
    n_redundant=10,
    n_classes=8,
    n_clusters_per_class=2,
    class_sep=1.0,
    random_state=0,
)
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y)
Xtr, ytr, Xte, yte = X[:4000], y[:4000], X[4000:], y[4000:]
EPOCHS, B = 10, 64
_parser = argparse.ArgumentParser(description="held-out check of Sven's cross-entropy defaults")
_parser.add_argument("--floor", type=float, default=None, help="run the loss rule with this damping floor")
FLOOR = _parser.parse_args().floor


def model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8))


def run(kind, lr, seed):
    m = model(seed)
    opt = (
        (
            sven.Sven(m.parameters())
            if FLOOR is None
            else sven.Sven(m.parameters(), ggn=True, adaptive_damping=True, damping=FLOOR)
        )
        if kind == "sven"
        else torch.optim.Adam(m.parameters(), lr=lr)
    )
    g = torch.Generator().manual_seed(0)
    curve, t = [], 0.0
    for _ in range(EPOCHS):
        perm = torch.randperm(4000, generator=g)
        t0 = time.perf_counter()
        for i in range(0, 4000, B):
            xb, yb = Xtr[perm[i : i + B]], ytr[perm[i : i + B]]
            if kind == "sven":
                opt.step(lambda xb=xb, yb=yb: F.cross_entropy(m(xb), yb, reduction="none"))
            else:
                opt.zero_grad()
                F.cross_entropy(m(xb), yb).backward()
                opt.step()
        t += time.perf_counter() - t0
        with torch.no_grad():
            z = m(Xte)
            curve.append((t, float(F.cross_entropy(z, yte)), float((z.argmax(1) == yte).float().mean())))
    return curve


best = min((run("adam", lr, 0)[-1][1], lr) for lr in (1e-3, 3e-3, 1e-2))[1]
print("best Adam lr (seed 0):", best)
for seed in (0, 1, 2):
    a, s = run("adam", best, seed), run("sven", None, seed)
    ta = a[-1][0]
    within = [c for c in s if c[0] <= ta]
    eqt = within[-1][1] if within else float("nan")
    print(
        f"seed {seed}: Adam {a[-1][1]:.4f} ({100 * a[-1][2]:.1f}%), Sven {s[-1][1]:.4f} ({100 * s[-1][2]:.1f}%), "
        f"equal epochs {s[-1][1] / a[-1][1]:.3f}x, Sven best epoch {min(c[1] for c in s):.4f}, "
        f"time Sven/Adam {s[-1][0] / ta:.2f}, equal time: epoch {len(within)} {eqt / a[-1][1]:.3f}x",
        flush=True,
    )
