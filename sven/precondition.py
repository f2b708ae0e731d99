r"""Preconditioners: RMSProp scaling before or after the pseudoinverse, and Moré's column scaling.

Sven may rescale the parameter space with running averages of squared
Jacobian columns, as RMSProp does with gradients. Two places:

* **on the Jacobian** (``post=False``): the columns of ``M`` are divided by
  :math:`\sqrt{v} + \epsilon` before the pseudoinverse
  (:func:`sven.functional.rmsprop_precondition_`); needs the materialised ``M``.
* **on the direction** (``post=True``): the Sven direction is rescaled, with
  optional momentum (:func:`sven.functional.rmsprop_transform_`).

The buffers (``square_avg``, ``momentum_buffer``, ``col_scale``) live in the
optimizer's per-parameter ``state``, so ``state_dict()`` saves them. With a
random subset of a parameter's entries (the seed API's ``param_fraction``) the
RMSProp buffers are kept either per entry (``by_position=False``: entry ``i``
of the parameter always owns slot ``i``) or, as the original code did, by
*position in the subset* (``by_position=True``: a buffer of the subset's size,
whose slot ``j`` belongs to the ``j``-th selected entry of whichever subset is
drawn).

:class:`ColumnScaling` is the scaling of MINPACK's Levenberg--Marquardt
(Moré 1978): the damping acts on :math:`\|D\delta\|` with :math:`D` the
largest column norms of ``M`` seen so far, so parameters of very different
magnitudes are damped alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import functional as SF
from .params import ParamBlock, state_slice, store_slice

__all__ = ["ColumnScaling", "RMSProp", "column_norms"]

_State = dict[Any, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RMSProp:
    """RMSProp scaling of Sven (see the module docstring).

    Args:
        alpha: decay of the average of squares.
        eps: added to the root of the average.
        momentum: momentum of the direction (``post=True`` only).
        post: scale the direction (``True``) or the Jacobian (``False``).
        by_position: for a block that covers a subset of a parameter's entries
            (``ParamBlock.index``), one buffer of the subset's size, indexed by
            position in the subset (the original code's rule: the averages of
            different entries mix when the subset changes, see docs/sven.md);
            ``False``: one slot per parameter entry.
    """

    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    post: bool = False
    by_position: bool = False

    def _buffer(self, state: _State, b: ParamBlock, name: str) -> torch.Tensor:
        """The block's slice of buffer ``name`` (per entry), or the subset-sized buffer (``by_position``)."""
        if not self.by_position or b.index is None:
            return state_slice(state[b.param], b, name)
        st, n = state[b.param], b.stop - b.start
        if name not in st:
            st[name] = torch.zeros(n, dtype=b.param.dtype, device=b.param.device)
        elif st[name].numel() != n:
            raise ValueError(
                f"RMSProp by position keeps one average per position in the parameter subset, {st[name].numel()} "
                f"of them, but this step's subset has {n} entries: the subset size must stay fixed (the original "
                f"code's rule); keep the averages per entry instead (`rmsprop_state='entry'`)"
            )
        return st[name]

    def _store(self, state: _State, b: ParamBlock, name: str, value: torch.Tensor) -> None:
        if not self.by_position or b.index is None:
            store_slice(state[b.param], b, name, value)

    def jacobian(self, M: Any, blocks: Sequence[ParamBlock], state: _State) -> Any:
        """``M`` with its columns scaled (``post=False``); ``M`` itself otherwise."""
        if self.post:
            return M
        if not isinstance(M, torch.Tensor):
            raise TypeError("RMSProp on the Jacobian needs the materialised M")  # the route choice ensures it
        scaled = []
        for b in blocks:
            v = self._buffer(state, b, "square_avg")
            scaled.append(SF.rmsprop_precondition_(M[:, b.start : b.stop], v, alpha=self.alpha, eps=self.eps))
            self._store(state, b, "square_avg", v)
        return torch.cat(scaled, dim=1)

    def direction(self, d: torch.Tensor, blocks: Sequence[ParamBlock], state: _State) -> torch.Tensor:
        """The scaled direction (``post=True``); ``d`` itself otherwise."""
        if not self.post:
            return d
        parts = []
        for b in blocks:
            v = self._buffer(state, b, "square_avg")
            mom = self._buffer(state, b, "momentum_buffer") if self.momentum > 0 else None
            u = SF.rmsprop_transform_(
                d[b.start : b.stop], v, mom, alpha=self.alpha, eps=self.eps, momentum=self.momentum
            )
            self._store(state, b, "square_avg", v)
            if mom is not None:
                self._store(state, b, "momentum_buffer", mom)
            parts.append(u.clone())
        return torch.cat(parts)

    def save(self, blocks: Sequence[ParamBlock], state: _State) -> Callable[[], None]:
        """Copy the direction buffers now (``post=True``); the returned function restores them."""
        if not self.post:
            return lambda: None
        snap: list[tuple[torch.Tensor, str, torch.Tensor | None]] = []
        for b in blocks:
            for name in ("square_avg", "momentum_buffer"):
                buf = state[b.param].get(name)
                snap.append((b.param, name, None if buf is None else buf.clone()))

        def restore() -> None:
            for p, name, buf in snap:
                if buf is None:
                    state[p].pop(name, None)
                else:
                    state[p][name].copy_(buf)

        return restore


@dataclass(frozen=True)
class ColumnScaling:
    r"""Moré's scaling of the Levenberg--Marquardt step (MINPACK ``lmder``, ``mode=1``).

    With :math:`D = \mathrm{diag}(d_j)`, :math:`d_j \leftarrow \max(d_j, \|M_{:,j}\|)`
    (a column that has always been zero gets :math:`d_j = 1`; a column at round-off of the largest,
    :math:`0 < \|M_{:,j}\| \le` :data:`ROUND_OFF` :math:`\varepsilon \max_k \|M_{:,k}\|`, counts as the
    largest, :func:`round_off_columns`), the damped step

    .. math::

        \min_\delta \|M\delta + R\|^2 + \lambda \|D\delta\|^2
        \quad\Longleftrightarrow\quad
        \delta = D^{-1} (M D^{-1})^{+}_{\lambda} R

    is the filtered pseudoinverse step of the scaled Jacobian :math:`M D^{-1}`
    mapped back by :math:`D^{-1}`. It is invariant to a rescaling of any single
    parameter, which is what lets LM solve badly scaled problems (Meyer's
    parameters span 0.006 to 6000). The undamped step (``damping = 0``, nothing
    truncated) is unchanged by the scaling.
    """

    #: It scales the Jacobian's columns before the pseudoinverse (as RMSProp with ``post=False``).
    post = False

    def jacobian(self, M: Any, blocks: Sequence[ParamBlock], state: _State) -> Any:
        """``M D^{-1}`` after updating ``D`` with the column norms of ``M``."""
        if not isinstance(M, torch.Tensor):
            raise TypeError("column scaling needs the materialised M")  # the route choice ensures it
        norms = round_off_columns(column_norms(M))
        parts = []
        for b in blocks:
            st = state[b.param]
            d = state_slice(st, b, "col_scale")  # zeros at first
            new = norms[b.start : b.stop]
            dn, nn = SF.host(d), SF.host(new)
            if dn is not None and nn is not None and dn.dtype == nn.dtype:  # (a view of the state: in place)
                np.maximum(dn, nn, out=dn)
            else:
                torch.maximum(d, new.to(d.dtype), out=d)
            store_slice(st, b, "col_scale", d)
            parts.append(d)
        D = _ones_for_zeros(parts[0] if len(parts) == 1 else torch.cat(parts))
        D = D if D.dtype == M.dtype else D.to(M.dtype)
        a, w = SF.host(M), SF.host(D)
        return torch.from_numpy(a / w) if a is not None and w is not None else M / D

    def weights(self, blocks: Sequence[ParamBlock], state: _State) -> torch.Tensor:
        """``D`` as a vector (a column that has always been zero, or not seen yet, counts 1)."""
        parts = [state_slice(state[b.param], b, "col_scale") for b in blocks]
        return _ones_for_zeros(parts[0] if len(parts) == 1 else torch.cat(parts))

    def direction(self, d: torch.Tensor, blocks: Sequence[ParamBlock], state: _State) -> torch.Tensor:
        """``D^{-1} d``: the direction in the original parameters."""
        return d / self.weights(blocks, state).to(d.dtype)

    def save(self, blocks: Sequence[ParamBlock], state: _State) -> Callable[[], None]:
        """Nothing to restore: ``D`` changes only with a new Jacobian, never during the tries of one step."""
        return lambda: None


#: Column norms up to this many units of round-off of the largest are round-off (:func:`round_off_columns`).
#: Measured: the bias of a convolution before a BatchNorm and an attention key bias, whose columns are zero in
#: exact arithmetic, came at 0.3-0.7 eps of the largest column (float32 and float64); genuine columns of those
#: models at 1e-4 and above.
ROUND_OFF = 1e3


def round_off_columns(norms: torch.Tensor) -> torch.Tensor:
    r"""Column norms with those at round-off of the largest, :math:`0 < n_j \le` :data:`ROUND_OFF`
    :math:`\varepsilon \max_k n_k`, raised to the largest.

    A parameter the rows do not depend on in exact arithmetic (a bias cancelled by a BatchNorm's mean, the
    key bias of attention, whose softmax is invariant to it) still gets a column of round-off. Scaled by its
    own norm it becomes a unit column: a direction the truncation keeps and the step follows by about
    :math:`1/\varepsilon` (an attention key bias went to 8e15 in three steps). With the largest norm as its
    scale it stays at round-off of the scaled Jacobian, as it is unscaled; a small genuine column taken for
    round-off is only damped as without the scaling. Zero columns stay zero (:math:`d_j = 1`).
    """
    if norms.numel() == 0:
        return norms
    top = norms.max()
    cut = ROUND_OFF * torch.finfo(norms.dtype).eps * top
    return torch.where((norms > 0) & (norms <= cut), top, norms)


def column_norms(M: torch.Tensor) -> torch.Tensor:
    r"""The 2-norms of the columns of ``M``, :math:`\sqrt{\sum_i M_{ij}^2}`.

    One product and one sum over the rows (2-3x faster than ``torch.linalg.vector_norm(M, dim=0)`` on a
    tall CPU Jacobian, the same to round-off). Where a square overflows (entries above ``sqrt(max)`` of the
    dtype, ``1e154`` in float64), the columns are divided by their largest magnitude first:
    :math:`c_j \sqrt{\sum_i (M_{ij}/c_j)^2}`, which is finite wherever the norm is. Squares below the smallest
    normal number (entries under ``1e-154`` in float64) underflow as in ``vector_norm``: a column of such
    entries counts as zero, as one that has never been seen (``D`` keeps 1 for it). An accelerator or complex
    ``M`` keeps ``vector_norm`` (no host synchronisation for the overflow test).
    """
    if not M.is_cpu or M.is_complex():
        return torch.linalg.vector_norm(M, dim=0)
    a = SF.host(M)
    if a is not None:
        with np.errstate(over="ignore"):
            sq = np.einsum("ij,ij->j", a, a)
        if np.isfinite(sq).all():
            return torch.from_numpy(np.sqrt(sq))
    else:
        norms = (M * M).sum(0).sqrt()
        if SF.all_finite(norms):
            return norms
    c = M.abs().amax(0)
    c = _ones_for_zeros(c)
    return c * ((M / c) ** 2).sum(0).sqrt()


def _ones_for_zeros(D: torch.Tensor) -> torch.Tensor:
    """``D`` with its zero (never seen) entries replaced by 1."""
    a = SF.host(D)
    if a is not None:
        return torch.from_numpy(np.where(a > 0, a, a.dtype.type(1)))
    return torch.where(D > 0, D, torch.ones_like(D))
