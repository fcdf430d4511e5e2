"""The blocking client against a real node process: results returned, errors raised in
the calling thread, and each call blocking its caller only (other threads' sends go on
while one thread waits for a message; sends of several threads share a batch)."""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Iterator

import pytest

from cluster.client import SendResult, TidelogError
from cluster.client.sync import connect
from cluster.protocol import Status
from tests.cluster.client_harness import ops, requests
from tools.process import NodeProcess

__all__ = ["requests"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One ``tidelog node`` process for the module; killed by its PID at the end."""
    process = NodeProcess(tmp_path_factory.mktemp("node")).start()
    try:
        yield process
    finally:
        process.kill()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_send_returns_its_result_and_a_consumer_iterates(node: NodeProcess, backend: str) -> None:
    topic = f"sync-{backend}"
    with connect(node.address, backend=backend) as client:  # type: ignore[arg-type]
        assert client.admin.create_topic(topic, 2) == 2
        producer = client.producer(acks="durable")
        result = producer.send(topic, b"one", queue=0)
        assert isinstance(result, SendResult)
        assert (result.outcome, result.status, result.queue_offset) == ("ok", Status.OK, 0)
        batch = producer.send_batch(topic, [b"two", b"three"], queue=1)
        assert [r.queue_offset for r in batch] == [0, 1]
        with client.consumer(topic, start="earliest", wait_ms=100) as consumer:
            taken = [next(consumer) for _ in range(3)]
            assert consumer.positions == {0: 1, 1: 2}
        assert sorted(m.body for m in taken) == [b"one", b"three", b"two"]
        assert [e["max_offset"] for e in client.admin.offsets(topic)] == [1, 2]
        with pytest.raises(TidelogError, match="UNKNOWN_TOPIC"):
            client.admin.describe_topic("no-such-topic")


def test_each_call_blocks_its_caller_only(
    node: NodeProcess, requests: collections.Counter[tuple[str, str]]
) -> None:
    """A thread waits in the consumer for a message that only other threads' sends make;
    those sends, made while it waits, share one linger batch."""
    with connect(node.address) as client:
        client.admin.create_topic("threads", 1, exist_ok=True)
        producer = client.producer(acks="leader", linger_ms=60_000, batch_size=4)
        got: list[bytes] = []
        with client.consumer("threads", start="latest", wait_ms=100) as consumer:
            reader = threading.Thread(
                target=lambda: got.extend(next(consumer).body for _ in range(4))
            )
            reader.start()
            results: list[SendResult] = []
            senders = [
                threading.Thread(
                    target=lambda i=i: results.append(producer.send("threads", b"%d" % i))
                )
                for i in range(4)
            ]
            for sender in senders:
                sender.start()
            for thread in [*senders, reader]:
                thread.join(30)
                assert not thread.is_alive()
        assert sorted(r.queue_offset or 0 for r in results) == [0, 1, 2, 3]
        assert all(r.ok for r in results)
        assert sorted(got) == [b"0", b"1", b"2", b"3"]
    assert ops(requests, "send_batch") == 1  # four threads, one request


def test_a_group_member_commits_and_resumes(node: NodeProcess) -> None:
    with connect(node.address) as client:
        client.admin.create_topic("grouped", 1, exist_ok=True)
        producer = client.producer(acks="durable")
        for i in range(3):
            assert producer.send("grouped", b"m%d" % i).ok
        options = {"member": "m", "wait_ms": 100, "auto_commit_interval_ms": 0}
        with client.group_consumer("g", ["grouped"], **options) as member:
            first = [next(member) for _ in range(2)]
            member.processed(first[-1])
        with client.group_consumer("g", ["grouped"], **options) as again:
            rest = next(again)
    assert [m.body for m in first] == [b"m0", b"m1"]
    assert rest.body == b"m2"  # resumed at the group's committed position


def test_nothing_listening_is_an_error_in_the_caller() -> None:
    with socket.socket() as closed:  # a free port, nothing listening once closed
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(TidelogError, match="connection refused"), connect(address) as client:
        client.admin.status()
