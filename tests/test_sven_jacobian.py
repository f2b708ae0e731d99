"""Per-sample Jacobians: the fast hook path agrees with autograd, and falls back when it must."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sven
from sven.jacobian import PerSampleJacobian, autograd_jacobian, func_jacobian
from sven.nn import SvenWrapper
from sven.tasks import mlp, per_sample_mse


def _reference(out_fn, params):  # type: ignore[no-untyped-def]
    """Row by row: one backward pass per output row (slow, obviously right)."""
    out = out_fn()
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, retain_graph=True)])
        for i in range(out.shape[0])
    ]
    return torch.stack(rows)


def test_hooks_autograd_and_func_agree_on_an_mlp() -> None:
    model = mlp(width=6, depth=2, seed=0).double()
    x = torch.randn(10, 1, dtype=torch.float64)
    y = torch.randn(10, 1, dtype=torch.float64)
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        return per_sample_mse(model(x), y)

    ref = _reference(closure, params)
    res = PerSampleJacobian("auto")(closure, params, rows=lambda t: t)
    assert res.method == "hooks"
    torch.testing.assert_close(res.jacobian, ref)
    torch.testing.assert_close(autograd_jacobian(closure(), params), ref)
    names = [n for n, _ in model.named_parameters()]
    _, J, _ = func_jacobian(model, names, lambda pred: per_sample_mse(pred, y), (x,))
    torch.testing.assert_close(J, ref)


def test_hooks_handle_sequence_inputs_and_shared_layers() -> None:
    """(B, T, d) inputs sum over T; a layer called twice adds both calls."""
    torch.manual_seed(1)
    lin = nn.Linear(3, 3).double()
    head = nn.Linear(3, 1).double()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    params = [*lin.parameters(), *head.parameters()]

    def closure() -> torch.Tensor:
        h = torch.tanh(lin(torch.tanh(lin(x))))  # shared weights, two calls
        return head(h).squeeze(-1).pow(2).sum(dim=1)

    res = PerSampleJacobian("auto")(closure, params, rows=lambda t: t)
    assert res.method == "hooks"
    torch.testing.assert_close(res.jacobian, _reference(closure, params))


def test_batch_coupling_is_detected_and_the_exact_jacobian_used() -> None:
    """BatchNorm in training mode (no affine parameters) mixes samples: the hook formula is wrong there."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6, affine=False), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(12, 2, dtype=torch.float64)
    y = torch.randn(12, 1, dtype=torch.float64)
    params = list(model.parameters())
    jac = PerSampleJacobian("auto")

    def closure() -> torch.Tensor:
        return per_sample_mse(model(x), y)

    ref = _reference(closure, params)
    res = jac(closure, params, rows=lambda t: t)
    assert res.method == "autograd"
    torch.testing.assert_close(res.jacobian, ref)
    assert jac(closure, params, rows=lambda t: t).method == "autograd"  # remembered
    model.eval()  # a different structure: verified again, and now per-sample
    assert jac(closure, params, rows=lambda t: t).method == "hooks"
    # "hooks" trusts the user and skips the check: demonstrably wrong in training mode
    model.train()
    wrong = PerSampleJacobian("hooks")(closure, params, rows=lambda t: t)
    assert wrong.method == "hooks" and not torch.allclose(wrong.jacobian, _reference(closure, params))


def test_a_loss_normalised_over_the_batch_is_detected() -> None:
    model = mlp(width=4, depth=1, seed=3).double()
    x = torch.randn(8, 1, dtype=torch.float64)
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        out = model(x).squeeze(-1)
        return (out - out.mean()) ** 2  # each loss depends on every sample

    res = PerSampleJacobian("auto")(closure, params, rows=lambda t: t)
    assert res.method == "autograd"
    torch.testing.assert_close(res.jacobian, _reference(closure, params))


def test_parameters_outside_linear_layers_fall_back() -> None:
    w = nn.Parameter(torch.randn(3, dtype=torch.float64))
    lin = nn.Linear(3, 1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    params = [w, *lin.parameters()]

    def closure() -> torch.Tensor:
        return lin(x * w).squeeze(-1) ** 2

    res = PerSampleJacobian("auto")(closure, params, rows=lambda t: t)
    assert res.method == "autograd"
    torch.testing.assert_close(res.jacobian, _reference(closure, params))


@pytest.mark.parametrize("layer", ["conv", "embedding", "weight_norm"])
def test_hooks_without_verification_still_cover_every_parameter(layer: str) -> None:
    """``"hooks"`` skips the coupling check, not the coverage test: a parameter that a layer other than
    ``nn.Linear`` uses (here a convolution or an embedding, samples independent), or that a Linear owns but its
    formula does not use (``weight_g``, ``weight_v`` of the hook-based ``weight_norm``), must not get a zero
    column."""
    torch.manual_seed(8)
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    if layer == "conv":
        first: nn.Module = nn.Conv1d(2, 3, 3)
    elif layer == "embedding":
        first = nn.Embedding(7, 3)
        x = torch.randint(0, 7, (6, 3))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (deprecated for torch.nn.utils.parametrizations)
            first = nn.utils.weight_norm(nn.Linear(5, 3).double())
        x = torch.randn(6, 3, 5, dtype=torch.float64)
    model = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(9, 1)).double()
    y = torch.randn(6, 1, dtype=torch.float64)
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        return per_sample_mse(model(x), y)

    res = PerSampleJacobian("hooks")(closure, params, rows=lambda t: t)
    assert res.method == "autograd"
    torch.testing.assert_close(res.jacobian, _reference(closure, params))
    # and through the optimizer: the same step as the autograd route, the first layer moved
    steps = []
    for jacobian in ("hooks", "autograd"):
        start = [p.detach().clone() for p in params]
        sven.Sven(params, jacobian=jacobian).step(closure)
        steps.append(torch.cat([(p - q).detach().reshape(-1) for p, q in zip(params, start)]))
        with torch.no_grad():
            for p, q in zip(params, start):
                p.copy_(q)
    assert float(steps[0][: params[0].numel()].norm()) > 0
    torch.testing.assert_close(steps[0], steps[1])


def test_optimizer_paths_give_the_same_step() -> None:
    x = torch.rand(16, 1, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x)
    results = []
    for method in ("auto", "autograd"):
        model = mlp(width=6, depth=2, seed=5).double()
        opt = sven.Sven(model.parameters(), lr=0.3, rank=8, jacobian=method)
        opt.step(lambda model=model: per_sample_mse(model(x), y))
        assert opt.last_step is not None
        assert opt.last_step.jacobian_method == ("gram" if method == "auto" else "autograd")
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "autograd", "func"])
def test_wrapper_methods_agree(method: str) -> None:
    x = torch.rand(16, 1) * 2 - 1
    y = torch.sin(3 * x)
    model = mlp(width=6, depth=2, seed=6)
    ref = autograd_jacobian(per_sample_mse(model(x), y), list(model.parameters()))
    wrapped = SvenWrapper(model, per_sample_mse, "cpu", jacobian=method)
    wrapped.loss_and_grad((x, y))
    assert wrapped.jacobian_method == {"auto": "gram", "autograd": "autograd", "func": "func"}[method]
    J = wrapped.grads if isinstance(wrapped.grads, torch.Tensor) else wrapped.grads.rmatmat(torch.eye(16)).T
    torch.testing.assert_close(J, ref, rtol=1e-5, atol=1e-6)


class _Couple(nn.Module):
    """Scales by the batch mean: couples the samples, and only the verification can tell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean(0)


def test_wrapper_switches_to_torch_func_after_detecting_coupling() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6, affine=False), nn.GELU(), _Couple(), nn.Linear(6, 1))
    x = torch.randn(16, 1)
    y = torch.randn(16, 1)
    wrapped = SvenWrapper(model, per_sample_mse, "cpu")
    wrapped.loss_and_grad((x, y))
    assert wrapped.jacobian_method == "autograd"  # detected, exact from the existing graph
    wrapped.loss_and_grad((x, y))
    assert wrapped.jacobian_method == "func"  # and torch.func from then on
    assert int(model[1].num_batches_tracked) == 2  # one running-stats update per call


def test_the_global_hook_is_removed_even_when_the_closure_fails() -> None:
    from torch.nn.modules import module as module_mod

    before = len(module_mod._global_forward_hooks)
    model = mlp(width=4, depth=1)

    def closure() -> torch.Tensor:
        model(torch.zeros(3, 1))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PerSampleJacobian("auto")(closure, list(model.parameters()), rows=lambda t: t)
    assert len(module_mod._global_forward_hooks) == before
