r"""Parameter blocks: which Jacobian columns belong to which tensor, and how a direction is applied.

The Jacobian's columns run over the optimised parameters in order, each
flattened row-major. A :class:`ParamBlock` maps columns ``start:stop`` to a
parameter tensor (or to the entries ``index`` of it: the seed API's random
parameter subsets) with its group's learning rate. Applying a direction
:math:`d` is :math:`\theta_b \mathrel{-}= \eta_b\, d_b` for every block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ParamBlock",
    "apply_direction",
    "blocks_of_groups",
    "closure_mode",
    "lr_scaled",
    "save_parameters",
]


@dataclass
class ParamBlock:
    """A parameter tensor and which of its entries are columns of the Jacobian."""

    param: torch.Tensor
    lr: float
    start: int  # first Jacobian column
    stop: int
    index: torch.Tensor | None = None  # flat indices into the parameter (None: all, in order)
    momentum: float = 0.0  # the group's update stage (sven.update)
    weight_decay: float = 0.0
    nesterov: bool = False


def blocks_of_groups(param_groups: Iterable[dict[str, Any]]) -> list[ParamBlock]:
    """One block per parameter that requires grad, in group order, with its group's ``lr``."""
    blocks: list[ParamBlock] = []
    col = 0
    for group in param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            n = p.numel()
            blocks.append(
                ParamBlock(
                    p,
                    float(group["lr"]),
                    col,
                    col + n,
                    momentum=float(group.get("momentum", 0.0)),
                    weight_decay=float(group.get("weight_decay", 0.0)),
                    nesterov=bool(group.get("nesterov", False)),
                )
            )
            col += n
    return blocks


#: The grad-mode switch that ``torch.enable_grad`` and ``torch.set_grad_enabled`` call (both are classes whose
#: construction costs more than the switch; :class:`closure_mode` is entered up to twice per step).
_set_grad_enabled = torch._C._set_grad_enabled


class closure_mode:  # (a lower-case name: used as a function, ``with closure_mode(params):``)
    """Grad mode on, but the optimised parameters do not require grad: to re-evaluate a closure after a step.

    The closure may then take derivatives itself (with respect to its inputs:
    physics-informed residuals, gradient penalties), while no graph is built
    for the parameters, which the re-evaluation does not need. A parameter
    listed twice, or shared with a module outside the optimizer, is the same
    tensor and is restored once; ``requires_grad`` and the grad mode are put back on exit, also when the
    closure raises. (A class rather than a generator: it is entered up to twice per step, and a step on a
    few parameters costs tens of microseconds, :mod:`sven.tiny`.)
    """

    __slots__ = ("_flags", "_grad")

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._flags = [(p, p.requires_grad) for p in params]

    def __enter__(self) -> None:
        self._grad = torch.is_grad_enabled()
        flags = self._flags
        try:
            for p, _ in flags:
                p.requires_grad_(False)
        except BaseException:
            self._restore()
            raise
        _set_grad_enabled(True)

    def __exit__(self, *exc: object) -> None:
        _set_grad_enabled(self._grad)
        self._restore()

    def _restore(self) -> None:
        for p, flag in reversed(self._flags):
            p.requires_grad_(flag)


def lr_scaled(blocks: Sequence[ParamBlock], d: torch.Tensor) -> torch.Tensor:
    """``lr_b * d_b`` for every block: the applied change is ``-`` this."""
    out = d.clone()
    for b in blocks:
        out[b.start : b.stop] *= b.lr
    return out


def _target(p: torch.Tensor, untracked: bool) -> torch.Tensor:
    # ``.data`` shares the storage but not the autograd version counter
    return p.data if untracked else p


def apply_direction(
    blocks: Sequence[ParamBlock], d: torch.Tensor, sign: float = 1.0, *, untracked: bool = False
) -> None:
    """``theta_b -= sign * lr_b * d_b`` for every block (one fused call per learning rate).

    ``untracked``: change the values without bumping the parameters' autograd
    version counters, for a caller that will restore them and then use a graph
    recorded before (the matrix-free route's products after a rejected try).
    """
    by_lr: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for b in blocks:
        piece = d[b.start : b.stop]
        if piece.dtype != b.param.dtype:
            piece = piece.to(b.param.dtype)
        if b.index is not None:
            _target(b.param, untracked).view(-1).index_add_(0, b.index, piece, alpha=-sign * b.lr)
        elif b.lr != 0.0:
            ps, ds = by_lr.setdefault(b.lr, ([], []))
            ps.append(_target(b.param, untracked))
            ds.append(piece.view_as(b.param))
    for lr, (ps, ds) in by_lr.items():
        torch._foreach_add_(ps, ds, alpha=-sign * lr)


def save_parameters(blocks: Sequence[ParamBlock], *, untracked: bool = False) -> Callable[[], None]:
    """Copy the parameters now; the returned function puts them back bit for bit (``untracked``: as above)."""
    saved = [b.param.detach().clone() for b in blocks]

    def restore() -> None:
        with torch.no_grad():
            for b, s in zip(blocks, saved):
                _target(b.param, untracked).copy_(s)

    return restore


def state_slice(state: dict[str, torch.Tensor], b: ParamBlock, name: str) -> torch.Tensor:
    """The ``(ncols,)`` slice of a per-parameter buffer that the Jacobian columns of ``b`` touch (created lazily)."""
    if name not in state:
        state[name] = torch.zeros_like(b.param, memory_format=torch.contiguous_format)
    flat = state[name].view(-1)
    return flat if b.index is None else flat[b.index]


def store_slice(state: dict[str, torch.Tensor], b: ParamBlock, name: str, value: torch.Tensor) -> None:
    """Write back a slice from :func:`state_slice` (needed only for a gathered ``index`` copy)."""
    if b.index is not None:
        state[name].view(-1)[b.index] = value
