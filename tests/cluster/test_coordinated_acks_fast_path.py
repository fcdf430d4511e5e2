"""The etcd-coordinated master answers a write whose level holds with no wait of its own.

:meth:`CoordinatedAcks.holds` is True exactly when :meth:`CoordinatedAcks.wait` would
answer ``(OK, None)`` at once: the replicated policy holds, every counted in-sync
member has the write, and the node may still acknowledge. On the old code it was
always False (and ``wake_when_holds`` registered nothing), so every write of an
elected master stepped a task into ``wait``. In process: a master store served by a
real HAService, slaves run by the test over loopback, and an HA loop against a real
etcd (the loop of :mod:`tests.cluster.test_coordination_ha_loop`'s fake node, which
records the in-sync set the test names).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
import trio.testing

from cluster.coordination.decisions import InSyncRecord, LeaseFence
from cluster.coordination.etcd import EtcdClient
from cluster.coordination.ha_loop import HaLoop, HaRole
from cluster.node.acks import ReplicatedAcks, StandaloneAcks
from cluster.node.coordinated import CoordinatedAcks
from cluster.protocol import Acks, Status
from replication.master import HAService
from storage import MessageStore
from tests.cluster.test_coordination_ha_loop import FakeNode, running, settings_for
from tests.replication.test_ha_stream import config_at, fill, messages
from tests.replication.test_replication_lag import PausableStore, client, serving, until_acked

WAIT_S = 10
LEVELS = (Acks.DURABLE, Acks.IN_SYNC, Acks.REPLICATED)
_UNKNOWN = {
    Acks.DURABLE: Status.FLUSH_DISK_TIMEOUT,
    Acks.IN_SYNC: Status.FLUSH_SLAVE_TIMEOUT,
    Acks.REPLICATED: Status.FLUSH_SLAVE_TIMEOUT,
}
"""The outcome-unknown answer of a write appended before the node stopped acking."""


@attrs.frozen
class Master:
    store: MessageStore
    service: HAService
    port: int
    nursery: trio.Nursery
    progress: trio.lowlevel.ParkingLot

    def acks(self, loop: HaLoop) -> CoordinatedAcks:
        """The policy an elected master builds (``Coordinator.become_master``)."""
        replicated = ReplicatedAcks(StandaloneAcks(self.store), self.service, 1)
        loop.on_in_sync_change = self.wake
        return CoordinatedAcks(replicated, self.service, loop, self.progress)

    def wake(self) -> None:
        """Wake the writes waiting for the counted set (the coordinator's wiring)."""
        self.progress.unpark_all()

    def follow(self, store: MessageStore, name: str) -> None:
        self.nursery.start_soon(client(store, name).run, "127.0.0.1", self.port)


@asynccontextmanager
async def master_serving(tmp_path: Path) -> AsyncIterator[Master]:
    async with (
        MessageStore.open(config_at(tmp_path / "m")) as store,
        serving(store) as (service, port, nursery),
    ):
        master = Master(store, service, port, nursery, trio.lowlevel.ParkingLot())
        service.insync.observers.append(master.wake)  # as the coordinator wires it
        yield master


async def elected(loop: HaLoop, in_sync: set[str]) -> None:
    """Until ``loop`` is master with ``in_sync`` recorded (an etcd listing each turn)."""
    with trio.fail_after(WAIT_S):
        while (
            loop.role is not HaRole.MASTER
            or loop.in_sync is None
            or (loop.in_sync.recorded != in_sync)
        ):
            await loop.next_view()


async def answered_at_once(
    acks: CoordinatedAcks, level: Acks, end: int
) -> tuple[Status, str | None] | None:
    """``wait``'s answer if it comes with no scheduling point, else None (the wait is
    cancelled where it would have parked, leaving nothing registered)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        return await acks.wait(level, end, WAIT_S * 1000)
    return None


async def test_a_counted_member_that_lacks_the_write_holds_it_back(
    tmp_path: Path, etcd_endpoints: list[str]
) -> None:
    """Fails on the old code at the last ``holds``: a write every counted member holds
    is answered with no wait. Before that, ``c`` (recorded, not connected yet) lacks
    it: the HA service's replicated offset passed it with ``a`` alone, yet ``holds``
    says no and the write's ``wait`` waits for ``c``."""
    fake = FakeNode("m", judged_in_sync=frozenset({"a", "c"}))
    async with (
        master_serving(tmp_path) as master,
        MessageStore.open(config_at(tmp_path / "a")) as store_a,
        MessageStore.open(config_at(tmp_path / "c")) as store_c,
        running(settings_for(etcd_endpoints), fake) as [node],
    ):
        await elected(node.loop, {"m", "a", "c"})
        acks = master.acks(node.loop)
        master.follow(store_a, "a")
        await fill(master.store, messages(10, seed=1))
        end = master.store.commit_log.max_offset
        assert await master.service.wait_replicated(end, trio.current_time() + WAIT_S)
        acks.admit(Acks.IN_SYNC)
        assert master.service.replicated_now(end)  # the HA service alone would release it
        assert not acks.holds(Acks.IN_SYNC, end), "c is counted and lacks the write"

        answered: list[tuple[Status, str | None]] = []
        done = trio.Event()

        async def write_waits() -> None:
            answered.append(await acks.wait(Acks.IN_SYNC, end, WAIT_S * 1000))
            done.set()

        master.nursery.start_soon(write_waits)
        await trio.testing.wait_all_tasks_blocked()
        assert answered == [], "answered before the counted member c held it"

        master.follow(store_c, "c")
        await until_acked(master.service, "c", end)
        assert acks.holds(Acks.IN_SYNC, end)
        assert await answered_at_once(acks, Acks.IN_SYNC, end) == (Status.OK, None)
        with trio.fail_after(WAIT_S):
            await done.wait()
        assert answered == [(Status.OK, None)]


async def test_the_ack_that_releases_a_write_wakes_the_parked_task(
    tmp_path: Path, etcd_endpoints: list[str]
) -> None:
    """Fails on the old code: ``wake_when_holds`` registered nothing (None), so the
    connection woke its ack task at once to park on ``wait``. Now the slave's ack
    wakes the parked task, and the write holds when it runs."""
    fake = FakeNode("m", judged_in_sync=frozenset({"a"}))
    async with (
        master_serving(tmp_path) as master,
        MessageStore.open(config_at(tmp_path / "a")) as store_a,
        running(settings_for(etcd_endpoints), fake) as [node],
    ):
        await elected(node.loop, {"m", "a"})
        acks = master.acks(node.loop)
        pausable = PausableStore(store_a)
        master.follow(store_a, "a")
        await fill(master.store, messages(3, seed=2))
        assert await master.service.wait_replicated(
            master.store.commit_log.max_offset, trio.current_time() + WAIT_S
        )
        pausable.pause()  # a holds nothing new until the task is parked
        await fill(master.store, messages(5, seed=3))
        end = master.store.commit_log.max_offset
        woken: list[object] = []

        async def parked() -> None:
            task = trio.lowlevel.current_task()
            handle = acks.wake_when_holds(Acks.IN_SYNC, end, trio.current_time() + WAIT_S, task)
            assert handle is not None, "nothing would wake the task"

            def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
                handle.cancel()
                return trio.lowlevel.Abort.SUCCEEDED

            woken.append(await trio.lowlevel.wait_task_rescheduled(abort))
            woken.append(acks.holds(Acks.IN_SYNC, end))

        master.nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        pausable.resume()
        await until_acked(master.service, "a", end)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [True, True]


async def test_a_master_that_stops_acknowledging_answers_no_write_ok(
    tmp_path: Path, etcd_endpoints: list[str]
) -> None:
    """A write whose level holds is no longer answered by the fast path once the node
    may not acknowledge (its lease deadline passed): ``holds`` says
    no and ``wait`` answers outcome-unknown at once, as it did for every write."""
    fake = FakeNode("m", judged_in_sync=frozenset({"a"}))
    async with (
        master_serving(tmp_path) as master,
        MessageStore.open(config_at(tmp_path / "a")) as store_a,
        running(settings_for(etcd_endpoints), fake) as [node],
    ):
        loop = node.loop
        await elected(loop, {"m", "a"})
        acks = master.acks(loop)
        master.follow(store_a, "a")
        await fill(master.store, messages(4, seed=4))
        end = master.store.commit_log.max_offset
        assert await master.store.wait_durable(end, WAIT_S)
        assert await master.service.wait_replicated(end, trio.current_time() + WAIT_S)
        for level in LEVELS:
            assert acks.holds(level, end), level
            assert await answered_at_once(acks, level, end) == (Status.OK, None)

        renewed = loop.fence_state
        expired = LeaseFence(renewed.lease_ttl_s, renewed.margin_s)  # as a lost lease
        expired.keepalive_succeeded(trio.current_time() - renewed.lease_ttl_s)
        loop.fence_state = expired  # the deadline passed (no step of the loop between)
        for level in LEVELS:
            assert not acks.holds(level, end), level
            answer = await answered_at_once(acks, level, end)
            assert answer is not None and answer[0] is _UNKNOWN[level], (level, answer)
            assert "outcome is unknown" in (answer[1] or ""), answer
        loop.fence_state = renewed
        assert acks.holds(Acks.IN_SYNC, end)


async def test_holds_is_true_exactly_when_wait_answers_ok_at_once(
    tmp_path: Path, etcd_endpoints: list[str]
) -> None:
    """A seeded walk through the states ``holds`` reads (log end and fsync, slaves
    paused or acking, recorded and pending in-sync sets naming a member never
    connected, the lease, the role): at each, for every level and write end, ``holds``
    equals "``wait`` answers OK with no scheduling point". The HA loop is not run
    here: the test takes its decisions (role, lease, record) so no step of it
    changes them between the two questions."""
    rng = random.Random(20261201)
    settings = settings_for(etcd_endpoints)
    async with (
        EtcdClient(etcd_endpoints) as etcd,
        master_serving(tmp_path) as master,
        MessageStore.open(config_at(tmp_path / "a")) as store_a,
        MessageStore.open(config_at(tmp_path / "c")) as store_c,
    ):
        loop = HaLoop(settings, FakeNode("m"), etcd)
        loop.role = HaRole.MASTER
        loop.fence_state.keepalive_succeeded(trio.current_time())
        loop.in_sync = InSyncRecord("m", frozenset({"m", "a", "c"}), 1)
        replicated = ReplicatedAcks(StandaloneAcks(master.store), master.service, 1)
        acks = CoordinatedAcks(replicated, master.service, loop, master.progress)
        paused = {"a": PausableStore(store_a), "c": PausableStore(store_c)}
        master.follow(store_a, "a")
        master.follow(store_c, "c")
        records = [frozenset({"m", *names}) for names in ("a", "c", "ac", "ad", "acd")]
        ends: list[int] = []
        seen: set[tuple[Acks, bool]] = set()
        held_back_by_members = 0
        for step in range(80):
            action = rng.randrange(6)
            if action == 0:
                await fill(master.store, messages(rng.randrange(1, 4), seed=step))
                ends.append(master.store.commit_log.max_offset)
            elif action == 1:
                name = rng.choice(("a", "c"))
                if paused[name].resumed.is_set():
                    paused[name].pause()
                else:
                    paused[name].resume()
            elif action == 2:
                loop.fence_state = LeaseFence(settings.lease_ttl_s, settings.fencing_margin_s)
                lease_age_s = rng.choice((0.0, float(settings.lease_ttl_s)))
                loop.fence_state.keepalive_succeeded(trio.current_time() - lease_age_s)
            elif action == 3:
                pending = rng.choice([None, *records])
                loop.in_sync = InSyncRecord("m", rng.choice(records), 1, pending=pending)
            elif action == 4:
                loop.role = rng.choice((HaRole.MASTER, HaRole.MASTER, HaRole.FENCED))
            else:
                master.store.group_commit.flush_now()
            if rng.random() < 0.7:
                await trio.testing.wait_all_tasks_blocked()  # acks and fsyncs land
            for end in [*ends[-4:], master.store.commit_log.max_offset + 1]:
                for level in LEVELS:
                    holds = acks.holds(level, end)
                    answer = await answered_at_once(acks, level, end)
                    assert holds == (answer == (Status.OK, None)), (step, level, end, answer)
                    seen.add((level, holds))
                    if not holds and level is not Acks.DURABLE and loop.may_acknowledge():
                        held_back_by_members += replicated.holds(level, end)
        for name in paused:
            paused[name].resume()
        # Then a state where every level holds, reached for sure: on a loaded machine the
        # real slaves may not ack (or the lease may age out) at any step of the walk.
        loop.role = HaRole.MASTER
        loop.in_sync = InSyncRecord("m", frozenset({"m", "a", "c"}), 1)
        await fill(master.store, messages(1, seed=80))
        end = master.store.commit_log.max_offset
        master.store.group_commit.flush_now()
        with trio.fail_after(30):
            while True:
                loop.fence_state = LeaseFence(settings.lease_ttl_s, settings.fencing_margin_s)
                loop.fence_state.keepalive_succeeded(trio.current_time())
                if all(acks.holds(level, end) for level in LEVELS):
                    break
                await trio.testing.wait_all_tasks_blocked()
        for level in LEVELS:
            answer = await answered_at_once(acks, level, end)
            assert answer == (Status.OK, None), (level, answer)
            seen.add((level, True))
        # and one where only a recorded member never connected holds the write back
        loop.in_sync = InSyncRecord("m", frozenset({"m", "a", "c", "d"}), 1)
        for level in (Acks.IN_SYNC, Acks.REPLICATED):
            assert replicated.holds(level, end) and loop.may_acknowledge(), level
            answer = await answered_at_once(acks, level, end)
            assert not acks.holds(level, end) and answer != (Status.OK, None), (level, answer)
            held_back_by_members += 1
        master.nursery.cancel_scope.cancel()
    assert seen == {(level, verdict) for level in LEVELS for verdict in (True, False)}
    assert held_back_by_members >= 2, "no state where only a counted member held a write back"
