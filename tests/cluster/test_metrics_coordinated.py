"""The monitoring port of a node elected through a real etcd: the coordination gauges,
and ``/health`` turning 503 with the reason the moment the master is fenced."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from cluster.coordination.ha_loop import HaRole
from cluster.node import Node
from cluster.node.config import NodeConfig
from tests.cluster.test_metrics import health, scrape


async def test_a_fenced_master_answers_503_with_the_reason(
    tmp_path: Path, etcd_endpoints: list[str], request: pytest.FixtureRequest
) -> None:
    config = NodeConfig.create(
        tmp_path / "solo",
        node={"name": "solo", "port": 0, "metrics_port": 0},
        replication={"ha_port": 0},
        coordination={
            "etcd": ",".join(etcd_endpoints),
            "cluster": re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60],
        },
    )
    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert node.coordinator is not None
        with trio.fail_after(10):
            while node.coordinator.loop.role is not HaRole.MASTER:
                await node.coordinator.loop.wait_role_change()
        assert (await health(node))[0] == 200
        elected = await scrape(node)
        assert elected[("tidelog_role", (("role", "master"),))] == 1
        assert elected[("tidelog_coordination_recorded_in_sync", ())] == 1  # the master alone
        assert ("tidelog_coordination_etcd_reachable", ()) in elected

        node.coordinator.fence("a test fenced it")
        code, body = await health(node)
        assert code == 503 and body["role"] == "fenced" and body["writable"] is False
        assert "a test fenced it" in body["reason"], body
        fenced = await scrape(node)
        assert fenced[("tidelog_role", (("role", "fenced"),))] == 1
        assert fenced[("tidelog_role", (("role", "master"),))] == 0
        assert fenced[("tidelog_writable", ())] == 0
        node.request_shutdown()
