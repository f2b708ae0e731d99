"""The seed-compatible model wrapper."""

from .sven_wrapper import SvenWrapper

__all__ = ["SvenWrapper"]
