"""``GroupCommitFlusher.wake_when_durable``: a task parked by its own means (a
connection's idle ack task) is woken by the end of the fdatasync that covers its
offset, as ``wait_durable`` would answer: never before that fdatasync returned, with
the failure when it failed, with False at its deadline."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import attrs
import outcome
import pytest
import trio
import trio.testing

from storage import Message, MessageStore, StorageFailedError
from tests.storage.test_group_commit import SyncGate, quiet_config
from tests.storage.test_group_commit import gate as gate  # the fixture: held fdatasyncs


@attrs.define
class Parked:
    """A task that registers with :meth:`wake_when_durable` and parks until woken."""

    woken: outcome.Outcome[bool] | None = None
    registered: bool = False


async def park_for(store: MessageStore, offset: int, deadline: float, parked: Parked) -> None:
    task = trio.lowlevel.current_task()
    handle = store.group_commit.wake_when_durable(task, offset, deadline)
    assert handle is not None
    parked.registered = True

    def abort(_raise_cancel: object) -> trio.lowlevel.Abort:  # the test failed: let go
        return trio.lowlevel.Abort.SUCCEEDED if handle.cancel() else trio.lowlevel.Abort.FAILED

    parked.woken = await outcome.acapture(trio.lowlevel.wait_task_rescheduled, abort)


async def test_the_task_is_woken_by_the_end_of_the_fdatasync_that_covers_it(
    tmp_path: Path, gate: SyncGate
) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"wake me", 0))
        parked = Parked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(park_for, store, result.end_offset, math.inf, parked)
            await trio.testing.wait_all_tasks_blocked()
            assert parked.registered
            # registering started the fsync, and it is held: no wake-up yet
            assert await trio.to_thread.run_sync(gate.entered.wait, 30)
            await trio.testing.wait_all_tasks_blocked()
            assert parked.woken is None
            assert store.commit_log.flushed_offset < result.end_offset
            gate.open()
        assert parked.woken == outcome.Value(True)
        assert store.commit_log.flushed_offset >= result.end_offset


async def test_nothing_is_registered_when_the_answer_is_known_at_once(tmp_path: Path) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"durable", 0))
        assert await store.wait_durable(result.end_offset, 30)
        task = trio.lowlevel.current_task()
        assert store.group_commit.wake_when_durable(task, result.end_offset, math.inf) is None
        store.commit_log.failure = StorageFailedError("fsync failed (test)")
        try:
            beyond = result.end_offset + 1
            assert store.group_commit.wake_when_durable(task, beyond, math.inf) is None
        finally:
            store.commit_log.failure = None


async def test_a_failed_fdatasync_wakes_the_task_with_the_failure(
    tmp_path: Path, gate: SyncGate
) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"lost", 0))
        gate.error = errno.EIO
        parked = Parked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(park_for, store, result.end_offset, math.inf, parked)
            await trio.testing.wait_all_tasks_blocked()
            gate.open()
        assert isinstance(parked.woken, outcome.Error)
        with pytest.raises(StorageFailedError, match="fdatasync of the commit log failed"):
            parked.woken.unwrap()


async def test_the_deadline_wakes_the_task_with_false(tmp_path: Path, gate: SyncGate) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"slow disk", 0))
        parked = Parked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(park_for, store, result.end_offset, trio.current_time(), parked)
        assert parked.woken == outcome.Value(False)
        gate.open()
        assert await store.wait_durable(result.end_offset, 30)
