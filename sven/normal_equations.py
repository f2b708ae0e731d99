r"""The factorisation of a tall Jacobian from its normal equations, certified for the damping it is used with.

Levenberg--Marquardt needs the damped steps

.. math::

    d_\lambda = V \frac{\Sigma}{\Sigma^2 + \lambda} U^\top R
    = (M^\top M + \lambda I)^{-1} M^\top R

for a few :math:`\lambda` of one Jacobian :math:`M` (``m x n``, ``m >> n``). The SVD (a QR of :math:`M` first:
about :math:`6 m n^2` flops with the QR's ``Q`` and ``Q U_R``) is backward stable. The normal equations
(what torch-levenberg-marquardt solves, by a Cholesky factorisation of :math:`M^\top M + \lambda I`) cost one
product :math:`K = M^\top M` (:math:`2 m n^2`); here its eigendecomposition :math:`K = V \Lambda V^\top` serves
every :math:`\lambda` of the step, and :math:`U = M V \Lambda^{-1/2}` (one more product) completes the
factorisation the step control expects (:class:`truncpinv.TruncatedPinv`), with
:math:`\sigma_i = \sqrt{\lambda_i}`.

**What it loses.** :math:`K` accumulated in float64 carries an error :math:`E` with
:math:`\|E\| \le \delta = \max(m, n)\,\epsilon_{64}\,\lambda_1` (the bound of :class:`truncpinv.GramEigen`), so
the damped step solves :math:`(K + E + \lambda I) d = M^\top R` and (Weyl; the perturbed system's smallest
eigenvalue is at least :math:`\lambda_n + \lambda - \delta`)

.. math::

    \frac{\|d - d^\star\|}{\|d^\star\|} \le \frac{\delta}{\lambda_n + \lambda - \delta}
    \approx \epsilon\, m\, \kappa_\lambda^2, \qquad \kappa_\lambda^2 = \frac{\lambda_1 + \lambda}{\lambda_n + \lambda}:

the condition number *squared*, of the damped system. :func:`resolves` is this test against
:data:`ACCURACY`; the damping makes an ill-conditioned Jacobian usable (the sinc MLP of
``benchmarks/bench_least_squares.py`` has :math:`\kappa(M) > 10^{10}`, but a damping
:math:`\lambda \ge 10^{-6}\sigma_1^2` gives :math:`\kappa_\lambda^2 \le 10^6` and, with
:math:`m = 20000`, an error below :math:`5 \cdot 10^{-6}`). The direction of a kept
:math:`\sigma_i` is :math:`v_i (M v_i)^\top R / (\lambda_i + \lambda)`: the columns of ``U`` need not be
orthonormal where :math:`\lambda_i` is at round-off (:func:`sven.functional.filtered_direction` applies ``V``
directly for this factorisation). A step that asks for a damping the test refuses gets the SVD instead
(:class:`sven.control.StepContext`'s ``resolve``): the fallback is certified, never silent.

The singular values it reports (``opt.last_step.singular_values``) are :math:`\sqrt{\max(\lambda_i, 0)}`:
those below :math:`\sqrt{\delta}` are round-off of :math:`K`, where an SVD would resolve them down to
:math:`\epsilon\,\sigma_1`.
"""

from __future__ import annotations

from typing import Any

import torch

from truncpinv import TruncatedPinv
from truncpinv._factorization import reciprocal_or_zero
from truncpinv._tolerance import make_tolerance
from truncpinv.solvers.gram_eigen import gram

__all__ = [
    "ACCURACY",
    "MIN_ASPECT",
    "MIN_COLUMNS",
    "NAME",
    "applies",
    "explicit_factors",
    "factorize_normal",
    "resolves",
]

#: ``stats["solver"]`` of a factorisation from the normal equations.
NAME = "normal_equations"
#: The largest relative error of a damped step that :func:`resolves` accepts. The step control judges every
#: try by the residuals it actually produces (the gain ratio), so a direction this close to the exact one
#: changes no decision a Levenberg--Marquardt step makes.
ACCURACY = 1e-4
#: Only a Jacobian at least this many times taller than wide ...
MIN_ASPECT = 8
#: ... with at least this many columns (below it one small SVD costs less than the two products).
MIN_COLUMNS = 16


def applies(M: torch.Tensor) -> bool:
    """Whether ``M`` is tall and wide enough for the normal equations to pay (:data:`MIN_ASPECT`,
    :data:`MIN_COLUMNS`)."""
    m, n = M.shape
    return n >= MIN_COLUMNS and m >= MIN_ASPECT * n and M.dtype in (torch.float32, torch.float64)


def factorize_normal(
    M: torch.Tensor, *, rank: int | None, rtol: float | None, atol: float, damping: float
) -> TruncatedPinv | None:
    r"""The factorisation of ``M`` from :math:`K = M^\top M` (float64), or ``None`` when it cannot serve ``damping``.

    ``damping`` (:math:`\lambda / \sigma_1^2`) is the smallest damping the step is expected to use; ``None``
    comes back when :func:`resolves` refuses it already (the caller then takes the SVD), or when ``K`` is not
    finite or is zero. The truncation is the caller's (``rank``, ``rtol``, ``atol``), applied to
    :math:`\sigma_i = \sqrt{\max(\lambda_i, 0)}`. ``stats`` hold ``gram_error`` (:math:`\delta`) and
    ``lambda_min`` (:math:`\max(\lambda_n, 0)`) for :func:`resolves`.
    """
    m, n = M.shape
    K = gram(M, accumulate=torch.float64, chunk_size=8192)
    if not bool(torch.isfinite(K).all()):
        return None  # an overflow in the squares: the SVD (on the equilibrated matrix) handles it
    lam, Q = torch.linalg.eigh(K)
    lam, Q = lam.flip(0), Q.flip(1)
    lam1 = float(lam[0])
    if not lam1 > 0.0:
        return None
    stats = {
        "solver": NAME,
        "gram_error": max(m, n) * float(torch.finfo(torch.float64).eps) * lam1,
        "lambda_min": max(float(lam[-1]), 0.0),
        "lambda_max": lam1,
    }
    if not _accurate(stats, damping):
        return None
    S = lam.clamp_min(0.0).sqrt()
    tol = make_tolerance((m, n), M.dtype, rank=rank, rtol=rtol, atol=atol)
    V = Q.to(M.dtype)
    U = M @ (V * reciprocal_or_zero(S).to(M.dtype))  # (the scaling on the small side)
    return TruncatedPinv(U, S.to(M.dtype), V, tol=tol, shape=(m, n), stats=stats, operator=M)


def _accurate(stats: dict[str, Any], damping: float) -> bool:
    lam = damping * float(stats["lambda_max"])
    delta = float(stats["gram_error"])
    return delta <= ACCURACY * (float(stats["lambda_min"]) + lam - delta)


def explicit_factors(F: TruncatedPinv) -> bool:
    """Whether ``F`` is one of :mod:`sven.factorize`'s own (normal equations, or the direct SVD of a small ``M``):
    dense factors with ``V`` explicit, so a direction is :math:`V (\\phi(\\Sigma) \\circ U^\\top R)` directly."""
    return F.stats.get("solver") == NAME or bool(F.stats.get("direct", False))


def resolves(F: TruncatedPinv, damping: float) -> bool:
    r"""Whether the damped step of ``F`` at ``damping`` (:math:`\lambda/\sigma_1^2`) is accurate to :data:`ACCURACY`.

    Always true for a factorisation that did not come from the normal equations (an SVD); otherwise the
    bound of the module docstring, :math:`\delta \le \text{ACCURACY}\,(\lambda_n + \lambda - \delta)`.
    """
    if F.stats.get("solver") != NAME:
        return True
    return _accurate(F.stats, damping)
