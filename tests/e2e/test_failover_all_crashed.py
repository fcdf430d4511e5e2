"""Every node of a failover group SIGKILLed at once, then restarted: a real etcd and three
``tidelog node --etcd`` processes (LocalCluster) under an ``acks=replicated`` load.

A crashed node campaigns only once it caught up with a master, and with every node
crashed there is none: the group used to stay leaderless for good. Once every member of
the recorded in-sync set is back and has published its final log end, the best of them
leads (every acked record reached each of them); while one is missing the others wait
for it and say so in their status.

Waits are on the load's acks (an event per ack) or bounded polls of ``status`` and of
etcd; no fixed sleeps. Every process is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cluster.coordination.keys import GroupState
from tests.helpers import started, tidelog
from tools.launcher import LocalCluster
from tools.launcher.load import AckedLoad, missing_on
from tools.process import wait_until

TOPIC = "allcrash"
WAIT_S = 30.0


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "cluster", replicas=3)
    async with started(cluster):
        yield cluster


async def all_recorded(cluster: LocalCluster) -> GroupState:
    """Wait until etcd records every node in the in-sync set."""
    names = frozenset(cluster.names)
    return await cluster.wait_group_state(
        f"{sorted(names)} all recorded in sync", lambda state: state.in_sync == names, WAIT_S
    )


async def crash_all_under_load(cluster: LocalCluster, load: AckedLoad) -> GroupState:
    """Let the load ack with every node recorded in sync, then SIGKILL every node."""
    await cluster.wait_for_master(WAIT_S)
    await load.wait_acks(30, WAIT_S)
    before = await all_recorded(cluster)
    await load.wait_acks(10, WAIT_S)
    for name in cluster.names:
        cluster.kill(name)
    return before


async def restart(cluster: LocalCluster, *names: str) -> None:
    for name in names:
        await trio.to_thread.run_sync(cluster.restart, name)


async def crash_all_and_restart_all_but_one(
    cluster: LocalCluster, load: AckedLoad
) -> tuple[GroupState, str, list[str]]:
    """Crash every node under the load, then restart all but one recorded in-sync member:
    the state the crash left, the member kept down, and the nodes back. The member is
    picked from that state: a shrink recorded after every node was, and before the kill,
    would make a node outside the set the wrong one to keep down (flaky under load)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        await crash_all_under_load(cluster, load)
        nursery.cancel_scope.cancel()
    before = await cluster.group_state()
    assert before is not None and len(before.in_sync) >= 2, before
    down = sorted(before.in_sync)[0]
    back = [name for name in cluster.names if name != down]
    await restart(cluster, *back)
    return before, down, back


async def test_a_group_whose_every_node_crashed_elects_again_and_keeps_every_ack(
    cluster: LocalCluster,
) -> None:
    load = AckedLoad(cluster, TOPIC, acks="replicated")
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        before = await crash_all_under_load(cluster, load)
        acked_before_crash = len(load.acked)
        await restart(cluster, *cluster.names)
        master = await cluster.wait_for_master(WAIT_S)
        await load.wait_ack_via(cluster.address(master), acked_before_crash, WAIT_S)
        nursery.cancel_scope.cancel()

    state = await all_recorded(cluster)  # the others caught up and were re-admitted
    assert state.master == master and state.epoch == before.epoch + 1
    assert load.outcomes["failed"] == 0, load.outcomes
    acked = load.by_position()
    assert len(acked) == len(load.acked) > acked_before_crash
    assert await missing_on(cluster, cluster.names, acked, TOPIC) == {}


async def test_with_one_recorded_member_still_down_nobody_leads_until_it_returns(
    cluster: LocalCluster,
) -> None:
    load = AckedLoad(cluster, TOPIC, acks="replicated")
    before, absent, back = await crash_all_and_restart_all_but_one(cluster, load)

    seen: dict[str, object] = {}

    async def waiting_for_the_absent() -> bool:
        for name in back:
            election = (await cluster.view(name)).coordination.get("election") or {}
            seen[name] = election
            if election.get("waiting_for") != [absent]:
                return False
            assert election["best"] is None
            assert f"waiting for recorded in-sync members {absent} to return" in election["reason"]
        return True

    await wait_until(
        f"{back} waiting for {absent} (last seen {seen})", waiting_for_the_absent, timeout=WAIT_S
    )
    assert await cluster.master() is None
    assert await cluster.group_state() == before  # no election happened meanwhile
    await restart(cluster, absent)
    master = await cluster.wait_for_master(WAIT_S)
    state = await all_recorded(cluster)
    assert state.master == master and state.epoch == before.epoch + 1
    assert load.outcomes["failed"] == 0, load.outcomes
    assert await missing_on(cluster, cluster.names, load.by_position(), TOPIC) == {}


async def test_a_member_lost_for_good_is_forgotten_by_the_operator_and_the_others_elect(
    cluster: LocalCluster,
) -> None:
    load = AckedLoad(cluster, TOPIC, acks="replicated")
    before, lost, back = await crash_all_and_restart_all_but_one(cluster, load)

    seen: dict[str, dict[str, object]] = {}

    async def waiting_for_the_lost() -> bool:
        for name in back:
            seen[name] = (await cluster.view(name)).coordination.get("election") or {}
        return all(election.get("waiting_for") == [lost] for election in seen.values())

    try:
        await wait_until(f"{back} waiting for {lost}", waiting_for_the_lost, timeout=WAIT_S)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
    etcd = ",".join(cluster.endpoints)
    forget = ["admin", "forget-member", lost, "--etcd", etcd, "--cluster", cluster.cluster_name]
    asked = await trio.to_thread.run_sync(lambda: tidelog(*forget))
    assert asked.returncode == 1 and "--yes" in asked.stderr  # nothing done without it
    assert await cluster.group_state() == before
    done = await trio.to_thread.run_sync(lambda: tidelog(*forget, "--yes", "--json"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["in_sync_after"] == sorted(before.in_sync - {lost})

    master = await cluster.wait_for_master(WAIT_S)
    assert master in before.in_sync - {lost}
    state = await cluster.group_state()
    assert state is not None and state.epoch == before.epoch + 1 and lost not in state.in_sync
    assert load.outcomes["failed"] == 0, load.outcomes
    assert await missing_on(cluster, [master], load.by_position(), TOPIC) == {}
    again = await trio.to_thread.run_sync(lambda: tidelog(*forget, "--yes"))
    assert again.returncode == 1 and "not in the recorded in-sync set" in again.stderr
