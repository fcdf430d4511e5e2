"""``acks=in_sync`` end to end: held in memory by the master and every in-sync slave.

Real processes, as in :mod:`tests.e2e.test_replication_e2e` (a static master and
slaves) and :mod:`tests.e2e.test_failover` (three nodes on a real etcd). Every process
is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from cluster.client import open_client
from cluster.protocol import Status
from tests.e2e.test_failover import Group, sigkill_the_master_under_load
from tests.e2e.test_replication_e2e import (
    Cluster,
    _send,
    _wait_caught_up,
    _wait_slaves,
)
from tools.launcher import EtcdCluster
from tools.process import node_status


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    with EtcdCluster(tmp_path / "etcd") as etcd, ExitStack() as exits:
        yield Group.on(exits, tmp_path, etcd)


async def test_in_sync_is_released_only_once_every_in_sync_slave_acknowledged(
    tmp_path: Path, stack: ExitStack
) -> None:
    cluster = Cluster(tmp_path, stack, min_insync_replicas=2)
    master = cluster.master
    first, second = await cluster.start_slaves("slave-a", "slave-b")
    await _wait_slaves(master, 2)
    async with open_client(master.address) as client:
        await client.admin.create_topic("rep", 1)
        held = await _send(client, b"both hold it", "in_sync")
        assert held["status"] is Status.OK, held
        slaves = (await node_status(master.address))["replication"]["slaves"]
        assert len(slaves) == 2 and all(s["ack_offset"] > held["offset"] for s in slaves)

        assert second.pid is not None
        os.kill(second.pid, signal.SIGSTOP)  # connected, but acknowledges nothing
        try:
            before = (await node_status(master.address))["max_offset"]
            stalled = await client.call(
                "send", topic="rep", body=b"one slave", queue=0, acks="in_sync", timeout_ms=300
            )
            # Released early (on the master's append, or on slave-a alone) would be OK.
            assert stalled["status"] in (Status.FLUSH_SLAVE_TIMEOUT, Status.SLAVE_NOT_AVAILABLE)
            if stalled["status"] is Status.FLUSH_SLAVE_TIMEOUT:
                assert stalled["offset"] == before and "appended on the master" in stalled["error"]
        finally:
            os.kill(second.pid, signal.SIGCONT)
        await _wait_caught_up(master, first, second)
        again = await _send(client, b"both again", "in_sync")
        assert again["status"] is Status.OK, again


async def test_sigkill_of_the_master_under_in_sync_load_loses_no_ack(group: Group) -> None:
    """Acknowledged at in_sync = in the page cache of every in-sync slave: a master
    SIGKILL (its machine keeps running, so do the slaves) loses none of them."""
    await sigkill_the_master_under_load(group, "in_sync")
