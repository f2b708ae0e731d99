r"""The seed API as an exact drop-in for the original research code (issue #21).

:class:`OriginalWrapper` and :class:`OriginalSven` re-derive the original
package's training loop from its published algorithm (the README's update
rule and the behaviour of its ``SvenWrapper`` / ``Sven`` / ``pinv``), written
here independently:

* ``loss_and_grad``: draw the parameter subset from the *global* torch RNG
  (element-wise: the first ``int(f P)`` of ``randperm(P)``; by block: tensors
  in ``randperm`` order, whole while the running total stays below
  ``int(f P)``, then the leading entries of the next one to reach it), average
  the per-sample losses over microbatches, ``R = loss ** (kappa / 2)`` and its
  Jacobian by ``torch.func.jacrev`` of a functional call;
* ``step``: RMSProp on the Jacobian (``v`` indexed by position in the subset,
  the Jacobian's columns divided by ``sqrt(v) + eps``, no mapping back), the
  truncated SVD (``torch.linalg.svd``, or the randomized SVD with ``k + 5``
  Gaussian columns from the global RNG and one power iteration), the cut-off
  (at most ``k`` values, fewer than ``min(B, P)`` in the ``"scipy"`` mode,
  ``sigma > rtol sigma_1``, then ``sigma > 1e-10``),
  ``delta = V S^{-1} U^T R``, RMSProp on the update with momentum (``v``, ``b``
  by position), or the greedy rank-one search of ``variable_k``, and
  ``theta[mask] -= lr * delta``; ``svd_info`` records the kept singular values,
  their number, ``k_used`` and the sub-step losses.

Both loops run in float64 under the same seeds for 20 steps; the per-step
losses must agree to 1e-6 (relative) and every ``svd_info`` field must agree.
The other tests pin each behaviour the issue lists (options assigned after
construction, the RMSProp state, ``wrapped.grads`` on the Gram route,
divergence, the global random stream, the deleted attributes and the
exception types, PolyakSGD).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import sven
from sven.nn import SvenWrapper
from sven.opt import PolyakSGD, Sven
from sven.seed_errors import BatchShapeError, MissingJacobianError, NonFiniteStepError
from sven.tasks import per_sample_mse

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- the original, re-derived
class OriginalWrapper:
    """The original ``SvenWrapper``'s ``loss_and_grad``: masks from the global RNG, ``jacrev`` of a functional call."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        kappa: float = 2.0,
        param_fraction: float = 1.0,
        mask_by_block: bool = False,
        microbatch_size: int = 1,
    ) -> None:
        self.model, self.loss_fn, self.kappa = model, loss_fn, kappa
        self.fraction, self.by_block, self.mb = param_fraction, mask_by_block, microbatch_size
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.mask: torch.Tensor | None = None

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: theta[s : s + k].view(sh) for n, s, k, sh in zip(self.names, self.starts, self.sizes, self.shapes)}
        return functional_call(self.model, params, (x,))  # type: ignore[no-any-return]

    def _draw(self) -> torch.Tensor | None:
        P = self.theta.numel()
        if self.fraction >= 1.0:
            return None
        target = int(self.fraction * P)
        mask = torch.zeros(P, dtype=torch.bool)
        if not self.by_block:
            mask[torch.randperm(P)[:target]] = True
            return mask
        running = 0
        for i in torch.randperm(len(self.sizes)).tolist():
            s, n = self.starts[i], self.sizes[i]
            if running + n >= target:
                mask[s : s + target - running] = True
                break
            mask[s : s + n] = True
            running += n
        return mask

    def loss_and_grad(self, batch: Batch) -> torch.Tensor:
        x, y = batch
        self.mask = self._draw()
        index = None if self.mask is None else self.mask.nonzero().squeeze(1)

        def residuals(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            full = active if index is None else self.theta.index_put((index,), active)
            losses = self.loss_fn(self.forward(full, x), y)
            if self.mb > 1:
                losses = losses.reshape(-1, self.mb).mean(dim=1)
            return losses.pow(self.kappa / 2), losses

        active = self.theta if index is None else self.theta[index]
        J, losses = jacrev(residuals, has_aux=True)(active)
        self.J, self.losses, self.R = J.detach(), losses.detach(), losses.detach().pow(self.kappa / 2)
        return self.losses

    def mean_loss(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return self.loss_fn(self.forward(self.theta, batch[0]), batch[1]).mean()


class OriginalSven:
    """The original ``Sven.step`` (see the module docstring)."""

    def __init__(self, w: OriginalWrapper, lr: float, k: int, rtol: float, **kw: Any) -> None:
        self.w, self.lr, self.k, self.rtol = w, lr, k, rtol
        self.svd_mode: str = kw.get("svd_mode", "torch")
        self.use_rmsprop: bool = kw.get("use_rmsprop", False)
        self.post: bool = kw.get("rmsprop_post", False)
        self.alpha: float = kw.get("alpha_rmsprop", 0.99)
        self.eps: float = kw.get("eps_rmsprop", 1e-8)
        self.mu: float = kw.get("mu_rmsprop", 0.0)
        self.variable_k: bool = kw.get("variable_k", False)
        self.v: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.svd_info: dict[str, list[Any]] = {
            "svs": [],
            "num_nonzero_svs": [],
            "k_used": [],
            "variable_k_substep_losses": [],
        }

    def _svd(self, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.svd_mode == "randomized":
            m, n = J.shape
            r = min(self.k + 5, m, n)
            Y = J @ torch.randn(n, r, dtype=J.dtype)  # the global RNG
            Y = J @ (J.T @ Y)  # one power iteration
            Q, _ = torch.linalg.qr(Y)
            Ub, S, Vh = torch.linalg.svd(Q.T @ J, full_matrices=False)
            U = Q @ Ub
            return U[:, : self.k], S[: self.k], Vh[: self.k]
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
        k = min(self.k, min(J.shape) - 1) if self.svd_mode == "scipy" else self.k  # svds: k < min(m, n)
        return U[:, :k], S[:k], Vh[:k]

    def _pinv(self, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U, S, Vh = self._svd(J)
        kmax = 1 + int((S > self.rtol * S[0]).nonzero().max())
        U, S, Vh = U[:, :kmax], S[:kmax], Vh[:kmax]
        S_inv = torch.where(S > 1e-10, 1.0 / S, torch.zeros_like(S))
        return Vh.T, S_inv, U.T

    def _apply(self, d: torch.Tensor) -> None:
        if self.w.mask is None:
            self.w.theta -= self.lr * d
        else:
            self.w.theta[self.w.mask] -= self.lr * d

    def step(self, batch: Batch | None = None) -> None:
        J, R, losses = self.w.J, self.w.R, self.w.losses
        if self.use_rmsprop and not self.post:
            g = J.mean(dim=0)
            self.v = torch.zeros_like(g) if self.v is None else self.v
            self.v = self.alpha * self.v + (1 - self.alpha) * g * g
            J = J / (self.v.sqrt() + self.eps)
        V, S_inv, UT = self._pinv(J)
        if self.variable_k:
            assert batch is not None
            before = losses.mean()
            subs, used = [before], 0
            while used < S_inv.numel():
                d = V[:, used] * (S_inv[used] * (UT[used] @ R))
                self._apply(d)
                new = self.w.mean_loss(batch)
                if new > before:
                    self._apply(-d)
                    break
                subs.append(new)
                used += 1
        else:
            d = V @ (S_inv * (UT @ R))
            if self.use_rmsprop and self.post:
                self.v = torch.zeros_like(d) if self.v is None else self.v
                self.v = self.alpha * self.v + (1 - self.alpha) * d * d
                d = d / (self.v.sqrt() + self.eps)
                if self.mu > 0:
                    self.b = d.clone() if self.b is None else self.mu * self.b + d
                    d = self.b
            self._apply(d)
        self.svd_info["svs"].append((1.0 / S_inv[S_inv > 0]).numpy())
        self.svd_info["num_nonzero_svs"].append(int(torch.count_nonzero(S_inv)))
        if self.variable_k:
            self.svd_info["k_used"].append(used)
            self.svd_info["variable_k_substep_losses"].append(subs)


# --------------------------------------------------------------------------- the two loops
def _model(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    if dropout:  # its masks come from the global RNG too, after the parameter subsets and the sketches
        return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 8), nn.Tanh(),
                             nn.Linear(8, 1)).double()  # fmt: skip
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _batches(n: int = 20, b: int = 16) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.rand(b, 1, generator=g, dtype=torch.float64) * 4 - 2
        out.append((x, torch.sin(2 * x) + 0.5 * x))
    return out


def _run_original(seed: int, wkw: dict[str, Any], okw: dict[str, Any], schedule: dict[int, dict[str, Any]]) -> Any:
    wkw = dict(wkw)
    base = _model(seed, wkw.pop("dropout", 0.0))
    torch.manual_seed(100 + seed)  # the masks and the sketches come from here on
    w = OriginalWrapper(base, per_sample_mse, **wkw)
    opt = OriginalSven(w, **okw)
    losses = []
    for i, batch in enumerate(_batches()):
        for name, value in schedule.get(i, {}).items():
            setattr(opt, name, value)
        losses.append(w.loss_and_grad(batch))
        opt.step(batch)
    return losses, opt, w, torch.get_rng_state()


def _run_ours(seed: int, wkw: dict[str, Any], okw: dict[str, Any], schedule: dict[int, dict[str, Any]]) -> Any:
    wkw = dict(wkw)
    base = _model(seed, wkw.pop("dropout", 0.0))
    torch.manual_seed(100 + seed)
    w = SvenWrapper(base, per_sample_mse, "cpu", **wkw)
    opt = Sven(w, track_svd_info=True, **okw)
    losses = []
    with torch.no_grad():  # as the authors' scans run it
        for i, batch in enumerate(_batches()):
            for name, value in schedule.get(i, {}).items():
                setattr(opt, name, value)
            losses.append(w.loss_and_grad(batch)[0])
            opt.step(batch)
    return losses, opt, w, torch.get_rng_state()


BASE = {"lr": 0.3, "k": 8, "rtol": 1e-3}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[int, dict[str, Any]]]] = {
    "plain": ({}, BASE, {}),
    "kappa1": ({"kappa": 1.0}, BASE, {}),
    "elementwise_mask": ({"param_fraction": 0.5}, BASE, {}),
    "block_mask": ({"param_fraction": 0.5, "mask_by_block": True}, BASE, {}),
    "microbatch": ({"microbatch_size": 2}, BASE, {}),
    "rmsprop": ({}, {**BASE, "lr": 10.0, "use_rmsprop": True}, {}),
    "rmsprop_fraction": ({"param_fraction": 0.5}, {**BASE, "lr": 10.0, "use_rmsprop": True}, {}),
    "rmsprop_post_momentum_fraction": (
        {"param_fraction": 0.5},
        {**BASE, "lr": 0.01, "use_rmsprop": True, "rmsprop_post": True, "mu_rmsprop": 0.5},
        {},
    ),
    "variable_k": ({}, {**BASE, "variable_k": True}, {}),
    "variable_k_fraction_microbatch": ({"param_fraction": 0.5, "microbatch_size": 2}, {**BASE, "variable_k": True}, {}),
    "randomized_fraction": ({"param_fraction": 0.5}, {**BASE, "k": 12, "svd_mode": "randomized"}, {}),
    "dropout_randomized_fraction": (
        {"dropout": 0.2, "param_fraction": 0.5},
        {**BASE, "k": 12, "svd_mode": "randomized", "variable_k": True},
        {},
    ),
    "scipy_k_above_the_rows": ({"microbatch_size": 4}, {**BASE, "svd_mode": "scipy"}, {}),  # 4 rows: 3 kept
    "options_assigned": ({}, BASE, {5: {"k": 2}, 10: {"rtol": 0.05, "k": 16}, 15: {"lr": 0.1}}),
}


def _close(a: Any, b: Any, what: str) -> None:
    a_, b_ = np.asarray([float(t) for t in a]), np.asarray([float(t) for t in b])
    np.testing.assert_allclose(a_, b_, rtol=1e-6, atol=0, err_msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_the_loop_follows_the_original_for_20_steps(case: str) -> None:
    wkw, okw, schedule = CASES[case]
    ref_losses, ref, ref_w, ref_rng = _run_original(0, wkw, okw, schedule)
    losses, opt, w, rng = _run_ours(0, wkw, okw, schedule)
    assert len(losses) == len(ref_losses) == 20
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        _close(a, b, f"{case}: the losses of step {i}")
    assert torch.equal(rng, ref_rng)  # the same draws from the global RNG (masks, sketches)
    for i, (a, b) in enumerate(zip(opt.svd_info["svs"], ref.svd_info["svs"])):
        assert a.dtype == b.dtype and a.shape == b.shape, (case, i)
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"{case}: svs of step {i}")
    assert opt.svd_info["num_nonzero_svs"] == ref.svd_info["num_nonzero_svs"]
    assert opt.svd_info["k_used"] == ref.svd_info["k_used"]
    assert len(opt.svd_info["variable_k_substep_losses"]) == len(ref.svd_info["variable_k_substep_losses"])
    for a, b in zip(opt.svd_info["variable_k_substep_losses"], ref.svd_info["variable_k_substep_losses"]):
        assert all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in a)  # as the original: 0-d tensors
        _close(a, b, f"{case}: variable-k sub-step losses")
    if ref.v is not None:  # the RMSProp state, by position in the subset
        assert opt.v is not None and opt.v.shape == ref.v.shape
        torch.testing.assert_close(opt.v, ref.v, rtol=1e-6, atol=1e-30)
    if ref.b is not None:
        assert opt.b is not None
        torch.testing.assert_close(opt.b, ref.b, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(w.params.detach(), ref_w.theta, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- 1. options assigned after construction
def _one_step(opt: Any, w: SvenWrapper, batch: Batch) -> None:
    w.loss_and_grad(batch)
    opt.step(batch)


def test_assigned_seed_options_act_at_the_next_step() -> None:
    batch = _batches(1)[0]
    w = SvenWrapper(_model(0), per_sample_mse, "cpu")
    opt = Sven(w, lr=0.1, k=16, rtol=1e-3, track_svd_info=True)
    _one_step(opt, w, batch)
    assert opt.svd_info["num_nonzero_svs"][-1] > 1
    opt.k = 1
    _one_step(opt, w, batch)
    assert opt.svd_info["num_nonzero_svs"][-1] == 1 and opt.rank == 1
    opt.k, opt.rtol = 16, 0.5  # sigma > sigma_1 / 2 only
    _one_step(opt, w, batch)
    svs = opt.svd_info["svs"][-1]
    assert (svs > 0.5 * svs[0]).all() and opt.config.rtol == 0.5
    opt.svd_mode = "lobpcg"
    assert type(opt.solver).__name__ == "LOBPCG"
    opt.use_rmsprop = True
    assert opt.v is None
    _one_step(opt, w, batch)
    assert opt.v is not None and opt.v.shape == (w.n_params,)
    opt.variable_k = True
    _one_step(opt, w, batch)
    assert len(opt.svd_info["k_used"]) == 1
    with pytest.raises(ValueError, match=r"`k` must be a positive integer, got 0"):
        opt.k = 0
    opt.rank = 3  # the native name of the same option
    assert opt.k == 3


def test_native_option_assignment_acts_or_says_how() -> None:
    batch = _batches(1)[0]
    model = _model(0)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, rtol=1e-3, adaptive_damping=False)

    def closure() -> torch.Tensor:
        return per_sample_mse(model(batch[0]), batch[1])

    opt.step(closure)
    assert opt.last_step is not None and opt.last_step.rank > 1
    opt.rank = 1
    opt.step(closure)
    assert opt.last_step.rank == 1
    for name in ("lr", "momentum", "weight_decay"):
        with pytest.raises(AttributeError, match=rf"`{name}` is a per-group option.*param_groups\[i\]\[{name!r}\]"):
            setattr(opt, name, 0.5)
    with pytest.raises(AttributeError, match=r"`kappa` is fixed when the optimizer is built.*pass `kappa=...`"):
        opt.kappa = 1.0
    with pytest.raises(ValueError, match=r"`rtol` must be a non-negative float"):
        opt.rtol = -1.0


# --------------------------------------------------------------------------- 2. RMSProp state with a subset
def test_rmsprop_per_entry_is_the_documented_option() -> None:
    batch = _batches(1)[0]
    w = SvenWrapper(_model(0), per_sample_mse, "cpu", param_fraction=0.5, seed=0)
    opt = Sven(w, lr=1.0, k=8, rtol=1e-3, use_rmsprop=True, rmsprop_state="entry")
    masks = []
    for _ in range(3):
        _one_step(opt, w, batch)
        assert w.param_mask is not None
        masks.append(w.param_mask.clone())
    assert opt.v is not None and opt.v.shape == (w.n_params,)
    never = ~(masks[0] | masks[1] | masks[2])
    assert never.any() and (opt.v[never] == 0).all() and (opt.v[~never] > 0).all()
    # by position (the default) the subset's size must stay fixed: whole tensors only vary it
    w2 = SvenWrapper(_model(0), per_sample_mse, "cpu", param_fraction=0.7, mask_by_block=True,
                     fill_last_block=False, seed=3)  # fmt: skip
    opt2 = Sven(w2, lr=1.0, k=8, rtol=1e-3, use_rmsprop=True)
    with pytest.raises(ValueError, match=r"subset size must stay fixed.*rmsprop_state='entry'"):
        for _ in range(10):
            _one_step(opt2, w2, batch)


# --------------------------------------------------------------------------- 3. wrapped.grads on the Gram route
def test_grads_on_the_gram_route_is_the_tensor_materialised_on_demand() -> None:
    batch = _batches(1)[0]
    ref = SvenWrapper(_model(0), per_sample_mse, "cpu", jacobian="autograd")
    w = SvenWrapper(_model(0), per_sample_mse, "cpu")
    ref.loss_and_grad(batch)
    w.loss_and_grad(batch)
    assert w.jacobian_method == "gram" and not isinstance(w.grads_operator, torch.Tensor)
    M = w.grads
    assert isinstance(M, torch.Tensor) and M.shape == (16, w.n_params) and M.dtype == w.params.dtype
    torch.testing.assert_close(M, ref.grads, rtol=1e-10, atol=1e-12)
    assert float(w.grads.norm()) == pytest.approx(float(ref.grads.norm()), rel=1e-12)
    torch.testing.assert_close(w.grads[3, :5], ref.grads[3, :5])
    assert w.grads is M  # materialised once
    # reading it does not change the step, which still uses the operator
    other = SvenWrapper(_model(0), per_sample_mse, "cpu")
    other.loss_and_grad(batch)
    Sven(w, lr=0.3, k=8, rtol=1e-3).step()
    Sven(other, lr=0.3, k=8, rtol=1e-3).step()
    assert torch.equal(w.params, other.params)


# --------------------------------------------------------------------------- 4. divergence
def _diverging(on_nonfinite: str | None, **kw: Any) -> tuple[Any, SvenWrapper, Batch]:
    batch = _batches(1)[0]
    w = SvenWrapper(_model(0), per_sample_mse, "cpu")
    opt = Sven(w, lr=0.1, k=8, rtol=1e-3, track_svd_info=True, **kw, **({} if on_nonfinite is None else
                                                                        {"on_nonfinite": on_nonfinite}))  # fmt: skip
    return opt, w, (batch[0], batch[1] * float("inf"))


def test_a_non_finite_step_raises_like_the_original_and_leaves_the_parameters() -> None:
    opt, w, bad = _diverging(None)
    before = w.params.detach().clone()
    w.loss_and_grad(bad)
    with pytest.raises(torch.linalg.LinAlgError, match=r"NaN or Inf in the residuals") as err:
        opt.step()
    assert isinstance(err.value, FloatingPointError) and isinstance(err.value, NonFiniteStepError)
    assert torch.equal(w.params, before)


def test_skipped_steps_warn_every_time_and_keep_one_svd_info_entry_per_step() -> None:
    opt, w, bad = _diverging("skip", variable_k=True)
    good = _batches(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # the default filter shows a repeated message once per location
        for batch in (good, bad, bad, good, bad):
            w.loss_and_grad(batch)
            opt.step(batch)
    msgs = [str(c.message) for c in caught if "Sven step skipped" in str(c.message)]
    assert [m.split(")")[0] for m in msgs] == [f"Sven step skipped ({i} of {s} steps skipped so far" for i, s in
                                              ((1, 2), (2, 3), (3, 5))]  # fmt: skip
    info = opt.svd_info
    assert len(info["svs"]) == len(info["num_nonzero_svs"]) == len(info["k_used"]) == 5
    assert [n == 0 for n in info["num_nonzero_svs"]] == [False, True, True, False, True]
    assert info["svs"][1].shape == (0,) and info["k_used"][1] == 0 and len(info["variable_k_substep_losses"][1]) == 1


def test_native_skip_warning_counts_the_skipped_steps() -> None:
    model = _model(0)
    x, y = _batches(1)[0]
    opt = sven.Sven(model.parameters(), lr=0.1, rank=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):
            opt.step(lambda: per_sample_mse(model(x), y * float("nan")))
    assert [str(c.message).split(":")[0] for c in caught] == [
        "Sven step skipped (1 of 1 steps skipped so far)", "Sven step skipped (2 of 2 steps skipped so far)"
    ]  # fmt: skip


# --------------------------------------------------------------------------- 5. the global random stream
@pytest.mark.parametrize(("mode", "shape"), [("randomized", "cols"), ("randomized_v3", "rows"), ("lobpcg", "lobpcg")])
def test_randomized_modes_consume_the_global_rng_as_the_original(mode: str, shape: str) -> None:
    batch = _batches(1)[0]
    w = SvenWrapper(_model(0), per_sample_mse, "cpu", param_fraction=0.5)
    opt = Sven(w, lr=0.1, k=4, rtol=1e-3, svd_mode=mode)
    torch.manual_seed(7)
    w.loss_and_grad(batch)
    n = int(w.param_mask.sum()) if w.param_mask is not None else 0
    opt.step()
    ours = torch.get_rng_state()
    torch.manual_seed(7)
    torch.randperm(w.n_params)  # the mask
    dims = {"cols": (n, min(4 + 5, 16, n)), "rows": (16, min(4 + 5, 16, n)), "lobpcg": (min(16, n), 4)}[shape]
    torch.randn(*dims, dtype=torch.float64)
    assert torch.equal(ours, torch.get_rng_state())
    # global_rng=False leaves it alone
    quiet = Sven(w, lr=0.1, k=4, rtol=1e-3, svd_mode=mode, global_rng=False)
    w.loss_and_grad(batch)
    state = torch.get_rng_state()
    quiet.step()
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- 6. state, deleted attributes, exceptions
def test_step_deletes_the_wrappers_results_and_a_second_step_raises_both_types() -> None:
    batch = _batches(1)[0]
    w = SvenWrapper(_model(0), per_sample_mse, "cpu")
    opt = Sven(w, lr=0.1, k=8, rtol=1e-3)
    assert opt.v is None and opt.b is None
    losses, _ = w.loss_and_grad(batch)
    opt.step()
    assert losses.shape == (16,)  # what loss_and_grad returned stays
    for name in ("grads", "losses", "residuals"):
        assert not hasattr(w, name)
    with pytest.raises(AttributeError, match=r"call `model.loss_and_grad\(batch\)` before `step\(\)`") as err:
        opt.step()
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, MissingJacobianError)
    w.loss_and_grad(batch)
    assert hasattr(w, "grads") and hasattr(w, "losses")


def test_shape_errors_are_also_the_originals_runtime_errors() -> None:
    x, y = _batches(1)[0]
    w = SvenWrapper(_model(0), per_sample_mse, "cpu", microbatch_size=3)
    with pytest.raises(RuntimeError, match=r"batch size 16 is not divisible by `microbatch_size`=3") as err:
        w.loss_and_grad((x, y))
    assert isinstance(err.value, ValueError) and isinstance(err.value, BatchShapeError)
    scalar = SvenWrapper(_model(0), lambda p, t: ((p - t) ** 2).mean(), "cpu")
    with pytest.raises(RuntimeError, match=r"`loss_fn` returned a scalar") as err2:
        scalar.loss_and_grad((x, y))
    assert isinstance(err2.value, ValueError)


def test_rmsprop_state_is_v_and_b() -> None:
    batch = _batches(1)[0]
    w = SvenWrapper(_model(0), per_sample_mse, "cpu", param_fraction=0.5)
    opt = Sven(w, lr=0.01, k=8, rtol=1e-3, use_rmsprop=True, rmsprop_post=True, mu_rmsprop=0.5)
    _one_step(opt, w, batch)
    n = int(0.5 * w.n_params)
    assert opt.v is not None and opt.b is not None and opt.v.shape == opt.b.shape == (n,)
    assert opt.state_dict()["state"][0]["square_avg"].shape == (n,)
    opt.v = None
    assert opt.v is None


# --------------------------------------------------------------------------- 7. PolyakSGD
def test_polyak_matches_the_original_norm_squared_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
    opt = PolyakSGD(model.parameters(), max_lr=10.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(60):
        opt.step(closure)
        # the original: lr = (loss - f*) / (sum ||g||^2 + eps), capped at max_lr, in float32 then .item()
        for p in ref.parameters():
            p.grad = None
        loss = ((ref(x) - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            sq = sum(p.grad.norm() ** 2 for p in ref.parameters())
            lr = min((loss.item() - 0.0) / (sq.item() + 1e-8), 10.0)
            for p in ref.parameters():
                p.add_(p.grad, alpha=-lr)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)


def test_seed_pinv_scipy_mode_keeps_fewer_values_than_the_rows_as_svds() -> None:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 20, generator=g, dtype=torch.float64)  # full rank 5, well conditioned
    assert sven.opt.pinv(M, k=8, rtol=0.0, mode="scipy")[1].numel() == 4
    assert sven.opt.pinv(M, k=8, rtol=0.0, mode="torch")[1].numel() == 5
