"""Tasks waiting for an offset to be reached: durable acks, replicated acks, long polls.

The decision (which waiters does a new position release?) is a heap ordered by
offset; the trio part only parks and reschedules tasks. Releasing is one pass
per position change, however many waiters there are, never a task per message.
"""

from __future__ import annotations

import heapq
import itertools

import outcome
import trio


class OffsetWaiters:
    """Park tasks until a monotonically advancing position reaches their offset.

    Once :meth:`fail` was called, every current and future waiter gets that error:
    a failed fsync must never be followed by an acknowledgement.
    """

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._seq = itertools.count()
        self._position = -1
        self._failure: BaseException | None = None

    def __len__(self) -> int:
        return sum(1 for entry in self._heap if entry[2] is not None)

    @property
    def position(self) -> int:
        return self._position

    @property
    def pending_min(self) -> int | None:
        """The lowest offset anyone still waits for."""
        while self._heap and self._heap[0][2] is None:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def wait(self, offset: int) -> None:
        """Return once the position is >= ``offset``; cancellation removes the waiter."""
        if self._failure is not None:
            raise self._failure
        if offset <= self._position:
            await trio.lowlevel.checkpoint()
            return
        entry = [offset, next(self._seq), trio.lowlevel.current_task()]
        heapq.heappush(self._heap, entry)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            entry[2] = None  # lazily dropped from the heap
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def advance(self, position: int) -> int:
        """Set the position and wake every waiter it satisfies; return how many woke."""
        if position <= self._position:
            return 0
        self._position = position
        heap, woken = self._heap, 0
        while heap and heap[0][0] <= position:
            task = heapq.heappop(heap)[2]
            if task is not None:
                trio.lowlevel.reschedule(task)
                woken += 1
        return woken

    def fail(self, error: BaseException) -> None:
        """Wake every waiter with ``error``; later waiters get it at once."""
        self._failure = error
        heap, self._heap = self._heap, []
        for entry in heap:
            if entry[2] is not None:
                trio.lowlevel.reschedule(entry[2], outcome.Error(error))
