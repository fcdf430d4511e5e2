"""A node's Prometheus metrics: read from its status at scrape time, plus three timings.

Almost everything is read when Prometheus scrapes (:class:`NodeCollector`): the node
already keeps its role, epoch, offsets, connections, slaves' lag and counters for
``status``, so serving them costs the write path nothing. Only latencies need a hook,
each one cheap call on an already slow path:

* the ack wait of ``durable``, ``in_sync`` and ``replicated`` writes, from the append to
  the answer, taken where the connection's ack queue answers the write (the request
  handler's ``on_ack_answered`` is :meth:`NodeMetrics.ack_waited`; group offset
  commits likewise): the ack policy itself is not wrapped, so a write released by a
  slave's ack or an fsync takes the same wake-up path with metrics on as off, and a
  write answered through ``holds`` records the time it waited, not 0;
* the commit log's flushes and fdatasyncs (:attr:`storage.commit_log.CommitLog.on_flush`);
* errors answered, by status (the request handler's error path, and ack waits that end
  in a timeout status).

Each node has its own registry (tests run several nodes in one process). Everything
here runs on the node's event loop; a scrape reads the node between two of its steps,
so the figures of one scrape are consistent with each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cluster.node.status import MasterReplicationStatus, NodeStatus, SlaveReplicationStatus
from cluster.protocol import Acks, Status
from cluster.server.errors import status_of

if TYPE_CHECKING:
    from cluster.node.lifecycle import Node
    from storage import MessageStore

__all__ = ["LATENCY_BUCKETS_S", "ROLES", "NodeCollector", "NodeMetrics"]

LATENCY_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""From 100 us (a page-cache fdatasync) to 30 s (past any sane ack timeout)."""

ROLES: Final = ("master", "slave", "candidate", "fenced")
"""Every value of ``status.role``: ``tidelog_role`` has one series per role, 1 for the
current one, so a dashboard can count masters with ``sum(tidelog_role{role="master"})``."""


class NodeMetrics:
    """One node's metrics registry, its hooks, and the text a scrape gets.

    Built by the node when a metrics port is configured; the hooks are installed by
    :meth:`watch_store` (once the store is open) and by the request handler (which
    calls :meth:`ack_waited` for each write it answers). Called only from the node's
    event loop.
    """

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry()
        self.ack_wait = Histogram(
            "tidelog_ack_wait_seconds",
            "Time a write waited after its append for its ack level (durable: group commit; "
            "in_sync: the in-sync slaves; replicated: group commit and the in-sync slaves), "
            "whatever the outcome.",
            ["acks"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._ack_wait_by_level = {
            Acks.DURABLE: self.ack_wait.labels(Acks.DURABLE.value),
            Acks.IN_SYNC: self.ack_wait.labels(Acks.IN_SYNC.value),
            Acks.REPLICATED: self.ack_wait.labels(Acks.REPLICATED.value),
        }
        self.flush = Histogram(
            "tidelog_commitlog_flush_seconds",
            "A commit-log flush from its call to its end: waiting for the flush before it, "
            "then the fdatasync.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.fsync = Histogram(
            "tidelog_commitlog_fsync_seconds",
            "The fdatasync of the commit log's written segments alone (on its own thread).",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.errors = Counter(
            "tidelog_request_errors",
            "Requests answered with an error status (ack timeouts included), by status.",
            ["status"],
            registry=self.registry,
        )
        self.registry.register(NodeCollector(node))
        ProcessCollector(registry=self.registry)

    def watch_store(self, store: MessageStore) -> None:
        """Time the store's commit-log flushes from now on."""
        store.commit_log.on_flush = self._flushed

    def _flushed(self, flush_s: float, fsync_s: float) -> None:
        self.flush.observe(flush_s)
        self.fsync.observe(fsync_s)

    def ack_waited(self, acks: Acks, status: Status, waited_s: float) -> None:
        """A write at ``acks`` was answered ``status`` ``waited_s`` after its append."""
        histogram = self._ack_wait_by_level.get(acks)
        if histogram is not None:
            histogram.observe(waited_s)
        if status is not Status.OK:
            self.errors.labels(status.value).inc()

    def request_failed(self, exc: Exception) -> None:
        """A request raised ``exc``: count it under the status it is answered with."""
        self.errors.labels(status_of(exc).value).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric now."""
        return generate_latest(self.registry)


class NodeCollector(Collector):
    """Gauges and counters read from :meth:`Node.node_status` at each scrape.

    Before the node has opened its store (and while it starts) only ``tidelog_up`` and
    the role are reported.
    """

    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        name = node.config.node.name
        yield _gauge("tidelog_up", "1 while the node is open and serving.", node.store is not None)
        if node.store is None or node.server is None or node.topics is None:
            return
        status = node.node_status()
        yield from _node_metrics(name, status)
        dispatcher = node.store.dispatcher
        yield _counter(
            "tidelog_appended_messages",
            "Records appended to the log by this process (own writes on a master, replicated "
            "ones on a slave), counted as they are indexed.",
            dispatcher.records_dispatched,
        )
        yield _counter(
            "tidelog_appended_bytes",
            "Log bytes appended by this process, counted as they are indexed.",
            dispatcher.bytes_dispatched,
        )
        server = node.server
        yield _counter(
            "tidelog_client_connections_refused",
            "Client connections refused at the connection limit.",
            server.refused,
        )
        yield _counter(
            "tidelog_client_accept_failures",
            "Failed accepts of client connections (such as running out of file descriptors).",
            server.accept_failures,
        )
        yield _gauge(
            "tidelog_client_connections_max",
            "The client connection limit in force (lowered to what ulimit -n leaves).",
            server.max_connections,
        )
        replication = status.replication
        if isinstance(replication, MasterReplicationStatus):
            yield from _master_replication_metrics(replication)
        elif isinstance(replication, SlaveReplicationStatus):
            yield from _slave_replication_metrics(replication)
        if status.coordination is not None:
            yield from _coordination_metrics(status.coordination)


def _node_metrics(name: str, status: NodeStatus) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "tidelog_node_info",
        "The node's name and client address (value 1).",
        labels=["node", "address"],
    )
    info.add_metric([name, status.address], 1)
    yield info
    role = GaugeMetricFamily(
        "tidelog_role",
        "1 for the node's current role (status.role), 0 for the others.",
        labels=["role"],
    )
    for each in ROLES:
        role.add_metric([each], 1 if status.role == each else 0)
    yield role
    yield _gauge("tidelog_writable", "1 while the node takes writes now.", status.writable)
    if status.epoch is not None:
        yield _gauge("tidelog_epoch", "The epoch (master's term) of this node's log.", status.epoch)
    yield _gauge("tidelog_log_start_offset_bytes", "The log's first offset.", status.min_offset)
    yield _gauge("tidelog_log_end_offset_bytes", "The log's end offset.", status.max_offset)
    yield _gauge(
        "tidelog_log_flushed_offset_bytes",
        "Offset up to which the log is fsynced.",
        status.flushed_offset,
    )
    yield _gauge("tidelog_topics", "Topics in the registry.", status.topics)
    yield _gauge("tidelog_client_connections", "Open client connections.", status.connections)
    store: dict[str, Any] = status.store
    yield _gauge("tidelog_log_segments", "Commit-log segment files.", store["segments"])
    yield _gauge("tidelog_consume_queues", "Consume queues (topic, queue id).", store["queues"])
    yield _counter(
        "tidelog_commitlog_fsyncs", "Commit-log fdatasyncs since start.", store["fsyncs"]
    )
    yield _gauge(
        "tidelog_storage_failed", "1 once an fsync failed or a segment vanished.", store["failed"]
    )
    yield _gauge(
        "tidelog_disk_full", "1 while the disk is above its watermark.", store["disk_full"]
    )


def _master_replication_metrics(status: MasterReplicationStatus) -> Iterator[Metric]:
    lag_bytes = GaugeMetricFamily(
        "tidelog_replication_slave_lag_bytes",
        "How far each connected slave's acknowledged offset is behind this master's log end.",
        labels=["slave"],
    )
    lag_s = GaugeMetricFamily(
        "tidelog_replication_slave_lag_seconds",
        "How long each connected slave has not been caught up (0 when it is).",
        labels=["slave"],
    )
    in_sync = GaugeMetricFamily(
        "tidelog_replication_slave_in_sync",
        "1 for a connected slave the in-sync decision counts, 0 for one it does not.",
        labels=["slave"],
    )
    for lag, counted in [(lag, 1) for lag in status.in_sync] + [
        (lag, 0) for lag in status.out_of_sync
    ]:
        lag_bytes.add_metric([lag.name], lag.lag_bytes)
        lag_s.add_metric([lag.name], lag.lag_ms / 1000)
        in_sync.add_metric([lag.name], counted)
    yield lag_bytes
    yield lag_s
    yield in_sync
    yield _gauge(
        "tidelog_replication_in_sync_slaves",
        "Connected slaves the in-sync decision counts (what acks=replicated needs).",
        len(status.in_sync),
    )
    yield _gauge(
        "tidelog_replication_connected_slaves",
        "Slaves connected to the HA port.",
        len(status.slaves),
    )
    yield _gauge(
        "tidelog_replication_min_insync_replicas",
        "In-sync slaves acks=replicated needs.",
        status.min_insync_replicas,
    )
    yield _gauge(
        "tidelog_replication_confirm_offset_bytes",
        "Offset every in-sync slave holds: consumers read up to here.",
        status.confirm_offset,
    )
    yield _gauge(
        "tidelog_replication_replicated_offset_bytes",
        "Offset min_insync_replicas in-sync slaves held: in_sync/replicated acks are "
        "released up to here (it stops while fewer are in sync).",
        status.replicated_offset,
    )
    yield _gauge(
        "tidelog_replication_stale",
        "1 once a slave proved a newer master exists (writes refused).",
        status.stale is not None,
    )


def _slave_replication_metrics(status: SlaveReplicationStatus) -> Iterator[Metric]:
    yield _gauge(
        "tidelog_replication_connected",
        "1 while this slave is connected to its master.",
        status.connected,
    )
    if status.master_offset is not None and status.acked_offset is not None:
        yield _gauge(
            "tidelog_replication_master_lag_bytes",
            "How far this slave's acknowledged offset is behind the master's log end as the "
            "master last reported it.",
            max(0, status.master_offset - status.acked_offset),
        )
    yield _counter(
        "tidelog_replication_reconnects",
        "Connections to the master after the first.",
        status.reconnects,
    )
    yield _gauge(
        "tidelog_replication_confirm_offset_bytes",
        "The master's confirm offset as the stream carried it: reads on this slave stop here.",
        status.confirm_offset,
    )
    yield _gauge(
        "tidelog_replication_halted",
        "1 once this slave stopped following for good.",
        status.halted is not None,
    )


def _coordination_metrics(coordination: dict[str, Any]) -> Iterator[Metric]:
    yield _gauge(
        "tidelog_coordination_may_acknowledge",
        "1 while the HA loop lets this node acknowledge writes (its lease is confirmed).",
        bool(coordination.get("may_acknowledge")),
    )
    yield _gauge(
        "tidelog_coordination_etcd_reachable",
        "1 while etcd answered within the lease TTL.",
        bool(coordination.get("etcd_reachable")),
    )
    recorded = coordination.get("recorded_in_sync")
    if recorded is not None:
        yield _gauge(
            "tidelog_coordination_recorded_in_sync",
            "Members of the in-sync set recorded in etcd (the set a failover chooses from).",
            len(recorded),
        )
    remaining_ms = coordination.get("lease_remaining_ms")
    if remaining_ms is not None:
        yield _gauge(
            "tidelog_coordination_lease_remaining_seconds",
            "Time left before this master must stop acknowledging unless etcd confirms it.",
            remaining_ms / 1000,
        )


def _gauge(name: str, documentation: str, value: float | bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
