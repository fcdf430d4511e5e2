"""Replicated (raw) appends: a slave copies the master's segment bytes in arbitrary chunks
and ends up with the same log, the same consume queues and the same next queue offsets;
it never exposes a partial or corrupt record, and refuses chunks that do not fit."""

from __future__ import annotations

import functools
import itertools
import random
import tempfile
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from storage import (
    CorruptSegmentError,
    Message,
    MessageStore,
    OffsetOutOfRangeError,
    StoreConfig,
)
from storage.record import BLANK_MIN, HEADER_SIZE, ScanStop, check_record
from tests.conftest import SMALL_SEGMENT

Key = tuple[str, int]
QueueEntries = dict[Key, list[tuple[int, int, int, int]]]


def config_at(path: Path, *, consume_queue_entries: int = 64) -> StoreConfig:
    """Small segments (fillers every few dozen records), no background flush."""
    return StoreConfig(
        data_dir=path,
        segment_size=SMALL_SEGMENT,
        max_message_size=16 * 1024,
        consume_queue_entries=consume_queue_entries,
        flush_interval_ms=10**7,
        flush_thorough_interval_ms=10**7,
        retention_check_interval_ms=10**7,
    )


@attrs.frozen
class Snapshot:
    """What must be equal on master and slave."""

    segments: list[tuple[int, bytes]]
    """(base, every byte of the segment file)."""
    queues: QueueEntries
    next_queue_offsets: dict[Key, int]
    end: int


def snapshot(store: MessageStore) -> Snapshot:
    queues = {
        key: list(queue.entries(queue.min_offset, queue.max_offset - queue.min_offset))
        for key, queue in store.queues.queues.items()
    }
    segments = [(seg.base, bytes(seg.view)) for seg in store.commit_log.files.segments]
    return Snapshot(
        segments, queues, dict(store.commit_log.next_queue_offsets), store.commit_log.max_offset
    )


@attrs.frozen
class MasterLog:
    snapshot: Snapshot
    sent: list[tuple[int, bytes]]
    """Per segment: (base, bytes up to its written position), what the master streams."""
    boundaries: list[int]
    """Every offset where a record starts or ends, and every segment end, sorted."""
    records: list[tuple[int, int]]
    """(offset, size) of every record."""


def master_messages() -> list[Message]:
    rng = random.Random(7)
    messages = []
    for i in range(160):
        size = rng.choice((0, 1, 17, 200, 900, 2500, 6000))
        messages.append(
            Message.create(
                rng.choice(("orders", "audit", "x")),
                bytes(rng.getrandbits(8) for _ in range(size)),
                queue_id=rng.randrange(3),
                tags=f"tag{i % 4}" if i % 3 else None,
                properties={"i": str(i)} if i % 5 == 0 else None,
            )
        )
    return messages


async def build_master(path: Path) -> MasterLog:
    async with MessageStore.open(config_at(path)) as store:
        messages = master_messages()
        for start in range(0, len(messages), 7):  # batches and single puts: both paths
            await store.put_batch(messages[start : start + 5])
            for message in messages[start + 5 : start + 7]:
                await store.put(message)
        files = store.commit_log.files.segments
        sent = [(seg.base, bytes(seg.view[: seg.wrote])) for seg in files]
        records = [(r.physical_offset, r.size) for r in store.commit_log.scan(0)]
        bounds = {0, *(o for o, _ in records), *(o + s for o, s in records)}
        bounds.update(seg.end for seg in files if seg.wrote == seg.size)
        assert len(files) >= 3, "the master must span several segments (fillers)"
        return MasterLog(snapshot(store), sent, sorted(bounds), records)


@functools.cache
def master_log() -> MasterLog:
    """Built once per test session: every test replicates the same master."""
    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(build_master, Path(tmp))


@pytest.fixture
def master() -> MasterLog:
    return master_log()


def chunks(
    master: MasterLog, next_size: Callable[[], int], start: int = 0
) -> Iterator[tuple[int, bytes]]:
    """The master's bytes from ``start`` as (offset, chunk), per segment, in sizes from
    ``next_size``: what its stream sends to a slave that reported ``start``."""
    for base, data in master.sent:
        pos = max(0, start - base)
        while pos < len(data):
            size = min(next_size(), len(data) - pos)
            yield base + pos, data[pos : pos + size]
            pos += size


def visible_end(master: MasterLog, received: int) -> int:
    """The last record boundary at or below ``received``: all a slave may expose."""
    return master.boundaries[bisect_right(master.boundaries, received) - 1]


async def replicate(store: MessageStore, master: MasterLog, next_size: Callable[[], int]) -> None:
    for offset, chunk in chunks(master, next_size, store.commit_log.received_offset):
        end = await store.append_replicated(offset, chunk)
        assert end == store.commit_log.max_offset == visible_end(master, offset + len(chunk))
        assert store.dispatcher.offset == end


def assert_same(slave: MessageStore, master: MasterLog) -> None:
    got, want = snapshot(slave), master.snapshot
    assert [base for base, _ in got.segments] == [base for base, _ in want.segments]
    for (base, mine), (_, theirs) in zip(got.segments, want.segments, strict=True):
        assert mine == theirs, f"segment {base} differs"
    assert got.queues == want.queues
    assert got.next_queue_offsets == want.next_queue_offsets
    assert got.end == want.end


# ---- byte-identical copies ---------------------------------------------------------------

chunk_sizes = st.lists(
    st.one_of(
        st.integers(0, 8_999).map(lambda n: 9_000 - n),  # shrinks towards big chunks
        st.integers(1, HEADER_SIZE + 12),  # boundaries inside headers, even the size field
    ),
    min_size=1,
    max_size=40,
)
"""Cut sizes, used in a cycle: the cycle's phase drifts, so cuts land anywhere in records."""


@given(sizes=chunk_sizes)
def test_slave_fed_in_random_chunks_is_identical_to_the_master(sizes: list[int]) -> None:
    master = master_log()

    async def main(path: Path) -> None:
        async with MessageStore.open(config_at(path)) as slave:
            await replicate(slave, master, itertools.cycle(sizes).__next__)
            assert slave.commit_log.raw_pending == 0
            assert_same(slave, master)

    with tempfile.TemporaryDirectory() as tmp:
        trio.run(main, Path(tmp))


async def test_whole_segments_at_once_and_files_on_disk_match(
    master: MasterLog, tmp_path: Path
) -> None:
    config = config_at(tmp_path)
    async with MessageStore.open(config) as slave:
        for base, data in master.sent:
            await slave.append_replicated(base, data)
        assert_same(slave, master)
    for base, data in master.snapshot.segments:  # the files themselves, after a clean close
        path = config.commit_log_dir / f"{base:020d}"
        assert path.read_bytes() == data


async def test_promoted_slave_continues_the_queue_offsets(
    master: MasterLog, tmp_path: Path
) -> None:
    async with MessageStore.open(config_at(tmp_path)) as slave:
        await replicate(slave, master, lambda: 333)
        key = ("orders", 1)
        result = await slave.put(Message.create("orders", b"after", queue_id=1))
        assert result.queue_offset == master.snapshot.next_queue_offsets[key]
        assert result.offset == master.snapshot.end


# ---- segments and fillers ----------------------------------------------------------------


async def test_filler_is_exposed_only_with_the_segment_last_byte(
    master: MasterLog, tmp_path: Path
) -> None:
    _, first = master.sent[0]
    assert len(first) == SMALL_SEGMENT
    last_record_end = visible_end(master, SMALL_SEGMENT - 1)
    assert last_record_end <= SMALL_SEGMENT - BLANK_MIN  # room for the filler's header
    async with MessageStore.open(config_at(tmp_path)) as slave:
        log = slave.commit_log
        assert await slave.append_replicated(0, first[:-1]) == last_record_end
        assert log.raw_pending == SMALL_SEGMENT - 1 - last_record_end
        assert await slave.append_replicated(SMALL_SEGMENT - 1, first[-1:]) == SMALL_SEGMENT
        segment = log.files.segments[0]
        assert check_record(segment.view, last_record_end, 0, SMALL_SEGMENT) < 0  # the filler
        assert len(log.files.segments) == 1
        second_base, second = master.sent[1]
        await slave.append_replicated(second_base, second[:100])  # rolls into segment 2
        assert [seg.base for seg in log.files.segments] == [0, SMALL_SEGMENT]


async def test_segment_that_ends_inside_a_record_is_corrupt(
    master: MasterLog, tmp_path: Path
) -> None:
    first = bytearray(master.sent[0][1])
    filler_at = visible_end(master, SMALL_SEGMENT - 1)
    first[filler_at : filler_at + 8] = b"\x00" * 8  # the filler's header lost: not a record
    async with MessageStore.open(config_at(tmp_path)) as slave:
        with pytest.raises(CorruptSegmentError, match=f"at offset {filler_at}"):
            await slave.append_replicated(0, bytes(first))
        assert slave.commit_log.max_offset == filler_at


# ---- corruption --------------------------------------------------------------------------


def corrupted(master: MasterLog, offset: int) -> list[tuple[int, bytes]]:
    """The master's bytes with the byte at ``offset`` flipped."""
    out = []
    for base, data in master.sent:
        if base <= offset < base + len(data):
            damaged = bytearray(data)
            damaged[offset - base] ^= 0xFF
            data = bytes(damaged)
        out.append((base, data))
    return out


@pytest.mark.parametrize(("record_index", "byte_in_record"), [(5, 80), (40, 0), (41, 9), (70, 33)])
async def test_corrupt_byte_stops_the_log_before_the_bad_record(
    master: MasterLog, tmp_path: Path, record_index: int, byte_in_record: int
) -> None:
    bad_offset, _size = master.records[record_index]
    bad = MasterLog(master.snapshot, corrupted(master, bad_offset + byte_in_record), [], [])
    async with MessageStore.open(config_at(tmp_path)) as slave:
        log = slave.commit_log
        with pytest.raises(CorruptSegmentError, match=f"at offset {bad_offset}\\b"):
            for offset, chunk in chunks(bad, lambda: 1000):
                await slave.append_replicated(offset, chunk)
        assert log.max_offset == bad_offset
        assert log.raw_pending == 0
        with pytest.raises(OffsetOutOfRangeError):
            log.read(bad_offset)
        indexed = [entry[1] for entries in snapshot(slave).queues.values() for entry in entries]
        assert max(indexed) < bad_offset
        assert len(indexed) == record_index
        # The master resends from the visible end: the copy completes and is identical.
        await replicate(slave, master, lambda: 1000)
        assert_same(slave, master)


# ---- offsets that do not fit -------------------------------------------------------------


async def test_chunk_at_the_wrong_offset_is_refused_naming_both(
    master: MasterLog, tmp_path: Path
) -> None:
    data = master.sent[0][1]
    async with MessageStore.open(config_at(tmp_path)) as slave:
        with pytest.raises(OffsetOutOfRangeError, match=r"offset 100 .* ends at 0"):
            await slave.append_replicated(100, data[100:200])
        end = await slave.append_replicated(0, data[:1000])
        received = slave.commit_log.received_offset
        assert received == 1000 and end < received
        for wrong in (end - 1, received + 1, received - 1):
            with pytest.raises(OffsetOutOfRangeError, match=f"offset {wrong} .* ends at {end}"):
                await slave.append_replicated(wrong, data[wrong : wrong + 10])
        assert slave.commit_log.max_offset == end
        assert slave.commit_log.received_offset == received


async def test_chunk_crossing_a_segment_end_is_refused(master: MasterLog, tmp_path: Path) -> None:
    (_, first), (_, second) = master.sent[:2]
    async with MessageStore.open(config_at(tmp_path)) as slave:
        with pytest.raises(OffsetOutOfRangeError, match=f"segment end at {SMALL_SEGMENT}"):
            await slave.append_replicated(0, first + second[:10])
        assert slave.commit_log.max_offset == 0
        assert slave.commit_log.files.segments == []


async def test_restarted_stream_drops_the_pending_partial_record(
    master: MasterLog, tmp_path: Path
) -> None:
    data = master.sent[0][1]
    async with MessageStore.open(config_at(tmp_path)) as slave:
        log = slave.commit_log
        end = await slave.append_replicated(0, data[:1000])
        pending = log.raw_pending
        assert pending > 0
        await slave.append_replicated(end, data[end : end + 10])  # reconnect: from the end
        assert log.raw_pending == 10
        tail = log.files.segments[0].view[end + 10 : end + pending]
        assert bytes(tail) == bytes(len(tail)), "dropped bytes are zeroed"
        await replicate(slave, master, lambda: 4096)
        assert_same(slave, master)


# ---- restart (recovery) ------------------------------------------------------------------


@pytest.mark.parametrize("crash", [False, True])
async def test_restart_after_a_partial_chunk_keeps_only_whole_records(
    master: MasterLog, tmp_path: Path, crash: bool
) -> None:
    config = config_at(tmp_path)
    offset, size = master.records[50]
    received = offset + size // 2  # the master's stream stops inside record 50
    async with MessageStore.open(config) as slave:
        for chunk_offset, chunk in chunks(master, lambda: 1500):
            if chunk_offset >= received:
                break
            await slave.append_replicated(chunk_offset, chunk[: received - chunk_offset])
        assert slave.commit_log.max_offset == offset
        assert slave.commit_log.raw_pending == received - offset
        await slave.commit_log.flush()  # the partial bytes reach the disk too
        if crash:
            slave.abandon()
    async with MessageStore.open(config) as slave:
        assert slave.recovery.log_end == offset
        assert slave.commit_log.max_offset == offset
        assert slave.commit_log.raw_pending == 0
        assert sum(len(e) for e in snapshot(slave).queues.values()) == 50
        await replicate(slave, master, lambda: 1500)  # resumes from the recovered end
        assert_same(slave, master)


def test_visible_end_model_matches_the_master_layout(master: MasterLog) -> None:
    """The test's own model: boundaries are exactly record starts/ends and segment ends."""
    for base, data in master.sent:
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            try:
                size = check_record(view, pos, base, len(data))
            except ScanStop:
                break
            assert base + pos in master.boundaries
            pos = len(data) if size < 0 else pos + size
        assert base + pos in master.boundaries
