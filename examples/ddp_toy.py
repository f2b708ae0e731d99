"""Data-parallel Sven on the ``toy1d`` regression, one process per rank.

Launch with ``torchrun`` (gloo on CPU, NCCL when CUDA is available)::

    torchrun --nproc_per_node=2 examples/ddp_toy.py               # 2 epochs, global batch 128
    torchrun --nproc_per_node=2 examples/ddp_toy.py --epochs 1 --batch-size 256

Every rank builds the same data set and shuffles it with the same generator,
so all ranks see the same global batches; each rank then keeps its contiguous
share of every batch (``torch.tensor_split``: 64 + 64 rows of a batch of 128)
and its closure returns the per-sample losses of that share only. The
optimizer broadcasts rank 0's initial weights in its constructor and, on the
Gram route, all-gathers the per-layer factors so that every rank takes the
same step as one process on the whole batch would (``docs/distributed.md``).

Rank 0 prints, per epoch, the mean training loss of the global batches (the
step records the gathered losses, so this costs no communication), the
validation loss on all 10,000 validation points, and the measured
communication per step and rank: the bytes of every ``all_gather`` and
``all_reduce`` that Sven issued (what this rank receives: ``(W-1)/W`` of an
all-gather's output, and ``2 (W-1)/W`` of an all-reduced tensor, the volume
of a ring all-reduce), with the number of collectives.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import sven
from sven.tasks import LOADER_SEED, batches, make_toy1d, mlp, per_sample_mse


class CommMeter:
    """Counts what this rank receives in ``torch.distributed.all_gather`` / ``all_reduce`` calls.

    Attributes:
        gathered: bytes received by all-gathers (the other ranks' parts).
        reduced: bytes received by all-reduces (ring estimate, ``2 (W-1)/W`` of the tensor).
        calls: number of collectives.
    """

    def __init__(self) -> None:
        self.gathered = 0
        self.reduced = 0
        self.calls = 0

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Wrap the two collectives (which :mod:`sven.distributed` looks up on every call) while active."""
        gather, reduce = dist.all_gather, dist.all_reduce

        def all_gather(parts: list[torch.Tensor], t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.gathered += (len(parts) - 1) * t.numel() * t.element_size()
            self.calls += 1
            return gather(parts, t, *args, **kwargs)

        def all_reduce(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            w = dist.get_world_size(kwargs.get("group"))
            self.reduced += 2 * (w - 1) * t.numel() * t.element_size() // w
            self.calls += 1
            return reduce(t, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce  # type: ignore[assignment]
        try:
            yield
        finally:
            dist.all_gather, dist.all_reduce = gather, reduce  # type: ignore[assignment]


def shard_closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The closure of one step: the per-sample losses of this rank's rows, shape ``(B_r,)``, not reduced."""
    return lambda: per_sample_mse(model(x), y)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="passes over the 10,000 training points")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split over the ranks")
    p.add_argument("--lr", type=float, default=0.1, help="Sven learning rate")
    p.add_argument("--rank", type=int, default=32, help="Sven's k: singular values kept per step")
    p.add_argument("--rtol", type=float, default=1e-2, help="relative singular-value cut-off")
    p.add_argument("--seed", type=int, default=0, help="model seed (only rank 0's weights matter)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # one core per rank: tiny matrices gain nothing from threads
    try:
        train(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    """Train the toy1d MLP data-parallel and print rank 0's report."""
    data = make_toy1d()
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    # a different seed per rank on purpose: the constructor broadcasts rank 0's weights
    model = mlp(16, 3, seed=args.seed + 1000 * rank).to(device)
    opt = sven.Sven(model.parameters(), lr=args.lr, rank=args.rank, rtol=args.rtol)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(LOADER_SEED)  # the same global batches on every rank
    meter = CommMeter()
    log = print if rank == 0 else (lambda *a, **k: None)
    log(
        f"data-parallel Sven on toy1d: {world} ranks ({dist.get_backend()}, {device.type}), MLP with {n_params} "
        f"parameters, global batch {args.batch_size} ({args.batch_size // world} per rank), k={args.rank}, "
        f"lr={args.lr}, rtol={args.rtol}"
    )
    for epoch in range(1, args.epochs + 1):
        steps, train_sum, train_n = 0, 0.0, 0
        t0 = time.perf_counter()
        with meter.watch():
            for xb, yb in batches(x_train, y_train, args.batch_size, gen):
                xs, ys = torch.tensor_split(xb, world)[rank], torch.tensor_split(yb, world)[rank]
                opt.step(shard_closure(model, xs, ys))
                info = opt.last_step
                assert info is not None
                train_sum += float(info.losses.sum())  # the gathered losses of the whole global batch
                train_n += int(info.losses.numel())
                steps += 1
        wall = time.perf_counter() - t0
        with torch.no_grad():
            val = float(per_sample_mse(model(x_val), y_val).mean())
        log(
            f"epoch {epoch}: train loss {train_sum / train_n:.3e}  val loss {val:.3e}  "
            f"({steps} steps, {wall:.1f} s, route {info.jacobian_method})"
        )
        log(
            f"  communication per step and rank: {meter.gathered / steps / 1e3:.1f} kB all-gathered + "
            f"{meter.reduced / steps / 1e3:.1f} kB all-reduced in {meter.calls / steps:.1f} collectives"
        )
        meter.gathered = meter.reduced = meter.calls = 0
    # every rank holds the same weights: check it once at the end
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = bool(torch.equal(flat, ref))
    agree = torch.tensor([1 if same else 0], device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    log(f"weights identical on all ranks: {bool(agree.item())}")


if __name__ == "__main__":
    main()
