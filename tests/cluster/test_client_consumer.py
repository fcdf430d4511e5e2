"""The consumer against a real node, under both anyio backends: where it starts, long
polls that wake on arrival, positions, and the reset of an offset the node does not have.

The node runs in a trio loop on a thread of its own, the client in the test's loop, trio
or asyncio (see :mod:`tests.cluster.client_harness`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from cluster.client import ConsumedMessage, TidelogError, open_client
from cluster.protocol import Status
from tests.cluster.client_harness import BACKENDS, NodesInTrioThread, nodes, run, take

__all__ = ["nodes"]


@BACKENDS
def test_earliest_reads_every_queue_and_keeps_positions(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)
    taken: list[ConsumedMessage] = []

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 3)
            producer = client.producer(acks="leader")
            for i in range(9):
                assert (await producer.send("t", b"m%d" % i, queue=i % 3, tags=f"tag{i}")).ok
            async with client.consumer("t", start="earliest") as consumer:
                taken.extend(await take(consumer, 9))
                assert consumer.positions == {0: 3, 1: 3, 2: 3}

    run(backend, body)
    assert sorted(m.body for m in taken) == [b"m%d" % i for i in range(9)]
    for message in taken:
        assert message.tags == f"tag{int(message.body[1:])}"
        assert message.queue == int(message.body[1:]) % 3
    per_queue = [[m.queue_offset for m in taken if m.queue == q] for q in range(3)]
    assert per_queue == [[0, 1, 2]] * 3  # in order within a queue


@BACKENDS
def test_latest_skips_what_was_there_and_long_polls_for_more(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 2)
            producer = client.producer(acks="leader")
            assert (await producer.send("t", b"old", queue=0)).ok
            received: list[ConsumedMessage] = []
            polling = anyio.Event()

            async def consume() -> None:
                async with client.consumer("t", start="latest", wait_ms=60_000) as consumer:
                    assert consumer.positions == {0: 1, 1: 0}
                    polling.set()
                    received.extend(await take(consumer, 1))

            async with anyio.create_task_group() as group:
                group.start_soon(consume)
                await polling.wait()
                # The pulls are parked on the node for a minute: the arrival must wake one.
                with anyio.fail_after(30):
                    assert (await producer.send("t", b"new", queue=1)).ok
            assert [(m.body, m.queue, m.queue_offset) for m in received] == [(b"new", 1, 0)]

    run(backend, body)


@BACKENDS
def test_chosen_queues_and_offsets(backend: str, nodes: NodesInTrioThread, tmp_path: Path) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 2)
            producer = client.producer(acks="leader")
            for i in range(4):
                assert (await producer.send("t", b"m%d" % i, queue=i % 2)).ok
            async with client.consumer("t", queues=[1], start={1: 1}) as consumer:
                [message] = await take(consumer, 1)
            assert (message.body, message.queue, message.queue_offset) == (b"m3", 1, 1)

    run(backend, body)


@BACKENDS
def test_an_offset_the_node_does_not_have_resets_to_the_earliest(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = nodes.start(tmp_path)
    taken: list[ConsumedMessage] = []

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            assert (await client.producer(acks="leader").send("t", b"first")).ok
            with caplog.at_level(logging.WARNING, logger="cluster.client"):
                async with client.consumer("t", start={0: 500}) as consumer:
                    taken.extend(await take(consumer, 1))
                    assert consumer.positions == {0: 1}

    run(backend, body)
    [message] = taken
    assert (message.body, message.queue_offset) == (b"first", 0)
    assert any("consumer_offset_reset" in r.getMessage() for r in caplog.records)
    assert any("from=500 to=0" in r.getMessage() for r in caplog.records)


@BACKENDS
def test_an_unknown_topic_is_an_error_not_an_empty_stream(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            with pytest.raises(TidelogError) as refused:
                async with client.consumer("missing"):
                    raise AssertionError("a consumer of a missing topic started")
        assert refused.value.status is Status.UNKNOWN_TOPIC

    run(backend, body)
