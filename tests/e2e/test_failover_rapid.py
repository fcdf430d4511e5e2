"""Three rapid failovers in a row under an ``acks=replicated`` load: a real etcd and three
``tidelog node --etcd`` processes (LocalCluster). Each round SIGKILLs whoever is master,
waits for the new master and for the first replicated ack it gives, restarts the old
master and waits until it is a slave back in the recorded in-sync set. At the end every
acked message is readable at its acked position on every node, the epoch moved once
per kill, and the three logs are byte for byte the same (each old master cut whatever
tail it alone held).

Waits are on the load's acks (an event per ack) or bounded polls of ``status``; no fixed
sleeps. Every process is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.helpers import started
from tools.launcher import LocalCluster
from tools.launcher.load import AckedLoad, commit_log_bytes, missing_on, same_log_end
from tools.process import wait_until

TOPIC = "rapid"
WAIT_S = 30.0
KILLS = 3


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "cluster", replicas=3)
    async with started(cluster):
        yield cluster


async def back_in_sync(cluster: LocalCluster, name: str, master: str) -> None:
    """Wait until ``name`` follows ``master`` and is in the in-sync set etcd records."""

    async def rejoined() -> bool:
        view = await cluster.view(name)
        state = await cluster.group_state()
        return (
            view.role == "slave"
            and view.coordination.get("master") == master
            and state is not None
            and state.master == master
            and name in state.in_sync
        )

    await wait_until(f"{name} back in sync under {master}", rejoined, timeout=WAIT_S)


async def test_three_rapid_failovers_under_replicated_load_lose_no_ack(
    cluster: LocalCluster,
) -> None:
    first = await cluster.wait_for_master(WAIT_S)
    first_state = await cluster.group_state()
    assert first_state is not None
    load = AckedLoad(cluster, TOPIC, acks="replicated")
    masters = [first]
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        await load.wait_acks(20, WAIT_S)
        for _ in range(KILLS):
            old = masters[-1]
            await back_in_sync(cluster, next(n for n in cluster.names if n != old), old)
            before = len(load.acked)
            cluster.kill(old)
            new = await cluster.wait_for_master(WAIT_S, other_than=old)
            masters.append(new)
            await load.wait_ack_via(cluster.address(new), before, WAIT_S)
            await trio.to_thread.run_sync(cluster.restart, old)
            await back_in_sync(cluster, old, new)
        await load.wait_acks(10, WAIT_S)
        nursery.cancel_scope.cancel()

    state = await cluster.group_state()
    assert state is not None and state.master == masters[-1]
    assert state.epoch == first_state.epoch + KILLS  # one election per kill, no extra
    assert load.outcomes["failed"] == 0, load.outcomes
    assert len(load.acked) >= 20 + KILLS + 10
    acked = load.by_position()
    assert len(acked) == len(load.acked)  # no two acks share a position
    assert await missing_on(cluster, cluster.names, acked, TOPIC) == {}
    # every old master cut whatever tail it alone held: the logs agree byte for byte
    end = await same_log_end(cluster, cluster.names)
    await trio.to_thread.run_sync(cluster.stop)
    reference = commit_log_bytes(cluster.nodes[masters[-1]].data_dir, 0, end)
    for name in cluster.names:
        stored = commit_log_bytes(cluster.nodes[name].data_dir, 0, end)
        assert stored == reference, f"{name}'s log differs from {masters[-1]}'s below {end}"
