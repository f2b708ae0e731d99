"""Compatibility module: the matrix-free operators now live in :mod:`sven.linearize.matfree` and ``.functional``."""

from .linearize.functional import FunctionalJacobian
from .linearize.matfree import BATCHING_MODES, ClosureJacobian, gram_from_operator

__all__ = ["BATCHING_MODES", "ClosureJacobian", "FunctionalJacobian", "gram_from_operator"]
