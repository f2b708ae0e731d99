r"""Physics-informed residuals for Sven: derivatives, terms, collocation points and a full-batch preset.

A PINN for :math:`-\Delta u = f` in :math:`\Omega`, :math:`u = g` on :math:`\partial\Omega`
minimises :math:`\|R(\theta)\|^2` with the residuals

.. math::

    R(\theta) = \Big( \tfrac{1}{\sqrt{n}}\big(\Delta u_\theta(x_i) + f(x_i)\big) \Big)_{i \le n}
    \,\oplus\, \Big( \tfrac{1}{\sqrt{m}}\big(u_\theta(y_j) - g(y_j)\big) \Big)_{j \le m}.

Each residual is a function of one point, written with the :mod:`torch.func`
derivatives below; :class:`Term` collects one kind of residual over its points
and :class:`Residuals` the terms of a problem. ``Residuals`` is a closure:
``opt.step(problem)`` with :func:`optimizer` (a configured :class:`sven.Sven`)
takes the minimum-norm Gauss--Newton step :math:`-M^+R` with the Jacobian from
the pointwise route (:mod:`sven.linearize.pointwise`), about 15 ms for the 1020 x 129
Poisson Jacobian on one CPU thread.

Example:
    >>> import math, torch
    >>> from sven import pinn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    >>> box = pinn.Box([0, 0], [1, 1])
    >>> f = lambda x: 2 * math.pi**2 * torch.sin(math.pi * x[0]) * torch.sin(math.pi * x[1])
    >>> problem = pinn.Residuals(net, [
    ...     pinn.Term(lambda u, x: pinn.laplacian(u, x) + f(x), box.interior(400, seed=0), name="pde"),
    ...     pinn.dirichlet(box.boundary(80, seed=1)),
    ... ])
    >>> opt = pinn.optimizer(net.parameters())
    >>> first = float(problem().pow(2).sum())
    >>> for _ in range(20):
    ...     _ = opt.step(problem)
    >>> float(problem().pow(2).sum()) < 1e-3 * first
    True

All the derivatives take ``u`` (a function of one point ``x`` of shape ``(d,)``)
and ``x``; their results have the shape of ``u(x)`` followed by the derivative's
own axes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jacfwd, jacrev, jvp

from .linearize.pointwise import Residuals, Term
from .optim import Sven

__all__ = [
    "PRESET",
    "Box",
    "Residuals",
    "Term",
    "derivative",
    "dirichlet",
    "divergence",
    "gradient",
    "hessian",
    "laplacian",
    "optimizer",
]

Fn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- derivatives at one point
def gradient(u: Fn, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_x u(x)`: shape ``u(x).shape + (d,)`` (reverse mode, :func:`torch.func.jacrev`)."""
    return jacrev(u)(x)  # type: ignore[no-any-return]


def hessian(u: Fn, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial^2 u / \partial x_i \partial x_j`: shape ``u(x).shape + (d, d)`` (forward over reverse)."""
    return jacfwd(jacrev(u))(x)  # type: ignore[no-any-return]


def laplacian(u: Fn, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\Delta u(x) = \sum_i \partial^2 u / \partial x_i^2`, one per output: shape ``u(x).shape``.

    The trace of :func:`hessian` (``d`` forward-mode passes over one reverse
    pass); for ``u = x_0^2 + x_1^2`` it is 4 everywhere.
    """
    return hessian(u, x).diagonal(dim1=-2, dim2=-1).sum(-1)


def divergence(v: Fn, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla\cdot v(x) = \sum_i \partial v_i/\partial x_i` of a field ``v(x)`` of shape ``(..., d)``.

    Shape ``v(x).shape[:-1]``; ``divergence(lambda z: gradient(u, z)[0], x)`` is the Laplacian.
    """
    d = x.shape[-1]
    J = jacrev(v)(x)
    if J.dim() < 2 or J.shape[-2] != d:
        raise ValueError(
            f"`v` must return a vector field with {d} components (its last axis) at a point of dimension {d}, "
            f"got an output of shape {tuple(J.shape[:-1])}"
        )
    return J.diagonal(dim1=-2, dim2=-1).sum(-1)


def derivative(u: Fn, x: torch.Tensor, *index: int) -> torch.Tensor:
    r"""The partial derivative :math:`\partial^k u / \partial x_{i_1} \cdots \partial x_{i_k}` at ``x``.

    ``derivative(u, x, 0, 0)`` is :math:`u_{x_0 x_0}`, ``derivative(u, x, 1)`` is
    :math:`u_{x_1}`, ``derivative(u, x)`` is ``u(x)``. Nested forward-mode
    directional derivatives (:func:`torch.func.jvp`): ``k`` forward passes
    deep, no Hessian formed. Shape ``u(x).shape``.
    """
    d = x.shape[-1]
    f = u
    for j, i in enumerate(index):
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= int(i) < d:
            raise ValueError(f"`index[{j}]` must be an integer in [0, {d}) for points of dimension {d}, got {i!r}")
        f = _partial(f, int(i))
    return f(x)


def _partial(f: Fn, i: int) -> Fn:
    def g(z: torch.Tensor) -> torch.Tensor:
        e = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
        e[i] = 1
        return jvp(f, (z,), (e,))[1]  # type: ignore[no-any-return]

    return g


# --------------------------------------------------------------------------- terms
def dirichlet(
    points: torch.Tensor,
    value: float | Fn = 0.0,
    *,
    weight: Any = "mean",
    name: str = "boundary",
) -> Term:
    r"""The boundary term :math:`w\,(u(y_j) - g(y_j))`: ``value`` is a number or ``g(y) -> tensor``.

    Args:
        points: ``(m, d)`` boundary points (e.g. :meth:`Box.boundary`).
        value: the prescribed :math:`g` (a number, a NumPy scalar, or a function of one point).
        weight: as :class:`Term` (default :math:`1/\sqrt{m}`).
        name: the term's label.
    """
    if callable(value):
        g = value
        return Term(lambda u, y: u(y) - g(y), points, weight=weight, name=name)
    c = _real("value", value)
    return Term(lambda u, y: u(y) - c, points, weight=weight, name=name)


# --------------------------------------------------------------------------- collocation points
def _real(name: str, v: Any) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"`{name}` must be a finite real number, got {v!r}")
    return float(v)


def _count(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {n!r}")
    return int(n)


@dataclass(frozen=True, init=False)
class Box:
    r"""The box :math:`\prod_i [a_i, b_i]` and its collocation points.

    Args:
        lower, upper: the corners :math:`a` and :math:`b` (sequences of numbers, :math:`a_i < b_i`).
        dtype: dtype of the points (default ``float64``: PINN residuals lose
            digits to second derivatives in single precision).
        device: device of the points.

    Randomness comes only from the ``seed`` or ``generator`` of each call: the
    same seed gives the same points.
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    dtype: torch.dtype
    device: torch.device

    def __init__(
        self,
        lower: Sequence[float],
        upper: Sequence[float],
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        lo = [_real(f"lower[{i}]", v) for i, v in enumerate(_seq("lower", lower))]
        hi = [_real(f"upper[{i}]", v) for i, v in enumerate(_seq("upper", upper))]
        if len(lo) != len(hi) or not lo:
            raise ValueError(f"`lower` and `upper` must have the same positive length, got {len(lo)} and {len(hi)}")
        for i, (a, b) in enumerate(zip(lo, hi)):
            if not a < b:
                raise ValueError(f"`lower[{i}]` must be less than `upper[{i}]`, got {a} and {b}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
        object.__setattr__(self, "lower", tuple(lo))
        object.__setattr__(self, "upper", tuple(hi))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "device", torch.device(device))

    @property
    def dim(self) -> int:
        """The dimension ``d``."""
        return len(self.lower)

    def _tensor(self, v: Sequence[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=self.dtype, device=self.device)

    def interior(self, n: int, *, seed: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, d)`` points drawn uniformly in the box (``generator`` wins over ``seed``)."""
        n = _count("n", n)
        gen = _generator(seed, generator, self.device)
        lo, hi = self._tensor(self.lower), self._tensor(self.upper)
        u = torch.rand(n, self.dim, generator=gen, dtype=self.dtype, device=self.device)
        return lo + (hi - lo) * u

    def boundary(self, n: int, *, seed: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""``(n, d)`` points drawn uniformly on the boundary.

        Face :math:`x_j = a_j` (then :math:`x_j = b_j`, for ``j = 0, 1, ...``)
        gets a share of the ``n`` points proportional to its area (largest
        remainder; the unit square's 120 points are 30 per side), uniform on the face.
        """
        n = _count("n", n)
        gen = _generator(seed, generator, self.device)
        lo, hi = self._tensor(self.lower), self._tensor(self.upper)
        side = hi - lo
        d = self.dim
        areas = [float(side.prod() / side[j]) for j in range(d) for _ in (0, 1)]
        share = [n * a / sum(areas) for a in areas]
        counts = [math.floor(s) for s in share]
        by_remainder = sorted(range(len(share)), key=lambda f: (counts[f] - share[f], f))
        for f in by_remainder[: n - sum(counts)]:
            counts[f] += 1
        pts = []
        for f, c in enumerate(counts):
            if c == 0:
                continue
            j, upper = divmod(f, 2)
            p = lo + side * torch.rand(c, d, generator=gen, dtype=self.dtype, device=self.device)
            p[:, j] = hi[j] if upper else lo[j]
            pts.append(p)
        return torch.cat(pts)

    def grid(self, k: int) -> torch.Tensor:
        """``(k**d, d)`` points of the tensor grid with ``k`` equispaced points per axis, corners included."""
        k = _count("k", k)
        axes = [torch.linspace(a, b, k, dtype=self.dtype, device=self.device) for a, b in zip(self.lower, self.upper)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, self.dim)


def _seq(name: str, v: Any) -> list[Any]:
    if isinstance(v, torch.Tensor):
        return list(v.reshape(-1).tolist())
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
        raise ValueError(f"`{name}` must be a sequence of numbers (one per dimension), got {v!r}")
    return list(v)


def _generator(seed: Any, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


# --------------------------------------------------------------------------- the full-batch preset
#: The settings of :func:`optimizer`: full-batch Gauss--Newton in float64.
#:
#: * ``residuals=True``: :class:`Residuals` returns residuals, not losses;
#: * ``rank=None``, ``rtol=1e-10``: keep every direction above the round-off of
#:   the Jacobian; the damping, not the truncation, regularises;
#: * ``adaptive_damping=True``, ``lr=1.0``: Levenberg--Marquardt. Undamped
#:   (``lr=1``, no damping) the first steps overshoot and diverge.
#: * ``scale=False``: damping relative to the largest singular value, without
#:   Moré's column scaling, so the Gram and pointwise routes still apply.
PRESET: dict[str, Any] = {
    "lr": 1.0,
    "residuals": True,
    "rank": None,
    "rtol": 1e-10,
    "adaptive_damping": True,
    "scale": False,
}


def optimizer(params: Any, **overrides: Any) -> Sven:
    """A :class:`sven.Sven` configured for full-batch PINNs (:data:`PRESET`), with ``overrides`` on top.

    Example: ``opt = sven.pinn.optimizer(net.parameters(), damping=1e-2)``; then
    ``opt.step(problem)`` for a :class:`Residuals` ``problem``.
    """
    return Sven(params, **{**PRESET, **overrides})
