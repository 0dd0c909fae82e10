"""The one LRU every cache uses: bounded in entries or bytes, least recently used out."""

from __future__ import annotations

import numpy as np

from sdk.lru import LRU


def test_bounded_in_entries_and_reading_refreshes() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the least recent
    lru.put("c", 3)
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    assert len(lru) == 2


def test_bounded_in_bytes_and_oversized_values_not_kept() -> None:
    lru: LRU[int, np.ndarray] = LRU(1000, size=lambda a: a.nbytes)
    for key in range(3):
        lru.put(key, np.zeros(400, np.uint8))
    assert [k for k, _ in lru.items()] == [1, 2]
    lru.put(9, np.zeros(1001, np.uint8))  # larger than the whole limit
    assert lru.get(9) is None and len(lru) == 2
    lru.put(2, np.zeros(900, np.uint8))  # replacing an entry counts its new size only
    assert [k for k, _ in lru.items()] == [2]


def test_zero_limit_keeps_nothing() -> None:
    lru: LRU[int, int] = LRU(0)
    lru.put(1, 1)
    assert lru.get(1) is None and len(lru) == 0
    lru.clear()
