"""The replicated ack policy's answers without a wait (issue 12): a write its level
already covers is answered in the same pass, and never by a stale master."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio.testing

from cluster.node.acks import ReplicatedAcks, StandaloneAcks
from cluster.protocol import Acks, Status
from replication import hop_trace
from replication.slave import HAClient
from replication.wire import HAProtocolError
from storage import Message, MessageStore, StorageFailedError
from tests.replication.test_ha_epochs import history
from tests.replication.test_ha_stream import (
    config_at,
    fill,
    messages,
    quiet_config,
    replicated,
    serving,
)


async def test_a_covered_write_is_answered_without_a_scheduling_point(tmp_path: Path) -> None:
    """Once the confirm offset (and, for replicated, the fsync) covers a write, its wait
    returns without yielding: a connection's queued waits then answer together."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(20, seed=51))
        end = master.commit_log.max_offset
        async with serving(master) as (service, port, nursery):
            nursery.start_soon(HAClient(slave, "s1").run, "127.0.0.1", port)
            assert await replicated(service, end)
            policy = ReplicatedAcks(StandaloneAcks(master), service, 1)
            assert await policy.wait(Acks.DURABLE, end, 10_000) == (Status.OK, None)
            for acks in (Acks.IN_SYNC, Acks.REPLICATED):
                waiting = policy.wait(acks, end, 10_000)
                with pytest.raises(StopIteration) as returned:  # done in its first step
                    waiting.send(None)
                assert returned.value.value == (Status.OK, None)


async def test_holds_is_true_exactly_when_a_wait_would_answer_ok_at_once(tmp_path: Path) -> None:
    """A connection answers a released write without its wait when ``holds`` says so:
    in_sync once the confirm offset covers it, replicated once the fsync does too,
    never past the confirm offset, never after a failed fsync, never while tracing."""
    async with (
        MessageStore.open(quiet_config(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
        serving(master) as (service, port, nursery),
    ):
        nursery.start_soon(HAClient(slave, "s1").run, "127.0.0.1", port)
        policy = ReplicatedAcks(StandaloneAcks(master), service, 1)
        first = await master.put(Message.create("t", b"first", 0))
        assert await replicated(service, first.end_offset)
        # the quiet store fsyncs only when asked: replicated waits for the fsync too
        if master.commit_log.flushed_offset < first.end_offset:
            assert policy.holds(Acks.IN_SYNC, first.end_offset)
            assert not policy.holds(Acks.REPLICATED, first.end_offset)
            assert not policy.holds(Acks.DURABLE, first.end_offset)
        assert await policy.wait(Acks.REPLICATED, first.end_offset, 10_000) == (Status.OK, None)
        for acks in (Acks.DURABLE, Acks.IN_SYNC, Acks.REPLICATED):
            assert policy.holds(acks, first.end_offset), acks
        beyond = service.confirm_offset + 1
        assert not policy.holds(Acks.IN_SYNC, beyond)
        assert not policy.holds(Acks.REPLICATED, beyond)
        task = trio.lowlevel.current_task()
        assert policy.wake_when_holds(Acks.DURABLE, beyond, math.inf, task) is None
        assert policy.wake_when_holds(Acks.IN_SYNC, first.end_offset, math.inf, task) is None
        for acks in (Acks.IN_SYNC, Acks.REPLICATED):
            wake = policy.wake_when_holds(acks, beyond, math.inf, task)
            assert wake is not None, acks
            assert wake.cancel()  # (this task is not parked: never let it fire)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hop_trace, "enabled", True)
            assert not policy.holds(Acks.IN_SYNC, first.end_offset)
            assert not policy.holds(Acks.REPLICATED, first.end_offset)
        master.commit_log.failure = StorageFailedError("fsync failed (test)")
        try:
            for acks in (Acks.DURABLE, Acks.IN_SYNC, Acks.REPLICATED):
                assert not policy.holds(acks, first.end_offset), acks
            with pytest.raises(StorageFailedError):
                await policy.wait(Acks.IN_SYNC, first.end_offset, 10_000)
        finally:
            master.commit_log.failure = None


async def test_a_stale_master_answers_no_write_even_one_its_confirm_offset_covers(
    tmp_path: Path,
) -> None:
    """A slave proved a newer epoch: what this master replicated may be cut on every
    slave, so even a write below its confirm offset is not acknowledged."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "a")) as follower,
        MessageStore.open(config_at(tmp_path / "b")) as newer,
    ):
        await fill(master, messages(20, seed=52))
        end = master.commit_log.max_offset
        async with serving(master, history=history((1, 0), (2, 0))) as (service, port, nursery):
            nursery.start_soon(HAClient(follower, "s1").run, "127.0.0.1", port)
            assert await replicated(service, end)
            policy = ReplicatedAcks(StandaloneAcks(master), service, 1)
            assert await policy.wait(Acks.IN_SYNC, end, 10_000) == (Status.OK, None)
            with pytest.raises(HAProtocolError, match="refused"):
                await HAClient(newer, "s2", history=history((1, 0), (3, 0))).run("127.0.0.1", port)
            assert service.stale is not None
            assert service.confirm_offset >= end
            assert not service.replicated_now(end)
            task = trio.lowlevel.current_task()
            for acks in (Acks.IN_SYNC, Acks.REPLICATED):
                assert not policy.holds(acks, end)
                # nothing registered: the caller wakes its task, and the wait answers
                assert policy.wake_when_holds(acks, end + 1, math.inf, task) is None
                status, error = await policy.wait(acks, end, 50)
                assert status is Status.FLUSH_SLAVE_TIMEOUT, acks
                assert error is not None


async def test_admitting_a_replicated_write_starts_its_fsync_before_its_wait(
    tmp_path: Path,
) -> None:
    """The fsync runs beside the slaves' round trip: it starts at the flusher's next
    turn after the append, not once the write's ack wait registers."""
    async with (
        MessageStore.open(quiet_config(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
        serving(master) as (service, port, nursery),
    ):
        nursery.start_soon(HAClient(slave, "s1").run, "127.0.0.1", port)
        await trio.testing.wait_all_tasks_blocked()
        policy = ReplicatedAcks(StandaloneAcks(master), service, 1)
        first = await master.put(Message.create("t", b"first", 0))  # takes the segment
        assert await master.wait_durable(first.end_offset, 10)
        fsyncs = master.group_commit.fsyncs
        policy.admit(Acks.REPLICATED)
        result = await master.put(Message.create("t", b"replicated", 0))
        await trio.testing.wait_all_tasks_blocked()  # the flusher is in its fsync
        await master.commit_log.flush()  # returns once that fsync is done
        assert master.group_commit.fsyncs == fsyncs + 1
        assert master.commit_log.flushed_offset >= result.end_offset
        policy.admit(Acks.IN_SYNC)  # no fsync for a level that does not wait for one
        await master.put(Message.create("t", b"in sync", 0))
        await trio.testing.wait_all_tasks_blocked()
        assert master.group_commit.fsyncs == fsyncs + 1
