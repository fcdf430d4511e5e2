"""A node with failover whose disk fails leaves its group: a master that can no longer
fsync would otherwise hold the leadership of a group it cannot write for, refusing every
write until someone restarts it. The fsync error is injected the way the chaos runs do
(the fault-injection sync log's disk control), so the node's real flush path fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from cluster.coordination.etcd import EtcdClient
from cluster.coordination.ha_loop import HaRole
from cluster.node import Node
from storage import sync_log
from tests.cluster.test_node_coordination import node
from tests.e2e.test_failover import call
from tools.process import wait_until

__all__ = ["node"]  # the fixture: a node elected master on the test's etcd


async def test_a_master_whose_fsync_fails_leaves_the_group_and_says_why(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, etcd_endpoints: list[str]
) -> None:
    assert node.address is not None and node.coordinator is not None
    etcd, settings = node.coordinator.etcd, node.coordinator.settings
    address = f"{node.address[0]}:{node.address[1]}"
    assert (await call(address, "create_topic", topic="t", queues=1))["status"] == "OK"
    assert (await etcd.get(settings.keys.leader(settings.group))) is not None
    control = tmp_path / "disk-control.json"
    control.write_text(json.dumps({"fsync_error": "EIO"}))
    monkeypatch.setattr(sync_log, "ACTIVE", sync_log.SyncLog(tmp_path / "sync.log", control))

    sent = await call(address, "send", topic="t", body=b"x", acks="durable")
    assert sent["status"] == "STORAGE_FAILED", sent
    with trio.fail_after(10):
        while node.coordinator.loop.role is HaRole.MASTER:
            await node.coordinator.loop.wait_role_change()
    assert node.stopped_itself is not None
    assert "storage failed" in node.stopped_itself and "fdatasync" in node.stopped_itself

    async def leader_key_gone() -> bool:
        # an etcd client of the test's own: the node closes its client as it stops
        async with EtcdClient(etcd_endpoints) as own:
            return await own.get(settings.keys.leader(settings.group)) is None

    # resigned (the old code kept renewing its lease): the group is free for a replica
    await wait_until("the leader key deleted by the resign", leader_key_gone, timeout=10)
