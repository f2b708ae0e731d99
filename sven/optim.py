r"""The Sven optimizer as a :class:`torch.optim.Optimizer`: parameter groups, state, and the step as a pipeline."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from . import distributed as dist_
from . import functional as SF
from . import tiny, update
from ._compile import eager
from ._step_hooks import observed_step
from ._validation import (
    check_not_inference_mode,
    check_option_names,
    closure_errors,
    user_stacklevel,
    warn_ignored_grads,
)  # fmt: skip
from .config import (
    GLOBAL_OPTIONS,
    GROUP_OPTIONS,
    SEED_NAMES,
    SvenConfig,
    check_group,
    listed_params,
    with_momentum_rule,
    with_scale_rule,
)
from .control import Evaluator, Policy
from .factored_model import with_factored_model
from .factorize import factorize, solver_for_step
from .info import StepFault, StepInfo
from .linearize import DataParallel, Unsupported
from .loss_rows import RULE_PRESET
from .loss_rule import CrossEntropyRows, decided, rule_weight_decay, with_ggn_rule
from .params import ParamBlock, blocks_of_groups, closure_mode
from .sequence_rule import apply_sequence_rule, recognise_sequence
from .step_context import step_context

__all__ = ["GLOBAL_OPTIONS", "StepInfo", "Sven"]

_OPTIONS = frozenset(SvenConfig.__dataclass_fields__)
#: Options read from :attr:`Sven.config` at every step: assigning one (``opt.rtol = 1e-3``) acts at the next step.
_ASSIGNABLE = frozenset({"rank", "rtol", "atol", "on_nonfinite"})
#: Keys of the optimizer-wide state saved under ``state_dict()["sven"]``.
_COUNTERS = ("steps", "skipped_steps", "rejected_steps")


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

    Usage::

        opt = sven.Sven(model.parameters())  # the defaults: lr=0.5, rank=None, rtol=1e-4, adaptive damping
        losses = opt.step(lambda: per_sample_loss(model(x), y))  # shape (B,), not reduced

    The closure must return one loss per sample (``reduction="none"``) and
    must not call ``backward()``: the optimizer differentiates its output.

    **Classifiers** (``ggn``, :mod:`sven.loss_rule`): if the closure returns
    ``F.cross_entropy(logits, y, reduction="none")`` at the first step and no
    option that chooses the rows, the step control or ``lr`` was given, Sven
    uses the generalised Gauss--Newton rows of :func:`sven.losses.cross_entropy`
    with :data:`sven.loss_rows.RULE_PRESET` (``opt.config.ggn`` and ``last_step.ggn``
    say so). ``ggn=False`` keeps the per-sample losses; ``ggn=True`` asks for the rows.
    Per-sequence token cross-entropy (language models) gets :mod:`sven.sequence_rule`.

    **A step is a pipeline** of parts that can be passed in directly:

    1. *linearise* (``route``, :mod:`sven.linearize`): run the closure once and get
       the rows and their Jacobian (the Gram route, materialised, matrix-free;
       :class:`~sven.linearize.DataParallel` across ranks);
    2. *precondition* (:mod:`sven.precondition`, RMSProp) and *factorise*
       (:mod:`sven.factorize`: a :mod:`truncpinv` solver, or the eigendecomposition of ``K``);
    3. *control the step* (``control``, :mod:`sven.control`): the direction, damping,
       rejection, trust radius, variable-k;
    4. *apply* it to each parameter group with its ``lr``.

    **Two forms.** ``sven.Sven(wrapped, lr, k, rtol, ...)`` with a :class:`sven.nn.SvenWrapper`
    builds the seed-compatible :class:`sven.opt.WrappedSven` (a subclass).

    **Parameter groups.** ``lr``, ``momentum``, ``weight_decay`` and
    ``nesterov`` are per group (the constructor gives the defaults, so
    schedulers that cycle momentum work); every other option is global (one
    Jacobian, one pseudoinverse).

    **No autograd context needed.** ``step`` works inside ``torch.no_grad()``;
    the re-evaluations of step control run with grad mode on but the
    parameters' ``requires_grad`` off, so a closure may differentiate with
    respect to its inputs (physics-informed residuals, gradient penalties).

    **Faults never corrupt the model.** If the residuals, the Jacobian or the
    direction contain NaN/Inf, or the solver fails, the parameters are left
    bit-identical: with ``on_nonfinite="skip"`` the step is skipped, counted in
    :attr:`skipped_steps`, and a ``RuntimeWarning`` is issued; with ``"raise"``
    a ``FloatingPointError`` is raised.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (per group; default 0.5, or 1 in residual mode with damping).
        momentum: heavy-ball momentum :math:`\mu \in [0, 1)` on the Sven direction (per group; default 0,
            and giving it, like ``nesterov``, turns the loss and sequence rules off;
            :mod:`sven.update`): :math:`b \leftarrow \mu b + d`, :math:`\theta \leftarrow \theta - \eta b`.
        weight_decay: decoupled weight decay :math:`w` (per group, as AdamW; default 0, or the loss rule's ``1e-3``):
            :math:`\theta \leftarrow \theta - \eta w \theta`.
        nesterov: Nesterov momentum (per group): the step is :math:`d + \mu b`.
        control: a :class:`sven.control.Policy`, instead of the options
            ``damping``, ``adaptive_damping``, ``max_retries``, ``variable_k``,
            ``check_step`` and ``trust_radius`` (an error with it, as ``momentum > 0`` with ``TrustRegion``).
        route: a route name (as ``jacobian``) or a :class:`sven.linearize.Route` object.
        process_group: data-parallel Sven on :mod:`torch.distributed`: each
            rank's closure covers its shard of the batch (``None``: the default
            group when one is initialised). Parameters are broadcast from rank 0.
        **options: the keyword options of :class:`sven.config.SvenConfig`:
            ``rank`` (an int, a fraction of ``B``, or ``None``: the default), ``rtol``
            (default ``1e-4``), ``atol``, ``kappa``, ``solver``, ``residuals``,
            ``variable_k``, ``rmsprop``, ``rmsprop_alpha``, ``rmsprop_eps``,
            ``rmsprop_momentum``, ``rmsprop_post``, ``jacobian`` (``"auto"``,
            ``"gram"``, ``"hooks"``, ``"autograd"``, ``"matfree"``, ``"2-point"``, ``"3-point"`` or a callable),
            ``on_nonfinite``, ``damping``, ``adaptive_damping`` (default: on),
            ``max_retries``, ``trust_radius``, ``check_step``, ``seed``,
            ``chunk_size``, ``ggn``. ``docs/sven.md`` explains each.

    Attributes:
        last_step: :class:`StepInfo` of the last step.
        config: the validated :class:`~sven.config.SvenConfig`.
        solver: the resolved :mod:`truncpinv` solver object.
        route, control, precondition: the parts of the pipeline.
    """

    _forms: ClassVar[list[tuple[type, type]]] = []

    def __init_subclass__(cls, form: type | None = None, **kwargs: Any) -> None:
        """``class X(Sven, form=T)``: ``sven.Sven(t, ...)`` with a ``T`` as first argument builds an ``X``."""
        super().__init_subclass__(**kwargs)
        if form is not None:
            Sven._forms.append((form, cls))

    def __new__(cls, params: Any = None, *args: Any, **kwargs: Any) -> Sven:
        if cls is Sven:
            for form, sub in Sven._forms:
                if isinstance(params, form):
                    return super().__new__(sub)  # type: ignore[no-any-return]
        return super().__new__(cls)  # type: ignore[no-any-return]

    def __init__(
        self,
        params: Any,
        lr: float | None = None,
        *args: Any,
        momentum: float | None = None,
        weight_decay: float | None = None,
        nesterov: bool | None = None,
        control: Policy | None = None,
        route: Any = None,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        _check_arguments(args, control, options)
        check_option_names(options, (*_OPTIONS, *GROUP_OPTIONS, "control", "route", "process_group"), SEED_NAMES)
        if isinstance(route, str):
            if "jacobian" in options:
                raise ValueError("pass the route once: `route` or `jacobian`, not both")
            options["jacobian"] = route
            route = None
        params = listed_params(params)  # groups' iterators listed once, in copies: the rules below count them
        options = with_ggn_rule(options, params, explicit=any(v is not None for v in (lr, control, momentum, nesterov)))
        weight_decay, self._weight_decay_given = rule_weight_decay(options, params, weight_decay)
        self._options = options = with_scale_rule(with_momentum_rule(options, params, momentum), params)
        self.config = cfg = SvenConfig(**options)
        self.solver = cfg.solver
        self.rows = cfg.rows()
        self.route = route if route is not None else cfg.route()
        self.control = control if control is not None else cfg.policy()
        self.precondition = cfg.preconditioner()
        self.process_group = process_group
        self.last_step: StepInfo | None = None
        self._counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        if cfg.jacobian == "matfree" and dist_.world_size(process_group) > 1:
            raise ValueError(
                "`jacobian='matfree'` does not support data-parallel training; use jacobian='auto' (the Gram route, "
                "or the materialised Jacobian gathered across ranks)"
            )
        lr = cfg.default_lr if lr is None else lr
        defaults = {"lr": lr, "momentum": 0.0 if momentum is None else momentum, "weight_decay": weight_decay}
        super().__init__(params, check_group({**defaults, "nesterov": False if nesterov is None else nesterov}))
        group = dist_.resolve_group(process_group)
        if group is not None and dist_.world_size(group) > 1:
            dist_.broadcast_parameters_([p for g in self.param_groups for p in g["params"]], src=0, group=group)

    def __getattr__(self, name: str) -> Any:
        # the options read as attributes (``opt.rank``, ``opt.rtol``, ...)
        cfg = self.__dict__.get("config")
        if cfg is not None and name in _OPTIONS:
            return getattr(cfg, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if not hasattr(type(self), name):  # an option: acts at the next step, or raises saying how to change it
            name, value = _assigned_option(self.__dict__.get("config"), name, value)
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; only ``lr``, ``momentum``, ``weight_decay`` and ``nesterov`` may be set per group."""
        bad = sorted(k for k in param_group if k in GLOBAL_OPTIONS)
        if bad:
            raise ValueError(
                f"{', '.join(f'`{k}`' for k in bad)} cannot be set per parameter group: Sven computes one "
                f"pseudoinverse for all parameters, so only {', '.join(f'`{k}`' for k in GROUP_OPTIONS)} are per "
                f"group; pass it to the constructor"
            )
        super().add_param_group(_check_momentum(self, check_group(param_group)))

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict plus ``"sven"``: the counters and the step control's state.

        ``"sven"`` holds ``steps``, ``skipped_steps``, ``rejected_steps``, the step control's state (``damping``,
        ``nu``, ...) and ``rule`` (what the first step decided). Randomized solvers are seeded from ``seed`` and the
        step counter, so no generator state is needed.
        """
        sd = super().state_dict()
        sd["sven"] = {**self._counters, **self.control.state_dict(), **_rule_state(self)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (every ``"sven"`` entry is optional)."""
        sd = dict(state_dict)
        extra = sd.pop("sven", None)
        super().load_state_dict(sd)
        if extra is not None:
            self._counters = {k: int(extra.get(k, 0)) for k in _COUNTERS}
            _restore_rule(self, extra)
            self.control.load_state_dict(extra)

    def __getstate__(self) -> dict[str, Any]:
        mine = {k: self.__dict__[k] for k in _PICKLED if k in self.__dict__}
        return {**super().__getstate__(), **mine, "process_group": None}  # a process group cannot be pickled

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of non-finite values or a solver failure."""
        return self._counters["skipped_steps"]

    @property
    def rejected_steps(self) -> int:
        """Number of tries rejected by the step control (each cost one forward pass)."""
        return self._counters["rejected_steps"]

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Linearise ``closure``, factorise, control and apply the Sven step.

        Args:
            closure: re-evaluates the model and returns the per-sample losses
                (shape ``(B,)``), or the residuals when ``residuals=True``.
                Data-parallel: this rank's shard of the batch.

        Returns:
            The closure's output (detached; this rank's rows).
        """
        closure = _check_step_call(closure)
        if type(self) is Sven and (tiny_rows := tiny.step(self, closure)) is not None:  # (a subclass may extend it)
            return tiny_rows  # a tiny dense least-squares step, the same in NumPy (sven/tiny.py)
        blocks = blocks_of_groups([_check_momentum(self, g) for g in self.param_groups])  # a scheduler may set it
        if not blocks:
            raise ValueError("Sven has no parameter that requires grad to optimise")
        group = dist_.resolve_group(self.process_group)
        group = group if group is not None and dist_.world_size(group) > 1 else None
        route = self.route if group is None else DataParallel(self.route, group)
        params = [b.param for b in blocks]
        warn_ignored_grads(params)
        probe = CrossEntropyRows(fallback=self.rows) if self.config.ggn is None else None  # sven/loss_rule.py
        spec = probe or self.rows
        seen: dict[str, bool] = {}
        with eager():  # compiled models run eagerly (sven/_compile.py): the closure and its re-evaluations alike
            with torch.enable_grad(), closure_errors(params):  # works inside the caller's torch.no_grad()
                lin = route(_probed(closure, seen) if probe is not None else closure, params, spec)
            if isinstance(lin, Unsupported):
                raise ValueError(f"the route does not apply to this model: {lin.reason}")
            if probe is not None:
                blocks = _decide(self, probe.found, seen.get("sequence", False)) or blocks
            R, M = self.rows.residualize(lin.rows, lin.jacobian)

            def rows_after() -> torch.Tensor:
                with closure_mode(params):  # derivatives the closure takes itself work; none for the params
                    rows = self.rows.evaluated(closure()).detach()  # the rule's: the losses (CrossEntropyDamping)
                return rows if group is None else dist_.all_gather_rows(rows.contiguous(), group)

            losses = spec.output(lin.rows)  # the cross-entropy losses (this rank's), not their rows
            if group is not None and losses is not lin.rows:
                losses = dist_.all_gather_rows(losses.contiguous(), group)
            self._descend(losses, R, M, blocks, evaluate=Evaluator(rows_after, self.rows), method=lin.method)
        return spec.output(lin.local)

    @torch.no_grad()
    def _descend(
        self, losses: torch.Tensor, R: torch.Tensor, M: Any, blocks: list[ParamBlock], *, evaluate: Any, method: str
    ) -> StepInfo:
        """Factorise ``M``, let the step control choose and apply the direction; record :attr:`last_step`."""
        self._counters["steps"] += 1
        info = StepInfo(losses=losses, jacobian_method=method, damping=self.control.damping, ggn=bool(self.config.ggn))
        self.last_step = info
        try:
            # both checks come first: a pass over M costs about 1/B of its factorisation
            if not SF.all_finite(R):
                raise StepFault("the residuals")
            if not SF.all_finite(M if isinstance(M, torch.Tensor) else M.gram):
                raise StepFault("the Jacobian")
            pre = self.precondition.jacobian(M, blocks, self.state) if self.precondition is not None else M
            F, exact = _factorize(self, pre, R.numel())
            info.singular_values, info.rank, info.cutoff = F.singular_values, F.rank, F.cutoff
            info._gradient_cosine = cos = SF.gradient_cosine(F, R)
            decay = update.decay(blocks)
            ctx = step_context(
                F, R, M, blocks,
                state=self.state, precondition=self.precondition,
                loss=functools.cache(lambda: self.rows.mean_loss(losses)),  # (the policy may ask more than once)
                evaluate=evaluate, exact=exact, cosine=cos,
                reject=lambda: self._counters.__setitem__("rejected_steps", self._counters["rejected_steps"] + 1),
            )  # fmt: skip
            out = self.control.run(with_factored_model(ctx, blocks, self.precondition) if self.config.ggn else ctx)
        except StepFault as fault:
            self._fault(info, losses, fault)
            return info
        update.commit(blocks, self.state, out.direction)  # momentum buffers: only for a step that was kept
        if decay is not None and out.direction is not None:  # weight decay, outside the judged step (sven/update.py)
            update.apply_decay(blocks, decay)
        info.record(out, [(b.start, b.stop, b.lr) for b in blocks])
        return info

    def _solver_for_step(self) -> Any:
        return solver_for_step(self.solver, self.config.seed, self._counters["steps"])

    def _fault(self, info: StepInfo, losses: torch.Tensor, fault: StepFault) -> None:
        _skip(self.config, self._counters, info, losses, fault)


#: ``torch.optim``'s step wrapper, skipped while no profiler runs and no step hook is registered (sven/_step_hooks.py)
Sven.step = observed_step(Sven.step)  # type: ignore[method-assign]


def _check_step_call(closure: Callable[[], torch.Tensor] | None) -> Callable[[], torch.Tensor]:
    """``closure``, checked: ``step`` needs one, and autograd (not ``torch.inference_mode()``)."""
    if closure is None:
        raise ValueError(
            "Sven.step needs a closure that re-evaluates the model and returns the per-sample losses, "
            "e.g. `opt.step(lambda: ((model(x) - y) ** 2).sum(dim=-1))`"
        )
    check_not_inference_mode()
    return closure


def _probed(closure: Callable[[], torch.Tensor], seen: dict[str, bool]) -> Callable[[], torch.Tensor]:
    """``closure``, also noting in ``seen["sequence"]`` whether its output is per-sequence token cross-entropy."""

    def probed() -> torch.Tensor:
        out = closure()
        seen["sequence"] = recognise_sequence(out)
        return out

    return probed


def _decide(opt: Sven, found: bool, sequence: bool, *, groups: bool = True) -> list[ParamBlock] | None:
    """The first step's decision of the loss rule and the sequence rule (``sven/loss_rule.py``,
    ``sven/sequence_rule.py``): set ``opt.config`` (and its rows and control); the new blocks if groups changed.
    ``groups=False`` (a restored decision, :func:`_restore_rule`) leaves the loaded groups' values alone."""
    options, blocks, opt._rule = decided(opt._options, found), None, "ggn" if found else "none"
    if not found and sequence:
        options = apply_sequence_rule(opt._options, opt.param_groups if groups else [], opt.config.default_lr)
        blocks = blocks_of_groups(opt.param_groups)
        opt._rule = "sequence" if options.get("adaptive_damping") is False else "none"  # not with a scheduler
    before, opt.config = opt.config, SvenConfig(**options)
    cfg = opt.config
    if cfg.ggn or cfg.adaptive_damping != before.adaptive_damping:
        opt.rows, opt.control = cfg.rows(), cfg.policy()
    if cfg.ggn and groups:  # the rule acts only when no ``lr`` was given: its ``lr`` (and weight decay, if none)
        for g in [opt.defaults, *opt.param_groups]:
            g["lr"] = cfg.default_lr
            if not opt._weight_decay_given:
                g["weight_decay"] = RULE_PRESET["weight_decay"]
        blocks = blocks_of_groups(opt.param_groups)
    return blocks


#: What ``pickle`` keeps of a :class:`Sven` besides ``torch.optim``'s state (a process group cannot be pickled).
_PICKLED = ("config", "solver", "rows", "route", "control", "precondition", "last_step", "_counters", "_options",
            "_weight_decay_given", "_rule")  # fmt: skip

#: ``state_dict()["sven"]["rule"]``: what the first step decided (absent before it).
_RULES = {"none": 0.0, "ggn": 1.0, "sequence": 2.0}


def _rule_state(opt: Sven) -> dict[str, float]:
    """The decision of the first step, for :meth:`Sven.state_dict` (nothing while it is not made)."""
    rule = opt.__dict__.get("_rule")
    return {} if rule is None else {"rule": _RULES[rule]}


def _restore_rule(opt: Sven, extra: dict[str, Any]) -> None:
    """Make a saved decision again on an optimizer that has not decided yet, so that the step control the
    decision builds is the one whose state is loaded next; the loaded groups keep their values."""
    if opt.config.ggn is not None or "rule" not in extra:  # (decided already: ggn is True or False)
        return
    rule = {v: k for k, v in _RULES.items()}.get(float(extra["rule"]))
    if rule is not None:
        _decide(opt, rule == "ggn", rule == "sequence", groups=False)


def _factorize(opt: Sven, pre: Any, rows: int) -> tuple[Any, Callable[[], Any]]:
    """The step's factorisation of ``pre`` (the normal equations where the policy's expected damping allows, the
    Cholesky directions where all its directions are damped: :func:`sven.factorize.factorize`), and the SVD of
    ``pre`` for a damping the normal equations cannot resolve."""
    cfg = opt.config
    rank, seed = cfg.rank_cap(rows), (cfg.seed, opt._counters["steps"])
    hint = opt.control.expected_damping() if isinstance(opt.control, Policy) else None
    floor = opt.control.smallest_damping() if isinstance(opt.control, Policy) else None
    whole = bool(cfg.ggn)  # the GGN rows' damped step cuts nothing (sven.damped_gram.Untruncated)
    F = factorize(pre, opt.solver, rank=rank, rtol=cfg.rtol, atol=cfg.atol, damping=hint, seed=seed, floor=floor,
                  untruncated=whole)  # fmt: skip
    return F, lambda: factorize(pre, opt.solver, rank=rank, rtol=cfg.rtol, atol=cfg.atol, seed=seed)


def _check_momentum(opt: Sven, group: dict[str, Any]) -> dict[str, Any]:
    """``group``, unless its momentum (or ``opt``'s default) is positive and ``opt.control`` cannot carry momentum
    (``takes_momentum = False``: :class:`sven.trust_region.TrustRegion`): then a ValueError naming both. The
    group is named by its index in ``opt.param_groups``, or the index it would get there."""
    mu = float(group.get("momentum", opt.defaults.get("momentum", 0.0)))
    if mu > 0 and not getattr(opt.control, "takes_momentum", True):
        i = next((j for j, g in enumerate(opt.param_groups) if g is group), len(opt.param_groups))
        raise ValueError(
            f"`momentum` must be 0 with `control={type(opt.control).__name__}()`, got {mu:g} (parameter group {i}): "
            f"a trust-region step is the damped step whose length is the radius, and momentum adds the previous "
            f"steps to every try, so no try is bounded by the radius or predicted by the model; use momentum=0 "
            f"with this `control`, or leave out `control` (momentum turns the adaptive damping off)"
        )
    return group


def _check_arguments(args: tuple[Any, ...], control: Policy | None, options: dict[str, Any]) -> None:
    """``sven.Sven(params, lr, *, ...)`` takes no further positional argument (the seed form needs a wrapper),
    and a ``control`` object comes without the options it replaces."""
    _check_control(control, options)
    if args:
        raise TypeError(
            f"sven.Sven(params, lr, *, rank=..., rtol=..., ...) takes its options as keywords, got "
            f"{', '.join(repr(a) for a in args)}; the positional form Sven(wrapped, lr, k, rtol) needs a "
            f"sven.nn.SvenWrapper as first argument"
        )


#: The options that build the step-control policy (:meth:`SvenConfig.policy`); a ``control`` object replaces them.
_POLICY_OPTIONS = ("damping", "adaptive_damping", "max_retries", "variable_k", "check_step", "trust_radius")


def _check_control(control: Policy | None, options: dict[str, Any]) -> None:
    """A ``control`` policy and the options it replaces are not given together (they would be ignored)."""
    given = [k for k in _POLICY_OPTIONS if k in options]
    if control is not None and given:
        raise ValueError(
            f"`control` replaces the step-control options, so {', '.join(f'`{k}`' for k in given)} would be "
            f"ignored; configure the policy object instead (e.g. sven.control.AdaptiveDamping(start=...), "
            f"TrustRegion(max_retries=...)), or leave out `control`"
        )


def _skip(cfg: SvenConfig, counters: dict[str, int], info: StepInfo, losses: torch.Tensor, fault: StepFault) -> None:
    """A step that cannot be taken: count and report it (``on_nonfinite``), or explain a negative loss."""
    if cfg.kappa != 2.0 and not cfg.residuals and bool((losses < 0).any()):
        raise ValueError(
            f"kappa={cfg.kappa} needs non-negative losses (R = loss ** (kappa/2)), but a loss is "
            f"{float(losses.min()):.3g}; use kappa=2 for losses that can be negative"
        )
    info.skipped = True
    counters["skipped_steps"] += 1
    msg = _skip_message(fault, counters)
    if cfg.on_nonfinite == "raise":
        raise FloatingPointError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())


def _assigned_option(cfg: SvenConfig | None, name: str, value: Any) -> tuple[str, Any]:
    """``opt.<name> = value`` on an option: a new config if it is read at every step, else an error saying how."""
    if cfg is not None and name in _ASSIGNABLE:
        return "config", dataclasses.replace(cfg, **{name: value})  # validated again
    if name in GROUP_OPTIONS:
        raise AttributeError(
            f"`{name}` is a per-group option: assigning `opt.{name}` would change nothing; set "
            f"`opt.param_groups[i][{name!r}]` (every group: `for g in opt.param_groups: g[{name!r}] = value`)"
        )
    if cfg is not None and name in _OPTIONS and name != "solver":
        raise AttributeError(
            f"`{name}` is fixed when the optimizer is built (only {sorted(_ASSIGNABLE)} and `solver` may be "
            f"assigned); pass `{name}=...` to sven.Sven(...)"
        )
    return name, value


def _skip_message(fault: StepFault, counters: dict[str, int]) -> str:
    """The warning (or error) of a skipped step, with the number of steps skipped so far (each one is shown)."""
    what = fault.what if fault.fault else f"NaN or Inf in {fault.what}"
    count = f"{counters['skipped_steps']} of {counters['steps']} steps skipped so far"
    return f"Sven step skipped ({count}): {what}; the parameters were left unchanged"
