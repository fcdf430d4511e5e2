"""Growing and deleting topics with etcd: the change is recorded there first, so every
node (and the next master) follows; and how a follower applies successive listings."""

from __future__ import annotations

from pathlib import Path

from cluster.coordination.keys import TopicRecord
from cluster.node import Node
from cluster.node.topic_changes import ListingFollower
from cluster.node.topics import TopicRegistry
from tests.cluster.test_node_coordination import node
from tests.e2e.test_failover import call

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
