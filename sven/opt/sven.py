"""The seed-compatible Sven optimizer driven by a :class:`sven.nn.SvenWrapper`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import truncpinv

from .. import functional as SF
from .._validation import check_bool, check_nonneg_float, check_nonneg_int, check_positive_int, check_unit_interval
from ..control import Evaluator
from ..info import StepInfo
from ..nn.sven_wrapper import SvenWrapper
from ..optim import Sven
from ..params import ParamBlock
from .pinv import solver_for_mode

__all__ = ["Sven", "WrappedSven"]


class WrappedSven(Sven, form=SvenWrapper):
    r"""Sven for a :class:`sven.nn.SvenWrapper`, with the original constructor and ``step(batch=None)``.

    Built by ``sven.opt.Sven(wrapped, lr, k, rtol, ...)`` (``sven.opt.Sven`` is
    :class:`sven.Sven`, which dispatches here when its first argument is a
    wrapper). It is a :class:`torch.optim.Optimizer` over the wrapper's flat
    parameter vector, so schedulers, hooks and ``state_dict`` work too. The
    maths is the same code as :class:`sven.Sven` (:mod:`sven.functional`).

    Typical loop (the original README)::

        wrapped = SvenWrapper(model, loss_fn, device)
        optimizer = Sven(wrapped, lr=0.1, k=64, rtol=1e-3)
        for xb, yb in train_loader:
            losses, preds = wrapped.loss_and_grad((xb, yb))
            optimizer.step()

    Args:
        model: the :class:`~sven.nn.SvenWrapper` (its ``kappa``,
            ``param_fraction`` and ``microbatch_size`` apply).
        lr: learning rate.
        k: maximum number of singular values kept.
        rtol: relative singular-value cut-off.
        track_svd_info: append to :attr:`svd_info` after each step:
            ``"svs"`` (the kept singular values, a NumPy array),
            ``"num_nonzero_svs"`` (the rank used) and, with ``variable_k``,
            ``"k_used"`` and ``"variable_k_substep_losses"``.
        svd_mode: an original mode string or a :mod:`truncpinv` solver, see
            :mod:`sven.opt.pinv` for the mapping.
        power_iterations: power iterations of the randomized modes.
        use_rmsprop: RMSProp scaling.
        alpha_rmsprop: RMSProp decay.
        eps_rmsprop: RMSProp epsilon.
        mu_rmsprop: RMSProp momentum (post mode only).
        rmsprop_post: RMSProp on the direction instead of on the Jacobian.
        variable_k: greedy rank search; ``step(batch)`` then needs the batch.
        on_nonfinite: ``"skip"`` (default) or ``"raise"``, see :class:`sven.Sven`.
        damping, adaptive_damping, max_retries, trust_radius, check_step, seed:
            keyword-only extensions, as in :class:`sven.Sven`; those that
            re-evaluate the loss need ``step(batch)``.

    Differences from the original, all deliberate: the solvers are accurate
    (the original randomized modes were not, at ``k = B/2``); with a random
    ``param_fraction`` the RMSProp averages are kept per parameter entry
    (the original mixed entries when the subset changed); a loss that
    becomes NaN during ``variable_k`` counts as an increase; non-finite
    Jacobians skip the step instead of corrupting the parameters; no
    ``torch.cuda.empty_cache()``.
    """

    def __init__(
        self,
        model: SvenWrapper,
        lr: float,
        k: int,
        rtol: float,
        track_svd_info: bool = False,
        svd_mode: str | truncpinv.Solver = "torch",
        power_iterations: int = 1,
        use_rmsprop: bool = False,
        alpha_rmsprop: float = 0.99,
        eps_rmsprop: float = 1e-8,
        mu_rmsprop: float = 0,
        rmsprop_post: bool = False,
        variable_k: bool = False,
        *,
        on_nonfinite: str = "skip",
        damping: float = 0.0,
        adaptive_damping: bool = False,
        max_retries: int = 3,
        trust_radius: float | None = None,
        check_step: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, SvenWrapper):
            raise TypeError(f"`model` must be a sven.nn.SvenWrapper, got {type(model).__name__}")
        check_positive_int("k", k)
        power_iterations = check_nonneg_int("power_iterations", power_iterations)
        check_nonneg_float("lr", lr)
        check_nonneg_float("rtol", rtol)
        check_unit_interval("alpha_rmsprop", alpha_rmsprop)
        check_nonneg_float("eps_rmsprop", eps_rmsprop)
        check_unit_interval("mu_rmsprop", mu_rmsprop)
        self.model = model
        if use_rmsprop and not rmsprop_post:
            model._try_gram = False  # RMSProp rescales the columns of the materialised Jacobian
        self.k = k
        self.svd_mode = svd_mode
        self.power_iterations = power_iterations
        self.track_svd_info = check_bool("track_svd_info", track_svd_info)
        self.use_rmsprop = check_bool("use_rmsprop", use_rmsprop)
        self.alpha_rmsprop = float(alpha_rmsprop)
        self.eps_rmsprop = float(eps_rmsprop)
        self.mu_rmsprop = float(mu_rmsprop)
        self.svd_info: dict[str, list[Any]] = {
            "svs": [],
            "num_nonzero_svs": [],
            "k_used": [],
            "variable_k_substep_losses": [],
        }
        super().__init__(
            [model.params],
            lr=lr,
            rank=k,
            rtol=rtol,
            kappa=model.kappa,
            solver=solver_for_mode(svd_mode, power_iterations=power_iterations),
            variable_k=variable_k,
            rmsprop=use_rmsprop,
            rmsprop_alpha=float(alpha_rmsprop),
            rmsprop_eps=float(eps_rmsprop),
            rmsprop_momentum=float(mu_rmsprop),
            rmsprop_post=rmsprop_post,
            on_nonfinite=on_nonfinite,
            damping=damping,
            adaptive_damping=adaptive_damping,
            max_retries=max_retries,
            trust_radius=trust_radius,
            check_step=check_step,
            seed=seed,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in (
            "model", "k", "svd_mode", "power_iterations", "track_svd_info", "use_rmsprop",
            "alpha_rmsprop", "eps_rmsprop", "mu_rmsprop", "svd_info",
        ):  # fmt: skip
            state[key] = getattr(self, key)
        return state

    def state_dict(self) -> dict[str, Any]:
        """:meth:`sven.Sven.state_dict` plus the wrapper's parameter-mask RNG state (``["sven"]["mask_rng"]``).

        Only when the wrapper has its own generator (``seed=``); with the
        default global torch RNG, save ``torch.get_rng_state()`` yourself.
        """
        sd = super().state_dict()
        if self.model.generator is not None:
            sd["sven"]["mask_rng"] = self.model.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`; restores the wrapper's mask RNG when present."""
        extra = state_dict.get("sven") or {}
        if "mask_rng" in extra and self.model.generator is not None:
            self.model.generator.set_state(extra["mask_rng"])
        super().load_state_dict(state_dict)

    @property
    def lr(self) -> float:
        """The learning rate (that of the single parameter group; schedulers change it)."""
        return float(self.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = check_nonneg_float("lr", value)

    def step(self, batch: tuple[Any, ...] | None = None) -> None:  # type: ignore[override]
        """Apply the Sven step from the Jacobian stored by ``model.loss_and_grad``.

        Args:
            batch: the batch ``(x, *args)``; required with ``variable_k=True``
                (the loss is re-evaluated after each rank-one component),
                ignored otherwise.
        """
        wrapped = self.model
        M, R, losses = wrapped.grads, wrapped.residuals, wrapped.losses
        if (isinstance(M, torch.Tensor) and M.numel() == 0) or M.shape[0] != R.shape[0]:
            raise RuntimeError("call `model.loss_and_grad(batch)` before `step()`: no Jacobian is stored")
        if batch is None and (self.variable_k or self.adaptive_damping or self.check_step):
            raise ValueError(
                "`batch` must be passed to step(batch) with variable_k, adaptive_damping or check_step "
                "(the loss is re-evaluated after the step)"
            )

        mask = wrapped.param_mask
        index = None if mask is None else mask.nonzero().squeeze(1)
        ncols = wrapped.n_params if index is None else int(index.numel())
        blocks = [ParamBlock(wrapped.params, self.lr, 0, ncols, index)]

        def rows_after() -> torch.Tensor:
            assert batch is not None  # checked above
            x, *args = batch
            return SF.group_rows(wrapped.evaluate_and_loss(x, *args), size=wrapped.microbatch_size)

        evaluate = None if batch is None else Evaluator(rows_after, self.rows)
        info: StepInfo = self._descend(losses, R, M, blocks, evaluate=evaluate, method=wrapped.jacobian_method)
        if self.track_svd_info and not info.skipped:
            assert info.singular_values is not None
            self.svd_info["svs"].append(np.asarray(info.singular_values[: info.rank].detach().cpu().numpy()))
            self.svd_info["num_nonzero_svs"].append(info.rank)
            if self.variable_k:
                self.svd_info["k_used"].append(info.k_used)
                self.svd_info["variable_k_substep_losses"].append(info.substep_losses)
        # free the Jacobian, as the original did
        wrapped.grads = torch.empty(0, device=wrapped.device)
