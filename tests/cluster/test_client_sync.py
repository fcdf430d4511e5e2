"""The blocking client against a real node process: results returned, errors raised in
the calling thread, and each call blocking its caller only (other threads' sends go on
while one thread waits for a message; sends of several threads share a batch); every
test on both portal backends.

Closing: a call still pending in another thread when the client closes ends with
:class:`ClientClosedError` instead of waiting forever, a call after closing is refused,
and a call from the loop's own thread is refused. Whatever could hang runs in a thread
joined with a timeout, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import collections
import contextlib
import functools
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from cluster.client import SendResult, TidelogError
from cluster.client.crossing import Crossing, open_crossing
from cluster.client.sync import ClientClosedError, connect
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


BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
HANG_S = 30.0
"""How long a call or a close may take before the test calls it a hang."""


@BACKENDS
def test_each_call_blocks_its_caller_only(
    node: NodeProcess, requests: collections.Counter[tuple[str, str]], backend: Any
) -> None:
    """A thread waits in the consumer for a message that only other threads' sends make;
    those sends, made while it waits, share one linger batch."""
    topic = f"threads-{backend}"
    with connect(node.address, backend=backend) as client:
        client.admin.create_topic(topic, 1, exist_ok=True)
        producer = client.producer(acks="leader", linger_ms=60_000, batch_size=4)
        got: list[bytes] = []
        with client.consumer(topic, start="latest", wait_ms=100) as consumer:
            reader = threading.Thread(
                target=lambda: got.extend(next(consumer).body for _ in range(4))
            )
            reader.start()
            results: list[SendResult] = []
            senders = [
                threading.Thread(target=lambda i=i: results.append(producer.send(topic, b"%d" % i)))
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


@BACKENDS
def test_a_group_member_commits_and_resumes(node: NodeProcess, backend: Any) -> None:
    topic, group = f"grouped-{backend}", f"g-{backend}"
    with connect(node.address, backend=backend) as client:
        client.admin.create_topic(topic, 1, exist_ok=True)
        producer = client.producer(acks="durable")
        for i in range(3):
            assert producer.send(topic, b"m%d" % i).ok
        options = {"member": "m", "wait_ms": 100, "auto_commit_interval_ms": 0}
        with client.group_consumer(group, [topic], **options) as member:
            first = [next(member) for _ in range(2)]
            member.processed(first[-1])
        with client.group_consumer(group, [topic], **options) as again:
            rest = next(again)
    assert [m.body for m in first] == [b"m0", b"m1"]
    assert rest.body == b"m2"  # resumed at the group's committed position


@BACKENDS
def test_nothing_listening_is_an_error_in_the_caller(backend: Any) -> None:
    with socket.socket() as closed:  # a free port, nothing listening once closed
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    with (
        pytest.raises(TidelogError, match="connection refused"),
        connect(address, backend=backend) as client,
    ):
        client.admin.status()


# ---- closing -----------------------------------------------------------------------------


class _Outcome:
    """What a function run in a thread of its own returned or raised; :meth:`join` fails
    the test when it has not finished within ``HANG_S``."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self.value = function()
        except BaseException as error:
            self.error = error

    def join(self) -> _Outcome:
        self._thread.join(HANG_S)
        assert not self._thread.is_alive(), f"still waiting after {HANG_S} s: a hang"
        return self


@BACKENDS
def test_a_call_pending_when_the_crossing_closes_ends_with_an_error(backend: str) -> None:
    """The call is running in the loop (its coroutine has started: an event says so)
    when the crossing closes: its caller gets ClientClosedError, the close returns."""
    started = threading.Event()

    async def waits_forever() -> None:
        started.set()
        await anyio.sleep_forever()

    def open_call_close() -> _Outcome:
        with (
            start_blocking_portal(backend) as portal,
            portal.wrap_async_context_manager(open_crossing()) as crossing,
        ):
            pending = _Outcome(lambda: crossing.call(waits_forever))
            assert started.wait(HANG_S)
        return pending

    pending = _Outcome(open_call_close).join().value.join()
    assert isinstance(pending.error, ClientClosedError)
    assert "closed" in str(pending.error) and "pending" in str(pending.error)


@BACKENDS
def test_calls_cross_and_after_closing_are_refused(backend: str) -> None:
    """Results, exceptions and sync functions cross as they are (64 threads at once, none
    lost); a call after closing raises ClientClosedError without waiting."""

    async def doubled(value: int) -> int:
        await anyio.lowlevel.checkpoint()
        return 2 * value

    async def fails() -> None:
        raise KeyError("missing")

    def calls(crossing: Crossing, thread: int) -> list[int]:
        return [crossing.call(doubled, 100 * thread + i) for i in range(20)]

    with start_blocking_portal(backend) as portal:
        with portal.wrap_async_context_manager(open_crossing()) as crossing:
            threads = [_Outcome(functools.partial(calls, crossing, t)) for t in range(64)]
            for t, outcome in enumerate(threads):
                assert outcome.join().value == [2 * (100 * t + i) for i in range(20)]
            with pytest.raises(KeyError, match="missing"):
                crossing.call(fails)
            assert crossing.call(lambda: threading.get_ident()) != threading.get_ident()
        assert crossing.closed
        with pytest.raises(ClientClosedError, match="was not made"):
            crossing.call(doubled, 1)


@BACKENDS
def test_calls_racing_the_close_each_end(backend: str) -> None:
    """64 threads call back to back while the crossing closes: each ends with its result
    or ClientClosedError, none waits forever (calls queued, spawned but not yet started,
    and running at the close are all ended)."""
    all_calling = threading.Barrier(65)

    async def checkpointed() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    def calls(crossing: Crossing) -> int:
        made = 0
        all_calling.wait(HANG_S)
        with contextlib.suppress(ClientClosedError):
            while True:
                made += crossing.call(checkpointed)
        return made

    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(open_crossing()) as crossing,
    ):
        threads = [_Outcome(functools.partial(calls, crossing)) for _ in range(64)]
        all_calling.wait(HANG_S)
    for outcome in threads:
        assert outcome.join().error is None


@BACKENDS
def test_a_call_from_the_loop_thread_is_refused(backend: str) -> None:
    """It would wait for its own loop forever: it raises RuntimeError in the loop, which
    reaches the outer caller."""

    async def noop() -> None:
        await anyio.lowlevel.checkpoint()

    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(open_crossing()) as crossing,
    ):
        inner = _Outcome(lambda: crossing.call(lambda: crossing.call(noop))).join()
    assert isinstance(inner.error, RuntimeError)
    assert "own event loop thread" in str(inner.error)


@BACKENDS
def test_a_consumer_waiting_in_another_thread_when_the_block_exits(
    node: NodeProcess, backend: Any
) -> None:
    """A thread iterates a consumer on a topic nobody writes to; the main thread leaves
    the ``with connect()`` block: the waiting thread gets ClientClosedError (its consumer
    closes on the way out), the block's exit returns, later calls are refused."""
    topic = f"closing-{backend}"
    iterating = threading.Event()

    def iterate(client: Any) -> None:
        with client.consumer(topic, start="latest", wait_ms=100) as consumer:
            iterating.set()
            next(consumer)

    def use_and_close() -> tuple[_Outcome, Any]:
        with connect(node.address, backend=backend) as client:
            client.admin.create_topic(topic, 1, exist_ok=True)
            producer = client.producer(acks="leader")
            reader = _Outcome(lambda: iterate(client))
            assert iterating.wait(HANG_S)
        return reader, producer

    reader, producer = _Outcome(use_and_close).join().value
    assert isinstance(reader.join().error, ClientClosedError)
    with pytest.raises(ClientClosedError, match="closed"):
        producer.send(topic, b"late")
