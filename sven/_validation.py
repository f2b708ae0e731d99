"""Argument checks for the public entry points.

Every message names the argument in backticks, states the rule and shows the
value that was received, e.g. ``"`lr` must be a non-negative float, got -1"``.
User input is never checked with ``assert``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import sys
import types
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_nonneg_float",
    "check_nonneg_int",
    "check_not_inference_mode",
    "check_option_names",
    "check_positive_float",
    "check_positive_int",
    "check_unit_interval",
    "closure_errors",
    "user_stacklevel",
    "warn_ignored_grads",
]


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    """A real number: Python ``int``/``float`` or a NumPy scalar (``np.float32``, ``np.int64``), not a bool."""
    return not _is_bool(value) and isinstance(value, numbers.Real)


def _is_int(value: Any) -> bool:
    """An integer: Python ``int`` or a NumPy integer scalar, not a bool."""
    return not _is_bool(value) and isinstance(value, numbers.Integral)


def check_nonneg_float(name: str, value: Any) -> float:
    """``value >= 0`` and finite."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative float, got {value!r}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """``value > 0`` and finite."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive float, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> float:
    """``0 <= value < 1`` (or ``<= 1`` with ``closed_right``)."""
    ok = _is_real(value) and math.isfinite(value) and 0 <= value and (value <= 1 if closed_right else value < 1)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"`{name}` must be a float in {interval}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """``0 < value <= 1``."""
    if not _is_real(value) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a float in (0, 1], got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """A positive ``int`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive integer{extra}, got {value!r}")
    return int(value)


def check_rank(name: str, value: Any) -> int | float | None:
    """A rank rule: ``None``, a positive ``int`` (a count) or a float in ``(0, 1]`` (a fraction of the rows).

    NumPy scalars are accepted: integers are counts, floats are fractions. A float
    above 1 is refused rather than truncated, so that ``rank=16.0`` is not read as
    16 rows by one user and as a fraction by another.
    """
    if value is None:
        return None
    if _is_int(value) and value >= 1:
        return int(value)
    if not _is_int(value) and _is_real(value) and math.isfinite(value) and 0 < value <= 1:
        return float(value)
    raise ValueError(
        f"`{name}` must be a positive integer (a number of singular values), a float in (0, 1] (a fraction "
        f"of the batch's rows) or None (no cap), got {value!r}"
    )


def rank_for(rule: int | float | None, rows: int) -> int | None:
    r"""The rank cap that a rule from :func:`check_rank` gives for ``rows`` rows.

    A fraction ``f`` gives :math:`\max(1, \lceil f \cdot rows \rceil)` (the product is rounded to 9 digits
    first, so that ``0.1 * 30`` gives 3, not 4).
    """
    if rule is None or isinstance(rule, int):
        return rule
    return max(1, math.ceil(round(rule * rows, 9)))


def check_nonneg_int(name: str, value: Any) -> int:
    """A non-negative ``int`` (NumPy integers accepted, bools not)."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` or ``np.bool_`` (not 0/1, not a string)."""
    if not _is_bool(value):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return bool(value)


def check_option_names(options: Iterable[str], known: Iterable[str], renamed: dict[str, str] | None = None) -> None:
    """Every name in ``options`` is one of ``known``.

    An unknown one gets ``unknown option `x```; a name from ``renamed`` (another
    API's name for an option) gets the right name, a near miss the closest
    known name (:func:`difflib.get_close_matches`), anything else the list.
    """
    known = sorted(known)
    for name in options:
        if name in known:
            continue
        if renamed and name in renamed:
            hint = f"; did you mean `{renamed[name]}`? (`{name}` is its name in the seed API)"
        else:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f"; the options are {', '.join(known)}"
        raise TypeError(f"unknown option `{name}`{hint}")


#: Substrings of the autograd errors that a closure which calls ``backward()`` itself causes.
_BACKWARD_IN_CLOSURE = ("backward through the graph a second time", "directly access saved tensors after they have")
#: The autograd error of ``backward()`` on the per-sample losses (an L-BFGS-style or Lightning closure).
_BACKWARD_OF_VECTOR = "grad can be implicitly created only for scalar outputs"
_NO_BACKWARD = (
    "Sven differentiates the closure's output itself: the closure must not call backward() (nor zero_grad()); "
    "return the per-sample losses, e.g. `opt.step(lambda: ((model(x) - y) ** 2).sum(dim=-1))`, shape (B,), not "
    "reduced. Under PyTorch Lightning this is automatic optimisation, which calls backward() in its closure: set "
    "`self.automatic_optimization = False` and call `self.optimizers().step(closure)` in `training_step`"
)


class closure_errors:  # (a lower-case name: used as a function, ``with closure_errors(params):``)
    """Turn the errors of a closure that calls ``backward()`` (L-BFGS style, Lightning's automatic mode) into advice.

    Three signs, each checked only once an error has been raised: autograd's
    error for a second backward through a freed graph; its error for
    ``backward()`` on the non-scalar per-sample losses; and any ``ValueError``,
    ``TypeError`` or ``RuntimeError`` (such as Sven's own "returned a scalar
    loss") after the closure wrote the ``.grad`` of one of ``params`` (it is
    ``None`` before, or its version counter moved). The advice is raised as the
    same built-in exception type, chained to the original.
    """

    __slots__ = ("_before", "_params")

    def __init__(self, params: Sequence[Any] = ()) -> None:
        self._params = params
        self._before = [(p.grad, None if p.grad is None else p.grad._version) for p in params]

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind_: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        if isinstance(err, (ValueError, TypeError, RuntimeError)):
            _advise(err, self._params, self._before)


def _advise(err: ValueError | TypeError | RuntimeError, params: Sequence[Any], before: list[Any]) -> None:
    """Raise the advice of :class:`closure_errors` for ``err``, chained to it, where one of its signs holds."""
    text = str(err)
    kind = next(k for k in (ValueError, TypeError, RuntimeError) if isinstance(err, k))  # one-argument init
    if _BACKWARD_OF_VECTOR in text:
        raise kind(
            f"the closure differentiated a non-scalar tensor without `grad_outputs` ({_BACKWARD_OF_VECTOR}). "
            f"If it calls backward() on the per-sample losses, it must not: {_NO_BACKWARD}"
        ) from err
    wrote = any(
        p.grad is not None and (g is None or p.grad is not g or p.grad._version != v)
        for p, (g, v) in zip(params, before)
    )
    if wrote or (isinstance(err, RuntimeError) and any(s in text for s in _BACKWARD_IN_CLOSURE)):
        called = "the closure called backward() (it wrote the parameters' `.grad`): " if wrote else ""
        raise kind(f"{called}{_NO_BACKWARD}") from err


def warn_ignored_grads(params: Sequence[Any]) -> None:
    """Warn (``RuntimeWarning``) when an optimised parameter holds a ``.grad``, which ``Sven.step`` ignores.

    Sven differentiates the closure's per-sample losses itself and never reads
    or writes ``.grad``: a ``loss.backward()`` before ``step`` only costs a
    backward pass, and ``clip_grad_norm_`` between the two changes nothing.
    Checking costs one ``is None`` per parameter (no pass over the values, no
    device synchronisation). The warning is attributed to the caller of
    ``step``, so Python's default filter does not repeat it at every step.
    """
    for i, p in enumerate(params):
        if p.grad is not None:
            warnings.warn(
                f"Sven.step ignores `.grad`, but parameter #{i} of shape {tuple(p.shape)} has one (from a "
                f"loss.backward() before step?): Sven differentiates the closure's per-sample losses itself and "
                f"never reads or writes `.grad`, so a backward() before step is wasted and gradient clipping "
                f"(clip_grad_norm_) does not change the step. Drop backward(); to bound the step use "
                f"`trust_radius=r` (||delta theta|| <= r), and log `opt.last_step.step_norm` instead of a "
                f"gradient norm. If another optimizer left these gradients, call zero_grad() before Sven's step",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            return


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")
    return value


def check_not_inference_mode() -> None:
    """Raise if called inside ``torch.inference_mode()``: autograd is off there even under ``torch.enable_grad()``,
    so a closure's rows have no Jacobian (``torch.no_grad()`` around a step is fine: the step turns grad on)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Sven.step was called inside torch.inference_mode(), where autograd is off even under "
            "torch.enable_grad(), so the closure's rows have no Jacobian; call step outside it "
            "(torch.no_grad() around the step is fine)"
        )


#: Frames in these folders are Sven's or torch's own (torch.optim's step wrappers, its context managers).
_INTERNAL = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside ``sven`` and ``torch``.

    Called by the function that warns (``warnings.warn(..., stacklevel=user_stacklevel())``): a warning raised
    deep inside ``opt.step`` then names the user's ``opt.step(...)`` line, however many of Sven's and torch's
    frames (policies, wrappers, ``torch.optim``'s hooks) lie in between.
    """
    frame: types.FrameType | None = sys._getframe(2)  # the caller of the function that warns: stacklevel 2
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
