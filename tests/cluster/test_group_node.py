"""Consumer groups against a real node in this test's trio loop: the ops, fencing, an
admin reset, committed offsets rebuilt from the log after a restart, and group
consumers sharing a topic's queues (a member leaving hands its queues over)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.client import Client, TidelogError, open_client
from cluster.client.group_consumer import GroupConsumer
from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.protocol import Status
from cluster.protocol.address import format_address
from tests.conftest import SMALL_SEGMENT

STORE = {"segment_size": SMALL_SEGMENT, "max_message_size": 16 * 1024, "flush_interval_ms": 20}


@asynccontextmanager
async def serving(data_dir: Path) -> AsyncIterator[str]:
    """A standalone node on a free port in this trio loop; shut down when the block ends."""
    config = NodeConfig.create(data_dir, node={"port": 0, "name": "n1"}, store=STORE)
    node = Node(config)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(node.run)
        try:
            yield format_address(host, port)
        finally:
            node.request_shutdown()


async def master(client: Client, op: str, **fields: Any) -> dict[str, Any]:
    return await client.call_master(op, **fields)


def positions(answer: dict[str, Any]) -> dict[tuple[str, int], int]:
    return {(o["topic"], o["queue"]): o["offset"] for o in answer["offsets"]}


async def test_ops_fencing_reset_and_offsets_after_a_restart(tmp_path: Path) -> None:
    async with serving(tmp_path) as address, open_client(address) as client:
        await client.admin.create_topic("t", 4)
        one = await master(client, "join_group", group="g", member="m1", topics=["t"])
        assert one["status"] is Status.OK and one["generation"] == 1
        assert len(one["assignment"]) == 4
        two = await master(client, "join_group", group="g", member="m2", topics=["t"])
        assert two["generation"] == 2 and two["assignment"] == []  # m1 holds them still
        beat = await master(client, "heartbeat", group="g", member="m1", generation=1)
        assert beat["status"] is Status.REJOIN_GROUP and "join_group again" in beat["error"]
        commit = {"topic": "t", "queue": 0, "offset": 5}  # m1's last commit before re-joining
        ok = await master(
            client, "commit_offsets", group="g", member="m1", generation=1, offsets=[commit]
        )
        assert ok["status"] is Status.OK and ok["committed"] == 1
        mine = await master(client, "join_group", group="g", member="m1", topics=["t"])
        assert mine["generation"] == 2 and len(mine["assignment"]) == 2
        beat = await master(client, "heartbeat", group="g", member="m2", generation=2)
        assert beat["status"] is Status.REJOIN_GROUP  # what it waits for was given up
        two = await master(client, "join_group", group="g", member="m2", topics=["t"])
        assert len(two["assignment"]) == 2
        theirs = dict(two["assignment"][0], offset=9)
        fenced = await master(
            client, "commit_offsets", group="g", member="m1", generation=2, offsets=[theirs]
        )
        assert fenced["status"] is Status.REJOIN_GROUP and "does not hold" in fenced["error"]
        busy = await master(client, "commit_offsets", group="g", offsets=[commit])
        assert busy["status"] is Status.GROUP_HAS_MEMBERS and "live member" in busy["error"]
        bad = await master(
            client, "commit_offsets", group="g", offsets=[dict(commit, topic="nope")]
        )
        assert bad["status"] is Status.UNKNOWN_TOPIC
        fetched = await master(client, "fetch_offsets", group="g")
        assert positions(fetched) == {("t", 0): 5}
        described = await master(client, "describe_group", group="g")
        assert {m["member"] for m in described["members"]} == {"m1", "m2"}
        assert len(described["offsets"]) == 4
        for member in ("m1", "m2"):
            assert (await master(client, "leave_group", group="g", member=member))["left"]
        reset = [{"topic": "t", "queue": q, "offset": 7} for q in range(4)]
        assert (await master(client, "commit_offsets", group="g", offsets=reset))[
            "status"
        ] is Status.OK
        listed = (await client.checked("list_groups"))["groups"]
        assert listed == [{"group": "g", "members": 0, "generation": 4, "topics": ["t"]}]
    async with serving(tmp_path) as address, open_client(address) as client:
        fetched = await master(client, "fetch_offsets", group="g")
        assert positions(fetched) == {("t", q): 7 for q in range(4)}
        assert (await client.checked("list_topics"))["topics"] == [{"topic": "t", "queues": 4}]
        with pytest.raises(TidelogError, match="INVALID_TOPIC"):  # the node's own topic
            await client.call("pull", topic="__offsets", queue=0, offset=0)


async def produce(client: Client, topic: str, count: int, start: int = 0) -> None:
    producer = client.producer()
    for n in range(start, start + count):
        result = await producer.send(topic, f"m{n}".encode(), acks="durable")
        assert result.outcome == "ok"


async def test_members_share_queues_and_a_restarted_member_resumes(tmp_path: Path) -> None:
    seen: dict[str, list[bytes]] = {"a": [], "b": []}
    shares: dict[str, set[int]] = {"a": set(), "b": set()}
    """How many queues each member held at each message it read (a member starved of the
    CPU past its session is re-joined, so its share at the very end may be in flux)."""
    async with serving(tmp_path) as address, open_client(address) as client:
        await client.admin.create_topic("t", 4)
        await produce(client, "t", 40)
        options: dict[str, Any] = {"heartbeat_interval_ms": 50, "auto_commit_interval_ms": 50}
        done = trio.Event()

        async def member(name: str, consumer: GroupConsumer, stop: trio.Event) -> None:
            async with consumer:
                async for message in consumer:
                    seen[name].append(message.body)
                    shares[name].add(len(consumer.assignment))
                    if len(seen["a"]) + len(seen["b"]) >= 80:
                        done.set()
                    if stop.is_set():
                        return

        a = GroupConsumer(client, "g", ["t"], member="a", **options)
        b = GroupConsumer(client, "g", ["t"], member="b", **options)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member, "a", a, trio.Event())
            await a.wait_assigned()
            nursery.start_soon(member, "b", b, trio.Event())
            await b.wait_assigned()
            with trio.fail_after(20):  # the hand-over: a re-joins, then b is given its share
                while len(b.assignment) != 2:
                    await b.wait_next_join()
            await produce(client, "t", 40, start=40)
            with trio.fail_after(20):
                await done.wait()
            nursery.cancel_scope.cancel()
        everything = {f"m{n}".encode() for n in range(80)}
        assert set(seen["a"]) | set(seen["b"]) == everything
        assert b.rebalances >= 1 and 2 in shares["b"], shares
        # Both left (commit, then leave_group): the group's positions are the ends.
        fetched = await master(client, "fetch_offsets", group="g")
        assert sum(positions(fetched).values()) == 80
        await produce(client, "t", 8, start=80)
        again: list[bytes] = []
        async with GroupConsumer(client, "g", ["t"], member="c", **options) as c:
            async for message in c:
                again.append(message.body)
                if len(again) == 8:
                    break
        assert sorted(again) == sorted(f"m{n}".encode() for n in range(80, 88))


async def test_a_topic_that_grew_queues_is_shared_without_a_membership_change(
    tmp_path: Path,
) -> None:
    """topic alter --queues: the member's next heartbeat answers REJOIN_GROUP, and its
    next join holds the new queues too; a group consumer reads a message sent to a new
    queue with no member joining or leaving."""
    async with serving(tmp_path) as address, open_client(address) as client:
        await client.admin.create_topic("t", 2)
        one = await master(client, "join_group", group="g", member="m1", topics=["t"])
        beat = await master(client, "heartbeat", group="g", member="m1", generation=1)
        assert beat["status"] is Status.OK
        await client.admin.alter_topic("t", 4)
        beat = await master(client, "heartbeat", group="g", member="m1", generation=1)
        assert beat["status"] is Status.REJOIN_GROUP, "the new queues start a generation"
        again = await master(client, "join_group", group="g", member="m1", topics=["t"])
        assert again["generation"] == one["generation"] + 1 and len(again["assignment"]) == 4
        await master(client, "leave_group", group="g", member="m1")

        await client.admin.create_topic("u", 1)
        options: dict[str, Any] = {"heartbeat_interval_ms": 50, "auto_commit_interval_ms": 50}
        async with GroupConsumer(client, "h", ["u"], member="c", **options) as consumer:
            await consumer.wait_assigned()
            assert len(consumer.assignment) == 1
            await client.admin.alter_topic("u", 2)
            result = await client.producer().send("u", b"new queue", queue=1, acks="durable")
            assert result.ok
            with trio.fail_after(20):
                async for message in consumer:
                    assert message.body == b"new queue"
                    break
            assert len(consumer.assignment) == 2 and consumer.rebalances >= 1
