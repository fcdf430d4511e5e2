"""The master's sender against the files under it: retention deleting the segment it
streams from (issue 7 point 4), a slave behind the master's log start resyncing
(point 5), and cold ranges read in a worker thread before ``sendfile``."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

import replication.master
from replication.epochs import EpochFile, EpochHistory
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import SlaveReplication
from replication.transfer import receive_chunk_into
from replication.wire import (
    CHUNK_CONFIRM,
    MASTER_HELLO_SIZE,
    slave_handshake,
)
from storage import Message, MessageStore, StoreConfig
from tests.replication.test_ha_stream import assert_identical

SEGMENT = 4 << 20
SETTINGS = ReplicationSettings(heartbeat_ms=10_000, peer_timeout_ms=60_000)


def big_config(path: Path) -> StoreConfig:
    return StoreConfig(
        data_dir=path,
        segment_size=SEGMENT,
        max_message_size=128 * 1024,
        retention_check_interval_ms=3_600_000,
    )


async def fill_segments(store: MessageStore, segments: int) -> None:
    body = bytes(range(256)) * 400  # ~100 KB
    while store.commit_log.max_offset < segments * SEGMENT:
        await store.put(Message.create("t", body, queue_id=0))


async def test_retention_cannot_pull_a_segment_from_under_the_sender(tmp_path: Path) -> None:
    """Issue 7 point 4: retention deletes the segment a blocked sender is streaming; the
    freed descriptor number is taken by another file. The slave must still receive the
    deleted segment's own bytes (the old sender borrowed the store's fd: EBADF, or the
    other file's bytes)."""
    async with MessageStore.open(big_config(tmp_path / "master")) as master:
        await fill_segments(master, 3)
        first = master.commit_log.files.segments[0]
        original = bytes(first.view[: first.wrote])
        service = HAService(master, SETTINGS)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            sock = trio.socket.socket()
            decoys: list[int] = []
            with sock:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
                await sock.connect(("127.0.0.1", port))
                assert (await slave_handshake(sock, "s", 0))[0].stream_from == 0
                connection = service.connections["s"]
                # The sender opens its own descriptor of the segment in a worker thread
                # before its first chunk, and a task waiting on a thread counts as
                # blocked: wait until that chunk went out (the segment is pinned), then
                # until the sender is stuck on the full socket.
                with trio.fail_after(20):
                    while connection.send_offset <= 0:
                        await trio.testing.wait_all_tasks_blocked(0.05)
                    await trio.testing.wait_all_tasks_blocked(0.05)
                assert connection.send_offset < first.wrote  # mid-segment
                assert await master.commit_log.delete_oldest(1) == 1
                decoy = tmp_path / "decoy"
                decoy.write_bytes(b"\xee" * SEGMENT)
                decoys = [os.open(decoy, os.O_RDONLY) for _ in range(4)]
                try:
                    received = bytearray()
                    buffer = memoryview(bytearray(SETTINGS.max_chunk))
                    with trio.fail_after(20):
                        while len(received) < len(original):
                            header = await receive_chunk_into(sock, buffer)
                            assert header is not None, "the master ended the stream"
                            if header.flags & CHUNK_CONFIRM or not header.length:
                                continue
                            assert header.offset == len(received)
                            received += buffer[: header.length]
                    assert bytes(received[: len(original)]) == original
                finally:
                    for fd in decoys:
                        os.close(fd)
            nursery.cancel_scope.cancel()


async def test_a_new_slave_of_a_master_whose_log_start_moved_resyncs(tmp_path: Path) -> None:
    """Issue 7 point 5: retention removed the master's first segments; an empty slave
    (and one that is behind) restarts its log at the master's log start and catches up
    byte for byte, and its status says so (the old master refused it forever)."""
    async with (
        MessageStore.open(big_config(tmp_path / "master")) as master,
        MessageStore.open(big_config(tmp_path / "slave")) as slave,
    ):
        await fill_segments(master, 3)
        assert await master.commit_log.delete_oldest(2) == 2
        log_start = master.commit_log.min_offset
        assert log_start == 2 * SEGMENT
        service = HAService(master, SETTINGS, history=EpochHistory())
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            follower = SlaveReplication(
                slave,
                "s",
                f"127.0.0.1:{port}",
                SETTINGS,
                history=EpochHistory(),
                epoch_file=EpochFile.in_dir(tmp_path),
            )
            nursery.start_soon(follower.run)
            end = master.commit_log.max_offset
            assert await service.wait_replicated(end, trio.current_time() + 20)
            status = follower.status()
            assert status.last_restart == (0, log_start)
            assert slave.commit_log.min_offset == log_start
            assert slave.commit_log.max_offset == end
            assert bytes(slave.commit_log.files.segments[-1].view[: end - log_start]) == bytes(
                master.commit_log.files.segments[-1].view[: end - log_start]
            )
            await follower.stop()
            nursery.cancel_scope.cancel()


async def test_a_sender_far_behind_reads_cold_ranges_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold pages are read off the event loop's thread before ``sendfile`` sends them."""
    threads: list[str] = []
    real = replication.master.warm_pages

    def spy(fd: int, offset: int, count: int, scratch: bytearray) -> None:
        threads.append(threading.current_thread().name)
        real(fd, offset, count, scratch)

    monkeypatch.setattr(replication.master, "warm_pages", spy)
    settings = ReplicationSettings(cold_distance_bytes=SEGMENT)
    async with (
        MessageStore.open(big_config(tmp_path / "master")) as master,
        MessageStore.open(big_config(tmp_path / "slave")) as slave,
    ):
        await fill_segments(master, 3)
        service = HAService(master, settings)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            follower = SlaveReplication(
                slave, "s", f"127.0.0.1:{port}", settings,
                history=EpochHistory(), epoch_file=EpochFile.in_dir(tmp_path),
            )  # fmt: skip
            nursery.start_soon(follower.run)
            end = master.commit_log.max_offset
            assert await service.wait_replicated(end, trio.current_time() + 20)
            await follower.stop()
            nursery.cancel_scope.cancel()
        assert_identical(master, slave)
    assert threads and threading.main_thread().name not in threads
    # Only the cold part: the last `cold_distance_bytes` went without the thread read.
    assert len(threads) * settings.max_chunk <= end - SEGMENT + settings.max_chunk
    assert MASTER_HELLO_SIZE  # the hello layout is the one the sockets use


async def test_a_peer_that_is_not_a_slave_is_refused_at_once(tmp_path: Path) -> None:
    """A client that dialled the replication port sends a frame shorter than a hello:
    the master closes at once on the wrong magic instead of waiting for more bytes
    (which left the client hanging until its own timeout)."""
    async with MessageStore.open(big_config(tmp_path / "master")) as master:
        service = HAService(master, SETTINGS)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                await sock.send(b"\x00\x00\x00\x0cstatus")  # 10 bytes, not a hello
                # Closed, nothing said (a reset when our bytes were left unread).
                with trio.fail_after(5), contextlib.suppress(ConnectionResetError):
                    assert await sock.recv(100) == b""
            nursery.cancel_scope.cancel()
