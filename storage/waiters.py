"""Parked tasks: waiting for an offset to be reached (durable acks, replicated acks), or
for a key to be woken (long polls, each on its own consume queue).

The decision (which waiters does a new position release?) is a heap ordered by
offset; the trio part only parks and reschedules tasks. Releasing is one pass
per position change, however many waiters there are, never a task per message.

Deadlines are kept in a second heap and expired by one timer task
(:meth:`OffsetWaiters.expire_deadlines`) instead of a cancel scope per waiter: a
``trio.move_on_at`` costs about 7 us to enter and leave, a third of what a
durable acknowledgement costs in CPU.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Final, Generic, TypeVar

import outcome
import trio

_OFFSET, _SEQ, _TASK, _DEADLINE = range(4)
_Key = TypeVar("_Key", bound=Hashable)


class OffsetWaiters:
    """Park tasks until a monotonically advancing position reaches their offset.

    Once :meth:`fail` was called, every current and future waiter gets that error:
    a failed fsync must never be followed by an acknowledgement.
    """

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._deadlines: list[tuple[float, int, list]] = []
        self._seq = itertools.count()
        self._position = -1
        self._failure: BaseException | None = None
        self._timer_target = math.inf
        self._timer_wake = trio.Event()

    def __len__(self) -> int:
        return sum(1 for entry in self._heap if entry[_TASK] is not None)

    @property
    def position(self) -> int:
        return self._position

    @property
    def pending_min(self) -> int | None:
        """The lowest offset anyone still waits for."""
        heap = self._heap
        while heap and heap[0][_TASK] is None:
            heapq.heappop(heap)
        return heap[0][_OFFSET] if heap else None

    async def wait(self, offset: int, deadline: float = math.inf) -> bool:
        """True once the position is >= ``offset``; False if ``deadline`` passed first.

        Deadlines need :meth:`expire_deadlines` running. Cancellation removes the waiter.
        """
        if self._failure is not None:
            raise self._failure
        if offset <= self._position:
            await trio.lowlevel.checkpoint()
            return True
        entry = self._register(trio.lowlevel.current_task(), offset, deadline)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            entry[_TASK] = None  # lazily dropped from the heaps
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def wake_task(
        self, task: trio.lowlevel.Task, offset: int, deadline: float = math.inf
    ) -> WakeHandle | None:
        """Have ``task``, which parks itself elsewhere (``wait_task_rescheduled``), woken as
        :meth:`wait` would wake a waiter for ``offset``: ``Value(True)`` once the position
        reaches it, ``Value(False)`` at ``deadline`` or past a cut, the failure as an
        error. None (nothing registered) when that would be at once: the caller wakes it
        itself. Whoever else may wake the task first must :meth:`WakeHandle.cancel`
        first, and wake it only if that returns True (a task is woken once)."""
        if self._failure is not None or offset <= self._position:
            return None
        return WakeHandle(self._register(task, offset, deadline))

    def _register(self, task: trio.lowlevel.Task, offset: int, deadline: float) -> list:
        """Enter ``task`` as a waiter for ``offset`` (and its deadline, if any); the
        entry is what the wakers clear to drop it lazily."""
        seq = next(self._seq)
        entry = [offset, seq, task, deadline]
        heapq.heappush(self._heap, entry)
        if deadline != math.inf:
            deadlines = self._deadlines
            while deadlines and deadlines[0][2][_TASK] is None:  # prune finished waiters
                heapq.heappop(deadlines)
            heapq.heappush(deadlines, (deadline, seq, entry))
            if deadline < self._timer_target:
                self._timer_wake.set()
        return entry

    def rewind(self, position: int) -> int:
        """The log was cut at ``position``: move the position back, and wake every waiter
        for an offset past the cut with False. Those bytes are gone; if they waited on,
        *other* bytes written there later would acknowledge a record that no longer
        exists. Returns how many were woken."""
        self._position = min(self._position, position)
        kept, woken = [], 0
        for entry in self._heap:
            task = entry[_TASK]
            if task is not None and entry[_OFFSET] > position:
                entry[_TASK] = None
                trio.lowlevel.reschedule(task, outcome.Value(False))
                woken += 1
            elif task is not None:
                kept.append(entry)
        heapq.heapify(kept)
        self._heap = kept
        return woken

    def advance(self, position: int) -> int:
        """Set the position and wake every waiter it satisfies; return how many woke."""
        if position <= self._position:
            return 0
        self._position = position
        heap, woken = self._heap, 0
        while heap and heap[0][_OFFSET] <= position:
            entry = heapq.heappop(heap)
            task = entry[_TASK]
            if task is not None:
                entry[_TASK] = None
                trio.lowlevel.reschedule(task, outcome.Value(True))
                woken += 1
        return woken

    def expire(self, now: float) -> int:
        """Wake every waiter whose deadline is at or before ``now`` with False."""
        deadlines, expired = self._deadlines, 0
        while deadlines and deadlines[0][0] <= now:
            entry = heapq.heappop(deadlines)[2]
            task = entry[_TASK]
            if task is not None:
                entry[_TASK] = None
                trio.lowlevel.reschedule(task, outcome.Value(False))
                expired += 1
        return expired

    async def expire_deadlines(self) -> None:
        """The timer task: sleeps until the earliest deadline, expires, repeats. Run it in
        the owner's nursery whenever waiters are given deadlines."""
        while True:
            deadlines = self._deadlines
            while deadlines and deadlines[0][2][_TASK] is None:
                heapq.heappop(deadlines)
            self._timer_target = deadlines[0][0] if deadlines else math.inf
            self._timer_wake = trio.Event()
            with trio.move_on_at(self._timer_target):
                await self._timer_wake.wait()
            self.expire(trio.current_time())

    def fail(self, error: BaseException) -> None:
        """Wake every waiter with ``error``; later waiters get it at once."""
        self._failure = error
        heap, self._heap = self._heap, []
        self._deadlines = []
        for entry in heap:
            task = entry[_TASK]
            if task is not None:
                entry[_TASK] = None
                trio.lowlevel.reschedule(task, outcome.Error(error))


class WakeHandle:
    """A wake-up :meth:`OffsetWaiters.wake_task` registered, until it fires or is
    cancelled. Used from the event loop only."""

    __slots__ = ("_entry",)

    def __init__(self, entry: list) -> None:
        self._entry = entry

    def cancel(self) -> bool:
        """Drop the wake-up; True if it had not fired (the caller may wake the task),
        False if it fired already (the task is rescheduled: leave it alone)."""
        entry = self._entry
        if entry[_TASK] is None:
            return False
        entry[_TASK] = None  # lazily dropped from the heaps
        return True


class KeyedWakeups(Generic[_Key]):
    """Tasks parked on a key (a consume queue) until someone wakes that key.

    A key has a parking lot only while a task is parked on it: :meth:`wake` takes the
    lot out, and the last task to leave a lot by cancellation removes it. So the table
    holds exactly the keys someone waits on, and an empty table (``not wakeups``) is
    what lets the waker skip the lookup. Used from the event loop only; wakers never
    yield, so a waiter that checked its condition and then parked cannot miss a wake.
    """

    def __init__(self) -> None:
        self._lots: dict[_Key, trio.lowlevel.ParkingLot] = {}
        self.lots: Final[Mapping[_Key, trio.lowlevel.ParkingLot]] = self._lots
        """The parked keys' lots, read-only: a waker on a hot path tests this mapping's
        truth once per entry instead of calling ``len(wakeups)`` (a Python call)."""

    def __len__(self) -> int:
        """How many keys have a task parked on them."""
        return len(self._lots)

    def parked(self, key: _Key) -> int:
        """How many tasks are parked on ``key``."""
        lot = self._lots.get(key)
        return len(lot) if lot is not None else 0

    async def wait(self, key: _Key) -> None:
        """Park until :meth:`wake` (or :meth:`wake_where`) names ``key``."""
        lot = self._lots.get(key)
        if lot is None:
            lot = self._lots[key] = trio.lowlevel.ParkingLot()
        try:
            await lot.park()
        finally:
            if not lot and self._lots.get(key) is lot:
                del self._lots[key]

    def wake(self, key: _Key) -> int:
        """Wake every task parked on ``key``; return how many."""
        lot = self._lots.pop(key, None)
        return len(lot.unpark_all()) if lot is not None else 0

    def wake_where(self, chosen: Callable[[_Key], bool]) -> int:
        """Wake the tasks of every key ``chosen`` accepts (a dropped topic's queues)."""
        return sum(self.wake(key) for key in [key for key in self._lots if chosen(key)])


class ReadLimitWaiters:
    """Tasks parked until a read limit reaches the log offset each needs.

    A long poll whose queue has entries that end past the read limit (a replicated
    master's confirm offset, a slave's copy of it) parks here with the end of its first
    hidden entry. :meth:`limit_moved` wakes exactly the waiters the new limit covers: a
    heap by offset, so a move that covers nobody (most acks) costs one peek, however
    many wait. :meth:`wake_all` wakes every one (a cut, a new ack policy).

    No position is kept: a read limit can move back (a slave's cut, a new master), and a
    waiter checks the limit itself right before it parks, with no await in between, so
    it cannot miss a move as long as every move is reported. Used from the event loop
    only; cancelled waiters are dropped lazily, and the heap is compacted when they
    outnumber the live ones.
    """

    _COMPACT_MIN = 64

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        """How many tasks are parked."""
        return self._live

    async def wait(self, offset: int) -> None:
        """Park until a :meth:`limit_moved` to ``offset`` or beyond, or :meth:`wake_all`."""
        entry = [offset, next(self._seq), trio.lowlevel.current_task()]
        heapq.heappush(self._heap, entry)
        self._live += 1

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            entry[2] = None  # lazily dropped from the heap
            self._live -= 1
            dead = len(self._heap) - self._live
            if dead > self._COMPACT_MIN and dead > self._live:
                self._heap = [kept for kept in self._heap if kept[2] is not None]
                heapq.heapify(self._heap)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def limit_moved(self, limit: int | None) -> int:
        """The read limit is now ``limit`` (None: no limit): wake every waiter for an
        offset at or below it; return how many woke."""
        heap, woken = self._heap, 0
        while heap and (limit is None or heap[0][0] <= limit):
            entry = heapq.heappop(heap)
            task = entry[2]
            if task is not None:
                entry[2] = None
                self._live -= 1
                trio.lowlevel.reschedule(task)
                woken += 1
        return woken

    def wake_all(self) -> int:
        """Wake every waiter (they re-check what they read); return how many."""
        return self.limit_moved(None)
