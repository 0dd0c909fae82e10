"""A least-recently-used mapping bounded in entries or in bytes, shared by every cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_: object) -> int:
    return 1


class LRU(Generic[K, V]):
    """At most `limit` units of `size(value)` (default: one per entry); thread-safe.

    Reading an entry makes it the most recent; storing past the limit drops the least recent
    ones; a value larger than the whole limit is not kept at all.
    """

    def __init__(self, limit: int, size: Callable[[V], int] = _one) -> None:
        self.limit = limit
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: K, value: V) -> None:
        size = self._size(value)
        with self._lock:
            if key in self._items:
                self._used -= self._size(self._items.pop(key))
            if size > self.limit:
                return
            self._items[key] = value
            self._used += size
            while self._used > self.limit:
                _, old = self._items.popitem(last=False)
                self._used -= self._size(old)

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return list(self._items.items())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0

    def __len__(self) -> int:
        return len(self._items)
