"""The HA loop against a real etcd, with a test double of OUR node's actions (etcd stays
real): one master elected, a crashed master replaced by an in-sync slave, a node that
crashed does not campaign, a master cut off from etcd fences itself, a clean hand-over."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from cluster.coordination.etcd import EtcdClient, EtcdError
from cluster.coordination.ha_loop import HaLoop, HaRole
from cluster.coordination.keys import GroupState, LeaderValue, MemberInfo
from cluster.coordination.settings import CoordinationSettings
from tools.faults.proxy import FaultProxy
from tools.launcher import EtcdCluster

WAIT_S = 30
"""A bound on waits for events; never a figure the tests assert."""


@attrs.define
class FakeNode:
    """A test double of the node's side of the HA loop: it records what it was told."""

    name: str
    group: str = "g1"
    epoch: int = 0
    log_end: int = 0
    clean_start: bool = True
    caught_up: bool = False
    judged_in_sync: frozenset[str] = frozenset()
    priority: int = 0
    timeline: list[str] = attrs.field(factory=list)
    """What happened to this node, in order; tests may share one list between nodes."""
    role: str = "none"
    info_calls: int = 0
    """How often the loop asked for the member record (it does at every step)."""
    following: str | None = None
    fenced: list[str] = attrs.field(factory=list)
    terms: list[int] = attrs.field(factory=list)
    vacancy: Callable[[], int] = lambda: 0
    """The loop's ``vacant_state_revision`` (wired by :func:`running`), published as the
    real node does."""
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def member_info(self) -> MemberInfo:
        self.info_calls += 1
        if self.info_calls % 5 == 0:
            self._notify()
        return MemberInfo(
            self.name,
            self.group,
            f"{self.name}.client:1",
            f"{self.name}.ha:2",
            self.epoch,
            self.log_end,
            self.clean_start,
            self.caught_up,
            self.priority,
            self.vacancy(),
        )

    def in_sync_members(self) -> frozenset[str]:
        return self.judged_in_sync | {self.name}

    async def become_master(self, state: GroupState) -> None:
        self.epoch = state.epoch
        self.terms.append(state.epoch)
        self.timeline.append(f"{self.name} master {state.epoch}")
        self.role, self.following = "master", None
        self._notify()

    async def become_slave(self, leader: LeaderValue) -> None:
        self.epoch = leader.epoch
        self.role, self.following = "slave", leader.node
        self._notify()

    def fence(self, reason: str) -> None:
        self.fenced.append(reason)
        self.timeline.append(f"{self.name} fenced")
        self.role = "fenced"
        self._notify()

    async def until(self, what: str, check: Callable[[FakeNode], bool]) -> None:
        """Wait (on this node's actions, not on time) until ``check(self)`` holds."""
        with trio.fail_after(WAIT_S):
            while not check(self):
                await self._changed.wait()


def settings_for(endpoints: list[str]) -> CoordinationSettings:
    return CoordinationSettings(etcd_endpoints=endpoints, cluster=f"t{uuid.uuid4().hex[:10]}")


@attrs.define
class RunningNode:
    fake: FakeNode
    loop: HaLoop
    scope: trio.CancelScope

    def crash(self) -> None:
        """Stop the loop without a word to etcd: its lease runs out on its own."""
        self.scope.cancel()


@asynccontextmanager
async def running(
    settings: CoordinationSettings, *fakes: FakeNode, endpoints: dict[str, list[str]] | None = None
) -> AsyncIterator[list[RunningNode]]:
    """Run one HA loop per fake node; ``endpoints`` routes a node to etcd another way."""
    nodes: list[RunningNode] = []
    async with trio.open_nursery() as nursery:

        async def run_one(fake: FakeNode, task_status: trio.TaskStatus[RunningNode]) -> None:
            with trio.CancelScope() as scope:
                async with (
                    EtcdClient(
                        (endpoints or {}).get(fake.name, settings.etcd_endpoints),
                        request_timeout_s=settings.request_timeout_s,
                    ) as etcd,
                    trio.open_nursery() as own,
                ):
                    loop = HaLoop(settings, fake, etcd)
                    fake.vacancy = lambda: loop.vacant_state_revision
                    await own.start(loop.run)
                    task_status.started(RunningNode(fake, loop, scope))

        for fake in fakes:
            nodes.append(await nursery.start(run_one, fake))
        yield nodes
        nursery.cancel_scope.cancel()


async def wait_for_state(
    settings: CoordinationSettings, check: Callable[[GroupState], bool]
) -> GroupState:
    """Watch the group's state key until ``check`` holds (an etcd event, not a poll);
    etcd errors (e.g. while etcd elects a leader of its own) start the watch over."""
    key = settings.keys.state(settings.group)
    async with EtcdClient(settings.etcd_endpoints) as etcd:
        with trio.fail_after(WAIT_S):
            while True:
                try:
                    return await _watch_state(etcd, key, check)
                except EtcdError:
                    await trio.sleep(0.05)  # retry pace while etcd recovers


async def _watch_state(
    etcd: EtcdClient, key: str, check: Callable[[GroupState], bool]
) -> GroupState:
    stored = await etcd.range(key)
    if stored.kvs and check(state := GroupState.decode(key, stored.kvs[0].value)):
        return state
    async with etcd.watch(key, start_revision=stored.revision + 1) as watch:
        async for event in watch:
            if event.kv.value and check(state := GroupState.decode(key, event.kv.value)):
                return state
    raise AssertionError("the watch ended")


def masters(nodes: list[RunningNode]) -> list[str]:
    return [n.fake.name for n in nodes if n.fake.role == "master"]


async def test_one_master_is_elected_and_the_others_follow(etcd_endpoints: list[str]) -> None:
    settings = settings_for(etcd_endpoints)
    fakes = [FakeNode(f"n{i}", judged_in_sync=frozenset({"n1", "n2", "n3"})) for i in (1, 2, 3)]
    async with running(settings, *fakes) as nodes:
        for fake in fakes:
            await fake.until("a role", lambda f: f.role in ("master", "slave"))
        (master,) = masters(nodes)
        for fake in fakes:
            await fake.until("all follow", lambda f: f.role == "master" or f.following == master)
        assert masters(nodes) == [master]
        state = await wait_for_state(settings, lambda s: len(s.in_sync) == 3)
        assert (state.epoch, state.master) == (1, master)
        (winner,) = (n for n in nodes if n.fake.name == master)
        assert winner.loop.may_acknowledge()
        assert winner.loop.counted_in_sync() == {"n1", "n2", "n3"}
        assert all(not n.fake.fenced for n in nodes)


async def test_a_crashed_master_is_replaced_by_an_in_sync_slave(etcd_endpoints: list[str]) -> None:
    settings = settings_for(etcd_endpoints)
    everyone = frozenset({"n1", "n2", "n3"})
    fakes = [FakeNode(f"n{i}", log_end=100, judged_in_sync=everyone) for i in (1, 2, 3)]
    async with running(settings, *fakes) as nodes:
        await wait_for_state(settings, lambda s: s.in_sync == everyone)
        (old,) = (n for n in nodes if n.fake.role == "master")
        survivors = [n for n in nodes if n is not old]
        for survivor in survivors:
            survivor.fake.judged_in_sync = everyone - {old.fake.name}
            survivor.fake.log_end = 200 if survivor is survivors[1] else 150
        old.crash()
        state = await wait_for_state(settings, lambda s: s.epoch == 2)
        assert state.master == survivors[1].fake.name  # the longest log
        assert state.in_sync == everyone - {old.fake.name}
        for survivor in survivors:
            await survivor.fake.until(
                "the new master",
                lambda f: f.role == "master" or f.following == state.master,
            )
        assert survivors[1].fake.terms == [2]
        assert survivors[1].loop.may_acknowledge()


async def test_a_node_restarted_after_a_crash_does_not_campaign(etcd_endpoints: list[str]) -> None:
    settings = settings_for(etcd_endpoints)
    recorded = GroupState(3, "gone", frozenset({"gone", "crashed", "clean"}), 1)
    async with EtcdClient(etcd_endpoints) as etcd:
        await etcd.put(settings.keys.state(settings.group), recorded.encode())
    crashed = FakeNode("crashed", epoch=3, log_end=500, clean_start=False)
    clean = FakeNode("clean", epoch=3, log_end=100)
    async with running(settings, crashed, clean):
        state = await wait_for_state(settings, lambda s: s.epoch == 4)
        assert state.master == "clean"
        assert state.in_sync == {"clean"}  # the crashed node must be re-admitted
        await crashed.until("following", lambda f: f.following == "clean")
        assert crashed.terms == []


async def test_a_group_whose_every_member_crashed_waits_for_all_then_the_best_leads(
    etcd_endpoints: list[str],
) -> None:
    settings = settings_for(etcd_endpoints)
    recorded = GroupState(3, "a", frozenset({"a", "b", "c"}), 1)
    async with EtcdClient(etcd_endpoints) as etcd:
        await etcd.put(settings.keys.state(settings.group), recorded.encode())
    a, b, c = (
        FakeNode(name, epoch=3, log_end=end, clean_start=False)
        for name, end in (("a", 300), ("b", 500), ("c", 400))
    )
    async with running(settings, a, c) as nodes:

        def waiting_for_b(loop: HaLoop) -> Callable[[FakeNode], bool]:
            return lambda _fake: loop.election is not None and loop.election.waiting_for == {"b"}

        for node in nodes:
            await node.fake.until("waiting for b", waiting_for_b(node.loop))
        async with EtcdClient(etcd_endpoints) as etcd:
            stored = await etcd.get(settings.keys.state(settings.group))
        assert stored is not None and GroupState.decode(stored.key, stored.value) == recorded
        assert a.terms == c.terms == []
        async with running(settings, b):
            state = await wait_for_state(settings, lambda s: s.epoch == 4)
            assert state.master == "b" and state.in_sync == {"b"}  # the others re-admitted later
            await a.until("following b", lambda f: f.following == "b")
            await c.until("following b", lambda f: f.following == "b")


async def test_a_master_cut_off_from_etcd_fences_itself(private_etcd: EtcdCluster) -> None:
    settings = settings_for(private_etcd.endpoints)
    (member,) = private_etcd.members
    fake = FakeNode("solo")
    async with running(settings, fake) as (node,):
        # A master whose lease is renewed. Waited for, not asserted at the election: on a
        # loaded machine the real etcd can answer past request_timeout_s, and the node
        # then takes office after its fencing deadline (refusing acks, and fenced by its
        # watchdog) before a keepalive gets through.
        await fake.until("master", lambda f: f.role == "master" and node.loop.may_acknowledge())
        assert node.loop.may_acknowledge()
        fenced_before = len(fake.fenced)
        member.signal(signal.SIGSTOP)
        try:
            await fake.until("fenced", lambda f: len(f.fenced) > fenced_before)
            assert not node.loop.may_acknowledge()
            assert node.loop.role is HaRole.FENCED
        finally:
            member.signal(signal.SIGCONT)
        # etcd is back: the node leads again, in its old term or a new one
        await fake.until(
            "master again", lambda f: f.role == "master" and node.loop.may_acknowledge()
        )
        assert node.loop.may_acknowledge()
        assert fake.terms[0] == 1 and fake.terms == sorted(fake.terms)


async def test_a_resigning_master_hands_over_without_waiting_for_its_lease(
    etcd_endpoints: list[str],
) -> None:
    settings = settings_for(etcd_endpoints)
    both = frozenset({"a", "b"})
    fakes = [FakeNode("a", judged_in_sync=both), FakeNode("b", judged_in_sync=both)]
    async with running(settings, *fakes) as nodes:
        await wait_for_state(settings, lambda s: s.in_sync == both)
        (old,) = (n for n in nodes if n.fake.role == "master")
        (other,) = (n for n in nodes if n is not old)
        await old.loop.resign()
        old.crash()
        state = await wait_for_state(settings, lambda s: s.epoch == 2)
        assert state.master == other.fake.name
        assert old.fake.fenced == ["resigning"]


async def test_slaves_take_over_from_a_master_that_died_before_they_saw_its_epoch(
    etcd_endpoints: list[str],
) -> None:
    settings = settings_for(etcd_endpoints)
    recorded = GroupState(3, "dead", frozenset({"dead", "a", "b"}), 1)
    async with EtcdClient(etcd_endpoints) as etcd:
        await etcd.put(settings.keys.state(settings.group), recorded.encode())
    a, b = FakeNode("a", epoch=2, log_end=70), FakeNode("b", epoch=2, log_end=90)
    async with running(settings, a, b):
        state = await wait_for_state(settings, lambda s: s.epoch == 4)
        assert state.master == "b" and state.in_sync == {"a", "b"}
        await a.until("following b", lambda f: f.following == "b")


async def test_a_master_partitioned_from_etcd_fences_before_another_is_elected(
    etcd_endpoints: list[str],
) -> None:
    settings = settings_for(etcd_endpoints)
    etcd_port = int(etcd_endpoints[0].rsplit(":", 1)[1])
    proxy = FaultProxy("127.0.0.1", etcd_port)
    timeline: list[str] = []
    both = frozenset({"a", "b"})
    a = FakeNode("a", priority=1, judged_in_sync=both, timeline=timeline)
    b = FakeNode("b", judged_in_sync=both, timeline=timeline)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        through_proxy = {"a": [f"http://127.0.0.1:{proxy.port}"]}
        async with running(settings, a, b, endpoints=through_proxy) as (node_a, _):
            await wait_for_state(settings, lambda s: s.master == "a" and s.in_sync == both)
            proxy.partition()
            state = await wait_for_state(settings, lambda s: s.epoch == 2)
            assert state.master == "b"
            assert not node_a.loop.may_acknowledge()
            await b.until("master", lambda f: f.role == "master")
            assert timeline.index("a fenced") < timeline.index("b master 2")
            proxy.heal()
            await a.until("following b", lambda f: f.following == "b")
            assert a.terms == [1]
        nursery.cancel_scope.cancel()


async def test_etcd_losing_its_leader_then_everything_changes_no_role_until_it_returns(
    etcd_three: EtcdCluster,
) -> None:
    settings = settings_for(etcd_three.endpoints)
    both = frozenset({"a", "b"})
    a = FakeNode("a", priority=1, judged_in_sync=both)
    b = FakeNode("b", judged_in_sync=both)
    async with running(settings, a, b) as (node_a, node_b):
        await wait_for_state(settings, lambda s: s.master == "a" and s.in_sync == both)
        await b.until("following a", lambda f: f.following == "a")

        etcd_leader = etcd_three.leader()
        await trio.to_thread.run_sync(etcd_leader.kill)
        # two of three members keep a quorum: the group keeps its master and epoch
        state = await wait_for_state(settings, lambda s: s.master == "a")
        assert state.epoch == 1
        await trio.to_thread.run_sync(etcd_three.stop)

        # without etcd: the master fences itself; the slave stays a slave. Waited for as a
        # role, not as any fence: the leader's loss may have fenced it before the stop
        # (keepalives past their timeout), and it took office again once they got through.
        await a.until("fenced", lambda f: f.role == "fenced")
        assert not node_a.loop.may_acknowledge()
        assert b.role == "slave" and b.terms == [] and node_b.loop.role is HaRole.SLAVE

        for member in etcd_three.members:
            await trio.to_thread.run_sync(partial(etcd_three.restart, member, wait=False))
        await trio.to_thread.run_sync(etcd_three.wait_healthy, etcd_three.members, 30)
        # etcd is back: one master again, in a term no older than before
        with trio.fail_after(WAIT_S):
            while not (node_a.loop.may_acknowledge() or node_b.loop.may_acknowledge()):
                await node_a.loop.wait_role_change()
        leaders = [n for n in (node_a, node_b) if n.loop.role is HaRole.MASTER]
        assert len(leaders) == 1
        assert all(f.terms == sorted(f.terms) for f in (a, b))


async def test_an_unreadable_group_state_changes_no_role(etcd_endpoints: list[str]) -> None:
    settings = settings_for(etcd_endpoints)
    key = settings.keys.state(settings.group)
    async with EtcdClient(etcd_endpoints) as etcd:
        await etcd.put(key, b'{"format": 99, "kind": "group_state"}')
        fake = FakeNode("a")
        async with running(settings, fake):
            await fake.until("several steps", lambda f: f.info_calls >= 20)
            assert fake.role == "none" and fake.terms == []
            await etcd.put(key, GroupState(1, None, frozenset({"a"})).encode())
            await fake.until("master", lambda f: f.role == "master")
            assert fake.terms == [2]


async def test_a_vacancy_is_judged_once_every_live_member_republished(
    etcd_endpoints: list[str],
) -> None:
    """The election waits for every live member's final log end, not for a whole
    keepalive interval: with a 3 s interval the new master is elected well within
    half of it (the old loop always sat out the interval after seeing the vacancy)."""
    settings = attrs.evolve(settings_for(etcd_endpoints), lease_ttl_s=8, keepalive_interval_s=3.0)
    everyone = frozenset({"a", "b", "c"})
    fakes = [FakeNode(name, judged_in_sync=everyone) for name in sorted(everyone)]
    async with running(settings, *fakes) as nodes:
        await wait_for_state(settings, lambda s: s.in_sync == everyone)
        (old,) = (n for n in nodes if n.fake.role == "master")
        await old.loop.resign()  # the leader key goes at once, not after the TTL
        old.crash()
        with trio.fail_after(settings.keepalive_interval_s / 2):
            state = await wait_for_state(settings, lambda s: s.epoch == 2)
        assert state.master != old.fake.name
        (winner,) = (n for n in nodes if n.fake.name == state.master)
        await winner.fake.until("master", lambda fake: fake.role == "master")
        assert masters(nodes) == [state.master]


async def test_a_listing_read_before_a_resign_does_not_put_the_master_back_in_office(
    etcd_endpoints: list[str],
) -> None:
    """A step whose listing was read just before the resign still shows this node's
    leader key with its lease: the old loop took office again on it (and resumed
    taking writes the switchover target never receives). Driven directly, since in a
    running loop it is a race: the step of a listing read before the resign."""
    settings = attrs.evolve(
        settings_for(etcd_endpoints), lease_ttl_s=6, keepalive_interval_s=2.0
    )  # no lease renewal (or new lease) between the resign and the step
    async with running(settings, FakeNode("a")) as (node,):
        await node.fake.until("master", lambda fake: fake.role == "master")
        before = await node.loop.read_view()
        assert before.leader is not None and before.leader.node == "a"
        await node.loop.resign()
        await node.loop._with_leader(node.fake.member_info(), before)
        assert node.fake.terms == [1] and node.fake.role == "fenced"
        assert node.loop.role is HaRole.FENCED


@attrs.define
class StepsDownDuringTxn:
    """The real etcd client, except that the master's watchdog fires while a transaction
    is in flight (the seeded chaos run 261 crashed a node on exactly that)."""

    etcd: EtcdClient
    loop: HaLoop
    fired: bool = False

    async def txn(self, *args: object, **kwargs: object) -> object:
        if not self.fired:  # once: the loop may take office again and record again
            self.fired = True
            self.loop._step_down("the fencing deadline passed during the in-sync CAS")
        return await self.etcd.txn(*args, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.etcd, name)


async def test_a_step_down_while_the_in_sync_record_is_in_flight_drops_its_answer(
    etcd_endpoints: list[str],
) -> None:
    """The old loop resolved the CAS on the record the step-down had cleared and died on
    ``AttributeError: 'NoneType' object has no attribute 'resolve'``."""
    settings = attrs.evolve(settings_for(etcd_endpoints), lease_ttl_s=6, keepalive_interval_s=2.0)
    async with running(settings, FakeNode("a")) as (node,):
        await node.fake.until("master", lambda fake: fake.role == "master")
        view = await node.loop.read_view()
        node.fake.judged_in_sync = frozenset({"b"})  # a proposal to record
        node.loop.etcd = StepsDownDuringTxn(node.loop.etcd, node.loop)  # type: ignore[assignment]
        record = node.loop.in_sync
        await node.loop._record_in_sync_once(view)  # the old loop raised AttributeError here
        assert node.fake.fenced[:1] == ["the fencing deadline passed during the in-sync CAS"]
        assert record is not None and record is not node.loop.in_sync  # that term's record ended
