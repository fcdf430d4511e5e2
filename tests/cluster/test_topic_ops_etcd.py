"""Growing and deleting topics with etcd: the change is recorded there first, so every
node (and the next master) follows; and how a follower applies successive listings."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cluster.coordination.ha_loop import HaRole
from cluster.coordination.keys import TopicRecord
from cluster.node import Node, coordinated, topic_changes
from cluster.node.config import NodeConfig
from cluster.node.topic_changes import ListingFollower
from cluster.node.topics import TopicRegistry
from cluster.protocol import Status
from tests.cluster.test_node_coordination import node
from tests.e2e.test_failover import call
from tools.launcher.etcd import EtcdCluster, EtcdMember

__all__ = ["node"]  # the fixture: a node elected master on the test's etcd


async def test_alter_and_delete_go_through_etcd(node: Node) -> None:
    assert node.address is not None and node.coordinator is not None
    assert node.topics is not None
    etcd, keys = node.coordinator.etcd, node.coordinator.settings.keys
    address = f"{node.address[0]}:{node.address[1]}"
    assert (await call(address, "create_topic", topic="t", queues=2))["status"] == "OK"
    grown = await call(address, "alter_topic", topic="t", queues=4)
    assert (grown["status"], grown["queues"]) == ("OK", 4)
    stored = await etcd.get(keys.topic("t"))
    assert stored is not None and TopicRecord.decode(stored.key, stored.value).queues == 4
    topic = node.topics.get("t")
    assert topic is not None and topic.queues == 4
    shrink = await call(address, "alter_topic", topic="t", queues=1)
    assert shrink["status"] == "BAD_REQUEST" and "can only grow" in shrink["error"]

    sent = await call(address, "send", topic="t", body=b"old", queue=3, acks="leader")
    assert sent["status"] == "OK"
    deleted = await call(address, "delete_topic", topic="t")
    assert deleted["status"] == "OK" and deleted["offset"] > sent["offset"]
    assert await etcd.get(keys.topic("t")) is None
    assert node.topics.get("t") is None
    again = await call(address, "delete_topic", topic="t")
    assert again["status"] == "UNKNOWN_TOPIC"
    missing = await call(address, "alter_topic", topic="t", queues=9)
    assert missing["status"] == "UNKNOWN_TOPIC"
    assert (await call(address, "create_topic", topic="t", queues=1))["status"] == "OK"
    fresh = await call(address, "send", topic="t", body=b"new", acks="leader")
    assert (fresh["queue"], fresh["queue_offset"]) == (0, 0)


async def test_a_follower_adds_grows_and_forgets_only_what_a_listing_dropped(
    tmp_path: Path,
) -> None:
    registry = await TopicRegistry.open(tmp_path / "topics.json")
    await registry.create("own", 1)  # never listed: the follower leaves it alone
    follower = ListingFollower(registry)
    await follower.apply([("a", 1), ("b", 2)])
    await follower.apply([("a", 3), ("b", 2), ("c", 1)])
    assert [(t.name, t.queues) for t in registry.list()] == [
        ("a", 3),
        ("b", 2),
        ("c", 1),
        ("own", 1),
    ]
    await follower.apply([("a", 2), ("c", 1)])  # b deleted; an older count of a ignored
    assert [(t.name, t.queues) for t in registry.list()] == [("a", 3), ("c", 1), ("own", 1)]
    reopened = await TopicRegistry.open(tmp_path / "topics.json")
    assert [t.name for t in reopened.list()] == ["a", "c", "own"]


@pytest.fixture
async def node_on_private_etcd(
    tmp_path: Path, private_etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Node, EtcdMember]]:
    """A master on an etcd of the test's own (the test pauses it), with a short deadline
    for topic changes so that a paused etcd answers the admin quickly."""
    monkeypatch.setattr(topic_changes, "ADMIN_ETCD_TIMEOUT_S", 0.3)
    monkeypatch.setattr(coordinated, "ADMIN_ETCD_TIMEOUT_S", 0.3)
    config = NodeConfig.create(
        tmp_path / "solo",
        node={"name": "solo", "port": 0},
        replication={"ha_port": 0},
        coordination={"etcd": ",".join(private_etcd.endpoints), "cluster": "paused"},
    )
    member = private_etcd.members[0]
    solo = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(solo.run)
        assert solo.coordinator is not None
        with trio.fail_after(10):
            while solo.coordinator.loop.role is not HaRole.MASTER:
                await solo.coordinator.loop.wait_role_change()
        try:
            yield solo, member
        finally:
            member.signal(signal.SIGCONT)
            solo.request_shutdown()


async def test_a_topic_change_etcd_cannot_record_says_so_and_runs_again(
    node_on_private_etcd: tuple[Node, EtcdMember],
) -> None:
    solo, member = node_on_private_etcd
    assert solo.address is not None and solo.topics is not None
    address = f"{solo.address[0]}:{solo.address[1]}"
    member.signal(signal.SIGSTOP)
    try:
        refused = await call(address, "create_topic", topic="t", queues=2)
    finally:
        member.signal(signal.SIGCONT)
    assert refused["status"] == "COORDINATION_UNAVAILABLE", refused
    assert "creating topic 't'" in refused["error"] and "run it again" in refused["error"]
    assert Status.COORDINATION_UNAVAILABLE.retryable
    with trio.fail_after(10):  # the node may have stepped down meanwhile: wait for it to lead
        while (created := await call(address, "create_topic", topic="t", queues=2))[
            "status"
        ] == "NOT_MASTER":
            assert solo.coordinator is not None
            await solo.coordinator.loop.wait_role_change()
    assert created["status"] in ("OK", "TOPIC_EXISTS"), created


async def test_a_delete_whose_etcd_half_landed_finishes_when_run_again(node: Node) -> None:
    """An earlier try removed the topic from etcd and then timed out: running the delete
    again writes the marker here instead of answering UNKNOWN_TOPIC forever."""
    assert node.address is not None and node.coordinator is not None
    assert node.topics is not None
    etcd, keys = node.coordinator.etcd, node.coordinator.settings.keys
    address = f"{node.address[0]}:{node.address[1]}"
    assert (await call(address, "create_topic", topic="half", queues=1))["status"] == "OK"
    sent = await call(address, "send", topic="half", body=b"x", acks="leader")
    assert sent["status"] == "OK"
    await etcd.delete(keys.topic("half"))  # what the timed-out try left behind
    deleted = await call(address, "delete_topic", topic="half")
    assert deleted["status"] == "OK" and deleted["offset"] > sent["offset"], deleted
    assert node.store is not None and not node.store.holds_topic("half")
    assert node.topics.get("half") is None
    again = await call(address, "delete_topic", topic="half")
    assert again["status"] == "UNKNOWN_TOPIC"
