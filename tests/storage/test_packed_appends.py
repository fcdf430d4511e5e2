"""Own appends of a page or more are packed aside and written with one ``pwrite`` (not
through the map): the map, a fresh open and recovery must read every byte of them, a
batch split by a roll-over must land whole in both segments, and a write that fails must
leave no record visible and fail the log."""

from __future__ import annotations

import errno
import os
import resource

import attrs
import pytest

import storage.commit_log as commit_log_module
from storage import Message, MessageStore, StorageFailedError, StoreConfig
from storage.commit_log import _PWRITE_MIN
from storage.record import BLANK_MIN, HEADER_SIZE, ScanStop, check_record, decode_properties


def body(i: int, size: int) -> bytes:
    """A body that names its record, padded to ``size`` bytes."""
    stamp = f"record-{i}:".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


def batch(first: int, count: int, size: int = 1024) -> list[Message]:
    return [
        Message.create("t", body(i, size), i % 3, tags=f"tag{i}", properties={"i": str(i)})
        for i in range(first, first + count)
    ]


def assert_holds(store: MessageStore, offsets: list[int], messages: list[Message]) -> None:
    """Every record reads back whole through the map, and the file (read with a fresh
    descriptor) holds the same bytes as the map."""
    for offset, message in zip(offsets, messages, strict=True):
        record = store.read(offset)
        assert (bytes(record.body), record.queue_id) == (message.body, message.queue_id)
        assert record.properties == decode_properties(message.properties)
        record.release()
    for segment in store.commit_log.files.segments:
        with open(segment.path, "rb") as file:
            assert file.read(segment.wrote) == bytes(segment.view[: segment.wrote])


def walk(store: MessageStore) -> list[int]:
    """Offsets of the visible records (below each segment's ``wrote``), by the recovery
    checks (fillers skipped)."""
    offsets = []
    for segment in store.commit_log.files.segments:
        pos = 0
        while pos < segment.wrote:
            try:
                size = check_record(segment.view, pos, segment.base, segment.size)
            except ScanStop:
                break
            if size < 0:
                break
            offsets.append(segment.base + pos)
            pos += size
    return offsets


async def test_a_packed_batch_and_record_read_back_before_and_after_reopening(
    store_config: StoreConfig,
) -> None:
    sent = batch(0, 40)
    big = Message.create("t", body(99, 3 * _PWRITE_MIN), 1)
    async with MessageStore.open(store_config) as store:
        small = await store.put(Message.create("t", b"through the map", 0))
        result = await store.put_batch(sent)
        single = await store.put(big)
        offsets = [small.offset, *result.offsets, single.offset]
        messages = [Message.create("t", b"through the map", 0), *sent, big]
        assert single.offset == result.end_offset
        assert store.commit_log.max_offset == single.end_offset
        assert walk(store) == offsets
        assert_holds(store, offsets, messages)
        end = store.commit_log.max_offset
    async with MessageStore.open(store_config) as store:  # recovery walks them again
        assert store.commit_log.max_offset == end
        assert walk(store) == offsets
        assert_holds(store, offsets, messages)


async def test_a_packed_batch_split_by_a_roll_over_lands_whole_in_both_segments(
    store_config: StoreConfig,
) -> None:
    """The first part (one record) fits before the segment's end, the rest goes to the
    next segment: each part is written on its own, the filler between them."""
    size = store_config.segment_size
    async with MessageStore.open(store_config) as store:
        record = HEADER_SIZE + len("t") + len(batch(0, 1)[0].properties) + 1024
        fill_to = size - BLANK_MIN - record - 500  # then one record of the batch fits
        filled = []
        while (left := fill_to - store.commit_log.max_offset) > 16_000:
            filled.append((await store.put(Message.create("t", body(-1, 15_000), 0))).offset)
        last = await store.put(Message.create("t", body(-2, left - HEADER_SIZE - 1), 0))
        filled.append(last.offset)
        assert last.end_offset == fill_to
        sent = batch(0, 20)
        result = await store.put_batch(sent)
        assert [offset // size for offset in result.offsets] == [0] + [1] * 19
        assert result.offsets[1] == size
        assert walk(store) == [*filled, *result.offsets]
        assert_holds(store, result.offsets, sent)
        end = store.commit_log.max_offset
    async with MessageStore.open(store_config) as store:
        assert store.commit_log.max_offset == end
        assert walk(store) == [*filled, *result.offsets]
        assert_holds(store, result.offsets, sent)


def no_preparing(store_config: StoreConfig) -> StoreConfig:
    """Segments of 4 MiB, none created ahead: no thread writes a file while a test
    holds the process's file size limit low."""
    return attrs.evolve(store_config, segment_size=4 << 20, preallocate=False)


async def test_a_failed_write_shows_no_record_and_fails_the_log(
    store_config: StoreConfig,
) -> None:
    """The segment's descriptor is made read-only under the log: the ``pwrite`` fails
    (EBADF); nothing of the batch is visible and the log takes no more writes."""
    config = no_preparing(store_config)
    async with MessageStore.open(config) as store:
        kept = await store.put_batch(batch(0, 8))
        segment = store.commit_log.files.segments[-1]
        read_only = os.open(segment.path, os.O_RDONLY)
        os.dup2(read_only, segment.fd)
        os.close(read_only)
        with pytest.raises(StorageFailedError, match="failed after 0") as failed:
            await store.put_batch(batch(8, 8))
        assert "these records are not stored" in str(failed.value)
        assert store.commit_log.max_offset == kept.end_offset
        assert store.commit_log.failure is not None
        with pytest.raises(StorageFailedError):
            await store.put(Message.create("t", b"small, through the map", 0))
        assert walk(store) == kept.offsets
    async with MessageStore.open(config) as store:
        assert store.commit_log.max_offset == kept.end_offset
        assert_holds(store, kept.offsets, batch(0, 8))


async def test_a_short_write_then_a_failure_shows_no_record_and_recovery_cuts_the_torn_one(
    store_config: StoreConfig,
) -> None:
    """The process's file size limit stops the ``pwrite`` inside the third record: the
    kernel writes up to it (a short write), the rest is refused (EFBIG). No record of the
    batch is visible; after a restart recovery keeps the two whole ones, as after a crash."""
    config = no_preparing(store_config)
    async with MessageStore.open(config) as store:
        kept = await store.put_batch(batch(0, 3000))  # ~3.2 MiB: file offsets far above
        sent = batch(3000, 8)
        start = kept.end_offset
        record = HEADER_SIZE + 1 + len(sent[0].properties) + 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (start + 2 * record + 100, hard))
        try:
            with pytest.raises(StorageFailedError, match=f"failed after {2 * record + 100}"):
                await store.put_batch(sent)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert store.commit_log.max_offset == start
        assert walk(store)[-1] == kept.offsets[-1]
        with pytest.raises(StorageFailedError):
            await store.put_batch(batch(0, 8))
    async with MessageStore.open(config) as store:
        assert store.commit_log.max_offset == start + 2 * record
        offsets = [*kept.offsets, start, start + record]
        assert walk(store) == offsets
        assert_holds(store, offsets, [*batch(0, 3000), *sent[:2]])


async def test_a_batch_whose_write_after_a_roll_over_fails_shows_none_of_its_records(
    store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All or nothing across a roll-over: the part before the segment's end is written,
    the part after it fails (EIO from the disk, injected at the ``pwrite``). The first
    part was briefly visible when the roll activated the next segment; it must be hidden
    again, so no consumer, flush or slave ever reads part of a failed batch."""
    size = store_config.segment_size
    async with MessageStore.open(store_config) as store:
        record = HEADER_SIZE + len("t") + len(batch(0, 1)[0].properties) + 1024
        fill_to = size - BLANK_MIN - 5 * record - 500  # five records of the batch fit
        filled = []
        while (left := fill_to - store.commit_log.max_offset) > 16_000:
            filled.append((await store.put(Message.create("t", body(-1, 15_000), 0))).offset)
        filled.append(
            (await store.put(Message.create("t", body(-2, left - HEADER_SIZE - 1), 0))).offset
        )
        before = store.commit_log.max_offset
        segments = len(store.commit_log.files.segments)
        real_pwrite = commit_log_module._pwrite
        calls: list[int] = []

        def pwrite_failing_after_the_roll(fd: int, data: memoryview, pos: int) -> int:
            calls.append(pos)
            if len(calls) == 2:  # the part in the next segment
                raise OSError(errno.EIO, "Input/output error")
            return real_pwrite(fd, data, pos)

        monkeypatch.setattr(commit_log_module, "_pwrite", pwrite_failing_after_the_roll)
        with pytest.raises(StorageFailedError, match="failed after 0"):
            await store.put_batch(batch(0, 20))
        assert calls[1] == 0, "the second write is the next segment's first part"
        assert store.commit_log.max_offset == before
        assert len(store.commit_log.files.segments) == segments
        assert walk(store) == filled
        with pytest.raises(StorageFailedError):
            await store.put(Message.create("t", b"after the failure", 0))
