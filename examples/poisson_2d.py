r"""Sven against Adam on a 2-D Poisson PINN (the setup of Müller & Zeinhofer, ICML 2023).

.. math::

    -\Delta u = 2\pi^2 \sin(\pi x)\sin(\pi y) \text{ on } (0,1)^2, \qquad u = 0 \text{ on the boundary},

with the exact solution :math:`u = \sin(\pi x)\sin(\pi y)`; an MLP 2-32-1 with
tanh (129 parameters) in float64, 900 interior and 120 boundary collocation
points. The residuals are :math:`(\Delta u + f)/\sqrt{900}` and :math:`u/\sqrt{120}`
(:mod:`sven.pinn`); Sven takes full-batch Gauss--Newton steps
(:func:`sven.pinn.optimizer`: ``residuals=True, rank=None, rtol=1e-10,
adaptive_damping=True, lr=1.0``) with the Jacobian from the pointwise route;
Adam minimises the same squared residual norm, for each learning rate of a
small grid.

Prints the relative L2 error on a 100 x 100 grid against wall time for both,
the median time of one step, and saves ``poisson_2d.png`` (the error field of
each method and the error against time) in ``--out``::

    python examples/poisson_2d.py                     # 60 s per run: Sven, then Adam at 1e-3, 3e-3, 1e-2
    python examples/poisson_2d.py --seconds 10 --adam-lr 3e-3
    python examples/poisson_2d.py --out figures --threads 2
    python examples/poisson_2d.py --timing            # one step of each: Sven, Adam, Sven on the autograd closure

Wall time counts the optimisation steps only; the error is evaluated every
``--every`` steps outside the clock. One thread by default: the problem is
small, and more threads mostly add synchronisation.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sven import pinn
from truncpinv._optional import require

PI = math.pi


def source(x: torch.Tensor) -> torch.Tensor:
    """:math:`f(x, y) = 2\\pi^2 \\sin(\\pi x)\\sin(\\pi y)` at one point."""
    return 2 * PI**2 * torch.sin(PI * x[..., 0]) * torch.sin(PI * x[..., 1])


def exact(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(PI * x[..., 0]) * torch.sin(PI * x[..., 1])


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()


def make_problem(net: torch.nn.Module, seed: int) -> pinn.Residuals:
    """The residuals of the Poisson problem on ``net``: 900 interior and 120 boundary points."""
    box = pinn.Box([0, 0], [1, 1])
    pde = pinn.Term(lambda u, x: pinn.laplacian(u, x) + source(x), box.interior(900, seed=seed), name="pde")
    return pinn.Residuals(net, [pde, pinn.dirichlet(box.boundary(120, seed=seed + 1))])


@dataclass
class Run:
    """One optimiser's trajectory: ``(seconds, steps, relative L2 error)`` and the step times."""

    label: str
    history: list[tuple[float, int, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    net: torch.nn.Module | None = None

    def time_to(self, error: float) -> str:
        """The wall time at which the recorded error first reached ``error`` (``"-"``: never)."""
        return next((f"{t:.2f} s" for t, _, e in self.history if e <= error), "-")

    def error_at(self, seconds: float) -> float:
        """The last error recorded at or before ``seconds`` of wall time."""
        before = [e for t, _, e in self.history if t <= seconds]
        return before[-1] if before else self.history[0][2]


def relative_l2(net: torch.nn.Module, grid: torch.Tensor, u_exact: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(grid)[:, 0] - u_exact).norm() / u_exact.norm())


def train(
    label: str,
    net: torch.nn.Module,
    step: Callable[[], None],
    *,
    seconds: float,
    every: int,
    grid: torch.Tensor,
    u_exact: torch.Tensor,
    target: float = 0.0,
) -> Run:
    """Call ``step`` until ``seconds`` of wall time (or the error reaches ``target``)."""
    run = Run(label, net=net)
    run.history.append((0.0, 0, relative_l2(net, grid, u_exact)))
    clock, steps = 0.0, 0
    while clock < seconds:
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        clock, steps = clock + dt, steps + 1
        run.step_times.append(dt)
        if steps % every == 0:
            err = relative_l2(net, grid, u_exact)
            run.history.append((clock, steps, err))
            if not math.isfinite(err) or err <= target:
                break
    if run.history[-1][1] != steps:
        run.history.append((clock, steps, relative_l2(net, grid, u_exact)))
    return run


def run_sven(args: argparse.Namespace, grid: torch.Tensor, u_exact: torch.Tensor) -> Run:
    net = make_net(args.seed)
    problem = make_problem(net, args.seed)
    opt = pinn.optimizer(net.parameters())
    return train(
        "Sven", net, lambda: opt.step(problem), seconds=args.seconds, every=args.every, grid=grid, u_exact=u_exact,
        target=args.target,
    )  # fmt: skip


def run_adam(args: argparse.Namespace, lr: float, grid: torch.Tensor, u_exact: torch.Tensor) -> Run:
    net = make_net(args.seed)
    problem = make_problem(net, args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        problem().pow(2).sum().backward()
        opt.step()

    return train(f"Adam lr={lr:g}", net, step, seconds=args.seconds, every=args.every * 4, grid=grid, u_exact=u_exact)


def batched_closure(net: torch.nn.Module, problem: pinn.Residuals) -> Callable[[], torch.Tensor]:
    """The same residuals written the usual way: batched ``torch.autograd.grad`` w.r.t. the inputs."""
    pde, bd = problem.terms

    def closure() -> torch.Tensor:
        # enable_grad: Sven re-evaluates the closure under no_grad, where autograd w.r.t. x would fail
        with torch.enable_grad():
            x = pde.points.clone().requires_grad_(True)
            g = torch.autograd.grad(net(x).sum(), x, create_graph=True)[0]
            lap = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2))
        return torch.cat([pde.weight * (lap + source(x)), bd.weight * net(bd.points)[:, 0]])  # type: ignore[operator]

    return closure


def timing(args: argparse.Namespace) -> None:
    """Interleaved rounds: a Sven step (pointwise route), an Adam step, and every few rounds a Sven step on
    the batched-autograd closure (its Jacobian row by row); medians of each."""
    net = make_net(args.seed)
    problem = make_problem(net, args.seed)
    sven_opt = pinn.optimizer(net.parameters())
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    slow = pinn.optimizer(net.parameters(), jacobian="autograd")
    closure = batched_closure(net, problem)
    torch.testing.assert_close(closure().detach(), problem().detach(), rtol=0, atol=1e-12)

    def adam_step() -> None:
        adam.zero_grad(set_to_none=True)
        problem().pow(2).sum().backward()
        adam.step()

    def jacobian() -> None:
        sven_opt.route(problem, list(net.parameters()), sven_opt.rows)

    cases: dict[str, Callable[[], object]] = {
        "Sven step (pointwise route)": lambda: sven_opt.step(problem),
        "  its Jacobian alone": jacobian,
        "Adam step": adam_step,
        "Sven step (batched autograd)": lambda: slow.step(closure),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, fn in cases.items():
            if "autograd" in name and r % max(1, args.rounds // 3):
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["Adam step"])
    print(f"threads={args.threads}, {args.rounds} interleaved rounds (medians)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<30}{1e3 * med:10.2f} ms  {med / base:8.1f} x Adam step  ({len(ts)} samples)")


def plot(runs: list[Run], grid: torch.Tensor, u_exact: torch.Tensor, k: int, path: Path) -> None:
    plt = require("matplotlib.pyplot", "bench", "examples/poisson_2d.py's figure")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, run in zip(axes[:2], runs[:2]):
        assert run.net is not None
        with torch.no_grad():
            err = (run.net(grid)[:, 0] - u_exact).abs().reshape(k, k)
        im = ax.imshow(err.T.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        ax.set_title(f"|u - u*|, {run.label} (rel. L2 {run.history[-1][2]:.1e})")
        fig.colorbar(im, ax=ax, format="%.1e")
    ax = axes[2]
    for run in runs:
        ts, _, es = zip(*run.history)
        ax.loglog([max(t, 1e-3) for t in ts], es, label=run.label)
    ax.set_xlabel("wall time [s]")
    ax.set_ylabel("relative L2 error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Run]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="wall-time budget of each run (default 60)")
    p.add_argument("--adam-lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="Adam learning rates")
    p.add_argument("--every", type=int, default=25, help="evaluate the error every this many Sven steps")
    p.add_argument("--target", type=float, default=0.0, help="stop Sven at this relative L2 error (default: never)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the collocation points")
    p.add_argument("--out", type=Path, default=Path("results"), help="directory of the figure (default results/)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure (no matplotlib needed)")
    p.add_argument("--timing", action="store_true", help="only time one step of each method (interleaved rounds)")
    p.add_argument("--rounds", type=int, default=30, help="rounds of --timing (default 30)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing:
        timing(args)
        return []
    if not args.no_plot:
        require("matplotlib", "bench", "examples/poisson_2d.py's figure")

    k = 100
    grid = pinn.Box([0, 0], [1, 1]).grid(k)
    u_exact = exact(grid)
    runs = [run_sven(args, grid, u_exact)]
    runs += [run_adam(args, lr, grid, u_exact) for lr in args.adam_lr]
    adam = min(runs[1:], key=lambda r: r.history[-1][2])
    sven_run = runs[0]
    t_sven = sven_run.history[-1][0]

    print(f"threads={args.threads}, budget {args.seconds:g} s per run; relative L2 error on a {k}x{k} grid")
    print(f"{'run':<16}{'steps':>8}{'median step':>14}{'final error':>14}{'error at Sven end':>20}")
    for run in runs:
        step_ms = 1e3 * statistics.median(run.step_times)
        print(
            f"{run.label:<16}{run.history[-1][1]:>8d}{step_ms:>11.2f} ms{run.history[-1][2]:>14.2e}"
            f"{run.error_at(t_sven):>20.2e}"
        )
    print("\nSven: error against wall time")
    shown = sven_run.history[:: max(1, len(sven_run.history) // 12)]
    for t, s, e in shown + ([] if shown[-1] is sven_run.history[-1] else sven_run.history[-1:]):
        print(f"  {t:7.2f} s  step {s:5d}  {e:.2e}   best Adam ({adam.label}) at that time: {adam.error_at(t):.2e}")
    levels = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    print("\nfirst time the error reached " + "".join(f"{level:>10.0e}" for level in levels))
    for run in runs:
        print(f"  {run.label:<27}" + "".join(f"{run.time_to(level):>10}" for level in levels))
    ratio = statistics.median(sven_run.step_times) / statistics.median(adam.step_times)
    print(f"\none Sven step = {ratio:.1f} Adam steps (medians, this run)")
    if not args.no_plot:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "poisson_2d.png"
        plot([sven_run, adam, *[r for r in runs[1:] if r is not adam]], grid, u_exact, k, path)
        print(f"figure: {path}")
    return runs


if __name__ == "__main__":
    main()
