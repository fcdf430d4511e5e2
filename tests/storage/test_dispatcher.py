"""The dispatcher: every record below its offset has its consume-queue entry, written in
log order, one entry per record, pointing at that record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from storage import Message, StoreConfig
from storage.commit_log import CommitLog
from storage.consume_queue import ConsumeQueueStore, QueueConflictError
from storage.dispatcher import Dispatcher
from storage.record import FLAG_TOPIC_DELETED
from tests.storage.test_waiters import open_log


@asynccontextmanager
async def log_and_queues(config: StoreConfig) -> AsyncIterator[tuple[CommitLog, ConsumeQueueStore]]:
    async with open_log(config) as log:
        queues = ConsumeQueueStore(config.consume_queue_dir, config.consume_queue_entries)
        await trio.to_thread.run_sync(queues.load)
        try:
            yield log, queues
        finally:
            queues.close()


async def test_every_record_gets_the_entry_that_points_at_it(store_config: StoreConfig) -> None:
    async with log_and_queues(store_config) as (log, queues):
        dispatcher = Dispatcher(log, queues, log.min_offset)
        written = []
        for n in range(200):  # several queue files and log segments
            queue_id = n % 3
            result = await log.append(Message.create("orders", b"x" * (n % 50), queue_id=queue_id))
            written.append((queue_id, result))
        assert await dispatcher.catch_up() == 200
        assert dispatcher.offset == log.max_offset
        seen = {0: 0, 1: 0, 2: 0}
        for queue_id, result in written:
            queue = queues.get("orders", queue_id)
            assert queue is not None
            log_offset, size, _tags = queue.get(seen[queue_id])
            assert (log_offset, seen[queue_id]) == (result.offset, result.queue_offset)
            assert size == result.size
            seen[queue_id] += 1
        assert await dispatcher.catch_up() == 0, "nothing new: nothing dispatched twice"


async def test_arrivals_wake_waiters_only_when_entries_were_added(
    store_config: StoreConfig,
) -> None:
    async with log_and_queues(store_config) as (log, queues):
        dispatcher = Dispatcher(log, queues, log.min_offset)
        woken = trio.Event()

        async def waiter() -> None:
            await dispatcher.wait_for_arrival()
            woken.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await dispatcher.catch_up()  # nothing written yet
            await trio.testing.wait_all_tasks_blocked()
            assert not woken.is_set()
            await log.append(Message.create("orders", b"x", queue_id=0))
            await dispatcher.catch_up()
            with trio.fail_after(5):
                await woken.wait()


async def test_a_dispatch_wakes_only_the_waiters_of_the_queues_it_added_to(
    store_config: StoreConfig,
) -> None:
    """Long polls park per queue: an append to one queue leaves the others parked, and a
    topic deletion wakes its queues' waiters with False."""
    async with log_and_queues(store_config) as (log, queues):
        dispatcher = Dispatcher(log, queues, log.min_offset)
        woken: list[tuple[str, int, bool]] = []

        async def waiter(topic: str, queue_id: int) -> None:
            woken.append((topic, queue_id, await dispatcher.wait_for_queue(topic, queue_id)))

        async with trio.open_nursery() as nursery:
            for queue_id in range(8):
                nursery.start_soon(waiter, "orders", queue_id)
            nursery.start_soon(waiter, "audit", 0)
            await trio.testing.wait_all_tasks_blocked()
            await log.append(Message.create("orders", b"x", queue_id=3))
            await log.append(Message.create("audit", b"y", queue_id=1))  # nobody waits there
            await dispatcher.catch_up()
            await trio.testing.wait_all_tasks_blocked()
            assert woken == [("orders", 3, True)]
            parked = [dispatcher.parked_polls("orders", q) for q in range(8)]
            assert parked == [1, 1, 1, 0, 1, 1, 1, 1]

            await log.append(Message("orders", b"", 0, flags=FLAG_TOPIC_DELETED))
            await dispatcher.catch_up()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(woken[1:]) == [("orders", q, False) for q in range(8) if q != 3]
            assert dispatcher.parked_polls("audit", 0) == 1
            nursery.cancel_scope.cancel()
        assert dispatcher.parked_polls("audit", 0) == 0, "a cancelled waiter leaves no lot"


async def test_a_strict_dispatch_notices_a_queue_that_lost_its_files(
    store_config: StoreConfig,
) -> None:
    """Recovery starting past the log's first record: a queue that first shows up above
    queue offset 0 lost its files, so every queue must be rebuilt."""
    async with log_and_queues(store_config) as (log, queues):
        first = await log.append(Message.create("orders", b"a", queue_id=0))
        await log.append(Message.create("orders", b"b", queue_id=0))
        dispatcher = Dispatcher(log, queues, first.offset + first.size)
        with pytest.raises(QueueConflictError, match="orders/0"):
            await dispatcher.catch_up_strict()
