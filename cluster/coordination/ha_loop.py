"""The HA loop of one node: holds a lease, publishes the member record, follows or becomes
the group's master through etcd transactions, fences itself, and records the in-sync set.

Patroni's shape: every node runs this loop; etcd transactions are the only arbiter;
every decision is delegated to :mod:`cluster.coordination.decisions` and this module only
reads etcd, calls those functions and performs the answer through :class:`NodeActions`.

Tasks (all in the nursery of :meth:`HaLoop.run`):

* keepalive: renews the lease every ``keepalive_interval_s`` and feeds the send time of
  each success to the :class:`LeaseFence`; re-grants a lost lease.
* watchdog: while master, wakes at the fencing deadline and fences the node if no
  keepalive moved it.
* watch: wakes the main loop when the group's leader or state key changes or a member
  comes or goes (and, while the group has no leader, when a member republishes its
  record: the election waits for every live member's final log end).
* main loop: re-lists the cluster's keys and takes one step.

Without etcd nothing changes role except the master stepping down at its deadline
(consistency over availability). A transaction that timed out is read back before
anything is done on its behalf.

Concurrency: the node's ack path may call :meth:`HaLoop.may_acknowledge` and
:meth:`HaLoop.counted_in_sync` from any task of the same trio run; everything else
belongs to the loop's own tasks.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from cluster.coordination.decisions import (
    Candidate,
    ElectionView,
    InSyncRecord,
    LeaseFence,
    PendingOutcome,
    election_view,
    state_after_election,
)
from cluster.coordination.etcd import (
    Compare,
    CompareTarget,
    DeleteOp,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdTimeout,
    EventType,
    KeyValue,
    PutOp,
)
from cluster.coordination.keys import (
    GroupState,
    LeaderValue,
    MemberInfo,
    RecordError,
    SwitchoverValue,
    TopicRecord,
)
from cluster.coordination.settings import CoordinationSettings
from storage.backoff import Backoff

__all__ = ["GroupView", "HaLoop", "HaRole", "NodeActions"]

log = logging.getLogger(__name__)


class NodeActions(Protocol):
    """What the HA loop asks of our node. Each call is a decision already taken."""

    def member_info(self) -> MemberInfo:
        """The node's current record: addresses, last epoch, log end, start flags."""
        ...

    def in_sync_members(self) -> frozenset[str]:
        """As master: the nodes the replication layer judges in sync now (itself
        included), a node not counted yet only once it holds every acked record; the
        loop records changes in etcd before shrinks count."""
        ...

    async def become_master(self, state: GroupState) -> None:
        """Persist ``state.epoch`` as a new term (epoch file, fsync), then serve as master.
        Called again with the same epoch after :meth:`fence` when the lease turned out
        to be still held: resume acknowledging."""
        ...

    async def become_slave(self, leader: LeaderValue) -> None:
        """Follow ``leader`` (truncating a divergent tail by the epoch walk)."""
        ...

    def fence(self, reason: str) -> None:
        """Stop acknowledging at once and answer writes NOT_MASTER. Synchronous: nothing
        may run between the decision and its effect."""
        ...


class HaRole(enum.Enum):
    CANDIDATE = "candidate"
    """No master known, or not eligible: waiting."""
    SLAVE = "slave"
    MASTER = "master"
    FENCED = "fenced"
    """Was master, stopped acknowledging (deadline passed or leadership lost)."""


@attrs.frozen
class GroupView:
    """One linearizable listing of the cluster's keys, as the step needs it."""

    revision: int
    leader: LeaderValue | None
    leader_kv: KeyValue | None
    state: GroupState | None
    state_kv: KeyValue | None
    members: dict[str, MemberInfo]
    topics: dict[str, TopicRecord] = attrs.field(factory=dict)
    switchover_target: str | None = None
    """The node a planned switchover hands the group to, while its key lives."""
    member_revisions: dict[str, int] = attrs.field(factory=dict)
    """The revision each member record was last written at."""


@attrs.define
class HaLoop:
    """The HA loop of node ``actions.member_info().node`` in ``settings.group``."""

    settings: CoordinationSettings
    actions: NodeActions
    etcd: EtcdClient
    bootstrap_min_insync_replicas: int = 1
    """``min_insync_replicas`` written by the very first election of the group."""
    on_in_sync_change: Callable[[], None] = attrs.field(default=lambda: None)
    """Called (synchronously) whenever :attr:`in_sync` may have changed, so a write
    waiting for the counted set re-checks at once instead of polling."""
    role: HaRole = HaRole.CANDIDATE
    epoch: int = 0
    master: str | None = None
    lease_id: int = 0
    fence_state: LeaseFence = attrs.field(init=False)
    in_sync: InSyncRecord | None = None
    view: GroupView | None = None
    """The last listing read (for ``metadata`` and the topics every node applies)."""
    _viewed: trio.Event = attrs.field(factory=trio.Event)
    _resigned_lease: int = 0
    """The lease given up by :meth:`resign`: no campaign with it (it is being revoked)."""
    _vacant_since_s: float | None = None
    """When this node first saw the leader key missing (None while there is a leader)."""
    _leader_seen_revision: int | None = None
    """The revision of the last listing that held a leader key: a member record written
    after it was written after the leader was gone, with the member's final log end."""
    election: ElectionView | None = None
    """The last election judged while the leader key was missing (None under a leader):
    who is best, who is refused and why, whom a recovery waits for."""
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _lease_ready: trio.Event = attrs.field(factory=trio.Event)
    _role_changed: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self.fence_state = LeaseFence(self.settings.lease_ttl_s, self.settings.fencing_margin_s)

    @property
    def node(self) -> str:
        return self.actions.member_info().node

    @property
    def _leader_key(self) -> str:
        return self.settings.keys.leader(self.settings.group)

    @property
    def _state_key(self) -> str:
        return self.settings.keys.state(self.settings.group)

    # ------------------------------------------------------------ for the ack path

    def may_acknowledge(self) -> bool:
        """True while this node is master and its fencing deadline has not passed."""
        return self.role is HaRole.MASTER and self.fence_state.may_acknowledge(trio.current_time())

    @property
    def vacant_state_revision(self) -> int:
        """The revision of the group state in the last listing if it had no leader key,
        else 0: published in this node's member record, it tells the others the record
        holds this process's final log end of the vacancy (see ``election_view``)."""
        view = self.view
        if view is None or view.leader is not None or view.state_kv is None:
            return 0
        return view.state_kv.mod_revision

    def counted_in_sync(self) -> frozenset[str]:
        """The set an ack must reach (recorded plus pending), or empty when not master."""
        return self.in_sync.counted if self.in_sync is not None else frozenset()

    async def next_view(self) -> GroupView:
        """The next listing read after this call (topics, members, switchover key)."""
        await self._viewed.wait()
        assert self.view is not None
        return self.view

    async def wait_role_change(self) -> None:
        """Return at the next role or master change (for tests and status views)."""
        await self._role_changed.wait()

    def wake(self) -> None:
        """Take a step now instead of at the next keepalive interval (the node calls it
        when its replication layer's judgement of the in-sync set changed)."""
        self._wake.set()

    # -------------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Cancelling is a crash as far as etcd is concerned: the
        lease is left to expire (use :meth:`resign` first for a clean hand-over)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive_task)
            await self._lease_ready.wait()
            nursery.start_soon(self._watch_task)
            nursery.start_soon(self._watchdog_task)
            task_status.started()
            await self._main_task()

    async def resign(self) -> None:
        """Step down cleanly: fence, then delete the leader key and revoke the lease so
        the others elect at once instead of after the TTL."""
        if self.role in (HaRole.MASTER, HaRole.FENCED):
            self.actions.fence("resigning")
            self._set_role(HaRole.FENCED, self.master)
        if self.lease_id:
            self._resigned_lease = self.lease_id
            await self.etcd.txn(
                [Compare(self._leader_key, CompareTarget.LEASE, self.lease_id)],
                [DeleteOp(self._leader_key)],
            )
            await self.etcd.lease_revoke(self.lease_id)

    def _set_role(self, role: HaRole, master: str | None) -> None:
        if (role, master) != (self.role, self.master):
            log.info(
                "ha role node=%s role=%s master=%s epoch=%s",
                self.node,
                role.value,
                master,
                self.epoch,
            )
            self.role, self.master = role, master
            self._role_changed.set()
            self._role_changed = trio.Event()

    async def _main_task(self) -> None:
        backoff = Backoff(
            self.settings.keepalive_interval_s / 4, self.settings.keepalive_interval_s
        )
        while True:
            self._wake = trio.Event()
            try:
                await self.step()
                backoff.reset()
            except EtcdError as error:
                log.warning("ha step failed node=%s error=%r", self.node, error)
                await trio.sleep(backoff.next_delay_s())
                continue
            except RecordError as error:
                # a state this release cannot read (written by a newer one?): change no
                # role on it; the fence still guards a master whose lease runs out
                log.error("ha step refused the group state node=%s error=%s", self.node, error)
                await trio.sleep(backoff.next_delay_s())
                continue
            with trio.move_on_after(self.settings.keepalive_interval_s):
                await self._wake.wait()

    # ------------------------------------------------------------------ the lease

    async def _keepalive_task(self) -> None:
        retry = Backoff(0.05, self.settings.keepalive_interval_s)
        while True:
            sent_s = trio.current_time()
            try:
                if not self.lease_id:
                    lease = await self.etcd.lease_grant(self.settings.lease_ttl_s)
                    self.lease_id = lease.id
                    await self._register()
                else:
                    await self.etcd.lease_keepalive_once(self.lease_id)
            except EtcdLeaseNotFound:
                log.warning("ha lease lost node=%s lease=%s", self.node, self.lease_id)
                self._step_down("the lease expired")
                self.lease_id = 0
                self.fence_state = LeaseFence(
                    self.settings.lease_ttl_s, self.settings.fencing_margin_s
                )
                continue
            except EtcdError as error:
                log.info("ha keepalive failed node=%s error=%r", self.node, error)
                await trio.sleep(retry.next_delay_s())
                continue
            retry.reset()
            self.fence_state.keepalive_succeeded(sent_s)
            self._lease_ready.set()
            await trio.sleep_until(sent_s + self.settings.keepalive_interval_s)

    async def _register(self) -> None:
        info = self.actions.member_info()
        await self.etcd.put(
            self.settings.keys.member(info.node), info.encode(), lease=self.lease_id
        )

    def _step_down(self, reason: str) -> None:
        if self.role is HaRole.MASTER:
            self.actions.fence(reason)
            self._set_role(HaRole.FENCED, self.master)
            self.in_sync = None
            self.on_in_sync_change()

    async def _watchdog_task(self) -> None:
        """Fence at the deadline: a master that cannot renew must assume it lost the lease."""
        while True:
            if self.role is not HaRole.MASTER:
                await self._role_changed.wait()
                continue
            deadline_s = self.fence_state.deadline_s
            with trio.move_on_at(deadline_s):
                await self._role_changed.wait()
                continue
            if not self.fence_state.may_acknowledge(trio.current_time()):
                log.warning(
                    "ha fencing node=%s epoch=%s reason=no keepalive since deadline",
                    self.node,
                    self.epoch,
                )
                self._step_down("the lease deadline passed without a successful keepalive")

    # ------------------------------------------------------------------ the watch

    async def _watch_task(self) -> None:
        keys = self.settings.keys
        while True:
            try:
                async with self.etcd.watch(
                    keys.prefix, prefix=True, idle_timeout_s=self.settings.lease_ttl_s * 5
                ) as watch:
                    async for event in watch:
                        ref = keys.parse(event.kv.key)
                        if ref is None:
                            continue
                        if (
                            (
                                ref.kind in ("leader", "state", "switchover")
                                and ref.name == self.settings.group
                            )
                            or ref.kind == "topic"
                            or (
                                ref.kind == "member"
                                and (
                                    event.type is EventType.DELETE
                                    or event.kv.version == 1
                                    or self._vacant_since_s is not None  # final log ends
                                )
                            )
                        ):
                            self._wake.set()
            except EtcdCompacted:
                self._wake.set()  # the main loop re-lists anyway; watch again from now
            except EtcdError as error:
                log.warning("ha watch failed node=%s error=%r; watching again", self.node, error)
                self._wake.set()
                await trio.sleep(self.settings.keepalive_interval_s)

    # ------------------------------------------------------------------- one step

    async def read_view(self) -> GroupView:
        """One linearizable listing of the cluster prefix, decoded."""
        keys = self.settings.keys
        listing = await self.etcd.range(keys.prefix, prefix=True)
        leader = state = None
        leader_kv = state_kv = None
        members: dict[str, MemberInfo] = {}
        member_revisions: dict[str, int] = {}
        topics: dict[str, TopicRecord] = {}
        switchover_target: str | None = None
        for kv in listing.kvs:
            ref = keys.parse(kv.key)
            if ref is None:
                continue
            try:
                if ref.kind == "leader" and ref.name == self.settings.group:
                    leader, leader_kv = LeaderValue.decode(kv.key, kv.value), kv
                elif ref.kind == "state" and ref.name == self.settings.group:
                    state, state_kv = GroupState.decode(kv.key, kv.value), kv
                elif ref.kind == "member":
                    info = MemberInfo.decode(kv.key, kv.value)
                    if info.group == self.settings.group:
                        members[info.node] = info
                        member_revisions[info.node] = kv.mod_revision
                elif ref.kind == "topic":
                    topics[ref.name] = TopicRecord.decode(kv.key, kv.value)
                elif ref.kind == "switchover" and ref.name == self.settings.group:
                    switchover_target = SwitchoverValue.decode(kv.key, kv.value).target
            except RecordError as error:
                log.error("ha ignores a malformed record error=%s", error)
                if ref.kind == "state":
                    raise  # never elect on a state we cannot read
        view = GroupView(
            listing.revision,
            leader,
            leader_kv,
            state,
            state_kv,
            members,
            topics=topics,
            switchover_target=switchover_target,
            member_revisions=member_revisions,
        )
        self.view = view
        self._viewed.set()
        self._viewed = trio.Event()
        return view

    async def step(self) -> None:
        """Read etcd once and act: follow, campaign, keep or give up mastership."""
        await self._lease_ready.wait()
        me = self.actions.member_info()
        view = await self.read_view()
        if view.members.get(me.node) != me:
            await self._register()
        if view.leader is not None and view.leader_kv is not None:
            await self._with_leader(me, view)
        else:
            if self.role is HaRole.MASTER:
                self._step_down("the leader key is gone")
            await self._without_leader(me, view)

    async def _with_leader(self, me: MemberInfo, view: GroupView) -> None:
        assert view.leader is not None and view.leader_kv is not None
        self._vacant_since_s = None
        self.election = None
        self._leader_seen_revision = view.revision
        mine = view.leader.node == me.node
        if mine and view.leader_kv.lease == self.lease_id == self._resigned_lease:
            # resigning: a listing read before the resign took effect must not put this
            # node back in office (it would take writes the new master never sees);
            # finish giving the key up instead
            await self.etcd.txn(
                [Compare(self._leader_key, CompareTarget.LEASE, self.lease_id)],
                [DeleteOp(self._leader_key)],
            )
            return
        if mine and view.leader_kv.lease == self.lease_id:
            state = view.state
            if (
                self.role is not HaRole.MASTER
                and state is not None
                and state.master == me.node
                and state.epoch == view.leader.epoch
            ):
                await self._take_office(state)
            if self.role is HaRole.MASTER:
                await self._record_in_sync(view)
            return
        if mine:
            # a leader key of an earlier life of this node: let it go now
            await self.etcd.txn(
                [Compare(self._leader_key, CompareTarget.LEASE, view.leader_kv.lease)],
                [DeleteOp(self._leader_key)],
            )
            return
        self._step_down(f"{view.leader.node} leads epoch {view.leader.epoch}")
        if (
            self.role is not HaRole.SLAVE
            or self.master != view.leader.node
            or (self.epoch != view.leader.epoch)
        ):
            self.epoch = view.leader.epoch
            await self.actions.become_slave(view.leader)
            self._set_role(HaRole.SLAVE, view.leader.node)

    async def _without_leader(self, me: MemberInfo, view: GroupView) -> None:
        candidates = [
            Candidate.from_member(me if node == me.node else info)
            for node, info in view.members.items()
        ]
        if me.node not in view.members:
            candidates.append(Candidate.from_member(me))
        preferred = view.switchover_target
        election = election_view(
            view.state,
            candidates,
            preferred=preferred,
            state_revision=view.state_kv.mod_revision if view.state_kv is not None else 0,
        )
        if self.role is HaRole.SLAVE:
            self._set_role(HaRole.CANDIDATE, None)
        if self.lease_id and self.lease_id == self._resigned_lease:
            return  # resigned: campaign only with the next lease
        now_s = trio.current_time()
        if self._vacant_since_s is None:
            self._vacant_since_s = now_s
            # publish the final log end (the master is gone, nothing more arrives): the
            # others wait for it; the watch event of this put wakes them and us
            await self._register()
            return
        self._judged(election)
        if not self._members_final(view) and (
            now_s - self._vacant_since_s < self.settings.keepalive_interval_s
        ):
            # wait until every live member published its final log end, at most one
            # interval (a member that does not answer, late starters), so the best is
            # judged on a fresh view
            return
        if (
            preferred is not None
            and preferred != me.node
            and preferred in view.members
            and preferred not in election.refused
        ):
            log.debug("ha deferring node=%s to switchover target=%s", me.node, preferred)
            return
        if not election.may_campaign(me.node):
            log.debug(
                "ha not campaigning node=%s best=%s refused=%s",
                me.node,
                election.best,
                election.refused.get(me.node),
            )
            return
        new_state = state_after_election(
            view.state,
            election,
            me.node,
            min_insync_replicas=self.bootstrap_min_insync_replicas,
        )
        await self._campaign(me, view, new_state)

    def _judged(self, election: ElectionView) -> None:
        """Keep ``election`` for the status view; log when its verdict changes."""
        previous = self.election
        self.election = election
        if previous is None or previous.reason() != election.reason():
            level = logging.WARNING if election.waiting_for or election.no_data else logging.INFO
            log.log(level, "ha election node=%s verdict=%r", self.node, election.reason())

    def _members_final(self, view: GroupView) -> bool:
        """Whether every live member wrote its record after the leader was gone (each
        does so as soon as it sees the vacancy; a record written after this node's last
        listing with a leader was written then), so the election may be judged now
        instead of after the interval. Unknown (False) when this node never saw the
        leader: it cannot tell an old record from a new one."""
        seen = self._leader_seen_revision
        return seen is not None and all(
            view.member_revisions.get(node, 0) > seen for node in view.members
        )

    async def _campaign(self, me: MemberInfo, view: GroupView, new_state: GroupState) -> None:
        leader = LeaderValue(me.node, new_state.epoch, me.client_address, me.ha_address)
        state_compare = (
            Compare.mod_revision(self._state_key, view.state_kv.mod_revision)
            if view.state_kv is not None
            else Compare.create_revision(self._state_key, 0)
        )
        try:
            result = await self.etcd.txn(
                [Compare.create_revision(self._leader_key, 0), state_compare],
                [
                    PutOp(self._leader_key, leader.encode(), lease=self.lease_id),
                    PutOp(self._state_key, new_state.encode()),
                ],
            )
            won = result.succeeded
        except EtcdTimeout:
            stored = await self.etcd.get(self._leader_key)
            won = (
                stored is not None
                and stored.lease == self.lease_id
                and (LeaderValue.decode(stored.key, stored.value).epoch == new_state.epoch)
            )
        log.info("ha campaign node=%s epoch=%s won=%s", me.node, new_state.epoch, won)
        if won:
            await self._take_office(new_state)

    async def _take_office(self, state: GroupState) -> None:
        """Won (or found the lease still ours after a fence): persist the epoch, serve."""
        self.epoch = state.epoch
        self.in_sync = InSyncRecord(
            self.actions.member_info().node, state.in_sync, state.min_insync_replicas
        )
        self.on_in_sync_change()
        await self.actions.become_master(state)
        self._set_role(HaRole.MASTER, self.actions.member_info().node)

    async def _record_in_sync(self, view: GroupView) -> None:
        """As master: record the replication layer's judgement of the in-sync set by CAS
        on the state's revision (shrinks count once committed, expansions at once)."""
        try:
            await self._record_in_sync_once(view)
        finally:
            self.on_in_sync_change()

    async def _record_in_sync_once(self, view: GroupView) -> None:
        """Propose the replication layer's in-sync set by CAS on the state.

        The watchdog may step the node down while the CAS is in flight (it sets
        ``self.in_sync`` to None): the record of this term is kept in a local, and an
        answer arriving after the step-down is dropped, since the term it was for ended.
        """
        record = self.in_sync
        assert record is not None and view.state is not None and view.state_kv is not None
        if view.state.in_sync != record.recorded or view.state.epoch != self.epoch:
            if view.state.epoch != self.epoch or view.state.master != record.master:
                self._step_down(f"the group state moved to epoch {view.state.epoch}")
                return
            record.observed(view.state.in_sync)
        proposed = record.propose(self.actions.in_sync_members())
        if proposed is None:
            return
        new_state = attrs.evolve(view.state, in_sync=proposed)
        try:
            result = await self.etcd.txn(
                [
                    Compare.mod_revision(self._state_key, view.state_kv.mod_revision),
                    Compare(self._leader_key, CompareTarget.LEASE, self.lease_id),
                ],
                [PutOp(self._state_key, new_state.encode())],
            )
        except EtcdTimeout:
            log.info("ha in-sync record timed out node=%s; reading back", self.node)
            stored = await self.etcd.get(self._state_key)
            if stored is not None and self.in_sync is record:
                record.observed(GroupState.decode(stored.key, stored.value).in_sync)
            return
        outcome = PendingOutcome.COMMITTED if result.succeeded else PendingOutcome.REFUSED
        if self.in_sync is not record:
            log.info(
                "ha in-sync record answered after a step-down node=%s outcome=%s; dropped",
                self.node,
                outcome.value,
            )
            return
        record.resolve(outcome)
        log.info(
            "ha in-sync recorded node=%s in_sync=%s outcome=%s",
            self.node,
            sorted(proposed),
            outcome.value,
        )
