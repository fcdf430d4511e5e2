"""The slave's follow loop (:class:`replication.slave.SlaveReplication`) in one trio loop
over loopback: stopping it is clean whatever a connection is doing (issue 7 point 7), a
bad stream or a storage error never ends it with an exception (point 6), and the slave's
read limit is the master's confirm offset carried in the stream (point 2)."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from replication.epochs import EpochFile, EpochHistory
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import SlaveReplication
from replication.wire import pack_ack, slave_handshake
from storage import Message, MessageStore
from storage.errors import CorruptSegmentError
from storage.mapped_file import MappedFile
from tests.replication.test_ha_stream import assert_identical, config_at, fill, messages

SETTINGS = ReplicationSettings(heartbeat_ms=100, peer_timeout_ms=1_000)


@asynccontextmanager
async def master_serving(
    master: MessageStore, settings: ReplicationSettings = SETTINGS
) -> AsyncIterator[tuple[HAService, str, trio.Nursery]]:
    service = HAService(master, settings)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(service.serve, "127.0.0.1", 0)
        yield service, f"127.0.0.1:{port}", nursery
        nursery.cancel_scope.cancel()


def follower(store: MessageStore, address: str, data_dir: Path) -> SlaveReplication:
    return SlaveReplication(
        store,
        "s1",
        address,
        SETTINGS,
        history=EpochHistory(),
        epoch_file=EpochFile.in_dir(data_dir),
    )


class FailingApply:
    """A slave store whose n-th ``append_replicated`` runs ``before`` and then raises
    ``error`` (everything else is the real store)."""

    def __init__(self, store: MessageStore, error: BaseException, before: object, n: int = 1):
        self._store = store
        self._error = error
        self._before = before
        self._left = n

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def append_replicated(self, offset: int, data: bytes | memoryview) -> int:
        self._left -= 1
        if self._left == 0:
            self._before()  # type: ignore[operator]
            raise self._error
        return await self._store.append_replicated(offset, data)


@pytest.mark.parametrize(
    "error",
    [BrokenPipeError(errno.EPIPE, "ack into a reset socket"), CorruptSegmentError("bad record")],
    ids=["broken-pipe", "corrupt"],
)
async def test_stop_is_clean_when_a_connection_fails_at_the_same_moment(
    tmp_path: Path, error: BaseException
) -> None:
    """Issue 7 point 7: a promote stops the loop while the connection fails: the stream
    error and the stop's cancellation arrive together, and ``run`` must still just end
    (the old loop let the grouped pair escape and the node exited 1)."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(200, seed=70))
        async with master_serving(master) as (_service, address, _):
            holder: list[SlaveReplication] = []
            store = FailingApply(slave, error, lambda: holder[0].request_stop(), n=2)
            replication = follower(store, address, tmp_path)  # type: ignore[arg-type]
            holder.append(replication)
            with trio.fail_after(10):
                await replication.run()  # returns: no exception, group or not
            await replication.stop()  # after the end too: returns at once
            assert not replication.status().connected


async def test_a_corrupt_stream_is_refused_reported_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 7 point 6: a slave whose end falls inside a master record (nothing proves
    otherwise without epochs) gets bytes that fail validation. It refuses them, tells
    the master, says why in its status and retries with backoff; it never raises."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await master.put(Message.create("t", b"m" * 500, queue_id=0))
        await slave.put(Message.create("t", b"s" * 100, queue_id=0))  # ends inside it
        await fill(master, messages(5, seed=71))
        caplog.set_level(logging.WARNING)
        async with master_serving(master) as (service, address, nursery):
            replication = follower(slave, address, tmp_path)
            nursery.start_soon(replication.run)
            with trio.fail_after(10):
                while replication.reconnects < 3:  # the backoff's pauses: 50, 100, 200 ms
                    await trio.sleep(0.01)
            status = replication.status()
            assert status.last_error is not None and "refused" in status.last_error
            assert status.halted is None
            assert slave.commit_log.max_offset < master.commit_log.max_offset
            # Nothing past what it claimed at the hello (an epoch-less master can only
            # take a slave's word for that much: epochs are what prove it, point 1).
            assert service.confirm_offset <= slave.commit_log.max_offset
            told = [
                r.getMessage() for r in caplog.records if "ha_connection_failed" in r.getMessage()
            ]
            assert any("refused the stream" in message for message in told), told
            await replication.stop()


async def test_a_failed_fsync_halts_the_slave_which_stays_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 7 point 6: a slave whose fsync fails stops following and says why; the
    loop does not raise (the node stays up, read-only), as a master in that state does."""
    import storage.commit_log

    real_sync_all = storage.commit_log._sync_all

    def failing_sync_all(segments: list[MappedFile]) -> tuple[float, float]:
        if any("slave" in str(segment.path) for segment in segments):
            raise OSError(errno.EIO, "Input/output error")
        return real_sync_all(segments)

    monkeypatch.setattr(storage.commit_log, "_sync_all", failing_sync_all)
    durable = ReplicationSettings(heartbeat_ms=100, peer_timeout_ms=1_000, slave_ack="durable")
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(10, seed=72))
        async with master_serving(master) as (_service, address, nursery):
            replication = SlaveReplication(
                slave,
                "s1",
                address,
                durable,
                history=EpochHistory(),
                epoch_file=EpochFile.in_dir(tmp_path),
            )
            nursery.start_soon(replication.run)
            with trio.fail_after(10):
                while replication.status().halted is None:
                    await trio.sleep(0.01)
            status = replication.status()
            assert "store failed" in status.halted and "fdatasync" in status.halted  # type: ignore[operator]
            assert not status.connected
            await replication.stop()  # it was parked, not crashed: the stop ends it


async def test_the_slave_read_limit_is_the_masters_confirm_offset(tmp_path: Path) -> None:
    """Issue 7 point 2: the stream carries the confirm offset; a slave's reads stop there,
    never past what it holds, even when it holds more (another slave lags)."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "a")) as fast,
    ):
        await fill(master, messages(20, seed=73))
        # A moved confirm offset goes out at once (not after confirm_delay_ms, waiting
        # for a chunk to ride on: test_stream_latency), so the blocked-tasks waits below
        # see the slave's read limit follow it.
        prompt = ReplicationSettings(heartbeat_ms=100, peer_timeout_ms=1_000, confirm_delay_ms=0)
        async with master_serving(master, prompt) as (service, address, nursery):
            a = follower(fast, address, tmp_path / "a")
            assert a.read_limit() == 0  # nothing heard from a master yet
            nursery.start_soon(a.run)
            first = master.commit_log.max_offset
            assert await service.wait_replicated(first, trio.current_time() + 10)
            await trio.testing.wait_all_tasks_blocked()
            assert a.read_limit() == a.status().confirm_offset == first

            # A second slave that holds `first` and acks nothing more keeps the confirm
            # offset there (it is in sync), while `a` applies everything.
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", int(address.rpartition(":")[2])))
                await slave_handshake(sock, "b", first)
                await fill(master, messages(20, seed=74))
                end = master.commit_log.max_offset
                while fast.commit_log.max_offset < end:
                    await fast.wait_for_arrival()
                await trio.testing.wait_all_tasks_blocked()
                assert service.confirm_offset == first
                assert a.read_limit() == first < fast.commit_log.max_offset == end
                await sock.send(pack_ack(end))  # b catches up (its bytes unread: the
                # master only checks that the ack is not past what it sent)
                assert await service.wait_replicated(end, trio.current_time() + 10)
                await trio.testing.wait_all_tasks_blocked()
                assert a.read_limit() == end
            assert_identical(master, fast)
            await a.stop()
