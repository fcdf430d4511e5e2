"""A lookup by time bounded by a read limit: a slave never answers past its confirm offset."""

from __future__ import annotations

from pathlib import Path

from storage import MessageStore
from tests.storage.test_cut import fill
from tests.storage.test_lookup_by_time import QUEUE, TOPIC, stored_times
from tests.storage.test_raw_append import config_at


def entry_ends(store: MessageStore) -> list[int]:
    """Where each record of the queue ends in the log, by queue offset."""
    queue = store.queues.get(TOPIC, QUEUE)
    assert queue is not None
    ends = []
    for queue_offset in range(queue.min_offset, queue.max_offset):
        offset, size, _tags = queue.get(queue_offset)
        ends.append(offset + size)
    return ends


async def test_the_answer_never_passes_the_first_record_beyond_the_limit(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        await fill(store, 300)
        low, high = store.queue_offsets(TOPIC, QUEUE)
        times, ends = stored_times(store), entry_ends(store)
        for cut in (0, 7, len(ends) // 2, len(ends) - 1):
            limit = ends[cut] - 1  # the record at queue offset low + cut is not confirmed
            after_all = store.queue_offset_at_time(TOPIC, QUEUE, times[-1] + 1, below_offset=limit)
            assert after_all == low + cut
            first = store.queue_offset_at_time(TOPIC, QUEUE, 0, below_offset=limit)
            assert first == low
            inside = store.queue_offset_at_time(TOPIC, QUEUE, times[cut // 2], below_offset=limit)
            assert inside == min(
                store.queue_offset_at_time(TOPIC, QUEUE, times[cut // 2]), low + cut
            )
        # A limit past every record changes nothing.
        assert (
            store.queue_offset_at_time(TOPIC, QUEUE, times[-1] + 1, below_offset=ends[-1]) == high
        )
