"""Temporary: being written (delegates to GramEigen until the real solver lands)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .gram_eigen import GramEigen

__all__ = ["Lanczos"]


@dataclass(frozen=True)
class Lanczos(GramEigen):
    name: ClassVar[str] = "lanczos"
