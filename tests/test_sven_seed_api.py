"""The seed-compatible API: ``SvenWrapper``, ``sven.opt.Sven``, ``pinv``, ``PolyakSGD``."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sven
import truncpinv
from sven.nn import SvenWrapper
from sven.opt import PolyakSGD, Sven, pinv
from sven.tasks import make_toy1d, mlp, per_sample_mse

GRAM = {"jacobian": "gram"}


def _dense(M: object) -> torch.Tensor:
    """The stored Jacobian as a tensor (the Gram route stores an operator: ``(M^T I)^T``)."""
    if isinstance(M, torch.Tensor):
        return M
    n = M.shape[0]  # type: ignore[attr-defined]
    return M.rmatmat(torch.eye(n, dtype=torch.float64)).T  # type: ignore[attr-defined,no-any-return]


def _data(b: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, generator=g) * 2 - 1
    return x, torch.exp(-10 * x**2) * torch.sin(2 * x) * 5


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- the README
def test_readme_quick_start_runs_unchanged() -> None:
    data = make_toy1d(512, 256)
    dataset = TensorDataset(data.x_train, data.y_train)
    train_loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    # ---- verbatim from the original README ----
    model = nn.Sequential(nn.Linear(1, 64), nn.GELU(), nn.Linear(64, 1))
    loss_fn = lambda pred, y: ((pred - y) ** 2).sum(dim=-1)  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wrapped = SvenWrapper(model, loss_fn, device)
    optimizer = Sven(wrapped, lr=0.1, k=64, rtol=1e-3)
    initial = float(wrapped.evaluate_and_loss(data.x_val, data.y_val).mean())
    for _ in range(5):
        for xb, yb in train_loader:
            xb, yb = xb.to(device), yb.to(device)
            losses, preds = wrapped.loss_and_grad((xb, yb))
            optimizer.step()
    # ---- end ----
    assert losses.shape == (32,) and preds.shape == (32, 1)
    assert float(wrapped.evaluate_and_loss(data.x_val, data.y_val).mean()) < 0.05 * initial


def test_sven_dispatches_on_a_wrapper() -> None:
    wrapped = SvenWrapper(mlp(width=4, depth=1), per_sample_mse, "cpu")
    opt = sven.Sven(wrapped, 0.1, 8, 1e-3)
    assert type(opt) is sven.WrappedSven
    assert isinstance(opt, sven.Sven) and isinstance(opt, torch.optim.Optimizer)
    assert sven.opt.Sven is sven.Sven
    assert (opt.lr, opt.k, opt.rtol) == (0.1, 8, 1e-3)
    # the seed form keeps the original's plain step: no adaptive damping unless asked for
    assert opt.adaptive_damping is False and type(opt.control).__name__ == "Plain"
    native = sven.Sven(mlp(width=4, depth=1).parameters(), lr=0.1)
    assert type(native) is sven.Sven


# --------------------------------------------------------------------------- same maths, both APIs
@pytest.mark.parametrize(
    ("kappa", "extra_seed", "extra_native"),
    [
        (2.0, {}, {"adaptive_damping": False}),  # the seed API's plain step; the native default damps
        (1.0, {}, {"adaptive_damping": False}),
        (2.0, {"use_rmsprop": True, "alpha_rmsprop": 0.9}, {"rmsprop": True, "rmsprop_alpha": 0.9}),
        (
            2.0,
            {"use_rmsprop": True, "rmsprop_post": True, "mu_rmsprop": 0.5},
            {"rmsprop": True, "rmsprop_post": True, "rmsprop_momentum": 0.5},
        ),
        (2.0, {"variable_k": True}, {"variable_k": True}),
    ],
    ids=["kappa2", "kappa1", "rmsprop_pre", "rmsprop_post", "variable_k"],
)
def test_seed_and_native_apis_follow_the_same_trajectory(
    kappa: float, extra_seed: dict[str, object], extra_native: dict[str, object]
) -> None:
    x, y = (t.double() for t in _data(96, seed=1))  # float64: RMSProp's 1/(sqrt(v) + 1e-8) amplifies rounding
    base = mlp(width=8, depth=2, seed=11).double()
    m_seed, m_native = copy.deepcopy(base), copy.deepcopy(base)
    wrapped = SvenWrapper(m_seed, per_sample_mse, "cpu", kappa=kappa)
    opt_seed = Sven(wrapped, lr=0.3, k=12, rtol=1e-3, **extra_seed)  # type: ignore[arg-type]
    opt_native = sven.Sven(
        m_native.parameters(),
        lr=0.3,
        rank=12,
        rtol=1e-3,
        kappa=kappa,
        # the same route as the wrapper: the Gram route, or (RMSProp on the Jacobian) the materialised M
        **({"solver": "gram"} if "use_rmsprop" in extra_seed and "rmsprop_post" not in extra_seed else GRAM),
        **extra_native,  # type: ignore[arg-type]
    )
    for i in range(8):
        xb, yb = x[i % 3 * 32 : (i % 3 + 1) * 32], y[i % 3 * 32 : (i % 3 + 1) * 32]
        wrapped.loss_and_grad((xb, yb))
        opt_seed.step((xb, yb))
        opt_native.step(lambda xb=xb, yb=yb: per_sample_mse(m_native(xb), yb))
    torch.testing.assert_close(_flat(m_seed), _flat(m_native), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(_flat(m_seed), _flat(base))


# --------------------------------------------------------------------------- the wrapper
def test_wrapper_with_batchnorm_updates_running_stats_once_and_gets_the_exact_jacobian() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 1))
    ref = copy.deepcopy(model)
    x = torch.randn(16, 2)
    y = torch.randn(16, 1)
    wrapped = SvenWrapper(model, per_sample_mse, "cpu")
    losses, _ = wrapped.loss_and_grad((x, y))
    bn = model[1]
    assert int(bn.num_batches_tracked) == 1
    out = per_sample_mse(ref(x), y)  # same forward (train mode): stats match after one update
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean)
    J_ref = sven.jacobian.autograd_jacobian(out, list(ref.parameters()))
    torch.testing.assert_close(_dense(wrapped.grads), J_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses, out.detach())
    opt = Sven(wrapped, lr=0.2, k=8, rtol=1e-3)
    before = _flat(model)
    opt.step()
    assert not torch.equal(_flat(model), before)
    model.eval()
    wrapped.loss_and_grad((x, y))
    assert int(bn.num_batches_tracked) == 1  # eval mode: no update


def test_wrapper_loss_with_extra_arguments() -> None:
    x, y = _data(16)
    w = torch.linspace(0.5, 2.0, 16)

    def weighted(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * ((pred - target) ** 2).sum(dim=-1)

    model = mlp(width=4, depth=1, seed=3)
    wrapped = SvenWrapper(model, weighted, "cpu")
    losses, _ = wrapped.loss_and_grad((x, y, w))
    with torch.no_grad():
        torch.testing.assert_close(losses, weighted(model(x), y, w))
        torch.testing.assert_close(wrapped.evaluate_and_loss(x, y, w), losses)
    Sven(wrapped, lr=0.1, k=4, rtol=1e-3, variable_k=True).step((x, y, w))


@pytest.mark.parametrize(("by_block", "whole"), [(False, False), (True, False), (True, True)])
def test_param_fraction_only_changes_the_selected_parameters(by_block: bool, whole: bool) -> None:
    x, y = _data(32)
    model = mlp(width=8, depth=3, seed=4)
    wrapped = SvenWrapper(
        model, per_sample_mse, "cpu", param_fraction=0.5, mask_by_block=by_block, seed=3, fill_last_block=not whole
    )
    opt = Sven(wrapped, lr=0.5, k=16, rtol=1e-3)
    P = wrapped.n_params
    masks = []
    for _ in range(4):
        before = _flat(model)
        wrapped.loss_and_grad((x, y))
        mask = wrapped.param_mask
        assert mask is not None and mask.shape == (P,)
        n_active = int(mask.sum())
        assert wrapped.grads.shape == (32, n_active)
        assert wrapped.actual_param_fraction == pytest.approx(n_active / P)
        assert n_active <= int(0.5 * P)
        opt.step()
        changed = _flat(model) != before
        assert not changed[~mask].any()  # nothing outside the selection moved
        assert changed[mask].float().mean() > 0.5
        masks.append(mask.clone())
        if by_block:  # whole tensors, except (the original's rule) one tensor's leading entries
            parts = [mask[start : start + n] for _, n, start in wrapped.param_names_counts_startIdx]
            partial = [m for m in parts if m.any() and not m.all()]
            assert len(partial) <= (0 if whole else 1)
            assert all(bool(m[: int(m.sum())].all()) for m in partial)  # a prefix
            if not whole:
                assert n_active == int(0.5 * P)
    assert len({tuple(m.tolist()) for m in masks}) > 1  # a fresh subset each step
    # the same seed draws the same subsets
    again = SvenWrapper(
        mlp(width=8, depth=3, seed=4),
        per_sample_mse,
        "cpu",
        param_fraction=0.5,
        mask_by_block=by_block,
        seed=3,
        fill_last_block=not whole,
    )
    again.loss_and_grad((x, y))
    assert again.param_mask is not None and torch.equal(again.param_mask, masks[0])


def test_microbatch_averages_losses_before_the_jacobian() -> None:
    x, y = _data(24)
    model = mlp(width=4, depth=1, seed=5)
    wrapped = SvenWrapper(model, per_sample_mse, "cpu", microbatch_size=4)
    losses, preds = wrapped.loss_and_grad((x, y))
    assert losses.shape == (6,) and _dense(wrapped.grads).shape == (6, wrapped.n_params) and preds.shape == (24, 1)
    out = per_sample_mse(model(x), y)
    J = sven.jacobian.autograd_jacobian(out, list(model.parameters()))
    torch.testing.assert_close(losses, out.detach().reshape(6, 4).mean(1))
    torch.testing.assert_close(_dense(wrapped.grads), J.reshape(6, 4, -1).mean(1), rtol=1e-5, atol=1e-7)
    Sven(wrapped, lr=0.1, k=6, rtol=1e-3).step()
    with pytest.raises(ValueError, match=r"batch size 22 is not divisible by `microbatch_size`=4.*drop_last=True"):
        wrapped.loss_and_grad((x[:22], y[:22]))


def test_wrapper_kappa_stores_residuals_and_their_jacobian() -> None:
    x, y = _data(8)
    model = mlp(width=4, depth=1, seed=6)
    wrapped = SvenWrapper(model, per_sample_mse, "cpu", kappa=1.0)
    losses, _ = wrapped.loss_and_grad((x, y))
    torch.testing.assert_close(wrapped.residuals, losses.sqrt())
    r = per_sample_mse(model(x), y).sqrt()
    J = sven.jacobian.autograd_jacobian(r, list(model.parameters()))
    torch.testing.assert_close(_dense(wrapped.grads), J, rtol=1e-4, atol=1e-6)


def test_wrapper_errors_name_the_fix() -> None:
    x, y = _data(8)
    with pytest.raises(ValueError, match=r"`loss_fn` returned a scalar.*shape \(B,\) = \(8,\).*reduction='none'"):
        SvenWrapper(mlp(width=2, depth=1), nn.MSELoss(), "cpu").loss_and_grad((x, y))
    with pytest.raises(ValueError, match=r"`loss_fn` returned shape \(8, 1\)"):
        SvenWrapper(mlp(width=2, depth=1), nn.MSELoss(reduction="none"), "cpu").loss_and_grad((x, y))
    for kwargs, match in (
        ({"kappa": -1.0}, r"`kappa` must be a positive float, got -1.0"),
        ({"param_fraction": 0.0}, r"`param_fraction` must be a float in \(0, 1\], got 0.0"),
        ({"microbatch_size": 0}, r"`microbatch_size` must be a positive integer, got 0"),
        ({"mask_by_block": "yes"}, r"`mask_by_block` must be True or False, got 'yes'"),
        ({"jacobian": "x"}, r"`jacobian` must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            SvenWrapper(mlp(width=2, depth=1), per_sample_mse, "cpu", **kwargs)  # type: ignore[arg-type]
    wrapped = SvenWrapper(mlp(width=2, depth=1), per_sample_mse, "cpu")
    opt = Sven(wrapped, lr=0.1, k=2, rtol=1e-3, variable_k=True)
    with pytest.raises(RuntimeError, match=r"call `model.loss_and_grad\(batch\)` before `step\(\)`"):
        opt.step((x, y))
    wrapped.loss_and_grad((x, y))
    with pytest.raises(ValueError, match=r"`batch` must be passed to step\(batch\) with variable_k"):
        opt.step()
    with pytest.raises(TypeError, match=r"`batch` must be a tuple \(x, \*args\)"):
        wrapped.loss_and_grad(x)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1}, r"`lr` must be a non-negative float, got -1"),
        ({"k": 0}, r"`k` must be a positive integer, got 0"),
        ({"rtol": -1}, r"`rtol` must be a non-negative float, got -1"),
        ({"svd_mode": "numpy"}, r"unknown `svd_mode` 'numpy'; valid names are \[.*'lobpcg'.*'randomized_v2'.*'torch'"),
        ({"power_iterations": -1}, r"`power_iterations` must be a non-negative integer, got -1"),
        ({"alpha_rmsprop": 1.5}, r"`alpha_rmsprop` must be a float in \[0, 1\), got 1.5"),
        ({"track_svd_info": 1}, r"`track_svd_info` must be True or False, got 1"),
    ],
)
def test_seed_optimizer_validates_its_arguments(kwargs: dict[str, object], match: str) -> None:
    wrapped = SvenWrapper(mlp(width=2, depth=1), per_sample_mse, "cpu")
    args = {"lr": 0.1, "k": 4, "rtol": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        Sven(wrapped, **args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- svd modes and pinv
@pytest.mark.parametrize(
    ("mode", "cls"),
    [
        ("torch", truncpinv.GramEigen),
        ("randomized", truncpinv.RandomizedSVD),
        ("randomized_v2", truncpinv.RandomizedSVD),
        ("scipy", truncpinv.Lanczos),
        ("lobpcg", truncpinv.LOBPCG),
        ("gram", truncpinv.GramEigen),
    ],
)
def test_svd_modes_map_to_truncpinv_solvers(mode: str, cls: type) -> None:
    wrapped = SvenWrapper(mlp(width=4, depth=1), per_sample_mse, "cpu")
    opt = Sven(wrapped, lr=0.1, k=4, rtol=1e-3, svd_mode=mode, power_iterations=2)
    assert type(opt.solver) is cls
    x, y = _data(16)
    wrapped.loss_and_grad((x, y))
    opt.step()
    solver = truncpinv.DenseSVD()
    assert Sven(wrapped, lr=0.1, k=4, rtol=1e-3, svd_mode=solver).solver is solver


@pytest.mark.parametrize("mode", ["torch", "randomized", "randomized_v2", "scipy", "lobpcg"])
def test_seed_pinv_signature_and_result(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(40, 12, generator=g, dtype=torch.float64))
    s = 0.7 ** torch.arange(12, dtype=torch.float64)
    M = (U * s) @ V.T
    VhT, S_inv, U_T = pinv(M, k=5, rtol=1e-3, mode=mode, power_iter=2)
    assert VhT.shape == (40, 5) and S_inv.shape == (5,) and U_T.shape == (5, 12)
    torch.testing.assert_close(1.0 / S_inv, s[:5], rtol=1e-8, atol=0)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x = VhT @ (S_inv * (U_T @ b))
    ref = V[:, :5] @ ((U[:, :5].T @ b) / s[:5])
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-9)
    # rtol and the absolute tol cut the spectrum too
    assert pinv(M, k=12, rtol=0.1, mode=mode)[1].numel() == 7  # 0.7^6 = 0.118 > 0.1 > 0.7^7
    assert pinv(M, k=12, tol=0.3, rtol=0.0, mode=mode)[1].numel() == 4  # 0.7^3 = 0.343 > 0.3 > 0.7^4


def test_pinv_validates() -> None:
    with pytest.raises(ValueError, match=r"`k` must be a positive integer, got 0"):
        pinv(torch.ones(2, 2), k=0)
    with pytest.raises(ValueError, match=r"unknown `svd_mode` 'x'"):
        pinv(torch.ones(2, 2), mode="x")


# --------------------------------------------------------------------------- diagnostics
def test_track_svd_info_records_singular_values_rank_and_variable_k() -> None:
    x, y = _data(32)
    model = mlp(width=8, depth=2, seed=7)
    wrapped = SvenWrapper(model, per_sample_mse, "cpu")
    opt = Sven(wrapped, lr=0.5, k=10, rtol=1e-3, track_svd_info=True, variable_k=True)
    for _ in range(3):
        wrapped.loss_and_grad((x, y))
        M = _dense(wrapped.grads).double()
        opt.step((x, y))
    info = opt.svd_info
    assert set(info) == {"svs", "num_nonzero_svs", "k_used", "variable_k_substep_losses"}
    assert len(info["svs"]) == len(info["num_nonzero_svs"]) == len(info["k_used"]) == 3
    svals = torch.linalg.svdvals(M).numpy()
    last = info["svs"][-1]
    assert isinstance(last, np.ndarray) and last.shape == (info["num_nonzero_svs"][-1],)
    assert info["num_nonzero_svs"][-1] == min(10, int((svals > 1e-3 * svals[0]).sum()))
    np.testing.assert_allclose(last, svals[: last.size], rtol=1e-4)
    for k_used, sub in zip(info["k_used"], info["variable_k_substep_losses"]):
        assert len(sub) == k_used + 1
    plain = Sven(SvenWrapper(mlp(width=2, depth=1), per_sample_mse, "cpu"), lr=0.1, k=2, rtol=1e-3, track_svd_info=True)
    plain.model.loss_and_grad((x, y))
    plain.step()
    assert plain.svd_info["k_used"] == [] and len(plain.svd_info["svs"]) == 1


def test_seed_optimizer_works_with_a_scheduler() -> None:
    x, y = _data(16)
    wrapped = SvenWrapper(mlp(width=4, depth=1), per_sample_mse, "cpu")
    opt = Sven(wrapped, lr=0.4, k=4, rtol=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for _ in range(2):
        wrapped.loss_and_grad((x, y))
        opt.step()
        sched.step()
    assert opt.lr == pytest.approx(0.1)


# --------------------------------------------------------------------------- PolyakSGD
def test_polyak_step_on_a_quadratic() -> None:
    """f = 0.5 |x|^2, f* = 0: eta = f / |grad|^2 = 0.5, so x <- x - 0.5 x = x / 2."""
    x = nn.Parameter(torch.tensor([2.0, -4.0], dtype=torch.float64))
    opt = PolyakSGD([x], f_star=0.0, max_lr=1.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (x**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(10.0)
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    # the step is capped at max_lr, and a loss below f_star gives no step
    capped = PolyakSGD([x], f_star=-1e6, max_lr=0.1)
    capped.step(closure)
    torch.testing.assert_close(x.detach(), torch.tensor([0.9, -1.8], dtype=torch.float64))
    none = PolyakSGD([x], f_star=100.0)
    none.step(closure)
    torch.testing.assert_close(x.detach(), torch.tensor([0.9, -1.8], dtype=torch.float64))


def test_polyak_validates() -> None:
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match=r"`max_lr` must be a positive float, got 0"):
        PolyakSGD(p, max_lr=0)
    with pytest.raises(ValueError, match=r"`eps` must be a non-negative float, got -1"):
        PolyakSGD(p, eps=-1)
    with pytest.raises(ValueError, match=r"needs a closure"):
        PolyakSGD(p).step()


def test_wrapping_a_model_with_frozen_parameters_says_they_will_be_trained() -> None:
    """The wrapper optimises every parameter (as the original did): a ``requires_grad=False`` parameter is trained
    from then on, which a user who froze it must be told, by name."""
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"optimises every parameter.*'0\.weight'.*sven\.Sven"):
        SvenWrapper(model, lambda p, y: ((p - y) ** 2).sum(-1), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none when nothing was frozen
        SvenWrapper(nn.Linear(2, 1), lambda p, y: ((p - y) ** 2).sum(-1), "cpu")
