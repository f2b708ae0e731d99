"""The pointwise route (sven.linearize.pointwise): its Jacobian against the exact autograd Jacobian, row by row."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch

import sven
from sven import pinn
from sven.linearize import Linearization, Linearizer, PointwiseRoute, RowSpec, Unsupported, choose_route

DT = torch.float64
TOL = 1e-10


def _net(d_in: int, d_out: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, d_out)
    ).to(DT)


def _exact_jacobian(r: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Row by row: one torch.autograd.grad per residual (the reference, slow and exact)."""
    rows = []
    for k in range(r.numel()):
        gs = torch.autograd.grad(r.reshape(-1)[k], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([torch.zeros(p.numel(), dtype=DT) if g is None else g.reshape(-1) for p, g in zip(params, gs)])
        )
    return torch.stack(rows)


def _grad_x(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(y.sum(), x, create_graph=True)[0]


def _batched_laplacian(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(n, m) Laplacian of each output component, by batched double backward w.r.t. the inputs."""
    cols = []
    for c in range(out.shape[1]):
        g = _grad_x(out[:, c], x)
        cols.append(sum(_grad_x(g[:, i], x)[:, i] for i in range(x.shape[1])))
    return torch.stack(cols, dim=1)  # type: ignore[arg-type]


def _problems() -> dict[str, tuple[torch.nn.Module, pinn.Residuals, Callable[[torch.nn.Module], torch.Tensor]]]:
    """name -> (module, Residuals, the same residuals written with batched torch.autograd)."""
    gen = torch.Generator().manual_seed(1)
    x2 = torch.rand(7, 2, generator=gen, dtype=DT)
    x3 = torch.rand(5, 3, generator=gen, dtype=DT)
    xb = pinn.Box([0, 0], [1, 1]).boundary(6, seed=2)
    f = lambda x: torch.sin(x[..., 0]) * x[..., 1]  # noqa: E731
    b = torch.tensor([0.3, -1.2], dtype=DT)
    probs = {}

    net = _net(2, 1)
    terms = [pinn.Term(lambda u, x: pinn.laplacian(u, x) + f(x), x2, name="pde"), pinn.dirichlet(xb, 0.5)]

    def ref_poisson(m: torch.nn.Module) -> torch.Tensor:
        x = x2.clone().requires_grad_(True)
        lap = _batched_laplacian(m(x), x)
        return torch.cat([((lap[:, 0] + f(x)) / math.sqrt(7)), ((m(xb)[:, 0] - 0.5) / math.sqrt(6))])

    probs["laplacian+boundary"] = (net, pinn.Residuals(net, terms), ref_poisson)

    net = _net(2, 1, seed=1)
    grad_term = pinn.Term(lambda u, x: pinn.gradient(u, x)[0] @ b - f(x), x2, weight=0.7, name="advection")

    def ref_grad(m: torch.nn.Module) -> torch.Tensor:
        x = x2.clone().requires_grad_(True)
        return 0.7 * (_grad_x(m(x)[:, 0], x) @ b - f(x))

    probs["gradient"] = (net, pinn.Residuals(net, [grad_term]), ref_grad)

    net = _net(3, 2, seed=2)
    target = torch.randn(5, 2, generator=gen, dtype=DT)
    vec_terms = [
        pinn.Term(lambda u, x: pinn.laplacian(u, x) - u(x) ** 2, x3, name="vector pde"),
        pinn.Term(lambda u, x, y: u(x) - y, x3, data=target, weight=2.0, name="data"),
        pinn.Term(lambda u, x: pinn.derivative(u, x, 0, 2) + pinn.gradient(u, x)[:, 1], x3, name="mixed"),
    ]

    def ref_vec(m: torch.nn.Module) -> torch.Tensor:
        x = x3.clone().requires_grad_(True)
        out = m(x)
        lap = _batched_laplacian(out, x)
        mixed = torch.stack(
            [_grad_x(_grad_x(out[:, c], x)[:, 0], x)[:, 2] + _grad_x(out[:, c], x)[:, 1] for c in range(2)], dim=1
        )
        w = 1 / math.sqrt(5)
        return torch.cat(
            [(w * (lap - out**2)).reshape(-1), (2.0 * (out - target)).reshape(-1), (w * mixed).reshape(-1)]
        )

    probs["vector-valued"] = (net, pinn.Residuals(net, vec_terms), ref_vec)
    return probs


@pytest.mark.parametrize("name", ["laplacian+boundary", "gradient", "vector-valued"])
def test_pointwise_jacobian_matches_exact_autograd(name: str) -> None:
    net, problem, ref = _problems()[name]
    params = list(net.parameters())
    lin = PointwiseRoute()(problem, params, RowSpec(residuals=True))
    assert isinstance(lin, Linearization) and lin.method == "pointwise"
    r_ref = ref(net)
    J_ref = _exact_jacobian(r_ref, params)
    assert isinstance(lin.jacobian, torch.Tensor)
    assert lin.jacobian.shape == J_ref.shape == (r_ref.numel(), sum(p.numel() for p in params))
    assert float(J_ref.abs().max()) > 1e-2  # not trivially zero
    torch.testing.assert_close(lin.rows, r_ref.detach(), rtol=0, atol=TOL)
    torch.testing.assert_close(lin.jacobian, J_ref, rtol=0, atol=TOL)
    # calling the object gives the same residuals, with a graph to the parameters
    r_call = problem()
    assert r_call.requires_grad
    torch.testing.assert_close(r_call.detach(), r_ref.detach(), rtol=0, atol=TOL)


def test_a_subset_of_parameters_gives_their_columns() -> None:
    net, problem, _ = _problems()["laplacian+boundary"]
    params = list(net.parameters())
    full = PointwiseRoute()(problem, params, RowSpec(residuals=True))
    part = PointwiseRoute(chunk_size=3)(problem, [params[2], params[0]], RowSpec(residuals=True))
    assert isinstance(full, Linearization) and isinstance(part, Linearization)
    n0, n1 = params[0].numel(), params[1].numel()
    cols = torch.arange(n0 + n1, n0 + n1 + params[2].numel())
    expected = torch.cat([full.jacobian[:, cols], full.jacobian[:, :n0]], dim=1)  # type: ignore[index]
    torch.testing.assert_close(part.jacobian, expected, rtol=0, atol=1e-14)


def test_route_declines_other_closures_and_foreign_parameters() -> None:
    net, problem, _ = _problems()["gradient"]
    res = PointwiseRoute()(lambda: net(torch.zeros(3, 2, dtype=DT)), list(net.parameters()), RowSpec(residuals=True))
    assert isinstance(res, Unsupported) and "Residuals" in res.reason
    extra = torch.zeros(2, dtype=DT, requires_grad=True)
    res = PointwiseRoute()(problem, [*net.parameters(), extra], RowSpec(residuals=True))
    assert isinstance(res, Unsupported) and "not a parameter" in res.reason
    with pytest.raises(ValueError, match="residuals=True"):
        PointwiseRoute()(problem, list(net.parameters()), RowSpec(residuals=False))


def test_auto_picks_the_pointwise_route_and_falls_back_exactly() -> None:
    assert choose_route("auto", gram_allowed=True, rmsprop_on_jacobian=False, entries=None, gram_failed=False,
                        distributed=False, pointwise=True) == "pointwise"  # fmt: skip
    assert choose_route("auto", gram_allowed=True, rmsprop_on_jacobian=False, entries=None, gram_failed=False,
                        distributed=False) == "gram"  # fmt: skip
    net, problem, _ = _problems()["gradient"]
    extra = torch.ones((), dtype=DT, requires_grad=True)
    params = [*net.parameters(), extra]
    # a foreign parameter: the exact (batched autograd) Jacobian of the same closure
    scaled = pinn.Residuals(net, problem.terms)
    lin = Linearizer()(scaled, params, RowSpec(residuals=True))
    assert lin.method == "autograd" and lin.jacobian.shape[1] == sum(p.numel() for p in params)
    with pytest.raises(ValueError, match="jacobian='pointwise'"):
        Linearizer("pointwise")(lambda: net(torch.zeros(3, 2, dtype=DT))[:, 0], list(net.parameters()),
                                RowSpec(residuals=True))  # fmt: skip


def test_sven_step_uses_the_route_and_decreases_the_loss() -> None:
    net, problem, _ = _problems()["laplacian+boundary"]
    opt = pinn.optimizer(net.parameters())
    first = float(problem().detach().pow(2).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            rows = opt.step(problem)
    assert opt.last_step is not None and opt.last_step.jacobian_method == "pointwise"
    assert rows.shape == (13,)
    last = float(problem().detach().pow(2).sum())
    assert last < 1e-2 * first
    with pytest.raises(ValueError, match="residuals=True"):
        sven.Sven(net.parameters(), lr=1.0, rank=None).step(problem)
