"""The producer against a real node in this test's trio loop (and, for lost answers, a
real socket that never answers): batching, retries, redirects and honest outcomes.

Requests are counted with a spy around the real :meth:`Connection.request`: the bytes
still go to the node and back. Tests synchronise on events and on
``wait_all_tasks_blocked``, never on sleeps.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cluster.client import Connection, SendResult, open_client
from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.protocol import Status
from cluster.protocol.address import format_address
from tests.conftest import SMALL_SEGMENT

MAX_MESSAGE = 16 * 1024
STORE = {
    "segment_size": SMALL_SEGMENT,
    "max_message_size": MAX_MESSAGE,
    "consume_queue_entries": 64,
    "flush_interval_ms": 50,
    "flush_thorough_interval_ms": 200,
    "retention_check_interval_ms": 3_600_000,
}


@asynccontextmanager
async def serving(
    data_dir: Path, *, name: str = "node-1", **replication: Any
) -> AsyncIterator[tuple[Node, str]]:
    """A node on a free port in this trio loop, and its client address; shut down
    gracefully when the block ends."""
    config = NodeConfig.create(
        data_dir, node={"port": 0, "name": name}, store=STORE, replication=replication
    )
    node = Node(config)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(node.run)
        try:
            yield node, format_address(host, port)
        finally:
            node.request_shutdown()


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[tuple[str, str]]:
    """(address, op) -> how many requests the client sent, over real connections."""
    sent: collections.Counter[tuple[str, str]] = collections.Counter()
    real_request = Connection.request

    async def counted(self: Connection, op: str, timeout_s: float, /, **fields: Any) -> Any:
        sent[(self.address, op)] += 1
        return await real_request(self, op, timeout_s, **fields)

    monkeypatch.setattr(Connection, "request", counted)
    return sent


def ops(sent: collections.Counter[tuple[str, str]], op: str) -> int:
    return sum(n for (_address, name), n in sent.items() if name == op)


# ---- batching ------------------------------------------------------------------------------


async def test_sends_made_in_the_same_moment_share_one_request(
    tmp_path: Path, requests: collections.Counter[tuple[str, str]]
) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = client.producer(acks="leader")  # linger_ms=0: the next scheduling point
        results: list[SendResult] = []

        async def send(i: int) -> None:
            results.append(await producer.send("t", b"m%d" % i))

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(send, i)
    assert (ops(requests, "send_batch"), ops(requests, "send")) == (1, 0)
    assert sorted(r.queue_offset or 0 for r in results) == list(range(16))
    assert None not in {r.queue_offset for r in results}
    assert all(r.ok for r in results)


async def test_a_full_batch_leaves_without_waiting_for_linger(
    tmp_path: Path, requests: collections.Counter[tuple[str, str]]
) -> None:
    """batch_size=4 and a linger of a minute: of ten sends, two full batches leave at
    once; the last two wait for the linger (cut short here by cancelling them)."""
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = client.producer(acks="leader", batch_size=4, linger_ms=60_000)
        done: list[SendResult] = []
        eight = trio.Event()

        async def send(i: int) -> None:
            done.append(await producer.send("t", b"m%d" % i))
            if len(done) == 8:
                eight.set()

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(send, i)
            await eight.wait()
            await client.admin.status()  # a round trip later, the last two still linger
            assert len(done) == 8
            assert (ops(requests, "send_batch"), ops(requests, "send")) == (2, 0)
            nursery.cancel_scope.cancel()
        assert sorted(r.queue_offset or 0 for r in done) == list(range(8))
        assert None not in {r.queue_offset for r in done}


async def test_batch_size_one_sends_each_message_as_its_own_request(
    tmp_path: Path, requests: collections.Counter[tuple[str, str]]
) -> None:
    """Concurrent sends with ``batch_size=1`` are never merged: one ``send`` each, every
    one answered with its own offsets; a batch size below one is refused up front."""
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = client.producer(acks="leader", batch_size=1)
        results: list[SendResult] = []

        async def send(i: int) -> None:
            results.append(await producer.send("t", b"m%d" % i))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(send, i)
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            client.producer(batch_size=0)
    assert (ops(requests, "send_batch"), ops(requests, "send")) == (0, 8)
    assert sorted(r.queue_offset or 0 for r in results) == list(range(8))
    assert all(r.ok for r in results)


async def test_linger_gathers_sends_from_different_moments(
    tmp_path: Path, requests: collections.Counter[tuple[str, str]]
) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = client.producer(acks="leader", batch_size=2, linger_ms=60_000)
        results: list[SendResult] = []

        async def send(body: bytes) -> None:
            results.append(await producer.send("t", body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, b"first")
            await trio.testing.wait_all_tasks_blocked()  # the first one lingers, alone
            assert ops(requests, "send_batch") == ops(requests, "send") == 0
            nursery.start_soon(send, b"second")  # fills the batch: both leave now
    assert (ops(requests, "send_batch"), ops(requests, "send")) == (1, 0)
    assert [r.queue_offset for r in sorted(results, key=lambda r: r.queue_offset or 0)] == [0, 1]


async def test_one_oversized_message_fails_alone(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = client.producer(acks="durable")
        bodies = [b"small-1", b"x" * (MAX_MESSAGE + 1), b"small-2"]
        results: dict[bytes, SendResult] = {}

        async def send(body: bytes) -> None:
            results[body] = await producer.send("t", body)

        async with trio.open_nursery() as nursery:
            for body in bodies:
                nursery.start_soon(send, body)
        big = results[bodies[1]]
        assert (big.outcome, big.status) == ("failed", Status.MESSAGE_TOO_LARGE)
        assert results[b"small-1"].ok and results[b"small-2"].ok
        page = await client.checked("pull", topic="t", queue=0, offset=0)
        assert sorted(m["body"] for m in page["messages"]) == [b"small-1", b"small-2"]


async def test_an_explicit_batch_stays_all_or_nothing(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        results = await client.producer().send_batch("t", [b"ok", b"x" * (MAX_MESSAGE + 1)])
        assert [r.outcome for r in results] == ["failed", "failed"]
        assert (await client.admin.offsets("t", 0))[0]["max_offset"] == 0


# ---- retries -------------------------------------------------------------------------------


async def test_retryable_statuses_are_retried_then_reported(
    tmp_path: Path, requests: collections.Counter[tuple[str, str]]
) -> None:
    """acks=replicated on a node without slaves: SLAVE_NOT_AVAILABLE, retryable."""
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = client.producer(acks="replicated", retries=3, retry_backoff_ms=1)
        result = await producer.send("t", b"m")
    assert (result.outcome, result.status) == ("failed", Status.SLAVE_NOT_AVAILABLE)
    assert ops(requests, "send") == 4  # the first try and three retries


async def test_other_statuses_are_never_retried(
    tmp_path: Path, requests: collections.Counter[tuple[str, str]]
) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        producer = client.producer(retries=5, retry_backoff_ms=1)
        result = await producer.send("missing", b"m")
    assert (result.outcome, result.status) == ("failed", Status.UNKNOWN_TOPIC)
    assert ops(requests, "send") == 1


async def test_not_master_is_followed_at_once(
    tmp_path: Path, requests: collections.Counter[tuple[str, str]]
) -> None:
    async with serving(tmp_path / "m", ha_port=0) as (master, master_address):
        assert master.ha_address is not None
        ha = format_address(*master.ha_address)
        async with (
            serving(
                tmp_path / "s",
                name="slave-1",
                role="slave",
                master_ha=ha,
                master_client=master_address,
            ) as (_slave, slave_address),
            open_client(slave_address) as client,
        ):
            async with open_client(master_address) as admin:
                await admin.admin.create_topic("t", 1)
            producer = client.producer(acks="leader")
            first = await producer.send("t", b"one")
            second = await producer.send("t", b"two")
            assert (first.outcome, first.queue_offset) == ("ok", 0)
            assert (second.outcome, second.queue_offset) == ("ok", 1)
            assert producer.master == master_address
    # One refusal by the slave, then straight to the master: no retries of the slave.
    assert requests[(slave_address, "send")] == 1
    assert requests[(master_address, "send")] == 2


# ---- outcomes without an answer ------------------------------------------------------------


@asynccontextmanager
async def silent_peer(*, hang_up: bool) -> AsyncIterator[str]:
    """A TCP listener that reads requests and never answers (or hangs up on the first)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    got_request = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                got_request.set()
                if hang_up:
                    return
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        host, port = listeners[0].socket.getsockname()[:2]
        try:
            yield format_address(host, port)
        finally:
            nursery.cancel_scope.cancel()


async def test_no_answer_in_time_is_unknown_not_failed() -> None:
    async with (
        silent_peer(hang_up=False) as address,
        open_client(address, request_timeout=0.05) as client,
    ):
        result = await client.producer(timeout_ms=1).send("t", b"m")
    assert (result.outcome, result.status) == ("unknown", None)
    assert "may or may not" in (result.error or "")


async def test_a_lost_connection_is_unknown(tmp_path: Path) -> None:
    async with silent_peer(hang_up=True) as address, open_client(address) as client:
        result = await client.producer().send("t", b"m")
    assert (result.outcome, result.status) == ("unknown", None)


async def test_nothing_listening_is_failed_at_once_naming_the_address() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # a port where nothing listens now
    address = f"127.0.0.1:{port}"
    async with open_client(address, connect_timeout=3600) as client:
        with trio.fail_after(60):  # far below the connect timeout: refusal is not retried
            result = await client.producer().send("t", b"m")
    assert (result.outcome, result.status) == ("failed", None)
    assert f"connection refused at {address}" in (result.error or "")
