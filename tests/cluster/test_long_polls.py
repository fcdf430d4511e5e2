"""Long polls park on their own queue: a send wakes only the polls of the queue it went
to, and deleting a topic answers the polls parked on it at once.

Wakeups are counted with a trio instrument (which poll tasks ran a step), and tests
synchronise on answers and ``wait_all_tasks_blocked``, never on sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from cluster.node import Node
from cluster.protocol import Status
from tests.cluster.test_server import client, node_config, running

QUEUES = 16


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running(node_config(tmp_path / "node")) as serving:
        yield serving


@attrs.define(eq=False)
class PollSteps(trio.abc.Instrument):
    """Records each deferred request's task that runs a step (here: only long polls,
    since every send in these tests is answered inline)."""

    stepped: set[trio.lowlevel.Task] = attrs.field(factory=set)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("._finish"):
            self.stepped.add(task)


async def test_a_send_wakes_only_the_long_poll_of_its_queue(node: Node) -> None:
    async with client(node) as consumer, client(node) as producer:
        await consumer.ok("create_topic", topic="many", queues=QUEUES)
        polls = {
            queue: await consumer.send("pull", topic="many", queue=queue, offset=0, wait_ms=30_000)
            for queue in range(QUEUES)
        }
        await consumer.ok("status")  # read after the pulls: every poll is parked
        await trio.testing.wait_all_tasks_blocked()
        steps = PollSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            await producer.ok("send", topic="many", body=b"for five", queue=5, acks="leader")
            woken = await consumer.recv()
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert woken is not None and woken["id"] == polls[5], woken
        assert [m["body"] for m in woken["messages"]] == [b"for five"]
        assert len(steps.stepped) == 1, f"{len(steps.stepped)} parked polls woke for one send"
        store = node.store
        assert store is not None
        assert store.dispatcher.parked_polls("many", 5) == 0
        assert all(store.dispatcher.parked_polls("many", q) == 1 for q in polls if q != 5)


async def test_deleting_a_topic_answers_its_parked_long_polls(node: Node) -> None:
    async with client(node) as consumer, client(node) as admin:
        await consumer.ok("create_topic", topic="gone", queues=2)
        await consumer.ok("create_topic", topic="kept", queues=1)
        gone = [
            await consumer.send("pull", topic="gone", queue=q, offset=0, wait_ms=30_000)
            for q in range(2)
        ]
        kept = await consumer.send("pull", topic="kept", queue=0, offset=0, wait_ms=30_000)
        await consumer.ok("status")
        await admin.ok("delete_topic", topic="gone")
        answers = await consumer.recv_n(2)
        assert sorted(answers) == gone
        for answer in answers.values():
            assert answer["status"] is Status.UNKNOWN_TOPIC, answer
            assert "'gone'" in answer["error"]
        await admin.ok("send", topic="kept", body=b"still served", acks="leader")
        last = await consumer.recv()
        assert last is not None and last["id"] == kept
        assert [m["body"] for m in last["messages"]] == [b"still served"]


async def test_a_long_poll_on_a_slow_queue_sees_writes_to_it_among_many(node: Node) -> None:
    """Writes to other queues never answer a poll; the one to its queue does."""
    async with client(node) as consumer, client(node) as producer:
        await consumer.ok("create_topic", topic="t", queues=4)
        poll = await consumer.send("pull", topic="t", queue=2, offset=0, wait_ms=30_000)
        await consumer.ok("status")
        for queue in (0, 1, 3, 0, 1, 3):
            await producer.ok("send", topic="t", body=b"other", queue=queue, acks="leader")
        await producer.ok("send", topic="t", body=b"mine", queue=2, acks="leader")
        answer = await consumer.recv()
        assert answer is not None and answer["id"] == poll
        assert [m["body"] for m in answer["messages"]] == [b"mine"]
