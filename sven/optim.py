r"""The Sven optimizer as a :class:`torch.optim.Optimizer`."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch.optim import Optimizer

import truncpinv

from . import distributed as dist_
from . import functional as SF
from ._validation import (
    check_bool,
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
    check_unit_interval,
)
from .gram import GramJacobian, GramOperator, LayerGram, Unsupported, gather_gram, row_transform
from .jacobian import JacobianResult, PerSampleJacobian, autograd_jacobian
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
    "on_nonfinite",
    "damping",
    "adaptive_damping",
    "max_retries",
    "trust_radius",
    "check_step",
    "seed",
    "process_group",
    "chunk_size",
)

#: Accepted values of the ``jacobian`` option (see :class:`Sven`).
JACOBIAN_ROUTES = ("auto", "gram", "hooks", "autograd", "matfree")
#: Under ``jacobian="auto"`` the Gram route is used from this many Jacobian entries (``N * P``)
#: on; below it the materialised hook path is as fast (Python overhead dominates both).
GRAM_MIN_ENTRIES = 1 << 16

#: Starting damping of ``adaptive_damping=True`` when ``damping`` is 0.
ADAPTIVE_DAMPING_START = 1e-3
#: Keys of the optimizer-wide state saved under ``state_dict()["sven"]``.
_COUNTERS = ("steps", "skipped_steps", "rejected_steps")


@dataclass
class StepInfo:
    r"""Diagnostics of the last step, recorded at no extra cost.

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
        damping: the damping :math:`\lambda/\sigma_{max}^2` of the applied
            (or last tried) step.
        gain_ratio: actual over predicted decrease of :math:`\|R\|^2`
            (``adaptive_damping`` only).
        retries: rejected tries before the applied step.
        rejected: every try was rejected; the parameters are unchanged.
        capped: the step was shortened to ``trust_radius``.
    """

    losses: torch.Tensor
    singular_values: torch.Tensor | None = None
    rank: int = 0
    cutoff: float = float("nan")
    skipped: bool = False
    jacobian_method: str = ""
    k_used: int | None = None
    substep_losses: list[float] | None = None
    damping: float = 0.0
    gain_ratio: float | None = None
    retries: int = 0
    rejected: bool = False
    capped: bool = False
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


class _WithGram:
    """A matrix-free operator together with its Gram matrix (the matrix-free route)."""

    def __init__(self, op: Any, gram: torch.Tensor, output: torch.Tensor) -> None:
        self.op, self.gram, self.output = op, gram, output

    @property
    def shape(self) -> tuple[int, int]:
        return self.op.shape  # type: ignore[no-any-return]

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        return self.op.device  # type: ignore[no-any-return]

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(X)  # type: ignore[no-any-return]

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.op.rmatmat(Y)  # type: ignore[no-any-return]


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

    **Faults never corrupt the model.** If the residuals, the Jacobian or
    the direction contain NaN/Inf, or the solver fails (:class:`truncpinv.SolverError`,
    ``torch.linalg.LinAlgError``), the parameters are left bit-identical:
    with ``on_nonfinite="skip"`` (default) the step is skipped, counted in
    ``state_dict()["sven"]["skipped_steps"]`` (also :attr:`skipped_steps`)
    and a ``RuntimeWarning`` is issued; with ``on_nonfinite="raise"`` a
    ``FloatingPointError`` is raised. With ``check_step=True`` (implied by
    ``adaptive_damping``) the loss is re-evaluated after the step and a step
    that makes it non-finite is undone.

    **Damping and step control** (opt-in, Levenberg--Marquardt style). The
    kept singular values are filtered by :math:`\sigma/(\sigma^2+\lambda)`
    with :math:`\lambda = \text{damping}\cdot\sigma_{max}^2` instead of
    :math:`1/\sigma` (:func:`sven.functional.filter_factors`). With
    ``adaptive_damping`` the closure is re-evaluated after the step, the gain
    ratio :math:`\rho` (actual over predicted decrease of :math:`\|R\|^2`)
    updates :math:`\lambda` by the Madsen--Nielsen rule, and a step with
    :math:`\rho \le 0` is rejected: the *cached* factorisation is re-filtered
    with the larger :math:`\lambda` and tried again (one forward pass per
    try, at most ``max_retries`` retries). ``trust_radius`` caps
    :math:`\|\delta\theta\|`. See ``docs/robustness.md``.

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
        jacobian: how ``M`` is obtained:

            * ``"gram"``: the Gram route (:mod:`sven.gram`): ``K = M M^T``
              and ``M^T c`` from per-layer factors of one forward and one
              backward pass; ``M`` (``B x P``) is never formed. Linear,
              Conv1d/2d, Embedding, LayerNorm and RMSNorm layers.
            * ``"hooks"`` / ``"autograd"``: the materialised Jacobian
              (:mod:`sven.jacobian`), then the ``solver``.
            * ``"matfree"``: any model; ``M^T u`` and ``M v`` by autograd
              (:mod:`sven.matfree`), ``K`` from ``B`` batched
              vector-Jacobian products in chunks of ``chunk_size``:
              memory ``O(P * chunk_size + B^2)``.
            * ``"auto"`` (default): the Gram route when ``solver`` is
              ``"auto"``, the model is supported and ``B * P >= 65536``
              (below that the materialised hook path is as fast);
              otherwise the materialised path, where ``solver`` applies.
              A model the Gram route cannot handle (BatchNorm in training
              mode, a parameter used outside a supported layer) falls
              back once, with a warning naming the layer. RMSProp on
              the Jacobian (``rmsprop=True, rmsprop_post=False``) needs the
              materialised ``M``.

            On the Gram and matrix-free routes the pseudoinverse comes from
            the float64 eigendecomposition of ``K``
            (:func:`truncpinv.pinv_from_gram`) and ``solver`` is not used.
        on_nonfinite: ``"skip"`` or ``"raise"``.
        damping: Tikhonov damping :math:`\lambda/\sigma_{max}^2` (``0``: hard
            truncation only); with ``adaptive_damping`` the starting value
            (``0`` starts at ``1e-3``).
        adaptive_damping: adapt the damping from the gain ratio and reject
            steps that do not decrease :math:`\|R\|^2`.
        max_retries: retries after a rejected step (``adaptive_damping``);
            when every try is rejected the parameters stay unchanged.
        trust_radius: cap on :math:`\|\delta\theta\|` (``None``: no cap).
        check_step: re-evaluate the loss after each step (one forward pass)
            and undo a step that makes it non-finite.
        seed: seed of the randomized solvers; step ``t`` uses ``seed + t``,
            so a run resumed from :meth:`state_dict` draws the same sketches.
        process_group: data-parallel Sven on :mod:`torch.distributed`. Each
            rank's closure covers its shard of the batch; ``None`` uses the
            default group when one is initialised. The parameters are
            broadcast from rank 0 here; every rank then takes the same step
            (see :mod:`sven.distributed` for the communication volume).
        chunk_size: columns per batched autograd call of ``jacobian="matfree"``.

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
        on_nonfinite: str = ...,
        damping: float = ...,
        adaptive_damping: bool = ...,
        max_retries: int = ...,
        trust_radius: float | None = ...,
        check_step: bool = ...,
        seed: int = ...,
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
        on_nonfinite: str = ...,
        damping: float = ...,
        adaptive_damping: bool = ...,
        max_retries: int = ...,
        trust_radius: float | None = ...,
        check_step: bool = ...,
        seed: int = ...,
        process_group: Any = ...,
        chunk_size: int = ...,
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
        on_nonfinite: str = "skip",
        damping: float = 0.0,
        adaptive_damping: bool = False,
        max_retries: int = 3,
        trust_radius: float | None = None,
        check_step: bool = False,
        seed: int = 0,
        process_group: Any = None,
        chunk_size: int = 64,
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
        self.jacobian = check_choice("jacobian", jacobian, JACOBIAN_ROUTES)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
        self.damping = check_nonneg_float("damping", damping)
        self.adaptive_damping = check_bool("adaptive_damping", adaptive_damping)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be a non-negative integer, got {max_retries!r}")
        self.max_retries = max_retries
        self.trust_radius = None if trust_radius is None else check_positive_float("trust_radius", trust_radius)
        self.check_step = check_bool("check_step", check_step)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
        self.seed = seed
        if self.adaptive_damping and self.variable_k:
            raise ValueError(
                "`adaptive_damping=True` cannot be combined with `variable_k=True`: both decide the step from "
                "re-evaluated losses; choose one"
            )
        self.last_step: StepInfo | None = None
        self._counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        start = self.damping if (self.damping > 0 or not self.adaptive_damping) else ADAPTIVE_DAMPING_START
        self._damping = SF.DampingState(lam=start)
        self._jac = PerSampleJacobian(self.jacobian if self.jacobian in ("hooks", "autograd") else "auto")
        self._gram = LayerGram(seed=seed)
        self._gram_failed: str | None = None  # why the Gram route does not apply (auto: warned once)
        self._last_rows: int | None = None  # rows of the last step, for the choice of route
        self.process_group = process_group
        if self.jacobian == "matfree" and dist_.world_size(process_group) > 1:
            raise ValueError(
                "`jacobian='matfree'` does not support data-parallel training; use jacobian='auto' (the Gram route, "
                "or the materialised Jacobian gathered across ranks)"
            )
        super().__init__(params, {"lr": float(lr)})
        group = dist_.resolve_group(process_group)
        if group is not None and dist_.world_size(group) > 1:
            dist_.broadcast_parameters_([p for g in self.param_groups for p in g["params"]], src=0, group=group)

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
        """The ``torch.optim`` state dict plus ``"sven"``: everything an exact resume needs.

        ``"sven"`` holds the counters (``steps``, ``skipped_steps``,
        ``rejected_steps``) and the adaptive damping (``damping``, ``nu``).
        The per-parameter RMSProp buffers are in ``"state"`` as usual. The
        randomized solvers are seeded from ``seed`` and the step counter, so
        no generator state is needed.
        """
        sd = super().state_dict()
        sd["sven"] = {**self._counters, "damping": self._damping.lam, "nu": self._damping.nu}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (every ``"sven"`` entry is optional)."""
        sd = dict(state_dict)
        extra = sd.pop("sven", None)
        super().load_state_dict(sd)
        if extra is not None:
            self._counters = {k: int(extra.get(k, 0)) for k in _COUNTERS}
            if "damping" in extra:
                self._damping = SF.DampingState(lam=float(extra["damping"]), nu=float(extra.get("nu", 2.0)))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for k in (*GLOBAL_OPTIONS, "last_step", "_counters", "_jac", "_damping", "_gram", "_gram_failed"):
            state[k] = getattr(self, k)
        state["process_group"] = None  # a process group cannot be pickled
        return state

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of non-finite values or a solver failure."""
        return self._counters["skipped_steps"]

    @property
    def rejected_steps(self) -> int:
        """Number of tries rejected by ``adaptive_damping`` (each cost one forward pass)."""
        return self._counters["rejected_steps"]

    # ------------------------------------------------------------------ the step
    def _rows(self, out: Any) -> torch.Tensor:
        """Validate the closure's output and flatten it to rows."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the closure must return a tensor of per-sample losses, got {type(out).__name__}")
        if not out.is_floating_point():
            raise TypeError(f"the closure must return floating-point losses, got dtype {out.dtype}")
        if out.numel() == 0:
            raise ValueError(
                f"the closure returned an empty batch (shape {tuple(out.shape)}): Sven needs at least one sample"
            )
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
        """Evaluate ``closure``, linearise it (Gram route or Jacobian) and apply the Sven step.

        Args:
            closure: re-evaluates the model and returns the per-sample losses
                (shape ``(B,)``), or the residuals when ``residuals=True``.
                Data-parallel: this rank's shard of the batch.

        Returns:
            The closure's output (detached; this rank's rows).
        """
        if closure is None:
            raise ValueError(
                "Sven.step needs a closure that re-evaluates the model and returns the per-sample losses, "
                "e.g. `opt.step(lambda: ((model(x) - y) ** 2).sum(dim=-1))`"
            )
        blocks, params = self._blocks()
        if not params:
            raise ValueError("Sven has no parameter that requires grad to optimise")
        group = dist_.resolve_group(self.process_group)
        if group is not None and dist_.world_size(group) == 1:
            group = None
        local, out, M, method = self._linearize(closure, params, group)
        if self.residuals:
            R = out
        elif isinstance(M, torch.Tensor):
            R, M = SF.residual_jacobian(out, M, kappa=self.kappa)
        else:
            R, scale = SF.residual_scale(out, kappa=self.kappa)
            if self.kappa != 2.0:
                M = row_transform(M, scale)

        def evaluate() -> torch.Tensor:
            with torch.no_grad():
                rows = self._rows(closure()).detach()
            return rows if group is None else dist_.all_gather_rows(rows.contiguous(), group)

        self._sven_step(out, R, M, blocks, evaluate=evaluate, method=method)
        return local

    def _linearize(
        self, closure: Callable[[], torch.Tensor], params: list[torch.Tensor], group: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | GramOperator, str]:
        """Run the closure once and return ``(local rows, global rows, J or its Gram operator, method)``."""
        route = self.jacobian
        if route in ("auto", "gram") and self.rmsprop and not self.rmsprop_post:
            if route == "gram":
                raise ValueError(
                    "`jacobian='gram'` cannot be combined with RMSProp on the Jacobian (rmsprop_post=False), which "
                    "rescales the columns of the materialised M; use rmsprop_post=True or jacobian='auto'"
                )
            route = "dense"
        if route == "auto":
            n_cols = sum(p.numel() for p in params)
            tiny = self._last_rows is not None and self._last_rows * n_cols < GRAM_MIN_ENTRIES and group is None
            use_gram = self._gram_failed is None and isinstance(self.solver, truncpinv.Auto) and not tiny
            route = "gram" if use_gram else "dense"
        if route == "matfree":
            return self._linearize_matfree(closure, params)
        if route == "gram":
            res = self._gram(closure, params, rows=self._rows)
            ok = isinstance(res, GramJacobian)
            if group is not None:
                ok = dist_.all_agree(ok, group)
            if ok and isinstance(res, GramJacobian):
                self._last_rows = res.shape[0]
                if group is None:
                    return res.output, res.output, res, "gram"
                G = gather_gram(res, group)
                return res.output, G.output, G, "gram"
            reason = res.reason if isinstance(res, Unsupported) else "another rank could not use the Gram route"
            if self.jacobian == "gram":
                raise ValueError(f"`jacobian='gram'` does not apply to this model: {reason}")
            self._gram_failed = reason
            warnings.warn(
                f"Sven: the Gram route does not apply ({reason}); using the materialised Jacobian instead "
                f"(memory B x P). Pass jacobian='hooks' or 'autograd' to silence this warning.",
                RuntimeWarning,
                stacklevel=4,
            )
            if isinstance(res, Unsupported):
                out = res.output
                J = autograd_jacobian(out, params)
                return self._gather_dense(out.detach(), J, "autograd", group)
            route = "dense"
        res_d: JacobianResult = self._jac(closure, params, rows=self._rows)
        self._last_rows = int(res_d.output.shape[0])
        return self._gather_dense(res_d.output, res_d.jacobian, res_d.method, group)

    @staticmethod
    def _gather_dense(
        out: torch.Tensor, J: torch.Tensor, method: str, group: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        if group is None:
            return out, out, J, method
        # the materialised fallback, data-parallel: every rank gets all B x P rows
        return out, dist_.all_gather_rows(out.contiguous(), group), dist_.all_gather_rows(J.contiguous(), group), method

    def _linearize_matfree(
        self, closure: Callable[[], torch.Tensor], params: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, GramOperator, str]:
        from .matfree import ClosureJacobian, gram_from_operator

        op = ClosureJacobian.from_closure(lambda: self._rows(closure()), params, chunk_size=self.chunk_size)
        K = gram_from_operator(op, int(self.chunk_size or 64))
        out = op.output
        return out, out, _WithGram(op, K, out), "matfree"

    # ------------------------------------------------------------------ shared by the seed-compatible subclass
    def _mean_loss(self, rows: torch.Tensor) -> float:
        """The mean batch loss of closure rows (losses, or residuals whose squares are the losses)."""
        return float((rows.pow(2) if self.residuals else rows).mean())

    def _residuals_of(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.residuals else SF.residuals_from_losses(rows, kappa=self.kappa)

    def _solver_for_step(self) -> truncpinv.Solver:
        """The solver, with a per-step seed ``seed + step`` if it is randomized (reproducible on resume)."""
        solver = self.solver
        if dataclasses.is_dataclass(solver) and any(f.name == "seed" for f in dataclasses.fields(solver)):
            if not isinstance(getattr(solver, "seed", None), torch.Generator):
                return dataclasses.replace(solver, seed=(self.seed + self._counters["steps"]) % (1 << 62))
        return solver

    @torch.no_grad()
    def _sven_step(
        self,
        losses: torch.Tensor,
        R: torch.Tensor,
        M: torch.Tensor | GramOperator,
        blocks: Sequence[_Block],
        *,
        evaluate: Callable[[], torch.Tensor] | None,
        method: str,
    ) -> StepInfo:
        """Given the residuals and their Jacobian, compute and apply the step.

        ``evaluate`` re-evaluates the closure's rows at the current parameters
        (under ``no_grad``); it is used by ``variable_k``, ``adaptive_damping``
        and ``check_step``, and may be ``None`` when none of them is on.
        """
        self._counters["steps"] += 1
        info = StepInfo(losses=losses, jacobian_method=method, damping=self._damping.lam)
        self.last_step = info
        # Both are checked before anything else: a pass over M costs about 1/B of its
        # factorisation, and a solver given NaN may return garbage (check_finite=False).
        pre_rmsprop = self.rmsprop and not self.rmsprop_post
        if not SF.all_finite(R):
            self._nonfinite(info, losses, "the residuals")
            return info
        if not SF.all_finite(M if isinstance(M, torch.Tensor) else M.gram):
            self._nonfinite(info, losses, "the Jacobian")
            return info
        M_true = M
        if pre_rmsprop:
            if not isinstance(M, torch.Tensor):
                raise TypeError("RMSProp on the Jacobian needs the materialised M")  # the routes ensure it
            scaled = []
            for b in blocks:
                v = self._state_buffer(b, "square_avg")
                scaled.append(
                    SF.rmsprop_precondition_(M[:, b.start : b.stop], v, alpha=self.rmsprop_alpha, eps=self.rmsprop_eps)
                )
                self._store_buffer(b, "square_avg", v)
            M = torch.cat(scaled, dim=1)

        try:
            if isinstance(M, torch.Tensor):
                F = self._solver_for_step().factorize(
                    M, rank=self.rank, rtol=self.rtol, atol=self.atol, check_finite=False
                )
            else:  # the Gram or matrix-free route: eigh of K in float64, V = M^T U S^-1 implicit
                F = truncpinv.pinv_from_gram(
                    M.gram, M, rank=self.rank, rtol=self.rtol, atol=self.atol, check_finite=False
                )
        except (truncpinv.SolverError, torch.linalg.LinAlgError) as err:
            self._nonfinite(info, losses, f"the solver failed ({type(err).__name__}: {err})", fault=True)
            return info
        except (ValueError, RuntimeError):
            if not isinstance(M, torch.Tensor) or SF.all_finite(M):
                raise
            self._nonfinite(info, losses, "the Jacobian")
            return info
        if not SF.all_finite(F.S):
            self._nonfinite(info, losses, "the Jacobian")
            return info
        info.singular_values = F.singular_values
        info.rank = F.rank
        info.cutoff = F.cutoff

        lam = self._damping.lam if (self.adaptive_damping or self.damping > 0) else 0.0
        if self.variable_k:
            self._variable_k_step(info, F, R, blocks, evaluate, lam)
            return info

        needs_eval = self.adaptive_damping or self.check_step
        if needs_eval and evaluate is None:
            raise ValueError("this Sven configuration re-evaluates the loss after the step: pass the batch to step()")
        backup = [b.param.detach().clone() for b in blocks] if needs_eval else None
        post_state = self._snapshot_post_rmsprop(blocks) if (needs_eval and self.rmsprop_post) else None
        tries = 1 + (self.max_retries if self.adaptive_damping else 0)
        for attempt in range(tries):
            info.damping = lam
            d = SF.filtered_direction(F, R, damping=lam)
            if not SF.all_finite(d):
                self._restore(blocks, backup, post_state)
                self._nonfinite(info, losses, "the Sven direction")
                return info
            if self.rmsprop and self.rmsprop_post:
                d = self._post_rmsprop(blocks, d)
            d, info.capped = self._cap(blocks, d)
            self._apply(blocks, d, 1.0)
            info._direction = d
            info._lrs = [(b.start, b.stop, b.lr) for b in blocks]
            if not needs_eval:
                return info
            assert evaluate is not None  # checked above
            R_new = self._residuals_of(evaluate())
            if self.adaptive_damping:
                R_pred = R - self._jvp(M_true, blocks, d).to(R.dtype)
                info.gain_ratio = SF.gain_ratio(R, R_new, R_pred)
                accepted = SF.madsen_nielsen_update(self._damping, info.gain_ratio)
                lam = self._damping.lam
            else:
                accepted = SF.all_finite(R_new)
            if accepted:
                info.retries = attempt
                return info
            self._restore(blocks, backup, post_state)
            self._counters["rejected_steps"] += 1
            if not self.adaptive_damping:  # check_step: the loss became non-finite
                info._direction = None
                self._nonfinite(info, losses, "the loss after the step")
                return info
        info.rejected = True
        info.retries = tries
        info._direction = None
        return info

    def _variable_k_step(
        self,
        info: StepInfo,
        F: truncpinv.TruncatedPinv,
        R: torch.Tensor,
        blocks: Sequence[_Block],
        evaluate: Callable[[], torch.Tensor] | None,
        lam: float,
    ) -> None:
        if evaluate is None:
            raise ValueError("`variable_k=True` re-evaluates the loss after each component: pass the batch to step()")
        comps = SF.rank_one_components(F, R, damping=lam)

        def apply(c: torch.Tensor, sign: float) -> None:
            self._apply(blocks, c, sign)

        reference = self._mean_loss(info.losses)
        vk = SF.variable_k_search(comps, apply=apply, evaluate=lambda: self._mean_loss(evaluate()), reference=reference)
        info.k_used = vk.k_used
        info.substep_losses = vk.substep_losses
        info._direction = vk.applied if vk.applied is not None else torch.zeros(comps.shape[0], dtype=comps.dtype)
        info._lrs = [(b.start, b.stop, b.lr) for b in blocks]

    def _post_rmsprop(self, blocks: Sequence[_Block], d: torch.Tensor) -> torch.Tensor:
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
        return torch.cat(parts)

    def _snapshot_post_rmsprop(self, blocks: Sequence[_Block]) -> list[tuple[torch.Tensor, str, torch.Tensor | None]]:
        """Copies of the post-RMSProp buffers (``None``: not created yet), restored when a try is rejected."""
        snap: list[tuple[torch.Tensor, str, torch.Tensor | None]] = []
        for b in blocks:
            for name in ("square_avg", "momentum_buffer"):
                buf = self.state[b.param].get(name)
                snap.append((b.param, name, None if buf is None else buf.clone()))
        return snap

    def _restore(
        self,
        blocks: Sequence[_Block],
        backup: list[torch.Tensor] | None,
        post_state: list[tuple[torch.Tensor, str, torch.Tensor | None]] | None,
    ) -> None:
        """Put back the parameters (bit for bit) and the post-RMSProp buffers."""
        if backup is not None:
            for b, saved in zip(blocks, backup):
                b.param.copy_(saved)
        for p, name, buf in post_state or ():
            if buf is None:
                self.state[p].pop(name, None)
            else:
                self.state[p][name].copy_(buf)

    def _scaled(self, blocks: Sequence[_Block], d: torch.Tensor) -> torch.Tensor:
        """``lr_b * d_b`` for every block: the applied change is ``-`` this."""
        out = d.clone()
        for b in blocks:
            out[b.start : b.stop] *= b.lr
        return out

    def _cap(self, blocks: Sequence[_Block], d: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if self.trust_radius is None:
            return d, False
        norm = float(self._scaled(blocks, d).double().norm())
        return SF.cap_norm(d, radius=self.trust_radius, norm=norm)

    def _jvp(self, M: torch.Tensor | GramOperator, blocks: Sequence[_Block], d: torch.Tensor) -> torch.Tensor:
        """``M @ (lr * d)``: the linear model's predicted change of ``R`` is minus this."""
        x = self._scaled(blocks, d)
        if isinstance(M, torch.Tensor):
            return M @ x.to(M.dtype)
        return M.matmat(x.to(M.dtype)[:, None])[:, 0]

    def _nonfinite(self, info: StepInfo, losses: torch.Tensor, what: str, *, fault: bool = False) -> None:
        if self.kappa != 2.0 and not self.residuals and bool((losses < 0).any()):
            raise ValueError(
                f"kappa={self.kappa} needs non-negative losses (R = loss ** (kappa/2)), but a loss is "
                f"{float(losses.min()):.3g}; use kappa=2 for losses that can be negative"
            )
        info.skipped = True
        self._counters["skipped_steps"] += 1
        if fault:
            msg = f"Sven step skipped: {what}; the parameters were left unchanged"
        else:
            msg = f"Sven step skipped: NaN or Inf in {what}; the parameters were left unchanged"
        if self.on_nonfinite == "raise":
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
