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
    M = wrapped.grads
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
