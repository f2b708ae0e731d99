r"""The options of :class:`sven.Sven`, validated once, and the parts they build.

:class:`SvenConfig` holds the keyword options of the native API. Each is
checked with a message that names it and states the rule; then the config
builds the stages of a step: the route (:mod:`sven.linearize`), the
preconditioner (:mod:`sven.precondition`), the step-control policy
(:mod:`sven.control`) and the :mod:`truncpinv` solver.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any

import torch

import truncpinv

from ._validation import (
    check_bool,
    check_choice,
    check_nonneg_float,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    check_rank,
    check_unit_interval,
    rank_for,
)
from .control import CrossEntropyDamping, Policy, TrustRadius, make_policy
from .functional import DAMPING_MIN
from .linearize import ROUTES, Linearizer, RowSpec
from .linearize.finite import FD_SCHEMES, FiniteDifferences, GivenJacobian
from .loss_rows import JUDGE_EVERY, RULE_PRESET
from .loss_rule import CrossEntropyRows
from .precondition import ColumnScaling, RMSProp

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_RTOL",
    "GLOBAL_OPTIONS",
    "GROUP_OPTIONS",
    "JUDGE_EVERY",
    "LM_RETRIES",
    "RESIDUAL_LR",
    "SEED_NAMES",
    "SvenConfig",
    "check_group",
    "with_momentum_rule",
]

#: The defaults of the native :class:`sven.Sven`: ``lr=0.5``, ``rank=None``, ``rtol=1e-4`` and adaptive
#: Levenberg--Marquardt damping (``adaptive_damping=None``: on unless ``variable_k``, ``check_step``, a
#: fixed ``damping > 0``, ``rmsprop`` or momentum is asked for). Chosen as the one configuration with the
#: lowest mean log-regret across toy1d, polynomial, digits, digits-ce, poisson2d and heat1d in a 57-point
#: grid (damping policy x lr x rank fraction x rtol, momentum, weight decay; ``sven-bench --optimizers
#: sven-native --grid``, docs/results.md): within 1.8x of the best grid point on every task. The seed API
#: keeps the original's defaults.
DEFAULT_LR = 0.5
DEFAULT_RTOL = 1e-4
#: Retries of a step with Moré's scaling (``scale``): ten doublings of the Madsen--Nielsen growth factor take any
#: damping to its ceiling, so a step either succeeds or the control stalls (and says so). A try costs one forward
#: pass. Measured on poisson2d (one seed, 20 s): the first step of the scaled control needs 5 tries.
LM_RETRIES = 10
#: Moré's column scaling (``scale``) is on by default in residual mode only up to this many parameters: it needs
#: the materialised ``N x P`` Jacobian, while a larger model's residuals keep the Gram route's ``N x N`` memory.
#: Classic least-squares problems (curve fits, the Moré--Garbow--Hillstrom set, small PINNs) lie far below it.
SCALE_MAX_PARAMS = 10_000
#: The learning rate of residual mode (``residuals=True``) with damping: Levenberg--Marquardt takes the whole
#: damped step; the damping, not ``lr``, shortens it (``lr=0.5`` halves every step and doubles the iterations).
RESIDUAL_LR = 1.0


@dataclass(frozen=True)
class SvenConfig:
    r"""The keyword options of :class:`sven.Sven` (all global: one Jacobian and one pseudoinverse per step).

    Args:
        rank: ``k``, the maximum number of singular values kept: an ``int``, or a float in (0, 1], the
            fraction of the step's rows ``B`` (``ceil(rank * B)``); ``None``: every one above the cut-off.
        rtol: keep :math:`\sigma > rtol\,\sigma_{max}`. ``None`` (default): :data:`DEFAULT_RTOL`, except in
            residual mode with damping (``residuals=True`` and ``adaptive_damping`` or ``damping > 0``), where
            only numerically zero values are cut (``max(B, P) * eps``, :func:`truncpinv.default_rtol`): the
            damping :math:`\sigma/(\sigma^2+\lambda)` already shrinks the small directions, and cutting them
            would stop Levenberg--Marquardt from ever correcting a badly scaled parameter. With the GGN rows
            (``ggn``, the loss rule) on the Gram route's Cholesky path (:mod:`sven.damped_gram`: float32, CPU,
            every try damped by at least ``1e-3``), nothing is cut: ``K`` is float64 there, and the step is
            :math:`M^\top(K+\lambda I)^{-1}R` with every direction damped, one Cholesky solve per try and
            :math:`\sigma_{max}` alone (:class:`sven.damped_gram.Untruncated`).
        atol: keep :math:`\sigma > atol`.
        kappa: the residual exponent, :math:`R = \ell^{\kappa/2}`.
        solver: a :mod:`truncpinv` solver object or registry name.
        residuals: the closure returns residuals (any shape, flattened) instead of losses.
        variable_k: greedy rank choice (:class:`sven.control.VariableK`).
        rmsprop, rmsprop_alpha, rmsprop_eps, rmsprop_momentum, rmsprop_post: :class:`sven.precondition.RMSProp`.
        jacobian: the route, one of :data:`sven.linearize.ROUTES`; or finite differences of the closure,
            ``"2-point"`` or ``"3-point"``; or a callable ``jac()`` returning the ``(N, P)`` Jacobian at the current
            parameters (:mod:`sven.linearize.finite`).
        on_nonfinite: ``"skip"`` or ``"raise"``.
        damping: Tikhonov damping :math:`\lambda/\sigma_{max}^2`: fixed, or the start value with
            ``adaptive_damping``.
        adaptive_damping: :class:`sven.control.AdaptiveDamping` (Levenberg--Marquardt with rejection).
            ``None`` (default): on, unless ``variable_k``, ``check_step``, a fixed ``damping > 0`` or
            ``rmsprop`` is set (or momentum: :func:`with_momentum_rule`).
        max_retries: retries after a rejected step (``adaptive_damping``). ``None`` (default): 3, or
            :data:`LM_RETRIES` with ``scale`` (Levenberg--Marquardt retries until a step succeeds, as MINPACK).
        scale: Moré's column scaling of the damping (:class:`sven.precondition.ColumnScaling`, as MINPACK's
            LM); it materialises ``M`` (``B x P``). ``None`` (default): on in residual mode with
            ``adaptive_damping``, without RMSProp and with a route that materialises ``M``.
        trust_radius: cap on :math:`\|\delta\theta\|` (:class:`sven.control.TrustRadius`).
        check_step: :class:`sven.control.CheckStep`.
        seed: seed of the randomized solvers (step ``t`` uses ``seed + t``) and of the verification probes.
        chunk_size: columns per batched autograd call of the matrix-free route.
        ggn: the loss rule (:mod:`sven.loss_rule`): ``True``, the closure returns softmax cross-entropy losses
            and Sven uses their generalised Gauss--Newton rows with the settings of :data:`sven.loss_rows.RULE_PRESET`;
            ``False``, never; ``None`` (default), decided at the first step from the closure's output.
        damping_start: with the GGN rows and ``adaptive_damping`` (:class:`sven.control.CrossEntropyDamping`):
            the damping floor starts here and doubles on each plateau of the batches' loss, up to ``damping``
            (``None``, or a value not below ``damping``: the floor is ``damping`` throughout). Ignored without
            the GGN rows.
        judge_every: with the GGN rows and ``adaptive_damping``: judge only every ``judge_every``-th step on the
            cross-entropy once the judged steps are calm at the floor (:class:`sven.control.CrossEntropyDamping`;
            ``1``: every step). Default :data:`JUDGE_EVERY`. Ignored without the GGN rows.
    """

    rank: int | float | None = None
    rtol: float | None = None
    atol: float = 0.0
    kappa: float = 2.0
    solver: Any = "auto"
    residuals: bool = False
    variable_k: bool = False
    rmsprop: bool = False
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-8
    rmsprop_momentum: float = 0.0
    rmsprop_post: bool = False
    jacobian: Any = "auto"
    on_nonfinite: str = "skip"
    damping: float = 0.0
    adaptive_damping: bool | None = None
    max_retries: int | None = None
    scale: bool | None = None
    trust_radius: float | None = None
    check_step: bool = False
    seed: int = 0
    chunk_size: int = 64
    ggn: bool | None = None
    damping_start: float | None = None
    judge_every: int = JUDGE_EVERY

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("rank", check_rank("rank", self.rank))
        if self.rtol is not None:
            put("rtol", check_nonneg_float("rtol", self.rtol))
        put("atol", check_nonneg_float("atol", self.atol))
        put("kappa", check_positive_float("kappa", self.kappa))
        put("residuals", check_bool("residuals", self.residuals))
        if self.residuals and self.kappa != 2.0:
            raise ValueError(
                f"`kappa` has no effect with `residuals=True` (the closure already returns the residuals R), "
                f"got kappa={self.kappa!r}; leave it at 2.0"
            )
        if isinstance(self.solver, str):
            put("solver", truncpinv.get_solver(self.solver))
        elif not isinstance(self.solver, truncpinv.Solver):
            raise ValueError(
                f"`solver` must be a truncpinv Solver object or one of {sorted(truncpinv.SOLVERS)}, got {self.solver!r}"
            )
        for name in ("variable_k", "rmsprop"):
            put(name, check_bool(name, getattr(self, name)))
        put("rmsprop_alpha", check_unit_interval("rmsprop_alpha", self.rmsprop_alpha))
        put("rmsprop_eps", check_nonneg_float("rmsprop_eps", self.rmsprop_eps))
        put("rmsprop_momentum", check_unit_interval("rmsprop_momentum", self.rmsprop_momentum))
        put("rmsprop_post", check_bool("rmsprop_post", self.rmsprop_post))
        if self.variable_k and self.rmsprop and self.rmsprop_post:
            raise ValueError(
                "`variable_k=True` cannot be combined with `rmsprop_post=True`: the greedy rank search applies "
                "the rank-one components of the raw direction; use rmsprop_post=False (RMSProp on the Jacobian)"
            )
        named = isinstance(self.jacobian, str) and self.jacobian in ROUTES + FD_SCHEMES
        if not (named or callable(self.jacobian)):
            raise ValueError(
                f"`jacobian` must be one of {list(ROUTES + FD_SCHEMES)} or a callable returning the (N, P) Jacobian, "
                f"got {self.jacobian!r}"
            )
        put("chunk_size", check_positive_int("chunk_size", self.chunk_size))
        put("on_nonfinite", check_choice("on_nonfinite", self.on_nonfinite, ("skip", "raise")))
        put("damping", check_nonneg_float("damping", self.damping))
        if self.damping_start is not None:
            put("damping_start", check_nonneg_float("damping_start", self.damping_start))
        put("judge_every", check_positive_int("judge_every", self.judge_every))
        post = self.rmsprop and self.rmsprop_post
        if self.adaptive_damping is None:  # the default: on, unless another step control or RMSProp was asked for
            put("adaptive_damping", not (self.variable_k or self.check_step or self.damping > 0 or self.rmsprop))
        put("adaptive_damping", check_bool("adaptive_damping", self.adaptive_damping))
        if self.adaptive_damping and post:
            raise ValueError(
                "`adaptive_damping=True` cannot be combined with `rmsprop_post=True`: RMSProp after the "
                "pseudoinverse divides the direction by its own running size, which undoes the shortening that "
                "the damping relies on, so rejected steps repeat; use rmsprop_post=False (RMSProp on the "
                "Jacobian) or adaptive_damping=False"
            )
        if self.rtol is None:  # numerically zero (truncpinv's default) where damping regularises residuals
            put("rtol", None if self.residuals and (self.adaptive_damping or self.damping > 0) else DEFAULT_RTOL)
        # the routes that can give M's columns
        materialised = callable(self.jacobian) or self.jacobian in ("auto", "hooks", "autograd", *FD_SCHEMES)
        if self.scale is None:  # not with ggn: its adaptive damping judges the cross-entropy, not the rows
            put("scale", bool(self.residuals and self.adaptive_damping and not self.rmsprop and materialised
                              and not self.ggn))  # fmt: skip
        put("scale", check_bool("scale", self.scale))
        if self.scale and not materialised:
            raise ValueError(
                f"`scale=True` needs the materialised Jacobian (its column norms), which `jacobian={self.jacobian!r}` "
                f"does not form; use jacobian='auto', 'hooks' or 'autograd', or scale=False"
            )
        if self.rmsprop and not self.rmsprop_post and self.jacobian == "matfree":
            raise ValueError(
                f"`rmsprop=True` rescales the columns of the materialised Jacobian (rmsprop_post=False), which "
                f"`jacobian={self.jacobian!r}` does not form; use jacobian='auto', 'hooks' or 'autograd', or "
                f"rmsprop_post=True (on the direction, with adaptive_damping=False)"
            )
        if self.max_retries is None:
            put("max_retries", LM_RETRIES if self.scale else 3)
        put("max_retries", check_nonneg_int("max_retries", self.max_retries))
        if self.scale and self.rmsprop:
            raise ValueError(
                "`scale=True` cannot be combined with `rmsprop=True`: both rescale the columns of the Jacobian; "
                "choose one"
            )
        if self.trust_radius is not None:
            put("trust_radius", check_positive_float("trust_radius", self.trust_radius))
        put("check_step", check_bool("check_step", self.check_step))
        put("seed", check_nonneg_int("seed", self.seed))
        if self.ggn is not None:
            put("ggn", check_bool("ggn", self.ggn))
        if self.ggn and not self.residuals:
            raise ValueError(
                "`ggn=True` makes the closure's cross-entropy losses into residual rows, so it needs residuals=True "
                "(the default with ggn=True); leave `residuals` unset"
            )
        if self.ggn and (self.variable_k or self.check_step or self.scale):
            raise ValueError(
                "`ggn=True` cannot be combined with variable_k, check_step or scale: they re-evaluate the rows "
                "without their graph, from which the cross-entropy rows are built, or rescale them; use `damping` "
                "(with adaptive_damping=True, the floor of the damping that judges the cross-entropy)"
            )
        if self.adaptive_damping and self.variable_k:
            raise ValueError(
                "`adaptive_damping=True` cannot be combined with `variable_k=True`: both decide the step from "
                "re-evaluated losses; choose one"
            )

    @property
    def default_lr(self) -> float:
        """The ``lr`` when none is given: the preset's with ``ggn``, :data:`RESIDUAL_LR` in residual mode with damping,
        else ``DEFAULT_LR``."""
        if self.ggn:
            return float(RULE_PRESET["lr"])
        return RESIDUAL_LR if self.residuals and (self.adaptive_damping or self.damping > 0) else DEFAULT_LR

    def rank_cap(self, rows: int) -> int | None:
        """The ``rank`` rule for a step with ``rows`` rows: a count, ``ceil(fraction * rows)``, or ``None``."""
        return rank_for(self.rank, rows)

    def rows(self) -> RowSpec:
        """What the closure returns (losses, residuals, cross-entropy losses as GGN rows) and how it becomes ``R``."""
        if self.ggn:
            return CrossEntropyRows()
        return RowSpec(residuals=self.residuals, kappa=self.kappa)

    def route(self) -> Linearizer | FiniteDifferences | GivenJacobian:
        """The route choice of ``jacobian`` (:class:`sven.linearize.Linearizer`), or its finite differences or
        callable (:mod:`sven.linearize.finite`)."""
        if callable(self.jacobian):
            return GivenJacobian(self.jacobian)
        if self.jacobian in FD_SCHEMES:
            return FiniteDifferences(self.jacobian)
        return Linearizer(
            self.jacobian,
            gram_allowed=isinstance(self.solver, truncpinv.Auto),
            rmsprop_on_jacobian=(self.rmsprop and not self.rmsprop_post) or bool(self.scale),
            chunk_size=self.chunk_size,
            seed=self.seed,
        )

    def preconditioner(self) -> RMSProp | ColumnScaling | None:
        """The RMSProp preconditioner, Moré's column scaling, or ``None``."""
        if self.scale:
            return ColumnScaling()
        if not self.rmsprop:
            return None
        return RMSProp(self.rmsprop_alpha, self.rmsprop_eps, self.rmsprop_momentum, self.rmsprop_post)

    def policy(self) -> Policy:
        """The step-control policy of the damping, variable-k, check-step and trust-radius options.

        With ``ggn`` and ``adaptive_damping``: :class:`sven.control.CrossEntropyDamping`, the damping never below
        its floor (``damping``, or from ``damping_start`` up to ``damping``), which judges each try on the
        cross-entropy (wrapped in a trust radius if one is set).
        """
        if self.ggn and self.adaptive_damping:
            start = self.damping_start
            low = start if start is not None and 0 < start < self.damping else None
            policy: Policy = CrossEntropyDamping(
                self.damping, int(self.max_retries or 0), start=low, judge_every=self.judge_every
            )
            return policy if self.trust_radius is None else TrustRadius(policy, self.trust_radius)
        return make_policy(
            damping=self.damping,
            adaptive_damping=bool(self.adaptive_damping),  # resolved from None in __post_init__
            max_retries=int(self.max_retries or 0),  # resolved from None in __post_init__
            variable_k=self.variable_k,
            check_step=self.check_step,
            trust_radius=self.trust_radius,
            # Levenberg--Marquardt with Moré's scaling lets the damping reach 0, as MINPACK: near a singular
            # solution the kept values shrink below any fixed floor (Powell's singular function)
            damping_floor=0.0 if self.scale else DAMPING_MIN,
        )


#: Options that apply to the whole step and therefore cannot differ between parameter groups.
GLOBAL_OPTIONS = (*(f.name for f in fields(SvenConfig)), "process_group", "control", "route")

#: The seed API's names (``sven.opt.Sven(wrapped, ...)``) of native options, for the error messages.
SEED_NAMES = {
    "k": "rank",
    "svd_mode": "solver",
    "use_rmsprop": "rmsprop",
    "alpha_rmsprop": "rmsprop_alpha",
    "eps_rmsprop": "rmsprop_eps",
    "mu_rmsprop": "rmsprop_momentum",
}

#: Options of a parameter group (defaults from the constructor, overridable per group; schedulers may change them).
GROUP_OPTIONS = ("lr", "momentum", "weight_decay", "nesterov")


def check_group(group: dict[str, Any]) -> dict[str, Any]:
    """Validate the per-group options present in ``group`` (``lr``, ``momentum``, ``weight_decay``, ``nesterov``)."""
    out = dict(group)
    if "lr" in out:
        out["lr"] = check_nonneg_float("lr", out["lr"])
    if "momentum" in out:
        out["momentum"] = check_unit_interval("momentum", out["momentum"])
    if "weight_decay" in out:
        out["weight_decay"] = check_nonneg_float("weight_decay", out["weight_decay"])
    if "nesterov" in out:
        out["nesterov"] = check_bool("nesterov", out["nesterov"])
    return out


def listed_params(params: Any) -> Any:
    """``params`` as a tensor or a list, each parameter group's ``params`` a list (in a copy of the group dict).

    Iterators (``model.parameters()``) can be read only once; the default rules
    count the parameters before :class:`torch.optim.Optimizer` reads them.
    """
    if isinstance(params, torch.Tensor):
        return params
    out = []
    for g in params:
        if isinstance(g, dict) and not isinstance(g.get("params"), (torch.Tensor, list, type(None))):
            g = {**g, "params": list(g["params"])}
        out.append(g)
    return out


def _count_params(params: Any) -> int:
    """The number of entries of ``params``: a tensor, a list of tensors or of parameter-group dicts.

    Iterators are never consumed (a group's ``params`` that is not a list counts as empty).
    """
    if isinstance(params, torch.Tensor):
        return params.numel()
    total = 0
    for p in params if isinstance(params, list) else []:
        if isinstance(p, dict):
            ps = p.get("params", [])
            total += _count_params(ps if isinstance(ps, (torch.Tensor, list)) else [])
        elif isinstance(p, torch.Tensor):
            total += p.numel()
    return total


def with_scale_rule(options: dict[str, Any], params: Any) -> dict[str, Any]:
    """The options with the default ``scale=None`` turned off above :data:`SCALE_MAX_PARAMS` parameters.

    Moré's scaling needs the column norms of the materialised Jacobian (memory
    ``N x P``); past that size the Gram route (memory ``N x N``) serves residual
    mode instead. ``scale=True`` still asks for it at any size.
    """
    if options.get("scale") is not None or _count_params(params) <= SCALE_MAX_PARAMS:
        return options
    return {**options, "scale": False}


def with_momentum_rule(options: dict[str, Any], params: Any, momentum: Any) -> dict[str, Any]:
    """The options with the default ``adaptive_damping=None`` turned off when heavy-ball momentum is asked for.

    Momentum adds the previous steps to every try of the Levenberg--Marquardt
    control, which then rejects good steps and raises its damping: in the grid
    run that chose the defaults (docs/results.md) every momentum variant with
    adaptive damping was worse than without, and momentum 0.9 stalled. So the
    default turns the adaptive damping off if ``momentum`` (the constructor's,
    or a parameter group's) is positive; ``adaptive_damping=True`` still combines them.
    """
    if options.get("adaptive_damping") is not None:
        return options
    groups = params if isinstance(params, list) else []
    asked = [momentum, *(g.get("momentum", 0) for g in groups if isinstance(g, dict))]
    if any(isinstance(m, numbers.Real) and not isinstance(m, bool) and float(m) > 0 for m in asked):
        return {**options, "adaptive_damping": False}
    return options
