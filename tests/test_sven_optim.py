"""The ``torch.optim`` form of Sven: groups, state, schedulers, hooks, diagnostics, validation."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import sven
import truncpinv
from sven.tasks import mlp, per_sample_mse


def _data(b: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, generator=g) * 2 - 1
    return x, torch.sin(3 * x)


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda: per_sample_mse(model(x), y)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- basics
def test_is_a_torch_optimizer_and_reduces_the_loss() -> None:
    model = mlp(width=8, depth=2, seed=1)
    x, y = _data()
    opt = sven.Sven(model.parameters(), lr=0.5, rank=16, rtol=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    first = opt.step(_closure(model, x, y))
    for _ in range(30):
        last = opt.step(_closure(model, x, y))
    assert first.shape == (32,)
    assert last.mean() < 0.1 * first.mean()


def test_diagnostics_are_recorded() -> None:
    model = mlp(width=8, depth=2, seed=2)
    x, y = _data(16)
    before = _flat(model)
    with torch.no_grad():
        losses = per_sample_mse(model(x), y)
    J = sven.jacobian.autograd_jacobian(per_sample_mse(model(x), y), list(model.parameters())).double()
    svals = torch.linalg.svdvals(J)
    opt = sven.Sven(model.parameters(), lr=0.3, rank=5, rtol=1e-2)
    opt.step(_closure(model, x, y))
    info = opt.last_step
    assert info is not None and not info.skipped
    assert info.jacobian_method in ("gram", "hooks")
    torch.testing.assert_close(info.losses, losses)
    # every singular value of the (residual = loss, kappa = 2) Jacobian, and the rank they allow
    assert info.singular_values is not None
    torch.testing.assert_close(info.singular_values.double(), svals, rtol=1e-4, atol=1e-5 * float(svals[0]))
    assert info.cutoff == pytest.approx(1e-2 * float(info.singular_values[0]))
    assert info.rank == min(5, int((svals > 1e-2 * svals[0]).sum()))
    step = _flat(model) - before
    assert math.isclose(info.step_norm, float(step.norm()), rel_tol=1e-4)


def test_param_groups_scale_their_block_by_their_lr() -> None:
    x, y = _data(24)
    base = mlp(width=6, depth=2, seed=3)
    single, grouped = copy.deepcopy(base), copy.deepcopy(base)
    sven.Sven(single.parameters(), lr=0.2, rank=8).step(_closure(single, x, y))
    layers = list(grouped.children())
    opt = sven.Sven(
        [
            {"params": layers[0].parameters(), "lr": 0.4},
            {"params": layers[2].parameters()},
            {"params": layers[4].parameters(), "lr": 0.0},
        ],
        lr=0.2,
        rank=8,
    )
    opt.step(_closure(grouped, x, y))
    b0, bs, gs = list(base.children()), list(single.children()), list(grouped.children())
    for i, factor in ((0, 2.0), (2, 1.0), (4, 0.0)):
        for p0, p1, p2 in zip(b0[i].parameters(), bs[i].parameters(), gs[i].parameters()):
            torch.testing.assert_close(p2 - p0, factor * (p1 - p0), atol=1e-6, rtol=1e-4)


def test_global_options_cannot_be_set_per_group() -> None:
    model = mlp(width=4, depth=1)
    with pytest.raises(ValueError, match=r"`rank` cannot be set per parameter group"):
        sven.Sven([{"params": model.parameters(), "rank": 3}], lr=0.1)
    opt = sven.Sven(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"`rtol` cannot be set per parameter group"):
        opt.add_param_group({"params": list(model.parameters())[2:], "rtol": 0.1})
    with pytest.raises(ValueError, match=r"`lr` must be a non-negative float, got -2"):
        opt.add_param_group({"params": list(model.parameters())[2:], "lr": -2})


def test_frozen_parameters_are_left_alone() -> None:
    model = mlp(width=6, depth=2, seed=4)
    first = next(iter(model.parameters()))
    first.requires_grad_(False)
    frozen = first.detach().clone()
    x, y = _data(16)
    opt = sven.Sven(model.parameters(), lr=0.2, rank=8)
    opt.step(_closure(model, x, y))
    torch.testing.assert_close(first.detach(), frozen)


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    x, y = _data(24)
    base = mlp(width=6, depth=2, seed=5)
    kwargs = {"lr": 0.2, "rank": 8, "rtol": 1e-3, "rmsprop": True, "rmsprop_post": True, "rmsprop_momentum": 0.5}
    a = copy.deepcopy(base)
    opt_a = sven.Sven(a.parameters(), **kwargs)  # type: ignore[arg-type]
    for _ in range(3):
        opt_a.step(_closure(a, x, y))
    sd = opt_a.state_dict()
    assert sd["sven"] == {"steps": 3, "skipped_steps": 0, "rejected_steps": 0, "damping": 0.0, "nu": 2.0}
    assert set(sd["state"][0]) == {"square_avg", "momentum_buffer"}

    b = copy.deepcopy(a)
    opt_b = sven.Sven(b.parameters(), **kwargs)  # type: ignore[arg-type]
    opt_b.load_state_dict(pickle.loads(pickle.dumps(sd)))
    assert opt_b.state_dict()["sven"] == sd["sven"]
    for _ in range(2):
        opt_a.step(_closure(a, x, y))
        opt_b.step(_closure(b, x, y))
    torch.testing.assert_close(_flat(a), _flat(b))

    # a fresh optimizer (no state) diverges from it: the state mattered
    c = copy.deepcopy(base)
    opt_c = sven.Sven(c.parameters(), **kwargs)  # type: ignore[arg-type]
    for _ in range(3):
        opt_c.step(_closure(c, x, y))
    c2 = copy.deepcopy(c)
    opt_c2 = sven.Sven(c2.parameters(), **kwargs)  # type: ignore[arg-type]
    opt_c2.step(_closure(c2, x, y))
    opt_c.step(_closure(c, x, y))
    assert not torch.allclose(_flat(c), _flat(c2))


def test_deepcopy_of_the_optimizer() -> None:
    model = mlp(width=4, depth=1)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=3, solver="gram")
    clone = copy.deepcopy(opt)
    assert clone.rank == 3 and isinstance(clone.solver, truncpinv.GramEigen)


def test_lr_scheduler_changes_the_step() -> None:
    x, y = _data(16)
    model = mlp(width=6, depth=2, seed=6)
    opt = sven.Sven(model.parameters(), lr=0.2, rank=8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    norms = []
    for _ in range(3):
        opt.step(_closure(model, x, y))
        assert opt.last_step is not None
        norms.append(opt.last_step.step_norm)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**3)
    # same Jacobian direction scale shrinks with the lr (the direction itself changes little)
    assert norms[2] < norms[0]


def test_step_hooks_and_zero_grad() -> None:
    x, y = _data(8)
    model = mlp(width=4, depth=1)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=4)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    per_sample_mse(model(x), y).mean().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step(_closure(model, x, y))
    assert calls == ["pre", "post"]
    assert all(p.grad is None for p in model.parameters())  # Sven does not write .grad


def test_residual_mode_flattens_multi_output_residuals() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    lin = nn.Linear(3, 2).double()
    opt = sven.Sven(
        lin.parameters(), lr=1.0, rtol=1e-12, residuals=True, solver=truncpinv.GramEigen(), adaptive_damping=False
    )
    opt.step(lambda: lin(x) - y)  # 12 residual rows, 8 parameters: the least-squares fit
    A = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(A, y).solution
    torch.testing.assert_close(lin.weight.detach(), coef[:3].T, atol=1e-8, rtol=0)
    torch.testing.assert_close(lin.bias.detach(), coef[3], atol=1e-8, rtol=0)


def test_variable_k_never_increases_the_batch_loss() -> None:
    x, y = _data(32, seed=8)
    model = mlp(width=8, depth=2, seed=8)
    opt = sven.Sven(model.parameters(), lr=0.5, rank=16, variable_k=True)
    used = []
    for _ in range(5):
        with torch.no_grad():
            before = float(per_sample_mse(model(x), y).mean())
        opt.step(_closure(model, x, y))
        info = opt.last_step
        assert info is not None and info.k_used is not None and info.substep_losses is not None
        used.append(info.k_used)
        with torch.no_grad():
            after = float(per_sample_mse(model(x), y).mean())
        assert after <= before + 1e-7
        assert len(info.substep_losses) == info.k_used + 1
        assert all(v <= info.substep_losses[0] for v in info.substep_losses)
        assert 0 <= info.k_used <= info.rank
    assert any(0 < k < 16 for k in used)  # the search did stop early, and did accept components


@pytest.mark.parametrize("post", [False, True])
def test_rmsprop_first_step_matches_the_formula(post: bool) -> None:
    """First step: v = (1 - alpha) g^2 (v starts at 0), computed here by hand."""
    g = torch.Generator().manual_seed(9)
    X = torch.randn(5, 8, generator=g, dtype=torch.float64)
    y = torch.randn(5, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    alpha, eps = 0.9, 1e-6
    opt = sven.Sven(
        [w], lr=0.5, rtol=1e-12, residuals=True, solver=truncpinv.GramEigen(), adaptive_damping=False,
        rmsprop=True, rmsprop_alpha=alpha, rmsprop_eps=eps, rmsprop_post=post,
    )  # fmt: skip
    opt.step(lambda: X @ w - y)
    R, M = -y, X
    if post:
        d = torch.linalg.pinv(M) @ R
        v = (1 - alpha) * d**2
        expected = -0.5 * d / (v.sqrt() + eps)
    else:
        gbar = M.mean(0)
        v = (1 - alpha) * gbar**2
        expected = -0.5 * torch.linalg.pinv(M / (v.sqrt() + eps)) @ R
    torch.testing.assert_close(w.detach(), expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(opt.state[w]["square_avg"], v)


# --------------------------------------------------------------------------- non-finite values
def test_nonfinite_losses_skip_the_step_and_leave_parameters_unchanged() -> None:
    model = mlp(width=4, depth=1)
    x, y = _data(8)
    before = _flat(model)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=4)
    y_bad = y.clone()
    y_bad[3] = float("nan")
    with pytest.warns(RuntimeWarning, match="Sven step skipped"):
        opt.step(_closure(model, x, y_bad))
    torch.testing.assert_close(_flat(model), before)
    assert opt.skipped_steps == 1 and opt.state_dict()["sven"]["skipped_steps"] == 1
    assert opt.last_step is not None and opt.last_step.skipped
    opt.step(_closure(model, x, y))  # a good step still works
    assert not torch.equal(_flat(model), before)


def test_nonfinite_raise_mode() -> None:
    model = mlp(width=4, depth=1)
    x, y = _data(8)
    opt = sven.Sven(model.parameters(), lr=0.1, on_nonfinite="raise")
    before = _flat(model)
    with pytest.raises(FloatingPointError, match="parameters were left unchanged"):
        opt.step(lambda: per_sample_mse(model(x), y) * float("inf"))
    torch.testing.assert_close(_flat(model), before)


@pytest.mark.parametrize(
    ("rank", "rows", "expected"),
    [(0.5, 16, 8), (np.float32(0.25), 16, 4), (0.1, 30, 3), (0.3, 16, 5), (1.0, 16, 16), (0.01, 16, 1)],
)
def test_a_fractional_rank_caps_at_the_ceiling_of_its_share_of_the_rows(rank: float, rows: int, expected: int) -> None:
    # rank=f keeps at most ceil(f * B) singular values, of those above the cut-off
    model = mlp(width=8, depth=2, seed=3)
    x, y = _data(rows)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=rank, rtol=1e-6)
    assert opt.rank == pytest.approx(float(rank))
    opt.step(_closure(model, x, y))
    info = opt.last_step
    assert info is not None and info.singular_values is not None
    above = int((info.singular_values > info.cutoff).sum())
    assert above >= 4  # the cap binds in most cases below
    assert info.rank == min(expected, above)


def test_a_fractional_rank_gives_the_same_step_as_the_count_it_resolves_to() -> None:
    x, y = _data(16)
    steps = []
    for rank in (0.5, np.int64(8)):
        model = mlp(width=8, depth=2, seed=4)
        before = _flat(model)
        sven.Sven(model.parameters(), lr=0.2, rank=rank, rtol=1e-6).step(_closure(model, x, y))
        steps.append(_flat(model) - before)
    torch.testing.assert_close(steps[0], steps[1])
    assert float(steps[0].norm()) > 0


def test_negative_losses_with_fractional_kappa_are_explained() -> None:
    w = nn.Parameter(torch.ones(2))
    opt = sven.Sven([w], lr=0.1, kappa=1.0)
    with pytest.raises(ValueError, match=r"kappa=1.0 needs non-negative losses"):
        opt.step(lambda: w - 3.0)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1}, r"`lr` must be a non-negative float, got -1"),
        ({"lr": float("nan")}, r"`lr` must be a non-negative float, got nan"),
        (
            {"rank": 0},
            r"`rank` must be a positive integer \(a number of singular values\), a float in \(0, 1\] "
            r"\(a fraction of the batch's rows\) or None \(no cap\), got 0",
        ),
        ({"rank": 2.5}, r"`rank` must be a positive integer .*, a float in \(0, 1\] .*, got 2.5"),
        ({"rank": 16.0}, r"`rank` must be a positive integer .*, got 16.0"),
        ({"rank": -0.5}, r"`rank` must be .*, got -0.5"),
        ({"rank": float("nan")}, r"`rank` must be .*, got nan"),
        ({"rank": True}, r"`rank` must be .*, got True"),
        ({"rtol": -1e-3}, r"`rtol` must be a non-negative float, got -0.001"),
        ({"atol": "x"}, r"`atol` must be a non-negative float, got 'x'"),
        ({"kappa": 0}, r"`kappa` must be a positive float, got 0"),
        ({"solver": "nope"}, r"unknown solver 'nope'; valid names are"),
        ({"solver": 3}, r"`solver` must be a truncpinv Solver object or one of"),
        ({"residuals": 1}, r"`residuals` must be True or False, got 1"),
        ({"residuals": True, "kappa": 1.0}, r"`kappa` has no effect with `residuals=True`"),
        ({"rmsprop_alpha": 1.0}, r"`rmsprop_alpha` must be a float in \[0, 1\), got 1.0"),
        ({"rmsprop_momentum": -0.1}, r"`rmsprop_momentum` must be a float in \[0, 1\)"),
        (
            {"jacobian": "fast"},
            r"`jacobian` must be one of \['auto', 'gram', 'hooks', 'autograd', 'matfree', 'pointwise', '2-point', "
            r"'3-point'\] or a callable returning the \(N, P\) Jacobian, got 'fast'",
        ),
        ({"on_nonfinite": "ignore"}, r"`on_nonfinite` must be one of \['skip', 'raise'\], got 'ignore'"),
        (
            {"variable_k": True, "rmsprop": True, "rmsprop_post": True},
            r"`variable_k=True` cannot be combined with `rmsprop_post=True`",
        ),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sven.Sven(mlp(width=2, depth=1).parameters(), **kwargs)  # type: ignore[arg-type]


def test_bad_closures_are_explained() -> None:
    model = mlp(width=4, depth=1)
    x, y = _data(8)
    opt = sven.Sven(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match=r"returned a scalar loss.*reduction='none'"):
        opt.step(lambda: per_sample_mse(model(x), y).mean())
    with pytest.raises(ValueError, match=r"returned shape \(8, 1\).*\.sum\(dim=-1\)"):
        opt.step(lambda: (model(x) - y) ** 2)
    with pytest.raises(ValueError, match=r"does not depend on the optimised parameters"):
        opt.step(lambda: per_sample_mse(model(x), y).detach())
    with pytest.raises(TypeError, match=r"must return a tensor"):
        opt.step(lambda: 1.0)  # type: ignore[arg-type, return-value]


def test_positional_options_need_the_seed_form() -> None:
    with pytest.raises(TypeError, match=r"takes its options as keywords, got 16.*needs a sven.nn.SvenWrapper"):
        sven.Sven(mlp(width=2, depth=1).parameters(), 0.1, 16)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"unknown option `k`; did you mean `rank`\? \(`k` is its name in the seed"):
        sven.Sven(mlp(width=2, depth=1).parameters(), 0.1, k=16)  # type: ignore[call-overload]


@pytest.mark.parametrize("rmsprop", [False, True])
def test_a_nonfinite_jacobian_with_finite_losses_is_skipped(rmsprop: bool) -> None:
    """d sqrt(u)/du at u = 0 is inf, times 0: a NaN Jacobian row under finite losses."""
    w = nn.Parameter(torch.tensor([0.5, -0.5]))
    c = torch.tensor([1.0, 2.0, 3.0])
    opt = sven.Sven([w], lr=0.1, rmsprop=rmsprop)

    def closure() -> torch.Tensor:
        return (w[0] - c) ** 2 + torch.sqrt(0 * w[1]) + w[1] ** 2

    with pytest.warns(RuntimeWarning, match="Sven step skipped"):
        opt.step(closure)
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, -0.5]))
    assert opt.skipped_steps == 1
    if rmsprop:
        assert not opt.state[w]  # the RMSProp state was not touched either


# --------------------------------------------------------------------------- the defaults
def test_the_native_defaults_are_the_grid_winner_with_adaptive_damping() -> None:
    from sven.config import DEFAULT_LR, DEFAULT_RTOL

    opt = sven.Sven(mlp(width=2, depth=1).parameters())
    assert (DEFAULT_LR, DEFAULT_RTOL) == (0.5, 1e-4)
    assert opt.param_groups[0]["lr"] == DEFAULT_LR and opt.rtol == DEFAULT_RTOL and opt.rank is None
    assert opt.adaptive_damping is True and isinstance(opt.control, sven.control.AdaptiveDamping)


@pytest.mark.parametrize(
    ("options", "policy"),
    [
        ({"variable_k": True}, "VariableK"),
        ({"check_step": True}, "CheckStep"),
        ({"damping": 1e-3}, "Tikhonov"),
        ({"rmsprop": True, "rmsprop_post": True}, "Plain"),
        ({"rmsprop": True}, "Plain"),
        ({"rmsprop": True, "adaptive_damping": True}, "AdaptiveDamping"),
        ({"adaptive_damping": False}, "Plain"),
        ({"damping": 1e-3, "adaptive_damping": True}, "AdaptiveDamping"),
    ],
)
def test_asking_for_another_step_control_turns_the_default_damping_off(options: dict, policy: str) -> None:
    opt = sven.Sven(mlp(width=2, depth=1).parameters(), **options)
    assert type(opt.control).__name__ == policy
    assert opt.adaptive_damping is (policy == "AdaptiveDamping")


def test_momentum_turns_the_default_damping_off_unless_both_are_asked_for() -> None:
    def policy(params, **kw):  # type: ignore[no-untyped-def]
        return type(sven.Sven(params, **kw).control).__name__

    net = mlp(width=2, depth=1)
    assert policy(net.parameters(), momentum=0.9) == "Plain"
    assert policy(net.parameters(), momentum=np.float32(0.5)) == "Plain"
    assert policy([{"params": net.parameters(), "momentum": 0.5}]) == "Plain"
    assert policy(net.parameters(), momentum=0.9, adaptive_damping=True) == "AdaptiveDamping"
    assert policy(net.parameters(), momentum=0.0) == "AdaptiveDamping"


def test_adaptive_damping_refuses_rmsprop_after_the_pseudoinverse() -> None:
    with pytest.raises(ValueError, match=r"`adaptive_damping=True` cannot be combined with `rmsprop_post=True`"):
        sven.Sven(mlp(width=2, depth=1).parameters(), adaptive_damping=True, rmsprop=True, rmsprop_post=True)


def test_the_default_configuration_fits_a_small_regression_without_tuning() -> None:
    # 40 steps of the defaults on a 1-D fit: the mean loss falls by four orders of magnitude
    model = mlp(width=16, depth=2, seed=0)
    x, y = _data(64)
    opt = sven.Sven(model.parameters())
    first = opt.step(_closure(model, x, y)).mean()
    for _ in range(40):
        last = opt.step(_closure(model, x, y)).mean()
    assert float(last) < 1e-4 * float(first)
