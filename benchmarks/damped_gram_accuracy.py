"""How close the loss rule's damped directions are to the exact step, by the Cholesky path and by the eigenvectors.

    OMP_NUM_THREADS=1 python benchmarks/damped_gram_accuracy.py [--tasks mnist-subset digits-ce ...] [--steps 60]

Trains ``sven.Sven`` with its defaults (the loss rule) on each sven-bench task (data, model seed 0, batch 64,
one thread) and, at every step whose factorisation is a :class:`sven.damped_gram.DampedGram`, compares the
step's first try (damping ``0.1`` of :math:`\\sigma_1^2`, the floor) three ways, before the common product
with :math:`M^\\top`, in the norm :math:`\\|v\\|_K = \\sqrt{v^\\top K v}` (which is :math:`\\|M^\\top v\\|`, the
error of the direction):

* the reference: :math:`y^\\star = U_r (\\Lambda_r + \\lambda)^{-1} U_r^\\top R` from the float64 ``eigh`` of
  :math:`K` (the exact path's step in float64);
* the Cholesky path: ``y`` of :meth:`sven.damped_gram.DampedGram.damped_direction` (deflated, certified), against
  the step of every eigenpair where nothing is cut (:class:`sven.damped_gram.Untruncated`, the loss rule's
  default since 2026-12-05), of the kept ones otherwise;
* the exact path's float32 re-filtering, as :func:`sven.functional.filtered_direction` computes it:
  :math:`U (U^\\top b) / S^2` with :math:`b = U (S \\phi(S) U^\\top R)`, all in float32.

It reports the median and largest relative error of each, how many tries were certified, and how many steps
deflated dropped eigenvalues above round-off.
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import torch

import sven
import sven.damped_gram as DG
import sven.optim as sven_optim
import truncpinv
from sven import functional as SF
from sven.bench.tasks import get_task

BATCH = 64
DAMPING = 0.1


def _knorm(K: torch.Tensor, v: torch.Tensor) -> float:
    return math.sqrt(max(float(v @ (K @ v)), 0.0))


def _reference(Q: torch.Tensor, lam: torch.Tensor, R: torch.Tensor, r: int) -> torch.Tensor:
    """The float64 step of the ``r`` leading eigenpairs of ``K`` (descending ``lam``, ``Q``) at :data:`DAMPING`."""
    return Q[:, :r] @ ((Q[:, :r].T @ R.double()) / (lam[:r] + DAMPING * float(lam[0])))


def measure(name: str, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps on task ``name`` and compare each step's first try (module docstring)."""
    torch.set_num_threads(1)
    seen: dict[str, Any] = {}
    original = sven_optim.step_context

    def capture(F: Any, R: torch.Tensor, M: Any, blocks: Any, **kw: Any) -> Any:
        seen.update(F=F, R=R, M=M)
        return original(F, R, M, blocks, **kw)

    sven_optim.step_context = capture  # type: ignore[assignment]
    try:
        task = get_task(name)
        data = task.build_data()
        x, y = data.x_train, data.y_train
        net = task.model(0)
        opt = sven.Sven(net.parameters())
        gen = torch.Generator().manual_seed(0)
        new, old, certified, tries, deflated = [], [], 0, 0, 0
        for _ in range(steps):
            i = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
            seen.clear()
            opt.step(lambda i=i: task.per_sample_loss(net(x[i]), y[i]))
            F, R, M = seen.get("F"), seen.get("R"), seen.get("M")
            if not isinstance(F, DG.DampedGram):
                continue
            tries += 1
            deflated += F._W is not None
            K = F._K
            lam, Q = torch.linalg.eigh(K)
            lam, Q = lam.flip(0), Q.flip(1)
            exact = truncpinv.pinv_from_gram(K, M, rtol=F._rtol, atol=F._atol, check_finite=False)

            U, S = exact.U, exact.S
            b = U @ ((U.T @ R.to(U.dtype)) * SF.filter_factors(S, damping=DAMPING) * S)
            y32 = U @ ((U.T @ b) / (S * S))
            ref = _reference(Q, lam, R, exact.rank)  # the exact path against its own (truncated) step
            old.append(_knorm(K, y32.double() - ref) / _knorm(K, ref))
            whole = isinstance(F, DG.Untruncated)  # nothing cut: the reference keeps every eigenpair
            ref = _reference(Q, lam, R, K.shape[0]) if whole else ref
            fresh = DG.factorize_damped(M, truncpinv.Auto(), rank=None, rtol=F._rtol, atol=F._atol, untruncated=whole)
            if fresh is not None and fresh.damped_direction(R, DAMPING) is not None:
                certified += 1
                _, ych = fresh._solve(R, DAMPING)
                new.append(_knorm(K, torch.from_numpy(ych) - ref) / _knorm(K, ref))
    finally:
        sven_optim.step_context = original  # type: ignore[assignment]
    return {"task": name, "steps": tries, "certified": certified, "deflated": deflated, "new": new, "old": old}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["mnist-subset", "mnist1d", "digits-ce", "mnist-subset-cnn"])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    print(
        "| task | steps on the path | certified first tries | steps deflating | Cholesky error, median / max "
        "| exact path's float32 error, median / max |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        r = measure(name, args.steps)
        new, old = r["new"] or [math.nan], r["old"] or [math.nan]
        print(
            f"| {name} | {r['steps']} of {args.steps} | {r['certified']} | {r['deflated']} "
            f"| {statistics.median(new):.1e} / {max(new):.1e} | {statistics.median(old):.1e} / {max(old):.1e} |"
        )


if __name__ == "__main__":
    main()
