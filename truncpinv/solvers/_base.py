"""The solver protocol shared by every truncated-pseudoinverse solver.

A solver is a small frozen dataclass that holds only hyperparameters. Its one
public method, :meth:`Solver.factorize`, validates the input, resolves the
tolerances (:mod:`truncpinv._tolerance`), switches TF32 off, and calls the
solver's own :meth:`Solver._compute`, which returns the leading singular
triplets. Adding a solver means writing one file with one ``_compute``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from typing import Any, ClassVar

import torch

from .._certify import Certificate, certify, warn_from_caller, warn_uncertified
from .._factorization import Triplets, TruncatedPinv, no_tf32
from .._operator import LinearOperator
from .._tolerance import Tolerance, is_int_scalar, make_tolerance
from .._validation import prepare_matrix

__all__ = ["Solver", "SolverError", "certify_triplets", "check_seed", "make_generator"]


class SolverError(RuntimeError):
    """A solver failed to converge or broke down on valid, finite input."""


class Solver(abc.ABC):
    """Base class of all solvers.

    Class attributes describe capabilities (used by ``solver="auto"`` and by the
    test registry):

    * ``name``: the registry name;
    * ``exact``: computes the singular triplets to working accuracy by a direct method;
    * ``matrix_free``: accepts an operator with ``matmat``/``rmatmat`` only;
    * ``randomized``: uses random numbers (always from an explicit ``seed``);
    * ``complex_ok``: accepts a complex dense ``A`` (conjugate transposes throughout).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    matrix_free: ClassVar[bool] = False
    randomized: ClassVar[bool] = False
    complex_ok: ClassVar[bool] = False

    def factorize(
        self,
        A: Any,
        *,
        rank: int | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        check_finite: bool = True,
    ) -> TruncatedPinv:
        """Factorise the truncated pseudoinverse of ``A``.

        Args:
            A: ``m x n`` matrix: ``torch.Tensor`` (CPU or CUDA, float32/float64),
                ``numpy.ndarray`` (NumPy results), or, for matrix-free solvers,
                an operator (see :class:`truncpinv.LinearOperator`).
            rank: keep at most this many singular values (default ``min(m, n)``;
                larger values are clamped, see ``F.rank`` for the rank used).
            rtol: relative cut-off; keep ``sigma > max(atol, rtol * sigma_max)``.
                Default ``max(m, n) * eps`` as in :func:`torch.linalg.pinv`.
            atol: absolute cut-off (default 0).
            check_finite: reject NaN/Inf entries of a dense ``A`` (default ``True``).

        Returns:
            A :class:`truncpinv.TruncatedPinv`.
        """
        prep = prepare_matrix(
            A, allow_operator=self.matrix_free, solver=self.name, check_finite=check_finite, complex_ok=self.complex_ok
        )
        tol = make_tolerance(prep.shape, prep.dtype, rank=rank, rtol=rtol, atol=atol)
        t0 = time.perf_counter()
        try:
            with no_tf32(), torch.no_grad():
                A_work, shift = prep.A, 0
                if isinstance(A_work, torch.Tensor):
                    A_work, shift = _equilibrate(A_work)
                # the solvers see 2^-shift A (exactly): scale atol alike, and the singular values back below
                tol_work = dataclasses.replace(tol, atol=_ldexp_float(tol.atol, -shift)) if shift else tol
                trip = self._compute(A_work, tol_work)
                if shift:
                    trip.S = _ldexp(trip.S, shift)
        except torch.linalg.LinAlgError as e:
            if prep.dense and not bool(torch.isfinite(prep.A).all()):  # type: ignore[arg-type]
                raise ValueError(
                    "`A` must be finite, but it contains NaN or Inf (check_finite=False skipped the scan)"
                ) from e
            raise SolverError(f"solver {self.name!r} failed on a {prep.shape[0]}x{prep.shape[1]} matrix: {e}") from e
        S = trip.S
        # the vectors too: an SVD may return finite singular values with NaN vectors (MKL, for a 1 x n
        # matrix holding a NaN). A sum suffices: orthonormal columns cannot overflow it.
        vectors = [X for X in (trip.U, trip.V) if X is not None]
        if not bool(torch.isfinite(S).all()) or not all(bool(torch.isfinite(X.sum())) for X in vectors):
            if prep.dense and not bool(torch.isfinite(prep.A).all()):  # type: ignore[arg-type]
                raise ValueError("`A` must be finite, but it contains NaN or Inf (check_finite=False skipped the scan)")
            raise ValueError(
                f"solver {self.name!r} produced non-finite singular values or vectors: `A` (or the operator's "
                f"products) contains NaN/Inf or overflows in {prep.dtype}"
            )
        stats = {"solver": self.name, **trip.stats, "time": time.perf_counter() - t0}
        cert = trip.stats.get("_certificate")
        stats.pop("_certificate", None)
        reason = stats.pop("_uncertified_reason", None)
        if reason is not None:  # an exact method that measured its own loss (GramEigen's noise floor)
            stats["certified"] = False
            warn_from_caller(f"{self.name!r}: {reason}")
        if isinstance(cert, Certificate):
            # triplets beyond the rank only served the certificate (see truncpinv._certify)
            S, trip.U = S[: tol.rank], trip.U[:, : tol.rank]
            trip.V = None if trip.V is None else trip.V[:, : tol.rank]
            if not cert.certified:
                warn_uncertified(cert, self.name)
        return TruncatedPinv(
            trip.U,
            S,
            trip.V,
            tol=tol,
            shape=prep.shape,
            stats=stats,
            operator=prep.A,
            numpy_out=prep.numpy_out,
            grad_source=prep.grad_source,
        )

    @abc.abstractmethod
    def _compute(self, A: torch.Tensor | LinearOperator, tol: Tolerance) -> Triplets:
        """Return at least the ``tol.rank`` leading triplets of ``A`` whose
        singular values exceed ``tol.cutoff(sigma_max)`` (more is allowed),
        with ``S`` sorted descending."""


#: Binary exponent range of ``max|A|`` that every solver handles without scaling: products with ``A A^T``
#: (``~ max|A|^2``) stay within the dtype's range, and LOBPCG's float64 residual norms (``~ max|A|^4``) too.
_SAFE_EXPONENT = {torch.float32: 32, torch.float64: 128}


def _equilibrate(A: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(2^-e A, e)`` with ``max|2^-e A|`` in ``[1/2, 1)`` when ``max|A|`` lies outside ``2^{+-32}`` (float32;
    ``2^{+-128}`` float64), where the solvers' squared products would over- or underflow; else ``(A, 0)``.

    Scaling by a power of two is exact (subnormal entries gain bits, none lose
    any), and ``pinv(c A) = pinv(A) / c``, so the result is unchanged. Common
    data takes the first branch: one reduction, no copy.
    """
    if A.is_complex():
        amax = float(A.abs().max())
    else:
        lo, hi = torch.aminmax(A)
        amax = max(-float(lo), float(hi))
    if amax == 0.0 or not math.isfinite(amax):  # zero, or NaN/Inf (check_finite=False): nothing to scale
        return A, 0
    e = math.frexp(amax)[1]
    if abs(e) <= _SAFE_EXPONENT.get(A.dtype, 32):
        return A, 0
    return _ldexp(A, -e), e


def _ldexp(x: torch.Tensor, e: int) -> torch.Tensor:
    """``2^e x`` (a new tensor), exact unless the result over- or underflows.

    Two factors ``2^h``, ``2^{e-h}``, each representable in float32 (``2^e``
    alone may not be, e.g. for subnormal data); the intermediate lies between
    ``x`` and the result, so it never over- or underflows where the result does not.
    """
    h = e // 2
    return (x * math.ldexp(1.0, h)).mul_(math.ldexp(1.0, e - h))


def _ldexp_float(v: float, e: int) -> float:
    """``2^e v`` for a non-negative float, ``inf`` on overflow."""
    try:
        return math.ldexp(v, e)
    except OverflowError:
        return math.inf


def certify_triplets(
    A: torch.Tensor | LinearOperator,
    trip: Triplets,
    tol: Tolerance,
    *,
    rtol_res: float,
    seed: Any,
    **check: Any,
) -> Certificate:
    """Certify ``trip`` (see :mod:`truncpinv._certify`) and record the outcome in ``trip.stats``.

    ``check`` passes ``max_steps``/``runs`` (and a solver's own products ``AV``/``AtU``) on to
    :func:`~truncpinv.certify`.
    ``factorize`` warns once (:class:`~truncpinv.UncertifiedResultWarning`) when a
    directly called solver returns an uncertified result; ``Auto`` falls back instead.
    """
    if trip.V is None:
        raise TypeError("certify_triplets needs both singular vectors")
    cert = certify(
        A, trip.U, trip.S, trip.V, tol, rtol_res=rtol_res, seed=seed if isinstance(seed, int) else 0, **check
    )
    trip.stats = {
        **trip.stats,
        **cert.stats(),
        "matvecs": int(trip.stats.get("matvecs", 0)) + cert.matvecs,
        "_certificate": cert,
    }
    return cert


def check_seed(seed: Any) -> None:
    """Validate a ``seed`` field: ``None``, a non-negative (Python or NumPy) int, or a ``torch.Generator``."""
    if seed is None or isinstance(seed, torch.Generator):
        return
    if not is_int_scalar(seed) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, a torch.Generator or None, got {seed!r}")


def int_field(solver: Any, name: str, minimum: int, *, optional: bool = False) -> None:
    """Validate the integer field ``name`` of a (frozen dataclass) solver: a Python or NumPy integer
    ``>= minimum`` (or ``None`` if ``optional``), stored back as a Python ``int``."""
    value = getattr(solver, name)
    if optional and value is None:
        return
    if not is_int_scalar(value) or value < minimum:
        rule = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"`{name}` must be {rule}{' or None' if optional else ''}, got {value!r}")
    object.__setattr__(solver, name, int(value))


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator for ``device``: the given one, or a fresh one seeded with ``seed`` (0 if ``None``).

    Randomness never comes from the global RNG, so the same seed always gives
    the same factorisation.
    """
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def sort_desc(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sort triplets by descending singular value (clamping tiny negatives to 0)."""
    S = S.clamp_min(0)
    order = torch.argsort(S, descending=True)
    return U[:, order], S[order], (None if V is None else V[:, order])
