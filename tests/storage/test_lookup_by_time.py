"""Looking up a queue offset by store time: where "consume from a time" starts."""

from __future__ import annotations

import bisect
from pathlib import Path

import pytest

from storage import MessageStore, OffsetOutOfRangeError
from tests.storage.test_cut import fill
from tests.storage.test_raw_append import config_at

TOPIC, QUEUE = "t", 1  # fill()'s messages for odd i not divisible by 3


def stored_times(store: MessageStore) -> list[int]:
    low, high = store.queue_offsets(TOPIC, QUEUE)
    page = store.get_messages(TOPIC, QUEUE, low, max_messages=high - low, max_bytes=1 << 30)
    times = [record.store_us for _offset, record in page.records]
    for _offset, record in page.records:
        record.release()
    return times


async def test_every_time_finds_the_first_record_stored_at_or_after_it(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 300)
        low, high = store.queue_offsets(TOPIC, QUEUE)
        times = stored_times(store)
        assert len(times) == high - low and times == sorted(times)
        probes = {0, times[-1] + 1, *times, *(t + 1 for t in times), *(t - 1 for t in times)}
        for probe in sorted(probes):
            expected = low + bisect.bisect_left(times, probe)
            assert store.queue_offset_at_time(TOPIC, QUEUE, probe) == expected, probe


async def test_a_time_before_the_queue_start_finds_its_first_kept_record(tmp_path: Path) -> None:
    """Retention moved the queue's start: the answer stays inside the queue."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 600)
        store.queues.get_or_create(TOPIC, QUEUE).min_offset = 40  # as retention leaves it
        assert store.queue_offset_at_time(TOPIC, QUEUE, 0) == 40


async def test_an_unknown_queue_and_an_empty_one_answer_zero(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        assert store.queue_offset_at_time("nothing-here", 0, 12345) == 0
        await fill(store, 3)
        assert (
            store.queue_offset_at_time(TOPIC, QUEUE, 1 << 62)
            == store.queue_offsets(TOPIC, QUEUE)[1]
        )


async def test_a_lookup_while_the_log_is_cut_asks_for_a_retry(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 60)
        queue = store.queues.get(TOPIC, QUEUE)
        assert queue is not None
        answers: list[str] = []

        def look_up(step: str) -> None:
            if answers:
                return
            with pytest.raises(OffsetOutOfRangeError, match="being cut; retry"):
                store.queue_offset_at_time(TOPIC, QUEUE, 0)
            answers.append(step)

        store.after_cut_step = look_up
        await store.truncate(queue.get(10)[0])
        assert answers
