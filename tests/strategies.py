"""Hypothesis strategies for fuzzing truncpinv (and the code built on it) with bad and extreme input.

Everything here is a building block: dtypes, shapes, matrices with a prescribed
spectrum, non-finite entries at random positions, invalid hyperparameters,
wrongly typed arrays and extreme scale factors. The fuzz tests combine them;
the expected outcome of each case (a correct result, or which documented error)
is decided by the tests, not here, except where a strategy generates *invalid*
values: those come with the exception type and message pattern the public
entry points document (see ``truncpinv/_validation.py`` and
``truncpinv/_tolerance.py``).
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

__all__ = [
    "FLOAT_DTYPES",
    "NP_FLOAT",
    "BadValue",
    "bad_dtype_arrays",
    "float_dtypes",
    "gapped_spectra",
    "invalid_ranks",
    "invalid_tolerances",
    "matrix_with_spectrum",
    "nonfinite_entries",
    "nonfinite_values",
    "powers_of_two_and_ten",
    "seeds",
    "shapes",
    "time_limit",
]

#: The dtypes the solvers accept.
FLOAT_DTYPES = (torch.float32, torch.float64)
#: The NumPy dtype of each accepted torch dtype.
NP_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    """``torch.float32`` or ``torch.float64``."""
    return st.sampled_from(FLOAT_DTYPES)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``numpy.random.default_rng`` and ``torch.Generator.manual_seed``."""
    return st.integers(0, 2**32 - 1)


def shapes(min_side: int = 1, max_side: int = 24) -> st.SearchStrategy[tuple[int, int]]:
    """Matrix shapes ``(m, n)`` with both sides in ``[min_side, max_side]`` (tall, wide and square)."""
    side = st.integers(min_side, max_side)
    return st.tuples(side, side)


def nonfinite_values() -> st.SearchStrategy[float]:
    """``nan``, ``inf`` or ``-inf``."""
    return st.sampled_from([math.nan, math.inf, -math.inf])


@st.composite
def nonfinite_entries(draw: st.DrawFn, shape: tuple[int, ...], *, max_count: int = 4) -> dict[tuple[int, ...], float]:
    """Between 1 and ``max_count`` distinct positions of an array of ``shape``, each with a non-finite value.

    Args:
        draw: hypothesis' draw function (supplied by ``@st.composite``).
        shape: shape of the array the positions index (every side at least 1).
        max_count: largest number of positions.

    Returns:
        A mapping from index tuple to ``nan``/``inf``/``-inf``.
    """
    index = st.tuples(*(st.integers(0, s - 1) for s in shape))
    total = math.prod(shape)
    positions = draw(st.lists(index, min_size=1, max_size=min(max_count, total), unique=True))
    return {p: draw(nonfinite_values()) for p in positions}


@st.composite
def gapped_spectra(
    draw: st.DrawFn, q: int, *, kappa_max: float, cond_max: float, gap: float = 10.0, max_kept: int | None = None
) -> tuple[np.ndarray, int, float]:
    """Singular values with a clean gap after the ``r`` kept ones, and a relative cut-off inside the gap.

    ``s[0] = 1``; the kept values ``s[:r]`` lie in ``[1/kappa_r, 1]`` with
    ``kappa_r <= kappa_max`` (log-uniform, both ends attained when ``r >= 2``).
    The dropped values ``s[r:]`` are exactly zero or lie in
    ``[1/cond_max, 1/(gap^2 kappa_r)]``. The returned ``rtol = 1/(gap kappa_r)``
    sits a factor ``gap`` away from both sides, so a solver whose error is well
    below that keeps exactly ``r`` values.

    Args:
        draw: hypothesis' draw function (supplied by ``@st.composite``).
        q: number of singular values (``min(m, n)``).
        kappa_max: largest condition number of the kept part.
        cond_max: largest ratio ``s[0] / s[-1]`` over the non-zero values.
        gap: factor between the cut-off and the nearest kept or dropped value.
        max_kept: largest ``r`` (default ``q``).

    Returns:
        ``(s, r, rtol)``: descending ``s`` of length ``q``, the number of kept values, the cut-off.
    """
    r = draw(st.integers(1, min(q, max_kept or q)), label="kept")
    log_kappa = draw(st.floats(0.0, math.log10(kappa_max)), label="log10 kappa_r") if r >= 2 else 0.0
    kappa = 10.0**log_kappa
    inner = draw(st.lists(st.floats(0.0, 1.0), min_size=max(r - 2, 0), max_size=max(r - 2, 0)))
    kept = [1.0] + [kappa**-u for u in inner] + ([1.0 / kappa] if r >= 2 else [])
    hi = 1.0 / (gap * gap * kappa)
    lo = 1.0 / cond_max
    dropped: list[float] = []
    for _ in range(q - r):
        if lo < hi and draw(st.booleans()):
            dropped.append(hi * (lo / hi) ** draw(st.floats(0.0, 1.0)))
        else:
            dropped.append(0.0)
    s = np.sort(np.array(kept + dropped, dtype=np.float64))[::-1].copy()
    return s, r, 1.0 / (gap * kappa)


def matrix_with_spectrum(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    """The float64 matrix ``U diag(s) V^T`` with Haar-random orthonormal ``U`` (``m x q``) and ``V`` (``n x q``).

    Args:
        m: rows.
        n: columns.
        s: ``q = min(m, n)`` singular values.
        seed: seed of the random bases.

    Returns:
        An ``m x n`` float64 array.
    """
    rng = np.random.default_rng(seed)
    q = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, q)))
    V, _ = np.linalg.qr(rng.standard_normal((n, q)))
    return np.asarray((U * s[:q]) @ V.T)


@dataclass(frozen=True)
class BadValue:
    """An invalid argument value and the error the public API documents for it.

    Attributes:
        value: the value to pass.
        error: the exception type.
        match: a regular expression for ``pytest.raises(..., match=...)``.
    """

    value: Any
    error: type[Exception]
    match: str

    def __repr__(self) -> str:  # shows up in hypothesis' falsifying examples
        return f"BadValue({self.value!r}, {self.error.__name__})"


def invalid_ranks() -> st.SearchStrategy[BadValue]:
    """``rank`` values the API must refuse: below 1 (``ValueError``), non-integers and bools (``TypeError``)."""
    too_small = st.integers(-(2**63), 0).map(
        lambda r: BadValue(r, ValueError, rf"`rank` must be a positive integer, got {r}$")
    )
    wrong_type = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(max_size=3),
        st.just([3]),
        st.just(np.bool_(True)),
        st.just(np.float64(3.0)),
        st.just(np.float32(2.5)),
        st.just(torch.tensor(3)),
    ).map(lambda r: BadValue(r, TypeError, r"`rank` must be a positive integer or None, got "))
    return st.one_of(too_small, wrong_type)


def invalid_tolerances(name: str) -> st.SearchStrategy[BadValue]:
    """``rtol``/``atol`` values the API must refuse.

    Negative, NaN or infinite numbers raise ``ValueError``; bools, strings,
    complex numbers and containers raise ``TypeError``.

    Args:
        name: ``"rtol"`` or ``"atol"`` (named in the message).
    """
    bad_number = st.one_of(
        st.floats(max_value=-1e-300, allow_infinity=True),
        st.integers(max_value=-1),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    ).map(lambda v: BadValue(v, ValueError, rf"`{name}` must be a non-negative finite float, got "))
    wrong_type = st.one_of(
        st.booleans(),
        st.just(np.bool_(False)),
        st.text(max_size=3),
        st.complex_numbers(allow_nan=False),
        st.just([1e-3]),
    ).map(lambda v: BadValue(v, TypeError, rf"`{name}` must be a non-negative float or None, got "))
    return st.one_of(bad_number, wrong_type)


_TORCH_BAD_DTYPES = [
    (torch.int8, r"must have a floating dtype \(float32 or float64\), got torch.int8"),
    (torch.uint8, r"must have a floating dtype \(float32 or float64\), got torch.uint8"),
    (torch.int16, r"must have a floating dtype \(float32 or float64\), got torch.int16"),
    (torch.int32, r"must have a floating dtype \(float32 or float64\), got torch.int32"),
    (torch.int64, r"must have a floating dtype \(float32 or float64\), got torch.int64"),
    (torch.bool, r"must have a floating dtype \(float32 or float64\), got torch.bool"),
    (torch.float16, r"must be float32 or float64, got torch.float16; half precision"),
    (torch.bfloat16, r"must be float32 or float64, got torch.bfloat16; half precision"),
]
_NUMPY_BAD_DTYPES = [
    (np.int8, r"must have a floating dtype \(float32 or float64\), got numpy int8"),
    (np.uint16, r"must have a floating dtype \(float32 or float64\), got numpy uint16"),
    (np.int64, r"must have a floating dtype \(float32 or float64\), got numpy int64"),
    (np.bool_, r"must have a floating dtype \(float32 or float64\), got numpy bool"),
    (np.float16, r"must have a floating dtype \(float32 or float64\), got numpy float16"),
    (np.longdouble, r"must have a floating dtype \(float32 or float64\), got numpy (float128|longdouble|float96)"),
    *(
        [(np.clongdouble, r"must be real \(float32 or float64\) or complex64/complex128; complex dtype complex")]
        if np.dtype(np.clongdouble).itemsize > 16
        else []
    ),
    (np.object_, r"must have a floating dtype \(float32 or float64\), got numpy object"),
]


@st.composite
def bad_dtype_arrays(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[Any, str]:
    """An array of ``shape`` with a dtype the solvers refuse, and the ``TypeError`` message pattern.

    Torch tensors (integer, bool, half, bfloat16) and NumPy arrays
    (integer, bool, half, long double, complex long double, object). Complex64/128 are
    accepted by the dense solvers and refused by the others: ``tests/test_complex.py``. The pattern omits the
    argument name, so it serves for ``A`` and for ``b``.

    Args:
        draw: hypothesis' draw function (supplied by ``@st.composite``).
        shape: shape of the array.
    """
    if draw(st.booleans(), label="numpy"):
        np_dtype, match = draw(st.sampled_from(_NUMPY_BAD_DTYPES))
        return np.ones(shape, dtype=np_dtype), match
    dtype, match = draw(st.sampled_from(_TORCH_BAD_DTYPES))
    return torch.ones(shape, dtype=dtype), match


def powers_of_two_and_ten(max_exp2: int, max_exp10: int) -> st.SearchStrategy[float]:
    """Scale factors ``2^k`` (``|k| <= max_exp2``, exact scaling) and ``10^k`` (``|k| <= max_exp10``, rounded).

    Args:
        max_exp2: largest binary exponent.
        max_exp10: largest decimal exponent.
    """
    return st.one_of(
        st.integers(-max_exp2, max_exp2).map(lambda k: math.ldexp(1.0, k)),
        st.integers(-max_exp10, max_exp10).map(lambda k: 10.0**k),
    )


class Hang(AssertionError):
    """Raised by :func:`time_limit` when a block runs too long."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with :class:`Hang` if the block runs longer than ``seconds`` (wall clock).

    Uses ``SIGALRM``, so it interrupts Python-level loops (an iterative solver
    that never stops), not a single long native call; it is a no-op where
    ``SIGALRM`` is unavailable.

    Args:
        seconds: the wall-clock budget of the block.
    """
    if not hasattr(signal, "setitimer"):  # pragma: no cover - Windows
        yield
        return

    def _alarm(signum: int, frame: object) -> None:
        raise Hang(f"the call took more than {seconds} s: a hang or a runaway iteration")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
