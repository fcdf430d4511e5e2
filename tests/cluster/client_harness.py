"""What the client tests share to run under both anyio backends, trio and asyncio.

The nodes run in a trio loop on a thread of their own (:class:`NodesInTrioThread`), so the
test's loop, trio or asyncio, belongs to the client alone; real sockets on loopback. A
test body runs once per backend with :func:`run` (a fresh loop each time); tests
synchronise on events and answers, never on sleeps.

Fixtures (``nodes``, ``requests``) are imported by the test modules that use them.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs
import pytest
import trio

from cluster.client import Connection, ConsumedMessage, Consumer, GroupConsumer
from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.protocol.address import format_address
from tests.conftest import SMALL_SEGMENT

__all__ = [
    "BACKENDS",
    "MAX_MESSAGE",
    "STORE",
    "NodesInTrioThread",
    "ThreadNode",
    "nodes",
    "ops",
    "requests",
    "run",
    "serving",
    "silent_peer",
    "take",
]

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])
"""Runs a test (taking ``backend``) once under each anyio backend."""

MAX_MESSAGE = 16 * 1024
STORE = {
    "segment_size": SMALL_SEGMENT,
    "max_message_size": MAX_MESSAGE,
    "consume_queue_entries": 64,
    "flush_interval_ms": 50,
    "flush_thorough_interval_ms": 200,
    "retention_check_interval_ms": 3_600_000,
}
"""Small segments and a small message bound: the node tests' store settings."""

_Result = TypeVar("_Result")


# ---- nodes ----------------------------------------------------------------------------------


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

    def call(self, function: Callable[[], Awaitable[_Result]]) -> _Result:
        """``function()`` awaited in the nodes' loop (where their state may be read)."""

        async def called() -> _Result:
            return await function()

        return trio.from_thread.run(called, trio_token=self._token)


@pytest.fixture
def nodes() -> Iterator[NodesInTrioThread]:
    with NodesInTrioThread() as host:
        yield host


@asynccontextmanager
async def serving(
    data_dir: Path, *, name: str = "node-1", **replication: Any
) -> AsyncIterator[tuple[Node, str]]:
    """A node on a free port in this trio loop, and its client address; shut down
    gracefully when the block ends (for trio-only tests of the node and the client)."""
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


# ---- the client's loop ---------------------------------------------------------------------


def run(backend: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` in a fresh event loop of ``backend``, bounded (a hang fails, fast)."""

    async def bounded() -> None:
        with anyio.fail_after(60):
            await body()

    anyio.run(bounded, backend=backend)


async def take(consumer: Consumer | GroupConsumer, count: int) -> list[ConsumedMessage]:
    """The next ``count`` messages ``consumer`` yields."""
    taken: list[ConsumedMessage] = []
    async for message in consumer:
        taken.append(message)
        if len(taken) == count:
            break
    return taken


@asynccontextmanager
async def silent_peer(*, hang_up: bool) -> AsyncIterator[str]:
    """A TCP listener in the running loop that reads requests and never answers (or hangs
    up on the first); yields its address."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while await stream.receive(65536):
                    if hang_up:
                        return
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            group.cancel_scope.cancel()


# ---- counting requests ---------------------------------------------------------------------


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[tuple[str, str]]:
    """(address, op) -> how many requests the client sent, over real connections."""
    sent: collections.Counter[tuple[str, str]] = collections.Counter()
    real_request = Connection.request_fields  # every request's path, ``request``'s too

    async def counted(self: Connection, op: str, timeout_s: float, fields: dict[str, Any]) -> Any:
        sent[(self.address, op)] += 1
        return await real_request(self, op, timeout_s, fields)

    monkeypatch.setattr(Connection, "request_fields", counted)
    return sent


def ops(sent: collections.Counter[tuple[str, str]], op: str) -> int:
    return sum(n for (_address, name), n in sent.items() if name == op)
