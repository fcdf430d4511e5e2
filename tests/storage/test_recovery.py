"""Recovery: clean restarts, crashes, torn and corrupt tails, lost checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from storage import Message, MessageStore, OffsetOutOfRangeError, StoreConfig
from storage.checkpoint import Checkpoint, load_checkpoint
from storage.commit_log import AppendResult, _pack_record
from storage.mapped_file import PAGE_SIZE, MappedFile, segment_name
from storage.mapped_file_queue import MappedFileQueue
from storage.record import record_size, write_blank
from storage.recovery import LogEnd, find_log_end

Key = tuple[str, int]


def quiet(config: StoreConfig, **changes: Any) -> StoreConfig:
    """No background flush (the test decides what is flushed) and any other changes."""
    return attrs.evolve(
        config, flush_interval_ms=10**7, flush_thorough_interval_ms=10**7, **changes
    )


def message(i: int) -> Message:
    return Message.create("t" if i % 3 else "u", f"body {i} ".encode() * 300, i % 2, tags=f"x{i}")


async def put_many(store: MessageStore, count: int, start: int = 0) -> list[AppendResult]:
    return [await store.put(message(i)) for i in range(start, start + count)]


def contents(store: MessageStore) -> list[tuple[int, str, int, int, bytes]]:
    return [
        (r.physical_offset, r.topic, r.queue_id, r.queue_offset, bytes(r.body))
        for r in store.commit_log.scan(store.commit_log.min_offset)
    ]


def segment_path(config: StoreConfig, offset: int) -> Path:
    size = config.segment_size
    return config.commit_log_dir / segment_name(offset // size * size)


def damage(config: StoreConfig, offset: int, garbage: bytes = b"\xee" * 16) -> None:
    """Overwrite bytes of the log at ``offset`` in its segment file, as a bad disk would."""
    with open(segment_path(config, offset), "r+b") as f:
        f.seek(offset % config.segment_size)
        f.write(garbage)


def assert_queues_agree_with_the_log(store: MessageStore) -> None:
    """Every entry points at its record, no entry points past the end, none is missing."""
    end = store.commit_log.max_offset
    expected: dict[Key, list[tuple[int, int, int, int]]] = {}
    for record in store.commit_log.scan(store.commit_log.min_offset):
        expected.setdefault((record.topic, record.queue_id), []).append(
            (record.queue_offset, record.physical_offset, record.size, record.tags_hash)
        )
    for key, queue in store.queues.queues.items():
        got = list(queue.entries(queue.min_offset, 1 << 30))
        assert all(offset + size <= end for _q, offset, size, _t in got), key
        assert got == expected.get(key, []), key
        assert store.commit_log.next_queue_offsets.get(key, 0) == queue.max_offset
    assert set(expected) <= set(store.queues.queues)


# ---- clean restarts and crashes -----------------------------------------------------


async def test_clean_shutdown_then_reopen(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:
        results = await put_many(store, 60)
        before = contents(store)
    checkpoint = load_checkpoint(store_config.checkpoint_path)
    end = results[-1].end_offset
    assert checkpoint is not None and checkpoint.clean
    assert checkpoint.commit_log_flushed == checkpoint.consume_queue_flushed == end

    async with MessageStore.open(store_config) as store:
        report = store.recovery
        assert report.clean_shutdown
        assert (report.scanned_from, report.log_end) == (end, end)
        assert not report.durable_lost and not report.queues_rebuilt
        assert report.redispatched == 0
        in_last = sum(
            1
            for r in results
            if r.offset >= end // store_config.segment_size * store_config.segment_size
        )
        assert report.records_checked == in_last < len(results)  # only the last segment
        assert contents(store) == before
        assert_queues_agree_with_the_log(store)
        checkpoint = load_checkpoint(store_config.checkpoint_path)
        assert checkpoint is not None and not checkpoint.clean  # open: "not clean" again


async def test_crash_copy_keeps_everything_flushed(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    config = quiet(store_config, preallocate=False)  # no segment creation during the copy
    crash = attrs.evolve(config, data_dir=tmp_path / "crashed")
    async with MessageStore.open(config) as store:
        flushed = await put_many(store, 50)
        await store.flush_all()
        before = contents(store)
        unflushed = await put_many(store, 5, start=50)
        shutil.copytree(config.data_dir, crash.data_dir)  # the disk as a crash leaves it
        copied = load_checkpoint(crash.checkpoint_path)
        assert copied is not None and not copied.clean
        assert copied.commit_log_flushed == flushed[-1].end_offset

    async with MessageStore.open(crash) as store:
        report = store.recovery
        assert not report.clean_shutdown
        assert not report.durable_lost
        assert report.scanned_from == flushed[-1].end_offset
        assert report.log_end >= flushed[-1].end_offset
        assert contents(store)[: len(before)] == before
        # The page cache survives a process crash: the unflushed records are there too.
        assert report.log_end == unflushed[-1].end_offset
        assert_queues_agree_with_the_log(store)
        result = await store.put(message(99))
        assert result.offset == report.log_end


async def test_abandoned_store_recovers_and_redispatches_the_tail(
    store_config: StoreConfig,
) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await put_many(store, 40)
        await store.flush_all()
        tail = await put_many(store, 10, start=40)
        before = contents(store)
        store.abandon()

    async with MessageStore.open(config) as store:
        report = store.recovery
        assert not report.clean_shutdown
        assert report.log_end == tail[-1].end_offset
        assert report.redispatched == 10
        assert not report.queues_rebuilt
        assert contents(store) == before
        assert_queues_agree_with_the_log(store)


# ---- damaged tails ------------------------------------------------------------------


async def test_garbage_in_the_last_segment_cuts_the_log_at_the_damaged_record(
    store_config: StoreConfig,
) -> None:
    size = store_config.segment_size
    async with MessageStore.open(store_config) as store:
        results = await put_many(store, 60)
        before = contents(store)
    last_base = results[-1].offset // size * size
    in_last = [i for i, r in enumerate(results) if r.offset >= last_base]
    assert len(in_last) >= 4
    k = in_last[len(in_last) // 2]
    victim = results[k]
    damage(store_config, victim.offset + victim.size // 2)

    async with MessageStore.open(store_config) as store:
        report = store.recovery
        assert report.log_end == victim.offset
        assert report.stop_reason == "CRC mismatch (torn or corrupt record)"
        assert report.durable_lost  # the checkpoint said all of it was on disk
        assert store.commit_log.max_offset == victim.offset
        assert contents(store) == before[:k]
        for gone in results[k:]:
            with pytest.raises(OffsetOutOfRangeError):
                store.read(gone.offset)

        on_disk = segment_path(store_config, victim.offset).read_bytes()
        assert on_disk[victim.offset - last_base :] == bytes(size - (victim.offset - last_base))
        assert on_disk[: victim.offset - last_base] != bytes(victim.offset - last_base)

        assert_queues_agree_with_the_log(store)
        for key in [("t", 0), ("t", 1), ("u", 0), ("u", 1)]:
            kept = [
                r
                for i, r in enumerate(results[:k])
                if (message(i).topic, message(i).queue_id) == key
            ]
            assert store.queue_offsets(*key) == (0, len(kept))

        new = await store.put(message(k))
        assert new.offset == victim.offset
        assert new.queue_offset == results[k].queue_offset  # the lost one's number again
        got = store.get_messages(message(k).topic, message(k).queue_id, new.queue_offset)
        assert [(i, r.physical_offset) for i, r in got.records] == [(new.queue_offset, new.offset)]

    async with MessageStore.open(store_config) as store:
        assert store.recovery.clean_shutdown and not store.recovery.durable_lost
        assert store.commit_log.max_offset == new.end_offset
        assert contents(store)[:k] == before[:k]


async def test_damage_in_an_earlier_segment_with_a_garbage_checkpoint(
    store_config: StoreConfig,
) -> None:
    """No usable checkpoint: the scan starts at the first segment, finds the damage there,
    and everything after it goes, later segments included."""
    size = store_config.segment_size
    async with MessageStore.open(store_config) as store:
        results = await put_many(store, 60)
        before = contents(store)
    victim_index = next(i for i, r in enumerate(results) if r.offset > size + 1000)
    victim = results[victim_index]
    assert results[-1].offset >= 2 * size  # there are segments after the victim's
    damage(store_config, victim.offset + 3, b"\x00\x00\x00")  # torn magic
    store_config.checkpoint_path.write_bytes(os.urandom(40))

    async with MessageStore.open(store_config) as store:
        report = store.recovery
        assert not report.clean_shutdown
        assert report.scanned_from == 0
        assert report.records_checked == victim_index
        assert report.log_end == victim.offset
        assert "bad magic" in report.stop_reason
        assert report.queues_rebuilt
        assert not report.durable_lost  # without a checkpoint nothing was known durable
        assert contents(store) == before[:victim_index]
        assert [s.base for s in store.commit_log.files.segments] == [0, size]
        for path in store_config.commit_log_dir.iterdir():  # at most a new, empty segment
            if path.suffix == ".tmp":
                continue  # the allocator is creating it right now (renamed when complete)
            if int(path.name) >= 2 * size:
                assert path.read_bytes().strip(b"\0") == b""
        assert_queues_agree_with_the_log(store)


@pytest.mark.parametrize("checkpoint", ["garbage", "missing", "truncated"])
async def test_unusable_checkpoint_means_a_full_scan(
    store_config: StoreConfig, checkpoint: str
) -> None:
    async with MessageStore.open(store_config) as store:
        results = await put_many(store, 50)
        before = contents(store)
    path = store_config.checkpoint_path
    if checkpoint == "garbage":
        path.write_bytes(b"\xff" * 40)
    elif checkpoint == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:20])
    assert load_checkpoint(path) is None

    async with MessageStore.open(store_config) as store:
        report = store.recovery
        assert not report.clean_shutdown
        assert report.scanned_from == 0
        assert report.records_checked == len(results)
        assert report.log_end == results[-1].end_offset
        assert report.queues_rebuilt and report.redispatched == len(results)
        assert not report.durable_lost
        assert contents(store) == before
        assert_queues_agree_with_the_log(store)


async def test_checkpoint_with_a_bad_crc_is_ignored(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:
        await put_many(store, 5)
    raw = bytearray(store_config.checkpoint_path.read_bytes())
    assert Checkpoint.decode(bytes(raw)) is not None
    raw[10] ^= 1  # inside commit_log_flushed
    assert Checkpoint.decode(bytes(raw)) is None


async def test_damage_past_the_checkpoint_is_not_a_durability_loss(
    store_config: StoreConfig,
) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        flushed = await put_many(store, 30)
        await store.flush_all()
        tail = await put_many(store, 8, start=30)
        before = contents(store)
        store.abandon()
    victim = tail[3]
    damage(config, victim.offset + victim.size - 1, b"\x01")  # last byte: torn write

    async with MessageStore.open(config) as store:
        report = store.recovery
        assert report.log_end == victim.offset
        assert report.scanned_from == flushed[-1].end_offset
        assert not report.durable_lost
        assert contents(store) == before[: 30 + 3]
        assert_queues_agree_with_the_log(store)


async def test_damage_below_the_checkpoint_is_a_durability_loss(
    store_config: StoreConfig,
) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        flushed = await put_many(store, 30)
        await store.flush_all()
        await put_many(store, 8, start=30)
        store.abandon()
    checkpoint = load_checkpoint(config.checkpoint_path)
    assert checkpoint is not None
    victim = flushed[-2]  # in the segment the scan starts with, below the flushed offset
    assert (
        victim.offset // config.segment_size == checkpoint.commit_log_flushed // config.segment_size
    )
    damage(config, victim.offset + 80)

    async with MessageStore.open(config) as store:
        assert store.recovery.durable_lost
        assert store.recovery.log_end == victim.offset < checkpoint.commit_log_flushed
        assert_queues_agree_with_the_log(store)


async def test_concurrent_flush_all_calls_leave_one_valid_checkpoint(
    store_config: StoreConfig,
) -> None:
    """The async flusher's flush_all can overlap the shutdown's: both write the checkpoint
    through the same temporary file, which must not make either fail."""
    async with MessageStore.open(quiet(store_config)) as store:
        await put_many(store, 5)
        for round_ in range(10):
            await store.put(message(round_))
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(store.flush_all)
            checkpoint = load_checkpoint(store_config.checkpoint_path)
            assert checkpoint is not None and not checkpoint.clean
            assert checkpoint.commit_log_flushed == store.commit_log.max_offset
        assert not store_config.checkpoint_path.with_suffix(".tmp").exists()
    checkpoint = load_checkpoint(store_config.checkpoint_path)
    assert checkpoint is not None and checkpoint.clean


# ---- find_log_end on hand-built segments ----------------------------------------------

SEG = 2 * PAGE_SIZE


def build(directory: Path, count: int) -> MappedFileQueue:
    for i in range(count):
        MappedFile.create(directory, i * SEG, SEG, warm=False).close()
    files = MappedFileQueue(directory, SEG)
    files.load()
    return files


def put(segment: MappedFile, pos: int, body: bytes) -> int:
    """Pack one record at ``pos``; return the position after it."""
    size = record_size(1, 0, len(body))
    _pack_record(segment.view, pos, size, segment.base + pos, Message("t", body), b"t", 0, 1)
    return pos + size


def fill_segment(segment: MappedFile, bodies: int, *, filler: bool) -> int:
    pos = 0
    for i in range(bodies):
        pos = put(segment, pos, bytes([i + 1]) * 1000)
    if filler:
        write_blank(segment.view, pos, SEG - pos)
    return pos


def test_find_log_end_of_an_empty_log(tmp_path: Path) -> None:
    files = build(tmp_path, 0)
    assert find_log_end(files, 0) == LogEnd(0, "empty log", 0)


def test_find_log_end_within_one_segment(tmp_path: Path) -> None:
    files = build(tmp_path, 1)
    end = fill_segment(files.segments[0], 3, filler=False)
    try:
        assert find_log_end(files, 0) == LogEnd(end, "end of data", 3)
        assert files.segments[0].wrote == end
        assert files.max_offset == end
    finally:
        files.close()


def test_find_log_end_continues_after_a_filler(tmp_path: Path) -> None:
    files = build(tmp_path, 3)
    try:
        fill_segment(files.segments[0], 6, filler=True)
        end = fill_segment(files.segments[1], 2, filler=False)
        found = find_log_end(files, 0)
        assert found == LogEnd(SEG + end, "end of data", 8)
        assert (files.segments[0].wrote, files.segments[0].flushed) == (SEG, SEG)
        assert files.segments[1].wrote == end
        assert files.segments[2].wrote == 0
    finally:
        files.close()


def test_find_log_end_when_every_segment_is_full(tmp_path: Path) -> None:
    files = build(tmp_path, 2)
    try:
        for segment in files.segments:
            fill_segment(segment, 7, filler=True)
        assert find_log_end(files, 0) == LogEnd(2 * SEG, "end of the last segment", 14)
    finally:
        files.close()


def test_find_log_end_starts_at_the_segment_holding_start(tmp_path: Path) -> None:
    files = build(tmp_path, 2)
    try:
        fill_segment(files.segments[0], 6, filler=True)
        files.segments[0].view[100:108] = b"garbage!"  # below the start: not looked at
        end = fill_segment(files.segments[1], 4, filler=False)
        assert find_log_end(files, SEG + 50) == LogEnd(SEG + end, "end of data", 4)
        # Not scanned (the garbage above did not stop it), but known to be whole.
        assert files.segments[0].wrote == SEG
        far = find_log_end(files, 100 * SEG)  # a start past the end: the last segment
        assert far == LogEnd(SEG + end, "end of data", 4)
    finally:
        files.close()


def test_find_log_end_stops_at_a_torn_record_before_later_segments(tmp_path: Path) -> None:
    files = build(tmp_path, 2)
    try:
        fill_segment(files.segments[0], 6, filler=True)
        fill_segment(files.segments[1], 3, filler=False)
        third = put(
            files.segments[0], put(files.segments[0], 0, bytes([1]) * 1000), bytes([2]) * 1000
        )
        files.segments[0].view[third - 10] ^= 0xFF  # inside the second record
        found = find_log_end(files, 0)
        second = record_size(1, 0, 1000)
        assert found == LogEnd(second, "CRC mismatch (torn or corrupt record)", 1)
        assert files.segments[0].wrote == second
    finally:
        files.close()


def test_find_log_end_stops_at_a_filler_that_does_not_end_the_segment(tmp_path: Path) -> None:
    files = build(tmp_path, 2)
    try:
        pos = fill_segment(files.segments[0], 2, filler=False)
        write_blank(files.segments[0].view, pos, 64)
        fill_segment(files.segments[1], 2, filler=False)
        found = find_log_end(files, 0)
        assert found.offset == pos
        assert found.reason == "filler of 64 bytes does not end the segment"
        assert found.records_checked == 2
    finally:
        files.close()
