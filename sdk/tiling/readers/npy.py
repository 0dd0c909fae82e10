"""NumPy ``.npy`` files, memory-mapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..volume import ArrayVolume
from .containers import require_3d


def open_npy(path: Path) -> ArrayVolume:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays cannot be mapped (nor trusted)
        raise ValueError(f"cannot memory-map {path}: {e}") from e
    require_3d(array.shape, str(path))
    # The map closes when the last view of it is garbage-collected.
    return ArrayVolume(array, str(path), metadata={"format": "npy", "path": str(path)})
