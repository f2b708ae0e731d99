r"""The Sven update as pure functions.

Everything that is mathematics lives here; :class:`sven.Sven` (the
``torch.optim`` optimizer) and the seed-compatible :class:`sven.opt.Sven`
only gather parameters and state and call these functions. Hyperparameters
are keyword-only.

Notation, for a batch of ``B`` samples and ``P`` parameters:

* ``L`` -- per-sample losses, shape ``(B,)``;
* ``R = L^{kappa/2}`` -- the residuals, so that ``sum_a L_a = sum_a (R_a)^{2/kappa}``;
* ``M = dR/dtheta`` -- the per-sample residual Jacobian, shape ``(B, P)``;
* ``pinv_k(M)`` -- the truncated pseudoinverse that keeps at most ``k``
  singular values ``sigma > max(atol, rtol * sigma_max)`` (computed by a
  :mod:`truncpinv` solver, never by a private SVD).

The Sven step is the minimum-norm solution of the linearised problem
``R + M delta = 0`` in the least-squares sense, restricted to the kept
singular directions, scaled by a learning rate:

.. math::

    \delta = -\eta \, M_k^{+} R
           = -\eta \sum_{i \le r} v_i \, \frac{u_i^\top R}{\sigma_i}.

With ``lr = 1`` and nothing truncated, a model that is linear in its
parameters lands in one step on the minimum-norm least-squares solution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from truncpinv import Solver, TruncatedPinv

from ._arrays import squared_norm_of
from .damped_gram import DampedGram
from .normal_equations import explicit_factors

__all__ = [
    "DAMPING_MAX",
    "DAMPING_MIN",
    "DampingState",
    "VariableKResult",
    "all_finite",
    "cap_norm",
    "filter_factors",
    "filtered_direction",
    "gain_ratio",
    "gradient_cosine",
    "group_rows",
    "host",
    "madsen_nielsen_update",
    "rank_one_components",
    "residual_jacobian",
    "residual_scale",
    "residuals_from_losses",
    "rmsprop_precondition_",
    "rmsprop_transform_",
    "sven_direction",
    "sven_update",
    "variable_k_search",
    "weighted_norm",
]


# --------------------------------------------------------------------------- residuals
def residuals_from_losses(losses: torch.Tensor, *, kappa: float) -> torch.Tensor:
    r"""Residuals :math:`R_\alpha = \ell_\alpha^{\kappa/2}` of non-negative per-sample losses.

    ``kappa = 2`` uses the losses themselves as residuals (the paper's
    default: no fractional powers of, e.g., a cross-entropy). ``kappa = 1``
    views :math:`\sqrt{\ell_\alpha}` as the residual of an :math:`L_2` loss;
    for ``loss = (pred - y)^2`` that is :math:`|pred - y|`.
    """
    if kappa == 2.0:
        return losses
    return losses.pow(kappa / 2.0)


def residual_jacobian(
    losses: torch.Tensor, loss_jacobian: torch.Tensor, *, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Residuals and their Jacobian from the losses and the loss Jacobian (chain rule).

    .. math::

        R_\alpha = \ell_\alpha^{\kappa/2}, \qquad
        M_{\alpha i} = \frac{\kappa}{2}\, \ell_\alpha^{\kappa/2 - 1}\,
                       \frac{\partial \ell_\alpha}{\partial \theta_i}.

    For ``kappa < 2`` the factor :math:`\ell^{\kappa/2-1}` is infinite at a
    zero loss, where differentiating ``loss ** (kappa/2)`` directly gives
    NaN rows. Such a sample is already at its minimum (``R = 0``), so its row
    is set to zero: it asks for no change and constrains nothing.

    Args:
        losses: ``(B,)`` per-sample losses (non-negative unless ``kappa == 2``).
        loss_jacobian: ``(B, P)`` Jacobian ``d losses / d theta``.
        kappa: the exponent, ``> 0``.

    Returns:
        ``(R, M)`` of shapes ``(B,)`` and ``(B, P)``. For ``kappa == 2`` the
        inputs are returned unchanged.
    """
    if kappa == 2.0:
        return losses, loss_jacobian
    R, scale = residual_scale(losses, kappa=kappa)
    return R, loss_jacobian * scale.unsqueeze(1).to(loss_jacobian.dtype)


def residual_scale(losses: torch.Tensor, *, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Residuals and the row scaling of the chain rule: ``M = diag(scale) J``.

    :math:`R = \ell^{\kappa/2}` and :math:`\text{scale} = \frac{\kappa}{2}\ell^{\kappa/2-1}`,
    zero where a loss is zero and ``kappa < 2`` (see :func:`residual_jacobian`).
    Used by the Gram route, which never forms ``J``: ``K_M = diag(s) K diag(s)``.
    """
    if kappa == 2.0:
        return losses, torch.ones_like(losses)
    half = kappa / 2.0
    R = losses.pow(half)
    if half >= 1.0:
        scale = half * losses.pow(half - 1.0)
    else:
        pos = losses > 0
        safe = torch.where(pos, losses, torch.ones_like(losses))
        scale = torch.where(pos, half * safe.pow(half - 1.0), torch.zeros_like(losses))
    return R, scale


def group_rows(x: torch.Tensor, *, size: int) -> torch.Tensor:
    r"""Average consecutive groups of ``size`` rows (microbatching).

    ``x`` of shape ``(B, ...)`` becomes ``(B / size, ...)`` with row ``j`` the
    mean of rows ``j*size ... (j+1)*size - 1``. Applied to the losses and,
    because differentiation is linear, to the loss Jacobian, it gives the
    Jacobian of the microbatch-averaged losses.

    Raises:
        ValueError: if ``B`` is not divisible by ``size``.
    """
    if size == 1:
        return x
    n = x.shape[0]
    if n % size:
        raise ValueError(
            f"the batch size {n} is not divisible by `microbatch_size`={size}; "
            f"pass drop_last=True to the DataLoader or choose a microbatch_size that divides the batch size"
        )
    return x.reshape(n // size, size, *x.shape[1:]).mean(dim=1)


#: Up to this many entries, ``isfinite(t).all()`` is cheaper than a sum and its check.
_SMALL = 1 << 16

#: Up to this many entries a CPU tensor's small arithmetic (the control's vectors, the factors of a curve fit's
#: Jacobian) runs in NumPy on a view of its memory (:func:`host`): the same operations in the same dtype, at
#: about 1 us each against 3-10 us for a torch call, which is what a step on a few parameters is made of.
HOST_SMALL = 4096
_HOST_DTYPES = (torch.float64, torch.float32)


def host(t: torch.Tensor, *, limit: int | None = None) -> np.ndarray | None:
    """A NumPy view of ``t`` when it is a small real CPU tensor (at most ``limit`` entries, default
    :data:`HOST_SMALL`), else ``None``.

    The view shares ``t``'s memory (no copy). Tensors that need autograd, live on an accelerator, are
    larger or have no storage of their own (inside :mod:`torch.func` transforms) keep torch's path: there a
    kernel launch or a pass over the data, not the call, is the cost.
    """
    small = HOST_SMALL if limit is None else limit
    if t.dtype in _HOST_DTYPES and t.is_cpu and not t.requires_grad and t.numel() <= small:
        try:
            return t.numpy()
        except RuntimeError:  # no storage of its own: a tensor inside a torch.func transform (grad, vmap)
            return None
    return None


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of every tensor is finite (one host sync per tensor).

    A large tensor is summed first: NaN and +-Inf propagate through a sum, so
    one reduction replaces an element-wise mask. Only when that sum is not
    finite (which huge finite entries can also produce, by overflow) is the
    exact element-wise test run (the real sum read as a Python float: no ``isfinite`` kernel on it). A CPU tensor
    of at most :data:`_SMALL` entries is tested in NumPy on a view (:func:`host`; one ufunc pass against the
    several kernels of torch's ``isfinite``: 15 against 70-100 us for the 128 x 128 float64 Gram matrix of a batch
    of 64 with two rows a sample).
    """
    for t in tensors:
        a = host(t, limit=_SMALL)
        if a is not None:
            ok = bool(np.isfinite(a).all())
        elif t.numel() <= _SMALL:
            ok = bool(torch.isfinite(t).all())
        else:
            ok = (not t.is_complex() and math.isfinite(t.sum().item())) or bool(torch.isfinite(t).all())
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------- the update
def sven_direction(
    M: torch.Tensor,
    R: torch.Tensor,
    *,
    rank: int | None,
    rtol: float,
    atol: float = 0.0,
    solver: Solver,
    check_finite: bool = True,
) -> tuple[torch.Tensor, TruncatedPinv]:
    r"""The Sven direction :math:`d = M_k^{+} R` and the factorisation it came from.

    ``M_k^+`` keeps at most ``rank`` singular values
    ``sigma > max(atol, rtol * sigma_max)``; the step is ``-lr * d``.

    Args:
        M: ``(B, P)`` residual Jacobian.
        R: ``(B,)`` residuals.
        rank: maximum number of singular values kept (``None``: no cap).
        rtol: relative cut-off.
        atol: absolute cut-off.
        solver: a :mod:`truncpinv` solver object.
        check_finite: let :mod:`truncpinv` reject NaN/Inf (pass ``False`` when
            the caller has already checked, to skip a pass over ``M``).

    Returns:
        ``(d, F)``: the ``(P,)`` direction and the
        :class:`truncpinv.TruncatedPinv` (``F.S`` kept singular values,
        ``F.rank`` the rank used, ``F.singular_values`` all computed ones).
    """
    F = solver.factorize(M, rank=rank, rtol=rtol, atol=atol, check_finite=check_finite)
    d = F.solve(R.to(F.dtype), check_finite=check_finite)
    return d, F


def sven_update(
    M: torch.Tensor,
    R: torch.Tensor,
    *,
    lr: float,
    rank: int | None,
    rtol: float,
    atol: float = 0.0,
    solver: Solver,
) -> torch.Tensor:
    r"""The Sven parameter change :math:`\delta = -\eta\, M_k^{+} R` as a ``(P,)`` vector.

    Example:
        >>> import torch, truncpinv
        >>> from sven.functional import sven_update
        >>> X = torch.randn(8, 20, dtype=torch.float64)
        >>> w0 = torch.zeros(20, dtype=torch.float64)
        >>> y = torch.randn(8, dtype=torch.float64)
        >>> d = sven_update(X, X @ w0 - y, lr=1.0, rank=None, rtol=1e-12, solver=truncpinv.GramEigen())
        >>> bool(torch.allclose(X @ (w0 + d), y))
        True
    """
    d, _ = sven_direction(M, R, rank=rank, rtol=rtol, atol=atol, solver=solver)
    return -lr * d


# --------------------------------------------------------------------------- variable k
def rank_one_components(F: TruncatedPinv, R: torch.Tensor, *, damping: float = 0.0) -> torch.Tensor:
    r"""The kept rank-one pieces of the direction, as the columns of a ``(P, r)`` matrix.

    Column ``i`` is :math:`v_i\, \phi(\sigma_i)\, u_i^\top R` with the filter
    :math:`\phi` of :func:`filter_factors` (``1/sigma_i`` without damping), in
    order of descending :math:`\sigma_i`; their sum is the (filtered) direction.
    """
    U, S, V = F.U, F.S, F.V
    coeff = (U.T @ R.to(U.dtype)) * filter_factors(S, damping=damping)
    return V * coeff


# --------------------------------------------------------------------------- damping
def filter_factors(S: torch.Tensor, *, damping: float) -> torch.Tensor:
    r"""The spectral filter applied to the kept singular values.

    Hard truncation inverts every kept value, :math:`\phi(\sigma) = 1/\sigma`.
    Tikhonov (Levenberg--Marquardt) damping shrinks the small ones:

    .. math::

        \phi(\sigma) = \frac{\sigma}{\sigma^2 + \lambda}, \qquad
        \lambda = \text{damping} \cdot \sigma_{max}^2,

    so ``damping`` is dimensionless (scaling ``M`` by ``c`` scales the step by
    ``1/c`` for any damping). Zero singular values get a zero factor.

    Args:
        S: ``(r,)`` kept singular values, descending.
        damping: :math:`\lambda / \sigma_{max}^2 \ge 0`.
    """
    if S.numel() == 0:
        return S
    s = host(S)
    if s is not None:  # a small CPU spectrum: the same formulas in NumPy (:func:`host`)
        return torch.from_numpy(_host_filter(s, damping))
    if damping == 0.0:
        pos = S > 0
        return torch.where(pos, 1.0 / torch.where(pos, S, torch.ones_like(S)), torch.zeros_like(S))
    lam = damping * S[0] ** 2
    return S / (S * S + lam)


def _host_filter(S: np.ndarray, damping: float) -> np.ndarray:
    """:func:`filter_factors` on a NumPy ``S`` (the same formulas)."""
    if S.size == 0:
        return S
    if damping == 0.0:
        pos = S > 0
        return np.where(pos, 1.0 / np.where(pos, S, 1.0), 0.0).astype(S.dtype, copy=False)
    lam = damping * S[0] ** 2
    return S / (S * S + lam)  # type: ignore[no-any-return]


def filtered_direction(F: TruncatedPinv, R: torch.Tensor, *, damping: float) -> torch.Tensor:
    r"""The damped direction :math:`d = V_r\, \phi(\Sigma_r)\, U_r^\top R` from a cached factorisation.

    Re-filtering costs one application of ``V`` (through ``F.solve``), never a
    new factorisation: ``F.solve(U_r (\Sigma_r \phi(\Sigma_r) \circ U_r^\top R))`` equals
    :math:`V_r \phi(\Sigma_r) U_r^\top R` because ``U_r`` has orthonormal columns.
    With ``damping == 0`` this is ``F @ R``. Small explicit factors on the CPU are applied in NumPy
    (:func:`host`; the same products). A :class:`sven.damped_gram.DampedGram` gives
    :math:`M^\top (K + \lambda I)^{-1} R` by Cholesky where it certifies it equal to round-off (else its factors).
    """
    Rf = R if R.dtype == F.dtype else R.to(F.dtype)
    if isinstance(F, DampedGram):
        d = F.damped_direction(Rf, damping)
        if d is not None:
            return d
    if explicit_factors(F) and F.rank > 0:  # V itself (the normal equations' U need not be orthonormal)
        U, S, V = F.U, F.S, F.V
        u, s, v, r = host(U), host(S), host(V), host(Rf)
        if u is not None and s is not None and v is not None and r is not None:
            return torch.from_numpy(v @ ((r @ u) * _host_filter(s, damping)))
        return V @ ((U.T @ Rf) * filter_factors(S, damping=damping))  # type: ignore[no-any-return]
    if damping == 0.0 or F.rank == 0:
        return F.solve(Rf, check_finite=False)  # type: ignore[no-any-return]
    U, S = F.U, F.S
    coeff = (U.T @ Rf) * filter_factors(S, damping=damping) * S
    return F.solve(U @ coeff, check_finite=False)  # type: ignore[no-any-return]


def cap_norm(d: torch.Tensor, *, radius: float | None, norm: float) -> tuple[torch.Tensor, bool]:
    r"""Trust-region cap: shrink ``d`` by :math:`r / \|\delta\|` when the step norm ``norm`` exceeds ``radius``.

    ``norm`` is :math:`\|\delta\|` of the step that ``d`` produces (the
    caller knows how ``d`` maps to the step, e.g. per-group learning rates).
    Returns ``(d, capped)``; ``radius=None`` leaves ``d`` unchanged.
    """
    if radius is None or norm <= radius or norm == 0.0:
        return d, False
    return d * (radius / norm), True


def gain_ratio(R_old: torch.Tensor, R_new: torch.Tensor, R_pred: torch.Tensor) -> float:
    r"""Actual over predicted decrease of :math:`\phi = \tfrac12\|R\|^2`.

    .. math::

        \rho = \frac{\|R(\theta)\|^2 - \|R(\theta + \delta)\|^2}
                     {\|R(\theta)\|^2 - \|R(\theta) + M\delta\|^2},

    where ``R_pred`` :math:`= R + M\delta` is the linear model's prediction.
    Sven's step is the Gauss--Newton step of :math:`\phi` (the minimum-norm
    solution of :math:`M\delta = -R`), so :math:`\rho \approx 1` where the
    linearisation is good. A non-finite new loss gives :math:`-\infty`.
    When the model predicts no decrease (``R`` already zero in the kept
    directions), :math:`\rho = 1` if the loss did not grow and
    :math:`-\infty` if it did.
    """
    return gain_ratio_of(squared_norm(R_old), squared_norm(R_new), squared_norm(R_pred))


def squared_norm(R: torch.Tensor) -> float:
    r""":math:`\|R\|^2`, accumulated in float64 (in NumPy for a small CPU tensor, :func:`host`)."""
    a = host(R)
    return squared_norm_of(a) if a is not None else float(R.double().pow(2).sum())


def squared_distance(R: torch.Tensor, change: torch.Tensor) -> float:
    r""":math:`\|R - c\|^2` (:func:`squared_norm`) for the change ``c`` in ``R``'s dtype: the linear model's
    :math:`\|R + M\delta\|^2` for :math:`c = -M\delta`, the difference taken in NumPy for small CPU tensors."""
    a, b = host(R), host(change)
    if a is not None and b is not None and a.shape == b.shape:
        return squared_norm_of(a - (b if b.dtype == a.dtype else b.astype(a.dtype)))
    return squared_norm(R - (change if change.dtype == R.dtype else change.to(R.dtype)))


def weighted_norm(x: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    r""":math:`\|D x\|` with :math:`D = \mathrm{diag}(\text{weights})` (``None``: :math:`\|x\|`), in ``x``'s dtype
    (in NumPy for small CPU tensors, :func:`host`)."""
    a, w = host(x), None if weights is None else host(weights)
    if a is not None and (weights is None or w is not None):
        return float(np.linalg.norm(a if w is None else a * w))
    if weights is not None:
        x = x * weights.to(x.dtype)
    return float(x.norm())


def gain_ratio_of(old: float, new: float, pred: float) -> float:
    r""":func:`gain_ratio` from :math:`\|R\|^2`, :math:`\|R_{new}\|^2` and :math:`\|R + M\delta\|^2`."""
    if not (new == new and abs(new) != float("inf")):
        return float("-inf")
    predicted = old - pred
    actual = old - new
    if predicted <= 0.0:
        return 1.0 if actual >= 0.0 else float("-inf")
    return actual / predicted


def gradient_cosine(F: TruncatedPinv, R: torch.Tensor) -> torch.Tensor:
    r"""How far from stationary: :math:`\|M^\top R\| / (\sigma_{max}\|R\|)` from the factorisation, at no extra cost.

    With :math:`M = U \Sigma V^\top` (the kept part), :math:`\|M^\top R\|_2 = \|\Sigma U^\top R\|_2`
    because :math:`V` has orthonormal columns; dropped values below the cut-off add at most
    ``cutoff * ||R||``. The ratio is scale-free and lies in ``[0, 1]``: 0 at a stationary point of
    :math:`\|R\|^2` (MINPACK's ``gtol`` test uses the same angle, column by column). ``R = 0`` gives 0.
    A :class:`sven.damped_gram.DampedGram` (no eigenvectors) gives :math:`\|M^\top R\|^2 = R^\top K R` exactly,
    the values below the cut-off included. Returns a 0-dim tensor (no host synchronisation; small CPU factors
    are reduced in NumPy, :func:`host`).
    """
    Rf = R if R.dtype == F.dtype else R.to(F.dtype)
    if F.rank == 0:
        return Rf.new_zeros(())
    if isinstance(F, DampedGram):  # :math:`\|M^\top R\|^2 = R^\top K R`, every value included (no eigenvectors)
        return F.gradient_cosine(Rf)
    S, U = F.S, F.U
    # (small CPU factors in NumPy, :func:`host`; the Gram route's U of a batch of 64 with two rows a sample is
    # 128 x r, larger than HOST_SMALL: a diagnostic, computed at every step)
    u, s, r = host(U, limit=_SMALL), host(S), host(Rf)
    if u is not None and s is not None and r is not None:
        g, scale = float(np.linalg.norm(s * (r @ u))), float(s[0]) * float(np.linalg.norm(r))
        return torch.tensor(g / scale if scale > 0 else 0.0, dtype=Rf.dtype)
    g = torch.linalg.vector_norm(S * (U.T @ Rf))
    scale = S[0] * torch.linalg.vector_norm(Rf)
    return torch.where(scale > 0, g / scale, torch.zeros_like(g))  # (0/0 where it is not used)


#: Bounds of the adaptive damping :math:`\lambda / \sigma_{max}^2` (:func:`madsen_nielsen_update`).
DAMPING_MIN, DAMPING_MAX = 1e-12, 1e12


@dataclass
class DampingState:
    """Adaptive Levenberg--Marquardt damping: ``lam`` (relative to ``sigma_max^2``) and the growth factor ``nu``."""

    lam: float
    nu: float = 2.0


def madsen_nielsen_update(
    state: DampingState, rho: float, *, accept_threshold: float = 0.0, floor: float = DAMPING_MIN
) -> bool:
    r"""Update the damping from the gain ratio (Madsen, Nielsen & Tingleff 2004, Alg. 3.16).

    .. math::

        \rho > \rho_0:\ \lambda \leftarrow \lambda \max\big(\tfrac13, 1 - (2\rho - 1)^3\big),\ \nu \leftarrow 2;
        \qquad \text{otherwise}:\ \lambda \leftarrow \nu\lambda,\ \nu \leftarrow 2\nu.

    A zero ``lam`` that must grow restarts at ``1e-6``. ``lam`` is kept in
    ``[floor, 1e12]`` (``floor`` defaults to :data:`DAMPING_MIN`, ``1e-12``; ``0`` lets the step become
    Gauss--Newton's, as in MINPACK, which a singular solution needs). Returns whether the step is accepted;
    ``state`` is updated in place.
    """
    if rho > accept_threshold:
        state.lam = max(state.lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), floor)
        state.nu = 2.0
        return True
    state.lam = min(max(state.lam, 1e-6) * state.nu, DAMPING_MAX)
    state.nu = min(state.nu * 2.0, 1e6)
    return False


@dataclass
class VariableKResult:
    """Outcome of :func:`variable_k_search`.

    Attributes:
        k_used: number of rank-one components kept.
        substep_losses: the reference loss followed by the loss after each
            accepted component.
        applied: ``(P,)`` sum of the accepted components (before ``-lr``).
    """

    k_used: int
    substep_losses: list[float] = field(default_factory=list)
    applied: torch.Tensor | None = None


def variable_k_search(
    components: torch.Tensor,
    *,
    apply: Callable[[torch.Tensor, float], None],
    evaluate: Callable[[], float],
    reference: float,
) -> VariableKResult:
    r"""Greedy choice of the rank: add rank-one components while the loss does not increase.

    Components are tried in order of descending singular value.
    ``apply(c, +1.0)`` adds ``-lr * c`` to the parameters, ``apply(c, -1.0)``
    undoes it. After each component the batch loss is re-evaluated; the first
    component that makes it exceed ``reference`` (the loss before the step)
    is undone and the search stops. A NaN loss counts as an increase.

    Args:
        components: ``(P, r)`` from :func:`rank_one_components`.
        apply: adds ``-sign * lr * c`` to the parameters.
        evaluate: the mean batch loss at the current parameters.
        reference: the mean batch loss before the step.

    Returns:
        A :class:`VariableKResult`.
    """
    substep = [float(reference)]
    k_used = 0
    for i in range(components.shape[1]):
        c = components[:, i]
        apply(c, 1.0)
        new = float(evaluate())
        if not new <= reference:  # also rejects NaN
            apply(c, -1.0)
            break
        substep.append(new)
        k_used += 1
    applied = components[:, :k_used].sum(dim=1)
    return VariableKResult(k_used=k_used, substep_losses=substep, applied=applied)


# --------------------------------------------------------------------------- RMSProp
def rmsprop_precondition_(M: torch.Tensor, square_avg: torch.Tensor, *, alpha: float, eps: float) -> torch.Tensor:
    r"""RMSProp applied to the Jacobian *before* the pseudoinverse (``rmsprop_post=False``).

    With :math:`\bar g = \frac{1}{B}\sum_\alpha M_{\alpha\cdot}` the mean
    gradient of the residuals,

    .. math::

        v \leftarrow \alpha v + (1-\alpha)\, \bar g^2, \qquad
        M \leftarrow M \,\mathrm{diag}\big(1/(\sqrt{v} + \epsilon)\big).

    The pseudoinverse of the rescaled ``M`` is then used *as is* (the
    direction is not mapped back by the scaling), as in the original code.

    ``square_avg`` (shape ``(P,)``) is updated in place; a new, scaled ``M``
    is returned.
    """
    g = M.mean(dim=0)
    square_avg.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
    return M / (square_avg.sqrt() + eps)


def rmsprop_transform_(
    update: torch.Tensor,
    square_avg: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    alpha: float,
    eps: float,
    momentum: float,
) -> torch.Tensor:
    r"""RMSProp applied to the Sven direction *after* the pseudoinverse (``rmsprop_post=True``).

    .. math::

        v \leftarrow \alpha v + (1-\alpha)\, d^2, \qquad
        d \leftarrow d / (\sqrt{v} + \epsilon), \qquad
        b \leftarrow \mu b + d,\ d \leftarrow b \ (\mu > 0).

    ``square_avg`` and ``momentum_buffer`` are updated in place; with
    momentum the returned tensor *is* ``momentum_buffer``.
    """
    square_avg.mul_(alpha).addcmul_(update, update, value=1.0 - alpha)
    out = update / (square_avg.sqrt() + eps)
    if momentum > 0:
        if momentum_buffer is None:
            raise ValueError("`momentum_buffer` is required when `momentum` > 0")
        momentum_buffer.mul_(momentum).add_(out)
        return momentum_buffer
    return out
