"""The shared retry schedule and how loudly a retry loop logs."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.backoff import LOUD_EVERY, Backoff, retry_log_level


@given(
    initial_s=st.floats(0.001, 10),
    factor=st.floats(1, 100),
    calls=st.integers(1, 50),
)
def test_delays_double_within_their_bounds(initial_s: float, factor: float, calls: int) -> None:
    backoff = Backoff(initial_s, initial_s * factor)
    delays = [backoff.next_delay_s() for _ in range(calls)]
    assert delays[0] == initial_s
    assert all(initial_s <= d <= initial_s * factor for d in delays)
    assert delays == sorted(delays)
    backoff.reset()
    assert backoff.next_delay_s() == initial_s


def test_a_retry_loop_warns_on_the_first_failure_then_once_every_few() -> None:
    levels = [retry_log_level(attempt) for attempt in range(1, 3 * LOUD_EVERY + 1)]
    assert levels[0] == logging.WARNING
    assert levels.count(logging.WARNING) == 3
    assert set(levels) == {logging.WARNING, logging.INFO}
    with pytest.raises(ValueError, match="count from 1"):
        retry_log_level(0)
