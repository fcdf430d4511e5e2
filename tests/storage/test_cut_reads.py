"""Reads while the log is cut: a pull never gets a record other than the one asked for.

A chaos run saw a demoted node answer a pull of queue offsets it was cutting with the
record at physical offset 0: the queue's entries were zeroed (in a worker thread) while
its in-memory end still counted them, and a zero entry reads as "log offset 0".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import MessageStore, OffsetOutOfRangeError
from storage.consume_queue import ENTRY_SIZE
from storage.store import GetResult
from tests.storage.test_cut import CUT_STEPS, fill, message
from tests.storage.test_raw_append import config_at

TOPIC, QUEUE = "t", 1  # message(i) for odd i not divisible by 3; the record at 0 is "u"/0


def assert_only_asked_records(page: GetResult, start: int) -> None:
    for expected, (queue_offset, record) in enumerate(page.records, start):
        assert queue_offset == expected
        assert (record.topic, record.queue_id, record.queue_offset) == (TOPIC, QUEUE, expected)


@pytest.mark.parametrize("step", CUT_STEPS[:3])
async def test_a_pull_at_any_step_of_a_truncation_gets_no_other_record(
    tmp_path: Path, step: str
) -> None:
    """Fails on the old code at "log_cut": the queue still had entries past the log end."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 60)
        low, high = store.queue_offsets(TOPIC, QUEUE)
        keep = (low + high) // 2
        queue = store.queues.get(TOPIC, QUEUE)
        assert queue is not None
        cut = queue.get(keep)[0]
        pages: list[GetResult] = []

        def pull_there(reached: str) -> None:
            if reached == step:
                pages.append(store.get_messages(TOPIC, QUEUE, low, max_messages=high - low))

        store.after_cut_step = pull_there
        await store.truncate(cut)
        assert len(pages) == 1
        assert_only_asked_records(pages[0], low)
        assert store.queue_offsets(TOPIC, QUEUE) == (low, keep)
        after = store.get_messages(TOPIC, QUEUE, low, max_messages=high - low)
        assert_only_asked_records(after, low)
        assert [offset for offset, _ in after.records] == list(range(low, keep))


async def test_a_zeroed_queue_entry_is_never_served_as_the_record_at_offset_0(
    tmp_path: Path,
) -> None:
    """The state a queue cut's worker thread leaves for a moment: entries zeroed, the
    in-memory end not yet lowered. Fails on the old code: the pull answered with the
    log's first record (another topic's) at the cut queue offsets."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 60)
        assert store.read(0).topic != TOPIC
        queue = store.queues.get(TOPIC, QUEUE)
        assert queue is not None
        low, high = queue.min_offset, queue.max_offset
        keep = (low + high) // 2
        queue.files.truncate(keep * ENTRY_SIZE)  # zeroes [keep, high), max_offset unchanged
        page = store.get_messages(TOPIC, QUEUE, low, max_messages=high - low)
        assert_only_asked_records(page, low)
        assert [offset for offset, _ in page.records] == list(range(low, keep))
        assert page.next_offset == keep
        with pytest.raises(OffsetOutOfRangeError, match=f"{TOPIC}/{QUEUE}.*{keep}"):
            store.get_messages(TOPIC, QUEUE, keep)


async def test_pulls_return_each_record_of_the_queue_once(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 60)
        low, high = store.queue_offsets(TOPIC, QUEUE)
        page = store.get_messages(TOPIC, QUEUE, low, max_messages=high - low)
        assert_only_asked_records(page, low)
        assert len(page.records) == high - low
        assert bytes(page.records[0][1].body) == message(1).body
