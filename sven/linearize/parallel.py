r"""Data-parallel linearisation: a wrapper that gathers any route's result across ranks.

Each rank's closure covers its shard of the batch. :class:`DataParallel` runs
the wrapped route on the shard, makes every rank agree on whether the route
applied (a rank that falls back makes all fall back, or a later collective
hangs), then assembles the whole batch: the Gram route's layer factors are
all-gathered (:func:`gather_gram`: ``N x d`` numbers per layer, never
``N x P``), a materialised Jacobian's rows are all-gathered. Communication
volumes are in :mod:`sven.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import distributed as dist_
from .base import Linearization, RowSpec, Unsupported
from .gram_factors import GramJacobian, _Block, _Index, _IndexBlock, _OuterBlock, _RowsBlock

__all__ = ["DataParallel", "DistributedGram", "gather_gram"]


class DistributedGram:
    r"""The Gram route over a batch sharded across the ranks of a process group.

    Rank ``r`` holds rows ``o_r .. o_r + N_r`` of the global ``J``
    (``N = \sum_r N_r``). Every rank all-gathers the per-layer factors of
    :class:`GramJacobian` (inputs ``a`` and output gradients ``g``: ``N x d``
    numbers per layer, never ``N x P``) and builds the same global
    :math:`K = J J^\top`. The products keep the data local:

    .. math::

        J^\top C = \sum_r J_r^\top C_{[o_r, o_r + N_r)} \quad \text{(one all-reduce of } P \times r\text{)},
        \qquad J X = \big[J_r X\big]_r \quad \text{(an all-gather of } N \times r\text{)}.

    Built by :func:`gather_gram`; satisfies :class:`GramOperator`.
    """

    def __init__(self, local: GramJacobian, gram: torch.Tensor, output: torch.Tensor, offset: int, group: Any) -> None:
        self.local = local
        self.gram = gram
        self.output = output
        self.offset = offset
        self.group = group
        self.rows_per_sample = local.rows_per_sample

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.output.shape[0]), self.local.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def rmatmat(self, C: torch.Tensor) -> torch.Tensor:
        n = self.local.shape[0]
        part = self.local.rmatmat(C[self.offset : self.offset + n]).contiguous()
        return dist_.all_reduce_sum_(part, self.group)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return dist_.all_gather_rows(self.local.matmat(X).contiguous(), self.group)


def _gather_block(blk: _Block, D: int, group: Any) -> _Block:
    """The same block over the global batch: its row-indexed factors all-gathered in rank order."""
    if isinstance(blk, _OuterBlock) and blk.m is not None:  # formed per-row gradients
        m = dist_.all_gather_rows(blk.m.contiguous(), group)
        return _OuterBlock(blk.params, blk.widths, None, None, D, m=m, d_out=blk.d_out)
    if isinstance(blk, _OuterBlock):
        assert blk.a is not None and blk.g is not None  # kept when not formed
        a = dist_.all_gather_rows(blk.a.contiguous(), group)
        g = dist_.all_gather_rows(blk.g.contiguous(), group)
        return _OuterBlock(blk.params, blk.widths, a, g, D)
    if isinstance(blk, _IndexBlock):
        p = blk.piece
        idx = dist_.all_gather_rows(p.idx.contiguous(), group)
        g = dist_.all_gather_rows(p.g.contiguous(), group)
        return _IndexBlock(blk.params[0], _Index(idx, g, p.num), D)
    if isinstance(blk, _RowsBlock):
        m = dist_.all_gather_rows(blk.m.contiguous(), group)
        return _RowsBlock(blk.params, list(torch.split(m, blk.widths, dim=1)))
    raise TypeError(f"unknown Gram block {type(blk).__name__}")  # pragma: no cover - all kinds listed


def gather_gram(G: GramJacobian, group: Any) -> DistributedGram:
    """Assemble the global Gram route from each rank's :class:`GramJacobian` (a collective: every rank calls it).

    Every rank must have built its ``G`` from the same model structure (the
    same blocks in the same order), which holds when all ranks run the same
    code; the caller checks with :func:`sven.distributed.all_agree` that the
    route was supported on every rank before calling.

    Communication: the factors (``N x d_in`` and ``N x d_out`` per layer) and
    the rows, all-gathered; nothing of size ``P`` until a product.
    """
    if G.low_rank is not None:
        raise ValueError(
            "data-parallel Sven does not gather the BatchNorm coupling term of the Gram route yet (each rank's "
            "batch statistics); pass jacobian='autograd', or route=GramRoute(batchnorm='frozen') to hold them constant"
        )
    sizes = dist_.all_gather_rows(torch.tensor([G.shape[0]], dtype=torch.int64, device=G.device), group)
    offset = int(sizes[: dist_.rank(group)].sum())
    output = dist_.all_gather_rows(G.output.contiguous(), group)
    blocks = [_gather_block(b, G.rows_per_sample, group) for b in G._blocks]
    K = torch.zeros(output.shape[0], output.shape[0], dtype=torch.float64, device=G.device)
    for blk in blocks:
        K += blk.gram()
    return DistributedGram(G, K, output, offset, group)


class DataParallel:
    """Wraps any route for data-parallel training: the same route on each rank's shard, then gathered.

    * Every rank must agree on whether the route applied. A wrapped route
      that decides between routes itself (``handles_agreement = True``, e.g.
      :class:`~sven.linearize.auto.Linearizer`) gets an ``agree`` callback;
      for any other route the wrapper reduces the outcome with
      :func:`sven.distributed.all_agree` and returns
      :class:`~sven.linearize.base.Unsupported` on every rank if one failed.
    * The result is assembled over the whole batch: a :class:`GramJacobian`
      by :func:`gather_gram`, a materialised Jacobian by all-gathering its
      rows. ``local`` keeps this rank's rows.

    Args:
        route: the route to run on each shard.
        group: the process group (every rank calls the wrapper collectively).
    """

    def __init__(self, route: Any, group: Any) -> None:
        self.route = route
        self.group = group

    def agree(self, ok: bool) -> bool:
        """The logical AND of ``ok`` over the ranks."""
        return dist_.all_agree(ok, self.group)

    def __call__(
        self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec
    ) -> Linearization | Unsupported:
        if getattr(self.route, "handles_agreement", False):
            res = self.route(closure, params, rows, agree=self.agree)
        else:
            res = self.route(closure, params, rows)
            if not self.agree(not isinstance(res, Unsupported)):
                if isinstance(res, Unsupported):
                    return res
                return Unsupported("another rank could not use this route", None)
        if isinstance(res, Unsupported):
            return res
        return self.gather(res)

    def gather(self, lin: Linearization) -> Linearization:
        """The linearisation of the whole batch from each rank's (a collective)."""
        J = lin.jacobian
        if isinstance(J, GramJacobian):
            G = gather_gram(J, self.group)
            return Linearization(lin.local, G.output, G, lin.method)
        if isinstance(J, torch.Tensor):
            rows = dist_.all_gather_rows(lin.rows.contiguous(), self.group)
            return Linearization(lin.local, rows, dist_.all_gather_rows(J.contiguous(), self.group), lin.method)
        raise TypeError(
            f"data-parallel Sven needs the Gram route or a materialised Jacobian, got {type(J).__name__} "
            f"(the {lin.method!r} route is not data-parallel)"
        )
