"""What keeps a replicated ack short (issue 12): a moved confirm offset rides ahead of the
next chunk instead of waking every slave with a frame of its own (it goes alone only
after ``confirm_delay_ms`` on an idle stream), and a small chunk leaves in one write."""

from __future__ import annotations

import os
import select
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from replication import transfer
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import HAClient
from replication.transfer import SMALL_RANGE_BYTES, ChunkHeader, send_file_range
from replication.wire import CHUNK_CONFIRM, AckDecoder, pack_ack, slave_handshake
from storage import Message, MessageStore
from tests.replication.test_ha_stream import config_at, fill, messages, replicated, serving

QUIET = {"heartbeat_ms": 30_000, "peer_timeout_ms": 60_000, "poll_interval_ms": 60_000}
"""No heartbeat frame gets between the frames these tests read (nor a poll's wake-up)."""


async def _read_up_to(sock: trio.socket.SocketType, end: int) -> None:
    """Read the stream's chunks (and confirm frames) until the log bytes reach ``end``."""
    await _read_up_to_from(sock, 0, end)


async def _read_up_to_from(sock: trio.socket.SocketType, start: int, end: int) -> None:
    """Read chunks (and confirm frames) from ``start`` until the log bytes reach ``end``."""
    buffer = memoryview(bytearray(1 << 20))
    received = start
    while received < end:
        header = await transfer.receive_chunk_into(sock, buffer)
        assert header is not None
        if not header.flags & CHUNK_CONFIRM:
            assert header.offset == received
            received += header.length


def _nothing_to_read(sock: trio.socket.SocketType) -> bool:
    readable, _, _ = select.select([sock.fileno()], [], [], 0)
    return not readable


@asynccontextmanager
async def _slave_acked_all(
    root: Path, seed: int, confirm_delay_ms: int
) -> AsyncIterator[tuple[MessageStore, trio.socket.SocketType, int, HAService]]:
    """A master with 20 records and a bare slave socket that read them all and acked its
    end, the ack having moved the confirm offset: (master, socket, that end, service)."""
    async with MessageStore.open(config_at(root / "master")) as master:
        await fill(master, messages(20, seed=seed))
        end = master.commit_log.max_offset
        async with serving(master, confirm_delay_ms=confirm_delay_ms, **QUIET) as (
            service,
            port,
            _,
        ):
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                await slave_handshake(sock, "s1", 0)
                await _read_up_to(sock, end)
                await sock.send(pack_ack(end))
                assert await replicated(service, end)
                yield master, sock, end, service


async def test_a_moved_confirm_rides_ahead_of_the_next_chunk(tmp_path: Path) -> None:
    """Once the slave's ack moved the confirm offset, nothing is sent on an idle stream
    (within the delay); the next append's chunk comes with the confirm frame ahead of
    it. Fails on the old code, which sent the confirm frame at once on its own."""
    async with _slave_acked_all(tmp_path, 31, confirm_delay_ms=60_000) as (master, sock, end, _):
        await trio.testing.wait_all_tasks_blocked()
        assert _nothing_to_read(sock)  # no frame of its own for the confirm

        await fill(master, messages(5, seed=32))
        buffer = memoryview(bytearray(1 << 20))
        first = await transfer.receive_chunk_into(sock, buffer)
        assert first == ChunkHeader(offset=end, length=0, flags=CHUNK_CONFIRM)
        chunk = await transfer.receive_chunk_into(sock, buffer)
        assert chunk is not None and chunk.offset == end and chunk.length > 0


async def test_an_idle_stream_sends_the_moved_confirm_on_its_own(tmp_path: Path) -> None:
    """With no chunk to ride on, the confirm frame goes alone once the delay passed, so
    a slave's read limit never waits for the next write."""
    async with _slave_acked_all(tmp_path, 33, confirm_delay_ms=1) as (_master, sock, end, _):
        with trio.fail_after(10):
            header = await transfer.receive_chunk_into(sock, memoryview(bytearray(64)))
        assert header == ChunkHeader(offset=end, length=0, flags=CHUNK_CONFIRM)


@pytest.fixture
def data_fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(SMALL_RANGE_BYTES + 4096))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


async def test_a_small_range_leaves_in_one_write_a_large_one_by_sendfile(
    data_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header and a small range share one ``write`` (no second network syscall for the
    header, no scheduling pass in between); past :data:`SMALL_RANGE_BYTES` the data
    goes by ``sendfile``. Fails on the old code, which sent every range by sendfile."""
    calls: list[str] = []
    real_write, real_sendfile = os.write, os.sendfile

    def write(fd: int, data: bytes | memoryview) -> int:
        calls.append("write")
        return real_write(fd, data)

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append("sendfile")
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(transfer.os, "write", write)
    monkeypatch.setattr(transfer.os, "sendfile", sendfile)
    left, right = trio.socket.socketpair()
    with left, right:
        buffer = bytearray(64 + SMALL_RANGE_BYTES)
        header = ChunkHeader(0, 1000).pack()
        await send_file_range(left, data_fd, 0, 1000, header, buffer=buffer)
        assert calls == ["write"]
        got = await transfer.recv_exactly_into(right, memoryview(bytearray(24 + 1000)))
        assert got == 24 + 1000

        calls.clear()
        count = SMALL_RANGE_BYTES + 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transfer.recv_exactly_into, right, memoryview(bytearray(24 + count)))
            await send_file_range(
                left, data_fd, 0, count, ChunkHeader(0, count).pack(), buffer=buffer
            )
        assert "sendfile" in calls and "write" not in calls


def _log_bytes(store: MessageStore, start: int, end: int) -> bytes:
    segment = store.commit_log.files.find(start)
    return bytes(segment.view[start - segment.base : end - segment.base])


async def test_a_lone_write_reaches_an_idle_slave_from_the_append_itself(
    tmp_path: Path,
) -> None:
    """A slave that acked everything sent gets the next append's bytes written by the
    appending task itself: they are on its socket when the put returns, before any other
    task ran (the confirm frame the ack moved rides ahead). Fails on the old code, which
    woke the stream task and sent one scheduling pass later."""
    async with _slave_acked_all(tmp_path, 41, confirm_delay_ms=60_000) as (master, sock, end, _):
        await trio.testing.wait_all_tasks_blocked()
        result = await master.put(messages(1, seed=42)[0])
        assert not _nothing_to_read(sock)  # no checkpoint since the put: written by it
        buffer = memoryview(bytearray(1 << 20))
        first = await transfer.receive_chunk_into(sock, buffer)
        assert first == ChunkHeader(offset=end, length=0, flags=CHUNK_CONFIRM)
        chunk = await transfer.receive_chunk_into(sock, buffer)
        assert chunk == ChunkHeader(offset=end, length=result.end_offset - end)
        assert bytes(buffer[: chunk.length]) == _log_bytes(master, end, result.end_offset)


async def test_writes_while_bytes_are_in_flight_go_out_together_from_the_sender(
    tmp_path: Path,
) -> None:
    """Once a chunk awaits the slave's ack, later appends are not written one by one
    from their tasks: the stream task sends all of them in one chunk at its turn."""
    async with _slave_acked_all(tmp_path, 43, confirm_delay_ms=60_000) as (master, sock, end, _):
        await trio.testing.wait_all_tasks_blocked()
        first = await master.put(messages(1, seed=44)[0])  # written at once, not acked
        await _read_up_to_from(sock, end, first.end_offset)
        second = await master.put(messages(1, seed=45)[0])
        third = await master.put(messages(1, seed=46)[0])
        assert _nothing_to_read(sock)  # in flight: the sender's turn, not the append's
        buffer = memoryview(bytearray(1 << 20))
        chunk = await transfer.receive_chunk_into(sock, buffer)
        assert chunk == ChunkHeader(
            offset=first.end_offset, length=third.end_offset - first.end_offset
        )
        assert second.end_offset < third.end_offset
        assert bytes(buffer[: chunk.length]) == _log_bytes(
            master, first.end_offset, third.end_offset
        )


async def test_a_direct_write_the_socket_takes_in_part_is_finished_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket takes only half of the frame the append writes: the stream task sends
    the rest before anything else, so the slave reads whole, valid chunks that continue
    the log byte for byte, and the stream goes on."""
    async with _slave_acked_all(tmp_path, 47, confirm_delay_ms=60_000) as (master, sock, end, _):
        await trio.testing.wait_all_tasks_blocked()
        real_writev = os.writev
        halved: list[int] = []

        def half_writev(fd: int, buffers: list[bytes | memoryview]) -> int:
            data = b"".join(buffers)
            if not halved and len(data) > 100:
                halved.append(len(data))
                return os.write(fd, data[: len(data) // 2])
            return real_writev(fd, buffers)

        monkeypatch.setattr(os, "writev", half_writev)
        first = await master.put(messages(1, seed=48)[0])
        monkeypatch.setattr(os, "writev", real_writev)
        assert halved  # the append wrote, in part
        second = await master.put(messages(1, seed=49)[0])
        buffer = memoryview(bytearray(1 << 20))
        received = end
        while received < second.end_offset:
            header = await transfer.receive_chunk_into(sock, buffer)
            assert header is not None
            if header.flags & CHUNK_CONFIRM:
                continue
            assert header.offset == received
            assert bytes(buffer[: header.length]) == _log_bytes(
                master, received, received + header.length
            )
            received += header.length
            await sock.send(pack_ack(received))
        assert received == second.end_offset > first.end_offset


async def test_a_confirm_sent_with_a_direct_write_does_not_wake_the_parked_sender(
    tmp_path: Path,
) -> None:
    """The ack moved the confirm offset, due on its own after ``confirm_delay_ms``; the
    next append's direct write carries it, so the parked sender's wake-up for it is
    called off (it woke at the old due time for nothing, twice a confirm delay per
    slave under a steady trickle of writes). Fails on the old code."""
    async with _slave_acked_all(tmp_path, 53, confirm_delay_ms=5_000) as (
        master,
        sock,
        end,
        service,
    ):
        await trio.testing.wait_all_tasks_blocked()
        connection = service.connections["s1"]
        parked = connection._parked
        assert parked is not None and parked.deadline <= trio.current_time() + 5
        await master.put(messages(1, seed=54)[0])  # written at once, confirm ahead
        assert connection._parked is parked
        assert parked.deadline > trio.current_time() + 20  # the heartbeat's (30 s), not 5 s
        await _read_up_to_from(sock, end, master.commit_log.max_offset)


def _chunk(store: MessageStore, start: int, end: int) -> bytes:
    return ChunkHeader(offset=start, length=end - start).pack() + _log_bytes(store, start, end)


async def test_chunks_that_arrived_together_get_one_ack_a_lone_chunk_its_own(
    tmp_path: Path,
) -> None:
    """The slave acks once no whole frame is left in what it read: two chunks (and a
    confirm frame) that arrived together are applied and answered with one ack of
    their end; a chunk alone is acked at once. Fails on the old code (an ack per chunk)."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        ends = [(await master.put(message)).end_offset for message in messages(3, seed=51)]
        bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        client = HAClient(slave, "s1", ReplicationSettings(**QUIET))  # type: ignore[arg-type]
        client.acked_offset = 0
        master_end, slave_end = trio.socket.socketpair()
        with master_end, slave_end:
            confirm = ChunkHeader(offset=0, length=0, flags=CHUNK_CONFIRM).pack()
            await master_end.send(_chunk(master, *bounds[0]) + confirm + _chunk(master, *bounds[1]))
            decoder = AckDecoder()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._apply, slave_end, [])
                acks = decoder.feed(await master_end.recv(4096))
                await trio.testing.wait_all_tasks_blocked()
                assert _nothing_to_read(master_end)
                assert [ack.offset for ack in acks] == [ends[1]]
                assert client.acked_offset == ends[1]

                await master_end.send(_chunk(master, *bounds[2]))
                acks = decoder.feed(await master_end.recv(4096))
                assert [ack.offset for ack in acks] == [ends[2]]
                nursery.cancel_scope.cancel()
        assert slave.commit_log.max_offset == ends[2]


async def test_with_bytes_always_waiting_every_read_is_acked_before_the_next(
    tmp_path: Path,
) -> None:
    """The one-ack-per-read rule cannot starve: with more chunks always waiting on the
    socket (the read buffer holds one frame and the start of the next), each read's
    chunk is acked before the next read, not once the socket runs dry (the rule of
    d8cfc14, which under steady load held acks until the heartbeat: it acked once, at the
    end). Four records of one size, so no read holds two whole chunks."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        ends = [
            (await master.put(Message.create("t", bytes(1000), 0))).end_offset for _ in range(4)
        ]
        bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        longest = max(end - start for start, end in bounds)
        settings = ReplicationSettings(max_chunk=longest, **QUIET)  # type: ignore[arg-type]
        client = HAClient(slave, "s1", settings)
        client.acked_offset = 0
        master_end, slave_end = trio.socket.socketpair()
        with master_end, slave_end:
            await master_end.send(b"".join(_chunk(master, *bound) for bound in bounds))
            decoder = AckDecoder()
            acked: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._apply, slave_end, [])
                while not acked or acked[-1] < ends[-1]:
                    acked += [ack.offset for ack in decoder.feed(await master_end.recv(4096))]
                nursery.cancel_scope.cancel()
        assert acked == ends
        assert slave.commit_log.max_offset == ends[-1]
