"""Iterate ahead in a thread, so producing the next item overlaps the caller's work on this one."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], ahead: int = 1) -> Iterator[T]:
    """`items` in their order, with up to `ahead` more produced by one background thread.

    Only that thread advances `items`, one item after the other, so a producer drawing from a
    random generator yields exactly what it would yield unthreaded. A producer's exception is
    raised where its item would have come; closing the iterator early lets the items in flight
    finish and drops them.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}")
    source = iter(items)

    def produce() -> object:
        return next(source, _END)

    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as worker:
        pending = deque(worker.submit(produce) for _ in range(ahead))
        while True:
            item = pending.popleft().result()
            if item is _END:
                return
            pending.append(worker.submit(produce))
            yield item  # type: ignore[misc]
