"""The node's side of automatic failover: the :class:`~cluster.coordination.ha_loop.NodeActions`
the HA loop drives, and the ack policy of an elected master.

The HA loop decides (etcd transactions are the only arbiter); this module carries the
decisions out on the node's I/O objects and nothing else:

* :meth:`Coordinator.become_master` appends ``(epoch, log end)`` to the epoch file and
  fsyncs it *before* the node serves a write in that epoch, then opens the HA port and
  switches to :class:`CoordinatedAcks`.
* :meth:`Coordinator.become_slave` closes the HA port and follows the elected master's
  HA address; the follower's handshake cuts a divergent tail by the epoch walk.
* :meth:`Coordinator.fence` is synchronous: writes are refused and the read limit is
  frozen before the call returns.

Concurrency: everything runs on the node's trio loop. The loop calls the actions one at
a time; request handlers call :class:`CoordinatedAcks`, ``metadata``, ``status`` and
``switchover`` concurrently with them; the role changes under the node's role lock.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import trio

from cluster.coordination.decisions import (
    ElectionView,
    caught_up_since_start,
    members_to_record,
)
from cluster.coordination.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    PutOp,
)
from cluster.coordination.ha_loop import HaLoop, HaRole
from cluster.coordination.keys import (
    GroupState,
    LeaderValue,
    MemberInfo,
    SwitchoverValue,
    TopicRecord,
)
from cluster.node.acks import ReplicatedAcks, SlaveAcks
from cluster.node.role import Fenced, RoleError, Slave, elected, fence, follow
from cluster.node.topic_changes import ADMIN_ETCD_TIMEOUT_S, ListingFollower, etcd_for_topic_change
from cluster.node.topics import Topic, TopicExistsError
from cluster.protocol import Acks, Status
from cluster.server import RequestError
from replication.master import HAService
from replication.slave import SlaveReplication
from storage.backoff import Backoff, retry_log_level

if TYPE_CHECKING:
    from cluster.node.lifecycle import Node
    from storage.waiters import WakeHandle

__all__ = ["CoordinatedAcks", "Coordinator"]

log = logging.getLogger(__name__)

_IN_SYNC: Final = Acks.IN_SYNC
_REPLICATED: Final = Acks.REPLICATED
"""Identity tests on the per-write path (as in :mod:`cluster.node.acks`)."""

ETCD_FIRST_READ_MAX_PAUSE_S = 5.0
"""Longest pause between tries of a node's first etcd read (etcd down at start)."""


async def wait_until(
    progress: trio.lowlevel.ParkingLot, ready: Callable[[], bool], deadline: float
) -> bool:
    """True once ``ready()`` holds, False once ``deadline`` passed first. ``ready`` is
    re-checked each time ``progress`` is unparked (whoever changes what it reads
    unparks it), so nothing polls."""
    while not ready():
        if trio.current_time() >= deadline:
            return False
        with trio.move_on_at(deadline):
            await progress.park()
    return True


class CoordinatedAcks:
    """The ack policy of a master elected through etcd: :class:`ReplicatedAcks` gated by
    the HA loop's fencing deadline and by the recorded in-sync set.

    * Every write is refused ``NOT_MASTER`` (before anything is appended) unless
      :meth:`HaLoop.may_acknowledge` holds; a write appended before the deadline but
      answered after it gets an outcome-unknown status, never ``OK``.
    * ``acks=replicated`` (and ``in_sync``, alike here) needs ``min_insync_replicas``
      recorded slaves in every set the record may end up as
      (:meth:`InSyncRecord.admits_replicated`), else ``SLAVE_NOT_AVAILABLE`` before
      append; it then waits for the HA confirm offset
      *and* for every counted member (recorded plus a pending expansion; a shrink
      counts only once committed).
    * Once fenced, :meth:`read_limit` stays where it was: consumers see nothing a new
      master might not hold.
    * :meth:`holds` answers a write whose level, counted members and lease all hold
      with no task step (the connection answers it in the same pass), and
      :meth:`wake_when_holds` has the ack that moves the replicated offset wake the
      connection's idle ack task; a write still held back by a counted member or the
      lease goes on to :meth:`wait`.
    * :meth:`read_limit` starts at ``read_floor``, not at 0: what the previous term had
      confirmed and this node holds (it served reads up to there as a slave), so a
      new master does not hide those records until its own slaves acknowledge again.
    """

    def __init__(
        self,
        replicated: ReplicatedAcks,
        ha: HAService,
        loop: HaLoop,
        progress: trio.lowlevel.ParkingLot,
        read_floor: int = 0,
    ) -> None:
        self._replicated = replicated
        self._ha = ha
        self._loop = loop
        self._progress = progress
        """Unparked at every ack of ``ha``'s slaves and every change of the loop's record."""
        self._read_floor = read_floor
        self._frozen_limit: int | None = None

    def freeze(self) -> None:
        if self._frozen_limit is None:
            self._frozen_limit = self._live_read_limit()

    def thaw(self) -> None:
        self._frozen_limit = None

    def admit(self, acks: Acks) -> None:
        if not self._loop.may_acknowledge():
            raise RequestError(
                Status.NOT_MASTER,
                "this node may no longer acknowledge as master (its lease deadline passed or "
                "it is handing over); nothing was written: resend to the new master (ask "
                "metadata)",
                master=None,
                epoch=self._loop.epoch or None,
            )
        if not acks.needs_slaves:
            return
        record = self._loop.in_sync
        if record is None or not record.admits_replicated():
            recorded = sorted(record.recorded) if record is not None else []
            needed = record.min_insync_replicas if record is not None else "?"
            raise RequestError(
                Status.SLAVE_NOT_AVAILABLE,
                f"acks={acks.value} needs {needed} recorded in-sync slave(s) and the recorded "
                f"in-sync set is {recorded} (master included); nothing was written: resend "
                "later or with acks=durable",
            )
        self._replicated.admit(acks)

    async def wait(self, acks: Acks, end_offset: int, timeout_ms: int) -> tuple[Status, str | None]:
        deadline = trio.current_time() + timeout_ms / 1000
        status, error = await self._replicated.wait(acks, end_offset, timeout_ms)
        if status is Status.OK and acks.needs_slaves:
            status, error = await self._wait_counted(acks, end_offset, deadline, timeout_ms)
        if status is Status.OK and not self._loop.may_acknowledge():
            return (
                Status.FLUSH_SLAVE_TIMEOUT if acks.needs_slaves else Status.FLUSH_DISK_TIMEOUT,
                "appended, but this node stopped acting as master before it could acknowledge "
                "(lease deadline passed or leadership lost): the outcome is unknown; read it "
                "back from the new master before resending",
            )
        return status, error

    async def _wait_counted(
        self, acks: Acks, end_offset: int, deadline: float, timeout_ms: int
    ) -> tuple[Status, str | None]:
        if await wait_until(self._progress, lambda: self._counted_hold(end_offset), deadline):
            return Status.OK, None
        return (
            Status.FLUSH_SLAVE_TIMEOUT,
            f"appended{' and fsynced' if acks is Acks.REPLICATED else ''} on the master, "
            f"but the counted in-sync members "
            f"{sorted(self._missing(end_offset))} did not acknowledge within "
            f"{timeout_ms:.0f} ms (their removal is not recorded yet): the write is "
            "probably stored; resend only if duplicates are acceptable",
        )

    def _missing(self, end_offset: int) -> Iterator[str]:
        """The counted in-sync members (the master aside) whose ack is below
        ``end_offset``, lazily: the one definition :meth:`holds` (which stops at the
        first) and :meth:`wait` share. Nothing while this node keeps no record (not
        master): :meth:`wait` then answers by the lease check alone."""
        record = self._loop.in_sync
        if record is None:
            return
        master = record.master
        acked = self._ha.ack_offsets
        for name in record.counted:
            if name != master and acked.get(name, -1) < end_offset:
                yield name

    def _counted_hold(self, end_offset: int) -> bool:
        """No counted member lacks the bytes below ``end_offset`` (stops at the first)."""
        return next(self._missing(end_offset), None) is None

    def holds(self, acks: Acks, end_offset: int) -> bool:
        """Whether :meth:`wait` would answer ``(OK, None)`` at once: the replicated
        policy holds (level, fsync failure, hop tracing as there), no counted member
        lacks the write (levels that need slaves), and this node may still acknowledge
        (checked last, as :meth:`wait` does after its steps). Never raises or yields;
        per write, so no list is built and the member check stops at the first gap."""
        if not self._replicated.holds(acks, end_offset):
            return False
        if (acks is _IN_SYNC or acks is _REPLICATED) and not self._counted_hold(end_offset):
            return False
        return self._loop.may_acknowledge()

    def wake_when_holds(
        self, acks: Acks, end_offset: int, deadline_s: float, task: trio.lowlevel.Task
    ) -> WakeHandle | None:
        """The replicated policy's wake-up (the ack that moves the replicated offset to
        ``end_offset``, the deadline, or a stale master): the woken task then asks
        :meth:`holds`, and a write a counted member or the lease still holds back goes
        on to :meth:`wait`, which waits for them."""
        return self._replicated.wake_when_holds(acks, end_offset, deadline_s, task)

    def read_limit(self) -> int | None:
        if self._frozen_limit is not None:
            return self._frozen_limit
        return self._live_read_limit()

    def _live_read_limit(self) -> int:
        confirmed = self._replicated.read_limit()
        assert confirmed is not None, "a replicated policy bounds reads"
        return max(self._read_floor, confirmed)

    def ack_status(self) -> Any:
        return self._replicated.ack_status()


class Coordinator:
    """Runs a node's HA loop and carries out its decisions (the loop's ``NodeActions``).

    Invariants: the node serves writes in an epoch only after that epoch is in its
    fsynced epoch file; a fenced node never answers a write ``OK``; a node follows
    another master only after it was fenced. The HA port is chosen once (a free port
    when ``ha_port`` is 0) so the address in ``members/<node>`` never changes.
    """

    def __init__(self, node: Node, etcd: EtcdClient) -> None:
        self.node = node
        config = node.config
        self.section = config.coordination
        self.settings = self.section.settings
        self.etcd = etcd
        self.ha_port = _reserve_port(config.ha_host, config.replication.ha_port)
        self.progress = trio.lowlevel.ParkingLot()
        """Unparked whenever a slave's ack or the loop's in-sync record moves: what the
        ack path and a switchover wait on."""
        self.loop = HaLoop(
            self.settings,
            self,
            etcd,
            bootstrap_min_insync_replicas=config.replication.min_insync_replicas,
            on_in_sync_change=self._wake_waiters,
        )
        self._ha_scope: trio.CancelScope | None = None
        self._group_existed = True
        """Whether the group had a recorded state when this node started (read once):
        an empty log counts as a clean start only in a group never elected."""
        self._caught_up = False
        self._switching = False
        self._inherited_confirm = 0
        """What the previous term confirmed that this node holds: the read floor of its
        own term (set when it starts a term)."""

    # ------------------------------------------------------------------ NodeActions

    @property
    def name(self) -> str:
        return self.node.config.node.name

    @property
    def client_address(self) -> str:
        """Where clients reach this node: the advertised host and the bound port."""
        _host, port = self.node.address or (self.node.config.node.host, 0)
        return f"{self.node.config.advertised_host}:{port}"

    @property
    def ha_address(self) -> str:
        """Where slaves reach this node's HA port once it is master."""
        return f"{self.node.config.advertised_ha_host}:{self.ha_port}"

    def member_info(self) -> MemberInfo:
        store = self.node.store
        assert store is not None
        log_end = store.commit_log.max_offset
        fresh = log_end == 0 and self.node.history.current is None and not self._group_existed
        return MemberInfo(
            node=self.name,
            group=self.settings.group,
            client_address=self.client_address,
            ha_address=self.ha_address,
            epoch=self.node.epoch or 0,
            log_end=log_end,
            clean_start=store.recovery.clean_shutdown or fresh,
            caught_up=self._observe_caught_up(),
            priority=self.section.priority,
            vacant_state_revision=self.loop.vacant_state_revision,
        )

    def _observe_caught_up(self) -> bool:
        """Latched true once, since this start, this node followed a master up to the
        master's log end as of the handshake and the recorded state of that master's
        epoch names it (or it was elected): a node restarted after a crash campaigns
        only after that (:func:`~cluster.coordination.decisions.caught_up_since_start`).

        The catch-up is the slave's own fact, kept after its connection ended, so a
        master that records this node and dies before the next look still leaves it
        eligible (asking for a live connection here left the group without a master)."""
        slave = self.node.slave
        view = self.loop.view
        caught_up_epoch = slave.client.caught_up_epoch if slave is not None else None
        caught_up = caught_up_since_start(
            self.name,
            latched=self._caught_up,
            caught_up_epoch=caught_up_epoch,
            state=view.state if view is not None else None,
        )
        if caught_up and not self._caught_up:
            self._caught_up = True
            log.info("ha_caught_up node=%s epoch=%s", self.name, caught_up_epoch)
        return self._caught_up

    def in_sync_members(self) -> frozenset[str]:
        """The replication layer's in-sync slaves that may be recorded
        (:func:`~cluster.coordination.decisions.members_to_record`): a slave not counted
        yet joins once its ack reached the start of this term and the confirm offset."""
        ha = self.node.ha
        if ha is None:
            return frozenset({self.name})
        current = self.node.history.current
        term_start = current.start_offset if current is not None else 0
        return members_to_record(
            self.name,
            ha.in_sync_slaves(),
            self.loop.counted_in_sync(),
            max(term_start, ha.confirm_offset),
        )

    def _wake_waiters(self) -> None:
        self.progress.unpark_all()

    def _on_replication_progress(self) -> None:
        """A slave of this master connected, acked or left: wake the writes waiting for
        the counted set, and the HA loop when a slave may join the recorded set (so it
        counts for ``acks=replicated`` without waiting for the next interval)."""
        self._wake_waiters()
        record = self.loop.in_sync
        if (
            record is not None
            and record.pending is None
            and self.loop.role is HaRole.MASTER
            and self.in_sync_members() - record.counted
        ):
            self.loop.wake()

    async def _wake_on_membership_change(self, ha: HAService) -> None:
        """A slave dropped out of (or came into) the HA service's in-sync set, with time
        as well as with acks: record it now, not at the next interval."""
        while True:
            await ha.wait_membership_change()
            self.loop.wake()

    async def become_master(self, state: GroupState) -> None:
        node = self.node
        async with node._role_lock:
            store, handler = node.store, node.handler
            assert store is not None and handler is not None and node._standalone is not None
            # the old master's confirm offset as the stream carried it, capped at this log
            followed_confirm = 0
            if node.slave is not None:
                followed_confirm = node.slave.read_limit()
                await node.slave.stop()
                node.slave = None
            commit_log = store.commit_log
            commit_log.discard_raw_pending()
            current = node.history.current
            if current is None or current.epoch != state.epoch:
                log_end = commit_log.max_offset
                self._inherited_confirm = min(followed_confirm, log_end)
                node.history.truncate(log_end + 1)
                node.history.append(state.epoch, log_end, led=True)
                await node._save_history()  # fsynced before any write of this epoch
                log.warning("epoch_started epoch=%d start=%d elected=true", state.epoch, log_end)
            ha = node.ha
            if ha is None or ha.stale is not None:
                ha = await self._open_ha_port()
            acks = CoordinatedAcks(
                ReplicatedAcks(node._standalone, ha, state.min_insync_replicas),
                ha,
                self.loop,
                self.progress,
                read_floor=self._inherited_confirm,
            )
            node.acks = acks
            handler.set_acks(acks)
            await node._register_logged_topics()
            node.role = elected(node.role, self.ha_port)
            self._caught_up = True
            self._switching = False
            log.warning(
                "node_elected name=%s epoch=%d in_sync=%s",
                self.name,
                state.epoch,
                sorted(state.in_sync),
            )

    async def _open_ha_port(self) -> HAService:
        node = self.node
        assert node.store is not None and node._replication_nursery is not None
        self._close_ha_port()
        ha = node._ha_service(node.store)
        ha.insync.observers.append(self._on_replication_progress)
        node.ha = ha
        scope = trio.CancelScope()
        self._ha_scope = scope
        host = node.config.ha_host

        async def serve(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._wake_on_membership_change, ha)
                    await ha.serve(host, self.ha_port, task_status=task_status)

        await node._replication_nursery.start(serve)
        node.ha_address = (host, self.ha_port)
        return ha

    def _close_ha_port(self) -> None:
        if self._ha_scope is not None:
            self._ha_scope.cancel()
            self._ha_scope = None
        self.node.ha = None

    async def become_slave(self, leader: LeaderValue) -> None:
        node = self.node
        current = node.history.current
        if current is not None and leader.epoch < current.epoch:
            # etcd names a master of an older epoch than this log holds (etcd's data
            # lost or restored from a backup?): following it could cut acked records
            log.error(
                "node_refuses_older_master name=%s master=%s master_epoch=%d own_epoch=%d: "
                "restore etcd's data or clear this group's keys",
                self.name,
                leader.node,
                leader.epoch,
                current.epoch,
            )
            return
        async with node._role_lock:
            store, handler = node.store, node.handler
            assert store is not None and handler is not None and node._standalone is not None
            assert node._replication_nursery is not None
            node.role = follow(node.role, leader.ha_address, leader.client_address)
            self._close_ha_port()
            if node.slave is None:
                config = node.config
                slave = SlaveReplication(
                    store,
                    self.name,
                    leader.ha_address,
                    config.replication.settings,
                    history=node.history,
                    epoch_file=node.epoch_file,
                )
                slave.client.on_read_limit_moved = node.read_limit_moved
                node.slave = slave
                node._replication_nursery.start_soon(slave.run)
            else:
                node.slave.repoint(leader.ha_address)
            node.acks = SlaveAcks(node._standalone, node.slave)
            handler.set_acks(node.acks)
            log.warning(
                "node_following name=%s master=%s epoch=%d ha=%s",
                self.name,
                leader.node,
                leader.epoch,
                leader.ha_address,
            )

    def fence(self, reason: str) -> None:
        node = self.node
        try:
            node.role = fence(node.role, reason)
        except RoleError as exc:
            log.info("ha fence ignored node=%s role=%s: %s", self.name, node.role.name, exc)
            return
        if isinstance(node.acks, CoordinatedAcks):
            node.acks.freeze()
        log.warning("node_fenced name=%s epoch=%s reason=%s", self.name, node.epoch, reason)

    # ---------------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read whether the group was ever elected, then run the HA loop and apply the
        topics etcd holds, until cancelled."""
        keys = self.settings.keys
        retry = Backoff(self.settings.keepalive_interval_s / 4, ETCD_FIRST_READ_MAX_PAUSE_S)
        attempt = 0
        while True:
            try:
                stored = await self.etcd.get(keys.state(self.settings.group))
                break
            except EtcdError as error:
                attempt += 1
                pause_s = retry.next_delay_s()
                log.log(
                    retry_log_level(attempt),
                    "ha cannot reach etcd node=%s attempt=%d error=%r; retrying in %.1f s "
                    "(check --etcd and that etcd runs: `tidelog cluster status`)",
                    self.name,
                    attempt,
                    error,
                    pause_s,
                )
                await trio.sleep(pause_s)
        if attempt:
            log.info("ha reached etcd node=%s after_attempts=%d", self.name, attempt + 1)
        self._group_existed = stored is not None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.loop.run)
                nursery.start_soon(self._apply_topics)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.etcd.aclose()

    async def _apply_topics(self) -> None:
        """Every node creates locally each topic etcd holds (a failover never forgets one),
        grows each etcd holds with more queues, and forgets each etcd stopped holding."""
        topics = self.node.topics
        assert topics is not None
        follower = ListingFollower(topics)
        while True:
            view = await self.loop.next_view()
            await follower.apply([(r.name, r.queues) for r in view.topics.values()])

    async def shutdown(self) -> None:
        """A graceful stop: hand mastership over at once instead of after the lease TTL."""
        if self.loop.role in (HaRole.MASTER, HaRole.FENCED):
            with trio.move_on_after(self.settings.request_timeout_s * 2):
                try:
                    await self.loop.resign()
                except EtcdError as error:
                    log.warning("ha resign at shutdown failed node=%s error=%r", self.name, error)

    # ------------------------------------------------------------------ client ops

    async def create_topic(self, name: str, queues: int) -> tuple[str, int]:
        """Record the topic in etcd first (created only if absent), then locally."""
        topic = await self._create_topic(name, queues, exist_ok=False)
        return topic.name, topic.queues

    async def auto_create_topic(self, name: str, queues: int) -> Topic:
        """A write named a topic nobody created (``auto_create``): it is recorded in etcd
        exactly as one the admin op creates, so a failover does not forget it. When etcd
        has it already (created elsewhere, not applied here yet), etcd's queue count wins."""
        return await self._create_topic(name, queues, exist_ok=True)

    async def _create_topic(self, name: str, queues: int, *, exist_ok: bool) -> Topic:
        async with etcd_for_topic_change(f"creating topic {name!r}"):
            return await self._record_and_create_topic(name, queues, exist_ok=exist_ok)

    async def _record_and_create_topic(self, name: str, queues: int, *, exist_ok: bool) -> Topic:
        key = self.settings.keys.topic(name)
        record = TopicRecord(name, queues, int(time.time() * 1_000_000))
        result = await self.etcd.txn(
            [Compare.create_revision(key, 0)],
            [PutOp(key, record.encode())],
            timeout_s=ADMIN_ETCD_TIMEOUT_S,
        )
        if not result.succeeded:
            stored = await self.etcd.get(key, timeout_s=ADMIN_ETCD_TIMEOUT_S)
            if stored is not None:
                existing = TopicRecord.decode(stored.key, stored.value)
                if not exist_ok:
                    raise RequestError(
                        Status.TOPIC_EXISTS,
                        f"topic {name!r} exists with {existing.queues} queue(s)",
                        queues=existing.queues,
                    )
                queues = existing.queues
        topics = self.node.topics
        assert topics is not None
        try:
            return await topics.create(name, queues)
        except TopicExistsError as exc:
            return exc.topic

    def hint(self) -> tuple[str | None, int | None]:
        """The master's client address and epoch as the loop last saw them."""
        view = self.loop.view
        if view is not None and view.leader is not None:
            return view.leader.client_address, view.leader.epoch
        return None, self.loop.epoch or None

    def metadata(self) -> dict[str, Any]:
        view = self.loop.view
        leader = view.leader if view is not None else None
        if self.loop.role is HaRole.MASTER and (leader is None or leader.node != self.name):
            # elected after the last listing was read: this node knows it leads
            leader = LeaderValue(self.name, self.loop.epoch, self.client_address, self.ha_address)
        state = view.state if view is not None else None
        in_sync = state.in_sync if state is not None else frozenset()
        members = []
        for info in sorted(view.members.values() if view is not None else [], key=lambda m: m.node):
            role = "master" if leader is not None and info.node == leader.node else "slave"
            if leader is None:
                role = "candidate"
            members.append(
                {
                    "name": info.node,
                    "client": info.client_address,
                    "ha": info.ha_address,
                    "role": role,
                    "epoch": info.epoch,
                    "log_end": info.log_end,
                    "in_sync": info.node in in_sync,
                }
            )
        topics = self.node.topics
        assert topics is not None
        return {
            "cluster": self.settings.cluster,
            "group": self.settings.group,
            "epoch": leader.epoch if leader is not None else (state.epoch if state else None),
            "master": (
                {"name": leader.node, "client": leader.client_address, "ha": leader.ha_address}
                if leader is not None
                else None
            ),
            "members": members,
            "topics": [{"name": t.name, "queues": t.queues} for t in topics.list()],
        }

    def status(self) -> dict[str, Any]:
        loop = self.loop
        now = trio.current_time()
        record = loop.in_sync
        return {
            "role": loop.role.value,
            "epoch": loop.epoch or None,
            "master": loop.master,
            "lease_remaining_ms": (
                round(loop.fence_state.remaining_s(now) * 1000)
                if loop.role is HaRole.MASTER and loop.fence_state.last_sent_s is not None
                else None
            ),
            "may_acknowledge": loop.may_acknowledge(),
            "recorded_in_sync": sorted(record.recorded) if record is not None else None,
            "counted_in_sync": sorted(record.counted) if record is not None else None,
            "min_insync_replicas": record.min_insync_replicas if record is not None else None,
            "etcd_reachable": (
                loop.fence_state.last_sent_s is not None
                and now - loop.fence_state.last_sent_s < self.settings.lease_ttl_s
            ),
            "caught_up": self._caught_up,
            "ha_address": self.ha_address,
            "election": _election_status(loop.election),
        }

    async def switchover(self, group: str, to: str | None, timeout_ms: int) -> dict[str, Any]:
        """Hand mastership to ``to`` (or the in-sync slave furthest ahead) losing nothing:
        stop taking writes, wait until the target acknowledged the whole log, name it in
        the switchover key, resign, and wait for its election."""
        if group != self.settings.group:
            raise RequestError(
                Status.BAD_REQUEST,
                f"this node is in group {self.settings.group!r}, not {group!r}",
            )
        node, loop = self.node, self.loop
        ha = node.ha
        if loop.role is not HaRole.MASTER or ha is None or not loop.may_acknowledge():
            master, epoch = self.hint()
            raise RequestError(
                Status.NOT_MASTER,
                "switchover is served by the group's master; this node is not it",
                master=master,
                epoch=epoch,
            )
        if self._switching:
            raise RequestError(Status.BAD_REQUEST, "a switchover is already under way")
        candidates = {name: offset for name, offset in ha.ack_offsets.items() if name != self.name}
        target = to if to is not None else max(candidates, key=candidates.__getitem__, default=None)
        if target is None or target not in candidates:
            raise RequestError(
                Status.BAD_REQUEST,
                f"switchover target {target!r} is not a connected slave of this master "
                f"(connected: {sorted(candidates)}); nothing changed",
            )
        deadline = trio.current_time() + timeout_ms / 1000
        assert node.store is not None
        self._switching = True
        self.fence(f"switching over to {target}")
        try:
            log_end = node.store.commit_log.max_offset
            if not await wait_until(
                self.progress, lambda: ha.ack_offsets.get(target, -1) >= log_end, deadline
            ):
                raise RequestError(
                    Status.FLUSH_SLAVE_TIMEOUT,
                    f"switchover: {target} acknowledged {ha.ack_offsets.get(target)} of "
                    f"{log_end} within {timeout_ms} ms; this node stays master",
                )
            await self._name_target(target)
        except BaseException:
            self._resume_after_failed_switchover()
            raise
        await loop.resign()
        log.warning("node_switchover name=%s target=%s log_end=%d", self.name, target, log_end)
        with trio.move_on_at(deadline):
            while True:
                # the loop lists etcd at every change of the leader key (its watch)
                leader = (await loop.next_view()).leader
                if leader is not None and leader.node != self.name:
                    return {"master": leader.node, "epoch": leader.epoch, "log_end": log_end}
        raise RequestError(
            Status.FLUSH_SLAVE_TIMEOUT,
            f"switchover: this node resigned but no new master was elected within "
            f"{timeout_ms} ms; the group elects one as soon as an eligible node campaigns",
        )

    async def _name_target(self, target: str) -> None:
        lease = await self.etcd.lease_grant(self.settings.lease_ttl_s)
        await self.etcd.put(
            self.settings.keys.switchover(self.settings.group),
            SwitchoverValue(target).encode(),
            lease=lease.id,
        )

    def _resume_after_failed_switchover(self) -> None:
        node = self.node
        self._switching = False
        if isinstance(node.role, Fenced) and self.loop.role is HaRole.MASTER:
            node.role = elected(node.role, self.ha_port)
            if isinstance(node.acks, CoordinatedAcks):
                node.acks.thaw()
                node.read_limit_moved()

    def is_slave(self) -> bool:
        return isinstance(self.node.role, Slave)


def _election_status(election: ElectionView | None) -> dict[str, Any] | None:
    """The last election judged without a leader, for ``status`` (None under a leader)."""
    if election is None:
        return None
    return {
        "best": election.best,
        "reason": election.reason(),
        "recovered": election.recovered,
        "waiting_for": sorted(election.waiting_for),
        "refused": {node: reason.name for node, reason in sorted(election.refused.items())},
    }


def _reserve_port(host: str, port: int) -> int:
    """``port``, or a free one when it is 0 (bound once to learn it, then released: the
    HA service binds it with SO_REUSEADDR whenever this node becomes master)."""
    if port:
        return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
