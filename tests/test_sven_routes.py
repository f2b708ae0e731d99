"""The Gram route, the matrix-free route and the materialised Jacobian give the same Sven step.

In float64 every route must produce the update of the materialised path
(``jacobian="autograd"`` with the exact dense SVD) to 1e-5 relative, for
every layer type the Gram route supports, for ``kappa`` 1 and 2, for
residual mode, and in the seed API for microbatching and ``mask_by_block``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sven
from sven.nn import SvenWrapper
from sven.opt import Sven as SeedSven


class SeqModel(nn.Module):
    """Embedding -> LayerNorm -> Conv1d -> Linear: every supported layer type in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 5, kernel_size=3, padding=1, stride=2)
        self.head = nn.Linear(5, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(idx))  # (B, T, 6)
        h = torch.tanh(self.conv(h.transpose(1, 2)))  # (B, 5, T')
        return self.head(h.mean(dim=2))


class ConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.lin = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.nn.functional.gelu(self.conv(x)).flatten(1))


def _case(kind: str, B: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        x = torch.randn(B, 3, generator=g, dtype=torch.float64)
    elif kind == "seq":
        torch.manual_seed(1)
        model = SeqModel()
        x = torch.randint(0, 11, (B, 7), generator=g)
    else:
        torch.manual_seed(2)
        model = ConvModel()
        x = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(B, 2, generator=g, dtype=torch.float64)
    return model.double(), x, y


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2, **kw: object) -> tuple[torch.Tensor, str]:
    residuals = bool(kw.get("residuals", False))
    opt = sven.Sven(model.parameters(), lr=0.4, rank=8, rtol=1e-6, **kw)  # type: ignore[arg-type]

    def closure() -> torch.Tensor:
        pred = model(x)
        return (pred - y) if residuals else ((pred - y) ** 2).sum(dim=-1)

    for _ in range(steps):
        opt.step(closure)
    assert opt.last_step is not None and not opt.last_step.skipped
    return _flat(model), opt.last_step.jacobian_method


def _close(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> None:
    """The updates ``a - base`` and ``b - base`` agree to 1e-5 relative."""
    da, db = a - base, b - base
    assert float(da.norm()) > 0
    assert float((da - db).norm()) <= 1e-5 * float(db.norm())


@pytest.mark.parametrize("kind", ["mlp", "seq", "conv"])
@pytest.mark.parametrize("kappa", [1.0, 2.0])
@pytest.mark.parametrize("route", ["gram", "matfree"])
def test_every_route_gives_the_materialised_update(kind: str, kappa: float, route: str) -> None:
    model, x, y = _case(kind)
    base = _flat(model)
    ref_model = copy.deepcopy(model)
    got, method = _run(model, x, y, jacobian=route, kappa=kappa)
    ref, _ = _run(ref_model, x, y, jacobian="autograd", kappa=kappa, solver="svd")
    assert method == route
    _close(got, ref, base)


@pytest.mark.parametrize("route", ["auto", "gram", "hooks", "autograd", "matfree"])
def test_a_sparse_embedding_gives_the_update_of_the_dense_one(route: str) -> None:
    """``nn.Embedding(sparse=True)`` hands autograd sparse gradients: every route takes the step of the same
    model with ``sparse=False`` (not an error from a sparse kernel)."""
    model, x, y = _case("seq")
    base = _flat(model)
    sparse = copy.deepcopy(model)
    sparse.emb.sparse = True
    got, _ = _run(sparse, x, y, jacobian=route)
    ref, _ = _run(model, x, y, jacobian=route)
    _close(got, ref, base)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_residual_mode_on_the_gram_route(kind: str) -> None:
    """Residual mode: D = 2 rows per sample, one backward pass per output column."""
    model, x, y = _case(kind)
    base = _flat(model)
    ref_model = copy.deepcopy(model)
    got, method = _run(model, x, y, jacobian="gram", residuals=True)
    # the Gram route has no column norms, so no Moré scaling; the reference takes the same damping
    ref, _ = _run(ref_model, x, y, jacobian="autograd", residuals=True, solver="svd", scale=False)
    assert method == "gram"
    _close(got, ref, base)


@pytest.mark.parametrize(
    "options",
    [
        {"microbatch_size": 3},
        {"kappa": 1.0, "microbatch_size": 2},
        {"param_fraction": 0.5, "mask_by_block": True, "fill_last_block": False},
    ],
    ids=["microbatch", "kappa1-microbatch", "mask_by_block"],
)
def test_seed_api_gram_route_matches_the_materialised_path(options: dict[str, object]) -> None:
    model, x, y = _case("mlp")
    loss = lambda p, t: ((p - t) ** 2).sum(dim=-1)  # noqa: E731
    wg = SvenWrapper(copy.deepcopy(model), loss, "cpu", seed=4, **options)  # type: ignore[arg-type]
    wd = SvenWrapper(copy.deepcopy(model), loss, "cpu", seed=4, jacobian="autograd", **options)  # type: ignore[arg-type]
    base = wg.params.detach().clone()
    og, od = SeedSven(wg, 0.4, 8, 1e-6), SeedSven(wd, 0.4, 8, 1e-6)
    for _ in range(2):
        wg.loss_and_grad((x, y))
        wd.loss_and_grad((x, y))
        assert wg.jacobian_method == "gram" and not isinstance(wg.grads_operator, torch.Tensor)
        og.step()
        od.step()
    _close(wg.params.detach(), wd.params.detach(), base)


@pytest.mark.parametrize("jacobian", ["auto", "func", "hooks", "autograd"])
def test_seed_api_sparse_embedding_gives_the_update_of_the_dense_one(jacobian: str) -> None:
    """The seed API on ``nn.Embedding(sparse=True)``: ``torch.func`` has no rule for its sparse gradient, so the
    wrapper's ``func`` Jacobian comes from the graph instead; every method takes the dense model's step."""
    model, x, y = _case("seq")
    sparse = copy.deepcopy(model)
    sparse.emb.sparse = True
    loss = lambda p, t: ((p - t) ** 2).sum(dim=-1)  # noqa: E731
    ws, wd = (SvenWrapper(m, loss, "cpu", jacobian=jacobian) for m in (sparse, model))
    base = wd.params.detach().clone()
    os_, od = SeedSven(ws, 0.4, 8, 1e-6), SeedSven(wd, 0.4, 8, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the Gram route's fallback notice under "auto"
        for w, o in ((ws, os_), (wd, od)):
            w.loss_and_grad((x, y))
            o.step()
    _close(ws.params.detach(), wd.params.detach(), base)


def test_unsupported_models_fall_back_once_with_a_warning_naming_the_layer() -> None:
    torch.manual_seed(5)
    # BatchNorm's exact coupling term (2 x 8 columns) is not smaller than the 16 rows: materialised instead
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=4)
    closure = lambda: ((model(x) - y) ** 2).sum(dim=-1)  # noqa: E731
    with pytest.warns(RuntimeWarning, match=r"Gram route does not apply .*BatchNorm1d"):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        opt.step(closure)
    assert opt.last_step is not None and opt.last_step.jacobian_method != "gram"
    strict = sven.Sven(model.parameters(), lr=0.1, rank=4, jacobian="gram")
    with pytest.raises(ValueError, match=r"`jacobian='gram'` does not apply to this model: .*BatchNorm1d"):
        strict.step(closure)


def test_gram_route_rejects_rmsprop_on_the_jacobian() -> None:
    model, x, y = _case("mlp")
    opt = sven.Sven(model.parameters(), jacobian="gram", rmsprop=True)
    with pytest.raises(ValueError, match="cannot be combined with RMSProp on the Jacobian"):
        opt.step(lambda: ((model(x) - y) ** 2).sum(dim=-1))


def test_matrix_free_route_rejects_rmsprop_on_the_jacobian_when_built() -> None:
    """The matrix-free route forms no columns to rescale: a ValueError naming the options when the optimizer is
    built (was a TypeError from inside the first step)."""
    model, _, _ = _case("mlp")
    with pytest.raises(ValueError, match=r"`rmsprop=True`.*`jacobian='matfree'`.*rmsprop_post=True"):
        sven.Sven(model.parameters(), jacobian="matfree", rmsprop=True)
    sven.Sven(model.parameters(), jacobian="matfree", rmsprop=True, rmsprop_post=True, adaptive_damping=False)


def test_auto_uses_the_gram_route_for_large_models_and_the_solver_when_one_is_chosen() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    x, y = torch.randn(64, 20), torch.randn(64, 1)
    closure = lambda: ((model(x) - y) ** 2).sum(dim=-1)  # noqa: E731
    opt = sven.Sven(model.parameters(), lr=0.1, rank=16)
    for _ in range(2):
        opt.step(closure)
        assert opt.last_step is not None and opt.last_step.jacobian_method == "gram"
    chosen = sven.Sven(model.parameters(), lr=0.1, rank=16, solver="randomized")
    chosen.step(closure)
    assert chosen.last_step is not None and chosen.last_step.jacobian_method == "hooks"
