"""A write waiting for its ack when the node's log is cut below its end.

A demoted master rejoining as a slave cuts its divergent tail (``MessageStore.truncate``,
which rewinds group commit's waiters: those past the cut are woken with False). Other
bytes then land at the same offsets: the node's own appends once it is master again,
or a new master's records once it follows one. A waiting write whose record was cut
must never be answered OK for them: it is answered at once with an outcome-unknown
status whose error says the log was cut.

These tests run one real node, stall its commit log's fdatasync (so the writes are
not durable when the cut comes), cut the store through the truncate a demotion uses,
then append and fsync other records across the cut writes' offsets.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.protocol import Status
from storage import MessageStore
from storage.mapped_file import MappedFile
from tests.cluster.test_server import STORE, Raw, client, running, until

QUIET_STORE = {
    **STORE,
    "flush_interval_ms": 3_600_000,  # every commit-log fdatasync here is group commit's
    "flush_thorough_interval_ms": 3_600_000,
}
WAIT_MS = 20_000
"""The cut writes' timeout: far beyond the test, so no answer comes from a deadline."""
BODY = b"w" * 200
FILLER = b"f" * len(BODY)


@attrs.define
class Gate:
    """Holds the commit log's segment fdatasyncs (not the queues') while closed."""

    commit_log_dir: Path | None = None
    entered: threading.Event = attrs.field(factory=threading.Event)
    released: threading.Event = attrs.field(factory=threading.Event)

    def close(self, commit_log_dir: Path) -> None:
        self.released.clear()
        self.entered.clear()
        self.commit_log_dir = commit_log_dir

    def open(self) -> None:
        self.commit_log_dir = None
        self.released.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    gate.released.set()
    real_sync = MappedFile.sync

    def held_sync(segment: MappedFile) -> None:
        if gate.commit_log_dir is not None and segment.path.parent == gate.commit_log_dir:
            gate.entered.set()
            if not gate.released.wait(timeout=30):
                raise AssertionError("the test never released the held fdatasync")
        real_sync(segment)

    monkeypatch.setattr(MappedFile, "sync", held_sync)
    try:
        yield gate
    finally:
        gate.open()  # never leave the store's sync thread waiting


@asynccontextmanager
async def quiet_node(tmp_path: Path) -> AsyncIterator[Node]:
    config = NodeConfig.create(tmp_path / "node", node={"port": 0}, store=QUIET_STORE)
    async with running(config) as node:
        yield node


async def stall_an_fsync(store: MessageStore, gate: Gate, raw: Raw) -> tuple[int, int]:
    """Close the gate and send a durable write whose fdatasync then hangs in it: writes
    appended after it are not covered by that fdatasync, and no other starts while it
    runs. Returns the write's request id and the log end it covers (the cut point)."""
    gate.close(store.config.commit_log_dir)
    req_id = await raw.send("send", topic="t", body=BODY, acks="durable", timeout_ms=WAIT_MS)
    await until(gate.entered.is_set)
    return req_id, store.commit_log.max_offset


async def cut_while_the_fsync_is_held(
    store: MessageStore, gate: Gate, cut_at: int, nursery: trio.Nursery
) -> trio.Event:
    """Cut the log at ``cut_at`` as a demotion does: the cut takes the flush lock while
    the held fdatasync still runs, so nothing fsyncs the writes past it; the gate opens
    then. Returns the event set once the cut is done."""
    steps: list[str] = []
    store.after_cut_step = steps.append
    done = trio.Event()

    async def cut() -> None:
        await store.truncate(cut_at)
        done.set()

    nursery.start_soon(cut)
    await until(lambda: "intent_saved" in steps)
    await trio.testing.wait_all_tasks_blocked()  # the cut now waits for the held fsync
    gate.open()
    with trio.fail_after(15):
        await done.wait()
    return done


async def fill_past(node: Node, raw: Raw, end: int) -> list[dict[str, Any]]:
    """Durable writes of the cut writes' size (acknowledged) until the log's durable end
    passes ``end``: they land at exactly the cut writes' offsets."""
    store = node.store
    assert store is not None
    answers = []
    while store.commit_log.flushed_offset <= end:
        answers.append(await raw.ok("send", topic="t", body=FILLER, acks="durable"))
    return answers


def waiting_for_durable(store: MessageStore) -> int:
    """How many waits group commit holds (a write waiting afresh after the cut is one)."""
    return len(store.group_commit._waiters)


@asynccontextmanager
async def an_fsync_held_for_a_cut(
    tmp_path: Path, gate: Gate
) -> AsyncIterator[tuple[Node, trio.Nursery, MessageStore, Raw, Raw, int, int]]:
    """A quiet node with topic ``t``, two clients and a durable write of the first whose
    fdatasync hangs in ``gate`` (:func:`stall_an_fsync`): the node, a nursery, the store,
    the two clients, that write's request id and the log end it covers (the cut point)."""
    async with trio.open_nursery() as nursery, quiet_node(tmp_path) as node:
        store = node.store
        assert store is not None
        async with client(node) as other, client(node) as raw:
            await other.ok("create_topic", topic="t", queues=1)
            held_id, cut_at = await stall_an_fsync(store, gate, other)
            yield node, nursery, store, other, raw, held_id, cut_at


def timed_answers(node: Node) -> list[Status]:
    """The statuses the node's ack timer (its metrics' hook) is told, in order, from now."""
    statuses: list[Status] = []
    assert node.server is not None
    node.server.handler.on_ack_answered = lambda _acks, status, _waited_s: statuses.append(status)
    return statuses


def assert_cut_answer(answer: dict[str, Any]) -> None:
    assert answer["status"] is Status.FLUSH_DISK_TIMEOUT, answer
    assert "cut" in answer["error"] and "read it back" in answer["error"], answer


async def test_a_write_queued_behind_a_cut_write_is_not_acknowledged_by_later_bytes(
    tmp_path: Path, gate: Gate
) -> None:
    """Fails on the old code: the second write, queued behind the first, waited afresh
    after the cut (its turn came once the first was answered) and was answered OK
    once other records filled and fsynced its offsets."""
    async with an_fsync_held_for_a_cut(tmp_path, gate) as setup:
        node, nursery, store, other, raw, held_id, cut_at = setup
        timed = timed_answers(node)
        ids = [
            await raw.send("send", topic="t", body=BODY, acks="durable", timeout_ms=WAIT_MS)
            for _ in range(2)
        ]
        await until(lambda: store.queue_offsets("t", 0)[1] == 3)
        await cut_while_the_fsync_is_held(store, gate, cut_at, nursery)
        assert store.commit_log.max_offset == cut_at
        held = await other.recv()  # its fdatasync ended before the cut: kept, OK
        assert held is not None and held["id"] == held_id and held["status"] is Status.OK
        await trio.testing.wait_all_tasks_blocked()
        assert waiting_for_durable(store) == 0, "a cut write waits again"
        fillers = await fill_past(node, other, cut_at + 4 * len(BODY))
        answers = await raw.recv_n(2)
        assert sorted(answers) == ids
        for answer in answers.values():
            assert_cut_answer(answer)
        # each cut write timed once for the metrics (the head as its wait returned)
        assert timed.count(Status.FLUSH_DISK_TIMEOUT) == 2, timed
        # other records, acknowledged, now sit where the cut writes were
        assert {a["offset"] for a in answers.values()} <= {f["offset"] for f in fillers}


async def test_the_idle_ack_task_woken_by_a_cut_answers_its_write_at_once(
    tmp_path: Path, gate: Gate
) -> None:
    """Fails on the old code: the connection's idle ack task, registered with group
    commit for its write (``wake_when_holds``), was woken by the cut with False, dropped
    it and waited for the same offset again, so the record appended over the cut
    one's offset answered it OK."""
    async with trio.open_nursery() as nursery, quiet_node(tmp_path) as node:
        store = node.store
        assert store is not None
        async with client(node) as other, client(node) as raw:
            await other.ok("create_topic", topic="t", queues=1)
            await raw.ok("send", topic="t", body=BODY, acks="durable")  # its ack task idles
            await trio.testing.wait_all_tasks_blocked()
            held_id, cut_at = await stall_an_fsync(store, gate, other)
            timed = timed_answers(node)
            cut_id = await raw.send(
                "send", topic="t", body=BODY, acks="durable", timeout_ms=WAIT_MS
            )
            await until(lambda: store.queue_offsets("t", 0)[1] == 3)
            await cut_while_the_fsync_is_held(store, gate, cut_at, nursery)
            held = await other.recv()
            assert held is not None and held["id"] == held_id and held["status"] is Status.OK
            await trio.testing.wait_all_tasks_blocked()
            assert waiting_for_durable(store) == 0, "the cut write waits again"
            fillers = await fill_past(node, other, cut_at + 2 * len(BODY))
            answer = await raw.recv()
            assert answer is not None and answer["id"] == cut_id
            assert_cut_answer(answer)
            assert answer["offset"] in {f["offset"] for f in fillers}
            assert timed.count(Status.FLUSH_DISK_TIMEOUT) == 1, timed  # in the metrics too
            # and the connection goes on: a new write is acknowledged as usual
            await raw.ok("send", topic="t", body=BODY, acks="durable")


async def test_a_write_waiting_in_a_task_of_its_own_is_told_the_log_was_cut(
    tmp_path: Path, gate: Gate
) -> None:
    """A write with an earlier deadline than the queue's tail waits in a task of its
    own; the cut ends its wait before its deadline. Fails on the old code: it was
    answered that the fsync did not complete within its timeout ("probably stored")."""
    async with an_fsync_held_for_a_cut(tmp_path, gate) as setup:
        _node, nursery, store, other, raw, held_id, cut_at = setup
        queued = await raw.send("send", topic="t", body=BODY, acks="durable", timeout_ms=WAIT_MS)
        own = await raw.send("send", topic="t", body=BODY, acks="durable", timeout_ms=WAIT_MS // 2)
        await until(lambda: store.queue_offsets("t", 0)[1] == 3)
        await cut_while_the_fsync_is_held(store, gate, cut_at, nursery)
        held = await other.recv()
        assert held is not None and held["id"] == held_id and held["status"] is Status.OK
        answers = await raw.recv_n(2)
        assert sorted(answers) == [queued, own]
        for answer in answers.values():
            assert_cut_answer(answer)
        await trio.testing.wait_all_tasks_blocked()
        assert waiting_for_durable(store) == 0
