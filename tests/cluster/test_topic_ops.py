"""Ops on topics beyond create: reading from a time (``offsets_for_time``) and growing a
queue count (``alter_topic``), over the wire of an in-process node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from cluster.node.acks import SlaveAcks, StandaloneAcks
from cluster.protocol import Status, queue_for_key
from tests.cluster.test_server import client, master_and_slave, node_config, running


@attrs.frozen
class ConfirmedUpTo:
    """A slave follower's read limit, held still (the replication stream would move it)."""

    offset: int

    def read_limit(self) -> int:
        return self.offset


async def test_offsets_for_time_finds_the_first_message_stored_at_or_after_it(
    tmp_path: Path,
) -> None:
    async with running(node_config(tmp_path)) as node, client(node) as c:
        await c.ok("create_topic", topic="t", queues=2)
        sent = [
            await c.ok("send", topic="t", body=b"m%d" % i, queue=i % 2, acks="leader")
            for i in range(10)
        ]
        times = [s["store_us"] for s in sent]
        assert times == sorted(times)
        middle = sent[5]  # queue 1, queue offset 2
        answer = await c.ok("offsets_for_time", topic="t", time_us=middle["store_us"])
        first_at_or_after = {
            q: min(
                (s["queue_offset"] for s in sent if s["queue"] == q and s["store_us"] >= times[5]),
                default=5,
            )
            for q in (0, 1)
        }
        assert answer["offsets"] == [{"queue": q, "offset": first_at_or_after[q]} for q in (0, 1)]
        assert answer["offsets"][1]["offset"] == middle["queue_offset"]
        everything = await c.ok("offsets_for_time", topic="t", time_us=0, queue=1)
        assert everything["offsets"] == [{"queue": 1, "offset": 0}]
        future = await c.ok("offsets_for_time", topic="t", time_us=times[-1] + 10**9)
        assert [e["offset"] for e in future["offsets"]] == [5, 5]

        unknown = await c.call("offsets_for_time", topic="nope", time_us=0)
        assert unknown["status"] is Status.UNKNOWN_TOPIC
        wrong_queue = await c.call("offsets_for_time", topic="t", time_us=0, queue=2)
        assert wrong_queue["status"] is Status.BAD_REQUEST and "queue" in wrong_queue["error"]


async def test_offsets_for_time_never_points_past_a_slaves_read_limit(tmp_path: Path) -> None:
    """A slave serves records up to its master's confirm offset only; a time after every
    confirmed record must not skip the unconfirmed ones (a failover can take them back,
    and the records replacing them would get the same queue offsets)."""
    async with running(node_config(tmp_path)) as node, client(node) as c:
        await c.ok("create_topic", topic="t", queues=1)
        sent = [await c.ok("send", topic="t", body=b"x", acks="leader") for _ in range(6)]
        assert node.handler is not None and node.store is not None
        confirmed = sent[3]["offset"]  # records 0..2 end at or before it; 3 ends past it
        node.handler.set_acks(SlaveAcks(StandaloneAcks(node.store), ConfirmedUpTo(confirmed)))
        later = sent[-1]["store_us"] + 1
        answer = await c.ok("offsets_for_time", topic="t", time_us=later)
        assert answer["offsets"] == [{"queue": 0, "offset": 3}]
        page = await c.ok("pull", topic="t", queue=0, offset=0, max_messages=100)
        assert page["next_offset"] == 3  # the same bound a pull has


async def test_alter_topic_grows_the_queue_count_and_refuses_to_shrink(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    async with running(config) as node, client(node) as c:
        await c.ok("create_topic", topic="t", queues=2)
        grown = await c.ok("alter_topic", topic="t", queues=5)
        assert (grown["topic"], grown["queues"]) == ("t", 5)
        sent = await c.ok("send", topic="t", body=b"new", queue=4)
        assert (sent["queue"], sent["queue_offset"]) == (4, 0)
        key = next(k for k in map("k{}".format, range(999)) if queue_for_key(k, 5) == 3)
        assert (await c.ok("send", topic="t", body=b"keyed", key=key))["queue"] == 3
        same = await c.ok("alter_topic", topic="t", queues=5)
        assert same["queues"] == 5
        shrink = await c.call("alter_topic", topic="t", queues=3)
        assert shrink["status"] is Status.BAD_REQUEST
        assert "can only grow" in shrink["error"] and "has 5 queue(s)" in shrink["error"]
        unknown = await c.call("alter_topic", topic="nope", queues=3)
        assert unknown["status"] is Status.UNKNOWN_TOPIC
        assert "tidelog topic create nope" in unknown["error"]
    async with running(config) as node, client(node) as c:
        described = await c.ok("describe_topic", topic="t")
        assert described["queues"] == 5
        page = await c.ok("pull", topic="t", queue=4, offset=0)
        assert [m["body"] for m in page["messages"]] == [b"new"]


async def test_a_slave_follows_a_grown_queue_count(tmp_path: Path) -> None:
    async with (
        master_and_slave(tmp_path) as (master, slave),
        client(master) as c,
        client(slave) as s,
    ):
        await c.ok("create_topic", topic="t", queues=1)
        await slave.sync_topics_now()
        assert (await s.ok("describe_topic", topic="t"))["queues"] == 1
        await c.ok("alter_topic", topic="t", queues=3)
        refused = await s.call("alter_topic", topic="t", queues=4)
        assert refused["status"] is Status.NOT_MASTER
        await slave.sync_topics_now()
        assert (await s.ok("describe_topic", topic="t"))["queues"] == 3


async def test_delete_topic_drops_its_queues_and_a_new_one_starts_fresh(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    async with running(config) as node, client(node) as c:
        await c.ok("create_topic", topic="t", queues=2)
        await c.ok("create_topic", topic="other", queues=1)
        for i in range(6):
            await c.ok("send", topic="t", body=b"old%d" % i, queue=i % 2)
        await c.ok("send", topic="other", body=b"stays")
        deleted = await c.ok("delete_topic", topic="t")
        assert (deleted["topic"], deleted["queues"]) == ("t", 2) and deleted["offset"] > 0
        requests: list[tuple[str, dict[str, Any]]] = [
            ("send", {"body": b"x"}),
            ("pull", {"queue": 0, "offset": 0}),
            ("describe_topic", {}),
            ("delete_topic", {}),
        ]
        for op, fields in requests:
            answer = await c.call(op, topic="t", **fields)
            assert answer["status"] is Status.UNKNOWN_TOPIC, (op, answer)
        assert (await c.ok("list_topics"))["topics"] == [{"topic": "other", "queues": 1}]
        await c.ok("create_topic", topic="t", queues=1)
        sent = await c.ok("send", topic="t", body=b"new")
        assert (sent["queue"], sent["queue_offset"]) == (0, 0)
    async with running(config) as node, client(node) as c:
        page = await c.ok("pull", topic="t", queue=0, offset=0)
        assert [m["body"] for m in page["messages"]] == [b"new"]
        assert (await c.ok("pull", topic="other", queue=0, offset=0))["messages"][0]["body"] == (
            b"stays"
        )


async def test_writes_racing_a_deletion_are_answered_and_nothing_crashes(tmp_path: Path) -> None:
    """Sends on another connection while a delete_topic runs: each is answered OK (stored
    before the marker, or to the topic auto-created after the deletion, numbered from 0
    again) or UNKNOWN_TOPIC; the node serves on."""
    async with running(node_config(tmp_path)) as node, client(node) as c, client(node) as w:
        await c.ok("create_topic", topic="busy", queues=2)
        before = [await w.send("send", topic="busy", body=b"a%d" % i) for i in range(50)]
        delete_id = await c.send("delete_topic", topic="busy")
        during = [await w.send("send", topic="busy", body=b"b%d" % i) for i in range(50)]
        answers = await w.recv_n(100)
        deleted = await c.recv()
        assert deleted is not None and deleted["id"] == delete_id
        assert deleted["status"] is Status.OK
        sent = [answers[i] for i in before + during]
        assert {a["status"] for a in sent} <= {Status.OK, Status.UNKNOWN_TOPIC}
        after = [a for a in sent if a["status"] is Status.OK and a["offset"] > deleted["offset"]]
        described = await c.call("describe_topic", topic="busy")
        if not after:
            assert described["status"] is Status.UNKNOWN_TOPIC
        else:  # auto_create made it again after the marker: numbered from 0, nothing old
            for entry in described["offsets"]:
                offsets = sorted(a["queue_offset"] for a in after if a["queue"] == entry["queue"])
                assert offsets == list(range(len(offsets)))
                assert (entry["min_offset"], entry["max_offset"]) == (0, len(offsets))
        assert (await c.ok("status"))["role"] == "master"


async def test_a_slave_forgets_a_deleted_topic_and_its_queues(tmp_path: Path) -> None:
    async with (
        master_and_slave(tmp_path) as (master, slave),
        client(master) as c,
        client(slave) as s,
    ):
        await c.ok("create_topic", topic="t", queues=1)
        for i in range(3):
            await c.ok("send", topic="t", body=b"m%d" % i, acks="replicated")
        await slave.sync_topics_now()
        assert (await s.ok("describe_topic", topic="t"))["offsets"][0]["max_offset"] == 3
        deleted = await c.ok("delete_topic", topic="t")
        await c.ok("create_topic", topic="t2", queues=1)
        await c.ok("send", topic="t2", body=b"after", acks="replicated")  # past the marker
        assert slave.store is not None and slave.store.max_offset > deleted["offset"]
        assert slave.store.queues.get("t", 0) is None  # the marker dropped the queue
        await slave.sync_topics_now()
        answer = await s.call("describe_topic", topic="t")
        assert answer["status"] is Status.UNKNOWN_TOPIC
