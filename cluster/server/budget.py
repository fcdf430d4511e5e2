"""A node-wide budget of bytes that connections reserve before they buffer a large
request frame: many clients each sending most of a huge frame cannot together grow the
node's memory past it."""

from __future__ import annotations

import trio

__all__ = ["ByteBudget"]


class ByteBudget:
    """``capacity`` bytes handed out by :meth:`acquire` and given back by :meth:`release`.

    A request larger than the whole budget is granted when nothing else is held, so it
    waits but never forever. Waiters are woken on every release and re-check. Used by
    the connections' tasks of one trio run; a connection holds at most one grant at a
    time, for its one incomplete frame, so holders always progress and waiters never
    wait on each other.
    """

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self.capacity = capacity
        self.used = 0
        self.waits = 0
        """Acquires that had to wait (for status and tests)."""
        self._released = trio.Event()

    async def acquire(self, count: int) -> None:
        assert count > 0
        if self.used and self.used + count > self.capacity:
            self.waits += 1
            while self.used and self.used + count > self.capacity:
                await self._released.wait()
        self.used += count

    def release(self, count: int) -> None:
        self.used -= count
        assert self.used >= 0, self.used
        self._released.set()
        self._released = trio.Event()
