"""The slave's acks around a stream that goes bad and around a reconnect: whatever this
slave applied is acked before the connection ends, and with ``slave_ack = "durable"``
nothing the master counts as acked (the hello's offset included) is still unflushed."""

from __future__ import annotations

import select
from pathlib import Path

import attrs
import pytest
import trio

from replication.settings import ReplicationSettings
from replication.slave import BadStreamError, HAClient
from replication.transfer import ChunkHeader, ChunkHeaderError
from replication.wire import Ack, AckDecoder, AckKind
from storage import MessageStore, StoreConfig
from tests.replication.test_ha_stream import config_at, messages, replicated, serving

QUIET = {"heartbeat_ms": 30_000, "peer_timeout_ms": 60_000, "poll_interval_ms": 60_000}
MODES = pytest.mark.parametrize("slave_ack", ["write", "durable"])


def unflushed_config(path: Path) -> StoreConfig:
    """No background flush: only the slave's own flushes make its bytes durable."""
    return attrs.evolve(
        config_at(path), flush_interval_ms=3_600_000, flush_thorough_interval_ms=3_600_000
    )


def log_bytes(store: MessageStore, start: int, end: int) -> bytes:
    segment = store.commit_log.files.find(start)
    return bytes(segment.view[start - segment.base : end - segment.base])


def chunk(store: MessageStore, start: int, end: int) -> bytes:
    return ChunkHeader(offset=start, length=end - start).pack() + log_bytes(store, start, end)


async def frames_waiting(sock: trio.socket.SocketType) -> list[Ack]:
    """The ack frames the slave wrote to ``sock``'s peer so far (it wrote them before
    its apply loop raised, so they are in the socket now or never)."""
    readable, _, _ = select.select([sock.fileno()], [], [], 0)
    return AckDecoder().feed(await sock.recv(4096)) if readable else []


@MODES
async def test_chunks_applied_before_a_bad_header_in_the_same_read_are_acked(
    tmp_path: Path, slave_ack: str
) -> None:
    """A whole chunk and, in the same read, a frame whose header fails its check: the
    chunk is applied, so it is acked (durable: flushed first) before the slave drops the
    stream. Failed before the fix: the ack waited for no whole frame to be buffered, and
    the bad one looked whole, so the connection ended with the chunk applied, never acked
    and (durable) never flushed, which the next hello then reported as held."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(unflushed_config(tmp_path / "slave")) as slave,
    ):
        end = (await master.put(messages(1, seed=61)[0])).end_offset
        settings = ReplicationSettings(slave_ack=slave_ack, **QUIET)  # type: ignore[arg-type]
        client = HAClient(slave, "s1", settings)
        client.acked_offset = 0
        bad = bytearray(ChunkHeader(offset=end, length=5).pack())
        bad[0] ^= 0xFF  # bad magic; the length field still says 5
        master_end, slave_end = trio.socket.socketpair()
        with master_end, slave_end:
            await master_end.send(chunk(master, 0, end) + bytes(bad) + bytes(5))
            with pytest.raises(ChunkHeaderError):
                await client._apply(slave_end, [])
            assert await frames_waiting(master_end) == [Ack(AckKind.ACK, end)]
        assert client.acked_offset == end == slave.commit_log.max_offset
        if slave_ack == "durable":
            assert slave.commit_log.flushed_offset >= end


@MODES
async def test_chunks_applied_before_a_refused_chunk_are_acked_before_the_refusal(
    tmp_path: Path, slave_ack: str
) -> None:
    """A good chunk and a corrupt one arrive together: the good one is acked (durable:
    flushed first), then the corrupt one refused. Failed before the fix (no ack, only
    the refusal)."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(unflushed_config(tmp_path / "slave")) as slave,
    ):
        ends = [(await master.put(m)).end_offset for m in messages(2, seed=62)]
        settings = ReplicationSettings(slave_ack=slave_ack, **QUIET)  # type: ignore[arg-type]
        client = HAClient(slave, "s1", settings)
        client.acked_offset = 0
        corrupt = bytearray(chunk(master, ends[0], ends[1]))
        corrupt[-1] ^= 0xFF  # the last body byte: the record's CRC no longer matches
        master_end, slave_end = trio.socket.socketpair()
        with master_end, slave_end:
            await master_end.send(chunk(master, 0, ends[0]) + bytes(corrupt))
            with pytest.raises(BadStreamError):
                await client._apply(slave_end, [])
            assert await frames_waiting(master_end) == [
                Ack(AckKind.ACK, ends[0]),
                Ack(AckKind.REFUSED, ends[0]),
            ]
        assert client.acked_offset == ends[0] == slave.commit_log.max_offset
        if slave_ack == "durable":
            assert slave.commit_log.flushed_offset >= ends[0]


async def test_a_durable_slave_hello_counts_only_flushed_bytes(tmp_path: Path) -> None:
    """The master counts a slave's hello offset as its ack. A durable slave that holds
    replicated bytes it has not flushed yet (its last connection ended between an apply
    and the flush) flushes them before it says hello. Failed before the fix: the master's
    confirm offset covered bytes the slave had not fsynced (flushed_offset 0)."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(unflushed_config(tmp_path / "slave")) as slave,
    ):
        for message in messages(2, seed=63):
            await master.put(message)
        end = master.commit_log.max_offset
        assert await slave.append_replicated(0, log_bytes(master, 0, end)) == end
        assert slave.commit_log.flushed_offset < end
        async with serving(master, slave_ack="durable") as (service, port, nursery):
            client = HAClient(slave, "s1", ReplicationSettings(slave_ack="durable"))
            nursery.start_soon(client.run, "127.0.0.1", port)
            assert await replicated(service, end)  # nothing to stream: the hello moved it
            assert service.ack_offsets == {"s1": end}
            assert slave.commit_log.flushed_offset >= end
