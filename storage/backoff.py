"""Exponential backoff: one schedule for every retry loop (client retries, a slave's
reconnects, the HA loop's etcd retries).

Pure and clock-free: the caller sleeps, so the schedule is testable without time.
"""

from __future__ import annotations

import logging

import attrs

__all__ = ["LOUD_EVERY", "Backoff", "retry_log_level"]

LOUD_EVERY = 10
"""A retry loop logs its failure at WARNING once every this many attempts."""


def retry_log_level(attempt: int) -> int:
    """WARNING for the first failed attempt and every :data:`LOUD_EVERY`-th after it,
    INFO between: an operator sees that something is wrong (and that it still is),
    without a warning every fraction of a second while etcd is down."""
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    return logging.WARNING if attempt % LOUD_EVERY == 1 else logging.INFO


@attrs.define
class Backoff:
    """Delays that start at ``initial_s`` and double (``multiplier``) up to ``max_s``.

    Invariant: ``0 < initial_s <= max_s`` and every delay handed out is in
    ``[initial_s, max_s]``. One owner per instance (not shared between tasks).
    """

    initial_s: float
    max_s: float
    multiplier: float = 2.0
    _next_s: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(
                f"backoff needs 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be at least 1, got {self.multiplier}")
        self._next_s = self.initial_s

    def next_delay_s(self) -> float:
        """The pause before the next attempt; each call lengthens the following one."""
        delay = self._next_s
        self._next_s = min(self._next_s * self.multiplier, self.max_s)
        return delay

    def peek_s(self) -> float:
        """The pause :meth:`next_delay_s` would return, without advancing."""
        return self._next_s

    def reset(self) -> None:
        """After a success: the next failure starts again from ``initial_s``."""
        self._next_s = self.initial_s
