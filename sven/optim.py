r"""The Sven optimizer as a :class:`torch.optim.Optimizer`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch.optim import Optimizer

import truncpinv

from . import functional as SF
from ._validation import (
    check_bool,
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
    check_unit_interval,
)
from .jacobian import JACOBIAN_METHODS, JacobianResult, PerSampleJacobian
from .nn.sven_wrapper import SvenWrapper

__all__ = ["StepInfo", "Sven"]

#: Hyperparameters that apply to the whole step (one Jacobian, one pseudoinverse)
#: and therefore cannot differ between parameter groups.
GLOBAL_OPTIONS = (
    "rank",
    "rtol",
    "atol",
    "kappa",
    "solver",
    "residuals",
    "variable_k",
    "rmsprop",
    "rmsprop_alpha",
    "rmsprop_eps",
    "rmsprop_momentum",
    "rmsprop_post",
    "jacobian",
    "nonfinite",
)


@dataclass
class StepInfo:
    """Diagnostics of the last step, recorded at no extra cost.

    Attributes:
        losses: ``(B,)`` the per-sample losses (or residuals) the step used, detached.
        singular_values: every singular value the solver computed (kept or
            not), descending; ``None`` if the step was skipped.
        rank: number of singular values kept by the truncation (under
            ``variable_k`` the step uses the first ``k_used`` of them).
        cutoff: the absolute singular-value cut-off that was applied.
        skipped: the step was skipped because of non-finite values.
        jacobian_method: how the Jacobian was computed (``"hooks"``, ``"autograd"``, ``"func"``, ...).
        k_used: components kept by ``variable_k`` (``None`` otherwise).
        substep_losses: the ``variable_k`` loss after each accepted component.
    """

    losses: torch.Tensor
    singular_values: torch.Tensor | None = None
    rank: int = 0
    cutoff: float = float("nan")
    skipped: bool = False
    jacobian_method: str = ""
    k_used: int | None = None
    substep_losses: list[float] | None = None
    _direction: torch.Tensor | None = field(default=None, repr=False)
    _lrs: list[tuple[int, int, float]] = field(default_factory=list, repr=False)

    @property
    def step_norm(self) -> float:
        r"""``||theta_new - theta_old||``: the norm of the applied change (computed on first access)."""
        if self._direction is None:
            return 0.0
        d = self._direction
        total = sum(float(lr * lr) * float(d[a:b].double().pow(2).sum()) for a, b, lr in self._lrs)
        return math.sqrt(total)


@dataclass
class _Block:
    """A parameter tensor and which of its entries are columns of the Jacobian."""

    param: torch.Tensor
    lr: float
    start: int  # first Jacobian column
    stop: int
    index: torch.Tensor | None = None  # flat indices into the parameter (None: all, in order)


class Sven(Optimizer):
    r"""Sven, "Singular Value Descent" (arXiv:2604.01279), as a ``torch.optim`` optimizer.

    Instead of the averaged gradient, Sven uses the per-sample residuals
    :math:`R_\alpha = \ell_\alpha^{\kappa/2}` and their Jacobian
    :math:`M = \partial R / \partial\theta` (``B x P``) and takes the
    minimum-norm step that best reduces every residual at once:

    .. math::

        \delta\theta = -\eta\, M_k^{+} R, \qquad
        M_k^{+} = \sum_{i\le r} v_i\, \sigma_i^{-1} u_i^\top,

    keeping at most ``k`` singular values :math:`\sigma_i > \max(atol, rtol\,\sigma_1)`.
    The pseudoinverse comes from a :mod:`truncpinv` solver.

    Usage::

        opt = sven.Sven(model.parameters(), lr=0.1, rank=16, rtol=1e-3)

        def closure():
            return per_sample_loss(model(x), y)  # shape (B,), not reduced

        losses = opt.step(closure)

    The closure must return one loss per sample (``reduction="none"``) and
    must not call ``backward()``: the optimizer differentiates its output.

    **Two forms.** ``sven.Sven(wrapped, lr, k, rtol, ...)`` with a
    :class:`sven.nn.SvenWrapper` as first argument builds the seed-compatible
    optimizer :class:`sven.opt.WrappedSven` (a subclass, whose ``step(batch)``
    uses the Jacobian stored by ``wrapped.loss_and_grad``); ``sven.opt.Sven``
    is this same class.

    **Parameter groups.** Only ``lr`` may differ between groups: the update
    of each group's block is scaled by that group's ``lr``. The Jacobian and
    the pseudoinverse are computed jointly over all parameters, so ``rank``,
    ``rtol``, ``atol``, ``kappa``, ``solver`` and the RMSProp / variable-k
    options are global (constructor arguments) and a group that sets one of
    them is rejected.

    **Non-finite values.** If the residuals, the Jacobian or the direction
    contain NaN/Inf, the parameters are left unchanged: with
    ``nonfinite="skip"`` (default) the step is skipped, counted in
    ``state_dict()["sven"]["skipped_steps"]`` and a ``RuntimeWarning`` is
    issued; with ``nonfinite="raise"`` a ``FloatingPointError`` is raised.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (per group).
        rank: ``k``, the maximum number of singular values kept (``None``:
            every one above the cut-off). About ``B / 2`` is a good start.
        rtol: keep :math:`\sigma > rtol\,\sigma_{max}`. Default ``1e-3``.
        atol: keep :math:`\sigma > atol`. Default ``0``.
        kappa: the residual exponent, :math:`R = \ell^{\kappa/2}`. ``2`` uses
            the losses as residuals; ``1`` their square roots.
        solver: a :mod:`truncpinv` solver object or registry name
            (``"auto"``, ``"gram"``, ``"svd"``, ``"randomized"``, ``"lanczos"``,
            ``"lobpcg"``).
        residuals: the closure returns residuals ``R`` (any shape, flattened to
            rows, e.g. ``pred - y`` for Gauss--Newton) instead of losses.
        variable_k: choose the rank greedily each step: add rank-one
            components while the batch loss (re-evaluated with the closure
            under ``torch.no_grad()``) does not increase.
        rmsprop: RMSProp scaling (see :func:`sven.functional.rmsprop_precondition_`
            and :func:`sven.functional.rmsprop_transform_`).
        rmsprop_alpha: RMSProp decay.
        rmsprop_eps: RMSProp epsilon.
        rmsprop_momentum: momentum of the post-pseudoinverse RMSProp.
        rmsprop_post: apply RMSProp to the direction (``True``) or to the
            Jacobian before the pseudoinverse (``False``).
        jacobian: ``"auto"``, ``"hooks"`` or ``"autograd"``, see
            :mod:`sven.jacobian`.
        nonfinite: ``"skip"`` or ``"raise"``.

    Attributes:
        last_step: :class:`StepInfo` of the last step.
        solver: the resolved :mod:`truncpinv` solver object.
    """

    def __new__(cls, params: Any = None, *args: Any, **kwargs: Any) -> Sven:
        if cls is Sven and isinstance(params, SvenWrapper):
            from .opt.sven import WrappedSven

            return super().__new__(WrappedSven)
        return super().__new__(cls)

    # The two constructor forms, for type checkers; at run time the seed form is
    # dispatched by ``__new__`` to ``WrappedSven.__init__``.
    @overload
    def __init__(
        self,
        params: SvenWrapper,
        lr: float,
        k: int,
        rtol: float,
        track_svd_info: bool = ...,
        svd_mode: str | truncpinv.Solver = ...,
        power_iterations: int = ...,
        use_rmsprop: bool = ...,
        alpha_rmsprop: float = ...,
        eps_rmsprop: float = ...,
        mu_rmsprop: float = ...,
        rmsprop_post: bool = ...,
        variable_k: bool = ...,
        *,
        nonfinite: str = ...,
    ) -> None: ...

    @overload
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = ...,
        *,
        rank: int | None = ...,
        rtol: float = ...,
        atol: float = ...,
        kappa: float = ...,
        solver: str | truncpinv.Solver = ...,
        residuals: bool = ...,
        variable_k: bool = ...,
        rmsprop: bool = ...,
        rmsprop_alpha: float = ...,
        rmsprop_eps: float = ...,
        rmsprop_momentum: float = ...,
        rmsprop_post: bool = ...,
        jacobian: str = ...,
        nonfinite: str = ...,
    ) -> None: ...

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        *args: Any,
        rank: int | None = None,
        rtol: float = 1e-3,
        atol: float = 0.0,
        kappa: float = 2.0,
        solver: str | truncpinv.Solver = "auto",
        residuals: bool = False,
        variable_k: bool = False,
        rmsprop: bool = False,
        rmsprop_alpha: float = 0.99,
        rmsprop_eps: float = 1e-8,
        rmsprop_momentum: float = 0.0,
        rmsprop_post: bool = False,
        jacobian: str = "auto",
        nonfinite: str = "skip",
        **kwargs: Any,
    ) -> None:
        if args or kwargs:
            extra = ", ".join([*(repr(a) for a in args), *kwargs])
            raise TypeError(
                f"sven.Sven(params, lr, *, rank=..., rtol=..., ...) takes its options as keywords, got {extra}; "
                f"the positional form Sven(wrapped, lr, k, rtol) needs a sven.nn.SvenWrapper as first argument"
            )
        check_nonneg_float("lr", lr)
        self.rank = check_positive_int("rank", rank, allow_none=True)
        self.rtol = check_nonneg_float("rtol", rtol)
        self.atol = check_nonneg_float("atol", atol)
        self.kappa = check_positive_float("kappa", kappa)
        self.residuals = check_bool("residuals", residuals)
        if self.residuals and self.kappa != 2.0:
            raise ValueError(
                f"`kappa` has no effect with `residuals=True` (the closure already returns the residuals R), "
                f"got kappa={kappa!r}; leave it at 2.0"
            )
        if isinstance(solver, str):
            self.solver = truncpinv.get_solver(solver)
        elif isinstance(solver, truncpinv.Solver):
            self.solver = solver
        else:
            raise ValueError(
                f"`solver` must be a truncpinv Solver object or one of {sorted(truncpinv.SOLVERS)}, got {solver!r}"
            )
        self.variable_k = check_bool("variable_k", variable_k)
        self.rmsprop = check_bool("rmsprop", rmsprop)
        self.rmsprop_alpha = check_unit_interval("rmsprop_alpha", rmsprop_alpha)
        self.rmsprop_eps = check_nonneg_float("rmsprop_eps", rmsprop_eps)
        self.rmsprop_momentum = check_unit_interval("rmsprop_momentum", rmsprop_momentum)
        self.rmsprop_post = check_bool("rmsprop_post", rmsprop_post)
        if self.variable_k and self.rmsprop and self.rmsprop_post:
            raise ValueError(
                "`variable_k=True` cannot be combined with `rmsprop_post=True`: the greedy rank search applies "
                "the rank-one components of the raw direction; use rmsprop_post=False (RMSProp on the Jacobian)"
            )
        self.jacobian = check_choice("jacobian", jacobian, JACOBIAN_METHODS)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("skip", "raise"))
        self.last_step: StepInfo | None = None
        self._counters = {"steps": 0, "skipped_steps": 0}
        self._jac = PerSampleJacobian(self.jacobian)
        super().__init__(params, {"lr": float(lr)})

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; only ``lr`` may be set per group (the other options are global)."""
        bad = sorted(k for k in param_group if k in GLOBAL_OPTIONS)
        if bad:
            raise ValueError(
                f"{', '.join(f'`{k}`' for k in bad)} cannot be set per parameter group: Sven computes one "
                f"pseudoinverse for all parameters, so only `lr` is per group; pass it to the constructor"
            )
        if "lr" in param_group:
            check_nonneg_float("lr", param_group["lr"])
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict plus ``"sven"``: the step and skipped-step counters."""
        sd = super().state_dict()
        sd["sven"] = dict(self._counters)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (the ``"sven"`` counters are optional)."""
        sd = dict(state_dict)
        counters = sd.pop("sven", None)
        super().load_state_dict(sd)
        if counters is not None:
            self._counters = {k: int(counters.get(k, 0)) for k in ("steps", "skipped_steps")}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for k in (*GLOBAL_OPTIONS, "last_step", "_counters", "_jac"):
            state[k] = getattr(self, k)
        return state

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of non-finite values."""
        return self._counters["skipped_steps"]

    # ------------------------------------------------------------------ the step
    def _rows(self, out: Any) -> torch.Tensor:
        """Validate the closure's output and flatten it to rows."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the closure must return a tensor of per-sample losses, got {type(out).__name__}")
        if self.residuals:
            if out.dim() == 0:
                raise ValueError(
                    "with `residuals=True` the closure must return the residuals (e.g. `pred - y`), "
                    "one or more per sample, but it returned a scalar"
                )
            return out.reshape(-1)
        if out.dim() == 0:
            raise ValueError(
                "the closure returned a scalar loss, but Sven needs one loss per sample, shape (B,): compute the "
                "loss with reduction='none' and reduce only the non-batch dimensions, e.g. "
                "`((pred - y) ** 2).sum(dim=-1)` or `F.cross_entropy(logits, y, reduction='none')`"
            )
        if out.dim() != 1:
            raise ValueError(
                f"the closure returned shape {tuple(out.shape)}, but Sven needs one loss per sample, shape (B,): "
                f"reduce the non-batch dimensions (e.g. `.sum(dim=-1)`), or pass residuals=True if these are "
                f"residuals to be flattened"
            )
        return out

    def _blocks(self) -> tuple[list[_Block], list[torch.Tensor]]:
        blocks: list[_Block] = []
        params: list[torch.Tensor] = []
        col = 0
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                n = p.numel()
                blocks.append(_Block(p, float(group["lr"]), col, col + n))
                params.append(p)
                col += n
        return blocks, params

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Evaluate ``closure``, compute its per-sample Jacobian and apply the Sven step.

        Args:
            closure: re-evaluates the model and returns the per-sample losses
                (shape ``(B,)``), or the residuals when ``residuals=True``.

        Returns:
            The closure's output (detached).
        """
        if closure is None:
            raise ValueError(
                "Sven.step needs a closure that re-evaluates the model and returns the per-sample losses, "
                "e.g. `opt.step(lambda: ((model(x) - y) ** 2).sum(dim=-1))`"
            )
        blocks, params = self._blocks()
        if not params:
            raise ValueError("Sven has no parameter that requires grad to optimise")
        res: JacobianResult = self._jac(closure, params, rows=self._rows)
        out = res.output
        if self.residuals:
            R, M = out, res.jacobian
        else:
            R, M = SF.residual_jacobian(out, res.jacobian, kappa=self.kappa)

        def evaluate() -> float:
            with torch.no_grad():
                rows = self._rows(closure())
            return float((rows.pow(2) if self.residuals else rows).mean())

        reference = None if not self.variable_k else (out.pow(2).mean() if self.residuals else out.mean())
        self._sven_step(out, R, M, blocks, evaluate=evaluate, reference=reference, method=res.method)
        return out

    # shared by the seed-compatible subclass
    @torch.no_grad()
    def _sven_step(
        self,
        losses: torch.Tensor,
        R: torch.Tensor,
        M: torch.Tensor,
        blocks: Sequence[_Block],
        *,
        evaluate: Callable[[], float],
        reference: torch.Tensor | None,
        method: str,
    ) -> StepInfo:
        """Given the residuals and their Jacobian, compute and apply the step.

        ``evaluate`` and ``reference`` (the mean batch loss before the step)
        are only used by ``variable_k``.
        """
        self._counters["steps"] += 1
        info = StepInfo(losses=losses, jacobian_method=method)
        self.last_step = info
        # The residuals (B numbers) are always checked. The Jacobian is checked here only when
        # RMSProp would fold it into its state; otherwise a NaN/Inf in it surfaces as a solver
        # error (non-finite singular values), classified below, which saves a pass over B x P.
        pre_rmsprop = self.rmsprop and not self.rmsprop_post
        if not SF.all_finite(R, M) if pre_rmsprop else not SF.all_finite(R):
            self._nonfinite(info, losses, "the residuals or their Jacobian")
            return info

        if pre_rmsprop:
            scaled = []
            for b in blocks:
                v = self._state_buffer(b, "square_avg")
                scaled.append(
                    SF.rmsprop_precondition_(M[:, b.start : b.stop], v, alpha=self.rmsprop_alpha, eps=self.rmsprop_eps)
                )
                self._store_buffer(b, "square_avg", v)
            M = torch.cat(scaled, dim=1)

        try:
            d, F = SF.sven_direction(
                M, R, rank=self.rank, rtol=self.rtol, atol=self.atol, solver=self.solver, check_finite=False
            )
        except (ValueError, RuntimeError):  # torch.linalg.LinAlgError is a RuntimeError
            if SF.all_finite(M):
                raise
            self._nonfinite(info, losses, "the Jacobian")
            return info
        if not SF.all_finite(d):
            self._nonfinite(info, losses, "the Sven direction")
            return info
        info.singular_values = F.singular_values
        info.rank = F.rank
        info.cutoff = F.cutoff

        if self.variable_k:
            comps = SF.rank_one_components(F, R)

            def apply(c: torch.Tensor, sign: float) -> None:
                self._apply(blocks, c, sign)

            if reference is None:
                raise ValueError("`reference` is required with variable_k=True")
            vk = SF.variable_k_search(comps, apply=apply, evaluate=evaluate, reference=float(reference))
            info.k_used = vk.k_used
            info.substep_losses = vk.substep_losses
            d = vk.applied if vk.applied is not None else torch.zeros_like(d)
        else:
            if self.rmsprop and self.rmsprop_post:
                parts = []
                for b in blocks:
                    v = self._state_buffer(b, "square_avg")
                    mom = self._state_buffer(b, "momentum_buffer") if self.rmsprop_momentum > 0 else None
                    u = SF.rmsprop_transform_(
                        d[b.start : b.stop],
                        v,
                        mom,
                        alpha=self.rmsprop_alpha,
                        eps=self.rmsprop_eps,
                        momentum=self.rmsprop_momentum,
                    )
                    self._store_buffer(b, "square_avg", v)
                    if mom is not None:
                        self._store_buffer(b, "momentum_buffer", mom)
                    parts.append(u.clone())
                d = torch.cat(parts)
            self._apply(blocks, d, 1.0)
        info._direction = d
        info._lrs = [(b.start, b.stop, b.lr) for b in blocks]
        return info

    def _nonfinite(self, info: StepInfo, losses: torch.Tensor, what: str) -> None:
        if self.kappa != 2.0 and not self.residuals and bool((losses < 0).any()):
            raise ValueError(
                f"kappa={self.kappa} needs non-negative losses (R = loss ** (kappa/2)), but a loss is "
                f"{float(losses.min()):.3g}; use kappa=2 for losses that can be negative"
            )
        info.skipped = True
        self._counters["skipped_steps"] += 1
        msg = f"Sven step skipped: {what} contain NaN or Inf; the parameters were left unchanged"
        if self.nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ state helpers
    def _state_buffer(self, b: _Block, name: str) -> torch.Tensor:
        """The ``(ncols,)`` slice of a per-parameter buffer that the Jacobian columns of ``b`` touch."""
        state = self.state[b.param]
        if name not in state:
            state[name] = torch.zeros_like(b.param, memory_format=torch.contiguous_format)
        flat = state[name].view(-1)
        return flat if b.index is None else flat[b.index]

    def _store_buffer(self, b: _Block, name: str, value: torch.Tensor) -> None:
        if b.index is not None:  # a gathered copy: scatter it back
            self.state[b.param][name].view(-1)[b.index] = value

    def _apply(self, blocks: Sequence[_Block], d: torch.Tensor, sign: float) -> None:
        """``theta_b -= sign * lr_b * d_b`` for every block (one fused call per learning rate)."""
        by_lr: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for b in blocks:
            piece = d[b.start : b.stop]
            if piece.dtype != b.param.dtype:
                piece = piece.to(b.param.dtype)
            if b.index is not None:
                b.param.view(-1).index_add_(0, b.index, piece, alpha=-sign * b.lr)
            elif b.lr != 0.0:
                ps, ds = by_lr.setdefault(b.lr, ([], []))
                ps.append(b.param)
                ds.append(piece.view_as(b.param))
        for lr, (ps, ds) in by_lr.items():
            torch._foreach_add_(ps, ds, alpha=-sign * lr)
