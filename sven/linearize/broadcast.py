r"""An Embedding called without the batch dimension (shared positions) on the Gram route.

A nanoGPT-style model adds position embeddings looked up once for the whole
batch, ``tok(idx) + pos(torch.arange(T))``: the index tensor is ``(T,)`` (or
``(1, T)``) and its ``(T, d)`` output is broadcast over the batch by the
addition. The gradient at that ``(T, d)`` output is already summed over the
batch, so the per-sample factor ``g`` of :mod:`sven.linearize.gram` cannot be
read there. It can one step later: broadcasting is ``z \mapsto z`` expanded to
the batch, so the gradient at the expanded ``(B, T, d)`` tensor holds the
per-sample rows, and row ``n``'s gradient of the table is

.. math::

    \nabla_E \ell_n = \sum_t e_{idx_t}\, g_{nt}^\top,

an Embedding call whose indices are ``idx`` expanded to ``(B, T)``.

How the broadcast is seen: the recorder hands the user the Embedding's
output as a :class:`Shared` tensor (same value, same graph). When an
elementwise arithmetic operation (``+``, ``-``, ``*``, ``/``, in place or
not) broadcasts it over leading dimensions, :class:`Shared` expands it
explicitly first, records the expanded output with the expanded indices,
and runs the operation on plain tensors (the same value). A view that only
adds leading dimensions of size one (``pos[None]``, ``pos.unsqueeze(0)``)
stays :class:`Shared`. Any other use means the output is used as it is: the
call stays recorded as an ordinary batched call (indices ``(B,)``), and an
output used both ways is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Shared", "SharedUse", "maybe_shared", "share"]

#: Elementwise operations whose broadcasting over the batch is followed.
_BROADCASTING = {
    torch.add, torch.sub, torch.mul, torch.div,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
    torch.Tensor.add_, torch.Tensor.sub_, torch.Tensor.mul_, torch.Tensor.div_,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__isub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
    torch.Tensor.__truediv__, torch.Tensor.__itruediv__,
}  # fmt: skip


@dataclass
class SharedUse:
    """What the recorder needs to know about one Embedding output that may be shared across the batch.

    ``expand(idx, out)`` records the output broadcast over the batch (expanded
    indices and output); ``direct()`` notes a use of the output as it is and
    returns a problem sentence when the two are mixed.
    """

    idx: torch.Tensor
    expand: Callable[[torch.Tensor, torch.Tensor], None]
    problem: Callable[[str], None]
    broadcast: bool = False
    direct: bool = False

    def use_directly(self) -> None:
        self.direct = True
        if self.broadcast:
            self.problem(
                "its output (indices without the batch dimension) is used both broadcast over the batch and as it "
                "is; broadcast it in one elementwise operation (e.g. `x = tok + pos`)"
            )


class Shared(torch.Tensor):
    """An Embedding output that may be shared across the batch (module docstring)."""

    _use: SharedUse

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        shared = [a for a in (*args, *kwargs.values()) if isinstance(a, Shared)]
        if func in _BROADCASTING:
            shapes = [a.shape for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            target = torch.broadcast_shapes(*shapes)
            swap: dict[int, torch.Tensor] = {}
            with torch._C.DisableTorchFunctionSubclass():
                for s in shared:
                    if tuple(s.shape) != tuple(target) and s.dim() <= len(target):
                        swap[id(s)] = _expanded(s, target)
            args = tuple(swap.get(id(a), a) for a in args)
            kwargs = {k: swap.get(id(v), v) for k, v in kwargs.items()}
            for s in shared:
                if id(s) not in swap:
                    s._use.use_directly()
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                return out  # metadata: shape, dtype, requires_grad, ...
            src = shared[0] if len(shared) == 1 else None
            lead = out.dim() - (src.dim() if src is not None else 0)
            if (
                src is not None
                and lead >= 1
                and tuple(out.shape[lead:]) == tuple(src.shape)
                and all(n == 1 for n in out.shape[:lead])
                and out.data_ptr() == src.data_ptr()
            ):
                return _share(out, src._use)  # a view adding leading dimensions of size one
        for s in shared:
            s._use.use_directly()
        return out


def _expanded(s: Shared, target: torch.Size) -> torch.Tensor:
    """``s`` (plain) expanded to ``target``, recorded with its indices expanded alike."""
    use = s._use
    out = s.as_subclass(torch.Tensor).expand(target)
    use.broadcast = True
    if use.direct:
        use.use_directly()  # reports the mix
    idx = use.idx.reshape((1,) * (s.dim() - 1 - use.idx.dim()) + tuple(use.idx.shape)).expand(target[:-1])
    use.expand(idx, out)
    return out


def _share(t: torch.Tensor, use: SharedUse) -> Shared:
    with torch._C.DisableTorchFunctionSubclass():
        s = t.as_subclass(Shared)
    s._use = use
    return s


def maybe_shared(idx: torch.Tensor) -> bool:
    """Whether an Embedding call on ``idx`` may be shared across the batch: indices ``(T,)`` or ``(1, ...)``."""
    return idx.dim() == 1 or (idx.dim() >= 2 and idx.shape[0] == 1)


def share(output: torch.Tensor, use: SharedUse) -> Shared:
    """``output`` as a :class:`Shared` tensor (same value and graph) reporting its uses to ``use``."""
    return _share(output, use)
