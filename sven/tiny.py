r"""The lean step of a tiny dense least-squares problem: the same step, without the machinery that cannot apply.

A curve fit (:func:`sven.least_squares`, :func:`sven.curve_fit`) has a handful of parameters and a few hundred
residuals: its Sven step costs microseconds of arithmetic, and the general pipeline of :class:`sven.Sven`
(route choice, the loss rule's probe, preconditioner objects, the :mod:`truncpinv` result with its
validation, momentum and weight-decay stages, torch calls of 3-10 us each) cost about a millisecond around
it. :func:`step` runs the same step directly when nothing of that machinery can apply, and hands every other
case back (``None``):

* :class:`sven.Sven` itself (a subclass keeps the general step, which it may extend), in
  residual mode with the loss rule decided off, one process, truncpinv's ``Auto`` solver without a ``rank``
  cap, no RMSProp, no momentum and no weight decay in any group, and the step control exactly
  :class:`sven.control.AdaptiveDamping` or :class:`sven.trust_region.TrustRegion`;
* after the linearisation (the configured route, unchanged: autograd, finite differences or a callable
  Jacobian, :mod:`sven.linearize.finite`), a materialised CPU Jacobian in float32 or float64 of at most
  :data:`TINY_COLUMNS` columns and :data:`TINY_ENTRIES` entries (anything else goes to the general stage).

The step is the general one, computed in NumPy on views of the same memory: Moré's column scaling
(:class:`sven.precondition.ColumnScaling`, the same state buffer ``col_scale``), one float64 LAPACK SVD of
:math:`\hat M = M D^{-1} = U \Sigma V^\top` (what :mod:`sven.factorize` computes for at most 10 columns), the
truncation :math:`\sigma_i > \max(atol, rtol\,\sigma_1)`, and the policy's own ``run`` on a
:class:`sven.control.StepContext` whose directions are

.. math::

    d_\lambda = D^{-1} V \frac{\Sigma}{\Sigma^2 + \lambda\sigma_1^2} U^\top R, \qquad
    \text{predicted change } M (\eta\, d_\lambda).

The policy objects, their state and their decisions are the general path's; only the arithmetic around
them is leaner, so the iterates agree with the general path's to round-off (``tests/test_tiny.py``
checks it on random problems for both policies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

import truncpinv

from . import distributed as dist_
from ._compile import eager
from ._validation import check_not_inference_mode, closure_errors, warn_ignored_grads
from .control import AdaptiveDamping, Evaluator, StepContext
from .factorize import DIRECT_SIDE
from .functional import HOST_SMALL
from .info import StepFault, StepInfo
from .linearize import Unsupported
from .params import ParamBlock, blocks_of_groups, closure_mode, lr_scaled, save_parameters
from .precondition import ROUND_OFF, ColumnScaling
from .trust_region import TrustRegion

__all__ = ["TINY_COLUMNS", "TINY_ENTRIES", "TinyFactors", "applies", "step"]

#: At most this many parameters (the columns of ``M``): :data:`sven.factorize.DIRECT_SIDE`'s direct SVD.
TINY_COLUMNS = DIRECT_SIDE
#: At most this many entries of ``M`` (``N * P``): where the general stages also compute in NumPy on views
#: (:data:`sven.functional.HOST_SMALL`), so that both paths round alike.
TINY_ENTRIES = HOST_SMALL
_POLICIES = (AdaptiveDamping, TrustRegion)
_DTYPES = (torch.float64, torch.float32)


@dataclass
class TinyFactors:
    """The kept factors of the scaled Jacobian, as the two policies read a :class:`truncpinv.TruncatedPinv`.

    Attributes:
        U, S, V: ``(N, r)``, ``(r,)``, ``(P, r)``: the kept singular triplets (tensors over NumPy memory).
        singular_values: every singular value computed.
        rank, cutoff: the kept count and the cut-off :math:`\\max(atol, rtol\\,\\sigma_1)`.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    cutoff: float

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype


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


def step(opt: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """The lean step (module docstring): the closure's residuals, or ``None`` where it does not apply."""
    if not applies(opt):
        return None
    check_not_inference_mode()
    blocks = blocks_of_groups(opt.param_groups)
    if not blocks:
        return None  # (the general step says why)
    params = [b.param for b in blocks]
    warn_ignored_grads(params)
    with eager():  # as the general step: compiled closures run eagerly
        with torch.enable_grad(), closure_errors(params):
            lin = opt.route(closure, params, opt.rows)
        if isinstance(lin, Unsupported):
            raise ValueError(f"the route does not apply to this model: {lin.reason}")
        R, M = lin.rows, lin.jacobian

        if not _small(M):

            def rows_after() -> torch.Tensor:
                with closure_mode(params):
                    return opt.rows.evaluated(closure()).detach()

            opt._descend(R, R, M, blocks, evaluate=Evaluator(rows_after, opt.rows), method=lin.method)
            return lin.local
        # the tries re-evaluate the closure as the general step does (grad mode on, the parameters without
        # requires_grad: sven.params.closure_mode), switched once for the whole step rather than at every try
        with closure_mode(params):
            evaluate = Evaluator(lambda: opt.rows.evaluated(closure()).detach(), opt.rows)
            _descend(opt, R, cast(torch.Tensor, M), blocks, evaluate, lin.method)
    return lin.local


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
    opt: Any, R: torch.Tensor, M: torch.Tensor, blocks: list[ParamBlock], evaluate: Evaluator, method: str
) -> StepInfo:
    """:meth:`sven.Sven._descend` for a tiny dense ``M``, in NumPy (module docstring)."""
    opt._counters["steps"] += 1
    info = StepInfo(losses=R, jacobian_method=method, damping=opt.control.damping, ggn=False)
    opt.last_step = info
    try:
        r, a = _host(R), _host(M)
        if not np.isfinite(r).all():
            raise StepFault("the residuals")
        if not np.isfinite(a).all():
            raise StepFault("the Jacobian")
        D = _column_scale(opt, a, blocks) if opt.precondition is not None else None
        F = _factorize(opt, a if D is None else a / D)
        info.singular_values, info.rank, info.cutoff = F.singular_values, F.rank, F.cutoff
        u, s = F.U.numpy(), F.S.numpy()
        c = r.astype(u.dtype, copy=False) @ u
        g, scale = float(np.linalg.norm(s * c)), (float(s[0]) * float(np.linalg.norm(r)) if F.rank else 0.0)
        cos = g / scale if scale > 0 else 0.0
        info._gradient_cosine = torch.tensor(cos, dtype=R.dtype)  # (as the general step records it)
        ctx = _context(opt, F, R, M, blocks, evaluate, c=c, D=D, cos=cos)
        out = opt.control.run(ctx)
    except StepFault as fault:
        opt._fault(info, R, fault)
        return info
    info.record(out, [(b.start, b.stop, b.lr) for b in blocks])
    return info


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _column_scale(opt: Any, a: np.ndarray, blocks: list[ParamBlock]) -> np.ndarray:
    """Moré's ``D`` after this Jacobian (:meth:`sven.precondition.ColumnScaling.jacobian`, the same state)."""
    with np.errstate(over="ignore"):
        sq = np.einsum("ij,ij->j", a, a)
    norms = np.sqrt(sq)
    if not np.isfinite(sq.sum()):  # a square overflowed: the general column norms, by the largest magnitude
        c = np.abs(a).max(0)
        c = np.where(c > 0, c, 1.0)
        norms = c * np.sqrt(((a / c) ** 2).sum(0))
    if norms.size:  # columns at round-off of the largest count as the largest (round_off_columns)
        top = norms.max()
        cut = ROUND_OFF * np.finfo(norms.dtype).eps * top
        if (norms <= cut).any():
            norms = np.where((norms > 0) & (norms <= cut), top, norms)
    parts = []
    for b in blocks:
        st = opt.state[b.param]
        if "col_scale" not in st:
            st["col_scale"] = torch.zeros_like(b.param, memory_format=torch.contiguous_format)
        d = st["col_scale"].view(-1).numpy()
        np.maximum(d, norms[b.start : b.stop].astype(d.dtype, copy=False), out=d)
        parts.append(d)
    D = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if not D.min(initial=1.0) > 0:  # a column never seen (always zero) counts 1
        D = np.where(D > 0, D, 1.0)
    return D.astype(a.dtype, copy=False)


def _factorize(opt: Any, a: np.ndarray) -> TinyFactors:
    """One float64 SVD of ``a``, truncated as every solver truncates (:func:`sven.factorize.factorize`)."""
    m, n = a.shape
    try:
        U, S, Vh = np.linalg.svd(a.astype(np.float64, copy=False), full_matrices=False)
    except np.linalg.LinAlgError as err:
        raise StepFault(f"the solver failed (LinAlgError: {err})", fault=True) from err
    if not np.isfinite(S.sum()):  # (LAPACK's vectors of a finite matrix are finite where its values are)
        raise StepFault("the Jacobian")
    cfg = opt.config
    rtol = truncpinv.default_rtol((m, n), torch.float64 if a.dtype == np.float64 else torch.float32)
    rtol = rtol if cfg.rtol is None else cfg.rtol
    cut = max(float(cfg.atol), float(rtol) * (float(S[0]) if S.size else 0.0))
    k = int(np.count_nonzero(S > cut))
    dt = a.dtype
    if dt != np.float64:
        U, S, Vh = U.astype(dt), S.astype(dt), Vh.astype(dt)
    t = torch.from_numpy
    return TinyFactors(t(U[:, :k]), t(S[:k]), t(Vh[:k].T), t(S), k, cut)


def _context(
    opt: Any,
    F: TinyFactors,
    R: torch.Tensor,
    M: torch.Tensor,
    blocks: list[ParamBlock],
    evaluate: Evaluator,
    *,
    c: np.ndarray,
    D: np.ndarray | None,
    cos: float,
) -> StepContext:
    """The :class:`~sven.control.StepContext` of :func:`sven.step_context.step_context`, on NumPy views."""
    s, v, a = F.S.numpy(), F.V.numpy(), _host(M)
    lrs = np.concatenate([np.full(b.stop - b.start, b.lr, dtype=a.dtype) for b in blocks])
    plain = bool((lrs == 1.0).all())

    def direction(lam: float) -> torch.Tensor:
        if F.rank == 0:
            d = np.zeros(v.shape[0], dtype=v.dtype)
        else:
            phi = 1.0 / np.where(s > 0, s, 1.0) * (s > 0) if lam == 0.0 else s / (s * s + lam * s[0] ** 2)
            d = v @ (c * phi.astype(s.dtype, copy=False))
        if not np.isfinite(d).all():
            raise StepFault("the Sven direction")
        return torch.from_numpy(d if D is None else d / D.astype(d.dtype, copy=False))

    def predict(d: torch.Tensor) -> torch.Tensor:
        x = d.numpy()
        x = x if plain else x * lrs
        return torch.from_numpy(a @ x.astype(a.dtype, copy=False))

    def apply(d: torch.Tensor, sign: float) -> None:
        # sven.params.apply_direction, one block at a time: theta_b -= sign * lr_b * d_b (inside closure_mode: the
        # parameters do not require grad, and the in-place change bumps their version counters)
        for b in blocks:
            piece = d[b.start : b.stop]
            piece = piece if piece.dtype == b.param.dtype else piece.to(b.param.dtype)
            b.param.add_(piece.view_as(b.param), alpha=-sign * b.lr)

    def xnorm() -> float:
        x = np.concatenate([b.param.detach().reshape(-1).double().numpy() for b in blocks])
        return float(np.linalg.norm(x if D is None else x * D))

    def reject() -> None:
        opt._counters["rejected_steps"] += 1

    losses = R
    return StepContext(
        F=cast(Any, F),
        R=R,
        loss=lambda: opt.rows.mean_loss(losses),
        direction=direction,
        apply=apply,
        predict=predict,
        norm=lambda d: float(lr_scaled(blocks, d).double().norm()),
        save=lambda: save_parameters(blocks),
        reject=reject,
        evaluate=evaluate,
        xnorm=xnorm,
        resolve=None,
        cosine=lambda: cos,
    )
