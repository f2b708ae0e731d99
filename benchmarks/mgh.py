r"""The 35 Moré--Garbow--Hillstrom least-squares test problems, as torch residual functions.

J. J. Moré, B. S. Garbow and K. E. Hillstrom, "Testing unconstrained
optimization software", ACM TOMS 7(1), 1981, pp. 17--41. Each problem is
``f(x) = sum_i r_i(x)^2`` from the paper's standard starting point; ``fstar``
lists the minima the paper publishes for the chosen size (a problem may list
several local minima: reaching any of them counts as solved).

Every residual function takes a float64 tensor ``x`` of shape ``(n,)`` and
returns the ``(m,)`` residuals, written with torch operations only, so that
:mod:`torch.func` and autograd differentiate them. The sizes ``n``, ``m`` of
the problems with a free dimension are the usual choices of MINPACK's test
driver (``n = 10`` for the variably dimensioned problems).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["PROBLEMS", "Problem", "solved"]

_F64 = torch.float64


def _t(values: list[float] | tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=_F64)


@dataclass(frozen=True)
class Problem:
    """One MGH problem: ``fun(x) -> r`` (``(m,)``), the standard start ``x0`` and the published minima ``fstar``."""

    number: int
    name: str
    fun: Callable[[torch.Tensor], torch.Tensor]
    x0: tuple[float, ...]
    m: int
    fstar: tuple[float, ...]
    #: relative tolerance of "solved": 1e-6, or half a unit in the last digit the paper publishes
    rtol: float = 1e-6

    @property
    def n(self) -> int:
        return len(self.x0)

    def start(self) -> torch.Tensor:
        return _t(self.x0)


def solved(f: float, fstar: tuple[float, ...], *, rtol: float = 1e-6, zero: float = 1e-10) -> bool:
    """``f = sum r^2`` within ``rtol`` (relative) of one published minimum; ``f <= zero`` for a minimum of 0."""
    if not math.isfinite(f):
        return False
    return any(f <= zero if s == 0.0 else abs(f - s) <= rtol * s for s in fstar)


# --------------------------------------------------------------------------- 1-18: fixed sizes
def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def freudenstein_roth(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1], -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1]])


def powell_badly_scaled(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([1e4 * x[0] * x[1] - 1, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2])


_BEALE_Y = _t([1.5, 2.25, 2.625])


def beale(x: torch.Tensor) -> torch.Tensor:
    i = torch.arange(1, 4, dtype=_F64)
    return _BEALE_Y - x[0] * (1 - x[1] ** i)


def jennrich_sampson(x: torch.Tensor) -> torch.Tensor:
    i = torch.arange(1, 11, dtype=_F64)
    return 2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def helical_valley(x: torch.Tensor) -> torch.Tensor:
    theta = torch.atan(x[1] / x[0]) / (2 * math.pi) + torch.where(x[0] < 0, 0.5, 0.0)
    return torch.stack([10 * (x[2] - 10 * theta), 10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1), x[2]])


_BARD_Y = _t([0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39])


def bard(x: torch.Tensor) -> torch.Tensor:
    u = torch.arange(1, 16, dtype=_F64)
    v = 16 - u
    w = torch.minimum(u, v)
    return _BARD_Y - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSS_Y = _t([0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989,
               0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009])  # fmt: skip


def gaussian(x: torch.Tensor) -> torch.Tensor:
    t = (8 - torch.arange(1, 16, dtype=_F64)) / 2
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _GAUSS_Y


_MEYER_Y = _t([34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744,
               8261, 7030, 6005, 5147, 4427, 3820, 3307, 2872])  # fmt: skip


def meyer(x: torch.Tensor) -> torch.Tensor:
    t = 45 + 5 * torch.arange(1, 17, dtype=_F64)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _MEYER_Y


_GULF_M = 10


def gulf(x: torch.Tensor) -> torch.Tensor:
    t = torch.arange(1, _GULF_M + 1, dtype=_F64) / 100
    y = 25 + (-50 * torch.log(t)) ** (2 / 3)
    return torch.exp(-(torch.abs(y - x[1]) ** x[2]) / x[0]) - t


def box3d(x: torch.Tensor) -> torch.Tensor:
    t = 0.1 * torch.arange(1, 11, dtype=_F64)
    return torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))


def powell_singular(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[0] + 10 * x[1], math.sqrt(5) * (x[2] - x[3]), (x[1] - 2 * x[2]) ** 2,
                        math.sqrt(10) * (x[0] - x[3]) ** 2])  # fmt: skip


def wood(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([
        10 * (x[1] - x[0] ** 2), 1 - x[0], math.sqrt(90) * (x[3] - x[2] ** 2), 1 - x[2],
        math.sqrt(10) * (x[1] + x[3] - 2), (x[1] - x[3]) / math.sqrt(10),
    ])  # fmt: skip


_KO_Y = _t([0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246])
_KO_U = _t([4, 2, 1, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625])


def kowalik_osborne(x: torch.Tensor) -> torch.Tensor:
    u = _KO_U
    return _KO_Y - x[0] * (u * u + u * x[1]) / (u * u + u * x[2] + x[3])


def brown_dennis(x: torch.Tensor) -> torch.Tensor:
    t = torch.arange(1, 21, dtype=_F64) / 5
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


_OS1_Y = _t([0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751, 0.718, 0.685, 0.658,
             0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490, 0.478, 0.467, 0.457, 0.448, 0.438, 0.431,
             0.424, 0.420, 0.414, 0.411, 0.406])  # fmt: skip


def osborne1(x: torch.Tensor) -> torch.Tensor:
    t = 10 * torch.arange(0, 33, dtype=_F64)
    return _OS1_Y - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


def biggs_exp6(x: torch.Tensor) -> torch.Tensor:
    t = 0.1 * torch.arange(1, 14, dtype=_F64)
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    return x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y


_OS2_Y = _t([1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746, 0.679, 0.608, 0.655,
             0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649, 0.694, 0.644, 0.624, 0.661, 0.612, 0.558,
             0.533, 0.495, 0.500, 0.423, 0.395, 0.375, 0.372, 0.391, 0.396, 0.405, 0.428, 0.429, 0.523, 0.562,
             0.607, 0.653, 0.672, 0.708, 0.633, 0.668, 0.645, 0.632, 0.591, 0.559, 0.597, 0.625, 0.739, 0.710,
             0.729, 0.720, 0.636, 0.581, 0.428, 0.292, 0.162, 0.098, 0.054])  # fmt: skip


def osborne2(x: torch.Tensor) -> torch.Tensor:
    t = torch.arange(0, 65, dtype=_F64) / 10
    return _OS2_Y - (
        x[0] * torch.exp(-t * x[4])
        + x[1] * torch.exp(-((t - x[8]) ** 2) * x[5])
        + x[2] * torch.exp(-((t - x[9]) ** 2) * x[6])
        + x[3] * torch.exp(-((t - x[10]) ** 2) * x[7])
    )


# --------------------------------------------------------------------------- 20-35: free sizes
def watson(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    t = torch.arange(1, 30, dtype=_F64)[:, None] / 29
    j = torch.arange(1, n + 1, dtype=_F64)
    s1 = ((j[1:] - 1) * x[1:] * t ** (j[1:] - 2)).sum(dim=1)
    s2 = (x * t ** (j - 1)).sum(dim=1)
    return torch.cat([s1 - s2**2 - 1, x[:1], (x[1] - x[0] ** 2 - 1)[None]])


def extended_rosenbrock(x: torch.Tensor) -> torch.Tensor:
    odd, even = x[0::2], x[1::2]
    return torch.stack([10 * (even - odd**2), 1 - odd], dim=1).reshape(-1)


def extended_powell(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return torch.stack([a + 10 * b, math.sqrt(5) * (c - d), (b - 2 * c) ** 2, math.sqrt(10) * (a - d) ** 2],
                       dim=1).reshape(-1)  # fmt: skip


def penalty1(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([math.sqrt(1e-5) * (x - 1), (x.pow(2).sum() - 0.25)[None]])


def penalty2(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    a = math.sqrt(1e-5)
    i = torch.arange(2, n + 1, dtype=_F64)
    y = torch.exp(i / 10) + torch.exp((i - 1) / 10)
    mid = a * (torch.exp(x[1:] / 10) + torch.exp(x[:-1] / 10) - y)
    tail = a * (torch.exp(x[1:] / 10) - math.exp(-0.1))
    w = torch.arange(n, 0, -1, dtype=_F64)
    return torch.cat([(x[0] - 0.2)[None], mid, tail, ((w * x**2).sum() - 1)[None]])


def variably_dimensioned(x: torch.Tensor) -> torch.Tensor:
    j = torch.arange(1, x.shape[0] + 1, dtype=_F64)
    s = (j * (x - 1)).sum()
    return torch.cat([x - 1, s[None], (s**2)[None]])


def trigonometric(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    i = torch.arange(1, n + 1, dtype=_F64)
    return n - torch.cos(x).sum() + i * (1 - torch.cos(x)) - torch.sin(x)


def brown_almost_linear(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return torch.cat([x[:-1] + x.sum() - (n + 1), (torch.prod(x) - 1)[None]])


def _grid(n: int) -> tuple[float, torch.Tensor]:
    h = 1.0 / (n + 1)
    return h, h * torch.arange(1, n + 1, dtype=_F64)


def discrete_bv(x: torch.Tensor) -> torch.Tensor:
    h, t = _grid(x.shape[0])
    z = x.new_zeros(1)
    left, right = torch.cat([z, x[:-1]]), torch.cat([x[1:], z])
    return 2 * x - left - right + h * h * (x + t + 1) ** 3 / 2


def discrete_integral(x: torch.Tensor) -> torch.Tensor:
    h, t = _grid(x.shape[0])
    g = (x + t + 1) ** 3
    lower = torch.cumsum(t * g, dim=0)  # sum_{j <= i} t_j g_j
    upper = torch.flip(torch.cumsum(torch.flip((1 - t) * g, [0]), dim=0), [0]) - (1 - t) * g  # sum_{j > i}
    return x + h * ((1 - t) * lower + t * upper) / 2


def broyden_tridiagonal(x: torch.Tensor) -> torch.Tensor:
    z = x.new_zeros(1)
    left, right = torch.cat([z, x[:-1]]), torch.cat([x[1:], z])
    return (3 - 2 * x) * x - left - 2 * right + 1


def _banded_mask(n: int) -> torch.Tensor:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return ((j >= i - 5) & (j <= i + 1) & (j != i)).to(_F64)


def broyden_banded(x: torch.Tensor) -> torch.Tensor:
    return x * (2 + 5 * x**2) + 1 - _banded_mask(x.shape[0]) @ (x * (1 + x))


_LIN_M = 10


def linear_full_rank(x: torch.Tensor) -> torch.Tensor:
    n, s = x.shape[0], x.sum()
    return torch.cat([x - 2 * s / _LIN_M - 1, (-2 * s / _LIN_M - 1).expand(_LIN_M - n)])


def linear_rank1(x: torch.Tensor) -> torch.Tensor:
    j = torch.arange(1, x.shape[0] + 1, dtype=_F64)
    i = torch.arange(1, _LIN_M + 1, dtype=_F64)
    return i * (j * x).sum() - 1


def linear_rank1_zero(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    j = torch.arange(2, n, dtype=_F64)
    s = (j * x[1:-1]).sum()
    i = torch.arange(2, _LIN_M, dtype=_F64)
    one = x.new_ones(1)
    return torch.cat([-one, (i - 1) * s - 1, -one])


def chebyquad(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    y = 2 * x - 1  # shifted to [-1, 1]
    T = [torch.ones_like(y), y]
    for _ in range(2, n + 1):
        T.append(2 * y * T[-1] - T[-2])
    i = torch.arange(1, n + 1)
    integral = torch.where(i % 2 == 0, -1.0 / (i.to(_F64) ** 2 - 1), torch.zeros(n, dtype=_F64))
    return torch.stack([T[k].mean() for k in range(1, n + 1)]) - integral


def _n(k: int, v: float) -> tuple[float, ...]:
    return (v,) * k


_TEN = 10
PROBLEMS: list[Problem] = [
    Problem(1, "Rosenbrock", rosenbrock, (-1.2, 1.0), 2, (0.0,)),
    Problem(2, "Freudenstein-Roth", freudenstein_roth, (0.5, -2.0), 2, (0.0, 48.9842536792400)),
    Problem(3, "Powell badly scaled", powell_badly_scaled, (0.0, 1.0), 2, (0.0,)),
    Problem(4, "Brown badly scaled", brown_badly_scaled, (1.0, 1.0), 3, (0.0,)),
    Problem(5, "Beale", beale, (1.0, 1.0), 3, (0.0,)),
    Problem(6, "Jennrich-Sampson", jennrich_sampson, (0.3, 0.4), 10, (124.362182355,)),
    Problem(7, "Helical valley", helical_valley, (-1.0, 0.0, 0.0), 3, (0.0,)),
    Problem(8, "Bard", bard, (1.0, 1.0, 1.0), 15, (8.21487730657e-3, 17.4286114400)),
    Problem(9, "Gaussian", gaussian, (0.4, 1.0, 0.0), 15, (1.12793276961e-8,)),
    Problem(10, "Meyer", meyer, (0.02, 4000.0, 250.0), 16, (87.9458551718,)),
    Problem(11, "Gulf research", gulf, (5.0, 2.5, 0.15), _GULF_M, (0.0,)),
    Problem(12, "Box 3-D", box3d, (0.0, 10.0, 20.0), 10, (0.0,)),
    Problem(13, "Powell singular", powell_singular, (3.0, -1.0, 0.0, 1.0), 4, (0.0,)),
    Problem(14, "Wood", wood, (-3.0, -1.0, -3.0, -1.0), 6, (0.0,)),
    Problem(15, "Kowalik-Osborne", kowalik_osborne, (0.25, 0.39, 0.415, 0.39), 11, (3.07505603849e-4,)),
    Problem(16, "Brown-Dennis", brown_dennis, (25.0, 5.0, -5.0, -1.0), 20, (85822.2016263563,)),
    Problem(17, "Osborne 1", osborne1, (0.5, 1.5, -1.0, 0.01, 0.02), 33, (5.46489469748e-5,)),
    Problem(18, "Biggs EXP6", biggs_exp6, (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), 13, (5.65565e-3, 0.0), 1e-5),
    Problem(
        19, "Osborne 2", osborne2, (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5), 65, (4.01377362935e-2,)
    ),
    Problem(20, "Watson (n=6)", watson, _n(6, 0.0), 31, (2.28767005355e-3,)),
    Problem(21, "Extended Rosenbrock (n=10)", extended_rosenbrock, (-1.2, 1.0) * 5, 10, (0.0,)),
    Problem(22, "Extended Powell singular (n=12)", extended_powell, (3.0, -1.0, 0.0, 1.0) * 3, 12, (0.0,)),
    Problem(23, "Penalty I (n=4)", penalty1, (1.0, 2.0, 3.0, 4.0), 5, (2.24997750e-5,)),
    Problem(24, "Penalty II (n=4)", penalty2, _n(4, 0.5), 8, (9.37629031e-6,)),
    Problem(
        25,
        "Variably dimensioned (n=10)",
        variably_dimensioned,
        tuple(1 - j / _TEN for j in range(1, _TEN + 1)),
        _TEN + 2,
        (0.0,),
    ),
    Problem(26, "Trigonometric (n=10)", trigonometric, _n(_TEN, 1 / _TEN), _TEN, (0.0, 2.79506e-5), 2e-6),
    Problem(27, "Brown almost-linear (n=10)", brown_almost_linear, _n(_TEN, 0.5), _TEN, (0.0, 1.0)),
    Problem(
        28,
        "Discrete boundary value (n=10)",
        discrete_bv,
        tuple(float(t * (t - 1)) for t in _grid(_TEN)[1]),
        _TEN,
        (0.0,),
    ),
    Problem(
        29,
        "Discrete integral equation (n=10)",
        discrete_integral,
        tuple(float(t * (t - 1)) for t in _grid(_TEN)[1]),
        _TEN,
        (0.0,),
    ),
    Problem(30, "Broyden tridiagonal (n=10)", broyden_tridiagonal, _n(_TEN, -1.0), _TEN, (0.0,)),
    Problem(31, "Broyden banded (n=10)", broyden_banded, _n(_TEN, -1.0), _TEN, (0.0,)),
    Problem(32, "Linear full rank (n=5, m=10)", linear_full_rank, _n(5, 1.0), _LIN_M, (float(_LIN_M - 5),)),
    Problem(
        33,
        "Linear rank 1 (n=5, m=10)",
        linear_rank1,
        _n(5, 1.0),
        _LIN_M,
        (_LIN_M * (_LIN_M - 1) / (2 * (2 * _LIN_M + 1)),),
    ),
    Problem(
        34,
        "Linear rank 1, zero columns and rows (n=5, m=10)",
        linear_rank1_zero,
        _n(5, 1.0),
        _LIN_M,
        ((_LIN_M**2 + 3 * _LIN_M - 6) / (2 * (2 * _LIN_M - 3)),),
    ),
    Problem(35, "Chebyquad (n=8)", chebyquad, tuple(j / 9 for j in range(1, 9)), 8, (3.51687372e-3,)),
]
