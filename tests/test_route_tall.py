"""More rows than parameters: ``jacobian="auto"`` materialises ``M`` instead of forming the ``N x N`` Gram matrix.

The Gram route's ``K = M M^T`` is ``N x N``; with ``N > P`` (a full-batch fit
of many points with a small model) its factorisation costs ``O(N^3)`` where
the materialised ``M`` costs ``O(N P^2)`` (issue #25: 71-98 s a step at
``N = 4000``, ``P = 61``). These tests check the rule, that the Gram route
declines before any Gram work, and that the step is the exact one.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sven
from sven.linearize import TALL_RATIO, Declined, GramRoute, LayerGram, RowSpec, Unsupported, choose_route
from sven.linearize import gram as gram_module

DT = torch.float64


def _fit(N: int, width: int = 6, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 1, generator=g, dtype=DT) * 2 - 1
    y = torch.sinc(5 * x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)).to(DT)
    return net, x, y


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("rows", "cols", "distributed", "expected"),
    [
        (None, 100, False, "gram"),  # first step: the Gram route decides after the forward
        (1000, 100, False, "dense"),
        (101, 100, False, "dense"),
        (100, 100, False, "gram"),  # at N = P the two cost the same: K is no larger than M
        (1000, 100, True, "gram"),  # data-parallel: every rank on the same route, K gathered
    ],
)
def test_auto_weighs_rows_against_parameters(rows: int | None, cols: int, distributed: bool, expected: str) -> None:
    entries = None if rows is None else rows * cols + (1 << 20)  # large: the tiny-problem rule stays out of it
    got = choose_route(
        "auto",
        gram_allowed=True,
        rmsprop_on_jacobian=False,
        entries=entries,
        gram_failed=False,
        distributed=distributed,
        rows=rows,
        cols=cols,
    )
    assert got == expected


def test_an_explicit_gram_request_is_kept_for_a_tall_problem() -> None:
    got = choose_route(
        "gram", gram_allowed=True, rmsprop_on_jacobian=False, entries=None, gram_failed=False,
        distributed=False, rows=10_000, cols=10,
    )  # fmt: skip
    assert got == "gram"


def test_the_gram_route_declines_a_tall_closure_before_any_gram_work(monkeypatch: pytest.MonkeyPatch) -> None:
    net, x, y = _fit(200)
    params = list(net.parameters())
    P = _n_params(net)
    assert 200 > TALL_RATIO * P

    def no_blocks(*args: object, **kw: object) -> None:
        raise AssertionError("the Gram route built layer blocks for a closure it should decline")

    monkeypatch.setattr(gram_module, "make_blocks", no_blocks)
    res = GramRoute(tall_ratio=TALL_RATIO)(lambda: net(x) - y, params, RowSpec(residuals=True))
    assert isinstance(res, Declined) and isinstance(res, Unsupported)
    assert res.output.shape == (200,) and res.output.requires_grad  # the graph is kept for the exact Jacobian
    assert "200 rows" in res.reason


def test_layer_gram_with_max_rows_at_the_row_count_still_forms_k() -> None:
    net, x, y = _fit(30)
    G = LayerGram()(lambda: net(x) - y, list(net.parameters()), rows=RowSpec(residuals=True), max_rows=30)
    assert not isinstance(G, Unsupported)
    J = G.to_dense()
    assert torch.allclose(G.gram, J.double() @ J.double().T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "1"])
def test_tall_ratio_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="`tall_ratio` must be a positive finite number"):
        GramRoute(tall_ratio=bad)  # type: ignore[arg-type]


def test_tall_ratio_accepts_numpy_scalars() -> None:
    assert GramRoute(tall_ratio=np.float32(2.0)).tall_ratio == 2.0
    assert GramRoute(tall_ratio=np.int64(3)).tall_ratio == 3.0


def _train(
    route: str, N: int, steps: int = 3, width: int = 6
) -> tuple[list[torch.Tensor], list[str], list[warnings.WarningMessage]]:
    net, x, y = _fit(N, width)
    opt = sven.Sven(net.parameters(), residuals=True, jacobian=route, adaptive_damping=False, lr=0.5, rtol=1e-8)
    methods = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(lambda: net(x) - y)
            methods.append(opt.last_step.jacobian_method)
    return [p.detach().clone() for p in net.parameters()], methods, list(caught)


def test_auto_on_a_tall_problem_takes_the_exact_materialised_step_without_a_warning() -> None:
    N = 300
    got, methods, caught = _train("auto", N)
    ref, _, _ = _train("autograd", N)
    assert methods[0] == "autograd"  # the first step: M from the graph of the declined evaluation
    assert all(m == "hooks" for m in methods[1:])  # then the materialised hook path, chosen before the closure
    assert not [w for w in caught if "Gram route" in str(w.message)]
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_auto_on_a_wide_problem_stays_on_the_gram_route() -> None:
    net, _, _ = _fit(2, width=400)
    N = _n_params(net) // 2
    assert N * _n_params(net) >= sven.linearize.GRAM_MIN_ENTRIES
    _, methods, _ = _train("auto", N, steps=2, width=400)
    assert methods == ["gram", "gram"]


def test_the_seed_api_materialises_a_tall_batch_without_a_warning() -> None:
    from sven.nn import SvenWrapper
    from sven.opt import Sven as SeedSven

    def run(jacobian: str) -> tuple[list[torch.Tensor], list[str], list[warnings.WarningMessage]]:
        net, x, y = _fit(150)

        def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return ((pred - target) ** 2).sum(dim=-1)

        wrapped = SvenWrapper(net, loss_fn, torch.device("cpu"), jacobian=jacobian)
        opt = SeedSven(wrapped, lr=0.5, k=8, rtol=1e-6)
        methods = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                wrapped.loss_and_grad((x, y))
                opt.step()
                methods.append(wrapped.jacobian_method)
        return [p.detach().clone() for p in net.parameters()], methods, list(caught)

    got, methods, caught = run("auto")
    ref, _, _ = run("autograd")
    assert "gram" not in methods and methods[1:] == ["hooks", "hooks"]
    assert not [w for w in caught if "Gram route" in str(w.message)]
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)


def test_mores_scaling_is_on_in_residual_mode_only_for_small_models() -> None:
    """Moré's scaling materialises M: on by default up to SCALE_MAX_PARAMS parameters, never beyond unless asked."""
    from sven.config import SCALE_MAX_PARAMS

    small = nn.Linear(4, 3)
    big = nn.Linear(SCALE_MAX_PARAMS, 2)
    assert sven.Sven(small.parameters(), residuals=True).config.scale is True
    assert sven.Sven(big.parameters(), residuals=True).config.scale is False
    assert sven.Sven([{"params": big.parameters()}], residuals=True).config.scale is False
    assert sven.Sven(big.parameters(), residuals=True, scale=True).config.scale is True
    assert sven.Sven(small.parameters()).config.scale is False  # per-sample losses: never by default
