r"""The pointwise route: residuals that differentiate the network with respect to its inputs (PINNs).

A physics-informed residual at a collocation point :math:`x_i` is a function of
the network *and its input derivatives* there, e.g. for :math:`-\Delta u = f`

.. math::

    r_i(\theta) = w\,\big(\Delta_x u_\theta(x_i) + f(x_i)\big), \qquad w = 1/\sqrt{n}.

Written as a batched closure (``torch.autograd.grad(..., create_graph=True)``
with respect to the inputs), the rows' Jacobian :math:`\partial r/\partial\theta`
can only be had by batched double backward, which PyTorch runs row by row
(about 5 s for the 1020 x 129 Poisson Jacobian). Written *per point*, the
same Jacobian is one transform:

.. math::

    J = \operatorname{vmap}_{x_i}\Big(\operatorname{jacrev}_\theta\big[\, w\, \mathcal{R}(u_\theta, x_i)\big]\Big),

where :math:`u_\theta(x) = \text{module}(x[\text{None}])[0]` is the network at
one point (:func:`torch.func.functional_call`) and :math:`\mathcal{R}` uses
:mod:`torch.func` for the input derivatives (``sven.pinn.laplacian`` is
``jacfwd(jacrev(u))``). One reverse pass per point gives its row together with
the residual itself; on one CPU thread the Poisson Jacobian takes about 15 ms.

:class:`Term` and :class:`Residuals` describe the problem; calling a
:class:`Residuals` returns the weighted residual vector with its autograd graph
(so every other route, and the step control's re-evaluation, work unchanged);
:class:`PointwiseRoute` computes its Jacobian. The user-facing helpers are in
:mod:`sven.pinn`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .base import Linearization, RowSpec, Unsupported

__all__ = ["PointwiseRoute", "Residuals", "Term"]

#: A residual at one point: ``residual(u, x, *data) -> tensor`` with ``u(x)`` the network at the point ``x``.
PointResidual = Callable[..., torch.Tensor]


def _weight(weight: Any, n: int) -> float:
    """The term weight as a float: ``"mean"`` is :math:`1/\\sqrt{n}`, so the term's squared norm is its mean square."""
    if isinstance(weight, str):
        if weight != "mean":
            raise ValueError(f"`weight` must be a non-negative number or 'mean' (1/sqrt(n)), got {weight!r}")
        return 1.0 / math.sqrt(n)
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise ValueError(f"`weight` must be a non-negative finite number or 'mean', got {weight!r}")
    if float(weight) < 0:
        raise ValueError(f"`weight` must be non-negative (it multiplies the residual), got {float(weight)!r}")
    return float(weight)


@dataclass(frozen=True, init=False)
class Term:
    r"""One group of residuals: ``residual(u, x_i, *data_i)`` at each of ``n`` points, times ``weight``.

    Args:
        residual: ``residual(u, x, *data) -> tensor`` for *one* point ``x`` (shape
            ``(d,)``); ``u(x)`` is the network's output at a point (shape ``(m,)``
            for a model ending in ``Linear(..., m)``). Use :mod:`torch.func`
            derivatives of ``u`` (``sven.pinn.laplacian``, ``gradient``, ...),
            not ``torch.autograd.grad``. It may return any shape; the rows of
            the term are its entries, point by point.
        points: ``(n, d)`` collocation points.
        data: tensors with ``n`` rows passed point by point after ``x``
            (targets, coefficients, normals).
        weight: a non-negative number, or ``"mean"`` (default) for
            :math:`1/\sqrt{n}`, so that the term's sum of squares is its mean
            squared residual.
        name: a label for messages and diagnostics.
    """

    residual: PointResidual
    points: torch.Tensor
    data: tuple[torch.Tensor, ...]
    weight: float
    name: str

    def __init__(
        self,
        residual: PointResidual,
        points: torch.Tensor,
        *,
        data: Sequence[torch.Tensor] | torch.Tensor = (),
        weight: Any = "mean",
        name: str = "term",
    ) -> None:
        if not callable(residual):
            raise TypeError(f"`residual` must be callable as residual(u, x, *data), got {type(residual).__name__}")
        if not isinstance(points, torch.Tensor) or not points.is_floating_point():
            got = points.dtype if isinstance(points, torch.Tensor) else type(points).__name__
            raise TypeError(f"`points` must be a floating-point tensor of shape (n, d), got {got}")
        if points.dim() != 2 or points.shape[0] == 0 or points.shape[1] == 0:
            raise ValueError(f"`points` must have shape (n, d) with n, d >= 1, got {tuple(points.shape)}")
        if not bool(torch.isfinite(points).all()):
            raise ValueError("`points` must be finite, but it contains NaN or Inf")
        items = (data,) if isinstance(data, torch.Tensor) else tuple(data)
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != points.shape[0]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"`data[{i}]` must be a tensor with {points.shape[0]} rows (one per point), got {shape}"
                )
        object.__setattr__(self, "residual", residual)
        object.__setattr__(self, "points", points.detach())
        object.__setattr__(self, "data", tuple(t.detach() for t in items))
        object.__setattr__(self, "weight", _weight(weight, points.shape[0]))
        object.__setattr__(self, "name", str(name))

    def point_function(self, module: nn.Module, params: Mapping[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``r(params, x, *data)``: the weighted residual at one point, a pure function of ``params``.

        ``params`` given here are the module's other parameters (held fixed);
        the ones passed to ``r`` override them.
        """
        buffers = dict(module.named_buffers())

        def r(active: dict[str, torch.Tensor], x: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
            state = {**params, **active}

            def u(z: torch.Tensor) -> torch.Tensor:
                return functional_call(module, (state, buffers), (z[None],))[0]  # type: ignore[no-any-return]

            return self.weight * self.residual(u, x, *data)

        return r


class Residuals:
    r"""A residual vector made of :class:`Term` s on one network: the closure of a PINN.

    ``residuals()`` returns the weighted residuals of every term, concatenated
    (term by term, point by point), with their autograd graph with respect to
    ``module``'s parameters. :class:`sven.Sven` recognises the object and
    computes the Jacobian with :class:`PointwiseRoute` (``opt.step(problem)``).

    Args:
        module: the network; it is called on a batch of one point, ``module(x[None])``,
            so it must treat points independently (no BatchNorm in training mode).
        terms: the terms (at least one).
    """

    def __init__(self, module: nn.Module, terms: Sequence[Term]) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
        terms = [terms] if isinstance(terms, Term) else list(terms)
        if not terms:
            raise ValueError("`terms` must hold at least one sven.pinn.Term")
        dtypes = {p.dtype for p in module.parameters()}
        for i, t in enumerate(terms):
            if not isinstance(t, Term):
                raise TypeError(f"`terms[{i}]` must be a sven.pinn.Term, got {type(t).__name__}")
            if dtypes and t.points.dtype not in dtypes:
                raise TypeError(
                    f"`terms[{i}]` ({t.name!r}) has points of dtype {t.points.dtype}, but the module's parameters "
                    f"are {sorted(map(str, dtypes))}; convert the points with .to({next(iter(dtypes))})"
                )
        self.module = module
        self.terms = terms

    def __call__(self) -> torch.Tensor:
        """The residual vector with its graph with respect to the module's parameters."""
        params = dict(self.module.named_parameters())
        out = []
        for t in self.terms:
            r = t.point_function(self.module, params)
            out.append(vmap(r, in_dims=(None, 0, *(0 for _ in t.data)))({}, t.points, *t.data).reshape(-1))
        return torch.cat(out)

    def __repr__(self) -> str:
        terms = ", ".join(f"{t.name}: {t.points.shape[0]} points" for t in self.terms)
        return f"Residuals({type(self.module).__name__}, [{terms}])"


class PointwiseRoute:
    r"""The Jacobian of a :class:`Residuals` closure: ``vmap`` over points of ``jacrev`` over parameters.

    For each term, ``vmap(jacrev(r, has_aux=True))`` over its points returns
    the rows and their ``(n_rows, P)`` Jacobian in one reverse pass per point;
    parameters of the module that are not optimised are held fixed. Returns
    :class:`~sven.linearize.base.Unsupported` for any other closure, or when an
    optimised parameter is not the module's (a residual could capture it: the
    exact dense route applies then).

    Args:
        chunk_size: points per vmapped call (``None``: all at once); bounds
            the memory of the intermediate per-point Jacobians.
    """

    name = "pointwise"

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def __call__(
        self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec
    ) -> Linearization | Unsupported:
        if not isinstance(closure, Residuals):
            return Unsupported("the closure is not a sven.pinn.Residuals object", None)
        if not rows.residuals:
            raise ValueError(
                "a sven.pinn.Residuals closure returns residuals, not per-sample losses: pass residuals=True to "
                "sven.Sven (sven.pinn.optimizer does)"
            )
        names = {id(p): n for n, p in closure.module.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            return Unsupported(f"optimised parameter {missing[0]} is not a parameter of the Residuals' module", None)
        active = {names[id(p)]: p.detach() for p in params}
        frozen = {n: p.detach() for n, p in closure.module.named_parameters() if n not in active}
        values, jacs = [], []
        for t in closure.terms:
            r = t.point_function(closure.module, frozen)

            def with_aux(
                a: dict[str, torch.Tensor], *xs: torch.Tensor, r: Any = r
            ) -> tuple[torch.Tensor, torch.Tensor]:
                out = r(a, *xs)
                return out, out

            dims = (None, 0, *(0 for _ in t.data))
            jac, val = vmap(jacrev(with_aux, has_aux=True), in_dims=dims, chunk_size=self.chunk_size)(
                active, t.points, *t.data
            )
            n = val.numel()
            values.append(val.reshape(-1))
            jacs.append(torch.cat([jac[k].reshape(n, -1) for k in active], dim=1))
        out = torch.cat(values).detach()
        return Linearization(out, out, torch.cat(jacs).detach(), self.name)
