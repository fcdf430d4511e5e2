"""The CommitLog through a real MessageStore: appends, batches, roll-overs, reads, cuts, retention."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import attrs
import pytest
import trio

from storage import (
    CorruptSegmentError,
    InvalidMessageError,
    InvalidTopicError,
    Message,
    MessageStore,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    StoreConfig,
)
from storage.consume_queue import ConsumeQueue
from storage.mapped_file import segment_name
from storage.record import BLANK_MIN, HEADER_SIZE, ScanStop, check_record, tags_hash

Key = tuple[str, int]


def body(i: int, size: int) -> bytes:
    """A body that names its record, padded to ``size`` bytes."""
    stamp = f"record-{i}:".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


def record_size(message: Message) -> int:
    return HEADER_SIZE + len(message.topic) + len(message.properties) + len(message.body)


def segment_layout(store: MessageStore) -> list[tuple[int, list[int], int | None]]:
    """Walk every segment with the recovery checks: (base, record offsets, filler size)."""
    layout = []
    for segment in store.commit_log.files.segments:
        pos, offsets, filler = 0, [], None
        while True:
            try:
                size = check_record(segment.view, pos, segment.base, segment.size)
            except ScanStop as stop:
                assert stop.reason == "end of data"
                break
            if size < 0:
                filler = -size
                break
            offsets.append(segment.base + pos)
            pos += size
        layout.append((segment.base, offsets, filler))
    return layout


def disk_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---- appending and reading ------------------------------------------------------------


async def test_append_and_read_round_trip(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:
        assert store.commit_log.max_offset == 0
        sent = [
            Message.create(
                "orders",
                body(i, 50 + i),
                queue_id=i % 2,
                tags=f"tag{i}" if i % 3 else None,
                properties={"index": str(i), "kind": "test"} if i % 2 else None,
                born_us=1_000 + i,
            )
            for i in range(10)
        ]
        results = [await store.put(m) for m in sent]

        expected_offset = 0
        for i, (message, result) in enumerate(zip(sent, results, strict=True)):
            assert result.offset == expected_offset
            assert result.size == record_size(message)
            assert result.end_offset == result.offset + result.size
            assert result.queue_id == i % 2
            assert result.queue_offset == i // 2
            assert result.store_us > 0
            expected_offset = result.end_offset

            record = store.read(result.offset)
            assert record.topic == "orders"
            assert bytes(record.body) == message.body
            assert record.queue_id == i % 2
            assert record.queue_offset == i // 2
            assert record.born_us == 1_000 + i
            assert record.store_us == result.store_us
            assert record.tags_hash == tags_hash(message.tags)
            assert record.properties == ({"index": str(i), "kind": "test"} if i % 2 else {})
            record.release()
        assert store.commit_log.max_offset == expected_offset


async def test_append_batch_gives_consecutive_offsets_and_queue_offsets(
    store_config: StoreConfig,
) -> None:
    async with MessageStore.open(store_config) as store:
        await store.put(Message.create("a", b"first", 0))
        await store.put(Message.create("b", b"first", 3))
        keys: list[Key] = [("a", 0), ("a", 1), ("b", 3), ("a", 0), ("c", 0)]
        batch = [
            Message.create(keys[i % len(keys)][0], body(i, 40), keys[i % len(keys)][1])
            for i in range(25)
        ]
        start = store.commit_log.max_offset
        result = await store.put_batch(batch)

        expected = start
        for offset, message in zip(result.offsets, batch, strict=True):
            assert offset == expected
            expected += record_size(message)
        assert result.end_offset == expected == store.commit_log.max_offset

        next_for: dict[Key, int] = defaultdict(int, {("a", 0): 1, ("b", 3): 1})
        for message, queue_offset, offset in zip(
            batch, result.queue_offsets, result.offsets, strict=True
        ):
            key = (message.topic, message.queue_id)
            assert queue_offset == next_for[key]
            next_for[key] += 1
            record = store.read(offset)
            assert (record.topic, record.queue_id, record.queue_offset) == (*key, queue_offset)
            assert bytes(record.body) == message.body
            record.release()
        for key, next_offset in next_for.items():
            assert store.commit_log.next_queue_offsets[key] == next_offset
            assert store.queue_offsets(*key) == (0, next_offset)


@pytest.mark.parametrize("records", [8, 40])
async def test_batches_across_segment_boundaries_never_straddle(
    store_config: StoreConfig, records: int
) -> None:
    """8 records of ~10 KiB cross one 64 KiB boundary; 40 cross several."""
    size = store_config.segment_size
    async with MessageStore.open(store_config) as store:
        await store.put(Message.create("t", body(-1, 3000)))
        batch = [Message.create("t", body(i, 10_000 + 37 * i), i % 3) for i in range(records)]
        result = await store.put_batch(batch)

        segments = store.commit_log.files.segments
        expected_segments = (result.end_offset - 1) // size + 1
        assert len(segments) == expected_segments >= (2 if records == 8 else 6)
        for offset, message in zip(result.offsets, batch, strict=True):
            assert offset // size == (offset + record_size(message) - 1) // size

        layout = segment_layout(store)
        all_offsets = [offset for _base, offsets, _filler in layout for offset in offsets]
        assert all_offsets[1:] == result.offsets
        for index, (base, offsets, filler) in enumerate(layout):
            last_end = store.read(offsets[-1]).end_offset
            if index < len(layout) - 1:
                assert filler is not None and filler >= BLANK_MIN
                assert last_end + filler == base + size  # the filler ends the segment
            else:
                assert filler is None
                assert last_end == store.commit_log.max_offset

        scanned = [bytes(r.body) for r in store.commit_log.scan(result.offsets[0])]
        assert scanned == [m.body for m in batch]


async def test_concurrent_writers_across_roll_overs(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:

        async def writer(w: int) -> None:
            for i in range(12):
                await store.put(Message.create("t", body(w * 100 + i, 9_000), w % 2))
                await store.put_batch(
                    [Message.create("t", body(w * 100 + i, 5_000 + j), w % 2) for j in range(3)]
                )

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)

        records = list(store.commit_log.scan(0))
        assert len(records) == 4 * 12 * 4
        for queue_id in (0, 1):
            queue_offsets = [r.queue_offset for r in records if r.queue_id == queue_id]
            assert queue_offsets == list(range(len(queue_offsets)))
        layout = segment_layout(store)
        assert all(filler is not None for _b, _o, filler in layout[:-1])


# ---- rejected appends write nothing ---------------------------------------------------


def snapshot(store: MessageStore) -> tuple[int, int, dict[Key, int], bytes]:
    log = store.commit_log
    last = log.files.last
    assert last is not None
    return (
        log.max_offset,
        len(log.files.segments),
        dict(log.next_queue_offsets),
        bytes(last.view[last.wrote :]),
    )


async def test_oversized_message_writes_nothing(store_config: StoreConfig) -> None:
    limit = store_config.max_message_size
    async with MessageStore.open(store_config) as store:
        await store.put(Message.create("t", b"x"))
        before = snapshot(store)
        assert before[3] == bytes(len(before[3]))  # nothing past the end yet

        too_big = Message.create("t", bytes(limit - HEADER_SIZE))  # one byte too many
        with pytest.raises(MessageTooLargeError, match=f"exceeds max_message_size {limit}"):
            await store.put(too_big)
        assert snapshot(store) == before

        exactly = Message.create("t", bytes(limit - HEADER_SIZE - 1))
        result = await store.put(exactly)
        assert result.size == limit
        assert result.queue_offset == 1  # no queue offset was used by the rejected one


async def test_oversized_message_inside_a_batch_writes_none_of_it(
    store_config: StoreConfig,
) -> None:
    limit = store_config.max_message_size
    async with MessageStore.open(store_config) as store:
        await store.put(Message.create("t", b"x"))
        before = snapshot(store)
        batch = [Message.create("t", body(i, 9_000)) for i in range(12)]  # would roll
        batch.append(Message.create("t", bytes(limit)))
        with pytest.raises(MessageTooLargeError):
            await store.put_batch(batch)
        assert snapshot(store) == before


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (Message.create("bad topic", b"x"), InvalidTopicError, "invalid topic name 'bad topic'"),
        (Message.create("..", b"x"), InvalidTopicError, "reserved"),
        (Message.create("t", b"x", 70_000), InvalidMessageError, "queue id 70000"),
        (Message.create("t", b"x", tags="\ud800"), InvalidMessageError, "tags"),
    ],
)
async def test_invalid_message_inside_a_batch_writes_none_of_it(
    store_config: StoreConfig, bad: Message, error: type[Exception], match: str
) -> None:
    async with MessageStore.open(store_config) as store:
        await store.put(Message.create("t", b"x"))
        before = snapshot(store)
        batch = [Message.create("t", body(i, 9_000), i % 2) for i in range(12)]  # would roll
        with pytest.raises(error, match=match):
            await store.put_batch([*batch, bad])
        assert snapshot(store) == before
        with pytest.raises(error, match=match):
            await store.put(bad)
        assert snapshot(store) == before

        result = await store.put_batch(batch)  # the same batch without the bad one
        assert result.queue_offsets[:2] == [1, 0]
        assert store.queue_offsets("t", 0) == (0, 7)


@pytest.mark.parametrize("queue_id", [-1, 0x10000, 2**32])
async def test_queue_id_out_of_range(store_config: StoreConfig, queue_id: int) -> None:
    async with MessageStore.open(store_config) as store:
        with pytest.raises(InvalidMessageError, match=f"queue id {queue_id} is outside 0..65535"):
            await store.put(Message.create("t", b"x", queue_id))
        assert store.commit_log.max_offset == 0
        result = await store.put(Message.create("t", b"x", 0xFFFF))
        assert result.queue_id == 0xFFFF


# ---- reading errors and scanning --------------------------------------------------------


async def test_read_of_a_bad_offset_is_a_clear_error(store_config: StoreConfig) -> None:
    async with MessageStore.open(store_config) as store:
        results = [await store.put(Message.create("t", body(i, 9_000))) for i in range(10)]
        first_segment_end = store.commit_log.files.segments[0].end
        end = store.commit_log.max_offset

        with pytest.raises(CorruptSegmentError, match=f"no record starts at offset {1}"):
            store.read(1)
        middle = results[3].offset + results[3].size // 2
        with pytest.raises(CorruptSegmentError, match=f"no record starts at offset {middle}"):
            store.read(middle)
        # Inside the filler that ends the first segment, too close to its end for a header.
        with pytest.raises(CorruptSegmentError, match="no record starts"):
            store.read(first_segment_end - 4)
        with pytest.raises(CorruptSegmentError, match="no record starts"):
            store.read(first_segment_end - 100)
        for offset in (end, end + 1, end + 10**9, -1):
            with pytest.raises(OffsetOutOfRangeError, match=f"offset {offset} is outside the log"):
                store.read(offset)


async def test_scan_returns_every_record_in_order_across_segments(
    store_config: StoreConfig,
) -> None:
    async with MessageStore.open(store_config) as store:
        sent = [Message.create("t", body(i, 1_000 + 97 * i), i % 4) for i in range(60)]
        results = [await store.put(m) for m in sent]
        assert len(store.commit_log.files.segments) >= 3

        scanned = list(store.commit_log.scan(0))
        assert [r.physical_offset for r in scanned] == [r.offset for r in results]
        assert [bytes(r.body) for r in scanned] == [m.body for m in sent]

        middle = list(store.commit_log.scan(results[20].offset, results[40].offset))
        assert [r.physical_offset for r in middle] == [r.offset for r in results[20:40]]
        headers = list(store.commit_log.iter_headers(0))
        assert [(h[0], h[1], h[3], h[4]) for h in headers] == [
            (r.offset, r.size, r.queue_id, r.queue_offset) for r in results
        ]


# ---- truncation ----------------------------------------------------------------------


async def test_truncate_then_append_continues_at_the_cut_after_reopening(
    store_config: StoreConfig,
) -> None:
    size = store_config.segment_size
    async with MessageStore.open(store_config) as store:
        results = [await store.put(Message.create("t", body(i, 7_000), i % 2)) for i in range(30)]
        assert len(store.commit_log.files.segments) >= 4
        cut_index = next(i for i, r in enumerate(results) if r.offset > size + 10_000)
        cut = results[cut_index].offset
        await store.commit_log.truncate(cut)
        assert store.commit_log.max_offset == cut
        assert len(store.commit_log.files.segments) == 2

    kept = results[:cut_index]
    expected_next = {q: sum(1 for r in kept if r.queue_id == q) for q in (0, 1)}
    tail = disk_bytes(store_config.commit_log_dir / segment_name(size))
    assert tail[cut - size :] == bytes(2 * size - cut)
    assert sorted(os.listdir(store_config.commit_log_dir)) == [segment_name(0), segment_name(size)]

    async with MessageStore.open(store_config) as store:
        assert store.recovery.clean_shutdown
        assert store.commit_log.max_offset == cut
        for q in (0, 1):
            assert store.queue_offsets("t", q) == (0, expected_next[q])
        with pytest.raises(OffsetOutOfRangeError):
            store.read(cut)

        new = await store.put(Message.create("t", b"after the cut", 1))
        assert new.offset == cut
        assert new.queue_offset == expected_next[1]
        record = store.read(cut)
        assert bytes(record.body) == b"after the cut"
        record.release()
        got = store.get_messages("t", 1, expected_next[1] - 1, max_messages=10)
        assert [index for index, _r in got.records] == [expected_next[1] - 1, expected_next[1]]
        last_kept = max(r.offset for r in kept if r.queue_id == 1)
        assert [r.physical_offset for _i, r in got.records] == [last_kept, cut]


# ---- retention -----------------------------------------------------------------------


def queue(store: MessageStore, topic: str, queue_id: int) -> ConsumeQueue:
    found = store.queues.get(topic, queue_id)
    assert found is not None
    return found


def age(paths: list[Path], seconds: float) -> None:
    when = time.time() - seconds
    for path in paths:
        os.utime(path, (when, when))


async def test_retention_deletes_old_segments_but_never_the_active_one(
    store_config: StoreConfig,
) -> None:
    config = attrs.evolve(store_config, retention_hours=1.0, disk_max_used_ratio=1.0)
    size = config.segment_size
    async with MessageStore.open(config) as store:
        results = [await store.put(Message.create("t", body(i, 900), i % 2)) for i in range(300)]
        segments = list(store.commit_log.files.segments)
        assert len(segments) >= 5
        queue_files = {q: len(queue(store, "t", q).files.segments) for q in (0, 1)}
        assert min(queue_files.values()) >= 2

        age([s.path for s in segments], 60)  # young: nothing goes
        assert await store.retention.apply() == 0
        assert store.commit_log.min_offset == 0

        age([s.path for s in segments[:3]], 2 * 3600)
        assert await store.retention.apply() == 3
        assert store.commit_log.min_offset == 3 * size
        assert not any((config.commit_log_dir / segment_name(i * size)).exists() for i in range(3))
        with pytest.raises(OffsetOutOfRangeError):
            store.read(0)

        for q in (0, 1):
            survivors = [r for r in results if r.queue_id == q and r.offset >= 3 * size]
            queue_min, queue_max = store.queue_offsets("t", q)
            assert queue_min == survivors[0].queue_offset > 0
            assert queue_max == survivors[-1].queue_offset + 1
            got = store.get_messages("t", q, 0, max_messages=2)
            assert [index for index, _r in got.records] == [queue_min, queue_min + 1]
            assert got.records[0][1].physical_offset == survivors[0].offset
            assert len(queue(store, "t", q).files.segments) < queue_files[q]

        active = store.commit_log.files.last
        age([s.path for s in store.commit_log.files.segments], 2 * 3600)  # all old
        await store.retention.apply()
        assert store.commit_log.files.segments == [active]
        assert active is not None and active.path.exists()
        assert store.retention.deleted == len(segments) - 1
        min_after = {q: store.queue_offsets("t", q) for q in (0, 1)}
        await store.put(Message.create("t", b"still writable", 0))

    async with MessageStore.open(config) as store:
        assert store.commit_log.min_offset == active.base
        for q in (0, 1):
            queue_min, _max = store.queue_offsets("t", q)
            assert queue_min == min_after[q][0]  # reopening does not bring back deleted entries
            got = store.get_messages("t", q, 0, max_messages=1)
            assert got.records and got.records[0][0] == queue_min
            assert got.records[0][1].physical_offset >= active.base


async def test_store_truncate_keeps_queues_dense_and_survives_a_crash(store_config) -> None:
    """Truncate in a running store: queues follow at once, and no prepared segment is left
    past the cut (a crash right after used to leave a gap that stopped the next start)."""
    from storage import Message, MessageStore

    async with MessageStore.open(store_config) as store:
        results = [await store.put(Message("t", bytes(3000), 0)) for _ in range(60)]
        assert len(store.commit_log.files.segments) > 2
        cut = results[10].offset
        await store.truncate(cut)
        assert store.queue_offsets("t", 0) == (0, 10)
        after = await store.put(Message("t", b"next", 0))
        assert (after.offset, after.queue_offset) == (cut, 10)
        page = store.get_messages("t", 0, 8, max_messages=10)
        assert [q for q, _r in page.records] == [8, 9, 10]
        store.abandon()  # crash: no clean shutdown
    async with MessageStore.open(store_config) as store:
        assert store.queue_offsets("t", 0) == (0, 11)
        assert bytes(store.read(cut).body) == b"next"
