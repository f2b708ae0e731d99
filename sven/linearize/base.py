r"""The linearisation protocol: what every route returns, and the operators it may return.

A *route* runs the user's closure once and linearises its rows around the
current parameters: it returns a :class:`Linearization` holding the rows (per-sample
losses, or residuals) and their Jacobian :math:`J = \partial\,\text{rows}/\partial\theta`,
either materialised (an ``N x P`` tensor) or as a :class:`GramOperator`
(``K = J J^T`` plus the products ``J X`` and ``J^T Y``). :class:`RowSpec`
turns the rows into Sven's residuals :math:`R` and :math:`M = \partial R/\partial\theta`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from truncpinv import LinearOperator

from .. import functional as SF

__all__ = [
    "Declined",
    "GramOperator",
    "LinearRows",
    "Linearization",
    "Route",
    "RowSpec",
    "RowTransformed",
    "Unsupported",
    "WithGram",
    "graph_head",
    "row_transform",
    "strided",
]

#: Autograd nodes of :func:`graph_head`: enough for a loss's own arithmetic after the model's output.
HEAD_NODES = 12


def strided(g: torch.Tensor) -> torch.Tensor:
    """A gradient as a dense (strided) tensor: autograd hands ``nn.Embedding(sparse=True)``'s weight a sparse
    COO gradient, which has no ``reshape``, ``isfinite`` or batching rule."""
    return g.to_dense() if g.layout != torch.strided else g


def graph_head(t: Any, size: int = HEAD_NODES) -> tuple[str, ...]:
    """The types of the first ``size`` autograd nodes behind ``t`` (breadth first; ``()`` without a graph).

    The routes that verify a forward structure once (the Gram route, the hook path) add it to the key of
    their caches: the modules called do not show the closure's own arithmetic after them, so a per-sample loss
    verified once would otherwise vouch for a loss normalised over the batch computed later from the same
    modules. A constant cost (``size`` nodes), whatever the size of the model.
    """
    fn = getattr(t, "grad_fn", None)
    queue: deque[Any] = deque([fn] if fn is not None else [])
    seen: set[int] = set()
    names: list[str] = []
    while queue and len(names) < size:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        names.append(type(node).__name__)
        queue.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return tuple(names)


class GramOperator(LinearOperator, Protocol):
    """An ``N x P`` operator with its Gram matrix: :class:`truncpinv.LinearOperator` plus ``gram``."""

    @property
    def gram(self) -> torch.Tensor: ...


@dataclass
class Linearization:
    """One closure evaluation, linearised.

    Attributes:
        local: this process's rows, detached (what ``Sven.step`` returns).
        rows: the rows of the whole batch (every rank's, in rank order), detached.
        jacobian: ``d rows / d theta``: an ``(N, P)`` tensor or a :class:`GramOperator`.
        method: how it was computed (``"gram"``, ``"hooks"``, ``"autograd"``, ``"matfree"``, ...).
    """

    local: torch.Tensor
    rows: torch.Tensor
    jacobian: torch.Tensor | GramOperator
    method: str


@dataclass
class Unsupported:
    """A route does not apply to this closure.

    Attributes:
        reason: a sentence naming the layer or parameter, for a warning.
        output: the ``(N,)`` rows *with* their autograd graph, so that the
            caller can compute the exact Jacobian without re-running the
            closure (e.g. :func:`sven.linearize.dense.autograd_jacobian`);
            ``None`` when the closure must be run again.
        quiet: the closure has no layer the route could use (a function of bare parameters): the
            materialised Jacobian is the natural route, and falling back to it needs no warning.
    """

    reason: str
    output: Any
    quiet: bool = False


@dataclass
class Declined(Unsupported):
    """A route applies but is not the cheaper one for this closure (no warning, no fallback remembered).

    The Gram route declines, under ``jacobian="auto"``, when the rows outnumber
    the parameters: the ``N x N`` Gram matrix then costs more than the
    materialised ``N x P`` Jacobian (see :func:`sven.linearize.auto.choose_route`).
    ``output`` holds the rows with their graph, as for :class:`Unsupported`.
    """


@dataclass
class LinearRows:
    r"""Rows that are a fixed linear map of a tensor with a graph, plus a constant: what :meth:`RowSpec.linear` gives.

    ``rows[b, d]`` has the value ``values[b, d]`` and the derivative :math:`\sum_c \text{coef}[b, d, c]\,
    \partial\,\text{base}[b, c]`: :meth:`graph` builds them as ``lin - lin.detach() + values`` with
    ``lin = coef @ base`` (one batched product; :func:`sven.loss_rows.top_class_rows`, the GGN rows of softmax
    cross-entropy in :math:`\log p`). A route that differentiates the rows one column ``d`` at a time can start
    each backward pass at ``base`` with the cotangent ``coef[:, d]``, which is what the rows' own backward hands
    ``base`` for the cotangent :math:`e_d`, :math:`\text{coef}^\top e_d` (to the sign of a zero): the rows then
    need no graph of their own (:class:`sven.linearize.gram.LayerGram`).

    Attributes:
        base: ``(B, C)`` with its graph.
        coef: ``(B, D, C)`` detached coefficients.
        values: ``(B, D)`` detached values.
    """

    base: torch.Tensor
    coef: torch.Tensor
    values: torch.Tensor

    def graph(self) -> torch.Tensor:
        """The ``(B, D)`` rows with their graph."""
        lin = torch.bmm(self.coef, self.base[:, :, None])[:, :, 0]
        return lin - lin.detach() + self.values

    def detached(self) -> torch.Tensor:
        """The ``(B, D)`` rows without a graph: the values of :meth:`graph`, from the same operations."""
        with torch.no_grad():
            lin = torch.bmm(self.coef, self.base.detach()[:, :, None])[:, :, 0]
            return lin - lin + self.values


class Route(Protocol):
    """A way to linearise a closure: ``route(closure, params, rows) -> Linearization | Unsupported``.

    ``params`` are the columns of the Jacobian, in order; ``rows`` validates
    and flattens the closure's output (:class:`RowSpec`). A route that cannot
    handle the model returns :class:`Unsupported` with the reason.
    """

    def __call__(
        self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec
    ) -> Linearization | Unsupported: ...


@dataclass(frozen=True)
class RowSpec:
    r"""What the closure returns and how it becomes Sven's residuals.

    * ``residuals=False``: per-sample losses :math:`\ell`, shape ``(B,)``;
      :math:`R = \ell^{\kappa/2}` and :math:`M = \partial R/\partial\theta`
      (:func:`sven.functional.residual_jacobian`).
    * ``residuals=True``: residuals of any shape, flattened to rows; the loss
      is their square.
    """

    residuals: bool = False
    kappa: float = 2.0

    def __call__(self, out: Any) -> torch.Tensor:
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
            return out if out.dim() == 1 else out.reshape(-1)
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

    def linear(self, out: Any) -> LinearRows | None:
        """The rows of ``out`` as :class:`LinearRows`, where they are a fixed linear map of a tensor with a graph
        (then instead of ``self(out)``: the same rows, no graph of their own), else ``None`` (call ``self(out)``)."""
        return None

    def evaluated(self, out: Any) -> torch.Tensor:
        """The rows of the closure's output ``out`` re-evaluated after a step (for the step control)."""
        return self(out)

    def output(self, local: torch.Tensor) -> torch.Tensor:
        """What ``step`` returns for this rank's detached rows ``local``: the rows themselves."""
        return local

    def residuals_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The residuals ``R`` of detached rows."""
        return rows if self.residuals else SF.residuals_from_losses(rows, kappa=self.kappa)

    def mean_loss(self, rows: torch.Tensor) -> float:
        """The mean batch loss of rows (losses, or residuals whose squares are the losses)."""
        return float((rows.pow(2) if self.residuals else rows).mean())

    def residualize(
        self, rows: torch.Tensor, J: torch.Tensor | GramOperator
    ) -> tuple[torch.Tensor, torch.Tensor | GramOperator]:
        r"""``(R, M)`` from the rows and their Jacobian (a row scaling of ``J`` when :math:`\kappa \ne 2`)."""
        if self.residuals:
            return rows, J
        if isinstance(J, torch.Tensor):
            return SF.residual_jacobian(rows, J, kappa=self.kappa)
        R, scale = SF.residual_scale(rows, kappa=self.kappa)
        return R, (row_transform(J, scale) if self.kappa != 2.0 else J)


class RowTransformed:
    r"""``M = S J`` for a row transform ``S``: ``gram`` :math:`= S K S^\top`, products through ``J``.

    Built by :func:`row_transform`; satisfies :class:`GramOperator`, so it can
    be transformed again and handed to :func:`truncpinv.pinv_from_gram`.
    """

    def __init__(self, base: GramOperator, S: torch.Tensor) -> None:
        n = base.shape[0]
        if S.dim() not in (1, 2):
            raise ValueError(f"`S` must be a vector (diagonal) or a matrix, got shape {tuple(S.shape)}")
        if S.dim() == 1 and S.shape[0] != n:
            raise ValueError(f"`S` as a vector scales the {n} rows, so it needs {n} entries, got {S.shape[0]}")
        if S.dim() == 2 and S.shape[1] != n:
            raise ValueError(f"`S` must have {n} columns to act on the {n} rows, got shape {tuple(S.shape)}")
        self.base = base
        self.S = S
        K = base.gram
        S64 = S.to(torch.float64)
        self.gram = S64[:, None] * K * S64[None, :] if S.dim() == 1 else S64 @ K @ S64.T

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.S.shape[0]), self.base.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def _apply(self, Y: torch.Tensor, transpose: bool) -> torch.Tensor:
        S = self.S.to(Y.dtype)
        if S.dim() == 1:
            return S[:, None] * Y if Y.dim() == 2 else S * Y
        return (S.T if transpose else S) @ Y

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``M^T Y = J^T (S^T Y)``."""
        return self.base.rmatmat(self._apply(Y.to(self.dtype), transpose=True))

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``M X = S (J X)``."""
        return self._apply(self.base.matmat(X), transpose=False)


def row_transform(G: GramOperator, S: torch.Tensor) -> RowTransformed:
    r"""The rows of ``G`` transformed by ``S``: :math:`M = S J`, :math:`K_M = S K S^\top`.

    Products go through ``J``: :math:`M^\top c = J^\top (S^\top c)`, :math:`M x = S (J x)`.

    Args:
        G: a :class:`~sven.linearize.gram.GramJacobian` (or another :class:`GramOperator`), ``N x P``.
        S: ``(N,)`` row scales (``M = diag(s) J``, e.g. the residual scaling of
            ``kappa``) or an ``(M, N)`` matrix (e.g. microbatch averaging).

    Example:
        >>> import torch
        >>> from sven.linearize import LayerGram, row_transform
        >>> lin = torch.nn.Linear(3, 1).double()
        >>> x = torch.randn(6, 3, dtype=torch.float64)
        >>> G = LayerGram()(lambda: lin(x).squeeze(-1) ** 2, list(lin.parameters()), rows=lambda t: t)
        >>> M = row_transform(G, 0.5 * torch.ones(6, dtype=torch.float64))
        >>> bool(torch.allclose(M.gram, 0.25 * G.gram))
        True
    """
    return RowTransformed(G, S)


class WithGram:
    """A matrix-free operator together with its Gram matrix (what the matrix-free route returns).

    ``keeps_graph``: its products differentiate through the closure's graph, so the
    step control changes the parameters without bumping their version counters
    (:func:`sven.params.apply_direction`).
    """

    keeps_graph = True

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
