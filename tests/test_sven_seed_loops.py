"""The original authors' training loops, as their scans run them: the seed API inside ``torch.no_grad()``,

    with torch.no_grad():
        losses, preds = wrapped.loss_and_grad((x, y))
        optimizer.step()

with parameter subsets (element-wise, by block), RMSProp before and after the pseudoinverse, variable-k
with the batch, and masks drawn from the global torch RNG (``torch.manual_seed`` decides them)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sven.nn import SvenWrapper
from sven.opt import Sven
from sven.tasks import per_sample_mse

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": ({}, {}),
    "param_fraction": ({"param_fraction": 0.5}, {}),
    "mask_by_block": ({"param_fraction": 0.5, "mask_by_block": True}, {}),
    "fill_last_block": ({"param_fraction": 0.5, "mask_by_block": True, "fill_last_block": True}, {}),
    "rmsprop_pre": ({}, {"use_rmsprop": True}),
    "rmsprop_post": ({}, {"use_rmsprop": True, "rmsprop_post": True}),
    # per-entry averages: the original's position-indexed ones (the default) make no progress here at this lr
    "rmsprop_pre_fraction": ({"param_fraction": 0.5}, {"use_rmsprop": True, "rmsprop_state": "entry"}),
    "variable_k": ({}, {"variable_k": True}),
    "variable_k_fraction": ({"param_fraction": 0.5}, {"variable_k": True}),
    "microbatch": ({"microbatch_size": 2}, {}),
    "func": ({"jacobian": "func", "param_fraction": 0.5}, {}),
}


def _model(seed: int, hidden: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(1, 16), nn.GELU()]
    for _ in range(hidden):
        layers += [nn.Linear(16, 16), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(16, 1))


def _batches(n_batches: int = 8, b: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        x = torch.rand(b, 1, generator=g) * 2 - 1
        out.append((x, torch.sin(3 * x)))
    return out


def _val(wrapped: SvenWrapper) -> float:
    x = torch.linspace(-1, 1, 200)[:, None]
    return float(wrapped.evaluate_and_loss(x, torch.sin(3 * x)).mean())


@pytest.mark.parametrize("case", list(CASES))
def test_the_original_loop_inside_no_grad(case: str) -> None:
    wkw, okw = CASES[case]
    torch.manual_seed(0)
    wrapped = SvenWrapper(_model(0), per_sample_mse, "cpu", **wkw)
    optimizer = Sven(wrapped, 0.1, 16, 1e-3, **okw)
    start = _val(wrapped)
    with torch.no_grad():
        for _ in range(3):  # epochs
            for x, y in _batches():
                losses, preds = wrapped.loss_and_grad((x, y))
                optimizer.step((x, y) if okw.get("variable_k") else None)
                assert losses.ndim == 1 and preds.shape == (32, 1) and not losses.requires_grad
    assert optimizer.skipped_steps == 0
    # RMSProp's steps are small at this lr: it only has to make progress
    assert _val(wrapped) < (start if okw.get("use_rmsprop") else 0.5 * start), (case, _val(wrapped), start)


def _masks(model_seed: int, n: int = 3, **kw: Any) -> list[torch.Tensor]:
    torch.manual_seed(model_seed)  # as the scans do: one seed for the model and everything after it
    # two 16 x 16 layers: which of them a block mask takes is random
    kw.setdefault("param_fraction", 0.5)
    wrapped = SvenWrapper(_model(model_seed, hidden=2), per_sample_mse, "cpu", **kw)
    out = []
    x, y = _batches(1)[0]
    with torch.no_grad():
        for _ in range(n):
            wrapped.loss_and_grad((x, y))
            assert wrapped.param_mask is not None
            out.append(wrapped.param_mask.clone())
    return out


@pytest.mark.parametrize("by_block", [False, True])
def test_model_seeds_draw_different_masks_from_the_global_rng(by_block: bool) -> None:
    a, b, a2 = _masks(1, mask_by_block=by_block), _masks(2, mask_by_block=by_block), _masks(1, mask_by_block=by_block)
    assert all(torch.equal(m, n) for m, n in zip(a, a2))  # torch.manual_seed decides them
    assert any(not torch.equal(m, n) for m, n in zip(a, b))
    # an explicit seed keeps its own stream, whatever the global seed
    s1, s2 = _masks(1, seed=5, mask_by_block=by_block), _masks(2, seed=5, mask_by_block=by_block)
    assert all(torch.equal(m, n) for m, n in zip(s1, s2))


def test_the_global_rng_masks_match_the_original_draw() -> None:
    """The original drew ``torch.randperm(P)[:int(f * P)]`` from the global RNG at each ``loss_and_grad``."""
    ours = _masks(3, n=2)
    torch.manual_seed(3)
    model = _model(3, hidden=2)
    P = sum(p.numel() for p in model.parameters())
    for mask in ours:
        ref = torch.zeros(P, dtype=torch.bool)
        ref[torch.randperm(P)[: int(0.5 * P)]] = True
        assert torch.equal(mask, ref)


def test_the_global_rng_block_masks_match_the_original_rule() -> None:
    """The original: tensors in ``torch.randperm`` order, whole while the total stays below
    ``int(f * P)``, then the leading entries of the next one to reach it exactly."""
    for fraction in (0.1, 0.5, 0.9):
        ours = _masks(5, n=3, mask_by_block=True, param_fraction=fraction)
        torch.manual_seed(5)
        model = _model(5, hidden=2)
        sizes = [p.numel() for p in model.parameters()]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        P, target = sum(sizes), int(fraction * sum(sizes))
        for mask in ours:
            ref = torch.zeros(P, dtype=torch.bool)
            running = 0
            for i in torch.randperm(len(sizes)).tolist():
                if running + sizes[i] >= target:
                    ref[starts[i] : starts[i] + target - running] = True
                    break
                ref[starts[i] : starts[i] + sizes[i]] = True
                running += sizes[i]
            assert torch.equal(mask, ref) and int(mask.sum()) == target


def test_fill_last_block_selects_exactly_the_fraction() -> None:
    x, y = _batches(1)[0]
    for fraction in (0.05, 0.3, 0.5, 0.77):
        wrapped = SvenWrapper(_model(4), per_sample_mse, "cpu", param_fraction=fraction, mask_by_block=True,
                              fill_last_block=True, seed=1)  # fmt: skip
        whole = SvenWrapper(_model(4), per_sample_mse, "cpu", param_fraction=fraction, mask_by_block=True, seed=1,
                            fill_last_block=False)  # fmt: skip
        opt = Sven(wrapped, 0.1, 16, 1e-3)
        P = wrapped.n_params
        for _ in range(4):
            before = wrapped.params.detach().clone()
            wrapped.loss_and_grad((x, y))
            whole.loss_and_grad((x, y))
            mask = wrapped.param_mask
            assert mask is not None and int(mask.sum()) == int(fraction * P)
            assert wrapped.actual_param_fraction == int(fraction * P) / P
            assert whole.param_mask is not None and int(whole.param_mask.sum()) <= int(fraction * P)
            assert wrapped.grads.shape == (32, int(fraction * P))
            partly = [(s, n) for _, n, s in wrapped.param_names_counts_startIdx if 0 < int(mask[s : s + n].sum()) < n]
            assert len(partly) <= 1
            # whole tensors on the Gram route, unless the 32 rows outnumber their parameters (then M is smaller)
            touched = sum(n for _, n, s in wrapped.param_names_counts_startIdx if int(mask[s : s + n].sum()) > 0)
            expected = ("gram",) if not partly and touched >= 32 else ("hooks", "autograd")
            assert wrapped.jacobian_method in expected
            opt.step()
            changed = wrapped.params.detach() != before
            assert not changed[~mask].any()


def test_fill_last_block_jacobian_is_the_masked_columns_of_the_full_one() -> None:
    x, y = _batches(1)[0]
    wrapped = SvenWrapper(_model(5).double(), per_sample_mse, "cpu", param_fraction=0.4, mask_by_block=True,
                          fill_last_block=True, seed=2, jacobian="autograd")  # fmt: skip
    full = SvenWrapper(_model(5).double(), per_sample_mse, "cpu", jacobian="autograd")
    wrapped.loss_and_grad((x.double(), y.double()))
    full.loss_and_grad((x.double(), y.double()))
    assert wrapped.param_mask is not None and isinstance(wrapped.grads, torch.Tensor)
    assert isinstance(full.grads, torch.Tensor)
    torch.testing.assert_close(wrapped.grads, full.grads[:, wrapped.param_mask])


def test_momentum_in_the_seed_api_with_masks_is_exact_on_resume() -> None:
    """``param_groups[0]["momentum"]`` works with random subsets (buffers per entry) and resumes exactly."""
    data = _batches(6)

    def run(split: bool) -> torch.Tensor:
        wrapped = SvenWrapper(_model(6), per_sample_mse, "cpu", param_fraction=0.5, seed=3)
        opt = Sven(wrapped, 0.1, 16, 1e-3)
        opt.param_groups[0]["momentum"] = 0.5
        for i, (x, y) in enumerate(data):
            if split and i == 3:
                sd_w, sd_o = wrapped.state_dict(), opt.state_dict()
                wrapped = SvenWrapper(_model(7), per_sample_mse, "cpu", param_fraction=0.5, seed=0)
                opt = Sven(wrapped, 0.1, 16, 1e-3)
                wrapped.load_state_dict(sd_w)
                opt.load_state_dict(sd_o)
            with torch.no_grad():
                wrapped.loss_and_grad((x, y))
                opt.step()
        return wrapped.params.detach().clone()

    assert torch.equal(run(False), run(True))
