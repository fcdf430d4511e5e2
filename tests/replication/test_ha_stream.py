"""HA streaming end to end, in one trio loop over loopback: a slave that connects empty,
tails a live master, or restarts mid-stream ends with the master's exact log and queues,
and the master's confirm offset says so."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from replication.master import HAService
from replication.settings import MAX_CHUNK, ReplicationSettings
from replication.slave import HAClient
from replication.transfer import receive_chunk_into
from replication.wire import (
    ACK_SIZE,
    CHUNK_CONFIRM,
    Ack,
    AckDecoder,
    AckKind,
    HAProtocolError,
    pack_ack,
    pack_refusal,
    slave_handshake,
)
from storage import Message, MessageStore, StoreConfig
from tests.conftest import SMALL_SEGMENT

DEADLINE = 10.0
PATHS = pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "copy"])


def config_at(path: Path) -> StoreConfig:
    return StoreConfig(
        data_dir=path,
        segment_size=SMALL_SEGMENT,
        max_message_size=16 * 1024,
        consume_queue_entries=64,
        flush_interval_ms=50,
        flush_thorough_interval_ms=200,
        retention_check_interval_ms=3_600_000,
    )


def quiet_config(path: Path) -> StoreConfig:
    """No periodic flush within a test: every fsync counted there is group commit's."""
    return attrs.evolve(
        config_at(path), flush_interval_ms=3_600_000, flush_thorough_interval_ms=3_600_000
    )


def messages(count: int, seed: int) -> list[Message]:
    rng = random.Random(seed)
    return [
        Message.create(
            rng.choice(("orders", "audit")),
            rng.randbytes(rng.randrange(3001)),
            queue_id=rng.randrange(3),
            tags=f"t{i % 3}" if i % 2 else None,
        )
        for i in range(count)
    ]


async def fill(store: MessageStore, batch: list[Message]) -> None:
    """Batches of five and single puts, so both append paths produce what is streamed."""
    for start in range(0, len(batch), 7):
        await store.put_batch(batch[start : start + 5])
        for message in batch[start + 5 : start + 7]:
            await store.put(message)


def log_bytes(store: MessageStore) -> list[tuple[int, bytes]]:
    return [(seg.base, bytes(seg.view[: seg.wrote])) for seg in store.commit_log.files.segments]


def queue_records(store: MessageStore) -> dict[tuple[str, int], list[tuple[int, str, int, bytes]]]:
    out = {}
    for topic, queue_id in sorted(store.queues.queues):
        result = store.get_messages(topic, queue_id, 0, max_messages=10**6, max_bytes=1 << 40)
        out[topic, queue_id] = [
            (index, rec.topic, rec.queue_id, bytes(rec.body)) for index, rec in result.records
        ]
    return out


def assert_identical(master: MessageStore, slave: MessageStore) -> None:
    assert slave.commit_log.max_offset == master.commit_log.max_offset
    assert log_bytes(slave) == log_bytes(master)
    assert queue_records(slave) == queue_records(master)
    assert slave.commit_log.next_queue_offsets == master.commit_log.next_queue_offsets


@asynccontextmanager
async def serving(
    master: MessageStore, **kwargs: object
) -> AsyncIterator[tuple[HAService, int, trio.Nursery]]:
    history = kwargs.pop("history", None)
    settings = ReplicationSettings(**kwargs)  # type: ignore[arg-type]
    service = HAService(master, settings, history=history)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(service.serve, "127.0.0.1", 0)
        yield service, port, nursery
        nursery.cancel_scope.cancel()


async def replicated(service: HAService, offset: int) -> bool:
    return await service.wait_replicated(offset, trio.current_time() + DEADLINE)


@PATHS
async def test_empty_slave_catches_up_across_segments(tmp_path: Path, use_sendfile: bool) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(200, seed=1))
        end = master.commit_log.max_offset
        assert len(master.commit_log.files.segments) >= 4
        async with serving(master, use_sendfile=use_sendfile) as (service, port, nursery):
            client = HAClient(slave, "s1")
            nursery.start_soon(client.run, "127.0.0.1", port)
            assert await replicated(service, end)
            assert service.ack_offsets == {"s1": end}
            assert service.confirm_offset == end
            assert client.master_offset == end
            assert_identical(master, slave)


async def test_live_tailing_across_rollovers(tmp_path: Path) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(5, seed=2))
        async with serving(master) as (service, port, nursery):
            nursery.start_soon(HAClient(slave, "s1").run, "127.0.0.1", port)
            assert await replicated(service, master.commit_log.max_offset)  # connected
            segments_before = len(master.commit_log.files.segments)
            for round_ in range(12):
                await fill(master, messages(25, seed=100 + round_))
                assert await replicated(service, master.commit_log.max_offset)
            assert len(master.commit_log.files.segments) - segments_before >= 3
            assert service.ack_offsets == {"s1": master.commit_log.max_offset}
            assert_identical(master, slave)


async def test_slave_restart_resumes_from_its_own_end(tmp_path: Path) -> None:
    slave_config = config_at(tmp_path / "slave")
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await fill(master, messages(200, seed=3))
        end = master.commit_log.max_offset
        # Small chunks that do not line up with records: the slave stops holding a partial one.
        async with serving(master, max_chunk=5000) as (service, port, nursery):
            async with MessageStore.open(slave_config) as slave:
                stop = trio.CancelScope()
                original = slave.append_replicated

                async def append_then_stop(offset: int, data: bytes | memoryview) -> int:
                    result = await original(offset, data)
                    if slave.commit_log.received_offset >= end // 2:
                        stop.cancel()  # the client dies at its next checkpoint: the ack send
                    return result

                slave.append_replicated = append_then_stop  # type: ignore[method-assign]
                client = HAClient(slave, "s1", ReplicationSettings(max_chunk=5000))
                with stop:
                    await client.run("127.0.0.1", port)
                stopped_at = slave.commit_log.max_offset
                assert 0 < stopped_at < end
            async with MessageStore.open(slave_config) as slave:
                assert slave.commit_log.max_offset == stopped_at
                client = HAClient(slave, "s1", ReplicationSettings(max_chunk=5000))
                nursery.start_soon(client.run, "127.0.0.1", port)
                assert await replicated(service, end)
                assert service.ack_offsets == {"s1": end}
                assert_identical(master, slave)
                nursery.cancel_scope.cancel()


async def test_wait_replicated_times_out_without_slaves(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await fill(master, messages(10, seed=4))
        async with serving(master) as (service, _port, _nursery):
            deadline = trio.current_time() + 5
            assert not await service.wait_replicated(master.commit_log.max_offset, deadline)
            assert trio.current_time() >= deadline
            assert await service.wait_replicated(0, deadline)  # nothing to replicate
            assert service.ack_offsets == {}


def test_ack_decoder_handles_split_frames_and_rejects_garbage() -> None:
    stream = pack_ack(7) + pack_ack(1 << 40) + pack_refusal(9)
    decoder = AckDecoder()
    got = []
    for cut in range(0, len(stream), 5):
        got += decoder.feed(stream[cut : cut + 5])
    assert got == [Ack(AckKind.ACK, 7), Ack(AckKind.ACK, 1 << 40), Ack(AckKind.REFUSED, 9)]
    assert decoder.buffered == 0
    assert len(pack_ack(0)) == ACK_SIZE == 16
    with pytest.raises(HAProtocolError):
        AckDecoder().feed(b"\x00" * ACK_SIZE)


async def test_confirm_offset_is_the_slowest_connected_slave(tmp_path: Path) -> None:
    """A second, hand-driven slave holds the confirm offset back until it acks."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(40, seed=5))
        end = master.commit_log.max_offset
        async with serving(master) as (service, port, nursery):
            nursery.start_soon(HAClient(slave, "s1").run, "127.0.0.1", port)
            assert await replicated(service, end)
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                hello, _master_name = await slave_handshake(sock, "s2", 0)
                assert hello.stream_from == 0
                assert service.ack_offsets["s2"] == 0
                assert service.confirm_offset == end  # never moves back
                await fill(master, messages(40, seed=6))
                end2 = master.commit_log.max_offset
                buffer = memoryview(bytearray(MAX_CHUNK))
                received = 0
                while received < end2:
                    header = await receive_chunk_into(sock, buffer)
                    assert header is not None
                    if header.flags & CHUNK_CONFIRM:  # the master's confirm offset
                        assert header.length == 0 and header.offset <= end2
                        continue
                    assert header.offset == received
                    received += header.length
                await sock.send(pack_ack(end + 1))
                assert await replicated(service, end + 1)
                assert service.confirm_offset == end + 1
                assert not await service.wait_replicated(end2, trio.current_time() + 0.2)
                await sock.send(pack_ack(end2))
                assert await replicated(service, end2)
            assert_identical(master, slave)
