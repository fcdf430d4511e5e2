"""Long polls waiting on the read limit: :class:`ReadLimitWaiters` wakes exactly the
waiters a limit move covers (checked against a model), and the store wakes its parked
polls when a cut changes what they read."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from storage import Message, MessageStore, StoreConfig
from storage.waiters import ReadLimitWaiters


@given(
    offsets=st.lists(st.integers(0, 100), min_size=1, max_size=30),
    moves=st.lists(st.one_of(st.none(), st.integers(0, 120)), max_size=10),
    cancelled=st.sets(st.integers(0, 29)),
)
def test_a_limit_move_wakes_exactly_the_waiters_it_covers(
    offsets: list[int], moves: list[int | None], cancelled: set[int]
) -> None:
    """Limits may move back (a slave's cut): each move wakes the waiters at or below it
    (None: all), never one above it nor a cancelled one."""

    async def main() -> None:
        waiters = ReadLimitWaiters()
        woke: set[int] = set()
        async with trio.open_nursery() as nursery:
            scopes = [trio.CancelScope() for _ in offsets]

            async def parked(index: int) -> None:
                with scopes[index]:
                    await waiters.wait(offsets[index])
                    woke.add(index)

            for index in range(len(offsets)):
                nursery.start_soon(parked, index)
            await trio.testing.wait_all_tasks_blocked()
            assert len(waiters) == len(offsets)
            for index in cancelled & set(range(len(offsets))):
                scopes[index].cancel()
            await trio.testing.wait_all_tasks_blocked()
            live = {i for i in range(len(offsets)) if i not in cancelled}
            assert len(waiters) == len(live)
            for limit in moves:
                expected = {i for i in live if limit is None or offsets[i] <= limit}
                assert waiters.limit_moved(limit) == len(expected)
                await trio.testing.wait_all_tasks_blocked()
                assert woke == expected, (limit, woke, expected)
                live -= expected
                woke.clear()
            assert len(waiters) == len(live)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def test_cancelled_waiters_do_not_pile_up_in_the_heap() -> None:
    """Polls that time out while the limit stands still (no slave in sync) leave; the
    heap is compacted so it does not grow with every re-poll."""
    waiters = ReadLimitWaiters()
    for _round in range(20):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(waiters.wait, 1_000)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert len(waiters) == 0
    assert len(waiters._heap) <= 2 * ReadLimitWaiters._COMPACT_MIN + 50


async def test_a_truncation_wakes_the_polls_parked_at_a_queue_end(
    store_config: StoreConfig,
) -> None:
    """A slave cutting a divergent tail: a poll parked at the end of its queue re-checks
    at once (past the new end it answers OFFSET_OUT_OF_RANGE) instead of at its deadline.
    Fails on the old code: the poll stayed parked (the 10 s bound ran out)."""
    async with MessageStore.open(store_config) as store:
        results = [await store.put(Message("t", b"x" * 100, 0)) for _ in range(5)]
        woken = trio.Event()

        async def poll_at_end() -> None:
            assert await store.wait_for_queue("t", 0)  # the topic is still there
            woken.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll_at_end)
                await trio.testing.wait_all_tasks_blocked()
                assert store.dispatcher.parked_polls("t", 0) == 1
                await store.truncate(results[2].offset)
                await woken.wait()
        assert store.queue_offsets("t", 0) == (0, 2)


async def test_a_cut_wakes_the_polls_waiting_for_the_read_limit(
    store_config: StoreConfig,
) -> None:
    """A poll waiting for the limit to cover a record the cut removed re-checks at the
    cut's end: no limit would ever cover that record again."""
    async with MessageStore.open(store_config) as store:
        results = [await store.put(Message("t", b"x" * 100, 0)) for _ in range(5)]
        woken = trio.Event()

        async def poll_past_limit() -> None:
            await store.wait_for_read_limit("t", 0, 3)  # entry 3, hidden by a limit
            woken.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll_past_limit)
                await trio.testing.wait_all_tasks_blocked()
                assert store.polls_past_read_limit() == 1
                assert store.read_limit_moved(results[3].offset) == 0  # entry 3 not covered
                await store.truncate(results[2].offset)
                await woken.wait()
        assert store.polls_past_read_limit() == 0


async def test_a_limit_move_wakes_only_the_poll_whose_entry_it_covers(
    store_config: StoreConfig,
) -> None:
    async with MessageStore.open(store_config) as store:
        first = await store.put(Message("t", b"a", 0))
        second = await store.put(Message("t", b"b", 1))
        woken: list[int] = []

        async def poll(queue: int) -> None:
            await store.wait_for_read_limit("t", queue, 0)
            woken.append(queue)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll, 0)
                nursery.start_soon(poll, 1)
                await trio.testing.wait_all_tasks_blocked()
                assert store.read_limit_moved(first.end_offset - 1) == 0
                assert store.read_limit_moved(first.end_offset) == 1
                await trio.testing.wait_all_tasks_blocked()
                assert woken == [0]
                assert store.read_limit_moved(second.end_offset) == 1
        assert woken == [0, 1]
