"""Shared pytest configuration: hypothesis profiles and device parametrisation.

Profiles (select with ``HYPOTHESIS_PROFILE=...``):

* ``ci`` (default): few examples per test, so the suite stays within minutes on 2 cores;
* ``thorough``: 1,000 examples per property test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread (restored afterwards).

    Small models and matrices gain nothing from threads, and on a busy 2-core
    machine competing OpenMP threads can slow every step by 100x.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
