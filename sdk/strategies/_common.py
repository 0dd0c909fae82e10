"""Shared validation and ranking helpers for the sampling strategies."""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Integral

import numpy as np

# Chunks are sized so that one chunk of the largest input holds about this many
# elements (16 MiB of float32): big enough to amortise numpy call overhead, small
# enough that per-chunk temporaries never approach the size of a full pool.
CHUNK_ELEMENTS = 1 << 22


def as_array(x: object, name: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    """Return ``x`` as an ndarray (no copy for arrays/memmaps) after an ndim check."""
    arr = np.asarray(x)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name} must be {want}, got shape {arr.shape}")
    return arr


def check_k(k: object, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the pool size N={n}")
    return k


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores; ties keep index order, NaNs rank last."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order[:k].astype(np.int64, copy=False)


def work_dtype(dtype: np.dtype) -> np.dtype:
    """float32 stays float32, float64 stays float64, anything else is promoted."""
    return np.result_type(dtype, np.float32)


def chunks(n: int, item_elements: int) -> Iterator[slice]:
    """Slices over ``range(n)`` of about CHUNK_ELEMENTS elements each (at least one item)."""
    step = max(1, CHUNK_ELEMENTS // max(1, item_elements))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array with {ndim} dimensions")
    return axis % ndim
