"""A node's lifecycle: its store, its topics, its role, its ack policy and its client
server, started and stopped in the right order.

Order matters at both ends. Starting: recover the store, load the topics, then listen,
so no client ever reaches a half-open node; the real bound port is reported only once
the listener exists. Stopping: stop accepting, let in-flight requests finish (durable
acks included: the flusher still runs), close the connections, and only then leave the
store's block, which flushes and writes the clean checkpoint.

The role (``[replication]`` in the config) decides three things:

* a master without ``ha_port`` holds :class:`StandaloneAcks` (``replicated`` refused);
* a master with ``ha_port`` also runs an :class:`~replication.master.HAService` and holds
  :class:`~cluster.node.acks.ReplicatedAcks` (waits for slaves, reads bounded by the
  confirm offset);
* a slave runs an :class:`~replication.slave.HAClient` in a reconnect loop and answers
  every write with ``NOT_MASTER`` naming ``master_client`` (:class:`NodeRequestHandler`).

Epochs (``replication.epochs``, the file ``<data_dir>/epochs``): a master with an HA
port starts a new term on every start, saved before it serves a write; a slave's
:class:`~replication.slave.HAClient` shares the node's one history object across
reconnects, so the epochs it adopts or cuts are the ones a later ``promote`` extends.
A master that a slave proves stale (:attr:`HAService.stale`) refuses writes with
``NOT_MASTER``. ``promote`` and ``repoint`` (admin ops) switch roles without a restart;
a slave keeps its topic registry in step with the master's ``list_topics``.

Replication runs in its own cancel scope, ended only once the client server has
drained: a request waiting for its replicated ack during the shutdown still gets it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from cluster.node.acks import AckPolicy, ReplicatedAcks, SlaveAcks, StandaloneAcks
from cluster.node.config import NodeConfig
from cluster.node.coordinated import CoordinatedAcks, Coordinator
from cluster.node.handler import NodeRequestHandler
from cluster.node.health_http import serve_monitoring
from cluster.node.metrics import NodeMetrics
from cluster.node.role import (
    Candidate,
    Fenced,
    Role,
    RoleError,
    Slave,
    Stale,
    become_stale,
    configured,
    describe,
)
from cluster.node.role import promote as promoted_role
from cluster.node.role import repoint as repointed_role
from cluster.node.status import (
    MasterReplicationStatus,
    NodeStatus,
    SlaveReplicationStatus,
    TlsStatus,
    tls_status,
    to_wire,
)
from cluster.node.topic_sync import TopicSync
from cluster.node.topics import TopicExistsError, TopicRegistry
from cluster.protocol import Status
from cluster.server import (
    ClientServer,
    RequestError,
)
from replication.epochs import EpochFile, EpochHistory
from replication.master import HAService
from replication.slave import SlaveReplication
from replication.state import begin_term
from storage import MessageStore
from storage.names import is_internal_topic_name

__all__ = ["Node", "serve_until_signalled"]

log = logging.getLogger(__name__)


class Node:
    """One tidelog node; :meth:`run` it in a nursery, stop it with :meth:`request_shutdown`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._shutdown = trio.Event()
        self._started_at = 0.0
        self.store: MessageStore | None = None
        self.topics: TopicRegistry | None = None
        self.server: ClientServer | None = None
        self.handler: NodeRequestHandler | None = None
        self.acks: AckPolicy | None = None
        self.address: tuple[str, int] | None = None
        self.ha: HAService | None = None
        self.ha_address: tuple[str, int] | None = None
        self.slave: SlaveReplication | None = None
        replication = config.replication
        self.role: Role = configured(
            replication.role,
            ha_port=replication.ha_port,
            master_ha=replication.master_ha,
            master_client=replication.master_client or None,
        )
        """The role now (:mod:`cluster.node.role`): the configured one until a transition.
        Changed only under ``_role_lock`` (promote, repoint) or by :meth:`_observe_stale`.
        :attr:`slave`, :attr:`ha` and :attr:`acks` are the I/O objects that serve it."""
        self.epoch_file = EpochFile.in_dir(config.data_dir)
        self.history = EpochHistory()
        self._standalone: StandaloneAcks | None = None
        self._replication_nursery: trio.Nursery | None = None
        self._replication_scope = trio.CancelScope()
        self._topic_sync_scope = trio.CancelScope()
        self.topic_sync: TopicSync | None = None
        """A slave's topic sync (:mod:`cluster.node.topic_sync`); None on a master."""
        self._role_lock = trio.Lock()
        self.coordinator: Coordinator | None = None
        """With etcd (``[coordination] etcd``): runs the HA loop that decides the role."""
        self.metrics = NodeMetrics(self) if config.node.metrics_port >= 0 else None
        """With ``node.metrics_port``: the Prometheus registry ``/metrics`` serves."""
        self.metrics_address: tuple[str, int] | None = None
        self.stopped_itself: str | None = None
        """Why the node stopped on its own (not asked to): its storage failed while it was
        in a group with failover. None while running, and after a requested stop."""
        if config.coordinated:
            self.role = Candidate()

    def request_shutdown(self) -> None:
        """Stop gracefully (see :meth:`run`); safe to call at any time, more than once."""
        if not self._shutdown.is_set():
            log.info("node_shutdown_requested name=%s", self.config.node.name)
        self._shutdown.set()

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the store, epochs and topics, listen, report ``(host, port)`` with the port
        really bound, and serve until :meth:`request_shutdown` (graceful) or cancellation."""
        config = self.config
        self._started_at = trio.current_time()
        log.info("node_starting name=%s data_dir=%s", config.node.name, config.data_dir)
        async with MessageStore.open(config.store) as store:
            self.store = store
            self.history = await trio.to_thread.run_sync(self.epoch_file.load)
            if not config.replication.is_slave and not config.coordinated:
                # A new term on every start of a node that takes writes, saved before the
                # first write is served, with or without an HA port: every record is in
                # a term of the node that wrote it, so a slave (or a copy of this data
                # dir started on its own and then made a slave) can always tell which
                # of its records a master wrote (issue 7 point 1).
                entry = begin_term(self.history, store.commit_log.max_offset)
                await self._save_history()
                log.info("epoch_started epoch=%d start=%d", entry.epoch, entry.start_offset)
            self.topics = await TopicRegistry.open(config.topics_path)
            self.handler = self._build_handler(store, self.topics)
            self.server = ClientServer(
                self.handler, config.server, config.node.host, config.node.port
            )
            replication_scope = self._replication_scope

            async def serve_clients(
                *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
            ) -> None:
                assert self.server is not None
                try:
                    await self.server.serve(task_status=task_status)
                finally:
                    replication_scope.cancel()  # drained: no request waits for slaves now

            async with trio.open_nursery() as nursery:
                replication = await nursery.start(self._replication_tasks, replication_scope)
                self._replication_nursery = replication
                if self.ha is not None:
                    port = await replication.start(self._serve_slaves, config.replication.ha_port)
                    self.ha_address = (config.ha_host, port)
                if self.slave is not None:
                    replication.start_soon(self.slave.run)
                    replication.start_soon(self._sync_topics)
                self.address = await nursery.start(serve_clients)
                if self.metrics is not None:  # /metrics and /health, up until clients drained
                    self.metrics.watch_store(store)
                    self.metrics_address = await replication.start(
                        serve_monitoring, self, config.node.host, config.node.metrics_port
                    )
                if config.coordinated:
                    await self._start_coordination(replication)
                log.info(
                    "node_ready name=%s role=%s host=%s port=%d topics=%d log_end=%d epoch=%s",
                    config.node.name,
                    self.role.name,
                    *self.address,
                    len(self.topics),
                    store.commit_log.max_offset,
                    self.epoch,
                )
                task_status.started(self.address)
                await self._shutdown.wait()
                if self.coordinator is not None:
                    await self.coordinator.shutdown()
                self.server.stop()
        log.info("node_stopped name=%s", config.node.name)

    async def _start_coordination(self, nursery: trio.Nursery) -> None:
        """Join the group through etcd (:mod:`cluster.node.coordinated`): the HA loop
        decides from now on whether this node is master or whom it follows."""
        from cluster.coordination.etcd import EtcdClient

        settings = self.config.coordination.settings
        etcd = EtcdClient(settings.etcd_endpoints, request_timeout_s=settings.request_timeout_s)
        self.coordinator = Coordinator(self, etcd)
        nursery.start_soon(self.coordinator.run)
        nursery.start_soon(self._leave_when_storage_fails)

    async def _leave_when_storage_fails(self) -> None:
        """With failover, a node whose log failed (fdatasync error, vanished segment) takes
        no writes until restarted: as master it would keep the group without a writable
        node. So it stops: the shutdown resigns its lease at once, a healthy in-sync
        replica is elected, and the exit says why (Kafka's broker goes offline the same
        way when its log directories fail). Without failover the node stays up for reads."""
        assert self.store is not None
        failure = await self.store.commit_log.wait_failed()
        self.stopped_itself = f"storage failed, left the group so a replica takes over: {failure}"
        log.critical(
            "node_leaving_group name=%s role=%s reason=storage_failed error=%s",
            self.config.node.name,
            self.role.name,
            failure,
        )
        self.request_shutdown()

    @property
    def epoch(self) -> int | None:
        """The current epoch of this node's log (the master's term it is in)."""
        current = self.history.current
        return current.epoch if current is not None else None

    async def _save_history(self) -> None:
        snapshot = EpochHistory(self.history.entries)
        await trio.to_thread.run_sync(self.epoch_file.save, snapshot)

    def _build_handler(self, store: MessageStore, topics: TopicRegistry) -> NodeRequestHandler:
        """The ack policy and handler of the configured role (see the module docstring)."""
        config = self.config
        replication = config.replication
        self._standalone = StandaloneAcks(store)
        self.acks = self._standalone
        role = self.role
        if isinstance(role, Slave):
            self.topic_sync = TopicSync(topics, self._master_client)
            self.slave = SlaveReplication(
                store,
                config.node.name,
                role.master_ha,
                replication.settings,
                history=self.history,
                epoch_file=self.epoch_file,
            )
            self.slave.client.on_read_limit_moved = self.read_limit_moved
            self.acks = SlaveAcks(self._standalone, self.slave)
        elif role.serves_slaves:
            self.ha = self._ha_service(store)
            self.acks = ReplicatedAcks(self._standalone, self.ha, replication.min_insync_replicas)
        return NodeRequestHandler(
            store,
            topics,
            self.acks,
            config.topics,
            max_pull_bytes=config.server.max_frame_size // 2,
            status=self.status,
            node=self,
        )

    def _ha_service(self, store: MessageStore) -> HAService:
        """The master's HA endpoint with the ``[replication]`` knobs; one place, so a
        promoted slave serves its slaves exactly as a configured master would. With etcd,
        only members of the group may replicate, count for acks or prove it stale."""
        ha = HAService(
            store,
            self.config.replication.settings,
            history=self.history,
            peer_allowed=self._is_group_member if self.config.coordinated else None,
        )
        ha.on_confirm_moved = self.read_limit_moved
        return ha

    def read_limit_moved(self) -> None:
        """Replication moved the confirm offset (this master's, or the one a slave
        heard): wake the long polls the read limit now covers. The limit asked is the
        ack policy's, which may differ from the confirm offset (a fenced master's
        frozen limit, an elected master's floor)."""
        if self.store is not None and self.acks is not None:
            self.store.read_limit_moved(self.acks.read_limit())

    def _is_group_member(self, name: str) -> bool:
        """Whether etcd's last listing holds ``name`` as a member of this node's group."""
        view = self.coordinator.loop.view if self.coordinator is not None else None
        return view is not None and name in view.members

    def check_writable(self) -> None:
        """Raise ``NOT_MASTER`` unless this node may take writes now.

        A stale master (a slave proved a newer epoch exists) answers with no hint: it
        does not know the new master's client address, and its own writes could be cut
        on every slave, so it must take none.
        """
        refusal = self._observe_stale().write_refusal(self.epoch)
        if refusal is not None:
            master, epoch = refusal.master, self.epoch
            if self.coordinator is not None:
                master, epoch = self.coordinator.hint()
                if master == self.coordinator.client_address:
                    master = None  # this node's own (fenced) leadership: no hint
            raise RequestError(Status.NOT_MASTER, refusal.message, master=master, epoch=epoch)

    def _observe_stale(self) -> Role:
        """The role, after taking in what the HA service learned: a slave that proved a
        newer master exists makes this master :class:`~cluster.node.role.Stale`."""
        if (
            self.ha is not None
            and self.ha.stale is not None
            and not isinstance(self.role, Stale | Fenced)
        ):
            self.role = become_stale(self.role, self.ha.stale)
            log.error(
                "node_stale name=%s reason=%s writes=refused", self.config.node.name, self.ha.stale
            )
        return self.role

    async def promote(self, ha_port: int) -> dict[str, Any]:
        """Turn this slave into a master without a restart; return the new epoch and HA
        address. Order: stop following (no chunk is applied after this), drop a partial
        record the old master had sent, start a new term and save it, open the HA port,
        and only then switch the ack policy and take writes."""
        async with self._role_lock:
            try:
                master = promoted_role(self._observe_stale(), ha_port, self.epoch)
            except RoleError as exc:
                raise RequestError(Status.BAD_REQUEST, str(exc)) from None
            slave = self.slave
            assert slave is not None, "a slave role runs its follower"
            assert self.store is not None and self.handler is not None
            assert self._standalone is not None and self._replication_nursery is not None
            await slave.stop()
            self._topic_sync_scope.cancel()
            self.topic_sync = None
            commit_log = self.store.commit_log
            commit_log.discard_raw_pending()
            entry = begin_term(self.history, commit_log.max_offset)
            await self._save_history()
            ha = self._ha_service(self.store)
            self.ha = ha
            port = await self._replication_nursery.start(self._serve_slaves, ha_port)
            self.ha_address = (self.config.ha_host, port)
            self.acks = ReplicatedAcks(
                self._standalone, ha, self.config.replication.min_insync_replicas
            )
            self.handler.set_acks(self.acks)
            await self._register_logged_topics()
            self.slave = None
            self.role = master
            log.warning(
                "node_promoted name=%s epoch=%d epoch_start=%d ha_port=%d",
                self.config.node.name,
                entry.epoch,
                entry.start_offset,
                port,
            )
            return {
                "epoch": entry.epoch,
                "epoch_start": entry.start_offset,
                "ha_address": f"{self.config.ha_host}:{port}",
            }

    async def _register_logged_topics(self) -> None:
        """Register every topic the log holds records of but the registry lacks.

        A slave learns topics from the master's list once a second (its topic sync); a
        topic created just before the master was lost may have records here and no
        entry. A new master must accept writes to it, so its queue count is taken from
        the log: one past the highest queue id with records (a lower bound of the old
        master's count when its last queues were empty).
        """
        assert self.store is not None and self.topics is not None
        counts: dict[str, int] = {}
        for topic, queue_id in self.store.queues.queues:
            counts[topic] = max(counts.get(topic, 0), queue_id + 1)
        for topic, queues in sorted(counts.items()):
            if is_internal_topic_name(topic):
                continue  # the node's own (group offsets): never a client's topic
            if self.topics.get(topic) is None:
                try:
                    await self.topics.create(topic, queues)
                except TopicExistsError:
                    continue
                log.warning("topic_registered_from_log topic=%s queues=%d", topic, queues)

    async def repoint(self, master_ha: str, master_client: str | None) -> dict[str, Any]:
        """Make this slave follow another master (after a promotion elsewhere)."""
        async with self._role_lock:
            try:
                slave_role = repointed_role(self.role, master_ha, master_client)
            except RoleError as exc:
                raise RequestError(Status.BAD_REQUEST, str(exc)) from None
            assert self.slave is not None, "a slave role runs its follower"
            self.slave.repoint(master_ha)
            self.role = slave_role
            log.warning(
                "node_repointed name=%s master_ha=%s master_client=%s",
                self.config.node.name,
                master_ha,
                slave_role.master_client,
            )
            return {"master_ha": master_ha, "master_client": slave_role.master_client}

    @staticmethod
    async def _replication_tasks(
        scope: trio.CancelScope, *, task_status: trio.TaskStatus[trio.Nursery]
    ) -> None:
        """The nursery replication tasks run in (HA service, follow loop, topic sync),
        under ``scope``: cancelled only once the client server has drained, and able
        to take new tasks later (a promotion starts the HA service in it)."""
        with scope:
            async with trio.open_nursery() as nursery:
                task_status.started(nursery)
                await trio.sleep_forever()

    async def _serve_slaves(self, port: int, *, task_status: trio.TaskStatus[int]) -> None:
        assert self.ha is not None
        await self.ha.serve(self.config.ha_host, port, task_status=task_status)

    def _master_client(self) -> str | None:
        """Where a slave's master takes client requests now (None: unknown, or not a slave)."""
        return self.role.master_client if isinstance(self.role, Slave) else None

    async def _sync_topics(self) -> None:
        """Keep the topic registry in step with the master's until promoted."""
        assert self.topic_sync is not None
        with self._topic_sync_scope:
            await self.topic_sync.run()

    async def sync_topics_now(self) -> None:
        """One topic sync round now (a read named a topic this slave does not know)."""
        if self.topic_sync is not None and isinstance(self.role, Slave):
            await self.topic_sync.sync_now()

    def _replication_status(self) -> MasterReplicationStatus | SlaveReplicationStatus | None:
        """``status.replication``: None for a master without an HA port."""
        role = self._observe_stale()
        if self.slave is not None:
            slave = self.slave.status()
            return SlaveReplicationStatus(
                role=role.name,
                epoch=self.epoch,
                master_ha=slave.master_ha,
                connected=slave.connected,
                acked_offset=slave.acked_offset,
                master_offset=slave.master_offset,
                reconnects=slave.reconnects,
                last_truncation=slave.last_truncation,
                confirm_offset=slave.confirm_offset,
                last_restart=slave.last_restart,
                last_error=slave.last_error,
                halted=slave.halted,
            )
        if role.serves_slaves and self.ha is not None:
            assert isinstance(self.acks, ReplicatedAcks | CoordinatedAcks), describe(role)
            host, port = self.ha_address or (self.config.ha_host, self.config.replication.ha_port)
            current = self.history.current
            return MasterReplicationStatus.of(
                self.acks.ack_status(),
                role=role.name,
                ha_address=f"{host}:{port}",
                epoch=self.epoch,
                epoch_start=current.start_offset if current is not None else None,
                stale=self.ha.stale,
            )
        return None

    def node_status(self) -> NodeStatus:
        """The ``status`` op's result, typed (:meth:`status` is its wire map)."""
        assert self.store is not None and self.topics is not None and self.server is not None
        store = self.store.status()
        commit_log = self.store.commit_log
        host, port = self.address or (self.config.node.host, self.config.node.port)
        role = self._observe_stale()
        return NodeStatus(
            role=role.name,
            writable=role.write_refusal(self.epoch) is None
            and commit_log.failure is None
            and not self.server.handler.disk_full
            and (self.coordinator is None or self.coordinator.loop.may_acknowledge()),
            min_offset=commit_log.min_offset,
            max_offset=commit_log.max_offset,
            flushed_offset=commit_log.flushed_offset,
            replication=self._replication_status(),
            node=self.config.node.name,
            address=f"{host}:{port}",
            epoch=self.epoch,
            topics=len(self.topics),
            connections=self.server.connections,
            uptime_ms=int((trio.current_time() - self._started_at) * 1000),
            store=store,
            coordination=self.coordinator.status() if self.coordinator is not None else None,
            tls=self._tls_status(),
        )

    def _tls_status(self) -> TlsStatus:
        server, replication = self.config.server, self.config.replication
        client = server.tls
        return tls_status(
            client_tls=client is not None,
            client_certs_required=client is not None and bool(client.ca_file),
            ha_port=replication.ha_port >= 0 or replication.is_slave,
            ha_tls=replication.tls is not None,
            peer_names=replication.tls_peer_names,
        )

    def metadata(self) -> dict[str, Any]:
        """The ``metadata`` op's result: the group as this node sees it. With etcd from
        the HA loop's last view; without, the static view (this node, and the master
        it is configured to follow)."""
        if self.coordinator is not None:
            return self.coordinator.metadata()
        assert self.topics is not None
        host, port = self.address or (self.config.node.host, self.config.node.port)
        me = f"{host}:{port}"
        role = self._observe_stale()
        ha = f"{self.ha_address[0]}:{self.ha_address[1]}" if self.ha_address else None
        if isinstance(role, Slave):
            master = {"name": None, "client": role.master_client, "ha": role.master_ha}
        elif role.write_refusal(self.epoch) is None:
            master = {"name": self.config.node.name, "client": me, "ha": ha}
        else:
            master = None
        return {
            "cluster": None,
            "group": None,
            "epoch": self.epoch,
            "master": master,
            "members": [
                {
                    "name": self.config.node.name,
                    "client": me,
                    "ha": ha,
                    "role": role.name,
                    "epoch": self.epoch,
                    "log_end": self.store.commit_log.max_offset if self.store else 0,
                    "in_sync": True,
                }
            ],
            "topics": [{"name": t.name, "queues": t.queues} for t in self.topics.list()],
        }

    def status(self) -> dict[str, Any]:
        """The ``status`` op's result as the wire map."""
        return to_wire(self.node_status())


async def serve_until_signalled(
    config: NodeConfig, *, on_ready: Callable[[str, int], None]
) -> str | None:
    """Run a node until SIGTERM or SIGINT, then shut it down gracefully.

    ``on_ready(host, port)`` is called once the node listens. A second signal during
    the shutdown stops waiting for in-flight requests (the store is still closed
    cleanly: its shutdown is shielded). Returns why the node stopped on its own
    (:attr:`Node.stopped_itself`), None when a signal stopped it.
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
    return node.stopped_itself


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
