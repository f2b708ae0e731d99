"""BatchNorm on the Gram route (:mod:`sven.linearize.gram_bn`): batch statistics, exact and frozen.

With batch statistics the exact ``J`` is the per-sample part (statistics held
constant) plus a low-rank coupling term; every case is compared with the
autograd Jacobian of the same closure in float64. ``batchnorm="frozen"`` is
compared with the Jacobian of the same model in eval mode with the batch
statistics as its running statistics, which is what it linearises.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import sven
from sven.jacobian import autograd_jacobian
from sven.linearize import GramJacobian, LayerGram, Unsupported, gram_bn

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, residuals: bool = False) -> Callable[[], torch.Tensor]:
    if residuals:
        return lambda: (model(x) - y) ** 2
    return lambda: ((model(x) - y) ** 2).sum(-1)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.GELU(), nn.Linear(5, 2)
    )
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 2))
    deep = nn.Sequential(  # a BatchNorm without affine parameters, behind a layer whose input has a graph
        nn.Conv2d(1, 2, 3),
        nn.Tanh(),
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, affine=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 2),
    )
    return {
        "mlp_two_bn": (mlp.double(), torch.randn(32, 3, dtype=F64), torch.randn(32, 2, dtype=F64)),
        "cnn": (cnn.double(), torch.randn(20, 1, 6, 6, dtype=F64), torch.randn(20, 2, dtype=F64)),
        "deep_no_affine": (deep.double(), torch.randn(20, 1, 6, 6, dtype=F64), torch.randn(20, 2, dtype=F64)),
    }


@pytest.mark.parametrize("residuals", [False, True])
@pytest.mark.parametrize("name", ["mlp_two_bn", "cnn", "deep_no_affine"])
def test_exact_term_matches_the_autograd_jacobian_and_updates_the_statistics_once(name: str, residuals: bool) -> None:
    model, x, y = _models()[name]
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    G = LayerGram()(_mse(model, x, y, residuals), params, rows=_flat)
    assert isinstance(G, GramJacobian), G.reason  # type: ignore[union-attr]
    assert G.low_rank is not None
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            assert int(bn.num_batches_tracked) == 1
    out = _flat(_mse(ref, x, y, residuals)())
    for bn, bn_ref in zip(model.modules(), ref.modules()):
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    J = autograd_jacobian(out, list(ref.parameters()))
    torch.testing.assert_close(G.output, out.detach())
    assert _rel(G.to_dense(), J) <= 1e-10
    assert _rel(G.gram, J @ J.T) <= 1e-10
    X = torch.randn(J.shape[1], 3, dtype=F64)
    assert _rel(G.matmat(X), J @ X) <= 1e-10


def test_frozen_mode_linearises_with_the_batch_statistics_held_constant() -> None:
    model, x, y = _models()["cnn"]
    params = list(model.parameters())
    G = LayerGram(batchnorm="frozen")(_mse(model, x, y), params, rows=_flat)
    assert isinstance(G, GramJacobian), G.reason  # type: ignore[union-attr]
    assert G.low_rank is None
    frozen = copy.deepcopy(model).eval()
    bn: Any = frozen[1]
    with torch.no_grad():
        z = frozen[0](x)
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    J = autograd_jacobian(_mse(frozen, x, y)(), list(frozen.parameters()))
    assert _rel(G.to_dense(), J) <= 1e-10
    exact = autograd_jacobian(_mse(model, x, y)(), params)
    assert _rel(G.to_dense(), exact) > 1e-3  # an approximation, not the exact Jacobian


def test_verification_catches_a_wrong_coupling_term(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _models()["cnn"]
    real = gram_bn.add_coupling

    def wrong(G: GramJacobian, C: torch.Tensor, W: torch.Tensor) -> GramJacobian:
        return real(G, 2 * C, W)

    monkeypatch.setattr("sven.linearize.gram.add_coupling", wrong)
    U = LayerGram()(_mse(model, x, y), list(model.parameters()), rows=_flat)
    assert isinstance(U, Unsupported) and "disagrees with autograd" in U.reason
    # the rows handed back keep the exact graph
    assert autograd_jacobian(U.output, list(model.parameters())).shape[0] == x.shape[0]


def test_fallback_rows_keep_the_exact_graph() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64)  # 12 coupling columns >= 8 rows
    ref = copy.deepcopy(model)
    U = LayerGram()(_mse(model, x, y), list(model.parameters()), rows=_flat)
    assert isinstance(U, Unsupported) and "rank 12" in U.reason
    J = autograd_jacobian(U.output, list(model.parameters()))
    J_ref = autograd_jacobian(_mse(ref, x, y)(), list(ref.parameters()))
    assert _rel(J, J_ref) <= 1e-12


def test_sync_batchnorm_is_unsupported() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.SyncBatchNorm(6), nn.Linear(6, 1)).double()
    x, y = torch.randn(32, 3, dtype=F64), torch.randn(32, 1, dtype=F64)
    U = LayerGram()(_mse(model, x, y), list(model.parameters()), rows=_flat)
    assert isinstance(U, Unsupported) and "SyncBatchNorm" in U.reason


def test_bad_batchnorm_option() -> None:
    with pytest.raises(ValueError, match=r"`batchnorm` must be one of \['exact', 'frozen'\], got 'approx'"):
        LayerGram(batchnorm="approx")


def test_sven_steps_on_the_gram_route_like_the_autograd_route() -> None:
    model, x, y = _models()["cnn"]
    twin = copy.deepcopy(model)
    # the plain step: one closure call per step, so the running statistics see each batch once
    a = sven.Sven(model.parameters(), lr=0.5, rank=8, jacobian="gram", adaptive_damping=False)
    b = sven.Sven(twin.parameters(), lr=0.5, rank=8, jacobian="autograd", adaptive_damping=False)
    for _ in range(3):
        a.step(_mse(model, x, y))
        b.step(_mse(twin, x, y))
    assert a.last_step is not None and a.last_step.jacobian_method == "gram"
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    for bn, bn2 in zip(model.modules(), twin.modules()):
        if isinstance(bn, nn.BatchNorm2d):
            assert int(bn.num_batches_tracked) == 3
            torch.testing.assert_close(bn.running_var, bn2.running_var)
