"""Consume queues: the dispatcher's entries, reads through them, and their rebuilds."""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import pytest

from storage import Message, MessageStore, OffsetOutOfRangeError, StoreConfig
from storage.checkpoint import load_checkpoint
from storage.consume_queue import ENTRY_SIZE, ConsumeQueue, QueueConflictError
from storage.mapped_file import segment_name
from storage.record import tags_hash

Key = tuple[str, int]
KEYS: list[Key] = [("orders", 0), ("orders", 1), ("payments", 0), ("audit.log", 7)]


def quiet(config: StoreConfig) -> StoreConfig:
    """No background flush: the test decides what the checkpoint says."""
    return attrs.evolve(config, flush_interval_ms=10**7, flush_thorough_interval_ms=10**7)


def message(i: int, key: Key | None = None, size: int = 300) -> Message:
    topic, queue_id = key if key is not None else KEYS[i % len(KEYS)]
    return Message.create(topic, bytes([i % 251]) * size, queue_id, tags=f"tag{i % 5}")


async def fill(store: MessageStore, count: int, start: int = 0) -> None:
    """``count`` records over KEYS, half as single puts and half in batches."""
    i = start
    while i < start + count:
        if i % 20 < 10:
            await store.put(message(i))
            i += 1
        else:
            n = min(5, start + count - i)
            await store.put_batch([message(j) for j in range(i, i + n)])
            i += n


def entries(store: MessageStore) -> dict[Key, tuple[int, int, list[tuple[int, int, int, int]]]]:
    """Every queue: (min, max, entries)."""
    return {
        key: (queue.min_offset, queue.max_offset, list(queue.entries(0, 1 << 30)))
        for key, queue in store.queues.queues.items()
    }


def queue_files(config: StoreConfig) -> dict[str, bytes]:
    root = config.consume_queue_dir
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def log_entries(store: MessageStore) -> dict[Key, list[tuple[int, int, int, int]]]:
    """What the queues should hold, computed from the log alone."""
    expected: dict[Key, list[tuple[int, int, int, int]]] = {}
    for record in store.commit_log.scan(store.commit_log.min_offset):
        expected.setdefault((record.topic, record.queue_id), []).append(
            (record.queue_offset, record.physical_offset, record.size, record.tags_hash)
        )
    return expected


# ---- the dispatcher ------------------------------------------------------------------


async def test_dispatcher_entries_match_the_log(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:
        await fill(store, 400)
        assert store.dispatcher.offset == store.commit_log.max_offset
        expected = log_entries(store)
        assert set(expected) == set(KEYS)
        for key, wanted in expected.items():
            queue = store.queues.get(*key)
            assert queue is not None
            assert (queue.min_offset, queue.max_offset) == (0, len(wanted))
            assert list(queue.entries(0, 1 << 30)) == wanted
            assert [q for q, *_ in wanted] == list(range(len(wanted)))
            assert len(queue.files.segments) >= 2  # 100 entries over files of 64
        some = expected[("orders", 1)][3]
        assert some[3] == tags_hash("tag" + str((4 * 3 + 1) % 5))


# ---- reads through a queue -----------------------------------------------------------


async def test_get_messages_limits(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:
        results = [await store.put(message(i, ("t", 0), 1_000)) for i in range(20)]
        size = results[0].size

        got = store.get_messages("t", 0, 0, max_messages=5)
        assert [index for index, _r in got.records] == [0, 1, 2, 3, 4]
        assert [r.physical_offset for _i, r in got.records] == [r.offset for r in results[:5]]
        assert (got.next_offset, got.min_offset, got.max_offset) == (5, 0, 20)

        got = store.get_messages("t", 0, 3, max_bytes=2 * size + size // 2)
        assert [index for index, _r in got.records] == [3, 4]
        assert got.next_offset == 5

        got = store.get_messages("t", 0, 3, max_bytes=2 * size)  # exactly two fit
        assert [index for index, _r in got.records] == [3, 4]

        got = store.get_messages("t", 0, 7, max_bytes=10)  # smaller than one record
        assert [index for index, _r in got.records] == [7]
        assert bytes(got.records[0][1].body) == message(7, ("t", 0), 1_000).body
        assert got.next_offset == 8

        got = store.get_messages("t", 0, 18, max_messages=5)
        assert [index for index, _r in got.records] == [18, 19]
        assert got.next_offset == 20

        got = store.get_messages("t", 0, 25)
        assert (got.records, got.next_offset) == ([], 25)

        got = store.get_messages("nobody", 0, 3)
        assert (got.records, got.next_offset, got.min_offset, got.max_offset) == ([], 3, 0, 0)


async def test_below_offset_hides_records_ending_past_it(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:
        results = [await store.put(message(i, ("t", 0))) for i in range(10)]

        got = store.get_messages("t", 0, 0, below_offset=results[5].end_offset)
        assert [index for index, _r in got.records] == [0, 1, 2, 3, 4, 5]
        assert got.next_offset == 6

        got = store.get_messages("t", 0, 0, below_offset=results[5].end_offset - 1)
        assert [index for index, _r in got.records] == [0, 1, 2, 3, 4]

        got = store.get_messages("t", 0, 2, below_offset=0)  # not even the first one
        assert (got.records, got.next_offset) == ([], 2)

        got = store.get_messages("t", 0, 0, below_offset=store.commit_log.max_offset)
        assert len(got.records) == 10


# ---- rebuilds ------------------------------------------------------------------------


async def test_deleted_consume_queue_directory_is_rebuilt_identically(
    store_config: StoreConfig,
) -> None:
    async with MessageStore.open(store_config) as store:
        await fill(store, 300)
        before = entries(store)
    files_before = queue_files(store_config)
    assert len(files_before) >= 8

    shutil.rmtree(store_config.consume_queue_dir)
    async with MessageStore.open(store_config) as store:
        assert store.recovery.clean_shutdown
        assert store.recovery.queues_rebuilt
        assert store.recovery.redispatched == 300
        assert entries(store) == before
        assert store.commit_log.next_queue_offsets == {k: v[1] for k, v in before.items()}
    assert queue_files(store_config) == files_before


async def test_one_deleted_queue_with_a_damaged_checkpoint_is_rebuilt(
    store_config: StoreConfig,
) -> None:
    async with MessageStore.open(store_config) as store:
        await fill(store, 200)
        before = entries(store)
    files_before = queue_files(store_config)
    shutil.rmtree(store_config.consume_queue_dir / "payments" / "0")
    store_config.checkpoint_path.write_bytes(b"\x00garbage, not a checkpoint")

    async with MessageStore.open(store_config) as store:
        assert not store.recovery.clean_shutdown
        assert store.recovery.queues_rebuilt
        assert store.recovery.scanned_from == 0
        assert entries(store) == before
        await store.put(message(0, ("payments", 0)))
        assert store.queue_offsets("payments", 0) == (0, before[("payments", 0)][1] + 1)
    assert set(queue_files(store_config)) == set(files_before)


async def test_one_deleted_queue_after_a_crash_is_rebuilt(store_config: StoreConfig) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await fill(store, 200)
        await store.flush_all()  # checkpoint: queues flushed up to here, not clean
        await fill(store, 40, start=200)  # the tail the queues must be checked against
        before = entries(store)
        store.abandon()
    checkpoint = load_checkpoint(config.checkpoint_path)
    assert checkpoint is not None and not checkpoint.clean
    shutil.rmtree(config.consume_queue_dir / "orders" / "1")

    async with MessageStore.open(config) as store:
        assert not store.recovery.clean_shutdown
        assert store.recovery.queues_rebuilt
        assert store.recovery.redispatched == 240
        assert entries(store) == before


async def test_crash_without_damage_redispatches_only_the_tail(store_config: StoreConfig) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await fill(store, 200)
        await store.flush_all()
        await fill(store, 40, start=200)
        before = entries(store)
        store.abandon()

    async with MessageStore.open(config) as store:
        assert not store.recovery.clean_shutdown
        assert not store.recovery.queues_rebuilt
        assert store.recovery.redispatched == 40
        assert entries(store) == before


async def test_queue_with_a_gap_is_rebuilt(store_config: StoreConfig) -> None:
    """A queue lost entries it had flushed (below the checkpoint): the re-dispatched tail
    then leaves a gap, which is a conflict, so every queue is rebuilt."""
    config = quiet(store_config)
    key = ("orders", 0)
    async with MessageStore.open(config) as store:
        await fill(store, 200)
        await store.flush_all()
        flushed_count = store.queue_offsets(*key)[1]
        await fill(store, 40, start=200)
        before = entries(store)
        store.abandon()
    assert before[key][1] > flushed_count

    per_file = config.consume_queue_entries * ENTRY_SIZE
    directory = config.consume_queue_dir / key[0] / str(key[1])
    for n in range(flushed_count - 3, before[key][1]):
        path = directory / segment_name(n * ENTRY_SIZE // per_file * per_file)
        with open(path, "r+b") as f:
            f.seek(n * ENTRY_SIZE % per_file)
            f.write(bytes(ENTRY_SIZE))

    async with MessageStore.open(config) as store:
        assert store.recovery.queues_rebuilt
        assert entries(store) == before


# ---- one queue on its own ------------------------------------------------------------


async def test_consume_queue_put_get_conflicts_and_reload(tmp_path: Path) -> None:
    queue = ConsumeQueue(tmp_path, "t", 0, entries_per_file=4)
    queue.load()
    assert queue.empty and queue.needs_file(0)

    for n in range(6):
        if queue.needs_file(n):
            await queue.add_file(n)
        assert queue.put(n, 1000 * n, 100 + n, n)
    assert (queue.min_offset, queue.max_offset) == (0, 6)
    assert len(queue.files.segments) == 2
    assert queue.get(5) == (5000, 105, 5)
    assert list(queue.entries(4, 10)) == [(4, 4000, 104, 4), (5, 5000, 105, 5)]

    assert queue.put(3, 3000, 103, 3) is False  # re-dispatch of an entry it has
    with pytest.raises(QueueConflictError, match="points elsewhere"):
        queue.put(3, 3001, 103, 3)
    with pytest.raises(QueueConflictError, match=r"queue holds \[0, 6\)"):
        queue.put(7, 7000, 107, 7)
    for bad in (-1, 6):
        with pytest.raises(OffsetOutOfRangeError):
            queue.get(bad)

    assert queue.truncate_from_log_offset(4500) == 1
    assert queue.max_offset == 5
    queue.files.close()

    again = ConsumeQueue(tmp_path, "t", 0, entries_per_file=4)
    again.load()
    assert (again.min_offset, again.max_offset) == (0, 5)
    assert again.get(4) == (4000, 104, 4)
    again.advance_min(2500)  # records below 2500 are gone from the log
    assert again.min_offset == 3
    assert [s.base for s in again.files.segments] == [0, 4 * ENTRY_SIZE]  # entry 3 is in file 0
    again.advance_min(4100)
    assert (again.min_offset, again.max_offset) == (5, 5)
    assert [s.base for s in again.files.segments] == [4 * ENTRY_SIZE]  # whole file dropped
    assert not (tmp_path / "t" / "0" / segment_name(0)).exists()
    again.files.close()


async def test_load_with_an_all_empty_first_file_starts_at_the_first_entry(
    tmp_path: Path,
) -> None:
    """Before: the queue reopened empty, at its last file's start."""
    queue = ConsumeQueue(tmp_path, "t", 0, entries_per_file=4)
    queue.load()
    for n in range(10):
        if queue.needs_file(n):
            await queue.add_file(n)
        queue.put(n, 1000 * n, 100 + n, n)
    first = queue.files.segments[0]
    first.view[:] = bytes(first.size)  # its entries never reached the disk
    queue.files.close()
    again = ConsumeQueue(tmp_path, "t", 0, entries_per_file=4)
    again.load()
    assert (again.min_offset, again.max_offset) == (4, 10)
    assert list(again.entries(0, 100))[:1] == [(4, 4000, 104, 4)]
    again.files.close()


async def test_a_rebuild_keeps_the_offsets_of_a_queue_retention_emptied(
    store_config: StoreConfig,
) -> None:
    """Before: the rebuilt queue restarted at 0, so consumer offsets went backwards."""
    config = quiet(store_config)
    gone, kept = ("gone", 0), ("kept", 0)
    async with MessageStore.open(config) as store:
        for i in range(12):
            await store.put(message(i, gone))
        for i in range(100):
            await store.put(message(i, kept, size=2000))
        first_kept = store.commit_log.files.segments[2].base
        gone_queue = store.queues.get(*gone)
        assert gone_queue is not None and gone_queue.get(11)[0] < first_kept  # all of it goes
        assert await store.delete_oldest_segments(2) == 2
        assert store.queue_offsets(*gone) == (12, 12)
    config.checkpoint_path.unlink()  # no checkpoint: the queues are rebuilt from the log
    async with MessageStore.open(config) as store:
        assert store.recovery.queues_rebuilt
        assert store.queue_offsets(*gone) == (12, 12)
        result = await store.put(message(99, gone))
        assert result.queue_offset == 12
    async with MessageStore.open(config) as store:  # and it stays so on the next start
        assert store.queue_offsets(*gone) == (12, 13)
        assert store.get_messages(*gone, 0).records[0][0] == 12


async def test_load_with_every_entry_lost_starts_again_at_the_first_file(tmp_path: Path) -> None:
    """A crash lost every entry of a queue spread over three files (none was past the
    checkpoint, so none was durable, and recovery cut their records from the log too).
    Before: the queue reopened empty at its last file's start, so its next record, the
    queue's first in the log, got queue offset 8; the store's state machine found it."""
    queue = ConsumeQueue(tmp_path, "t", 0, entries_per_file=4)
    queue.load()
    for n in range(10):
        if queue.needs_file(n):
            await queue.add_file(n)
        queue.put(n, 1000 * n, 100 + n, n)
    for segment in queue.files.segments:
        segment.view[:] = bytes(segment.size)
    queue.files.close()
    again = ConsumeQueue(tmp_path, "t", 0, entries_per_file=4)
    again.load()
    assert (again.min_offset, again.max_offset) == (0, 0)
    assert [s.base for s in again.files.segments] == [0]  # appends go to the last file
    if again.needs_file(0):
        await again.add_file(0)
    assert again.put(0, 500, 100, 7)
    assert list(again.entries(0, 100)) == [(0, 500, 100, 7)]
    again.files.close()
