"""Random sampling: the baseline every other strategy must beat."""

from __future__ import annotations

import numpy as np

from ._common import check_k


def random_select(n: int, k: int, *, seed: int | None = None) -> np.ndarray:
    """``k`` distinct indices from ``range(n)`` in random order; reproducible for a seed."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"pool size n must be a non-negative integer, got {n!r}")
    k = check_k(k, int(n))
    rng = np.random.default_rng(seed)
    return rng.choice(int(n), size=k, replace=False).astype(np.int64, copy=False)
