"""End to end: real `tidelog node` processes on loopback, driven by the client library and CLI."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cluster.client import open_client
from cluster.protocol import Status
from tests.helpers import running_node
from tools.process import NodeProcess


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    with running_node(tmp_path / "node") as process:
        yield process


async def test_every_ack_level_round_trips(node: NodeProcess) -> None:
    async with open_client(node.address) as client:
        await client.admin.create_topic("acks", 2)
        producer = client.producer()
        leader = await producer.send("acks", b"in-memory", queue=0, acks="leader")
        durable = await producer.send("acks", b"fsynced", queue=0, acks="durable")
        replicated = await producer.send("acks", b"nobody", queue=0, acks="replicated")
        assert (leader.outcome, durable.outcome) == ("ok", "ok")
        assert (leader.queue_offset, durable.queue_offset) == (0, 1)
        assert durable.offset is not None and leader.offset is not None
        assert durable.offset > leader.offset
        # No slaves: refused before anything is written, so resending is safe.
        assert replicated.outcome == "failed"
        assert replicated.status is Status.SLAVE_NOT_AVAILABLE
        offsets = await client.admin.offsets("acks", 0)
        assert offsets[0]["max_offset"] == 2
        async with client.consumer("acks", queues=[0]) as consumer:
            bodies = []
            async for message in consumer:
                bodies.append(message.body)
                if len(bodies) == 2:
                    break
        assert bodies == [b"in-memory", b"fsynced"]


async def test_concurrent_pipelined_producers_get_dense_offsets(node: NodeProcess) -> None:
    per_task, tasks = 60, 16
    results = []
    async with open_client(node.address) as client:
        await client.admin.create_topic("dense", 4)
        producers = [client.producer(acks="durable"), client.producer(acks="leader")]

        async def send_many(index: int) -> None:
            producer = producers[index % 2]
            for i in range(per_task):
                body = f"{index}:{i}".encode()
                results.append((body, await producer.send("dense", body, key=str(index))))

        async with trio.open_nursery() as nursery:
            for index in range(tasks):
                nursery.start_soon(send_many, index)
        assert all(r.outcome == "ok" for _b, r in results)
        by_queue: dict[int, list[int]] = {}
        for _body, result in results:
            assert result.queue is not None and result.queue_offset is not None
            by_queue.setdefault(result.queue, []).append(result.queue_offset)
        for queue_offsets in by_queue.values():
            assert sorted(queue_offsets) == list(range(len(queue_offsets)))
        # A key keeps its messages in one queue, in send order.
        for index in range(tasks):
            mine = [r for b, r in results if b.startswith(f"{index}:".encode())]
            assert len({r.queue for r in mine}) == 1
            in_order = [r.queue_offset or 0 for r in mine]  # every one is set (asserted above)
            assert in_order == sorted(in_order)
        physical = [r.offset for _b, r in results]
        assert len(set(physical)) == len(physical)


async def test_long_poll_wakes_when_a_message_arrives(node: NodeProcess) -> None:
    async with open_client(node.address) as client:
        await client.admin.create_topic("poll", 1)
        polling = trio.Event()
        received: list[bytes] = []

        async def consume() -> None:
            async with client.consumer("poll", start="latest", wait_ms=30_000) as consumer:
                polling.set()
                async for message in consumer:
                    received.append(message.body)
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await polling.wait()
            # The consumer's pull is parked on the node (wait_ms=30s): the send must wake it.
            with trio.fail_after(10):
                result = await client.producer().send("poll", b"wake up", acks="leader")
                assert result.ok
        assert received == [b"wake up"]


async def test_clean_restart_keeps_topics_and_messages(tmp_path: Path) -> None:
    data = tmp_path / "node"
    first = NodeProcess(data).start()
    try:
        async with open_client(first.address) as client:
            await client.admin.create_topic("keep", 2)
            sent = [
                await client.producer().send("keep", b"m%d" % i, queue=i % 2) for i in range(50)
            ]
            assert all(r.ok for r in sent)
    finally:
        assert first.stop() == 0, first.stderr
    second = NodeProcess(data).start()
    try:
        async with open_client(second.address) as client:
            described = await client.admin.describe_topic("keep")
            assert described["queues"] == 2
            assert [e["max_offset"] for e in described["offsets"]] == [25, 25]
            more = await client.producer().send("keep", b"after", queue=0)
            assert (more.outcome, more.queue_offset) == ("ok", 25)
            page = await client.checked("pull", topic="keep", queue=1, offset=0, max_messages=100)
            assert [m["body"] for m in page["messages"]] == [b"m%d" % i for i in range(1, 50, 2)]
    finally:
        assert second.stop() == 0, second.stderr


async def test_sigkill_keeps_every_durable_ack(tmp_path: Path) -> None:
    data = tmp_path / "node"
    node = NodeProcess(data).start()
    acked: dict[bytes, tuple[int, int, int]] = {}
    try:
        async with open_client(node.address) as client:
            await client.admin.create_topic("crash", 3)
            producer = client.producer(acks="durable")
            enough = trio.Event()

            async def send_until_killed(index: int) -> None:
                for i in range(10_000):
                    body = f"{index}-{i}".encode() * 3
                    result = await producer.send("crash", body, queue=index % 3)
                    if result.outcome != "ok":
                        return  # unknown once the node is gone: not counted
                    assert result.queue is not None and result.queue_offset is not None
                    assert result.offset is not None  # an ok answer carries every offset
                    acked[body] = (result.queue, result.queue_offset, result.offset)
                    if len(acked) >= 400:
                        enough.set()

            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(send_until_killed, index)
                await enough.wait()
                node.kill()  # SIGKILL while sends are in flight
    finally:
        node.kill()
    restarted = NodeProcess(data).start()
    try:
        async with open_client(restarted.address) as client:
            for body, (queue, queue_offset, offset) in acked.items():
                read = await client.checked("read", offset=offset)
                assert (read["queue"], read["record"]["queue_offset"]) == (queue, queue_offset)
                assert read["record"]["body"] == body
    finally:
        assert restarted.stop() == 0, restarted.stderr


async def test_hostile_bytes_do_not_disturb_other_clients(node: NodeProcess) -> None:
    async with open_client(node.address) as client:
        await client.admin.create_topic("calm", 1)
        for garbage in (os.urandom(4096), struct.pack(">I", 0xFFFFFFF0) + b"x" * 64, b"\x00\x00"):
            with socket.create_connection((node.host, node.port)) as raw:
                raw.sendall(garbage)
                raw.shutdown(socket.SHUT_WR)
                raw.settimeout(10)
                while raw.recv(65536):
                    pass  # the node answers (or closes); it must not crash
        result = await client.producer().send("calm", b"still here")
        assert result.ok
        status = await client.admin.status()
        assert status["role"] == "master"


def _cli(*args: str, stdin: str | None = None, node: NodeProcess) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args, "--bootstrap", node.address],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_topic_produce_consume_status(node: NodeProcess) -> None:
    created = _cli("topic", "create", "cli", "--queues", "2", node=node)
    assert created.returncode == 0, created.stderr
    again = _cli("topic", "create", "cli", "--queues", "2", node=node)
    assert again.returncode == 2 and "TOPIC_EXISTS" in again.stderr
    produced = _cli("produce", "cli", "--json", stdin="alpha\nbeta\ngamma\n", node=node)
    assert produced.returncode == 0, produced.stderr
    assert json.loads(produced.stdout)["ok"] == 3
    consumed = _cli("consume", "cli", node=node)
    assert consumed.returncode == 0, consumed.stderr
    assert sorted(consumed.stdout.split()) == ["alpha", "beta", "gamma"]
    listed = json.loads(_cli("topic", "list", "--json", node=node).stdout)
    assert {"topic": "cli", "queues": 2} in listed
    status = json.loads(_cli("status", "--json", node=node).stdout)
    assert status["role"] == "master" and status["max_offset"] > 0
    invalid = _cli("topic", "create", "bad name", node=node)
    assert invalid.returncode == 2 and "Traceback" not in invalid.stderr
    assert "INVALID_TOPIC" in invalid.stderr and "A-Z a-z 0-9" in invalid.stderr
    missing = _cli("produce", "nope", stdin="x\n", node=node)
    assert missing.returncode == 1 and "UNKNOWN_TOPIC" in missing.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_one_client_survives_a_node_restart(tmp_path: Path) -> None:
    """The client reconnects by itself; a send while the node is down is never `ok`."""
    port = _free_port()
    node = NodeProcess(tmp_path / "node", port=port).start()
    try:
        async with open_client(node.address, connect_timeout=0.5) as client:
            await client.admin.create_topic("again", 1)
            producer = client.producer(acks="durable", retries=0)
            first = await producer.send("again", b"before")
            assert first.ok
            assert node.stop() == 0, node.stderr
            down = await producer.send("again", b"while down")
            # Known, not "unknown": no connection could be made, so nothing was sent.
            assert down.outcome == "failed" and down.status is None, down
            node = NodeProcess(tmp_path / "node", port=port).start()
            after = await producer.send("again", b"after")
            assert after.ok, after.error
            page = await client.checked("pull", topic="again", queue=0, offset=0)
            bodies = [m["body"] for m in page["messages"]]
            assert bodies[0] == b"before" and bodies[-1] == b"after"
            assert b"while down" not in bodies
    finally:
        node.kill()
