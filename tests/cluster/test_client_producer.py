"""The producer against a real node (and, for lost answers, a real socket that never
answers), under both anyio backends: batching, retries, redirects and honest outcomes.

The node runs in a trio loop on a thread of its own, the client in the test's loop, trio
or asyncio (see :mod:`tests.cluster.client_harness`). Requests are counted with a spy
around the real :meth:`Connection.request`: the bytes still go to the node and back.
Tests synchronise on events and on ``wait_all_tasks_blocked``, never on sleeps.
"""

from __future__ import annotations

import collections
from pathlib import Path

import anyio
import anyio.abc
import pytest

from cluster.client import SendResult, open_client
from cluster.protocol import Status
from cluster.protocol.address import format_address
from tests.cluster.client_harness import (
    BACKENDS,
    MAX_MESSAGE,
    NodesInTrioThread,
    nodes,
    ops,
    requests,
    run,
    serving,
    silent_peer,
)

# ``serving`` is re-exported: other test modules import it from here.
__all__ = ["nodes", "requests", "serving"]

# ---- batching ------------------------------------------------------------------------------


@BACKENDS
def test_sends_made_in_the_same_moment_share_one_request(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    node = nodes.start(tmp_path)
    results: list[SendResult] = []

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="leader")  # linger_ms=0: the next scheduling point

            async def send(i: int) -> None:
                results.append(await producer.send("t", b"m%d" % i))

            async with anyio.create_task_group() as group:
                for i in range(16):
                    group.start_soon(send, i)

    run(backend, body)
    assert (ops(requests, "send_batch"), ops(requests, "send")) == (1, 0)
    assert sorted(r.queue_offset or 0 for r in results) == list(range(16))
    assert None not in {r.queue_offset for r in results}
    assert all(r.ok for r in results)


@BACKENDS
def test_a_full_batch_leaves_without_waiting_for_linger(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    """batch_size=4 and a linger of a minute: of ten sends, two full batches leave at
    once; the last two wait for the linger (cut short here by cancelling them)."""
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="leader", batch_size=4, linger_ms=60_000)
            done: list[SendResult] = []
            eight = anyio.Event()

            async def send(i: int) -> None:
                done.append(await producer.send("t", b"m%d" % i))
                if len(done) == 8:
                    eight.set()

            async with anyio.create_task_group() as group:
                for i in range(10):
                    group.start_soon(send, i)
                await eight.wait()
                await client.admin.status()  # a round trip later, the last two still linger
                assert len(done) == 8
                assert (ops(requests, "send_batch"), ops(requests, "send")) == (2, 0)
                group.cancel_scope.cancel()
            assert sorted(r.queue_offset or 0 for r in done) == list(range(8))
            assert None not in {r.queue_offset for r in done}

    run(backend, body)


@BACKENDS
def test_batch_size_one_sends_each_message_as_its_own_request(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    """Concurrent sends with ``batch_size=1`` are never merged: one ``send`` each, every
    one answered with its own offsets; a batch size below one is refused up front."""
    node = nodes.start(tmp_path)
    results: list[SendResult] = []

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="leader", batch_size=1)

            async def send(i: int) -> None:
                results.append(await producer.send("t", b"m%d" % i))

            async with anyio.create_task_group() as group:
                for i in range(8):
                    group.start_soon(send, i)
            with pytest.raises(ValueError, match="batch_size must be at least 1"):
                client.producer(batch_size=0)

    run(backend, body)
    assert (ops(requests, "send_batch"), ops(requests, "send")) == (0, 8)
    assert sorted(r.queue_offset or 0 for r in results) == list(range(8))
    assert all(r.ok for r in results)


@BACKENDS
def test_linger_gathers_sends_from_different_moments(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    node = nodes.start(tmp_path)
    results: list[SendResult] = []

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="leader", batch_size=2, linger_ms=60_000)

            async def send(payload: bytes) -> None:
                results.append(await producer.send("t", payload))

            async with anyio.create_task_group() as group:
                group.start_soon(send, b"first")
                await anyio.wait_all_tasks_blocked()  # the first one lingers, alone
                assert ops(requests, "send_batch") == ops(requests, "send") == 0
                group.start_soon(send, b"second")  # fills the batch: both leave now

    run(backend, body)
    assert (ops(requests, "send_batch"), ops(requests, "send")) == (1, 0)
    assert [r.queue_offset for r in sorted(results, key=lambda r: r.queue_offset or 0)] == [0, 1]


@BACKENDS
def test_one_oversized_message_fails_alone(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="durable")
            bodies = [b"small-1", b"x" * (MAX_MESSAGE + 1), b"small-2"]
            results: dict[bytes, SendResult] = {}

            async def send(payload: bytes) -> None:
                results[payload] = await producer.send("t", payload)

            async with anyio.create_task_group() as group:
                for payload in bodies:
                    group.start_soon(send, payload)
            big = results[bodies[1]]
            assert (big.outcome, big.status) == ("failed", Status.MESSAGE_TOO_LARGE)
            assert results[b"small-1"].ok and results[b"small-2"].ok
            page = await client.checked("pull", topic="t", queue=0, offset=0)
            assert sorted(m["body"] for m in page["messages"]) == [b"small-1", b"small-2"]

    run(backend, body)


@BACKENDS
def test_an_explicit_batch_stays_all_or_nothing(
    backend: str, nodes: NodesInTrioThread, tmp_path: Path
) -> None:
    node = nodes.start(tmp_path)

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            results = await client.producer().send_batch("t", [b"ok", b"x" * (MAX_MESSAGE + 1)])
            assert [r.outcome for r in results] == ["failed", "failed"]
            assert (await client.admin.offsets("t", 0))[0]["max_offset"] == 0

    run(backend, body)


# ---- retries -------------------------------------------------------------------------------


@BACKENDS
def test_retryable_statuses_are_retried_then_reported(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    """acks=replicated on a node without slaves: SLAVE_NOT_AVAILABLE, retryable."""
    node = nodes.start(tmp_path)
    results: list[SendResult] = []

    async def body() -> None:
        async with open_client(node.address) as client:
            await client.admin.create_topic("t", 1)
            producer = client.producer(acks="replicated", retries=3, retry_backoff_ms=1)
            results.append(await producer.send("t", b"m"))

    run(backend, body)
    [result] = results
    assert (result.outcome, result.status) == ("failed", Status.SLAVE_NOT_AVAILABLE)
    assert ops(requests, "send") == 4  # the first try and three retries


@BACKENDS
def test_other_statuses_are_never_retried(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    node = nodes.start(tmp_path)
    results: list[SendResult] = []

    async def body() -> None:
        async with open_client(node.address) as client:
            producer = client.producer(retries=5, retry_backoff_ms=1)
            results.append(await producer.send("missing", b"m"))

    run(backend, body)
    [result] = results
    assert (result.outcome, result.status) == ("failed", Status.UNKNOWN_TOPIC)
    assert ops(requests, "send") == 1


@BACKENDS
def test_not_master_is_followed_at_once(
    backend: str,
    nodes: NodesInTrioThread,
    tmp_path: Path,
    requests: collections.Counter[tuple[str, str]],
) -> None:
    master = nodes.start(tmp_path / "m", ha_port=0)
    assert master.node.ha_address is not None
    slave = nodes.start(
        tmp_path / "s",
        name="slave-1",
        role="slave",
        master_ha=format_address(*master.node.ha_address),
        master_client=master.address,
    )

    async def body() -> None:
        async with open_client(master.address) as admin:
            await admin.admin.create_topic("t", 1)
        async with open_client(slave.address) as client:
            producer = client.producer(acks="leader")
            first = await producer.send("t", b"one")
            second = await producer.send("t", b"two")
            assert (first.outcome, first.queue_offset) == ("ok", 0)
            assert (second.outcome, second.queue_offset) == ("ok", 1)
            assert producer.master == master.address

    run(backend, body)
    # One refusal by the slave, then straight to the master: no retries of the slave.
    assert requests[(slave.address, "send")] == 1
    assert requests[(master.address, "send")] == 2


# ---- outcomes without an answer ------------------------------------------------------------


@BACKENDS
def test_no_answer_in_time_is_unknown_not_failed(backend: str) -> None:
    async def body() -> None:
        async with (
            silent_peer(hang_up=False) as address,
            open_client(address, request_timeout=0.05) as client,
        ):
            result = await client.producer(timeout_ms=1).send("t", b"m")
        assert (result.outcome, result.status) == ("unknown", None)
        assert "may or may not" in (result.error or "")

    run(backend, body)


@BACKENDS
def test_a_lost_connection_is_unknown(backend: str) -> None:
    async def body() -> None:
        async with silent_peer(hang_up=True) as address, open_client(address) as client:
            result = await client.producer().send("t", b"m")
        assert (result.outcome, result.status) == ("unknown", None)

    run(backend, body)


@BACKENDS
def test_nothing_listening_is_failed_at_once_naming_the_address(backend: str) -> None:
    async def body() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        await listener.aclose()  # a port where nothing listens now
        address = f"127.0.0.1:{port}"
        async with open_client(address, connect_timeout=3600) as client:
            with anyio.fail_after(60):  # far below the connect timeout: refusal is not retried
                result = await client.producer().send("t", b"m")
        assert (result.outcome, result.status) == ("failed", None)
        assert f"connection refused at {address}" in (result.error or "")

    run(backend, body)
