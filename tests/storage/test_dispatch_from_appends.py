"""The dispatcher indexes a master's own appends from what the append hands over
(CommitLog.take_appended) instead of reading each header back: the consume queues, the
next queue offsets, the dispatched offset, the counters and the long-poll wakeups must be
exactly what reading the headers back gives, for any mix of sends, batches, tags, topic
deletions, producer-batch marks, appends nobody dispatched yet, concurrent sends and
hand-overs dropped past their limit; and records the appends did not hand over
(earlier replicated chunks, a cut) are read back. A slave's raw append hands over the
fields of the chunk it exposed (tests/storage/test_raw_append_checks.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import storage.commit_log
from storage import Message, MessageStore, StoreConfig
from storage.commit_log import CommitLog, IndexFields
from storage.consume_queue import ConsumeQueueStore
from storage.dispatcher import Dispatcher
from storage.record import FLAG_PRODUCER_BATCH, FLAG_TOPIC_DELETED, encode_properties
from tests.storage.test_raw_append import config_at as raw_append_config

TOPICS = ("a", "b", "orders.eu")
QUEUES = (0, 1, 2)
KEYS = [(topic, queue_id) for topic in TOPICS for queue_id in QUEUES]
SMALL_LIMIT = 6
"""The hand-over limit in these tests: runs of undispatched appends and batches pass it."""


class ReparsingDispatcher(Dispatcher):
    """The reference: reads every record's header back from the log, as every dispatch did
    before own appends handed their fields over."""

    def _records(self, end: int) -> Iterable[IndexFields]:
        return self.commit_log.iter_headers(self.offset, end)


def reparsing(log: CommitLog, path: Path) -> tuple[ReparsingDispatcher, ConsumeQueueStore]:
    """A reference dispatcher over ``log`` from its start, with empty queues at ``path``."""
    queues = ConsumeQueueStore(path, 16)
    queues.load()
    return ReparsingDispatcher(log, queues, log.min_offset), queues


def config_at(path: Path) -> StoreConfig:
    """Small log segments and queue files (a new one every 16 entries: the dispatch
    awaits there), no background flush."""
    return raw_append_config(path, consume_queue_entries=16)


def queue_state(queues: ConsumeQueueStore) -> dict[tuple[str, int], Any]:
    return {
        key: (
            queue.min_offset,
            queue.max_offset,
            list(queue.entries(queue.min_offset, queue.max_offset - queue.min_offset)),
        )
        for key, queue in queues.queues.items()
    }


def dispatcher_state(dispatcher: Dispatcher) -> tuple[int, int, int]:
    return dispatcher.offset, dispatcher.records_dispatched, dispatcher.bytes_dispatched


class Wakeups:
    """A long poll parked on every key, and one arrival waiter, on one dispatcher; what
    woke since the last :meth:`take` (key -> wait_for_queue's answer)."""

    def __init__(self, dispatcher: Dispatcher, nursery: trio.Nursery) -> None:
        self.dispatcher = dispatcher
        self.nursery = nursery
        self.parked: set[Any] = set()
        self.woken: dict[Any, bool] = {}

    async def park_all(self) -> None:
        for key in [*KEYS, "arrival"]:
            if key not in self.parked:
                self.parked.add(key)
                self.nursery.start_soon(self._wait, key)
        await trio.testing.wait_all_tasks_blocked()

    async def _wait(self, key: Any) -> None:
        if key == "arrival":
            await self.dispatcher.wait_for_arrival()
            answer = True
        else:
            answer = await self.dispatcher.wait_for_queue(*key)
        self.parked.discard(key)
        self.woken[key] = answer

    def take(self) -> dict[Any, bool]:
        woken, self.woken = self.woken, {}
        return woken


def message(spec: tuple[int, int, int, int | None, bool]) -> Message:
    topic, queue_id, size, tags, producer_mark = spec
    if producer_mark:
        return Message(
            TOPICS[topic],
            bytes([size % 251]) * size,
            queue_id,
            None if tags is None else f"t{tags}",
            encode_properties({"PRODUCER": f"p{topic}:0:1"}),
            flags=FLAG_PRODUCER_BATCH,
        )
    return Message.create(
        TOPICS[topic],
        bytes([size % 251]) * size,
        queue_id,
        tags=None if tags is None else f"t{tags}",
    )


messages = st.tuples(
    st.integers(0, len(TOPICS) - 1),
    st.sampled_from(QUEUES),
    st.sampled_from((0, 1, 100, 1024, 3000, 9000)),
    st.one_of(st.none(), st.integers(0, 3)),
    st.booleans(),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), messages),
        st.tuples(st.just("batch"), st.lists(messages, min_size=1, max_size=2 * SMALL_LIMIT)),
        st.tuples(st.just("delete"), st.integers(0, len(TOPICS) - 1)),
        st.tuples(
            st.just("undispatched"),  # single appends and batches
            st.lists(st.lists(messages, min_size=1, max_size=SMALL_LIMIT + 2), max_size=5),
        ),
        st.tuples(st.just("concurrent"), st.lists(messages, min_size=2, max_size=8)),
    ),
    min_size=1,
    max_size=25,
)


async def apply(store: MessageStore, op: tuple[str, Any]) -> None:
    kind, arg = op
    if kind == "put":
        await store.put(message(arg))
    elif kind == "batch":
        await store.put_batch([message(spec) for spec in arg])
    elif kind == "delete":
        await store.delete_topic(TOPICS[arg])
    elif kind == "undispatched":  # appended with no dispatch: the next op's dispatch takes them
        for specs in arg:
            if len(specs) == 1:
                await store.commit_log.append(message(specs[0]))
            else:
                await store.commit_log.append_batch([message(spec) for spec in specs])
    else:  # concurrent sends: dispatches coalesce while one awaits a new queue file
        async with trio.open_nursery() as nursery:
            for spec in arg:
                nursery.start_soon(store.put, message(spec))


@given(ops=ops)
def test_dispatching_the_appends_hand_over_equals_reading_the_headers_back(
    ops: list[tuple[str, Any]],
) -> None:
    async def main(path: Path) -> None:
        async with MessageStore.open(config_at(path / "store")) as store:
            reference, reference_queues = reparsing(store.commit_log, path / "reference")
            async with trio.open_nursery() as nursery:
                ours, theirs = Wakeups(store.dispatcher, nursery), Wakeups(reference, nursery)
                for op in ops:
                    await ours.park_all()
                    await theirs.park_all()
                    await apply(store, op)
                    if op[0] == "undispatched":
                        continue  # the reference reads them when the store dispatches them
                    await trio.testing.wait_all_tasks_blocked()
                    await reference.catch_up()
                    await trio.testing.wait_all_tasks_blocked()
                    assert dispatcher_state(store.dispatcher) == dispatcher_state(reference)
                    assert store.dispatcher.offset == store.commit_log.max_offset
                    assert queue_state(store.queues) == queue_state(reference_queues)
                    assert store.commit_log.next_queue_offsets == {
                        key: queue.max_offset for key, queue in reference_queues.queues.items()
                    }
                    assert ours.take() == theirs.take(), f"wakeups differ after {op[0]}"
                nursery.cancel_scope.cancel()
            reference_queues.close()

    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr(storage.commit_log, "APPENDED_LIMIT", SMALL_LIMIT)
        trio.run(main, Path(tmp))


# ---- records the appends did not hand over ----------------------------------------------


async def test_a_promoted_slave_reads_the_replicated_records_back_then_takes_its_own(
    tmp_path: Path,
) -> None:
    """Replicated bytes not dispatched yet, then own appends (a slave promoted to master):
    one dispatch reads the earlier chunks' records from the log and takes the handed-over
    fields of the last chunk's and the own ones, and the queues equal a rebuild from the log."""
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        for n in range(40):
            await master.put(Message.create(TOPICS[n % 3], b"m" * 900, n % 2, tags=f"t{n}"))
        sent = [
            (seg.base, bytes(seg.view[: seg.wrote])) for seg in master.commit_log.files.segments
        ]
    async with MessageStore.open(config_at(tmp_path / "slave")) as slave:
        for base, data in sent:  # raw, not dispatched: the dispatch after the appends finds them
            for pos in range(0, len(data), 1000):  # chunks that cut records
                await slave.commit_log.append_raw(base + pos, data[pos : pos + 1000])
        replicated_end = slave.commit_log.max_offset
        for n in range(10):
            await slave.commit_log.append(Message.create("a", b"own" * n, n % 3))
        appended = slave.commit_log._appended
        assert 0 < appended[0][0] < replicated_end, "the last chunk's records start it"
        assert appended[-10][0] == replicated_end, "the own ones follow"
        await slave.dispatcher.catch_up()
        reference, reference_queues = reparsing(slave.commit_log, tmp_path / "reference")
        await reference.catch_up()
        assert queue_state(slave.queues) == queue_state(reference_queues)
        assert dispatcher_state(slave.dispatcher) == dispatcher_state(reference)
        assert slave.queues.get("a", 0) is not None
        reference_queues.close()


def entries(store: MessageStore, topic: str, queue_id: int) -> list[tuple[int, int, int]]:
    """(queue offset, log offset, size) of every entry of the queue."""
    queue = store.queues.get(topic, queue_id)
    assert queue is not None, f"{topic}/{queue_id} has no queue"
    return [
        (index, offset, size)
        for index, offset, size, _tags in queue.entries(queue.min_offset, queue.max_offset)
    ]


async def test_a_cut_forgets_the_appends_it_removed(tmp_path: Path) -> None:
    """Appends nobody dispatched, then a cut under them: what the appends handed over
    is dropped, never indexed as if it described the records written after the cut (the
    old hand-over would put the cut record's entry in a/0 and drop b/0 at the stale
    marker)."""
    async with MessageStore.open(config_at(tmp_path / "store")) as store:
        log = store.commit_log
        await store.put(Message.create("b", b"other", 0))
        kept = await store.put(Message.create("a", b"kept", 0))
        await log.append(Message.create("a", b"cut, longer than what replaces it", 0))
        await log.append(Message("b", b"", 0, flags=FLAG_TOPIC_DELETED))
        await log.truncate(kept.end_offset)
        assert log._appended == []
        log.next_queue_offsets = {("a", 0): 1, ("b", 0): 1}  # as the store's cut leaves them
        own = await log.append(Message.create("a", b"own", 0))
        assert await store.dispatcher.catch_up() == 1
        assert entries(store, "a", 0) == [(0, kept.offset, kept.size), (1, own.offset, own.size)]
        assert len(entries(store, "b", 0)) == 1


async def test_replicated_bytes_between_own_appends_are_read_back(tmp_path: Path) -> None:
    """Own appends nobody dispatched, replicated bytes after them, own appends again (a
    node demoted and promoted with no dispatch in between): the replicated record is
    indexed from the fields its raw append handed over (the hand-over restarts with it),
    the own appends before it are read back from the log."""
    records = [Message.create("a", b"first", 0), Message.create("a", b"own, undispatched", 1)]
    replicated = Message.create("b", b"from the master", 0)
    async with MessageStore.open(config_at(tmp_path / "elsewhere")) as other:
        for record in records:  # the same sizes: the same offsets as below
            await other.put(record)
        placed = await other.put(replicated)
        raw = bytes(other.commit_log.files.find(placed.offset).view[: placed.end_offset])
    async with MessageStore.open(config_at(tmp_path / "store")) as store:
        log = store.commit_log
        await store.put(records[0])
        undispatched = await log.append(records[1])
        base = log.files.find(placed.offset).base
        assert await log.append_raw(placed.offset, raw[placed.offset - base :]) == (
            placed.end_offset
        )
        assert [fields[:5] for fields in log._appended] == [
            (placed.offset, placed.size, "b", 0, 0)
        ], "replicated bytes restart the hand-over"
        own = await log.append(Message.create("a", b"own again", 1))
        assert await store.dispatcher.catch_up() == 3
        assert entries(store, "b", 0) == [(0, placed.offset, placed.size)]
        assert entries(store, "a", 1) == [
            (0, undispatched.offset, undispatched.size),
            (1, own.offset, own.size),
        ]


async def test_a_hand_over_that_does_not_reach_the_end_is_not_used(tmp_path: Path) -> None:
    async with MessageStore.open(config_at(tmp_path / "store")) as store:
        log = store.commit_log
        await log.append(Message.create("a", b"x", 0))
        assert log.take_appended(log.max_offset + 1) is None
        assert log._appended == [], "taken (and dropped) all the same"
        assert await store.dispatcher.catch_up() == 1, "read back from the log instead"
        assert store.queue_offsets("a", 0) == (0, 1)
