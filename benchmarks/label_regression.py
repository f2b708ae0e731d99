"""Label regression on the MNIST subset: what limits the test loss at 10 epochs (issue #20).

    OMP_NUM_THREADS=1 python benchmarks/label_regression.py                  # the table of docs/results_notes.md
    OMP_NUM_THREADS=1 python benchmarks/label_regression.py --seeds 0 --runs 'sven:{"weight_decay": 1e-3}:10'

Trains ``mnist-subset-mse`` (sven-bench's data, model seeds, batches and per-sample loss
``||f(x) - onehot(y)||^2``; one thread) with each run of ``--runs`` and prints, per run and seed, the
validation loss after the task's 10 epochs (``nan`` for a shorter run), after the run's last epoch, and the
lowest over its epochs. A run is
``OPTIMIZER:OPTIONS:EPOCHS``: ``sven`` (:class:`sven.Sven` with the JSON ``OPTIONS``), ``adam`` or ``adamw``
(``torch.optim.Adam``/``AdamW`` with ``OPTIONS`` such as ``{"lr": 1e-3, "weight_decay": 1.0}``).

The default runs ask two questions. Is the 10-epoch loss limited by how fast the optimizers fit (then more
epochs would lower it) or by how well the fit generalises (then only a regulariser would)? And does Sven gain
more from a regulariser than the best-tuned Adam does?
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import sven
from sven.bench.tasks.mnist_subset_mse import MnistSubsetMSETask

#: The runs of docs/results_notes.md, "Label regression: a regularisation limit".
DEFAULT_RUNS = (
    'adam:{"lr": 1e-3}:40',
    "sven:{}:40",
    'sven:{"weight_decay": 1e-3}:40',
    'adamw:{"lr": 1e-3, "weight_decay": 1.0}:40',
)


def train(optimizer: str, options: dict[str, object], epochs: int, seed: int) -> list[float]:
    """The validation losses after each epoch of one run."""
    task = MnistSubsetMSETask()
    data = task.data()
    model = task.model(seed)
    if optimizer == "sven":
        opt: torch.optim.Optimizer = sven.Sven(model.parameters(), **options)  # type: ignore[arg-type]
    elif optimizer in ("adam", "adamw"):
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(
            model.parameters(),
            **options,  # type: ignore[arg-type]
        )
    else:
        raise ValueError(f"optimizer must be sven, adam or adamw, got {optimizer!r}")
    generator = torch.Generator().manual_seed(task.loader_seed)
    losses = []
    for _ in range(epochs):
        model.train()
        for x, y in task.batches(data, generator):
            if isinstance(opt, sven.Sven):
                opt.step(lambda: task.per_sample_loss(model(x), y))  # noqa: B023 (called at once)
            else:
                opt.zero_grad()
                task.per_sample_loss(model(x), y).mean().backward()
                opt.step()
        model.eval()
        losses.append(task.evaluate(model, data.x_val, data.y_val)["loss"])
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="OPTIMIZER:OPTIONS:EPOCHS")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| run | seed | after 10 epochs | last epoch | lowest |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        name, rest = run.split(":", 1)
        options, epochs = rest.rsplit(":", 1)
        at10, last = [], []
        for seed in args.seeds:
            losses = train(name, json.loads(options), int(epochs), seed)
            at10.append(losses[9] if len(losses) >= 10 else float("nan"))
            last.append(losses[-1])
            print(f"| {run} | {seed} | {at10[-1]:.4f} | {last[-1]:.4f} | {min(losses):.4f} |", flush=True)
        print(f"| {run} | median | {statistics.median(at10):.4f} | {statistics.median(last):.4f} | |", flush=True)


if __name__ == "__main__":
    main()
