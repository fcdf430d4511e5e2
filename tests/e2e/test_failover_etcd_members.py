"""Failover on a three-member etcd that loses a member (real etcd processes, three real
nodes, an ``acks=replicated`` load).

etcd's raft leader is SIGKILLed: the two others elect a leader, the nodes' requests and
watches move to them, writes go on. The node master is then SIGKILLed: a new one is
elected through the two-member etcd. The etcd member comes back, a follower member is
SIGKILLed instead, and the next node master is killed: elected again. Every acked
message is on every node at the end; each node kill made exactly one election.

Synchronised on acks (events), etcd's health and bounded polls of ``status``; no fixed
sleeps. Every process is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

import trio

from tools.launcher import EtcdCluster, EtcdMember, LocalCluster
from tools.launcher.load import AckedLoad, missing_on

TOPIC = "etcd3"
WAIT_S = 30.0


async def lose_etcd_member(etcd: EtcdCluster, member: EtcdMember) -> None:
    """SIGKILL ``member``; return once the others answer linearizable reads again."""
    member.kill()
    survivors = [m for m in etcd.members if m is not member]
    await trio.to_thread.run_sync(etcd.wait_healthy, survivors, WAIT_S)


async def fail_over(etcd3_cluster: LocalCluster, load: AckedLoad) -> tuple[str, str]:
    """SIGKILL the node master; return it and the new master once that acked a send.
    Exactly one election happens (the epoch etcd records moves by one)."""
    old = await etcd3_cluster.wait_for_master(WAIT_S)
    state = await etcd3_cluster.group_state()
    assert state is not None and state.master == old
    before = len(load.acked)
    etcd3_cluster.kill(old)
    new = await etcd3_cluster.wait_for_master(WAIT_S, other_than=old)
    await load.wait_ack_via(etcd3_cluster.address(new), before, WAIT_S)
    after = await etcd3_cluster.group_state()
    assert after is not None and after.master == new and after.epoch == state.epoch + 1
    return old, new


async def rejoin(etcd3_cluster: LocalCluster, name: str, master: str) -> None:
    """Restart ``name``; return once etcd records it in the in-sync set of ``master``."""
    await trio.to_thread.run_sync(etcd3_cluster.restart, name)
    await etcd3_cluster.wait_group_state(
        f"{name} in sync under {master}",
        lambda state: state.master == master and name in state.in_sync,
        WAIT_S,
    )


async def test_failover_goes_on_when_etcd_loses_its_leader_or_a_follower(
    etcd3_cluster: LocalCluster,
) -> None:
    etcd = etcd3_cluster.etcd
    assert etcd is not None and len(etcd.members) == 3
    await etcd3_cluster.wait_for_master(WAIT_S)
    await etcd3_cluster.wait_group_state(
        "all three in sync", lambda state: len(state.in_sync) == 3, WAIT_S
    )
    load = AckedLoad(etcd3_cluster, TOPIC, acks="replicated")
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        await load.wait_acks(20, WAIT_S)

        etcd_leader = await trio.to_thread.run_sync(etcd.leader)
        await lose_etcd_member(etcd, etcd_leader)
        await load.wait_acks(20, WAIT_S)  # writes go on through the two others
        first, second = await fail_over(etcd3_cluster, load)
        await rejoin(etcd3_cluster, first, second)

        await trio.to_thread.run_sync(etcd.restart, etcd_leader)
        current_leader = await trio.to_thread.run_sync(etcd.leader)
        follower = next(m for m in etcd.members if m is not current_leader)
        await lose_etcd_member(etcd, follower)
        killed, third = await fail_over(etcd3_cluster, load)
        await rejoin(etcd3_cluster, killed, third)
        await load.wait_acks(10, WAIT_S)
        nursery.cancel_scope.cancel()

    assert all(etcd3_cluster.running(name) for name in etcd3_cluster.names)
    assert load.outcomes["failed"] == 0, load.outcomes
    assert await missing_on(etcd3_cluster, etcd3_cluster.names, load.by_position(), TOPIC) == {}
