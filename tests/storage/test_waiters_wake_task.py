"""OffsetWaiters.wake_task: a task parked by its own means is woken as a waiter would be
(a connection's idle ack task, woken by the ack that releases its write), exactly once."""

from __future__ import annotations

import math
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from storage.waiters import OffsetWaiters


class Parked:
    """A task parked in ``wait_task_rescheduled``: what it was woken with, if it was."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.woken: outcome.Outcome[Any] | None = None
        self.done = trio.Event()

    async def park(self, task_status: trio.TaskStatus[trio.lowlevel.Task]) -> None:
        self.task = trio.lowlevel.current_task()
        task_status.started(self.task)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.SUCCEEDED

        self.woken = await outcome.acapture(trio.lowlevel.wait_task_rescheduled, abort)
        self.done.set()


async def test_the_task_wakes_once_the_position_reaches_its_offset() -> None:
    waiters = OffsetWaiters()
    waiters.advance(10)
    parked = Parked()
    async with trio.open_nursery() as nursery:
        task = await nursery.start(parked.park)
        assert waiters.wake_task(task, 10) is None  # reached already: the caller wakes it
        handle = waiters.wake_task(task, 20)
        assert handle is not None
        waiters.advance(19)
        await trio.testing.wait_all_tasks_blocked()
        assert parked.woken is None
        assert waiters.advance(20) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert parked.woken == outcome.Value(True)
        assert not handle.cancel()  # fired: the task must not be woken again


async def test_a_cancelled_wake_up_never_fires() -> None:
    waiters = OffsetWaiters()
    parked = Parked()
    async with trio.open_nursery() as nursery:
        task = await nursery.start(parked.park)
        handle = waiters.wake_task(task, 5)
        assert handle is not None
        assert handle.cancel()
        assert not handle.cancel()
        assert waiters.advance(100) == 0
        await trio.testing.wait_all_tasks_blocked()
        assert parked.woken is None
        trio.lowlevel.reschedule(task)  # its other waker, allowed by the True above
    assert parked.woken == outcome.Value(None)


async def test_the_deadline_the_failure_and_a_cut_wake_it_as_they_wake_a_waiter() -> None:
    waiters = OffsetWaiters()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiters.expire_deadlines)
        late = Parked()
        task = await nursery.start(late.park)
        assert waiters.wake_task(task, 50, trio.current_time() + 0.01) is not None
        with trio.fail_after(5):
            await late.done.wait()
        assert late.woken == outcome.Value(False)

        cut = Parked()
        task = await nursery.start(cut.park)
        assert waiters.wake_task(task, 50, math.inf) is not None
        assert waiters.rewind(40) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert cut.woken == outcome.Value(False)

        failed = Parked()
        task = await nursery.start(failed.park)
        assert waiters.wake_task(task, 60) is not None
        error = RuntimeError("fsync failed (test)")
        waiters.fail(error)
        await trio.testing.wait_all_tasks_blocked()
        assert failed.woken is not None
        with pytest.raises(RuntimeError, match="fsync failed"):
            failed.woken.unwrap()
        assert waiters.wake_task(task, 70) is None  # failed: nothing is registered again
        nursery.cancel_scope.cancel()
