"""Temporary: being written (delegates to GramEigen until the real solver lands)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .gram_eigen import GramEigen

__all__ = ["LOBPCG"]


@dataclass(frozen=True)
class LOBPCG(GramEigen):
    name: ClassVar[str] = "lobpcg"
