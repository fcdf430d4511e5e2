"""A page as runs of stored bytes (what a ``records`` pull sends) holds exactly the
records :meth:`MessageStore.get_messages` returns for the same read, byte for byte."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import Message, MessageStore, OffsetOutOfRangeError
from storage.consume_queue import ENTRY_SIZE
from storage.record import StoredRecord, decode_record
from storage.record_runs import RecordRuns
from tests.storage.test_cut import CUT_STEPS, fill
from tests.storage.test_raw_append import config_at

TOPICS = ("t", "u")
QUEUES = (0, 1)


def decoded(page: RecordRuns) -> list[StoredRecord]:
    """The records the runs hold, each checked against its CRC and its log offset."""
    records = []
    for log_offset, view in page.runs:
        pos = 0
        while pos < len(view):
            record = decode_record(view, pos, log_offset)
            records.append(record)
            pos += record.size
        assert pos == len(view), "a run ends inside a record"
    return records


def assert_runs_are_maximal(store: MessageStore, page: RecordRuns) -> None:
    """Each run lies in one segment, and no two runs could have been one."""
    segment_size = store.config.segment_size
    for log_offset, view in page.runs:
        assert log_offset // segment_size == (log_offset + len(view) - 1) // segment_size
    for (offset, view), (next_offset, _next) in zip(page.runs, page.runs[1:], strict=False):
        same_segment = offset // segment_size == next_offset // segment_size
        assert not (same_segment and offset + len(view) == next_offset)


def mixed_messages(count: int, seed: int) -> list[Message]:
    """Two topics of two queues each, interleaved in runs of random length (so a queue's
    records are sometimes back to back, sometimes not), bodies of 0 to 3000 bytes, some
    with tags and properties; small segments make fillers between them."""
    rng = random.Random(seed)
    messages: list[Message] = []
    while len(messages) < count:
        topic, queue = rng.choice(TOPICS), rng.choice(QUEUES)
        for _ in range(rng.choice((1, 1, 2, 5, 20))):
            body = rng.randbytes(rng.choice((0, 10, 700, 3000)))
            tags = rng.choice((None, "red"))
            props = rng.choice((None, {"k": "v" * rng.randrange(5)}))
            messages.append(
                Message.create(topic, body, queue, tags=tags, properties=props, born_us=7)
            )
    return messages[:count]


async def test_runs_hold_the_records_get_messages_returns(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        messages = mixed_messages(400, seed=5)
        for start in range(0, len(messages), 16):
            await store.put_batch(messages[start : start + 16])
        log_end = store.commit_log.max_offset

        @given(
            topic=st.sampled_from(TOPICS),
            queue=st.sampled_from(QUEUES),
            start=st.integers(0, 120),
            max_messages=st.integers(1, 130),
            max_bytes=st.integers(1, 200_000),
            below=st.none() | st.integers(0, log_end),
        )
        def same_page(
            topic: str, queue: int, start: int, max_messages: int, max_bytes: int, below: int | None
        ) -> None:
            low, high = store.queue_offsets(topic, queue)
            offset = max(low, min(start, high))
            page = store.get_record_runs(
                topic, queue, offset, max_messages=max_messages, max_bytes=max_bytes,
                below_offset=below,
            )  # fmt: skip
            expected = store.get_messages(
                topic, queue, offset, max_messages=max_messages, max_bytes=max_bytes,
                below_offset=below,
            )  # fmt: skip
            records = decoded(page)
            assert [(r.physical_offset, r.queue_offset) for r in records] == [
                (record.physical_offset, index) for index, record in expected.records
            ]
            assert [bytes(r.body) for r in records] == [
                bytes(record.body) for _, record in expected.records
            ]
            assert {(r.topic, r.queue_id) for r in records} <= {(topic, queue)}
            assert page.records == len(records)
            assert page.size == sum(len(view) for _, view in page.runs)
            assert (page.next_offset, page.min_offset, page.max_offset) == (
                expected.next_offset,
                expected.min_offset,
                expected.max_offset,
            )
            assert_runs_are_maximal(store, page)
            page.release()

        same_page()


async def test_back_to_back_records_make_one_run_and_interleaved_ones_many(
    tmp_path: Path,
) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        await store.put_batch([Message("t", b"a" * 100, 0) for _ in range(10)])
        for _ in range(5):
            await store.put_batch([Message("t", b"b" * 100, 0), Message("u", b"c" * 100, 0)])
        page = store.get_record_runs("t", 0, 0, max_messages=100)
        assert page.records == 15
        # the batch of 10 and the next record lie back to back; then one "u" between each
        assert [len(decoded_run) for decoded_run in _split(page)] == [11, 1, 1, 1, 1]


def _split(page: RecordRuns) -> list[list[StoredRecord]]:
    runs = []
    for run in page.runs:
        runs.append(decoded(RecordRuns([run], 0, 0, 0, 0, 0)))
    return runs


async def test_the_read_limit_and_the_size_limit(tmp_path: Path) -> None:
    """``below_offset`` hides records ending past it, even the first (an empty page);
    ``max_bytes`` stops before the record that would pass it, but never at the first."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        results = [await store.put(Message("t", bytes(1000), 0)) for _ in range(4)]
        first_end = results[0].end_offset
        hidden = store.get_record_runs("t", 0, 0, below_offset=first_end - 1)
        assert (hidden.records, hidden.runs, hidden.next_offset) == (0, [], 0)
        one = store.get_record_runs("t", 0, 0, below_offset=first_end)
        assert (one.records, one.next_offset) == (1, 1)
        big = store.get_record_runs("t", 0, 0, max_bytes=1)
        assert (big.records, big.next_offset) == (1, 1)
        two = store.get_record_runs("t", 0, 0, max_bytes=2 * results[0].size)
        assert (two.records, two.next_offset) == (2, 2)


@pytest.mark.parametrize("step", CUT_STEPS[:3])
async def test_runs_at_any_step_of_a_truncation_hold_only_the_queues_records(
    tmp_path: Path, step: str
) -> None:
    """As ``test_cut_reads`` checks for decoded pages: while a cut runs nothing is
    served, and after it only the records kept."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 60)
        low, high = store.queue_offsets("t", 1)
        keep = (low + high) // 2
        queue = store.queues.get("t", 1)
        assert queue is not None
        pages: list[RecordRuns] = []

        def pull_there(reached: str) -> None:
            if reached == step:
                pages.append(store.get_record_runs("t", 1, low, max_messages=high - low))

        store.after_cut_step = pull_there
        await store.truncate(queue.get(keep)[0])
        assert len(pages) == 1
        assert_only_queue_records(decoded(pages[0]), low)
        after = decoded(store.get_record_runs("t", 1, low, max_messages=high - low))
        assert_only_queue_records(after, low)
        assert [record.queue_offset for record in after] == list(range(low, keep))


async def test_a_zeroed_queue_entry_ends_the_page_or_is_refused(tmp_path: Path) -> None:
    """The state a queue cut's worker thread leaves for a moment: entries zeroed, the
    in-memory end not yet lowered. A zero entry reads as "log offset 0", where another
    topic's record starts: it must not be served."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 60)
        assert store.read(0).topic != "t"
        queue = store.queues.get("t", 1)
        assert queue is not None
        low, high = queue.min_offset, queue.max_offset
        keep = (low + high) // 2
        queue.files.truncate(keep * ENTRY_SIZE)  # zeroes [keep, high), max_offset unchanged
        page = store.get_record_runs("t", 1, low, max_messages=high - low)
        assert [record.queue_offset for record in decoded(page)] == list(range(low, keep))
        assert page.next_offset == keep
        with pytest.raises(OffsetOutOfRangeError, match=f"t/1.*{keep}"):
            store.get_record_runs("t", 1, keep)


def assert_only_queue_records(records: list[StoredRecord], start: int) -> None:
    for expected, record in enumerate(records, start):
        assert (record.topic, record.queue_id, record.queue_offset) == ("t", 1, expected)


async def test_an_unknown_queue_is_an_empty_page(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        page = store.get_record_runs("nothing", 0, 5)
        assert (page.records, page.runs, page.next_offset, page.max_offset) == (0, [], 5, 0)
