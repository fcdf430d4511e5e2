"""A queue that starts partway into its first file keeps its start through cuts, restarts,
rebuilds and crashes: no queue offset a consumer has read is ever given to a new record.

Such a queue's first record in the log has queue offset Q above its file's start because
the earlier ones went with retention: the queues were rebuilt from the log, or a slave
resynced from the master's log start. From the files alone it looks like a queue whose
first entries a crash lost (which restarts at its file's start), so the start is written
down: a start marker entry at Q-1, pointing below the log (docs/format.md).

Before the marker, a truncation that cut all of such a queue's records restarted it at
its file's start, and its next record got an offset consumers had read (both routes, the
slave's resync and the rebuild, failed: tests marked "fails on the old code").
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from storage import Message, MessageStore, StoreConfig
from storage.checkpoint import load_checkpoint
from storage.consume_queue import ENTRY, ENTRY_SIZE, START_MARKER, ConsumeQueue
from storage.mapped_file import segment_name
from tests.storage.test_consume_queue import quiet

A = ("a", 0)
FILLER = ("b", 0)
ENTRIES_PER_FILE = 4
"""Queue a's records 5 and 6 are in its second file (entries 4..7): 5 is partway in."""


def message(i: int, key: tuple[str, int], size: int = 300) -> Message:
    return Message.create(key[0], bytes([i % 251]) * size, key[1])


def small_queue_files(store_config: StoreConfig) -> StoreConfig:
    return attrs.evolve(quiet(store_config), consume_queue_entries=ENTRIES_PER_FILE)


async def _master_with_a_from_5(store: MessageStore) -> int:
    """Queue a: records 0..4 in the first segment, 5 and 6 two segments later; the first
    segment then goes with retention. Returns the log offset of a's record 5."""
    for i in range(5):
        await store.put(message(i, A))
    while len(store.commit_log.files.segments) < 3:
        await store.put(message(0, FILLER, size=2000))
    fifth = await store.put(message(5, A))
    await store.put(message(6, A))
    assert await store.delete_oldest_segments(1) == 1
    assert store.queue_offsets(*A) == (5, 7)
    return fifth.offset


async def _resync(master: MessageStore, slave: MessageStore) -> None:
    """The slave's full resync: its log restarts at the master's start, then receives it."""
    await slave.restart_log_at(master.commit_log.min_offset)
    for segment in master.commit_log.files.segments:  # one segment per chunk
        await slave.append_replicated(segment.base, bytes(segment.view[: segment.wrote]))


def _a_file(config: StoreConfig) -> Path:
    """Queue a's file holding entries 4..7."""
    base = ENTRIES_PER_FILE * ENTRY_SIZE
    return config.consume_queue_dir / A[0] / str(A[1]) / segment_name(base)


def _entry(config: StoreConfig, queue_offset: int) -> tuple[int, int, int]:
    raw = _a_file(config).read_bytes()
    return ENTRY.unpack_from(raw, (queue_offset - ENTRIES_PER_FILE) * ENTRY_SIZE)


async def test_a_slave_resynced_past_retention_then_cut_reuses_no_queue_offset(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    """The realistic route: a slave resyncs from the master's log start (its queues are
    rebuilt from what it receives: a starts at 5, mid-file), then a failover cuts its
    divergent tail, all of a's records with it. The next record of a must get 5 or more:
    offsets 0..4 were a's records 0..4, which consumers have read. Fails on the old code
    ((4, 4), then offset 4)."""
    config = small_queue_files(store_config)
    slave_config = attrs.evolve(config, data_dir=tmp_path / "slave")
    async with MessageStore.open(config) as master, MessageStore.open(slave_config) as slave:
        fifth = await _master_with_a_from_5(master)
        await _resync(master, slave)
        assert slave.queue_offsets(*A) == (5, 7)
        await slave.truncate(fifth)  # the divergent tail: a's records 5 and 6
        assert slave.queue_offsets(*A) == (5, 5)
        assert (await slave.put(message(7, A))).queue_offset == 5


async def test_a_rebuilt_queue_then_cut_reuses_no_queue_offset(store_config: StoreConfig) -> None:
    """The same on one node: no checkpoint, so the queues are rebuilt from the log (a starts
    at 5), then the log is cut before a's records. Fails on the old code (offset 4)."""
    config = small_queue_files(store_config)
    async with MessageStore.open(config) as store:
        fifth = await _master_with_a_from_5(store)
    config.checkpoint_path.unlink()
    async with MessageStore.open(config) as store:
        assert store.recovery.queues_rebuilt and store.queue_offsets(*A) == (5, 7)
        await store.truncate(fifth)
        assert (await store.put(message(7, A))).queue_offset == 5


async def test_readers_see_the_queue_start_at_q_and_restarts_keep_it_there(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    """The marker is below the queue's start for everyone: status, reads and restarts with
    and without a checkpoint, before and after a cut of all the queue's records."""
    config = small_queue_files(store_config)
    slave_config = attrs.evolve(config, data_dir=tmp_path / "slave")
    async with MessageStore.open(config) as master, MessageStore.open(slave_config) as slave:
        fifth = await _master_with_a_from_5(master)
        await _resync(master, slave)
        assert _entry(slave_config, 4) == START_MARKER
        page = slave.get_messages(*A, 0)
        assert (page.min_offset, page.max_offset) == (5, 7)
        assert [queue_offset for queue_offset, _ in page.records] == [5, 6]
        for _, record in page.records:
            record.release()
    async with MessageStore.open(slave_config) as slave:  # a clean restart, with checkpoint
        assert not slave.recovery.queues_rebuilt
        assert slave.queue_offsets(*A) == (5, 7)
        await slave.truncate(fifth)
    async with MessageStore.open(slave_config) as slave:
        assert slave.queue_offsets(*A) == (5, 5)
    slave_config.checkpoint_path.unlink()  # a rebuild: only the marker says where a stands
    async with MessageStore.open(slave_config) as slave:
        assert slave.recovery.queues_rebuilt
        assert slave.queue_offsets(*A) == (5, 5)
        assert (await slave.put(message(7, A))).queue_offset == 5
    async with MessageStore.open(slave_config) as slave:
        assert slave.queue_offsets(*A) == (5, 6)


@pytest.mark.parametrize("lost", ["marker", "entries", "marker and entries"])
async def test_a_crash_losing_the_marker_or_the_entries_keeps_the_start(
    store_config: StoreConfig, tmp_path: Path, lost: str
) -> None:
    """The marker and the first entry are written together but reach the disk in any
    order: a power loss may keep either. Neither was durable (past the checkpoint), so
    recovery re-dispatches the queue's records from the log and writes what was lost."""
    config = small_queue_files(store_config)
    slave_config = attrs.evolve(config, data_dir=tmp_path / "slave")
    async with MessageStore.open(config) as master, MessageStore.open(slave_config) as slave:
        fifth = await _master_with_a_from_5(master)
        await _resync(master, slave)
        slave.abandon()  # a crash: nothing flushed since the resync
    checkpoint = load_checkpoint(slave_config.checkpoint_path)
    assert checkpoint is not None and checkpoint.consume_queue_flushed < fifth
    raw = bytearray(_a_file(slave_config).read_bytes())
    if "marker" in lost:
        raw[:ENTRY_SIZE] = bytes(ENTRY_SIZE)  # entry 4
    if "entries" in lost:
        raw[ENTRY_SIZE : 3 * ENTRY_SIZE] = bytes(2 * ENTRY_SIZE)  # entries 5 and 6
    _a_file(slave_config).write_bytes(bytes(raw))
    async with MessageStore.open(slave_config) as slave:
        assert slave.queue_offsets(*A) == (5, 7)
        assert _entry(slave_config, 4) == START_MARKER
        await slave.truncate(fifth)
        assert (await slave.put(message(7, A))).queue_offset == 5


async def test_start_markers_are_on_disk_before_a_cut_intent(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    """Once a cut's intent is on disk, a crash finishes the cut at the next start: the
    records that re-dispatch would write the marker from are gone, so the marker (every
    queue entry written so far) must be on disk first. Fails on the old code (entries
    written since the resync were still dirty)."""
    config = small_queue_files(store_config)
    slave_config = attrs.evolve(config, data_dir=tmp_path / "slave")
    dirty_at_intent: list[int] = []
    async with MessageStore.open(config) as master, MessageStore.open(slave_config) as slave:
        fifth = await _master_with_a_from_5(master)
        await _resync(master, slave)
        assert slave.queues.dirty_segments()

        def at_step(step: str) -> None:
            if step == "intent_saved":
                dirty_at_intent.append(len(slave.queues.dirty_segments()))

        slave.after_cut_step = at_step
        await slave.truncate(fifth)
    assert dirty_at_intent == [0]


async def test_retention_taking_the_markers_file_keeps_the_start(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    """Retention deletes a queue file once its entries are all below the queue's start,
    the marker's file too: the entries kept before the new start then say where it is."""
    config = small_queue_files(store_config)
    slave_config = attrs.evolve(config, data_dir=tmp_path / "slave")
    async with MessageStore.open(config) as master, MessageStore.open(slave_config) as slave:
        await _master_with_a_from_5(master)
        await _resync(master, slave)
        for i in range(7, 9):  # a's file of entries 4..7 is full
            await slave.put(message(i, A))
        segments = len(slave.commit_log.files.segments)
        while len(slave.commit_log.files.segments) == segments:
            await slave.put(message(0, FILLER, size=2000))
        ninth = await slave.put(message(9, A))  # in the last segment, which stays
        await slave.put(message(10, A))
        assert await slave.delete_oldest_segments(segments) == segments  # a's 5..8 go
        assert slave.queue_offsets(*A) == (9, 11)
        assert not _a_file(slave_config).exists()  # the marker's file went
        await slave.truncate(ninth.offset)
        assert slave.queue_offsets(*A) == (9, 9)
        assert (await slave.put(message(11, A))).queue_offset == 9


# ---- one queue on its own ------------------------------------------------------------


LOG_START = 64 * 1024


def _queue(tmp_path: Path, log_start: int = LOG_START) -> ConsumeQueue:
    queue = ConsumeQueue(tmp_path, "t", 0, ENTRIES_PER_FILE, lambda: log_start)
    queue.load()
    return queue


async def _start(queue: ConsumeQueue, queue_offset: int, log_offset: int) -> None:
    await queue.add_file(queue_offset)
    assert queue.put(queue_offset, log_offset, 100, 0)


@pytest.mark.parametrize(
    ("queue_offset", "log_offset", "log_start", "marker_at"),
    [
        (5, LOG_START, LOG_START, 4),  # partway into its file: the marker before it
        (4, LOG_START, LOG_START, None),  # at its file's start: nothing to say
        (5, LOG_START - 200, LOG_START, None),  # a retired queue's entry: its own marker
        (5, 0, 0, None),  # a log from 0 holds every record: no room below it
    ],
)
async def test_a_queue_gets_a_start_marker_only_partway_into_its_file(
    tmp_path: Path, queue_offset: int, log_offset: int, log_start: int, marker_at: int | None
) -> None:
    queue = _queue(tmp_path, log_start)
    await _start(queue, queue_offset, log_offset)
    assert (queue.min_offset, queue.max_offset) == (queue_offset, queue_offset + 1)
    entries = [ENTRY.unpack_from(queue.files.segments[0].view, n * ENTRY_SIZE) for n in range(4)]
    written = {4 + n: entry for n, entry in enumerate(entries) if entry[1]}
    expected = {queue_offset: (log_offset, 100, 0)}
    if marker_at is not None:
        expected[marker_at] = START_MARKER
    assert written == expected
    queue.files.close()


async def test_a_queue_cut_to_its_marker_reloads_at_its_start(tmp_path: Path) -> None:
    """load() sees the marker as an entry; the log's start moves the queue past it."""
    queue = _queue(tmp_path)
    await _start(queue, 5, LOG_START)
    assert queue.truncate_from_log_offset(LOG_START) == 1
    assert (queue.min_offset, queue.max_offset) == (5, 5)
    queue.files.close()
    again = _queue(tmp_path)
    assert (again.min_offset, again.max_offset) == (4, 5)
    again.advance_min(LOG_START)
    assert (again.min_offset, again.max_offset) == (5, 5)
    again.files.close()
