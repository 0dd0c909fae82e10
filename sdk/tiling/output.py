"""Which writer an output path asks for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Format = Literal["zarr", "tiff"]


def output_format(path: str | os.PathLike[str]) -> Format:
    """`.zarr` (chunked) or `.tif`/`.tiff`; anything else is a clear ValueError."""
    suffix = Path(path).suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".tif", ".tiff"):
        return "tiff"
    raise ValueError(
        f"unknown output format {suffix or '(no extension)'!r} for {path}: use .zarr, .tif or .tiff"
    )
