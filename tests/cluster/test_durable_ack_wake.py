"""A durable write's idle ack task is woken by the end of the fsync that covers it and
answers in that step: no step of its own to park on group commit first."""

from __future__ import annotations

from pathlib import Path

from tests.cluster.test_server import client, node_config, running
from tests.cluster.test_server_hops import TaskSteps, ack_task_steps_per_write


async def test_the_fsync_wakes_the_idle_ack_task_which_answers_in_that_step(
    tmp_path: Path,
) -> None:
    """Fails on the old code (two steps per write): the reader woke the idle ack task,
    whose step only parked it on group commit's waiters, and the fsync's end woke it
    again. Now the reader registers the idle task with the policy, and the fsync's end
    wakes it once, to answer."""
    steps = TaskSteps("Connection._await_acks")
    async with running(node_config(tmp_path / "node")) as node, client(node) as raw:
        assert node.store is not None
        await raw.ok("create_topic", topic="t", queues=1)
        await raw.ok("send", topic="t", body=b"x", acks="durable")  # starts the ack task
        offsets = await ack_task_steps_per_write(raw, "durable", steps)
        assert offsets == sorted(offsets)
        assert node.store.commit_log.flushed_offset > offsets[-1]
