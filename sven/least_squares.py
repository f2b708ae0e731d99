r"""``sven.least_squares`` and ``sven.curve_fit``: scipy-like front-ends over :class:`sven.Sven` in residual mode.

Both minimise :math:`F(x) = \tfrac12\|r(x)\|^2` by Levenberg--Marquardt:
``sven.Sven(..., residuals=True)`` (Moré's column scaling, ``lr=1``, only
numerically zero singular values truncated) with MINPACK's trust-region step
control, :class:`sven.trust_region.TrustRegion`. Each Sven step linearises
:math:`r` once (one Jacobian) and tries damped steps
:math:`\delta = -D^{-1} V \frac{\Sigma}{\Sigma^2 + \lambda} U^\top r` on the
cached factorisation of :math:`J D^{-1}`, :math:`\lambda` chosen so that
:math:`\|D\delta\|` is the trust radius, until one reduces :math:`F`. Passing
``damping`` (or ``adaptive_damping=True``) uses Sven's multiplicative damping
update instead (:class:`sven.control.AdaptiveDamping`, started at ``damping``),
and ``control`` any policy that re-evaluates the residuals. A Jacobian of at most 10 columns is factorised
by one small SVD (:mod:`sven.factorize`); a tall one with at least 16 from its normal equations where they
resolve the step's damping (:mod:`sven.normal_equations`), by the SVD otherwise.
The Jacobian comes from autograd, or as scipy's ``jac`` option asks: finite differences (``"2-point"``,
``"3-point"``) or a callable (:mod:`sven.linearize.finite`); a problem of at most 10 parameters takes the lean
step of :mod:`sven.tiny`. This module only adds scipy's stopping rules, evaluation counts and the result object;
everything runs in torch, on the device of the parameters.

Stopping rules (``status`` as in :func:`scipy.optimize.least_squares`):

* ``gtol`` (status 1), before each step: :math:`\|J^\top r\| \le gtol\,\sigma_{max}(J)\,\|r\|`
  (the angle between :math:`r` and the range of the scaled Jacobian, as
  MINPACK's test, with 2-norms; :func:`sven.functional.gradient_cosine`);
* ``ftol`` (status 2): both the actual and the predicted relative reduction
  of :math:`F` of a try are at most ``ftol``; also status 2 when no step can
  reduce :math:`F` (a stall: every try rejected, the radius at round-off, or the damping at its ceiling);
* ``xtol`` (status 3): the trust radius is at most ``xtol`` :math:`\|Dx\|` (MINPACK's test; with
  another policy: :math:`\|\delta\| \le xtol\,(xtol + \|x\|)` for an accepted step not dominated by
  the damping); status 4 when ``ftol`` and ``xtol`` hold together;
* ``max_nfev`` (status 0): the evaluation budget is spent.

With the trust region the ``ftol`` and ``xtol`` tests run after every try, kept or not, inside the Sven
step (as in MINPACK's ``lmder``); with another policy after every accepted step. A run that ends without
convergence while the gradient is still large warns (``RuntimeWarning``): never a silent stall.

**Round-off.** A positive ``ftol``, ``xtol`` or ``gtol`` below the machine epsilon of the parameters' or the
residuals' dtype (the coarser) is raised to it: no relative test below round-off can hold (float32: scipy's
default ``1e-8`` becomes ``1.19e-7``). ``0`` keeps a test off. The angle that counts as "not stationary" grows
to :math:`10\sqrt{\epsilon}` where that is larger (:func:`sven.control.stall_cosine`: float32 ``3.5e-3``),
so a converged float32 fit reports convergence, not a stall.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
import torch

import truncpinv

from ._validation import check_nonneg_float, check_positive_int
from .config import LM_RETRIES
from .control import stall_cosine
from .info import StepInfo
from .linearize.base import RowSpec
from .linearize.dense import autograd_jacobian
from .linearize.finite import FD_SCHEMES, FiniteDifferences, GivenJacobian, checked_jacobian
from .optim import Sven
from .trust_region import TrustRegion

__all__ = ["LeastSquaresResult", "curve_fit", "least_squares"]

_MESSAGES = {
    0: "The maximum number of function evaluations is exceeded.",
    1: "`gtol` termination condition is satisfied.",
    2: "`ftol` termination condition is satisfied.",
    3: "`xtol` termination condition is satisfied.",
    4: "Both `ftol` and `xtol` termination conditions are satisfied.",
}
#: A run that stops by ``ftol``/``xtol`` warns when the angle :func:`sven.functional.gradient_cosine` is above
#: this (converged runs on the MGH set with nonzero residual end at 1.2e-4 or below) ...
_NOT_STATIONARY = 1e-2
#: ... unless the cost fell to round-off of the start's (a zero-residual solution, where the angle is noise).
_ROUNDOFF = 1e-16
#: The message of a stall, by the step control: MINPACK's trust region, or the multiplicative damping update.
_STALL_MESSAGES = {
    True: "No step reduces the cost: every try was rejected, down to a trust radius at round-off.",
    False: "No step reduces the cost: every try was rejected at the largest damping.",
}


class LeastSquaresResult(dict):  # type: ignore[type-arg]
    """The result of :func:`least_squares`, as :class:`scipy.optimize.OptimizeResult`: a dict with attribute access.

    Attributes:
        x: the solution (a tensor shaped like the start; for parameters, their flat concatenation).
        cost: :math:`\\tfrac12\\|r(x)\\|^2`.
        fun: the residuals :math:`r(x)`, flattened.
        jac: the Jacobian :math:`J(x)`, ``(m, n)``.
        grad: :math:`J^\\top r`.
        optimality: :math:`\\|J^\\top r\\|_\\infty`.
        status: ``0`` (``max_nfev``), ``1`` (``gtol``), ``2`` (``ftol``), ``3`` (``xtol``), ``4`` (both).
        message: why it stopped, in words.
        success: ``status > 0``.
        nfev: residual evaluations at new points (the start and every tried step), as MINPACK counts them.
        njev: Jacobian evaluations (one per Sven step, plus one for ``jac`` at the solution).
        nit: Sven steps.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __repr__(self) -> str:
        width = max(map(len, self)) if self else 0
        return "\n".join(f"{k.rjust(width)}: {v!r}" for k, v in self.items())


def _start(params: Any) -> tuple[list[torch.Tensor], bool, torch.Tensor | None]:
    """The tensors to optimise, whether ``fun`` takes them as argument (``x0`` form), and the ``x0`` leaf."""
    if isinstance(params, (torch.Tensor, np.ndarray, numbers.Real)):
        items: list[Any] = [params]
    elif isinstance(params, Iterable):
        items = list(params)
        if items and all(isinstance(p, torch.Tensor) for p in items) and all(p.requires_grad for p in items):
            return items, False, None
        items = [items]
    else:
        raise TypeError(
            f"`params` must be a tensor or array (the start x0) or an iterable of parameters that require grad, "
            f"got {type(params).__name__}"
        )
    try:
        x0 = torch.as_tensor(items[0])
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"`params` must be a real tensor, array or sequence of numbers: {err}") from None
    if not (x0.is_floating_point() or x0.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"`params` must be real, got dtype {x0.dtype}")
    # as scipy: a start given as numbers (or integers) is float64; a floating tensor or array keeps its dtype
    floating = x0.is_floating_point() and isinstance(items[0], (torch.Tensor, np.ndarray))
    x = x0.detach().to(x0.dtype if floating else torch.float64).clone()
    if x.numel() == 0:
        raise ValueError("`params` must have at least one entry, got an empty start")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("`params` (the start x0) must be finite, got NaN or Inf")
    x.requires_grad_(True)
    return [x], True, x


def _tolerances(ftol: Any, xtol: Any, gtol: Any, max_nfev: Any, n: int) -> tuple[float, float, float, int]:
    tols = tuple(check_nonneg_float(name, v) for name, v in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol)))
    eps = float(np.finfo(np.float64).eps)
    if all(t < eps for t in tols):
        raise ValueError(f"at least one of `ftol`, `xtol` and `gtol` must be at least {eps:.3g} (machine epsilon)")
    nfev = 100 * (n + 1) if max_nfev is None else int(check_positive_int("max_nfev", max_nfev) or 0)
    return tols[0], tols[1], tols[2], nfev


def _roundoff(tensors: Iterable[torch.Tensor]) -> float:
    """The machine epsilon of the coarsest floating dtype among ``tensors`` (the parameters and the residuals)."""
    return max(float(torch.finfo(t.dtype).eps) for t in tensors if t.is_floating_point())


def least_squares(
    fun: Callable[..., torch.Tensor],
    params: Any,
    *,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    ftol: float = 1e-8,
    xtol: float = 1e-8,
    gtol: float = 1e-8,
    max_nfev: int | None = None,
    jac: Any = "autograd",
    **options: Any,
) -> LeastSquaresResult:
    r"""Minimise :math:`\tfrac12\|r(x)\|^2` by Levenberg--Marquardt (:class:`sven.Sven` in residual mode).

    Two forms:

    * ``least_squares(fun, x0)``: ``x0`` a tensor, array or sequence of numbers (integers become float64);
      ``fun(x, *args, **kwargs)`` returns the residuals (any shape, flattened). ``x0`` is not modified.
    * ``least_squares(fun, model.parameters())``: parameters that require grad, changed in place;
      ``fun(*args, **kwargs)`` evaluates the residuals at their current values.

    Args:
        fun: the residual function, differentiable by autograd.
        params: the start ``x0`` or the parameters (see above).
        args, kwargs: extra arguments of ``fun``.
        ftol, xtol, gtol: the stopping rules of the module docstring (scipy's defaults, ``1e-8``; a positive one
            below the dtype's machine epsilon is raised to it, ``0`` turns a test off).
        max_nfev: the most residual evaluations, those of finite differences included (default ``100 * (n + 1)``;
            with ``jac="2-point"`` ``100 * n * (n + 1)``, as scipy's ``lm``, and ``100 * n * (2n + 1)`` with
            ``"3-point"``).
        jac: the Jacobian: ``"autograd"`` (the default: exact, by autograd through ``fun``), ``"2-point"`` or
            ``"3-point"`` (finite differences of ``fun``, scipy's steps: :mod:`sven.linearize.finite`; for a
            ``fun`` autograd cannot differentiate, or one cheaper to evaluate ``n`` times than to differentiate),
            or a callable with ``fun``'s arguments returning the ``(m, n)`` Jacobian (a tensor or an array).
        **options: further :class:`sven.Sven` options: ``control`` (default
            :class:`~sven.trust_region.TrustRegion` with ``ftol``/``xtol``), ``damping`` (the multiplicative
            update of :class:`~sven.control.AdaptiveDamping`, started there), ``scale``, ``solver``, ``rtol``,
            ``max_retries`` (tries of one step, default 10), ...

    Returns:
        A :class:`LeastSquaresResult` (``x``, ``cost``, ``fun``, ``jac``, ``grad``, ``optimality``,
        ``status``, ``message``, ``success``, ``nfev``, ``njev``, ``nit``).

    Raises:
        ValueError: bad tolerances, ``max_nfev``, start, or residuals that are not finite at the start.
        TypeError: ``fun`` not callable, ``params`` of the wrong kind, or ``fun`` not returning a tensor.

    Example:
        >>> import torch, sven
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-3.0 * t)
        >>> res = sven.least_squares(lambda p: p[0] * torch.exp(-p[1] * t) - y, [1.0, 1.0])
        >>> res.success, [round(v, 6) for v in res.x.tolist()]
        (True, [2.0, 3.0])
    """
    if not callable(fun):
        raise TypeError(f"`fun` must be callable, got {type(fun).__name__}")
    kw = dict(kwargs or {})
    for bad in ("residuals", "on_nonfinite"):
        if bad in options:
            raise ValueError(f"`{bad}` is fixed by least_squares (residuals=True, on_nonfinite='raise')")
    ps, takes_x, x = _start(params)
    n = sum(p.numel() for p in ps)
    route = _jacobian_route(jac, options, x, args, kw)
    if max_nfev is None and isinstance(route, FiniteDifferences):  # scipy's lm: the differences count
        max_nfev = 100 * n * ((n if route.scheme == "2-point" else 2 * n) + 1)
    ftol, xtol, gtol, max_nfev = _tolerances(ftol, xtol, gtol, max_nfev, n)
    last: list[torch.Tensor] = []
    calls = [0]

    def closure() -> torch.Tensor:
        out = fun(x, *args, **kw) if takes_x else fun(*args, **kw)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"`fun` must return a torch.Tensor of residuals, got {type(out).__name__}")
        calls[0] += 1
        out = out.reshape(-1)
        last[:] = [out.detach()]
        return out

    with torch.no_grad():
        r0 = closure()
    if r0.numel() == 0:
        raise ValueError("`fun` returned no residuals at the start")
    if not bool(torch.isfinite(r0).all()):
        raise ValueError("`fun` returned NaN or Inf residuals at the start `params`")
    cost0 = 0.5 * float(r0.double().pow(2).sum())
    # a relative test below the round-off of the parameters or residuals cannot hold: raised to it (float32: 1.19e-7)
    eps = _roundoff([*ps, r0])
    ftol, xtol, gtol = (max(t, eps) if t > 0 else 0.0 for t in (ftol, xtol, gtol))
    if options.get("adaptive_damping", True) is False:
        raise ValueError(
            "`adaptive_damping=False` does not apply to least_squares: its steps are accepted by the gain ratio "
            "of Levenberg-Marquardt; pass `damping` for the start value of the adaptive damping"
        )
    if "control" not in options and "damping" not in options and "adaptive_damping" not in options:
        options["control"] = TrustRegion(options.pop("max_retries", LM_RETRIES), ftol=ftol, xtol=xtol)
    elif "control" not in options:  # the multiplicative damping update, started at `damping` (alone: fixed)
        options["adaptive_damping"] = True
    if route is not None:
        options["route"] = route
    elif takes_x and "jacobian" not in options and "route" not in options:
        options["jacobian"] = "autograd"  # a bare tensor belongs to no layer: no hooks to record
    opt = Sven(ps, residuals=True, on_nonfinite="raise", **options)
    if not getattr(opt.control, "needs_evaluate", False):
        raise ValueError("`control` must re-evaluate the residuals after each try (e.g. sven.control.AdaptiveDamping)")
    # TrustRegion with tolerances tests ftol and xtol itself after every try, as MINPACK (scale-invariant)
    inside = isinstance(opt.control, TrustRegion) and (opt.control.ftol > 0 or opt.control.xtol > 0)
    nfev, njev, nit, status, stalled = 1, 0, 0, -1, False
    cos = float("nan")
    while status < 0:
        calls[0] = 0
        rows = opt.step(closure)
        info = cast(StepInfo, opt.last_step)  # set by every step
        nit, njev, nfev = nit + 1, njev + 1, nfev + calls[0] - 1  # the first call of a step is its Jacobian
        cos = info.gradient_cosine
        cost_before = 0.5 * float(rows.double().pow(2).sum())
        if cos <= gtol or cost_before == 0.0:
            status = 1
        elif info.stalled:
            status, stalled = 2, True
        elif info.converged:  # the policy's own tests, after a try (TrustRegion: MINPACK's, inside the step)
            status = 4 if len(info.converged) == 2 else 2 if info.converged == ("ftol",) else 3
        elif not info.rejected and not inside:
            cost_after = 0.5 * float(last[0].double().pow(2).sum())
            actual = (cost_before - cost_after) / cost_before
            rho = info.gain_ratio if info.gain_ratio is not None else 1.0
            predicted = actual / rho if rho > 0 else math.inf
            f_ok = abs(actual) <= ftol and predicted <= ftol and rho <= 2.0
            xnorm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in ps))
            # a step that is short only because the damping dominates (lambda > sigma_max^2) says nothing about x
            x_ok = info.step_norm <= xtol * (xtol + xnorm) and info.damping <= 1.0
            status = 4 if f_ok and x_ok else 2 if f_ok else 3 if x_ok else -1
        if status < 0 and nfev >= max_nfev:
            status = 0
    if route is None:
        with torch.enable_grad():
            out = closure()
            J = autograd_jacobian(out, ps)
    else:  # (as scipy: the Jacobian at the solution is not counted in nfev)
        lin = route(closure, ps, RowSpec(residuals=True))
        out, J = lin.rows, cast(torch.Tensor, lin.jacobian)
    njev += 1
    r = out.detach()
    grad = J.T @ r.to(J.dtype)
    cost = 0.5 * float(r.double().pow(2).sum())
    if status == 0 and cos > stall_cosine(r.dtype):
        warnings.warn(
            f"least_squares stopped after max_nfev={max_nfev} evaluations without converging: the point is not "
            f"stationary (|J^T r| / (sigma_max |r|) = {cos:.3g}); raise `max_nfev` or check the residual function",
            RuntimeWarning,
            stacklevel=2,
        )
    elif (
        status in (2, 3, 4)
        and not stalled
        and cos > max(_NOT_STATIONARY, stall_cosine(r.dtype))
        and cost > max(_ROUNDOFF, (1e3 * eps) ** 2) * cost0
    ):
        warnings.warn(
            f"least_squares stopped ({_MESSAGES[status]}) at a point that is not stationary: "
            f"|J^T r| / (sigma_max |r|) = {cos:.3g} with the cost {cost:.3g} (from {cost0:.3g}); the tolerances "
            f"may be too loose, or the problem too flat here",
            RuntimeWarning,
            stacklevel=2,
        )
    sol = x.detach().clone() if x is not None else torch.cat([p.detach().reshape(-1) for p in ps])
    return LeastSquaresResult(
        x=sol,
        cost=cost,
        fun=r,
        jac=J,
        grad=grad,
        optimality=float(grad.abs().max()),
        status=status,
        message=_STALL_MESSAGES[isinstance(opt.control, TrustRegion)] if stalled else _MESSAGES[status],
        success=status > 0,
        nfev=nfev,
        njev=njev,
        nit=nit,
    )


def _jacobian_route(
    jac: Any, options: dict[str, Any], x: torch.Tensor | None, args: tuple[Any, ...], kw: dict[str, Any]
) -> FiniteDifferences | GivenJacobian | None:
    """The route of ``jac`` (``None``: autograd, the Sven options' own route), or a clear error naming ``jac``."""
    if isinstance(jac, str) and jac == "autograd":
        return None
    if not (callable(jac) or isinstance(jac, str)):
        raise TypeError(f"`jac` must be a string ('autograd', '2-point', '3-point') or a callable, got {jac!r}")
    if not (callable(jac) or jac in FD_SCHEMES):
        raise ValueError(
            f"`jac` must be 'autograd', '2-point', '3-point' or a callable returning the (m, n) Jacobian, got {jac!r}"
        )
    given = [k for k in ("jacobian", "route") if k in options]
    if given:
        raise ValueError(f"pass the Jacobian once: `jac` or `{given[0]}`, not both")
    if isinstance(jac, str):
        return FiniteDifferences(jac)
    if x is not None:
        return GivenJacobian(lambda: jac(x.detach(), *args, **kw), name="jac")
    return GivenJacobian(lambda: jac(*args, **kw), name="jac")


def _as_tensor(name: str, value: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, device=None if like is None else like.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"`{name}` must be a tensor, array or sequence of numbers: {err}") from None
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def curve_fit(
    f: Callable[..., torch.Tensor],
    xdata: Any,
    ydata: Any,
    p0: Any = None,
    sigma: Any = None,
    absolute_sigma: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fit ``f(xdata, *p)`` to ``ydata`` by least squares, as :func:`scipy.optimize.curve_fit` (on torch tensors).

    Minimises :math:`\sum_i \big((f(x_i, p) - y_i)/\sigma_i\big)^2` with :func:`least_squares`
    and returns the parameters and their covariance

    .. math::

        \mathrm{pcov} = (J^\top J)^{+}\, s^2, \qquad s^2 = \frac{\|r\|^2}{m - n}

    (:math:`J` the Jacobian of the weighted residuals at the solution; the
    pseudoinverse drops singular values below ``max(m, n) * eps * sigma_max``,
    as scipy; ``absolute_sigma=True`` leaves out :math:`s^2`). With ``m <= n``
    the covariance cannot be estimated: it is all ``inf``, with a warning, as in scipy.

    Args:
        f: ``f(xdata, *p)`` returns the model at ``xdata``; each ``p[i]`` is a 0-dim tensor. Its output and
            ``ydata`` are compared flattened, as scipy's: they must have the same number of entries (any shapes),
            or the output a single value (a constant model, broadcast).
        xdata: the independent variable (anything ``f`` accepts; arrays become tensors).
        ydata: the data, a tensor or array of ``m`` values (on the device the fit runs on).
        p0: the start, ``n`` values; ``None``: ones, with ``n`` from ``f``'s signature.
        sigma: the standard deviations of ``ydata`` (scalar or ``m`` values), or ``None``.
        absolute_sigma: ``sigma`` is absolute (do not rescale ``pcov`` by :math:`s^2`).
        **kwargs: passed to :func:`least_squares` (``ftol``, ``max_nfev``, ``jac``, Sven options, ...); a callable
            ``jac`` has scipy's form here: ``jac(xdata, *p)`` returns the model's ``(m, n)`` Jacobian (``sigma`` is
            applied to it as to the residuals).

    Returns:
        ``(popt, pcov)``: ``(n,)`` and ``(n, n)`` tensors, on ``ydata``'s device.

    Raises:
        ValueError: ``p0`` cannot be inferred, ``ydata`` and ``f(xdata, *p0)`` differ in size, ``sigma`` has the
            wrong size (a scalar or one per ``ydata`` entry; scipy's ``(m, m)`` covariance is not accepted) or is
            not positive, the data are empty or not finite.
    """
    if not callable(f):
        raise TypeError(f"`f` must be callable, got {type(f).__name__}")
    y = _as_tensor("ydata", ydata)
    if y.numel() == 0:
        raise ValueError("`ydata` must not be empty")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("`ydata` must be finite, got NaN or Inf")
    if p0 is None:
        names = list(inspect.signature(f).parameters.values())
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in names) or len(names) < 2:
            raise ValueError("`p0` is required when the number of parameters cannot be read from `f`'s signature")
        p0 = [1.0] * (len(names) - 1)
    start = _as_tensor("p0", p0, like=y).to(y.dtype).reshape(-1)
    xd = _as_tensor("xdata", xdata, like=y) if isinstance(xdata, (np.ndarray, list, tuple)) else xdata
    if sigma is None:
        weight = None
    else:
        s = _as_tensor("sigma", sigma, like=y).to(y.dtype)
        if s.numel() not in (1, y.numel()):
            raise ValueError(
                f"`sigma` must be a scalar or have as many entries as `ydata` (shape {tuple(y.shape)}, {y.numel()} "
                f"entries), got shape {tuple(s.shape)} ({s.numel()} entries); a covariance matrix is not accepted"
            )
        if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError("`sigma` must be positive and finite")
        weight = 1.0 / s.reshape(-1)
    yf = y.reshape(-1)

    def residuals(p: torch.Tensor) -> torch.Tensor:
        model = torch.as_tensor(f(xd, *p.unbind()))
        if model.numel() not in (1, yf.numel()):
            raise ValueError(
                f"`ydata` must have as many entries as the model f(xdata, *p0): `ydata` has shape {tuple(y.shape)} "
                f"({y.numel()} entries), f(xdata, *p0) has shape {tuple(model.shape)} ({model.numel()} entries); "
                f"both are compared flattened, as scipy's curve_fit does"
            )
        r = model.reshape(-1) - yf
        return r if weight is None else r * weight

    jac = kwargs.get("jac")
    if callable(jac):  # scipy's form: jac(xdata, *p) is the model's (m, n) Jacobian, weighted here as the residuals

        def jacobian(p: torch.Tensor) -> torch.Tensor:
            J = checked_jacobian(jac(xd, *p.unbind()), "jac", (yf.numel(), p.numel()), yf)
            return J if weight is None else J * weight[:, None]

        kwargs["jac"] = jacobian
    res = least_squares(residuals, start, **kwargs)
    J = res.jac
    m, n = J.shape
    F = truncpinv.DenseSVD().factorize(J, rtol=truncpinv.default_rtol((m, n), J.dtype))
    V, S = F.V, F.S
    pcov = (V / S**2) @ V.T
    if not absolute_sigma:
        if m > n:
            pcov = pcov * (2.0 * res.cost / (m - n))
        else:
            pcov = torch.full_like(pcov, math.inf)
            warnings.warn("Covariance of the parameters could not be estimated (m <= n)", RuntimeWarning, stacklevel=2)
    return res.x, pcov
