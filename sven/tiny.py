r"""The lean step of a tiny dense least-squares problem: the same step, without the machinery that cannot apply.

A curve fit (:func:`sven.least_squares`, :func:`sven.curve_fit`) has a handful of parameters and a few hundred
residuals: its Sven step costs microseconds of arithmetic, and the general pipeline of :class:`sven.Sven`
(route choice, the loss rule's probe, preconditioner objects, the :mod:`truncpinv` result with its
validation, momentum and weight-decay stages, torch calls of 3-10 us each) cost about a millisecond around
it. :func:`step` runs the same step directly when nothing of that machinery can apply, and hands every other
case back (``None``):

* :class:`sven.Sven` itself (a subclass keeps the general step, which it may extend), in
  residual mode with the loss rule decided off, one process, truncpinv's ``Auto`` solver without a ``rank``
  cap, no RMSProp, no momentum and no weight decay in any group, the step control exactly
  :class:`sven.control.AdaptiveDamping` or :class:`sven.trust_region.TrustRegion`, and float32 or float64
  CPU parameters. That decision, the parameter blocks, NumPy views of the parameters, the columns' learning
  rates and the cut-off's ``rtol`` are worked out once and kept (:class:`TinyPlan`) until the
  :func:`signature` of the groups and options changes: a new ``lr`` or option, a parameter added, frozen or
  given new storage;
* after the linearisation (the configured route, unchanged: autograd, finite differences or a callable
  Jacobian, :mod:`sven.linearize.finite`), a materialised CPU Jacobian in float32 or float64 of at most
  :data:`TINY_COLUMNS` columns and :data:`TINY_ENTRIES` entries (anything else goes to the general stage).

The step is the general one, computed in NumPy on views of the same memory: Moré's column scaling
(:class:`sven.precondition.ColumnScaling`, the same state buffer ``col_scale``), one float64 LAPACK SVD
(``gesdd``, as ``numpy.linalg.svd`` without its dispatch) of
:math:`\hat M = M D^{-1} = U \Sigma V^\top` (what :mod:`sven.factorize` computes for at most 10 columns), the
truncation :math:`\sigma_i > \max(atol, rtol\,\sigma_1)`, and the step control's tries
(:func:`sven.tiny_control.run`: the twins of ``AdaptiveDamping.run`` and ``TrustRegion.run`` on the arrays,
with the policy objects' own state and update functions) on the directions

.. math::

    d_\lambda = D^{-1} V \frac{\Sigma}{\Sigma^2 + \lambda\sigma_1^2} U^\top R, \qquad
    \text{predicted change } M (\eta\, d_\lambda).

The policy objects, their state and their decisions are the general path's; only the arithmetic around
them is leaner, so the iterates agree with the general path's to round-off (``tests/test_tiny.py`` and
``tests/test_tiny_control.py`` check it on random problems for both policies).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg.lapack as lapack
import torch

import truncpinv

from . import distributed as dist_
from . import tiny_control
from ._arrays import finite_array, squared_norm_of, vector_norm
from ._compile import eager
from ._validation import closure_errors, warn_ignored_grads
from .control import AdaptiveDamping, Evaluator
from .factorize import DIRECT_SIDE
from .functional import HOST_SMALL, host
from .info import StepFault, StepInfo
from .linearize import Unsupported
from .linearize.finite import NONFINITE, GivenJacobian
from .params import ParamBlock, _set_grad_enabled, blocks_of_groups, closure_mode
from .precondition import ROUND_OFF, ColumnScaling, column_norms
from .tiny_control import Lean
from .trust_region import TrustRegion

__all__ = ["TINY_COLUMNS", "TINY_ENTRIES", "TinyFactors", "TinyPlan", "applies", "plan", "step"]

#: At most this many parameters (the columns of ``M``): :data:`sven.factorize.DIRECT_SIDE`'s direct SVD.
TINY_COLUMNS = DIRECT_SIDE
#: At most this many entries of ``M`` (``N * P``): where the general stages also compute in NumPy on views
#: (:data:`sven.functional.HOST_SMALL`), so that both paths round alike.
TINY_ENTRIES = HOST_SMALL
_POLICIES = (AdaptiveDamping, TrustRegion)
#: :data:`sven.precondition.ROUND_OFF` times the machine epsilon, in each dtype (the cut of round_off_columns)
_ROUND_OFF_CUT = {np.dtype(t).char: t(ROUND_OFF * float(np.finfo(t).eps)) for t in (np.float64, np.float32)}
_DTYPES = (torch.float64, torch.float32)
_F64 = np.dtype(np.float64)  # (a builtin dtype is one object: compared by identity)
try:  # ``np.einsum`` without its Python wrapper (which calls this where no ``optimize`` is asked for)
    from numpy._core.multiarray import c_einsum as _einsum
except ImportError:  # pragma: no cover - NumPy 1.x
    _einsum = np.einsum
_DIST = dist_.dist.is_available()  # (torch.distributed is compiled in: fixed for the process)
_INITIALIZED = dist_.dist.is_initialized if _DIST else None
_EPS = {np.dtype(t).char: float(np.finfo(t).eps) for t in (np.float64, np.float32)}  # (by type code: cheap to hash)


class TinyFactors:
    """The kept factors of the scaled Jacobian, as the two policies read a :class:`truncpinv.TruncatedPinv`.

    Attributes:
        arrays: ``(u, s, v)``: the kept singular triplets, ``(N, r)``, ``(r,)``, ``(P, r)`` NumPy arrays.
        U, S, V: the same as tensors over their memory (made on first use: the policies read ``arrays``).
        singular_values: every singular value computed (a tensor).
        rank, cutoff: the kept count and the cut-off :math:`\\max(atol, rtol\\,\\sigma_1)`.
    """

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], values: np.ndarray, cutoff: float) -> None:
        self.arrays, self.rank, self.cutoff = arrays, arrays[1].shape[0], cutoff
        self.singular_values = torch.from_numpy(values)
        self.dtype = torch.float64 if values.dtype is _F64 else torch.float32  # (the tensor's: float64 or float32)

    @property
    def U(self) -> torch.Tensor:
        return torch.from_numpy(self.arrays[0])

    @property
    def S(self) -> torch.Tensor:
        return torch.from_numpy(self.arrays[1])

    @property
    def V(self) -> torch.Tensor:
        return torch.from_numpy(self.arrays[2])


def applies(opt: Any) -> bool:
    """Whether ``opt``'s configuration allows the lean step (module docstring; the Jacobian is checked later)."""
    cfg = opt.config
    return (
        cfg.residuals
        and cfg.ggn is False
        and cfg.rank is None
        and type(opt.control) in _POLICIES
        and isinstance(opt.solver, truncpinv.Auto)
        and (opt.precondition is None or isinstance(opt.precondition, ColumnScaling))
        and all(g.get("momentum", 0.0) == 0.0 and g.get("weight_decay", 0.0) == 0.0 for g in opt.param_groups)
        and dist_.world_size(opt.process_group) <= 1
    )


@dataclass(eq=False)
class TinyPlan:
    """What the lean step reads from the optimizer's configuration and groups, worked out once (:func:`plan`).

    Attributes:
        key: the :func:`signature` it was made for; a step whose signature differs makes a new plan.
        refs: the objects whose ids ``key`` holds, kept alive so that no id is reused while the plan is.
        lean: whether the lean step applies: :func:`applies`, and at least one column, every parameter that
            requires grad a float32 or float64 CPU tensor.
        blocks, params: the parameter blocks (:func:`sven.params.blocks_of_groups`) and their tensors.
        targets: the parameters detached (the same storage and version counter: written in place without
            autograd, the change is seen by any graph that saved them).
        views: NumPy views of the parameters (their memory: valid while their storage is, which ``key`` checks).
        spans: ``(start, stop, lr)`` of each block, as :class:`~sven.info.StepInfo` records them.
        atol: the absolute cut-off (``atol``, a float).
        rtols: the relative cut-off per Jacobian shape and dtype (``rtol``, or truncpinv's default).
        lrs: the learning rate of every column per dtype (``None``: all are 1).
        scales: each block's ``col_scale`` state tensor and its flat NumPy view, renewed when the state is.
    """

    key: tuple[Any, ...]
    refs: list[Any]
    lean: bool
    blocks: list[ParamBlock] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    spans: list[tuple[int, int, float]] = field(default_factory=list)
    atol: float = 0.0
    rtols: dict[tuple[int, int, str], float] = field(default_factory=dict)
    lrs: dict[str, np.ndarray | None] = field(default_factory=dict)
    scales: list[tuple[torch.Tensor, np.ndarray] | None] = field(default_factory=list)

    def rtol(self, opt: Any, shape: tuple[int, int], dtype: Any) -> float:
        """The ``rtol`` of :func:`sven.factorize.factorize` for an ``M`` of this shape and dtype."""
        key = (shape[0], shape[1], dtype.char)  # (a dtype's type code hashes faster than the dtype)
        if key not in self.rtols:
            rtol = opt.config.rtol
            torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
            self.rtols[key] = float(truncpinv.default_rtol(shape, torch_dtype) if rtol is None else rtol)
        return self.rtols[key]

    def column_lrs(self, dtype: Any) -> np.ndarray | None:
        """Every column's learning rate in ``dtype`` (``None`` where all are 1: ``d`` needs no scaling)."""
        code = dtype.char  # (hashes faster than the dtype)
        if code not in self.lrs:
            lrs = np.concatenate([np.full(b.stop - b.start, b.lr, dtype=dtype) for b in self.blocks])
            self.lrs[code] = None if bool((lrs == 1.0).all()) else lrs
        return self.lrs[code]

    def scale_buffers(self, state: Any) -> list[np.ndarray]:
        """Flat NumPy views of the blocks' ``col_scale`` state (created as zeros, as the general step does)."""
        out = []
        for i, b in enumerate(self.blocks):
            st = state[b.param]
            t = st.get("col_scale")
            cached = self.scales[i]
            if t is None or cached is None or cached[0] is not t:
                if t is None:
                    t = st["col_scale"] = torch.zeros_like(b.param, memory_format=torch.contiguous_format)
                cached = self.scales[i] = (t, t.view(-1).numpy())
            out.append(cached[1])
        return out

    def flat(self) -> np.ndarray:
        """The parameters' values as one float64 vector (a view where there is one float64 parameter)."""
        if len(self.views) == 1 and self.views[0].dtype is _F64:
            return self.views[0].reshape(-1)
        return np.concatenate([v.reshape(-1).astype(np.float64) for v in self.views])


def signature(opt: Any) -> tuple[Any, ...]:
    """What a :class:`TinyPlan` depends on: :func:`applies` and the pipeline's objects (by identity), the
    distributed world, each group's ``lr``, ``momentum``, ``weight_decay`` and parameters (by identity,
    ``requires_grad``, shape, dtype, device and storage). Assigning an option (``opt.rtol = ...``) makes a new
    ``config``."""
    group = opt.process_group
    key: list[Any] = [id(applies), id(opt.config), id(opt.control), id(opt.solver), id(opt.precondition), id(group)]
    key.append(dist_.world_size(group) if _INITIALIZED is not None and _INITIALIZED() else 1)  # (1: not initialised)
    for g in opt.param_groups:
        ps = g["params"]
        key += (g["lr"], g.get("momentum", 0.0), g.get("weight_decay", 0.0), len(ps))
        for p in ps:
            key += (id(p), p.requires_grad, p.shape, p.dtype, p.device, p.data_ptr())
    return tuple(key)


def _referents(opt: Any) -> list[Any]:
    """The objects whose ids :func:`signature` holds (kept alive with the plan, so that no id is reused)."""
    refs = [applies, opt.config, opt.control, opt.solver, opt.precondition, opt.process_group]
    return refs + [p for g in opt.param_groups for p in g["params"]]


def plan(opt: Any) -> TinyPlan:
    """``opt``'s :class:`TinyPlan`: the cached one while :func:`signature` is unchanged, else a new one."""
    key = signature(opt)
    cached = opt.__dict__.get("_tiny_plan")
    if cached is not None and cached.key == key:
        return cached  # type: ignore[no-any-return]
    refs = _referents(opt)
    made = TinyPlan(key, refs, lean=False)
    if applies(opt):
        blocks = blocks_of_groups(opt.param_groups)
        ok = bool(blocks) and blocks[-1].stop > 0
        if ok and all(b.param.is_cpu and b.param.dtype in _DTYPES for b in blocks):
            made = TinyPlan(
                key,
                refs,
                lean=True,
                atol=float(opt.config.atol),
                blocks=blocks,
                params=[b.param for b in blocks],
                targets=[b.param.detach() for b in blocks],
                views=[b.param.detach().numpy() for b in blocks],
                spans=[(b.start, b.stop, b.lr) for b in blocks],
                scales=[None] * len(blocks),
            )
    opt.__dict__["_tiny_plan"] = made  # (not an option: past Sven.__setattr__; not pickled)
    return made


def step(opt: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """The lean step (module docstring): the closure's residuals, or ``None`` where it does not apply."""
    cfg = opt.config
    if not cfg.residuals or cfg.ggn is not False:  # (a classifier's or a per-sample loss's step: no plan to look up)
        return None
    tp = plan(opt)
    if not tp.lean:
        return None
    params = tp.params  # (Sven.step has checked for inference mode)
    warn_ignored_grads(params)
    with eager():  # as the general step: compiled closures run eagerly
        grad = torch.is_grad_enabled()
        _set_grad_enabled(True)  # torch.enable_grad(), without its objects (works inside a torch.no_grad())
        route = opt.route
        lin: Any  # (a route's Linearization, or Unsupported)
        try:
            with closure_errors(params):
                if type(route) is GivenJacobian:  # its values tested here, on the squares the scaling reads
                    lin = route(closure, params, opt.rows, values=False)
                    known = _jacobian_values(lin.jacobian, route.name)
                else:
                    lin, known = route(closure, params, opt.rows), None
        finally:
            _set_grad_enabled(grad)
        if isinstance(lin, Unsupported):
            raise ValueError(f"the route does not apply to this model: {lin.reason}")
        R, M = lin.rows, lin.jacobian

        if not _small(M):

            def rows_after() -> torch.Tensor:
                with closure_mode(params):
                    return opt.rows.evaluated(closure()).detach()

            opt._descend(R, R, M, tp.blocks, evaluate=Evaluator(rows_after, opt.rows), method=lin.method)
            return lin.local
        # the tries re-evaluate the closure as the general step does (grad mode on, the parameters without
        # requires_grad: sven.params.closure_mode), switched once for the whole step rather than at every try
        with closure_mode(params):
            _descend(opt, R, M, tp, closure, lin.method, known)
    return lin.local


def _jacobian_values(J: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The test of a callable Jacobian's values (:func:`sven.linearize.finite.checked_jacobian`'s, the same
    error), on the squares of its columns where it is small and on the CPU: their sum is finite where every
    entry is (else the entries are tested: finite ones whose squares overflowed pass). Returns its array and
    those squares, which the column scaling reads (``None``: a Jacobian that takes torch's test)."""
    a = host(J)
    if a is None or a.ndim != 2:
        if not bool(torch.isfinite(J).all()):
            raise ValueError(NONFINITE.format(name=name))
        return None
    sq = _einsum("ij,ij->j", a, a)  # (an overflow gives inf without a warning)
    if not (math.isfinite(sum(sq.tolist())) or finite_array(a)):
        raise ValueError(NONFINITE.format(name=name))
    return a, sq


def _small(M: Any) -> bool:
    return (
        isinstance(M, torch.Tensor)
        and M.dim() == 2
        and M.is_cpu
        and M.dtype in _DTYPES
        and not M.requires_grad
        and M.shape[1] <= TINY_COLUMNS
        and M.numel() <= TINY_ENTRIES
    )


def _descend(
    opt: Any,
    R: torch.Tensor,
    M: torch.Tensor,
    tp: TinyPlan,
    closure: Callable[[], torch.Tensor],
    method: str,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> StepInfo:
    """:meth:`sven.Sven._descend` for a tiny dense ``M``, in NumPy (module docstring); ``closure`` re-evaluates
    the residuals after a try (its rows, :class:`sven.tiny_control.Lean`); ``known``: the array of ``M`` and the
    squares of its columns, where they are known (:func:`_jacobian_values`)."""
    opt._counters["steps"] += 1
    info = StepInfo(losses=R, jacobian_method=method, damping=opt.control.damping, ggn=False)
    opt.__dict__["last_step"] = info  # (what Sven.__setattr__ does for a name that is not an option)
    try:
        r = (R.detach() if R.requires_grad else R).numpy()
        a, sq = known if known is not None else (M.numpy(), None)
        # ||R||^2 (squared_norm_of): finite where every residual is (or a square overflowed)
        rr = float(r.dot(r)) if r.dtype is _F64 and r.ndim == 1 else squared_norm_of(r)
        if not math.isfinite(rr) and not np.isfinite(r).all():
            raise StepFault("the residuals")
        D = _column_scale(opt, tp, a, sq) if opt.precondition is not None else None
        if D is None and not finite_array(a):
            raise StepFault("the Jacobian")
        F = _factorize(opt, tp, a if D is None else a / D)
        info.singular_values, info.rank, info.cutoff = F.singular_values, F.rank, F.cutoff
        u, s, _ = F.arrays
        c = (r if r.dtype == u.dtype else r.astype(u.dtype)) @ u
        sc = s * c
        g = math.sqrt(float(sc.dot(sc))) if sc.dtype is _F64 else vector_norm(sc)
        scale = float(s[0]) * math.sqrt(rr) if F.rank else 0.0
        info._gradient_cosine = cos = g / scale if scale > 0 else 0.0  # (a float: the property reads it as one)
        lean = Lean(opt, tp, F, R, r, rr, a, c=c, D=D, cos=cos, closure=closure, spec=opt.rows)
        out = tiny_control.run(opt.control, lean)
    except StepFault as fault:
        opt._fault(info, R, fault)
        return info
    info.record(out, tp.spans)
    return info


def _column_scale(opt: Any, tp: TinyPlan, a: np.ndarray, sq: np.ndarray | None = None) -> np.ndarray:
    """Moré's ``D`` after this Jacobian (:meth:`sven.precondition.ColumnScaling.jacobian`, the same state);
    a StepFault if the Jacobian is not finite (its squares' sum is not, nor its entries). ``sq``: the squares
    of the columns, where they are known.

    The column norms, the round-off columns (:func:`sven.precondition.round_off_columns`) and the running
    maximum are taken on Python floats (at most :data:`TINY_COLUMNS` of them: a NumPy call each would cost
    more); the state buffer is written in place. Every value is one of the dtype's (the norms are rounded
    to it first), and the round-off cut is taken in the dtype, so both ways give the same ``D``.
    """
    if sq is None:
        sq = _einsum("ij,ij->j", a, a)  # (an overflow gives inf without a warning)
    parts = tp.scale_buffers(opt.state)
    root = np.sqrt(sq)
    norms_ = root.tolist()
    if math.isfinite(sum(norms_)) and len(parts) == 1 and parts[0].dtype == a.dtype:
        top, low = max(norms_), min(norms_)
        cut = float(_ROUND_OFF_CUT[a.dtype.char] * a.dtype.type(top))  # (in the dtype, as round_off_columns)
        buf = parts[0]
        if low > cut:  # (the usual case: no column at round-off, none zero) the running maximum, in place
            np.maximum(buf, root, out=buf)
            return buf  # (the state itself: every entry >= a norm > 0; the step only reads it)
        # columns at round-off of the largest count as the largest
        norms_ = [top if 0.0 < v <= cut else v for v in norms_]
        new = [max(x, y) for x, y in zip(buf.tolist(), norms_)]
        buf[:] = new  # (the col_scale state, in place: each value is the buffer's or a norm, exact in its dtype)
        return np.array(new if low > 0 or min(new) > 0 else [v if v > 0 else 1.0 for v in new], dtype=a.dtype)
    if math.isfinite(sq.sum()):
        norms = np.sqrt(sq)
    else:  # NaN or Inf, or a square overflowed: the general column norms (by the largest magnitude)
        if not np.isfinite(a).all():
            raise StepFault("the Jacobian")
        norms = column_norms(torch.from_numpy(a)).numpy()
    top = norms.max()  # columns at round-off of the largest count as the largest (round_off_columns)
    cut = ROUND_OFF * _EPS[norms.dtype.char] * top
    low = norms.min()
    if low <= cut:
        norms = np.where((norms > 0) & (norms <= cut), top, norms)
    if len(parts) == 1:
        np.maximum(parts[0], norms.astype(parts[0].dtype, copy=False), out=parts[0])
    else:
        for b, d in zip(tp.blocks, parts):
            np.maximum(d, norms[b.start : b.stop].astype(d.dtype, copy=False), out=d)
    D = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if not low > 0 and not D.min() > 0:  # a column never seen (always zero) counts 1 (D >= norms > 0 else)
        D = np.where(D > 0, D, 1.0)
    return D.astype(a.dtype, copy=False)


def _factorize(opt: Any, tp: TinyPlan, a: np.ndarray) -> TinyFactors:
    """One float64 SVD of ``a`` (LAPACK's ``gesdd``), truncated as every solver truncates
    (:func:`sven.factorize.factorize`)."""
    dt = a.dtype
    U, S, Vh, status = lapack.dgesdd(a if dt is _F64 else a.astype(np.float64), full_matrices=0)
    if status != 0:
        raise StepFault("the solver failed (LinAlgError: SVD did not converge)", fault=True)
    sv = S.tolist()
    if not math.isfinite(sum(sv)):  # (LAPACK's vectors of a finite matrix are finite where its values are)
        raise StepFault("the Jacobian")
    cut = max(tp.atol, tp.rtol(opt, a.shape, dt) * sv[0])
    k = len(sv)
    while k and not sv[k - 1] > cut:  # (descending: the kept values are the first k)
        k -= 1
    if dt is not _F64:
        U, S, Vh = U.astype(dt), S.astype(dt), Vh.astype(dt)
    if k == len(sv):  # (full rank, the usual case: the factors as they are)
        return TinyFactors((U, S, Vh.T), S, cut)
    return TinyFactors((U[:, :k], S[:k], Vh[:k].T), S, cut)
