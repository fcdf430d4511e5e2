"""How many task hops and scheduler passes the node's connection spends on a request
answered at once (``acks=leader``): the reader reads, handles and writes the answer
itself, with no pass in between, and never starves the other tasks while doing so."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from cluster.node.acks import AckPolicy
from cluster.protocol import Acks, Status, encode_request
from cluster.server.connection import Connection
from tests.cluster.test_server import client, master_and_slave, node_config, running


class TaskSteps(trio.abc.Instrument):
    """Counts the steps of the tasks whose name ends with each given suffix."""

    def __init__(self, *suffixes: str) -> None:
        self.steps = dict.fromkeys(suffixes, 0)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        for suffix in self.steps:
            if task.name.endswith(suffix):
                self.steps[suffix] += 1

    def reset(self) -> None:
        self.steps = dict.fromkeys(self.steps, 0)


async def ack_task_steps_per_write(raw: Any, acks: str, steps: TaskSteps) -> list[int]:
    """Send five writes at ``acks`` one at a time and assert each cost the connection's
    ack task exactly one step (``steps`` counts it); return their offsets."""
    trio.lowlevel.add_instrument(steps)
    try:
        offsets = []
        for _ in range(5):
            await trio.testing.wait_all_tasks_blocked()
            steps.reset()
            answer = await raw.ok("send", topic="t", body=b"y", acks=acks)
            offsets.append(answer["offset"])
            await trio.testing.wait_all_tasks_blocked()
            assert steps.steps == {"Connection._await_acks": 1}
        return offsets
    finally:
        trio.lowlevel.remove_instrument(steps)


async def test_answers_given_at_once_are_written_by_the_reader_in_its_one_step(
    tmp_path: Path,
) -> None:
    """Fails on the old code: the reader yielded after its read (a second step) and the
    writer task woke to send the answer. (The connection's reader runs in the task
    the listener started for it.)"""
    steps = TaskSteps("ClientServer._accept", "Connection._write_loop")
    async with running(node_config(tmp_path / "node")) as node, client(node) as raw:
        await raw.ok("create_topic", topic="t", queues=1)
        trio.lowlevel.add_instrument(steps)
        try:
            for warm, burst in ((False, 1), (True, 1), (True, 16)):
                await trio.testing.wait_all_tasks_blocked()
                steps.reset()
                ids = [raw._last_id + n for n in range(1, burst + 1)]
                raw._last_id += burst
                await raw.send_raw(
                    b"".join(
                        encode_request("send", i, topic="t", body=b"x", acks="leader") for i in ids
                    )
                )
                answers = await raw.recv_n(burst)
                assert sorted(answers) == ids
                assert all(a["status"] is Status.OK for a in answers.values())
                await trio.testing.wait_all_tasks_blocked()
                if warm:  # the queue's first send waits for its file: not this test's case
                    assert steps.steps == {"ClientServer._accept": 1, "Connection._write_loop": 0}
        finally:
            trio.lowlevel.remove_instrument(steps)


async def test_a_durable_wait_still_answers_through_the_writer(tmp_path: Path) -> None:
    """Answers made by other tasks are sent too (the reader holds only its own)."""
    async with running(node_config(tmp_path / "node")) as node, client(node) as raw:
        await raw.ok("create_topic", topic="t", queues=1)
        first = await raw.send("send", topic="t", body=b"a", acks="durable")
        second = await raw.send("send", topic="t", body=b"b", acks="leader")
        answers = await raw.recv_n(2)
        assert answers[first]["status"] is Status.OK
        assert answers[second]["status"] is Status.OK
        assert answers[first]["offset"] < answers[second]["offset"]


class TasksSpawned(trio.abc.Instrument):
    """Counts the tasks started whose name ends with ``suffix``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.count += 1


async def test_sequential_ack_waits_share_one_task_and_never_wake_the_writer(
    tmp_path: Path,
) -> None:
    """Fails on the old code twice over: each write that found the ack queue empty
    started a task of its own, and the released wait's answer woke the writer task,
    which found it written already by the ack task."""
    steps = TaskSteps("Connection._write_loop")
    spawned = TasksSpawned("Connection._await_acks")
    async with running(node_config(tmp_path / "node")) as node, client(node) as raw:
        await raw.ok("create_topic", topic="t", queues=1)
        await raw.ok("send", topic="t", body=b"x", acks="leader")  # the queue's file
        trio.lowlevel.add_instrument(steps)
        trio.lowlevel.add_instrument(spawned)
        try:
            offsets = []
            for _ in range(5):
                answer = await raw.ok("send", topic="t", body=b"y", acks="durable")
                offsets.append(answer["offset"])
                await trio.testing.wait_all_tasks_blocked()
            assert offsets == sorted(offsets)
            assert node.store is not None
            assert node.store.commit_log.flushed_offset > offsets[-1]
            assert spawned.count <= 1  # one for the connection's life
            assert steps.steps == {"Connection._write_loop": 0}
        finally:
            trio.lowlevel.remove_instrument(steps)
            trio.lowlevel.remove_instrument(spawned)


class CountedWaits:
    """An ack policy that counts the waits its inner policy is asked for."""

    def __init__(self, inner: AckPolicy) -> None:
        self.inner = inner
        self.waits = 0
        self.admit = inner.admit
        self.holds = inner.holds
        self.wake_when_holds = inner.wake_when_holds
        self.read_limit = inner.read_limit

    async def wait(self, acks: Acks, end_offset: int, timeout_ms: int) -> tuple[Status, str | None]:
        self.waits += 1
        return await self.inner.wait(acks, end_offset, timeout_ms)


async def test_writes_one_fsync_released_are_answered_without_a_wait_each(
    tmp_path: Path,
) -> None:
    """Fails on the old code (a wait per write): a write whose level holds when its turn
    comes is answered in the ack task's pass with no wait, so every wait parks and is
    released by an fsync of its own. The answers keep their order and their offsets."""
    async with running(node_config(tmp_path / "node")) as node, client(node) as raw:
        assert node.handler is not None and node.acks is not None and node.store is not None
        await raw.ok("create_topic", topic="t", queues=1)
        await raw.ok("send", topic="t", body=b"x", acks="durable")  # the queue's file
        counted = CountedWaits(node.acks)
        node.handler.set_acks(counted)
        fsyncs = node.store.group_commit.fsyncs
        ids = [raw._last_id + n for n in range(1, 33)]
        raw._last_id += len(ids)
        await raw.send_raw(
            b"".join(encode_request("send", i, topic="t", body=b"y", acks="durable") for i in ids)
        )
        answers = []
        for _ in ids:
            answer = await raw.recv()
            assert answer is not None
            answers.append(answer)
        assert [a["id"] for a in answers] == ids  # in the order sent
        assert all(a["status"] is Status.OK for a in answers)
        offsets = [a["offset"] for a in answers]
        assert offsets == sorted(offsets)
        assert node.store.commit_log.flushed_offset > offsets[-1]
        assert 1 <= counted.waits <= node.store.group_commit.fsyncs - fsyncs


async def test_the_slaves_ack_wakes_the_idle_ack_task_which_answers_in_that_step(
    tmp_path: Path,
) -> None:
    """Fails on the old code (two steps per write): the reader woke the idle ack task,
    whose step only parked it on the confirm offset, and the ack woke it again. Now the
    reader registers the idle task with the policy, and the ack that moves the confirm
    offset past the write wakes it once, to answer."""
    steps = TaskSteps("Connection._await_acks")
    async with master_and_slave(tmp_path) as (master, _slave):
        assert master.ha is not None
        async with client(master) as raw:
            await raw.ok("create_topic", topic="t", queues=1)
            while master.ha.in_sync_count() < 1:
                await master.ha.wait_membership_change()
            await raw.ok("send", topic="t", body=b"x", acks="in_sync")  # starts the ack task
            offsets = await ack_task_steps_per_write(raw, "in_sync", steps)
            assert offsets == sorted(offsets)
            assert master.ha.confirm_offset > offsets[-1]


async def test_a_receive_yields_at_least_once_in_two_calls() -> None:
    """A client keeping the socket full cannot starve the other tasks: a read that did
    not wait makes the next receive yield first; a read after a wait does not yield again."""
    left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    state: Any = SimpleNamespace(_owe_checkpoint=False)
    steps = TaskSteps(trio.lowlevel.current_task().name)
    with left, right:
        await right.send(b"x" * 1000)
        trio.lowlevel.add_instrument(steps)
        try:
            steps.reset()
            assert await Connection._receive_plain(state, left) == b"x" * 1000
            assert steps.steps == dict.fromkeys(steps.steps, 0)  # no wait, no pass
            assert state._owe_checkpoint
            await right.send(b"y")
            steps.reset()  # (a send yields once too)
            assert await Connection._receive_plain(state, left) == b"y"
            assert steps.steps == dict.fromkeys(steps.steps, 1)  # the owed pass
            assert not state._owe_checkpoint

            async def later() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await right.send(b"z")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(later)
                steps.reset()
                assert await Connection._receive_plain(state, left) == b"z"
            assert not state._owe_checkpoint  # it waited: the next read owes nothing
        finally:
            trio.lowlevel.remove_instrument(steps)
