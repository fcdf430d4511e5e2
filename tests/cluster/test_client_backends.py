"""The client library under both anyio backends, trio and asyncio: the same behaviour.

The nodes run in a trio loop on a thread of their own (:class:`NodesInTrioThread`), so the
test's loop (asyncio or trio) belongs to the client alone; real sockets on loopback.
Each test body runs once per backend with ``anyio.run``; tests synchronise on events and
answers, never on sleeps.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import trio

from cluster.client import ConsumedMessage, Consumer, GroupConsumer, Producer, open_client
from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.protocol import Status
from cluster.protocol.address import format_address
from tests.cluster.test_client_producer import STORE, ops, requests

__all__ = ["NodesInTrioThread", "ThreadNode", "requests"]

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])


@attrs.define
class ThreadNode:
    node: Node
    address: str
    stopped: trio.Event


class NodesInTrioThread:
    """In-process nodes served by a trio loop on a thread of their own.

    Blocking methods, called from any thread but the nodes' (from a test's event loop:
    through ``anyio.to_thread.run_sync``). Leaving the block shuts every node down and
    ends the thread.
    """

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._thread: threading.Thread | None = None
        self._running: list[ThreadNode] = []

    def __enter__(self) -> NodesInTrioThread:
        ready = threading.Event()

        async def serve() -> None:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                ready.set()
                await trio.sleep_forever()

        self._thread = threading.Thread(target=trio.run, args=(serve,), name="nodes", daemon=True)
        self._thread.start()
        assert ready.wait(30), "the nodes' trio loop did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        for running in list(self._running):
            self.stop(running)
        assert self._nursery is not None
        trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        assert self._thread is not None
        self._thread.join(30)

    def start(self, data_dir: Path, *, name: str = "node-1", **replication: Any) -> ThreadNode:
        return trio.from_thread.run(
            self._start, data_dir, name, replication, trio_token=self._token
        )

    async def _start(self, data_dir: Path, name: str, replication: dict[str, Any]) -> ThreadNode:
        config = NodeConfig.create(
            data_dir, node={"port": 0, "name": name}, store=STORE, replication=replication
        )
        node = Node(config)
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            try:
                await node.run(task_status=task_status)
            finally:
                stopped.set()

        assert self._nursery is not None
        host, port = await self._nursery.start(run)
        running = ThreadNode(node, format_address(host, port), stopped)
        self._running.append(running)
        return running

    def stop(self, running: ThreadNode) -> None:
        """Shut ``running`` down gracefully; returns once it stopped."""

        async def stop() -> None:
            running.node.request_shutdown()
            await running.stopped.wait()

        trio.from_thread.run(stop, trio_token=self._token)
        self._running.remove(running)


@pytest.fixture
def nodes() -> Iterator[NodesInTrioThread]:
    with NodesInTrioThread() as host:
        yield host


def run(backend: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` in a fresh event loop of ``backend``, bounded (a hang fails, fast)."""

    async def bounded() -> None:
        with anyio.fail_after(60):
            await body()

    anyio.run(bounded, backend=backend)


async def take(consumer: Consumer | GroupConsumer, count: int) -> list[ConsumedMessage]:
    taken: list[ConsumedMessage] = []
    async for message in consumer:
        taken.append(message)
        if len(taken) == count:
            break
    return taken


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
def test_linger_gathers_sends_from_different_moments(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="leader", linger_ms=60_000, batch_size=3)
            taken: list[Any] = []
            async with anyio.create_task_group() as group:
                for i in range(3):
                    group.start_soon(_send_into, taken, producer, b"m%d" % i)
                    await anyio.lowlevel.checkpoint()  # a later moment than the send before
            assert sorted(r.queue_offset for r in taken) == [0, 1, 2]  # the full batch left

    run(backend, body)
    assert ops(requests, "send_batch") == 1


@BACKENDS
def test_retryable_statuses_are_retried_others_never(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="replicated", retries=3, retry_backoff_ms=1)
            result = await producer.send("t", b"m")  # no slave: SLAVE_NOT_AVAILABLE
            assert (result.outcome, result.status) == ("failed", Status.SLAVE_NOT_AVAILABLE)
            assert ops(requests, "send") == 4  # the first try and three retries
            missing = await client.producer(retries=5, retry_backoff_ms=1).send("nope", b"m")
            assert (missing.outcome, missing.status) == ("failed", Status.UNKNOWN_TOPIC)
            assert ops(requests, "send") == 5  # not retried

    run(backend, body)


@BACKENDS
def test_no_answer_is_unknown_and_nothing_listening_is_failed(backend: str) -> None:
    async def body() -> None:
        silent = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = silent.extra(anyio.abc.SocketAttribute.local_port)

        async def never_answer(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await anyio.sleep_forever()

        async with anyio.create_task_group() as group:
            group.start_soon(silent.serve, never_answer)
            address = f"127.0.0.1:{port}"
            async with open_client(address, request_timeout=0.05) as client:
                result = await client.producer(timeout_ms=1).send("t", b"m")
            assert (result.outcome, result.status) == ("unknown", None)
            assert "may or may not" in (result.error or "")
            group.cancel_scope.cancel()
        await silent.aclose()
        refused = f"127.0.0.1:{port}"  # nothing listens there now
        async with open_client(refused, connect_timeout=3600) as client:
            result = await client.producer().send("t", b"m")
        assert result.outcome == "failed"
        assert "connection refused" in (result.error or "")
        assert refused in (result.error or "")

    run(backend, body)


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


# ---- finding the master --------------------------------------------------------------------


@BACKENDS
def test_a_producer_follows_the_hint_then_finds_the_new_master(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    master = nodes.start(tmp_path / "a", name="node-a", ha_port=0)
    assert master.node.ha_address is not None
    slave = nodes.start(
        tmp_path / "b",
        name="node-b",
        role="slave",
        master_ha=format_address(*master.node.ha_address),
        master_client=master.address,
    )

    async def body() -> None:
        async with open_client([slave.address, master.address]) as client:
            await client.admin.create_topic("t", 1)  # the slave's hint names the master
            assert client.master == master.address
            producer = client.producer(acks="replicated", retry_backoff_ms=1)
            first = await producer.send("t", b"before")
            assert (first.outcome, first.queue_offset) == ("ok", 0)
            await anyio.to_thread.run_sync(nodes.stop, master)
            async with open_client(slave.address) as admin:
                await admin.checked("promote", ha_port=0)
            after = await producer.send("t", b"after", acks="durable")  # no slave left
            assert (after.outcome, after.status, after.queue_offset) == ("ok", Status.OK, 1)
            assert client.master == slave.address
            assert client.rediscoveries >= 1

    run(backend, body)
