"""The ``toy1d`` task, re-exported for the tests, the example and the step benchmark.

The recipe now lives in :mod:`sven.bench.tasks.toy1d` (and the shared
helpers in :mod:`sven.bench.tasks.base`); every name this module used to
define is still importable from here.
"""

from __future__ import annotations

from .bench.tasks.base import batches, mlp, per_sample_mse
from .bench.tasks.toy1d import DATA_SEED, LOADER_SEED, Toy1D, make_toy1d, target_fn

__all__ = ["DATA_SEED", "LOADER_SEED", "Toy1D", "batches", "make_toy1d", "mlp", "per_sample_mse", "target_fn"]
