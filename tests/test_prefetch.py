"""`sdk.prefetch`: the same items in the same order, errors where they happened, early exits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sdk.prefetch import prefetch


@pytest.mark.parametrize("ahead", [1, 3, 50])
def test_items_come_in_order_and_random_draws_are_unchanged(ahead: int) -> None:
    def draws(rng: np.random.Generator):
        for _ in range(20):
            yield rng.integers(0, 1000, 4)

    plain = list(draws(np.random.default_rng(7)))
    ahead_of_time = list(prefetch(draws(np.random.default_rng(7)), ahead=ahead))
    assert len(ahead_of_time) == 20
    assert all((a == b).all() for a, b in zip(plain, ahead_of_time, strict=True))


def test_the_next_item_is_produced_while_the_caller_works() -> None:
    produced: list[int] = []
    second_started = threading.Event()

    def items():
        for i in range(3):
            if i == 1:
                second_started.set()
            produced.append(i)
            yield i

    stream = prefetch(items())
    assert next(stream) == 0
    assert second_started.wait(5), "item 1 was not produced while item 0 was in use"
    assert list(stream) == [1, 2]


def test_an_error_is_raised_where_its_item_would_come() -> None:
    def items():
        yield 1
        raise ValueError("bad slice 2")

    stream = prefetch(items())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad slice 2"):
        next(stream)


def test_closing_early_stops_producing() -> None:
    produced: list[int] = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    stream = prefetch(items(), ahead=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert len(produced) <= 5


def test_ahead_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(prefetch([1], ahead=0))


def test_an_empty_source() -> None:
    assert list(prefetch([])) == []
