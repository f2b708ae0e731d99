r"""Jacobians without autograd: finite differences of the closure, or a Jacobian the user computes.

Two routes for closures whose rows autograd cannot (or need not) differentiate, the ``jac`` options of
:func:`scipy.optimize.least_squares`:

:class:`FiniteDifferences` (``jacobian="2-point"`` or ``"3-point"``)
    Column :math:`j` of :math:`J = \partial r / \partial\theta` from the closure evaluated with
    :math:`\theta_j` moved by a step :math:`h_j`, every other parameter at its value:

    .. math::

        \text{2-point:}\quad J_{:,j} \approx \frac{r(\theta + h_j e_j) - r(\theta)}{h_j}, \qquad
        \text{3-point:}\quad J_{:,j} \approx \frac{r(\theta + h_j e_j) - r(\theta - h_j e_j)}{2 h_j},

    with scipy's steps (``scipy.optimize._numdiff``):
    :math:`h_j = s\,\operatorname{sign}(\theta_j)\max(1, |\theta_j|)`, :math:`\operatorname{sign}(0) = 1`,
    :math:`s = \sqrt{\epsilon}` (2-point) or :math:`\epsilon^{1/3}` (3-point), :math:`\epsilon` the machine
    epsilon of the coarser of the parameters' and the rows' dtypes; then
    :math:`h_j \leftarrow (\theta_j + h_j) - \theta_j`, the step the dtype actually takes. Those choices balance
    truncation against round-off: the one-sided error is :math:`O(h)` plus :math:`O(\epsilon/h)`, smallest at
    :math:`h \sim \sqrt{\epsilon}`; the central one :math:`O(h^2)` plus :math:`O(\epsilon/h)`, smallest at
    :math:`h \sim \epsilon^{1/3}` (about 8 and 11 correct digits in float64). Cost: :math:`P` (or :math:`2P`)
    evaluations of the closure besides the one at :math:`\theta`, without a graph (:func:`sven.params.closure_mode`).

:class:`GivenJacobian` (``jacobian=callable``)
    ``jac()`` returns the ``(N, P)`` Jacobian at the current parameters (a tensor or an array), its columns in
    the order of the parameters, each flattened row-major; the closure runs once, without a graph, for the rows.

Both move no parameter for good: :class:`FiniteDifferences` writes each perturbed entry back from a copy of
its value (bit-identical), in a ``finally``, also when the closure raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import increment_version

from .._arrays import finite_array
from ..functional import HOST_SMALL, host
from ..params import _set_grad_enabled, closure_mode
from .base import Linearization, RowSpec

__all__ = ["FD_SCHEMES", "NONFINITE", "FiniteDifferences", "GivenJacobian", "fd_steps"]

#: The dtypes of a Jacobian taken as it is (any other real dtype is checked further).
_FLOATS = (torch.float64, torch.float32)
#: The error of a Jacobian with NaN or Inf entries (``name``: the argument that returned it).
NONFINITE = "`{name}` returned a Jacobian with NaN or Inf entries"
#: The finite-difference schemes (the ``jacobian`` values of :class:`sven.Sven`, scipy's ``jac`` strings).
FD_SCHEMES = ("2-point", "3-point")


def fd_steps(x: torch.Tensor, scheme: str, eps: float) -> torch.Tensor:
    r"""scipy's steps :math:`h_j` for the entries ``x``, as the dtype of ``x`` takes them (module docstring).

    :math:`h = s\,\operatorname{sign}(x)\max(1, |x|)` (:math:`\operatorname{sign}(0) = 1`; :math:`s = \sqrt{\epsilon}`
    for ``"2-point"``, :math:`\epsilon^{1/3}` for ``"3-point"``), then :math:`(x + h) - x` in ``x``'s dtype.

    Example:
        >>> import torch
        >>> h = fd_steps(torch.tensor([0.0, -4.0], dtype=torch.float64), "2-point", 2.0**-52)
        >>> [round(v / 2.0**-26, 12) for v in h.tolist()]
        [1.0, -4.0]
    """
    rel = eps**0.5 if scheme == "2-point" else eps ** (1.0 / 3.0)
    h = rel * torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * torch.clamp(x.abs(), min=1.0)
    return (x + h) - x


class FiniteDifferences:
    """The route of ``jacobian="2-point"`` / ``"3-point"``: the materialised Jacobian by finite differences.

    Args:
        scheme: ``"2-point"`` (forward differences, ``P`` extra evaluations) or ``"3-point"`` (central, ``2P``).
    """

    def __init__(self, scheme: str = "2-point") -> None:
        if scheme not in FD_SCHEMES:
            raise ValueError(f"`scheme` must be one of {list(FD_SCHEMES)}, got {scheme!r}")
        self.scheme = scheme

    def __call__(self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec) -> Linearization:
        """Evaluate the closure at the parameters and at each perturbation; the parameters are restored exactly."""
        params = list(params)
        with closure_mode(params):
            r0 = rows(closure()).detach()
            eps = max(float(torch.finfo(r0.dtype).eps), *(float(torch.finfo(p.dtype).eps) for p in params))
            cols = [_columns(closure, rows, p, r0, self.scheme, eps) for p in params]
        J = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
        return Linearization(r0, r0, J, self.scheme)


def _columns(
    closure: Callable[[], Any], rows: RowSpec, p: torch.Tensor, r0: torch.Tensor, scheme: str, eps: float
) -> torch.Tensor:
    """The columns of ``p``'s entries (``(N, p.numel())``), each entry perturbed in place and written back.

    The divisor is the perturbation the dtype took: :math:`x + h - x` (2-point), :math:`(x + h) - (x - h)` (3-point).
    Each entry is written as a Python float, which holds every float32 and float64 value exactly.
    """
    target = p.detach()  # shares the storage and the version counter: autograd sees every write
    if target.dtype == torch.float64:  # the same float64 operations on floats (fd_steps: a few entries, no kernels)
        values = target.reshape(-1).tolist()
        hs = _float_steps(values, scheme, eps)
        ups = [v + h for v, h in zip(values, hs)]
        downs = [v - h for v, h in zip(values, hs)]
        widths = hs if scheme == "2-point" else [u - d for u, d in zip(ups, downs)]
        width = torch.tensor(widths, dtype=r0.dtype, device=r0.device)
    else:
        x = target.reshape(-1).clone()
        h = fd_steps(x, scheme, eps)
        up, down = x + h, x - h
        width = (h if scheme == "2-point" else up - down).to(r0.dtype)
        values, ups, downs = x.tolist(), up.tolist(), down.tolist()
    write = _writer(target)
    plus: list[torch.Tensor] = []
    minus: list[torch.Tensor] = []
    for j in range(len(values)):
        try:
            write(j, ups[j])
            plus.append(_evaluated(closure, rows, r0))
            if scheme == "3-point":
                write(j, downs[j])
                minus.append(_evaluated(closure, rows, r0))
        finally:
            write(j, values[j])
    if not plus:
        return r0.new_zeros(r0.shape[0], 0)
    hi = torch.stack(plus, dim=1)
    return ((hi - torch.stack(minus, dim=1)) if minus else (hi - r0[:, None])) / width


def _float_steps(values: list[float], scheme: str, eps: float) -> list[float]:
    """:func:`fd_steps` of float64 entries given as floats: the same operations, in the same order, one at a time."""
    rel = eps**0.5 if scheme == "2-point" else eps ** (1.0 / 3.0)
    return [(v + (rel * (1.0 if v >= 0 else -1.0)) * max(abs(v), 1.0)) - v for v in values]


def _writer(target: torch.Tensor) -> Callable[[int, float], None]:
    """``write(j, value)``: entry ``j`` (row-major) of ``target`` set to ``value``, its version counter bumped as an
    in-place torch write bumps it. On a NumPy view where ``target`` is a float32 or float64 CPU tensor (a torch
    ``__setitem__`` costs several microseconds); else by torch's indexing (a non-contiguous tensor: its index tuple)."""
    if target.dtype in _FLOATS and target.is_cpu and target.is_contiguous():
        flat = target.view(-1).numpy()  # (the same memory)

        def write(j: int, value: float) -> None:
            flat[j] = value
            increment_version(target)

        return write
    view = target.view(-1) if target.is_contiguous() else None
    shape = tuple(target.shape)

    def write_torch(j: int, value: float) -> None:
        if view is not None:
            view[j] = value
        else:
            target[tuple(int(i) for i in np.unravel_index(j, shape))] = value

    return write_torch


def _evaluated(closure: Callable[[], Any], rows: RowSpec, r0: torch.Tensor) -> torch.Tensor:
    r = rows(closure()).detach()
    if r.shape != r0.shape:
        raise ValueError(
            f"the closure returned {r.shape[0]} rows at a perturbed point but {r0.shape[0]} at the parameters: "
            f"finite differences (`jacobian='2-point'` or `'3-point'`) need the same rows at every point"
        )
    return r if r.dtype == r0.dtype else r.to(r0.dtype)


class GivenJacobian:
    """The route of ``jacobian=callable``: the rows from the closure, the Jacobian from ``jac()``.

    Args:
        jac: ``jac()`` returns the ``(N, P)`` Jacobian of the closure's rows at the current parameters.
        name: the argument named in errors (``"jacobian"``; ``"jac"`` for :func:`sven.least_squares`).
    """

    def __init__(self, jac: Callable[[], Any], *, name: str = "jacobian") -> None:
        if not callable(jac):
            raise TypeError(f"`{name}` must be callable, got {type(jac).__name__}")
        self.jac, self.name = jac, name

    def __call__(
        self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec, *, values: bool = True
    ) -> Linearization:
        """Evaluate the closure (no graph) and ``jac()``; check the Jacobian's kind, shape and values.

        ``jac()`` runs as under ``torch.no_grad()`` (the parameters requiring grad again), the grad mode switched
        directly: a curve fit's step costs tens of microseconds, and the context manager's objects a few.
        ``values=False`` leaves the test of the values to the caller (:data:`NONFINITE` is its error), which
        reads them anyway (the lean step's column norms, :mod:`sven.tiny`).
        """
        with closure_mode(params):
            r0 = rows(closure())
        r0 = r0.detach() if r0.requires_grad else r0
        grad = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            J = self.jac()
        finally:
            _set_grad_enabled(grad)
        width = params[0].numel() if len(params) == 1 else sum(p.numel() for p in params)
        J = checked_jacobian(J, self.name, (r0.shape[0], width), r0, values=values)
        return Linearization(r0, r0, J, "callable")


def checked_jacobian(
    J: Any, name: str, shape: tuple[int, int], like: torch.Tensor, *, values: bool = True
) -> torch.Tensor:
    """``J`` (a tensor or array) as a tensor of ``like``'s dtype and device, or a clear error naming ``name``
    (its values tested only with ``values``: :data:`NONFINITE`)."""
    if (
        type(J) is torch.Tensor
        and J.dtype == like.dtype
        and J.shape == shape
        and J.is_cpu
        and like.is_cpu
        and not J.requires_grad
        and J.numel() <= HOST_SMALL
    ):  # the common case of a small CPU problem: the values' test alone, in NumPy on a view
        if not values:
            return J
        try:
            ok = finite_array(J.numpy())
        except RuntimeError:  # no storage of its own (inside a torch.func transform): torch's test
            ok = bool(torch.isfinite(J).all())
        if not ok:
            raise ValueError(NONFINITE.format(name=name))
        return J
    if isinstance(J, np.ndarray):
        J = torch.from_numpy(J)
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"`{name}` must return the Jacobian as a torch.Tensor or a NumPy array, got {type(J).__name__}")
    dt = J.dtype
    if dt not in _FLOATS and (J.is_complex() or not (J.is_floating_point() or dt in (torch.int32, torch.int64))):
        raise TypeError(f"`{name}` must return a real Jacobian, got dtype {dt}")
    if J.dim() == 1 and shape[1] == 1 and J.shape[0] == shape[0]:
        J = J[:, None]  # one parameter: a vector of the rows' derivatives, as scipy accepts
    if J.shape != shape:
        raise ValueError(
            f"`{name}` must return the ({shape[0]}, {shape[1]}) Jacobian (rows x parameters), got shape "
            f"{tuple(J.shape)}"
        )
    J = J.detach() if J.requires_grad else J
    if J.dtype != like.dtype or not ((J.is_cpu and like.is_cpu) or J.device == like.device):
        J = J.to(dtype=like.dtype, device=like.device)
    if not values:
        return J
    a = host(J)  # a small CPU Jacobian: the test in NumPy, on a view
    if not (finite_array(a) if a is not None else bool(torch.isfinite(J).all())):
        raise ValueError(NONFINITE.format(name=name))
    return J
