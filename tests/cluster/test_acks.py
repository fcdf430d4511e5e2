"""The ack policies' own contract: what is refused before an append, and timeouts in ms."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.node.acks import AckPolicy, StandaloneAcks
from cluster.protocol import Acks, Status
from cluster.server import RequestError
from replication import hop_trace
from replication.insync import InSyncSet
from storage import Message, MessageStore, StorageFailedError
from tests.replication.test_ha_stream import config_at


class SlowDisk:
    """The one store call the standalone policy makes, answering 'not yet durable'
    and recording the timeout it was given (seconds, the store's unit)."""

    def __init__(self) -> None:
        self.timeouts_s: list[float] = []

    async def wait_durable(self, offset: int, timeout: float) -> bool:
        self.timeouts_s.append(timeout)
        return False


def test_replicated_is_refused_before_anything_is_appended() -> None:
    policy = StandaloneAcks(SlowDisk())  # type: ignore[arg-type]
    policy.admit(Acks.LEADER)
    policy.admit(Acks.DURABLE)
    with pytest.raises(RequestError) as refused:
        policy.admit(Acks.REPLICATED)
    assert refused.value.status is Status.SLAVE_NOT_AVAILABLE
    assert "nothing was written" in refused.value.message
    assert policy.read_limit() is None


@pytest.mark.parametrize("acks", list(Acks))
def test_a_master_alone_refuses_exactly_the_levels_that_need_slaves(acks: Acks) -> None:
    policy = StandaloneAcks(SlowDisk())  # type: ignore[arg-type]
    if acks.needs_slaves:
        with pytest.raises(RequestError) as refused:
            policy.admit(acks)
        assert refused.value.status is Status.SLAVE_NOT_AVAILABLE
        assert f"acks={acks.value}" in refused.value.message
    else:
        policy.admit(acks)


async def test_the_timeout_is_in_milliseconds_end_to_end() -> None:
    disk = SlowDisk()
    policy: AckPolicy = StandaloneAcks(disk)  # type: ignore[arg-type]
    status, error = await policy.wait(Acks.DURABLE, 100, 250)
    assert status is Status.FLUSH_DISK_TIMEOUT
    assert error is not None and "within 250 ms" in error
    assert disk.timeouts_s == [0.25]


async def test_durable_is_answered_once_fsynced(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        result = await store.put(Message.create("t", b"kept", 0))
        policy = StandaloneAcks(store)
        assert await policy.wait(Acks.DURABLE, result.end_offset, 10_000) == (Status.OK, None)
        assert store.commit_log.flushed_offset >= result.end_offset


async def test_holds_is_true_exactly_when_durable_is_answered_at_once(tmp_path: Path) -> None:
    """``holds`` lets a connection answer a released write with no wait: true only once
    the fsync covers the write, never after a failed fsync (whose wait raises), never
    for a level that needs slaves, and never while hop tracing is on."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        policy = StandaloneAcks(store)
        first = await store.put(Message.create("t", b"first", 0))
        assert await policy.wait(Acks.DURABLE, first.end_offset, 10_000) == (Status.OK, None)
        assert policy.holds(Acks.DURABLE, first.end_offset)
        assert not policy.holds(Acks.IN_SYNC, first.end_offset)
        second = await store.put(Message.create("t", b"second", 0))
        if store.commit_log.flushed_offset < second.end_offset:
            assert not policy.holds(Acks.DURABLE, second.end_offset)
        assert not policy.holds(Acks.DURABLE, store.commit_log.max_offset + 1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hop_trace, "enabled", True)
            assert not policy.holds(Acks.DURABLE, first.end_offset)
        store.commit_log.failure = StorageFailedError("fsync failed (test)")
        try:
            assert not policy.holds(Acks.DURABLE, first.end_offset)
            with pytest.raises(StorageFailedError):
                await policy.wait(Acks.DURABLE, first.end_offset, 10_000)
        finally:
            store.commit_log.failure = None


def test_the_in_sync_set_tells_its_observers_of_every_slave_change() -> None:
    """The node's ack path and switchover wait on these calls instead of polling."""
    insync = InSyncSet(max_lag_bytes=1000, max_lag_ms=1000)
    calls: list[dict[str, int]] = []
    insync.observers.append(
        lambda: calls.append({n: s.ack_offset for n, s in insync.slaves.items()})
    )
    insync.add("s", 0, 100, now=0.0)
    insync.ack("s", 50, 100, now=0.1)
    insync.ack("t", 50, 100, now=0.1)  # unknown: no change
    insync.remove("s")
    insync.remove("s")  # gone already: no change
    assert calls == [{"s": 0}, {"s": 50}, {}]
