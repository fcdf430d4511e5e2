"""A three-member etcd loses its leader, then all of it (real etcd processes, three real
nodes, an ``acks=replicated`` load).

With the leader gone, the two other members carry on and so do the writes. With every
member gone, the master stops acknowledging at its fencing deadline, and nobody changes
role: no node becomes master, the slaves stay slaves. When etcd comes back, a master
(the old one or another) takes writes again, and no acked message is missing anywhere.

Synchronised on acks (events), etcd's health and bounded polls of ``status``; no fixed
sleeps. Every process is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

import functools

import trio

from tools.launcher import LocalCluster
from tools.launcher.load import AckedLoad, missing_on
from tools.process import wait_until

TOPIC = "etcd-outage"
WAIT_S = 30.0


async def test_without_etcd_no_role_changes_and_service_resumes_when_it_returns(
    etcd3_cluster: LocalCluster,
) -> None:
    etcd = etcd3_cluster.etcd
    assert etcd is not None
    first = await etcd3_cluster.wait_for_master(WAIT_S)
    await etcd3_cluster.wait_group_state(
        "all three in sync", lambda state: len(state.in_sync) == 3, WAIT_S
    )
    slaves = [name for name in etcd3_cluster.names if name != first]
    load = AckedLoad(etcd3_cluster, TOPIC, acks="replicated")
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        await load.wait_acks(20, WAIT_S)

        leader = await trio.to_thread.run_sync(etcd.leader)
        leader.kill()
        others = [m for m in etcd.members if m is not leader]
        await trio.to_thread.run_sync(etcd.wait_healthy, others, WAIT_S)
        await load.wait_acks(20, WAIT_S)  # two members are a quorum: writes go on

        for member in others:
            member.kill()

        async def nobody_acknowledges() -> bool:
            return not any(view.is_master for view in await etcd3_cluster.views())

        await wait_until("the master to fence itself", nobody_acknowledges, timeout=WAIT_S)
        views = {view.name: view for view in await etcd3_cluster.views()}
        assert all(views[name].role == "slave" for name in slaves), views
        assert not any(view.is_master for view in views.values())

        for member in etcd.members:
            await trio.to_thread.run_sync(functools.partial(etcd.restart, member, wait=False))
        await trio.to_thread.run_sync(etcd.wait_healthy, etcd.members, WAIT_S)
        master = await etcd3_cluster.wait_for_master(WAIT_S)
        await load.wait_ack_via(etcd3_cluster.address(master), len(load.acked), WAIT_S)
        await etcd3_cluster.wait_group_state(
            "all three in sync again", lambda state: len(state.in_sync) == 3, WAIT_S
        )
        nursery.cancel_scope.cancel()

    assert load.outcomes["failed"] == 0, load.outcomes
    assert await missing_on(etcd3_cluster, etcd3_cluster.names, load.by_position(), TOPIC) == {}
