r"""A-posteriori certificates for iterative and randomized truncated SVDs.

A computed set of triplets ``(sigma_i, u_i, v_i)``, ``i = 1..c``, is
*certified* when all three of the following hold.

1. **Residuals, both orientations.** For every kept triplet

   .. math::
       \max(\|A v_i - \sigma_i u_i\|, \|A^\top u_i - \sigma_i v_i\|) \le \mathrm{tol}\,\sigma_1 .

   Two products with ``c`` columns. Checking only ``A v - \sigma u`` is not
   enough: for the tall orientation of a Rayleigh–Ritz step it vanishes by
   construction whatever the quality of the subspace (issue #11).

2. **Orthonormal vectors.** The short-side vectors ``X`` (``V_c`` for tall ``A``,
   ``U_c`` for wide) of the kept triplets satisfy

   .. math::
       \omega = \|X^\top X - I\|_2 \le \mathrm{tol} .

   Neither residuals nor the missed-value check (3) see a basis that is not
   orthonormal: two copies of one exact triplet, or any non-orthogonal mixing
   ``V_k M``, ``U_k M`` inside a multiple value ``\sigma``, have zero residuals,
   and (3) deflates their span only; yet ``V \Sigma^{-1} U^\top`` counts such
   directions twice, or by ``M M^\top``. With ``\omega \le \mathrm{tol}``,
   the polar factor ``Q`` of ``X`` (orthonormal, ``\|Q - X\|_2 \le \omega``, the same
   span) gives triplets of residuals at most about ``(r + \omega) \sigma_1``. The long
   side needs no test of its own: from ``u_i^\top A v_j`` in both orientations,

   .. math::
       (\sigma_i + \sigma_j) (U^\top U - V^\top V)_{ij} = r^{(2)\top}_i v_j - u_i^\top r^{(1)}_j
       + r^{(2)\top}_j v_i - u_j^\top r^{(1)}_i

   with ``r^{(1)}_j = A v_j - \sigma_j u_j``, ``r^{(2)}_i = A^\top u_i - \sigma_i v_i``:
   the two Gram matrices differ by at most about ``2 r \sigma_1 / \sigma_c``, the
   accuracy the residual test grants anyway (long sides ``A V \Sigma^{-1}`` of
   Rayleigh–Ritz steps are off by up to 12 ``tol`` at small ``\sigma_c`` in the test
   suite, while every short side was within ``0.11`` ``tol``). The test
   is nearly free: it reads the Gram matrix ``X^\top X`` that the deflation (3)
   forms anyway for its Cholesky QR (:func:`orthonormal_basis`), and bounds
   ``\omega`` by the largest column sum of ``|X^\top X - I|`` (``O(c^2)``), taking
   the eigenvalues only where that bound exceeds ``tol`` (:func:`orthonormality`).

3. **Nothing above the kept values was missed.** Residuals cannot see a
   singular value that the search space never reached (a converged triplet
   of the *wrong* ``sigma``). Let ``Q`` be an orthonormal basis of the
   short-side vectors (``V_d`` for tall ``A``, ``U_d`` for wide) of the kept
   triplets, plus further returned triplets that lie below ``\tau`` by more than
   four times their residual: every one with residual within ``sqrt(tol)``, and
   the first few less accurate ones where their larger margin (below) costs less
   than the gap they open (``_deflated``; deflating widens the gap that the check has
   to resolve; a fixed margin of ``4 sqrt(tol) sigma_1`` instead kept accurate
   neighbours of ``\tau`` out at a loose ``tol``, and the check then never resolved
   the gap), and ``P = I - Q Q^\top``. By Courant–Fischer,
   ``\sigma_{d+1}(A) \le \|A P\|`` for *any* ``d``-dimensional ``Q``
   (``A = A P + A Q Q^\top`` and the second term has rank ``d``), so without
   further triplets ``\|A P\| < \tau`` proves that ``A`` has no singular
   value at or above ``\tau`` besides the ``c`` kept ones, whatever the
   accuracy of the triplets; each further triplet is a singular value of
   ``A`` below ``\tau`` up to the residuals, which move the others by at most
   ``\sqrt{2d}\, r\, \sigma_1`` (Weyl), subtracted from the threshold. Here
   ``\tau = \sigma_c`` when ``c`` equals the requested rank and ``\tau = `` the
   cut-off when fewer values were kept. ``\|A P\|`` is estimated by ``B``
   *independent* Lanczos runs on ``P A^\top A P`` (``P A A^\top P`` for wide
   ``A``: the short side, float64, full reorthogonalisation) from Gaussian
   starts. Unlike the subtraction ``A - U_d \Sigma_d V_d^\top``, the
   projection costs nothing on the long side (``O(s d)`` per product), and
   ``\|A P\| = \|(A - U_d \Sigma_d V_d^\top) P\|``, so both see the same
   missed values; ``\hat\delta`` (the largest Ritz value) is a *lower* bound.
   By Kuczyński & Woźniakowski (1992), after ``q`` steps of one run

   .. math::
       P\{\hat\delta^2 < (1 - \varepsilon) \|A P\|^2\} \le 1.648 \sqrt{s}\, e^{-\sqrt{\varepsilon}(2q - 1)},

   so with ``\varepsilon = 1 - (\hat\delta / \tau)^2`` the probability that
   ``\|A P\| \ge \tau`` although every run reports ``\hat\delta < \tau`` is at
   most the ``B``-th power of that bound. The check stops (certified) once it
   is below :data:`FAILURE_PROBABILITY`, fails at once when ``\hat\delta \ge \tau``
   (a missed value is *proven*), and otherwise gives up after ``max_steps``
   steps (uncertified: the gap at the cut is too small to resolve). A run that
   breaks down has found an invariant subspace holding its start vector and is
   exact. The check's Lanczos step (``_check_step``) orthogonalises each new vector
   against ``Q`` and the run's basis in one classical Gram–Schmidt pass (as ARPACK's
   ``dsaitr``), which applies ``P`` too; on the CPU it runs on NumPy views of the basis,
   where each of its dozen operations costs a fraction of torch's call overhead (the step's
   cost besides the product fell from about 0.45 to 0.2 ms at ``s = 3000``, ``d = 60``).
   Values below the solver's own resolution ``tol * sigma_1`` cannot be
   resolved: ``\tau \ge 4 \sqrt{c+1}\, tol\, \sigma_1`` (the deflated operator of a correct
   answer carries the triplets' own errors).

The certificate uses its own generator (seeded from the solver's seed), so it
is reproducible. Cost: ``2c`` columns of products for (1) and
``2 B q`` for (2) (``q \le 64`` by default), plus ``O(s B q^2)`` flops.

**How many runs.** To reach the bound ``p`` with ``B`` runs each run needs
``\sqrt{\varepsilon}(2q - 1) \ge \ln(1.648\sqrt{s}) + \ln(1/p) / B``, so the
products in all, ``2 B q``, are fewest for ``B = 1`` (at ``s = 3000``,
``p = 10^{-6}``: ``18.3 / \sqrt{\varepsilon}`` columns against ``31.8 / \sqrt{\varepsilon}``
for ``B = 4``). A block of ``B`` columns costs about one column on dense data and
on a GPU (one GEMM), so the default is ``B = 4``; for SciPy sparse matrices and
operators, whose products cost per column, :class:`truncpinv.ScipySVDS` passes ``runs=1``.

References:
    J. Kuczyński and H. Woźniakowski, *Estimating the largest eigenvalue by
    the power and Lanczos algorithms with a random start*, SIAM J. Matrix
    Anal. Appl. 13(4), 1992.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._operator import LinearOperator
from ._tolerance import Tolerance, is_real_scalar

__all__ = ["Certificate", "UncertifiedResultWarning", "certify", "default_tol"]

_F64 = torch.float64
#: Accepted probability that a certified result missed a singular value above the threshold.
FAILURE_PROBABILITY = 1e-6
#: Independent Lanczos runs of the deflation check by default (their failure probabilities multiply).
RUNS = 4
#: Memory of the check's Krylov bases (float64 numbers, all runs together) that caps ``max_steps`` above 64.
BASIS_BUDGET = 1 << 25
#: One Gram-Schmidt pass suffices when it keeps at least this fraction of the vector's norm (DGKS).
REORTH_KEEP = 1 / math.sqrt(2)
#: Steps between two convergence tests of the deflation check (at least; see ``certify``).
CHECK_EVERY = 4
#: Singular values below ``RESOLUTION sqrt(c + 1) tol sigma_1`` are not resolved by the check: the
#: deflated operator of a correct answer carries the triplets' own errors, up to ``sqrt(c) tol sigma_1``.
RESOLUTION = 4.0
#: Columns within this of orthonormal (``max |X^T X - I|``) are orthonormalised by Cholesky QR (``orthonormal_basis``).
CHOLQR_TOL = 1e-6
#: Entries of one block of the residual norms on the CPU (``_column_norms``; 1 MiB of float64).
BLOCK_ENTRIES = 1 << 17
#: Floor of the default residual tolerance, per dtype (relative to ``sigma_1``).
_TOL_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}


class UncertifiedResultWarning(RuntimeWarning):
    """An iterative or randomized solver returned a result it could not certify (see ``F.stats``)."""


def default_tol(dtype: torch.dtype, shape: tuple[int, int]) -> float:
    """Default residual tolerance relative to ``sigma_1``: ``max(floor, 8 sqrt(max(m, n)) eps)``.

    The floor is ``1e-5`` for float32 and ``1e-12`` for float64; the second
    term is the rounding level of the residual itself, computed with products in
    ``dtype`` (the sum of ``max(m, n)`` terms of size ``eps sigma_1``).
    """
    eps = float(torch.finfo(dtype).eps)
    return max(_TOL_FLOOR.get(dtype, 1e-5), 8.0 * math.sqrt(max(shape)) * eps)


def check_tol(tol: Any) -> None:
    """Validate a solver's ``tol`` field (``None`` or a float in ``(0, 1)``)."""
    if tol is None:
        return
    if not is_real_scalar(tol) or not 0 < float(tol) < 1:
        raise ValueError(f"`tol` must be a float in (0, 1) or None, got {tol!r}")


@dataclass
class Certificate:
    """The outcome of :func:`certify`.

    Attributes:
        residual: ``max_i max(||A v_i - s_i u_i||, ||A^T u_i - s_i v_i||) / s_1`` over the kept triplets.
        tol: the residual tolerance it was held to (and the orthonormality).
        orthonormality: an upper bound of ``||X^T X - I||_2`` for the short-side vectors ``X`` of the kept
            triplets (:func:`orthonormality`; NaN when the residual test failed first).
        deflated_norm: the lower estimate ``delta`` of ``||A P||`` (absolute; ``P`` projects out the
            short-side vectors of the deflated triplets, see the module docstring).
        threshold: ``tau``, the bound ``||A P||`` must stay below.
        failure_probability: bound on the probability that ``||A P|| >= tau`` given the estimate.
        steps: Lanczos steps of the deflation check.
        matvecs: columns multiplied by ``A`` or ``A^T`` for the certificate.
        certified: both checks passed.
    """

    residual: float
    tol: float
    orthonormality: float
    deflated_norm: float
    threshold: float
    failure_probability: float
    steps: int
    matvecs: int
    certified: bool

    def stats(self) -> dict[str, Any]:
        """The entries that go into ``F.stats``."""
        return {
            "residual": self.residual,
            "residual_tol": self.tol,
            "orthonormality": self.orthonormality,
            "deflated_norm": self.deflated_norm,
            "deflated_threshold": self.threshold,
            "miss_probability": self.failure_probability,
            "certified": self.certified,
        }

    def explain(self, solver: str) -> str:
        """A sentence saying what failed and what to do."""
        if self.residual > self.tol:
            what = (
                f"its residual max(||Av - su||, ||A^T u - sv||) = {self.residual:.2e} * sigma_1 "
                f"exceeds tol = {self.tol:.1e}"
            )
        elif not self.orthonormality <= self.tol:
            what = (
                f"its singular vectors are not orthonormal: ||V^T V - I|| <= {self.orthonormality:.2e} "
                f"exceeds tol = {self.tol:.1e} (repeated or mixed triplets)"
            )
        elif self.deflated_norm >= self.threshold:
            what = (
                f"it missed a singular value: ||A (I - V V^T)|| >= {self.deflated_norm:.3e} is not below "
                f"the smallest kept value / cut-off {self.threshold:.3e}"
            )
        else:
            what = (
                f"the gap at the cut is too small to rule out a missed singular value within {self.steps} check steps "
                f"(||A (I - V V^T)|| ~ {self.deflated_norm:.3e} vs {self.threshold:.3e}, "
                f"miss probability <= {self.failure_probability:.1e})"
            )
        return (
            f"solver {solver!r} returned an uncertified result: {what}; increase its budget, use solver='auto' "
            f"(which falls back to an exact method) or an exact solver ('svd', 'gram'). See F.stats."
        )


def _products(A: torch.Tensor | LinearOperator) -> tuple[Any, Any]:
    if isinstance(A, torch.Tensor):
        return (lambda X: A @ X), (lambda Y: A.T @ Y)
    return A.matmat, A.rmatmat


def certify(
    A: torch.Tensor | LinearOperator,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    tol: Tolerance,
    *,
    rtol_res: float,
    seed: int = 0,
    max_steps: int = 64,
    runs: int = RUNS,
    AV: torch.Tensor | None = None,
    AtU: torch.Tensor | None = None,
    gram: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Certificate:
    """Certify the triplets ``(U, S, V)`` of ``A`` (descending ``S``) for the truncation ``tol``.

    Only the triplets that ``tol`` keeps are checked; see the module docstring.
    ``max_steps`` bounds the Lanczos steps of the missed-value check (and
    :data:`BASIS_BUDGET` its memory), ``runs`` is the number ``B`` of independent runs.
    ``AV`` (``A V``) or ``AtU`` (``A^T U``), when given, are products the solver itself
    computed with ``A`` and these very vectors (a Rayleigh–Ritz step's): they are reused for
    that side's residual instead of being multiplied again. The other side is always multiplied
    here, and the two together are the residual test.
    ``gram``, when given (CPU only), is ``x -> C^T C x`` for a 1-D float64 NumPy ``x`` of the short side
    (``C = A^T`` for ``m <= n``, else ``A``) with ``C^T C`` formed by the solver as a sparse matrix (the
    Laplacian of a graph's incidence matrix, :func:`truncpinv.solvers.scipy_svds.formed_gram`): the
    missed-value check multiplies it in place of the pair ``C^T (C x)`` (one pass over its entries against
    two over ``A``'s), counted as the two columns it replaces. It is the same operator up to the rounding of
    the pair's own products; the residuals always multiply ``A``.
    """
    m, n = int(A.shape[0]), int(A.shape[1])
    dt, dev = A.dtype, A.device
    mm, rmm = _products(A)
    smax = float(S[0]) if S.numel() else 0.0
    c, cut = tol.keep(S)
    t = S.numel()
    U64, S64, V64 = U.to(_F64), S.to(_F64), V.to(_F64)
    matvecs = 0
    residual, res_all = 0.0, torch.zeros(t, dtype=_F64, device=dev)
    if t > 0 and smax > 0:
        R1 = _column_norms((mm(V64.to(dt)) if AV is None else AV).to(_F64), U64, S64)
        R2 = _column_norms((rmm(U64.to(dt)) if AtU is None else AtU).to(_F64), V64, S64)
        res_all = torch.maximum(R1, R2) / smax
        residual = float(res_all[:c].max()) if c > 0 else 0.0
        matvecs += t * ((AV is None) + (AtU is None))
    # tau: the smallest kept value when the rank is full, else the cut-off
    tau = float(S64[c - 1]) if c == tol.rank and c > 0 else cut
    if residual > rtol_res:  # no point in the deflation check
        return _refused(residual, rtol_res, math.nan, tau, matvecs)
    # deflate the kept triplets and further ones that lie clearly below tau (see _deflated): then a value >= tau
    # that the triplets miss is, up to the triplets' residuals, a singular value of A P (Weyl: d triplets of
    # residual <= r move it by <= sqrt(2 d) r sigma_1)
    sel_np = _deflated(S64.cpu().numpy(), res_all.cpu().numpy(), c, tau, smax, rtol_res)
    sel = torch.from_numpy(sel_np).to(dev)
    d = int(sel_np.sum())
    tau = _threshold(tau, c, d, float(res_all[sel].max()) if d else 0.0, smax, rtol_res)
    s = min(m, n)
    wide = m <= n
    B = runs
    # P = I - Q Q^T on the short side, Q an orthonormal basis of the deflated short-side vectors (as rows); the
    # kept ones come first, and their block of the Gram matrix that Cholesky QR forms is the orthonormality test
    X = (U64 if wide else V64)[:, sel]
    G = X.T @ X
    omega = orthonormality(G[:c, :c], rtol_res)
    if not omega <= rtol_res:  # repeated or mixed triplets: their span hides them from the deflation check
        return _refused(residual, rtol_res, omega, tau, matvecs)
    QdT = orthonormal_basis(X, G).T.contiguous()
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed + 0x5EED)
    # more than the default 64 steps only while the bases fit the memory budget
    steps_max = min(max_steps, s, max(64, BASIS_BUDGET // (B * s) - 1))
    # the runs' Lanczos bases, as rows; uninitialised: row j + 1 is written at step j before any read (zeroing
    # the memory budget of a long check cost as much as several of its steps)
    Qb = torch.empty(B, steps_max + 1, s, dtype=_F64, device=dev)
    x0 = torch.randn(B, s, dtype=_F64, device=dev, generator=gen)
    x0 = x0 - (x0 @ QdT.T) @ QdT
    Qb[:, 0] = x0 / x0.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # on the CPU the loop runs on NumPy views of the same memory: a step is a dozen small operations around
    # the product, and NumPy's per-call cost is a fraction of torch's (0.14 against 0.25 ms a step, s = 3000)
    cpu = dev.type == "cpu"
    Kd, Kb = (QdT.numpy(), Qb.numpy()) if cpu else (QdT, Qb)
    formed = gram if cpu else None

    def gram_product(X: Any) -> Any:
        # C^T C X on the short side (rows of X), C = A (tall) or A^T (wide), float64; the projections P on
        # either side are in the orthogonalisation (_check_step)
        nonlocal matvecs
        matvecs += 2 * X.shape[0]
        if formed is not None:
            return np.stack([np.asarray(formed(x), dtype=np.float64) for x in X])
        Y = torch.from_numpy(X.T) if cpu else X.T
        Y = Y if dt == _F64 else Y.to(dt)
        Z = mm(rmm(Y)) if wide else rmm(mm(Y))
        Z = Z if Z.dtype == _F64 else Z.to(_F64)
        return Z.numpy().T if cpu else Z.T

    alpha = np.zeros((B, steps_max))
    beta = np.zeros((B, steps_max))
    broken = np.zeros(B, dtype=bool)
    all_broken = False
    floor = 1e-13 * max(smax, tau, 1e-300) ** 2  # a run whose new vector is below this has broken down
    delta, prob, q, next_test = 0.0, 1.0, 0, CHECK_EVERY
    for j in range(steps_max):
        W, a, bn = _check_step(gram_product(Kb[:, j]), Kd, Kb, j, beta[:, j - 1] if j > 0 else None)
        alpha[:, j] = a
        if bn.min() > floor:  # no run has broken down (the common case)
            beta[:, j] = bn
            Kb[:, j + 1] = W / (bn[:, None] if cpu else torch.from_numpy(bn).to(dev)[:, None])
        else:  # a broken run keeps zero coefficients and a zero vector (its products are zero from now on)
            broken |= bn <= floor
            beta[:, j] = np.where(broken, 0.0, bn)
            scale = np.where(broken, 0.0, 1.0 / np.maximum(bn, 1e-300))[:, None]
            Kb[:, j + 1] = W * (scale if cpu else torch.from_numpy(scale).to(dev))
            all_broken = bool(broken.all())
        q = j + 1
        if q < next_test and q != steps_max and not all_broken:
            continue
        delta = math.sqrt(_largest_ritz(alpha[:, :q], beta[:, : q - 1]))
        if not math.isfinite(delta):  # NaN/Inf reached the check (non-finite A under check_finite=False): no proof
            prob = 1.0
            break
        if delta >= tau and delta > 0:  # a missed singular value is proven
            prob = 1.0
            break
        if all_broken or q >= s:  # invariant subspaces or the whole space: exact
            prob = 0.0
            break
        if tau > 0:
            eps = 1.0 - (delta / tau) ** 2
            single = min(1.0, 1.648 * math.sqrt(s) * math.exp(-math.sqrt(eps) * (2 * q - 1)))
            active = int((~broken).sum())
            prob = single**active
            if prob <= FAILURE_PROBABILITY:
                break
            # the Ritz values of nested Krylov spaces only grow, so eps only shrinks: the bound cannot reach
            # FAILURE_PROBABILITY before step q_min with sqrt(eps) (2 q_min - 1) = log(1.648 sqrt(s) / p^(1/B)),
            # and the next test waits for it (a proven miss is then seen some steps late, never missed)
            next_test = max(q + CHECK_EVERY, math.ceil(check_steps(eps, s, max(active, 1))))
    ok_res = residual <= rtol_res
    ok_defl = (delta < tau or delta == 0.0) and prob <= FAILURE_PROBABILITY
    return Certificate(
        residual=residual,
        tol=rtol_res,
        orthonormality=omega,
        deflated_norm=delta,
        threshold=tau,
        failure_probability=prob,
        steps=q,
        matvecs=matvecs,
        certified=bool(ok_res and ok_defl),
    )


def _refused(residual: float, rtol_res: float, omega: float, tau: float, matvecs: int) -> Certificate:
    """The certificate of a result refused before the missed-value check (residual or orthonormality)."""
    return Certificate(
        residual=residual,
        tol=rtol_res,
        orthonormality=omega,
        deflated_norm=math.nan,
        threshold=tau,
        failure_probability=1.0,
        steps=0,
        matvecs=matvecs,
        certified=False,
    )


def orthonormality(G: torch.Tensor, tol: float) -> float:
    r"""An upper bound of ``\omega = \|G - I\|_2`` for a Gram matrix ``G = X^\top X`` (``c x c``), exact where it
    matters: the largest column sum of ``|G - I|`` (``\|F\|_2 \le \sqrt{\|F\|_1 \|F\|_\infty} = \|F\|_1`` for
    symmetric ``F``; ``O(c^2)``), and where that exceeds ``tol`` the largest eigenvalue of ``G - I`` in modulus
    (``O(c^3)``; 0.3 ms at ``c = 67``, against 0.02 ms for the column sums). NaN when ``G`` is not finite."""
    if G.numel() == 0:
        return 0.0
    F = G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    bound = float(F.abs().sum(dim=0).max())
    if bound <= tol or not math.isfinite(bound):
        return bound if math.isfinite(bound) else math.nan
    return float(torch.linalg.eigvalsh(F).abs().max())


def check_steps(gap: float, s: int, runs: int = 1) -> float:
    r"""Steps ``q`` of ``runs`` independent Lanczos runs (dimension ``s``) before the Kuczyński–Woźniakowski bound
    of :func:`certify` can reach :data:`FAILURE_PROBABILITY` when ``1 - (\hat\delta / \tau)^2 = `` ``gap``:
    ``\sqrt{gap}(2q - 1) = \ln(1.648\sqrt{s}) + \ln(1/p) / B`` (``inf`` for ``gap <= 0``)."""
    if not gap > 0:
        return math.inf
    need = math.log(1.648 * math.sqrt(s)) - math.log(FAILURE_PROBABILITY) / runs
    return (need / math.sqrt(gap) + 1) / 2


def _threshold(tau: float, c: int, d: int, r: float, smax: float, rtol_res: float) -> float:
    """The check's threshold after deflating ``d >= c`` triplets of largest residual ``r`` (relative to ``smax``):
    ``tau`` less the Weyl margin ``sqrt(2 d) r smax`` of the ``d - c`` further ones (none without them:
    ``sigma_{c+1}(A) <= ||A P||`` for the projector ``P`` of any ``c``-dimensional subspace), never below the
    resolution ``RESOLUTION sqrt(d + 1) tol smax`` (the deflated operator of a correct answer carries the
    triplets' own errors)."""
    margin = math.sqrt(2 * d) * r * smax if d > c else 0.0
    return max(tau - margin, RESOLUTION * math.sqrt(d + 1) * rtol_res * smax)


def predicted_gap(
    S: np.ndarray, res: np.ndarray, sel: np.ndarray, c: int, tau: float, smax: float, rtol_res: float
) -> float:
    """``1 - (next / tau_d)^2``: the gap that the check would have to resolve after deflating the triplets
    ``sel`` (values ``S``, descending, residuals ``res`` relative to ``smax``), with ``next`` the largest
    value left out and ``tau_d`` the threshold (:func:`_threshold`); ``-inf`` when none is left out (no
    prediction) or the threshold is not positive."""
    rest = S[~sel]
    d = int(sel.sum())
    tau_d = _threshold(tau, c, d, float(res[sel].max()) if d else 0.0, smax, rtol_res)
    if rest.size == 0 or not tau_d > 0:
        return -math.inf
    return 1.0 - (float(rest.max()) / tau_d) ** 2


def _deflated(S: np.ndarray, res: np.ndarray, c: int, tau: float, smax: float, rtol_res: float) -> np.ndarray:
    """The triplets that the missed-value check deflates (a boolean mask over ``S``).

    The ``c`` kept ones; every further one that is accurate (residual within ``sqrt(tol)``) and lies below
    ``tau`` by more than four times its residual (deflating it widens the gap the check has to resolve, at a
    negligible margin); then, of the further ones that lie that far below ``tau`` but are less accurate, the
    first ``e`` (in order) for the ``e >= 0`` that widens the predicted gap most (:func:`predicted_gap`: each
    lowers the threshold by its Weyl margin, and moves the next value down). Any choice is sound: the
    margin covers the residuals of whatever is deflated; the choice only decides how long the check runs.
    """
    idx = np.arange(S.size)
    below = (idx >= c) & (S + 4 * res * smax < tau)
    sel = (idx < c) | (below & (res <= math.sqrt(rtol_res)))
    loose = np.flatnonzero(below & ~sel)
    best, best_gap = sel, predicted_gap(S, res, sel, c, tau, smax, rtol_res)
    cand = sel.copy()
    for i in loose:
        cand[i] = True
        gap = predicted_gap(S, res, cand, c, tau, smax, rtol_res)
        if gap > best_gap:
            best, best_gap = cand.copy(), gap
    return best


def orthonormal_basis(X: torch.Tensor, G: torch.Tensor | None = None) -> torch.Tensor:
    r"""An orthonormal basis of the columns of ``X`` (``s x d``, ``d <= s``): by Cholesky QR where they are
    orthonormal already up to :data:`CHOLQR_TOL` (``X^\top X = L L^\top``, ``Q = X L^{-\top}``), else by
    Householder QR. ``G``, when given, is ``X^\top X`` formed by the caller (:func:`certify` tests the
    orthonormality on it first), and is not formed again.

    Cholesky QR loses orthogonality like ``eps \kappa(X)^2`` (Stathopoulos & Wu 2002), so for columns within
    ``CHOLQR_TOL`` of orthonormal (``\kappa^2 \le (1 + t) / (1 - t)``) one pass is orthonormal to working
    precision; a Gram matrix and a triangular solve cost 1.6 ms on ``3000 x 67`` against 4.4 ms (torch) and
    6.9 ms (NumPy) for Householder. Solvers' singular vectors are that close; anything else (a broken
    factorisation, clustered Ritz vectors) takes Householder, which any input serves.
    """
    G = X.T @ X if G is None else G
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    if G.numel() and bool((G - eye).abs().max() <= CHOLQR_TOL):
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            return torch.linalg.solve_triangular(L, X.T, upper=False).T
    return torch.linalg.qr(X).Q


def _column_norms(Y: torch.Tensor, X: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``||y_i - s_i x_i||`` for every column ``i`` (float64): a column sum of squares of ``y_i - s_i x_i``
    (torch's ``norm(dim=0)`` over the rows of a tall matrix took three times as long). On the CPU in blocks
    of about :data:`BLOCK_ENTRIES` entries, so that the temporary stays small and in cache: one temporary
    of the whole ``20000 x 67`` matrix cost 9.6 ms, mostly in first touches of fresh memory, against
    2.5 ms in blocks (``benchmarks/sparse_table.py --hidden``)."""
    rows = Y.shape[0] if Y.device.type != "cpu" else max(1, BLOCK_ENTRIES // max(1, Y.shape[1]))
    total = torch.zeros(Y.shape[1], dtype=Y.dtype, device=Y.device)
    for i in range(0, Y.shape[0], rows):
        R = torch.addcmul(Y[i : i + rows], X[i : i + rows], S, value=-1.0)
        total += R.mul_(R).sum(dim=0)
    return total.sqrt_()


def _largest_ritz(a: np.ndarray, b: np.ndarray) -> float:
    """The largest eigenvalue (clamped at 0) over the ``B`` symmetric tridiagonal matrices with diagonals
    ``alpha`` and off-diagonals ``beta`` (rows): LAPACK bisection for that one eigenvalue, ``O(q)`` each;
    NaN when an entry is not finite (LAPACK's bisection would refuse it)."""
    from scipy.linalg import eigvalsh_tridiagonal

    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    q = a.shape[1]
    best = 0.0
    for i in range(a.shape[0]):
        top = a[i, 0] if q == 1 else eigvalsh_tridiagonal(a[i], b[i], select="i", select_range=(q - 1, q - 1))[0]
        best = max(best, float(top))
    return best


def _check_step(W: Any, Kd: Any, Kb: Any, j: int, beta_prev: np.ndarray | None) -> tuple[Any, np.ndarray, np.ndarray]:
    r"""One Lanczos step of the missed-value check, for ``B`` runs at once, on NumPy arrays or torch tensors.

    ``W`` (``B x s``) holds ``M q_j`` for each run's current vector ``q_j = Kb[:, j]`` (``M = C^T C``),
    ``Kd`` (``d x s``) the deflated vectors ``Q^T`` as rows and ``Kb[:, :j + 1]`` each run's basis.
    The three-term step ``w = M q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}`` is followed by full
    reorthogonalisation by classical Gram–Schmidt against ``[Q, q_0, ..., q_j]``, which applies the
    projector ``P = I - Q Q^\top`` too (the basis lies in the range of ``P``, so this is the step of
    Lanczos on ``P M P``; ARPACK's ``dsaitr`` orthogonalises the same way). A second pass runs only
    where the first removed more than ``1 - REORTH_KEEP`` of the norm (Daniel–Gragg–Kaufman–Stewart:
    otherwise one pass is orthogonal to working precision; "twice is enough" when it is not). After
    the three-term step a full pass removes only rounding, so the second pass is rare.

    Returns the new residual vectors ``W``, ``\alpha_j`` and ``\|W\|`` per run (host NumPy arrays).
    """
    host = _host
    q = Kb[:, j]
    a = (q * W).sum(-1)
    W = W - a[:, None] * q
    if beta_prev is not None:
        W = (
            W
            - (beta_prev if isinstance(W, np.ndarray) else torch.from_numpy(beta_prev).to(W.device))[:, None]
            * Kb[:, j - 1]
        )
    a = host(a)
    wn = host((W * W).sum(-1)) ** 0.5
    Kj = Kb[:, : j + 1]
    for _ in range(2):
        hd = W @ Kd.T
        hb = (Kj @ W[:, :, None])[:, :, 0]
        W = W - hd @ Kd - (hb[:, None, :] @ Kj)[:, 0]
        a = a + host(hb[:, j])
        bn = host((W * W).sum(-1)) ** 0.5
        if not (bn < REORTH_KEEP * wn).any():
            break
        wn = bn
    return W, a, bn


def _host(x: Any) -> np.ndarray:
    """A NumPy array from a NumPy array or a torch tensor (copied to the host)."""
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def warn_uncertified(cert: Certificate, solver: str) -> None:
    """Issue the one :class:`UncertifiedResultWarning` of a direct solver call, attributed to the first
    caller outside truncpinv (``tp.pinv``, ``tp.lstsq`` or ``solver.factorize`` alike)."""
    warn_from_caller(cert.explain(solver))


def warn_from_caller(message: str) -> None:
    """Issue an :class:`UncertifiedResultWarning` attributed to the first caller outside truncpinv."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(message, UncertifiedResultWarning, stacklevel=level)
