"""A node: its store, its topics, its ack policy and its client server, started and
stopped in the right order.

Order matters at both ends. Starting: recover the store, load the topics, then listen,
so no client ever reaches a half-open node; the real bound port is reported only once
the listener exists. Stopping: stop accepting, let in-flight requests finish (durable
acks included: the flusher still runs), close the connections, and only then leave the
store's block, which flushes and writes the clean checkpoint.

The role (``[replication]`` in the config) decides three things:

* a master without ``ha_port`` holds :class:`StandaloneAcks` (``replicated`` refused);
* a master with ``ha_port`` also runs an :class:`~replication.ha.HAService` and holds
  :class:`~replication.acks.ReplicatedAcks` (waits for slaves, reads bounded by the
  confirm offset);
* a slave runs an :class:`~replication.ha.HAClient` in a reconnect loop and answers
  every write with ``NOT_MASTER`` naming ``master_client`` (:class:`SlaveRequestHandler`).

Replication runs in its own cancel scope, ended only once the client server has
drained: a request waiting for its replicated ack during the shutdown still gets it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from cluster.config import NodeConfig
from cluster.protocol import SCHEMAS, Acks, Request, Status
from cluster.server import (
    AckPolicy,
    ClientServer,
    Deferred,
    Reply,
    RequestError,
    RequestHandler,
    Wakeups,
)
from cluster.topics import TopicRegistry
from replication.acks import ReplicatedAcks
from replication.ha import HAClient, HAProtocolError, HAService
from replication.transfer import TransferError
from storage import MessageStore

__all__ = ["Node", "SlaveRequestHandler", "StandaloneAcks", "serve_until_signalled"]

RECONNECT_BACKOFF_MIN = 0.05
"""First pause of a slave before reconnecting to its master (seconds)."""
RECONNECT_BACKOFF_MAX = 2.0
"""The pause doubles per failed attempt up to this, so a master that is down for long
is not hammered, and one that is back is found within two seconds."""

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


class SlaveRequestHandler(RequestHandler):
    """A slave's request handler: reads as usual, every write refused with ``NOT_MASTER``.

    The check uses the protocol's own list of writes (``OpSchema.writes``) and runs
    before the op, so nothing reaches the slave's store or topic registry (not even
    ``auto_create``) except the master's stream, and the refusal is safe to resend.
    """

    def __init__(self, *args: Any, master_hint: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.master_hint = master_hint

    async def handle(self, request: Request, polls: Wakeups) -> Reply | Deferred:
        if SCHEMAS[request["op"]].writes:
            where = self.master_hint
            raise RequestError(
                Status.NOT_MASTER,
                f"this node is a slave; resend to the master at {where}"
                if where
                else "this node is a slave and knows no master client address; "
                "resend to the master",
                master=where,
            )
        return await super().handle(request, polls)


class SlaveReplication:
    """A slave's side: follow the master's HA port, reconnecting with backoff forever."""

    def __init__(self, store: MessageStore, name: str, master_ha: str) -> None:
        host, _, port = master_ha.rpartition(":")
        self.master_ha = master_ha
        self._address = (host, int(port))
        self.client = HAClient(store, name)
        self.connected = False
        self.reconnects = 0

    async def run(self) -> None:
        """Replicate until cancelled. Each attempt resumes from the store's end (the client
        says where it stands), so a broken stream loses nothing."""
        backoff = RECONNECT_BACKOFF_MIN
        while True:
            self.client.master_offset = None
            try:
                await self._run_once()
                problem = "master closed the stream"
            except (OSError, HAProtocolError, TransferError) as exc:
                problem = repr(exc)
            if self.client.master_offset is not None:
                backoff = RECONNECT_BACKOFF_MIN  # it was connected: the next failure is new
            self.reconnects += 1
            log.warning(
                "ha_reconnect master=%s reason=%s in_s=%.2f attempt=%d",
                self.master_ha,
                problem,
                backoff,
                self.reconnects,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)

    async def _run_once(self) -> None:
        try:
            self.connected = True
            await self.client.run(*self._address)
        finally:
            self.connected = False

    def status(self) -> dict[str, Any]:
        client = self.client
        return {
            "master_ha": self.master_ha,
            "connected": self.connected and client.master_offset is not None,
            "acked_offset": client.acked_offset,
            "master_offset": client.master_offset,
            "reconnects": self.reconnects,
        }


class Node:
    """One tidelog node; :meth:`run` it in a nursery, stop it with :meth:`request_shutdown`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._shutdown = trio.Event()
        self._started_at = 0.0
        self.store: MessageStore | None = None
        self.topics: TopicRegistry | None = None
        self.server: ClientServer | None = None
        self.acks: AckPolicy | None = None
        self.address: tuple[str, int] | None = None
        self.ha: HAService | None = None
        self.ha_address: tuple[str, int] | None = None
        self.slave: SlaveReplication | None = None

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
            handler = self._build_handler(store, self.topics)
            self.server = ClientServer(handler, config.server, config.node.host, config.node.port)
            replication_scope = trio.CancelScope()

            async def serve_clients(
                *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
            ) -> None:
                assert self.server is not None
                try:
                    await self.server.serve(task_status=task_status)
                finally:
                    replication_scope.cancel()  # drained: no request waits for slaves now

            async with trio.open_nursery() as nursery:
                if self.ha is not None:
                    port = await nursery.start(self._serve_slaves, replication_scope)
                    self.ha_address = (config.ha_host, port)
                if self.slave is not None:
                    nursery.start_soon(self._follow_master, replication_scope)
                self.address = await nursery.start(serve_clients)
                log.info(
                    "node_ready name=%s role=%s host=%s port=%d topics=%d log_end=%d",
                    config.node.name,
                    config.replication.role,
                    *self.address,
                    len(self.topics),
                    store.commit_log.max_offset,
                )
                task_status.started(self.address)
                await self._shutdown.wait()
                self.server.stop()
        log.info("node_stopped name=%s", config.node.name)

    def _build_handler(self, store: MessageStore, topics: TopicRegistry) -> RequestHandler:
        """The ack policy and handler of the configured role (see the module docstring)."""
        config = self.config
        replication = config.replication
        standalone = StandaloneAcks(store)
        self.acks = standalone
        handler_class: Any = RequestHandler
        extra: dict[str, Any] = {}
        if replication.is_slave:
            self.slave = SlaveReplication(store, config.node.name, replication.master_ha)
            handler_class = SlaveRequestHandler
            extra["master_hint"] = replication.master_client or None
        elif replication.serves_slaves:
            self.ha = HAService(store)
            self.acks = ReplicatedAcks(standalone, self.ha, replication.min_insync_replicas)
        return handler_class(
            store,
            topics,
            self.acks,
            config.topics,
            max_pull_bytes=config.server.max_frame_size // 2,
            status=self.status,
            **extra,
        )

    async def _serve_slaves(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[int]
    ) -> None:
        assert self.ha is not None
        with scope:
            await self.ha.serve(
                self.config.ha_host, self.config.replication.ha_port, task_status=task_status
            )

    async def _follow_master(self, scope: trio.CancelScope) -> None:
        assert self.slave is not None
        with scope:
            await self.slave.run()

    def _replication_status(self) -> dict[str, Any] | None:
        """``status.replication``: None for a master without an HA port."""
        role = self.config.replication.role
        if self.slave is not None:
            return {"role": role, **self.slave.status()}
        if isinstance(self.acks, ReplicatedAcks):
            host, port = self.ha_address or (self.config.ha_host, self.config.replication.ha_port)
            return {"role": role, "ha_address": f"{host}:{port}", **self.acks.status()}
        return None

    def status(self) -> dict[str, Any]:
        """The ``status`` op's result: the protocol's fields, then node and store detail."""
        assert self.store is not None and self.topics is not None and self.server is not None
        assert self.acks is not None
        store = self.store.status()
        host, port = self.address or (self.config.node.host, self.config.node.port)
        return {
            "role": self.config.replication.role,
            "writable": self.slave is None
            and not store["failed"]
            and not self.server.handler.disk_full,
            "min_offset": store["log_min_offset"],
            "max_offset": store["log_max_offset"],
            "flushed_offset": store["flushed_offset"],
            "replication": self._replication_status(),
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
