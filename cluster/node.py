"""A node: its store, its topics, its ack policy and its client server, started and
stopped in the right order.

Order matters at both ends. Starting: recover the store, load the topics, then listen,
so no client ever reaches a half-open node; the real bound port is reported only once
the listener exists. Stopping: stop accepting, let in-flight requests finish (durable
acks included: the flusher still runs), close the connections, and only then leave the
store's block, which flushes and writes the clean checkpoint.

This node is a master without slaves. The role-specific part is the :class:`AckPolicy`
it holds (here :class:`StandaloneAcks`); replication replaces it with one that waits
for in-sync slaves and bounds reads by the confirm offset, and fills ``replication``
and ``epoch`` in the status.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from cluster.config import NodeConfig
from cluster.protocol import Acks, Status
from cluster.server import ClientServer, RequestError, RequestHandler
from cluster.topics import TopicRegistry
from storage import MessageStore

__all__ = ["Node", "StandaloneAcks", "serve_until_signalled"]

log = logging.getLogger(__name__)


class StandaloneAcks:
    """Ack levels on a master with no slaves.

    ``durable`` waits for group commit. ``replicated`` is refused before anything is
    appended (``SLAVE_NOT_AVAILABLE``), so the client may resend it without risking a
    duplicate, or fall back to ``durable``.
    """

    def __init__(self, store: MessageStore) -> None:
        self._store = store

    def admit(self, acks: Acks) -> None:
        if acks is Acks.REPLICATED:
            raise RequestError(
                Status.SLAVE_NOT_AVAILABLE,
                "acks=replicated needs an in-sync slave and this node has none; nothing was "
                "written: resend later or with acks=durable",
            )

    async def wait(self, acks: Acks, end_offset: int, timeout: float) -> tuple[Status, str | None]:
        if await self._store.wait_durable(end_offset, timeout):
            return Status.OK, None
        return (
            Status.FLUSH_DISK_TIMEOUT,
            f"appended, but the fsync did not complete within {timeout * 1000:.0f} ms: the "
            "write is probably stored; resend only if duplicates are acceptable",
        )

    def read_limit(self) -> int | None:
        return None

    def status(self) -> dict[str, Any] | None:
        """Replication state for ``status``: none without replication."""
        return None


class Node:
    """One tidelog node; :meth:`run` it in a nursery, stop it with :meth:`request_shutdown`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._shutdown = trio.Event()
        self._started_at = 0.0
        self.store: MessageStore | None = None
        self.topics: TopicRegistry | None = None
        self.server: ClientServer | None = None
        self.acks: StandaloneAcks | None = None
        self.address: tuple[str, int] | None = None

    def request_shutdown(self) -> None:
        """Stop gracefully (see :meth:`run`); safe to call at any time, more than once."""
        if not self._shutdown.is_set():
            log.info("node_shutdown_requested name=%s", self.config.node.name)
        self._shutdown.set()

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the store and topics, listen, report ``(host, port)`` with the port really
        bound, and serve until :meth:`request_shutdown` (graceful) or cancellation."""
        config = self.config
        self._started_at = trio.current_time()
        log.info("node_starting name=%s data_dir=%s", config.node.name, config.data_dir)
        async with MessageStore.open(config.store) as store:
            self.store = store
            self.topics = await TopicRegistry.open(config.topics_path)
            self.acks = StandaloneAcks(store)
            handler = RequestHandler(
                store,
                self.topics,
                self.acks,
                config.topics,
                max_pull_bytes=config.server.max_frame_size // 2,
                status=self.status,
            )
            self.server = ClientServer(handler, config.server, config.node.host, config.node.port)
            async with trio.open_nursery() as nursery:
                self.address = await nursery.start(self.server.serve)
                log.info(
                    "node_ready name=%s host=%s port=%d topics=%d log_end=%d",
                    config.node.name,
                    *self.address,
                    len(self.topics),
                    store.commit_log.max_offset,
                )
                task_status.started(self.address)
                await self._shutdown.wait()
                self.server.stop()
        log.info("node_stopped name=%s", config.node.name)

    def status(self) -> dict[str, Any]:
        """The ``status`` op's result: the protocol's fields, then node and store detail."""
        assert self.store is not None and self.topics is not None and self.server is not None
        assert self.acks is not None
        store = self.store.status()
        host, port = self.address or (self.config.node.host, self.config.node.port)
        return {
            "role": "master",
            "writable": not store["failed"] and not self.server.handler.disk_full,
            "min_offset": store["log_min_offset"],
            "max_offset": store["log_max_offset"],
            "flushed_offset": store["flushed_offset"],
            "replication": self.acks.status(),
            "node": self.config.node.name,
            "address": f"{host}:{port}",
            "epoch": None,
            "topics": len(self.topics),
            "connections": self.server.connections,
            "uptime_ms": int((trio.current_time() - self._started_at) * 1000),
            "store": store,
        }


async def serve_until_signalled(
    config: NodeConfig, *, on_ready: Callable[[str, int], None]
) -> None:
    """Run a node until SIGTERM or SIGINT, then shut it down gracefully.

    ``on_ready(host, port)`` is called once the node listens. A second signal during
    the shutdown stops waiting for in-flight requests (the store is still closed
    cleanly: its shutdown is shielded).
    """
    node = Node(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_node(
                *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
            ) -> None:
                await node.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # the node is done: stop watching signals

            nursery.start_soon(_watch_signals, signals, node, nursery.cancel_scope)
            host, port = await nursery.start(run_node)
            on_ready(host, port)


async def _watch_signals(signals: AsyncIterator[int], node: Node, scope: trio.CancelScope) -> None:
    """First signal: graceful shutdown. Second: stop waiting for in-flight requests."""
    count = 0
    async for signum in signals:
        count += 1
        log.info("node_signal signal=%s count=%d", signal.Signals(signum).name, count)
        if count == 1:
            node.request_shutdown()
        else:
            scope.cancel()
            return
