r"""Thin helpers over :mod:`torch.distributed` for data-parallel Sven.

Each rank holds a shard of the batch (``B_r`` rows, ``B = \sum_r B_r``). Sven's
update needs the whole batch's Jacobian spectrum, so some rows must be shared.
Every helper here is a plain collective of :mod:`torch.distributed`; without
an initialised process group (or with ``world_size == 1``) each one returns its
input unchanged and communicates nothing, so single-process code runs through
the same calls.

Communication per step, in numbers (``W`` ranks, float32 for 4 bytes each):

* **Gram route** (Linear layers, per-sample gradients as outer products): each
  Linear layer ``l`` contributes, per sample, its input ``a`` (``d_in``) and
  output gradient ``g`` (``d_out``), so every rank all-gathers the factors
  ``A_l`` (``B x d_in``) and ``G_l`` (``B x d_out``) plus the ``B`` residuals:
  it receives about :math:`(1 - 1/W)\, B\, (1 + \sum_l (d_{in,l} + d_{out,l}))`
  numbers. With ``K = \sum_l (A_l A_l^\top) \odot (G_l G_l^\top)`` every rank
  then solves the same ``B x B`` problem; its local part of the update
  ``M_r^\top c_r`` is summed by one all-reduce of the ``P``-vector
  (:math:`2 (1 - 1/W) P` numbers per rank for a ring all-reduce).
* **Materialised fallback** (arbitrary models): the ``B_r x P`` Jacobian rows
  are all-gathered: each rank receives :math:`(1 - 1/W)\, B\, P` numbers.

For a ``d x d`` layer the Gram route gathers ``2 d`` numbers per sample
against ``d^2 + d`` for the fallback; e.g. ``d = 1024``, ``B = 256``, ``W = 8``,
float32: 1.8 MB of factors per layer instead of 940 MB of Jacobian rows. The
all-reduce of the update (7.3 MB per such layer) is then the larger part, the
same as the gradient all-reduce of data-parallel SGD.

Ranks must take identical decisions (accept or reject a step, grow or shrink
a damping) or a later collective hangs: :func:`all_agree` reduces a local
flag to the logical AND over ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "all_agree",
    "all_gather_rows",
    "all_reduce_mean_scalar",
    "all_reduce_sum_",
    "broadcast_parameters_",
    "rank",
    "resolve_group",
    "world_size",
]

#: Trailing dimensions described in the shape exchange of :func:`all_gather_rows`.
_MAX_TRAILING = 15
#: Codes for the dtype check of :func:`all_gather_rows` (-1: any other dtype).
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def resolve_group(process_group: ProcessGroup | None = None) -> ProcessGroup | None:
    """The process group to communicate on, or ``None`` when not distributed.

    Args:
        process_group: a :class:`torch.distributed.ProcessGroup`, or ``None``
            for the default group.

    Returns:
        ``None`` when :mod:`torch.distributed` is unavailable or not
        initialised (the process group argument is then ignored); otherwise
        ``process_group``, or ``torch.distributed.group.WORLD`` if it is ``None``.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD if process_group is None else process_group


def world_size(group: ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (1 when not distributed)."""
    g = resolve_group(group)
    return 1 if g is None else dist.get_world_size(g)


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank within ``group`` (0 when not distributed)."""
    g = resolve_group(group)
    return 0 if g is None else dist.get_rank(g)


def _device(group: ProcessGroup) -> torch.device:
    """The device that small control tensors live on for this group's backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    r"""Concatenate along dim 0 the tensors of all ranks, in rank order.

    The ranks may hold different numbers of rows (``t_r`` of shape
    ``(n_r, *rest)``); ``rest`` and the dtype must agree. Sizes are exchanged
    first, each tensor is padded to ``max_r n_r`` rows, all-gathered and
    unpadded: the result is ``(\sum_r n_r, *rest)`` on every rank.

    Args:
        t: this rank's rows, at least 1-D.
        group: process group (see :func:`resolve_group`).

    Returns:
        The concatenation; ``t`` itself when not distributed or alone.

    Raises:
        ValueError: on every rank, if the ranks disagree on trailing shape,
            number of dimensions or dtype (so that no rank waits for the others).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`t` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError("`t` must have at least one dimension (the rows), got a 0-d tensor")
    g = resolve_group(group)
    if g is None or dist.get_world_size(g) == 1:
        return t
    ws = dist.get_world_size(g)
    # one exchange of (rows, ndim, dtype code, trailing shape...) tells every rank everything it checks
    rest = list(t.shape[1:])
    code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
    meta = torch.full((3 + _MAX_TRAILING,), -1, dtype=torch.int64, device=t.device)
    meta[:3] = torch.tensor([t.shape[0], t.dim(), code])
    meta[3 : 3 + min(len(rest), _MAX_TRAILING)] = torch.tensor(rest[:_MAX_TRAILING], dtype=torch.int64)
    metas = [torch.empty_like(meta) for _ in range(ws)]
    dist.all_gather(metas, meta, group=g)
    table = torch.stack(metas).cpu()
    if bool((table[:, 1:] != table[0, 1:]).any()) or int(table[0, 1]) - 1 > _MAX_TRAILING:
        shapes = [(int(m[0]), *[int(d) for d in m[3 : 3 + max(int(m[1]) - 1, 0)]]) for m in table]
        codes = [str(_DTYPES[int(c)]) if int(c) >= 0 else "other" for c in table[:, 2]]
        raise ValueError(
            "`t` must have the same trailing shape and dtype on every rank (at most "
            f"{_MAX_TRAILING + 1} dimensions); got shapes {shapes} and dtypes {codes}"
        )
    sizes = [int(n) for n in table[:, 0]]
    longest = max(sizes)
    if longest == 0:
        return t
    wire = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo has no bool
    padded = wire.new_zeros((longest, *rest))
    padded[: t.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(parts, padded, group=g)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return out.to(torch.bool) if t.dtype == torch.bool else out


def all_reduce_sum_(t: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``t`` over ranks, in place; returns ``t`` (unchanged when not distributed)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`t` must be a torch.Tensor, got {type(t).__name__}")
    g = resolve_group(group)
    if g is None or dist.get_world_size(g) == 1:
        return t
    if t.is_contiguous():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    else:  # collectives need contiguous memory
        buf = t.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=g)
        t.copy_(buf)
    return t


def all_reduce_mean_scalar(x: float, group: ProcessGroup | None = None) -> float:
    """The mean of the Python number ``x`` over ranks, in float64 (``x`` when not distributed)."""
    g = resolve_group(group)
    if g is None or dist.get_world_size(g) == 1:
        return float(x)
    buf = torch.tensor([float(x)], dtype=torch.float64, device=_device(g))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=g)
    return float(buf.item()) / dist.get_world_size(g)


def broadcast_parameters_(params: Iterable[torch.Tensor], src: int = 0, group: ProcessGroup | None = None) -> None:
    """Overwrite ``params`` (in place, without autograd) with those of rank ``src`` of ``group``.

    Call it once after building the model so that every rank starts from the
    same point. ``src`` is the rank within ``group``. One collective per tensor.
    """
    g = resolve_group(group)
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"`params[{i}]` must be a torch.Tensor, got {type(p).__name__}")
    if g is None or dist.get_world_size(g) == 1:
        return
    ws = dist.get_world_size(g)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < ws:
        raise ValueError(f"`src` must be a rank of the group, in [0, {ws}), got {src!r}")
    global_src = src if g is dist.group.WORLD else dist.get_global_rank(g, src)
    with torch.no_grad():
        for p in params:
            data = p.detach()
            if data.is_contiguous():
                dist.broadcast(data, src=global_src, group=g)
            else:
                buf = data.contiguous()
                dist.broadcast(buf, src=global_src, group=g)
                data.copy_(buf)


def all_agree(flag: bool, group: ProcessGroup | None = None) -> bool:
    """Logical AND of ``flag`` over ranks, so that all ranks take the same decision (``flag`` alone)."""
    g = resolve_group(group)
    if g is None or dist.get_world_size(g) == 1:
        return bool(flag)
    buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device(g))
    dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=g)
    return bool(buf.item())
