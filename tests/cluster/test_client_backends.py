"""The client library under both anyio backends, trio and asyncio: what the older client
test files (producer, consumer, rediscovery, connection, all run under both backends too)
do not cover: sends at each ack level, the idempotent producer, the consumer beside the
admin calls, consumer groups.

The nodes run in a trio loop on a thread of their own (see
:mod:`tests.cluster.client_harness`), so the test's loop (asyncio or trio) belongs to the
client alone; real sockets on loopback. Tests synchronise on events and answers, never on
sleeps.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import anyio

from cluster.client import GroupConsumer, Producer, open_client
from tests.cluster.client_harness import (
    BACKENDS,
    NodesInTrioThread,
    nodes,
    ops,
    requests,
    run,
    take,
)

__all__ = ["nodes", "requests"]


# ---- producer ------------------------------------------------------------------------------


@BACKENDS
def test_concurrent_sends_share_a_request_at_each_ack_level(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            results: dict[str, list[Any]] = {"leader": [], "durable": []}
            for acks, taken in results.items():
                producer = client.producer(acks=acks)
                async with anyio.create_task_group() as group:
                    for i in range(10):
                        group.start_soon(_send_into, taken, producer, b"%d" % i)
            for taken in results.values():
                assert all(result.outcome == "ok" for result in taken)
            offsets = sorted(r.queue_offset for taken in results.values() for r in taken)
            assert offsets == list(range(20))

    run(backend, body)
    assert ops(requests, "send_batch") == 2  # ten sends, one request per ack level
    assert ops(requests, "send") == 0


async def _send_into(into: list[Any], producer: Producer, body: bytes) -> None:
    into.append(await producer.send("t", body))


@BACKENDS
def test_an_idempotent_producer_numbers_its_batches(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="durable", idempotent=True)
            results = [await producer.send("t", b"m%d" % i) for i in range(3)]
            assert [r.queue_offset for r in results] == [0, 1, 2]
            assert producer.producer_id is not None

    run(backend, body)


# ---- consumer, consumer groups, admin --------------------------------------------------------


@BACKENDS
def test_a_consumer_reads_every_queue_and_long_polls(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            assert await client.admin.create_topic("t", 3) == 3
            producer = client.producer(acks="leader")
            for i in range(6):
                assert (await producer.send("t", b"m%d" % i, queue=i % 3)).ok
            async with client.consumer("t", start="earliest", wait_ms=200) as consumer:
                taken = await take(consumer, 6)
                assert consumer.positions == {0: 2, 1: 2, 2: 2}
                assert (await producer.send("t", b"late", queue=1)).ok  # while it polls
                taken += await take(consumer, 1)
            assert sorted(m.body for m in taken) == sorted(
                [b"m%d" % i for i in range(6)] + [b"late"]
            )
            assert [t["topic"] for t in await client.admin.list_topics()] == ["t"]
            offsets = await client.admin.offsets("t")
            assert [entry["max_offset"] for entry in offsets] == [2, 3, 2]
            assert (await client.admin.status())["role"] == "master"

    run(backend, body)


@BACKENDS
def test_a_group_member_resumes_where_its_group_committed(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 2)
            producer = client.producer(acks="leader")
            for i in range(4):
                assert (await producer.send("t", b"m%d" % i, queue=i % 2)).ok
            options: dict[str, Any] = {"member": "a", "wait_ms": 100, "auto_commit_interval_ms": 0}
            async with GroupConsumer(client, "g", ["t"], **options) as member:
                first = await take(member, 4)
                for message in first:
                    member.processed(message)
            for i in range(4, 6):
                assert (await producer.send("t", b"m%d" % i, queue=i % 2)).ok
            async with GroupConsumer(client, "g", ["t"], **options) as again:
                second = await take(again, 2)
            assert sorted(m.body for m in first) == [b"m0", b"m1", b"m2", b"m3"]
            assert sorted(m.body for m in second) == [b"m4", b"m5"]  # nothing read twice

    run(backend, body)
