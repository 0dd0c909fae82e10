"""Map any intensity range (uint8/16, int, float) to 8-bit display values.

The range comes from robust percentiles of a few sampled slices, so a handful of hot
pixels cannot wash out the contrast and estimating never reads the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IntensityRange:
    """Display window plus how it was measured; unpacks as ``lo, hi``."""

    lo: float
    hi: float
    low_percentile: float
    high_percentile: float
    sample_slices: tuple[int, ...]

    def __iter__(self) -> Iterator[float]:
        yield self.lo
        yield self.hi

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-friendly metadata for task data."""
        return {
            "intensity_lo": self.lo,
            "intensity_hi": self.hi,
            "intensity_low_percentile": self.low_percentile,
            "intensity_high_percentile": self.high_percentile,
            "intensity_sample_slices": list(self.sample_slices),
        }


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise ValueError(f"cannot map intensities of dtype {dtype} to 8-bit")


def sample_slice_indices(n: int, count: int, seed: int = 0) -> list[int]:
    """``count`` distinct z indices out of ``n`` (all of them if ``count >= n``), sorted."""
    if count < 1:
        raise ValueError(f"sample_slices must be >= 1, got {count}")
    if count >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=count, replace=False))


def estimate_intensity_range(
    volume: Any,
    low: float = 0.5,
    high: float = 99.5,
    sample_slices: int = 16,
    seed: int = 0,
    max_pixels_per_slice: int = 1 << 18,
) -> IntensityRange:
    """Percentile window ``(lo, hi)`` from ``sample_slices`` random z slices.

    Each sampled slice is read on a regular sub-grid of at most ``max_pixels_per_slice``
    pixels to bound memory. NaN/inf are ignored. ``volume``: a Volume or 3-D array.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    shape = tuple(volume.shape)
    if len(shape) != 3:
        raise ValueError(f"expected a 3-D (Z, Y, X) volume, got shape {shape}")
    _check_dtype(np.dtype(volume.dtype))
    zs = sample_slice_indices(shape[0], sample_slices, seed)
    step = max(1, math.ceil(math.sqrt(shape[1] * shape[2] / max_pixels_per_slice)))
    values = np.concatenate([np.asarray(volume[z, ::step, ::step]).ravel() for z in zs])
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(f"sampled slices {zs} hold no finite values")
    if values.dtype == bool:
        values = values.view(np.uint8)
    lo, hi = np.percentile(values, [low, high])
    return IntensityRange(float(lo), float(hi), float(low), float(high), tuple(zs))


def to_uint8(array: Any, lo: float, hi: float) -> np.ndarray:
    """Linearly map ``[lo, hi]`` to ``[0, 255]``, clipping outside and rounding.

    NaN maps to 0. If ``hi <= lo`` (a constant image) the result is a step: 255 above
    ``lo``, else 0.
    """
    a = np.asarray(array)
    _check_dtype(a.dtype)
    if hi <= lo:
        return np.where(a > lo, 255, 0).astype(np.uint8)
    # float32 is exact for 8/16-bit data; wider integers and float64 keep float64.
    work = np.float32 if a.dtype.itemsize <= 2 or a.dtype == np.float32 else np.float64
    scaled = (a.astype(work) - work(lo)) * work(255.0 / (hi - lo))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(scaled, 0, 255, out=scaled), out=scaled).astype(np.uint8)
