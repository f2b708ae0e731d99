"""On the Gram route the chosen truncpinv solver factorises K = M M^T (the seed API's ``svd_mode`` too)."""

from __future__ import annotations

import pytest
import torch

import sven
import truncpinv as tp
from sven.nn import SvenWrapper
from sven.tasks import mlp, per_sample_mse


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)


@pytest.mark.parametrize(
    ("mode", "method"),
    [("torch", "eigh"), ("randomized", "RandomizedSVD"), ("scipy", "Lanczos"), ("lobpcg", "LOBPCG")],
)
def test_svd_mode_decides_how_k_is_factorised(mode: str, method: str) -> None:
    x, y = _data()
    wrapped = SvenWrapper(mlp(width=8, depth=2, seed=2).double(), per_sample_mse, "cpu", jacobian="gram")
    opt = sven.opt.Sven(wrapped, lr=0.1, k=8, rtol=1e-3, svd_mode=mode)
    wrapped.loss_and_grad((x.double(), y.double()))
    M = wrapped.grads_operator  # the Gram route's operator (`grads` would materialise it)
    F = sven.factorize.factorize(M, opt._solver_for_step(), rank=8, rtol=1e-3, atol=0.0)
    assert F.stats["method"] == method
    # every mode is accurate here (rank 8 of 32 rows): the same step as the exact decomposition
    exact = tp.pinv_from_gram(M.gram, M, rank=8, rtol=1e-3)
    R = wrapped.residuals.double()
    torch.testing.assert_close(F @ R, exact @ R, rtol=1e-6, atol=1e-9)


def test_the_native_gram_route_uses_the_given_solver() -> None:
    x, y = _data()
    x, y = x.double(), y.double()
    models = [mlp(width=8, depth=2, seed=3).double() for _ in range(2)]
    opts = [
        sven.Sven(models[0].parameters(), lr=0.1, rank=8, jacobian="gram", solver=tp.Lanczos()),
        sven.Sven(models[1].parameters(), lr=0.1, rank=8, jacobian="gram"),
    ]
    for model, opt in zip(models, opts):
        opt.step(lambda model=model: per_sample_mse(model(x), y))
    infos = [opt.last_step for opt in opts]
    assert all(i is not None and i.jacobian_method == "gram" for i in infos)
    assert infos[0].rank == infos[1].rank  # type: ignore[union-attr]
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_the_default_takes_certified_lanczos_for_a_large_k_and_a_small_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The crossover rule, with its thresholds lowered so that a small K exercises it."""
    from truncpinv import _gram

    monkeypatch.setattr(_gram, "PARTIAL_MIN_ROWS", 64)
    g = torch.Generator().manual_seed(5)
    A = torch.randn(80, 400, dtype=torch.float64, generator=g) * torch.logspace(0, -2, 400, dtype=torch.float64)
    K, b = A @ A.T, torch.randn(80, dtype=torch.float64, generator=g)
    F = tp.pinv_from_gram(K, tp.TensorOperator(A), rank=8, rtol=1e-6)
    assert F.stats["method"] == "Lanczos" and F.stats["gram_certified"]
    ref = tp.pinv(A, rank=8, rtol=1e-6, solver=tp.DenseSVD())
    torch.testing.assert_close(F @ b, ref @ b, rtol=1e-8, atol=1e-12)
    # above the rank fraction, or with an exact solver named: the full decomposition
    assert tp.pinv_from_gram(K, tp.TensorOperator(A), rank=40).stats["method"] == "eigh"
    assert tp.pinv_from_gram(K, tp.TensorOperator(A), rank=8, solver=tp.GramEigen()).stats["method"] == "eigh"


def test_an_uncertified_lanczos_falls_back_to_the_exact_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from truncpinv import _gram

    monkeypatch.setattr(_gram, "PARTIAL_MIN_ROWS", 64)
    real = _gram._by_solver

    def uncertified(K64, solver, want):  # type: ignore[no-untyped-def]
        lam, Q, method, extra = real(K64, solver, want)
        return lam * 1.5, Q, method, {**extra, "gram_certified": False}  # a wrong answer, flagged as such

    monkeypatch.setattr(_gram, "_by_solver", uncertified)
    g = torch.Generator().manual_seed(6)
    A = torch.randn(80, 300, dtype=torch.float64, generator=g)
    b = torch.randn(80, dtype=torch.float64, generator=g)
    F = tp.pinv_from_gram(A @ A.T, tp.TensorOperator(A), rank=8)
    assert F.stats["method"] == "eigh"
    ref = tp.pinv(A, rank=8, solver=tp.DenseSVD())
    torch.testing.assert_close(F @ b, ref @ b, rtol=1e-8, atol=1e-12)
