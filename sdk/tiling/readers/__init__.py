"""Lazy readers for the volume formats microscopists use, behind ``open_volume``."""

from .dispatch import SUPPORTED, open_volume, split_spec

__all__ = ["SUPPORTED", "open_volume", "split_spec"]
