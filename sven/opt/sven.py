"""The seed-compatible Sven optimizer driven by a :class:`sven.nn.SvenWrapper`."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import truncpinv

from .._validation import (
    check_bool,
    check_choice,
    check_nonneg_float,
    check_nonneg_int,
    check_positive_int,
    check_unit_interval,
    user_stacklevel,
)
from ..config import SEED_NAMES
from ..control import Evaluator
from ..info import StepFault, StepInfo
from ..nn.sven_wrapper import SvenWrapper
from ..optim import Sven
from ..params import ParamBlock
from ..precondition import RMSProp
from ..seed_errors import MissingJacobianError, NonFiniteStepError
from .pinv import solver_for_mode

__all__ = ["Sven", "WrappedSven"]

#: The original's absolute singular-value cut-off (``pinv(..., tol=1e-10)``, which its ``step`` used).
ORIGINAL_TOL = 1e-10
#: The original randomized modes' oversampling (the sketch has ``k + 5`` columns).
ORIGINAL_OVERSAMPLE = 5


def _check_mode(value: Any) -> Any:
    solver_for_mode(value)  # raises for an unknown name
    return value


#: The options the original stores as attributes (and this class's keyword-only extensions that
#: act the same way): each is validated when assigned and acts at the next ``step()``.
_SEED_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "k": lambda v: check_positive_int("k", v),
    "rtol": lambda v: check_nonneg_float("rtol", v),
    "svd_mode": _check_mode,
    "power_iterations": lambda v: check_nonneg_int("power_iterations", v),
    "use_rmsprop": lambda v: check_bool("use_rmsprop", v),
    "alpha_rmsprop": lambda v: check_unit_interval("alpha_rmsprop", v),
    "eps_rmsprop": lambda v: check_nonneg_float("eps_rmsprop", v),
    "mu_rmsprop": lambda v: check_unit_interval("mu_rmsprop", v),
    "rmsprop_post": lambda v: check_bool("rmsprop_post", v),
    "variable_k": lambda v: check_bool("variable_k", v),
    "track_svd_info": lambda v: check_bool("track_svd_info", v),
    "rmsprop_state": lambda v: check_choice("rmsprop_state", v, ("position", "entry")),
    "global_rng": lambda v: check_bool("global_rng", v),
}
#: The native names of seed options (``opt.rank = 4`` is ``opt.k = 4`` here).
_SEED_NAME_OF = {native: seed for seed, native in SEED_NAMES.items()}


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

    By default it follows the original's trajectories (``docs/sven.md``,
    "Differences from the original", lists what differs and why): the options
    are attributes read at every step (``opt.k = 1`` acts at the next step),
    RMSProp's averages are indexed by position in the parameter subset, the
    randomized modes draw the original's sketch from the global torch RNG, a
    non-finite step raises, and ``step()`` deletes the wrapper's ``grads``,
    ``losses`` and ``residuals``.

    Args:
        model: the :class:`~sven.nn.SvenWrapper` (its ``kappa``,
            ``param_fraction`` and ``microbatch_size`` apply).
        lr: learning rate.
        k: maximum number of singular values kept.
        rtol: relative singular-value cut-off (the original's absolute cut-off
            ``1e-10`` applies too, :data:`ORIGINAL_TOL`).
        track_svd_info: append to :attr:`svd_info` after each step:
            ``"svs"`` (the kept singular values, a NumPy array of the
            parameters' dtype), ``"num_nonzero_svs"`` (the rank used) and, with
            ``variable_k``, ``"k_used"`` and ``"variable_k_substep_losses"``
            (0-d tensors: the loss before and after each accepted component).
            One entry per step: a skipped step (``on_nonfinite="skip"``)
            records an empty spectrum, rank 0 and ``k_used`` 0.
        svd_mode: an original mode string or a :mod:`truncpinv` solver, see
            :mod:`sven.opt.pinv` for the mapping.
        power_iterations: power iterations of the randomized modes.
        use_rmsprop: RMSProp scaling.
        alpha_rmsprop: RMSProp decay.
        eps_rmsprop: RMSProp epsilon.
        mu_rmsprop: RMSProp momentum (post mode only).
        rmsprop_post: RMSProp on the direction instead of on the Jacobian.
        variable_k: greedy rank search; ``step(batch)`` then needs the batch.
        on_nonfinite: ``"raise"`` (default, as the original: a
            :class:`~sven.seed_errors.NonFiniteStepError`, which is also a
            ``torch.linalg.LinAlgError``; the parameters are left unchanged)
            or ``"skip"`` (skip the step with a warning that counts the skipped
            steps, on every one).
        rmsprop_state: with a random ``param_fraction``, keep the RMSProp
            averages by ``"position"`` in the drawn subset (default, the
            original's rule) or per parameter ``"entry"`` (the averages then
            follow their parameters; see docs/sven.md for which learns better).
        global_rng: the randomized (and ``"lobpcg"``) modes draw the
            original's random sketch from the global torch RNG, so that masks
            and dropout afterwards see the original's stream (default). The
            draw is the original's: ``P' x (k + 5)`` normal numbers per step
            (``B' x (k + 5)`` for ``"randomized_v3"``, ``min(B', P') x k`` for
            ``"lobpcg"``); the solver itself is seeded from ``seed``.
            ``False`` leaves the global RNG alone.
        damping, adaptive_damping, max_retries, trust_radius, check_step, seed, atol:
            keyword-only extensions, as in :class:`sven.Sven`; those that
            re-evaluate the loss need ``step(batch)``.

    Attributes:
        v, b: the RMSProp running average of squares and the RMSProp momentum
            buffer (the original's names; ``None`` until the first RMSProp step).
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
        on_nonfinite: str = "raise",
        rmsprop_state: str = "position",
        global_rng: bool = True,
        damping: float = 0.0,
        adaptive_damping: bool = False,
        max_retries: int = 3,
        trust_radius: float | None = None,
        check_step: bool = False,
        seed: int = 0,
        atol: float = ORIGINAL_TOL,
    ) -> None:
        if not isinstance(model, SvenWrapper):
            raise TypeError(f"`model` must be a sven.nn.SvenWrapper, got {type(model).__name__}")
        check_nonneg_float("lr", lr)
        self.model = model
        values = {
            "k": k, "rtol": rtol, "svd_mode": svd_mode, "power_iterations": power_iterations,
            "use_rmsprop": use_rmsprop, "alpha_rmsprop": alpha_rmsprop, "eps_rmsprop": eps_rmsprop,
            "mu_rmsprop": mu_rmsprop, "rmsprop_post": rmsprop_post, "variable_k": variable_k,
            "track_svd_info": track_svd_info, "rmsprop_state": rmsprop_state, "global_rng": global_rng,
        }  # fmt: skip
        for name, value in values.items():
            setattr(self, name, _SEED_OPTIONS[name](value))
        self.svd_info: dict[str, list[Any]] = {
            "svs": [],
            "num_nonzero_svs": [],
            "k_used": [],
            "variable_k_substep_losses": [],
        }
        super().__init__(
            [model.params],
            lr=lr,
            on_nonfinite=on_nonfinite,
            damping=damping,
            adaptive_damping=adaptive_damping,
            max_retries=max_retries,
            trust_radius=trust_radius,
            check_step=check_step,
            seed=seed,
            atol=atol,
            **self._native_options(),
        )
        self._configure()
        self._ready = True

    # ------------------------------------------------------------------ options as attributes
    def _native_options(self) -> dict[str, Any]:
        """The seed attributes in the native :class:`~sven.config.SvenConfig` names."""
        return {
            "rank": self.k,
            "rtol": self.rtol,
            "kappa": self.model.kappa,
            "solver": solver_for_mode(self.svd_mode, power_iterations=self.power_iterations),
            "variable_k": self.variable_k,
            "rmsprop": self.use_rmsprop,
            "rmsprop_alpha": self.alpha_rmsprop,
            "rmsprop_eps": self.eps_rmsprop,
            "rmsprop_momentum": self.mu_rmsprop,
            "rmsprop_post": self.rmsprop_post,
        }

    def _configure(self) -> None:
        """Rebuild the config and the parts of the step from the seed attributes (validates the combination)."""
        old = self.config
        cfg = dataclasses.replace(old, **self._native_options())
        object.__setattr__(self, "config", cfg)
        object.__setattr__(self, "solver", cfg.solver)
        self.rows = cfg.rows()
        if cfg.variable_k != old.variable_k:  # the only step-control option the seed attributes change
            self.control = cfg.policy()
        self.precondition = (
            RMSProp(cfg.rmsprop_alpha, cfg.rmsprop_eps, cfg.rmsprop_momentum, cfg.rmsprop_post,
                    by_position=self.rmsprop_state == "position")
            if cfg.rmsprop else None
        )  # fmt: skip
        if cfg.rmsprop and not cfg.rmsprop_post:
            self.model._try_gram = False  # RMSProp rescales the columns of the materialised Jacobian
        self._dirty = False

    def __setattr__(self, name: str, value: Any) -> None:
        if "_ready" in self.__dict__:
            name = _SEED_NAME_OF.get(name, name)
            if name in _SEED_OPTIONS:
                object.__setattr__(self, name, _SEED_OPTIONS[name](value))
                try:
                    self._configure()
                except ValueError:  # a combination not allowed, perhaps on the way to one that is: step() checks
                    self._dirty = True
                return
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("model", "svd_info", "_dirty", "_ready", *_SEED_OPTIONS):
            state[key] = getattr(self, key)
        return state

    @property
    def lr(self) -> float:
        """The learning rate (that of the single parameter group; schedulers change it)."""
        return float(self.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = check_nonneg_float("lr", value)

    def _rmsprop_buffer(self, name: str) -> torch.Tensor | None:
        return self.state.get(self.model.params, {}).get(name)

    def _set_rmsprop_buffer(self, name: str, value: torch.Tensor | None) -> None:
        st = self.state[self.model.params]
        if value is None:
            st.pop(name, None)
        else:
            st[name] = value

    @property
    def v(self) -> torch.Tensor | None:
        """RMSProp's running average of squares (``None`` before the first RMSProp step; assign ``None`` to reset)."""
        return self._rmsprop_buffer("square_avg")

    @v.setter
    def v(self, value: torch.Tensor | None) -> None:
        self._set_rmsprop_buffer("square_avg", value)

    @property
    def b(self) -> torch.Tensor | None:
        """RMSProp's momentum buffer (``rmsprop_post`` with ``mu_rmsprop > 0``; ``None`` before its first step)."""
        return self._rmsprop_buffer("momentum_buffer")

    @b.setter
    def b(self, value: torch.Tensor | None) -> None:
        self._set_rmsprop_buffer("momentum_buffer", value)

    # ------------------------------------------------------------------ checkpoints
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

    # ------------------------------------------------------------------ the step
    def step(self, batch: tuple[Any, ...] | None = None) -> None:  # type: ignore[override]
        """Apply the Sven step from the Jacobian stored by ``model.loss_and_grad``, then delete it.

        Args:
            batch: the batch ``(x, *args)``; required with ``variable_k=True``
                (the loss is re-evaluated after each rank-one component),
                ignored otherwise.

        Raises:
            MissingJacobianError: no Jacobian is stored (``loss_and_grad`` was
                not called since the last step); also an ``AttributeError``.
            NonFiniteStepError: NaN/Inf in the residuals or the Jacobian, with
                ``on_nonfinite="raise"``; also a ``torch.linalg.LinAlgError``.
        """
        wrapped = self.model
        if self._dirty or self.config.kappa != wrapped.kappa:
            self._configure()
        missing = MissingJacobianError(
            "call `model.loss_and_grad(batch)` before `step()`: no Jacobian is stored (each step() consumes it)"
        )
        try:
            M, R, losses = wrapped.grads_operator, wrapped.residuals, wrapped.losses
        except AttributeError:  # deleted by the previous step(), as in the original
            raise missing from None
        if (isinstance(M, torch.Tensor) and M.numel() == 0) or M.shape[0] != R.shape[0]:
            raise missing
        if batch is None and (self.variable_k or self.adaptive_damping or self.check_step):
            raise ValueError(
                "`batch` must be passed to step(batch) with variable_k, adaptive_damping or check_step "
                "(the loss is re-evaluated after the step)"
            )
        if self.precondition is not None and not self.precondition.post and not isinstance(M, torch.Tensor):
            M = wrapped.grads  # RMSProp on the Jacobian scales its columns: materialise the Gram route's M

        mask = wrapped.param_mask
        index = None if mask is None else mask.nonzero().squeeze(1)
        ncols = wrapped.n_params if index is None else int(index.numel())
        blocks = [ParamBlock(wrapped.params, self.lr, 0, ncols, index)]

        def rows_after() -> torch.Tensor:
            assert batch is not None  # checked above
            x, *args = batch
            return wrapped._group_rows(wrapped.evaluate_and_loss(x, *args))

        self._draw_like_the_original(int(M.shape[0]), ncols)
        rank = self._original_rank(int(M.shape[0]), ncols)
        if rank != self.config.rank:
            object.__setattr__(self, "config", dataclasses.replace(self.config, rank=rank))
        evaluate = None if batch is None else Evaluator(rows_after, self.rows)
        info: StepInfo = self._descend(losses, R, M, blocks, evaluate=evaluate, method=wrapped.jacobian_method)
        if self.track_svd_info:
            self._record(info, losses)
        # free the Jacobian and the losses, as the original did (reading them now raises AttributeError)
        del wrapped.grads
        del wrapped.losses
        del wrapped.residuals

    def _draw_like_the_original(self, rows: int, cols: int) -> None:
        """Consume the global torch RNG as the original's solver did (its random sketch), see ``global_rng``."""
        if not self.global_rng or not isinstance(self.svd_mode, str):
            return
        dtype, device = self.model.params.dtype, self.model.params.device
        width = min(self.k + ORIGINAL_OVERSAMPLE, rows, cols)
        if self.svd_mode in ("randomized", "randomized_v2"):
            torch.randn(cols, width, dtype=dtype, device=device)
        elif self.svd_mode == "randomized_v3":  # the original's randomized SVD of M^T
            torch.randn(rows, width, dtype=dtype, device=device)
        elif self.svd_mode == "lobpcg":  # torch.lobpcg's start block for the smaller Gram matrix
            torch.randn(min(rows, cols), self.k, dtype=dtype, device=device)

    def _original_rank(self, rows: int, cols: int) -> int:
        """``k``; for ``svd_mode="scipy"`` at most ``min(B', P') - 1``, as the original's ``svds`` call kept."""
        if self.svd_mode == "scipy":
            return max(1, min(self.k, min(rows, cols) - 1))
        return int(self.k)

    def _record(self, info: StepInfo, losses: torch.Tensor) -> None:
        """Append this step to :attr:`svd_info` (one entry per step, skipped or not)."""
        dtype = self.model.params.dtype
        if info.skipped or info.singular_values is None:
            svs, rank = torch.zeros(0, dtype=dtype), 0
        else:
            svs, rank = info.singular_values[: info.rank].detach().to("cpu", dtype), int(info.rank)
        self.svd_info["svs"].append(np.asarray(svs.numpy()))
        self.svd_info["num_nonzero_svs"].append(rank)
        if self.variable_k:
            subs = info.substep_losses if not info.skipped and info.substep_losses else [float(losses.mean())]
            self.svd_info["k_used"].append(int(info.k_used or 0) if not info.skipped else 0)
            self.svd_info["variable_k_substep_losses"].append(
                [torch.tensor(v, dtype=losses.dtype, device=losses.device) for v in subs]
            )

    def _fault(self, info: StepInfo, losses: torch.Tensor, fault: StepFault) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                super()._fault(info, losses, fault)
            except FloatingPointError as err:  # also the original's type: torch.linalg.LinAlgError
                raise NonFiniteStepError(str(err)) from None
        for w in caught:  # attributed to the caller of step
            warnings.warn(w.message, w.category, stacklevel=user_stacklevel())
