"""Long polls whose next record lies past the read limit (a replicated master's confirm
offset, a slave's copy of it) answer when the limit moves over it, not at their deadline.

Each test parks a poll with a 60 s ``wait_ms``, then makes exactly one send at
``acks=leader`` and nothing else: no later record arrives to re-check the poll, so only
the limit's own wakeup can answer it within ``trio.fail_after(20)``. Both tests waited
out the 60 s (failed by that timeout) before the read limit woke polls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio
import trio.testing

from cluster.node import Node
from cluster.protocol import Status
from tests.cluster.test_server import client, master_and_slave, node_config, running, until

POLL_WAIT_MS = 60_000
ANSWER_BOUND_S = 20


@contextlib.asynccontextmanager
async def master_with_slave(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """A master and a slave ``s1`` following it, in sync, with topic ``t`` on both."""
    async with master_and_slave(tmp_path) as (master, slave), client(master) as admin:
        ha = master.ha
        assert ha is not None
        await until(lambda: len(ha.in_sync_slaves()) == 1)
        await admin.ok("create_topic", topic="t", queues=2)
        await slave.sync_topics_now()
        yield master, slave


async def _one_send_answers_the_poll(master: Node, polled: Node) -> None:
    """Park a long poll on ``polled``, send one record to ``master`` at acks=leader, and
    expect the poll to answer with it once the read limit covers it."""
    store = polled.store
    assert store is not None
    async with client(polled) as consumer, client(master) as producer:
        poll = await consumer.send("pull", topic="t", queue=1, offset=0, wait_ms=POLL_WAIT_MS)
        await until(lambda: store.dispatcher.parked_polls("t", 1) == 1)
        await producer.ok("send", topic="t", queue=1, body=b"last of a burst", acks="leader")
        with trio.fail_after(ANSWER_BOUND_S):
            answer = await consumer.recv()
        assert answer is not None and answer["id"] == poll, answer
        assert [m["body"] for m in answer["messages"]] == [b"last of a burst"], answer
        assert store.polls_past_read_limit() == 0


async def test_a_long_poll_on_a_master_answers_when_its_slave_acknowledges(
    tmp_path: Path,
) -> None:
    async with master_with_slave(tmp_path) as (master, _slave):
        await _one_send_answers_the_poll(master, master)


async def test_a_long_poll_on_a_slave_answers_when_the_master_confirms(tmp_path: Path) -> None:
    async with master_with_slave(tmp_path) as (master, slave):
        await _one_send_answers_the_poll(master, slave)


async def test_deleting_a_topic_answers_a_poll_waiting_for_the_read_limit(
    tmp_path: Path,
) -> None:
    """A master with no slave in sync: its confirm offset stays put, so a poll whose
    record arrived waits on the read limit; deleting the topic answers it at once."""
    async with (
        running(node_config(tmp_path / "m", replication={"ha_port": 0})) as master,
        client(master) as consumer,
        client(master) as admin,
    ):
        store = master.store
        assert store is not None
        await admin.ok("create_topic", topic="d", queues=1)
        poll = await consumer.send("pull", topic="d", queue=0, offset=0, wait_ms=POLL_WAIT_MS)
        await until(lambda: store.dispatcher.parked_polls("d", 0) == 1)
        await admin.ok("send", topic="d", queue=0, body=b"unconfirmed", acks="leader")
        await until(lambda: store.polls_past_read_limit() == 1)
        await admin.ok("delete_topic", topic="d")
        with trio.fail_after(ANSWER_BOUND_S):
            answer = await consumer.recv()
        assert answer is not None and answer["id"] == poll, answer
        assert answer["status"] is Status.UNKNOWN_TOPIC, answer
        assert store.polls_past_read_limit() == 0
