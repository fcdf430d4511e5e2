"""Deadlines of a connection's parked long polls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["Wakeups"]


class Wakeups:
    """Deadlines of parked long polls, so that EOF or shutdown can end them early.

    A woken poll answers with what it has (usually nothing), like a timed-out one.
    Once :meth:`wake_all` ran, every later deadline is born expired. One per
    connection, used from that connection's tasks on the event loop.
    """

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.woken = False

    @contextmanager
    def deadline(self, when: float) -> Iterator[None]:
        scope = trio.CancelScope(deadline=when)
        if self.woken:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)

    def wake_all(self) -> None:
        self.woken = True
        for scope in self._scopes:
            scope.cancel()
