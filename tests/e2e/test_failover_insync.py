"""The master SIGKILLed at the moment its recorded in-sync set changes (real etcd, three
real nodes, an ``acks=replicated`` load).

A shrink: one slave is SIGSTOPped; once it has lagged past ``max_lag_ms`` the master
records the set without it; the instant etcd holds that record (seen on etcd's watch of
the state key) the master is SIGKILLed. Only the other slave may lead, and it must hold
every acked message (acks waited for the paused slave until the shrink committed).

An expansion: the paused slave resumes, catches up and the new master records it back;
the instant etcd holds that, the new master is SIGKILLed. The resumed slave, the one live
member of the recorded set, leads and must again hold every acked message. At the end,
with every node back, no acked message is missing anywhere.

Synchronised on etcd's watch, on acks (events) and on bounded polls of ``status``; no
fixed sleeps. Every process is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.helpers import started
from tools.faults.process import Pause
from tools.launcher import LocalCluster
from tools.launcher.load import AckedLoad, missing_on

TOPIC = "insync"
WAIT_S = 30.0
MAX_LAG_MS = 300
"""A paused slave drops out of the in-sync set this long after it stopped acking."""


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    config = tmp_path / "node.toml"
    config.write_text(f"[replication]\nmax_lag_ms = {MAX_LAG_MS}\n")
    cluster = LocalCluster(tmp_path / "cluster", replicas=3, node_args=("--config", str(config)))
    async with started(cluster):
        yield cluster


async def test_a_master_killed_as_its_in_sync_set_changes_loses_no_ack(
    cluster: LocalCluster,
) -> None:
    first = await cluster.wait_for_master(WAIT_S)
    everyone = frozenset(cluster.names)
    await cluster.wait_group_state(
        "all three in sync", lambda state: state.in_sync == everyone, WAIT_S
    )
    paused, other = (name for name in cluster.names if name != first)
    load = AckedLoad(cluster, TOPIC, acks="replicated")
    pause = Pause(cluster.target(paused))
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        await load.wait_acks(20, WAIT_S)

        # shrink: kill the master the moment etcd records the set without the paused slave
        await pause.inject()
        shrunk = await cluster.wait_group_state(
            f"{paused} recorded out of sync",
            lambda state: state.master == first and paused not in state.in_sync,
            WAIT_S,
        )
        cluster.kill(first)
        assert shrunk.in_sync == {first, other}
        acked_at_kill = load.by_position()
        second = await cluster.wait_for_master(WAIT_S, other_than=first)
        assert second == other  # the paused slave is out of the recorded set

        # expansion: the slave resumes and rejoins; kill the master the moment etcd has it
        await pause.heal()
        before = len(load.acked)
        await load.wait_ack_via(cluster.address(second), before, WAIT_S)
        # (a new master serves reads up to what a slave confirmed: checked once one did)
        assert await missing_on(cluster, [second], acked_at_kill, TOPIC) == {}
        grown = await cluster.wait_group_state(
            f"{paused} recorded in sync again",
            lambda state: state.master == second and paused in state.in_sync,
            WAIT_S,
        )
        cluster.kill(second)
        assert first not in grown.in_sync  # still dead: only the resumed slave may lead
        acked_at_kill = load.by_position()
        third = await cluster.wait_for_master(WAIT_S, other_than=second)
        assert third == paused

        # everyone back; the load goes on through the third master
        for name in (first, second):
            await trio.to_thread.run_sync(cluster.restart, name)
        before = len(load.acked)
        await load.wait_ack_via(cluster.address(third), before, WAIT_S)
        assert await missing_on(cluster, [third], acked_at_kill, TOPIC) == {}
        await cluster.wait_group_state(
            "all three in sync under the third master",
            lambda state: state.master == third and state.in_sync == everyone,
            WAIT_S,
        )
        nursery.cancel_scope.cancel()

    assert load.outcomes["failed"] == 0, load.outcomes
    assert await missing_on(cluster, cluster.names, load.by_position(), TOPIC) == {}
