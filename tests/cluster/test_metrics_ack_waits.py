"""With metrics on, a write's ack wait is timed from its append to its answer, where the
connection's ack queue releases it, and the node takes the same wake-up path as without.

The old timing wrapped the ack policy: it registered no direct wake-up (the slave's ack
could not wake the connection's idle ack task, which took a step of its own to park on
the wait first), and recorded every write its queue released through the policy's
``holds`` as a wait of 0 s, though it had waited since its append.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from cluster.node import Node
from cluster.protocol import Acks, Status, encode_request
from tests.cluster.test_metrics import _master_with_slave, _monitored
from tests.cluster.test_server import Raw, client, running
from tests.cluster.test_server_hops import TaskSteps


@contextlib.contextmanager
def recorded_waits(
    node: Node, acks: Acks, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[float]]:
    """Every wait the node's ``tidelog_ack_wait_seconds`` histogram observes at ``acks``
    (still observed)."""
    assert node.metrics is not None
    histogram = node.metrics.ack_wait.labels(acks.value)
    observe = histogram.observe
    waits: list[float] = []

    def recording(amount: float, *args: object, **kwargs: object) -> None:
        waits.append(amount)
        observe(amount)

    with monkeypatch.context() as patch:
        patch.setattr(histogram, "observe", recording)
        yield waits


async def burst(raw: Raw, acks: str, count: int) -> list[int]:
    """``count`` sends pipelined in one write on one connection; their offsets."""
    ids = [raw._last_id + n for n in range(1, count + 1)]
    raw._last_id += count
    await raw.send_raw(
        b"".join(encode_request("send", i, topic="t", body=b"x", acks=acks) for i in ids)
    )
    answers = await raw.recv_n(count)
    assert sorted(answers) == ids
    assert all(a["status"] is Status.OK for a in answers.values()), answers
    return sorted(a["offset"] for a in answers.values())


async def test_every_held_durable_write_records_its_wait_since_its_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on the old code: of a pipelined burst, the writes released after the
    queue's head (through ``holds``) were recorded as waits of exactly 0 s."""
    async with running(_monitored(tmp_path / "node")) as node, client(node) as raw:
        await raw.ok("create_topic", topic="t", queues=1)
        with recorded_waits(node, Acks.DURABLE, monkeypatch) as waits:
            for count in (1, 32, 32):
                waits.clear()
                await burst(raw, "durable", count)
                assert len(waits) == count
                assert all(wait > 0 for wait in waits), waits


async def test_with_metrics_the_slaves_ack_wakes_the_idle_ack_task_and_waits_are_timed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on the old code (two ack-task steps per write, as without the direct
    wake-up, and held in_sync writes recorded as 0 s): metrics on, the ack that
    moves the confirm offset past the write wakes the idle ack task once, to answer, as
    with metrics off (``test_server_hops``)."""
    steps = TaskSteps("Connection._await_acks")
    async with _master_with_slave(tmp_path) as (master, _slave), client(master) as raw:
        assert master.ha is not None
        await raw.ok("create_topic", topic="t", queues=1)
        await raw.ok("send", topic="t", body=b"x", acks="in_sync")  # starts the ack task
        with recorded_waits(master, Acks.IN_SYNC, monkeypatch) as waits:
            trio.lowlevel.add_instrument(steps)
            try:
                for _ in range(5):
                    await trio.testing.wait_all_tasks_blocked()
                    steps.reset()
                    await raw.ok("send", topic="t", body=b"y", acks="in_sync")
                    await trio.testing.wait_all_tasks_blocked()
                    assert steps.steps == {"Connection._await_acks": 1}
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert len(waits) == 5 and all(wait > 0 for wait in waits), waits
            waits.clear()
            offsets = await burst(raw, "in_sync", 16)
            assert master.ha.confirm_offset > offsets[-1]
            assert len(waits) == 16 and all(wait > 0 for wait in waits), waits
