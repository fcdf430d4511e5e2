"""The client server, served by an in-process node on port 0, spoken to over raw TCP.

Requests are built with ``cluster.protocol`` (or by hand, for hostile frames) and
answers read with its ``ResponseDecoder``: nothing here depends on the client library.
Tests synchronise on responses (and, where the server must have processed everything
it can, on ``trio.testing.wait_all_tasks_blocked``), never on sleeps.
"""

from __future__ import annotations

import random
import resource
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.node.topics import (
    InvalidTopicNameError,
    QueueCountError,
    Topic,
    TopicExistsError,
)
from cluster.protocol import (
    HEADER,
    MAX_FRAME_SIZE_LIMIT,
    ResponseDecoder,
    Status,
    batch_results,
    encode_frame,
    encode_request,
    queue_for_key,
)
from cluster.server import (
    TAGS_PROPERTY,
    QueueChooser,
    RequestError,
    Wakeups,
    build_message,
    check_queue,
    message_map,
    response_for_error,
)
from storage import (
    CorruptSegmentError,
    DiskFullError,
    InvalidMessageError,
    InvalidTopicError,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    StorageFailedError,
    StoredRecord,
)
from storage.record import encode_properties
from tests.conftest import SMALL_SEGMENT

STORE = {
    "segment_size": SMALL_SEGMENT,
    "max_message_size": 16 * 1024,
    "consume_queue_entries": 64,
    "flush_interval_ms": 50,
    "flush_thorough_interval_ms": 200,
    "retention_check_interval_ms": 3_600_000,
}
ANSWER_TIMEOUT = 15


def node_config(data_dir: Path, **sections: dict[str, Any]) -> NodeConfig:
    return NodeConfig.create(data_dir, node={"port": 0}, store=STORE, **sections)


@asynccontextmanager
async def running(config: NodeConfig) -> AsyncIterator[Node]:
    """A node serving in this test's trio loop; shut down gracefully when the block ends."""
    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            node.request_shutdown()


@asynccontextmanager
async def master_and_slave(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """A master with an HA port and a slave that follows it and reads its topic list."""
    async with running(node_config(tmp_path / "master", replication={"ha_port": 0})) as master:
        assert master.ha_address is not None and master.address is not None
        slave_config = node_config(
            tmp_path / "slave",
            replication={
                "role": "slave",
                "master_ha": "{}:{}".format(*master.ha_address),
                "master_client": "{}:{}".format(*master.address),
            },
        )
        async with running(slave_config) as slave:
            yield master, slave


class Raw:
    """A bare protocol client: frames out, decoded responses in, nothing else."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = ResponseDecoder(max_frame_size=MAX_FRAME_SIZE_LIMIT)
        self._last_id = 0

    @classmethod
    async def connect(cls, node: Node) -> Raw:
        assert node.address is not None
        return cls(await trio.open_tcp_stream(*node.address))

    async def send(self, op: str, **fields: Any) -> int:
        self._last_id += 1
        await self.stream.send_all(encode_request(op, self._last_id, **fields))
        return self._last_id

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> dict[str, Any] | None:
        """The next response, or None at EOF."""
        with trio.fail_after(ANSWER_TIMEOUT):
            while (item := self.decoder.next_frame()) is None:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                self.decoder.feed(data)
        assert isinstance(item, dict), item
        return item

    async def recv_n(self, count: int) -> dict[int, dict[str, Any]]:
        """``count`` responses, by id."""
        answers: dict[int, dict[str, Any]] = {}
        for _ in range(count):
            answer = await self.recv()
            assert answer is not None, f"EOF after {len(answers)} of {count} answers"
            answers[answer["id"]] = answer
        return answers

    async def recv_until_eof(self) -> list[dict[str, Any]]:
        answers = []
        while (answer := await self.recv()) is not None:
            answers.append(answer)
        return answers

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        req_id = await self.send(op, **fields)
        answer = await self.recv()
        assert answer is not None and answer["id"] == req_id, answer
        return answer

    async def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        answer = await self.call(op, **fields)
        assert answer["status"] is Status.OK, answer
        return answer

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def client(node: Node) -> AsyncIterator[Raw]:
    raw = await Raw.connect(node)
    try:
        yield raw
    finally:
        await raw.aclose()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running(node_config(tmp_path / "node")) as serving:
        yield serving


def frame(body: dict[str, Any]) -> bytes:
    """A frame the client library would refuse to build: for hostile-input tests."""
    return encode_frame(body)


async def until(predicate: Any) -> None:
    """Let every task run until ``predicate()`` holds (no sleeps: the server has nothing
    left to do each time we look)."""
    with trio.fail_after(ANSWER_TIMEOUT):
        while not predicate():
            await trio.testing.wait_all_tasks_blocked()


# ---- every op ---------------------------------------------------------------------------------


async def test_every_op_round_trips(node: Node) -> None:
    async with client(node) as c:
        created = await c.ok("create_topic", topic="orders", queues=2)
        assert (created["topic"], created["queues"]) == ("orders", 2)
        listed = await c.ok("list_topics")
        assert listed["topics"] == [{"topic": "orders", "queues": 2}]

        sent = await c.ok(
            "send",
            topic="orders",
            body=b"first",
            queue=1,
            tags="red",
            props={"colour": "red"},
            born_us=123,
            acks="leader",
        )
        assert (sent["topic"], sent["queue"], sent["queue_offset"]) == ("orders", 1, 0)
        assert sent["offset"] == 0 and sent["store_us"] > 0
        key = next(k for k in map("customer-{}".format, range(99)) if queue_for_key(k, 2) == 0)
        keyed = await c.ok("send", topic="orders", body=b"keyed", key=key)
        assert (keyed["queue"], keyed["queue_offset"]) == (0, 0)
        batch = await c.ok(
            "send_batch",
            topic="orders",
            messages=[{"body": b"b0", "queue": 1}, {"body": b"b1", "queue": 1, "tags": "x"}],
        )
        assert [r["queue_offset"] for r in batch_results(batch)] == [1, 2]
        assert (
            batch_results(batch)[1]["offset"] > batch_results(batch)[0]["offset"] > sent["offset"]
        )

        pulled = await c.ok("pull", topic="orders", queue=1, offset=0)
        messages = pulled["messages"]
        assert [m["body"] for m in messages] == [b"first", b"b0", b"b1"]
        assert messages[0]["tags"] == "red" and messages[0]["props"] == {"colour": "red"}
        assert messages[0]["born_us"] == 123
        assert "tags" not in messages[1] and "props" not in messages[1]
        assert messages[2]["tags"] == "x" and "props" not in messages[2]  # TAGS is stripped
        assert (pulled["next_offset"], pulled["min_offset"], pulled["max_offset"]) == (3, 0, 3)
        assert [m["queue_offset"] for m in messages] == [0, 1, 2]

        offsets = await c.ok("get_offsets", topic="orders")
        assert offsets["topic"] == "orders"
        assert offsets["offsets"] == [
            {"queue": 0, "min_offset": 0, "max_offset": 1},
            {"queue": 1, "min_offset": 0, "max_offset": 3},
        ]
        one = await c.ok("get_offsets", topic="orders", queue=1)
        assert one["offsets"] == [{"queue": 1, "min_offset": 0, "max_offset": 3}]

        read = await c.ok("read", offset=batch_results(batch)[1]["offset"])
        assert (read["topic"], read["queue"]) == ("orders", 1)
        assert read["record"]["body"] == b"b1" and read["record"]["tags"] == "x"
        assert read["record"]["queue_offset"] == 2

        described = await c.ok("describe_topic", topic="orders")
        assert described["queues"] == 2 and described["created_us"] > 0
        assert described["offsets"] == offsets["offsets"]

        status = await c.ok("status")
        assert status["role"] == "master" and status["writable"] is True
        # No HA port: no replication, but a term of its own (every writer has one).
        assert status["replication"] is None and status["epoch"] == 1
        assert status["node"] == "node-1" and status["topics"] == 1
        assert status["connections"] == 1 and status["uptime_ms"] >= 0
        assert status["max_offset"] == status["store"]["log_max_offset"] > 0
        assert status["min_offset"] == 0
        assert node.address is not None
        assert status["address"] == "{}:{}".format(*node.address)


async def test_round_robin_spreads_unrouted_sends_and_keeps_a_batch_together(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="rr", queues=3)
        queues = [(await c.ok("send", topic="rr", body=b"x"))["queue"] for _ in range(4)]
        assert queues == [0, 1, 2, 0]
        batch = await c.ok("send_batch", topic="rr", messages=[{"body": b"a"}, {"body": b"b"}])
        assert [r["queue"] for r in batch_results(batch)] == [1, 1]


async def test_pipelined_requests_are_answered_by_id_and_appended_in_order(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="pipe", queues=1)
        frames, kinds = [], {}
        for i in range(1, 301):
            if i % 50 == 0:
                frames.append(encode_request("status", i))
                kinds[i] = "status"
            else:
                acks = "durable" if i % 3 else "leader"
                frames.append(encode_request("send", i, topic="pipe", body=b"%d" % i, acks=acks))
                kinds[i] = "send"
        await c.send_raw(b"".join(frames))
        answers = await c.recv_n(len(frames))
        assert set(answers) == set(kinds)
        assert all(a["status"] is Status.OK for a in answers.values())
        sends = sorted(i for i, kind in kinds.items() if kind == "send")
        # One connection's sends are appended in the order it sent them.
        assert [answers[i]["queue_offset"] for i in sends] == list(range(len(sends)))
        page = await c.ok("pull", topic="pipe", queue=0, offset=0, max_messages=1024)
        assert [m["body"] for m in page["messages"]] == [b"%d" % i for i in sends]


# ---- acks -------------------------------------------------------------------------------------


async def test_durable_ack_returns_offsets_and_the_data_is_flushed(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="d", queues=1)
        sent = await c.ok("send", topic="d", body=b"kept", acks="durable")
        assert sent["queue_offset"] == 0
        assert node.store is not None
        assert node.store.commit_log.flushed_offset > sent["offset"]
        batch = await c.ok("send_batch", topic="d", messages=[{"body": b"1"}, {"body": b"2"}])
        assert node.store.commit_log.flushed_offset > batch_results(batch)[-1]["offset"]
        read = await c.ok("read", offset=sent["offset"])
        assert read["record"]["body"] == b"kept"


def answer_through_waits(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write's ack goes through ``store.wait_durable``, which the test replaced:
    the policy's no-wait check (``holds``) reads the real flushed offset, which the
    real flusher may move meanwhile."""
    monkeypatch.setattr(node.acks, "holds", lambda _acks, _end_offset: False)


async def test_durable_timeout_still_reports_where_the_message_went(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(_offset: int, _timeout: float) -> bool:
        return False

    monkeypatch.setattr(node.store, "wait_durable", never)
    answer_through_waits(node, monkeypatch)
    async with client(node) as c:
        await c.ok("create_topic", topic="slow", queues=1)
        answer = await c.call("send", topic="slow", body=b"x", timeout_ms=1)
        assert answer["status"] is Status.FLUSH_DISK_TIMEOUT
        assert answer["status"].has_result and "fsync" in answer["error"]
        assert (answer["queue"], answer["queue_offset"], answer["offset"]) == (0, 0, 0)


async def test_queued_ack_waits_keep_their_own_deadlines_and_answer_in_any_order(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connection's ack waits share a task while their deadlines do not decrease: a
    write with a shorter timeout behind a stuck one still times out on its own, and
    writes queued behind the stuck one are answered as soon as the fsync comes."""
    assert node.store is not None
    fsynced = trio.Event()

    async def fsync_when_released(_offset: int, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await fsynced.wait()
        return fsynced.is_set()

    monkeypatch.setattr(node.store, "wait_durable", fsync_when_released)
    answer_through_waits(node, monkeypatch)
    async with client(node) as c:
        await c.ok("create_topic", topic="q", queues=1)
        stuck = await c.send("send", topic="q", body=b"a", acks="durable", timeout_ms=60_000)
        queued = [
            await c.send("send", topic="q", body=b"b%d" % i, acks="durable", timeout_ms=60_000)
            for i in range(3)
        ]
        short = await c.send("send", topic="q", body=b"c", acks="durable", timeout_ms=1)
        first = await c.recv()
        assert first is not None and first["id"] == short, first
        assert first["status"] is Status.FLUSH_DISK_TIMEOUT and first["queue_offset"] == 4
        fsynced.set()
        rest = await c.recv_n(4)
        assert sorted(rest) == sorted([stuck, *queued])
        assert all(answer["status"] is Status.OK for answer in rest.values()), rest
        assert [rest[i]["queue_offset"] for i in [stuck, *queued]] == [0, 1, 2, 3]


@pytest.mark.parametrize("acks", ["replicated", "in_sync"])
async def test_replicated_is_refused_before_anything_is_appended(node: Node, acks: str) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="r", queues=1)
        before = (await c.ok("status"))["max_offset"]
        one = await c.call("send", topic="r", body=b"x", acks=acks)
        many = await c.call("send_batch", topic="r", messages=[{"body": b"y"}], acks=acks)
        for answer in (one, many):
            assert answer["status"] is Status.SLAVE_NOT_AVAILABLE
            assert answer["status"].retryable and "nothing was written" in answer["error"]
            assert f"acks={acks}" in answer["error"]
        assert (await c.ok("status"))["max_offset"] == before
        assert (await c.ok("get_offsets", topic="r"))["offsets"][0]["max_offset"] == 0


# ---- long polls -------------------------------------------------------------------------------


async def test_long_poll_wakes_when_another_connection_sends(node: Node) -> None:
    async with client(node) as consumer, client(node) as producer:
        await consumer.ok("create_topic", topic="poll", queues=1)
        poll_id = await consumer.send("pull", topic="poll", queue=0, offset=0, wait_ms=30_000)
        # One reader serves a connection in order: the status answer proves the pull was
        # read and parked before it, and the poll's own answer has not come first.
        status_id = await consumer.send("status")
        first = await consumer.recv()
        assert first is not None and first["id"] == status_id
        await producer.ok("send", topic="poll", body=b"wake up", acks="leader")
        woken = await consumer.recv()
        assert woken is not None and woken["id"] == poll_id and woken["status"] is Status.OK
        assert [m["body"] for m in woken["messages"]] == [b"wake up"]


async def test_long_poll_times_out_empty_and_sends_to_other_topics_do_not_answer_it(
    node: Node,
) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="quiet", queues=1)
        await c.ok("create_topic", topic="busy", queues=1)
        poll_id = await c.send("pull", topic="quiet", queue=0, offset=0, wait_ms=200)
        await c.ok("send", topic="busy", body=b"elsewhere", acks="leader")
        answer = await c.recv()
        assert answer is not None and answer["id"] == poll_id
        assert answer["messages"] == [] and answer["next_offset"] == 0


async def test_pull_offsets_out_of_range(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="p", queues=1)
        await c.ok("send", topic="p", body=b"only", acks="leader")
        at_end = await c.ok("pull", topic="p", queue=0, offset=1)
        assert at_end["messages"] == [] and at_end["next_offset"] == 1
        beyond = await c.call("pull", topic="p", queue=0, offset=2)
        assert beyond["status"] is Status.OFFSET_OUT_OF_RANGE
        assert (beyond["min_offset"], beyond["max_offset"]) == (0, 1)
        inside = await c.call("read", offset=3)  # inside the first record
        assert inside["status"] is Status.OFFSET_OUT_OF_RANGE and inside["min_offset"] == 0
        past = await c.call("read", offset=10**9)
        assert past["status"] is Status.OFFSET_OUT_OF_RANGE


# ---- request errors ---------------------------------------------------------------------------


async def test_unknown_topic_everywhere(node: Node) -> None:
    async with client(node) as c:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("send", {"body": b"x"}),
            ("send_batch", {"messages": [{"body": b"x"}]}),
            ("pull", {"queue": 0, "offset": 0}),
            ("get_offsets", {}),
            ("describe_topic", {}),
        ]
        for op, fields in cases:
            answer = await c.call(op, topic="ghost", **fields)
            assert answer["status"] is Status.UNKNOWN_TOPIC, (op, answer)
            assert "ghost" in answer["error"]
            assert "tidelog topic create ghost" in answer["error"], "name the command that fixes it"
        assert (await c.ok("status"))["max_offset"] == 0


async def test_auto_create_makes_the_topic_on_first_send(tmp_path: Path) -> None:
    config = node_config(tmp_path, topics={"auto_create": True, "default_queues": 3})
    async with running(config) as node, client(node) as c:
        await c.ok("send", topic="fresh", body=b"x")
        described = await c.ok("describe_topic", topic="fresh")
        assert described["queues"] == 3
        pulled = await c.call("pull", topic="never-sent", queue=0, offset=0)
        assert pulled["status"] is Status.UNKNOWN_TOPIC  # reads do not create


async def test_create_topic_errors(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="dup", queues=3)
        again = await c.call("create_topic", topic="dup", queues=3)
        assert again["status"] is Status.TOPIC_EXISTS and again["queues"] == 3
        await c.send_raw(frame({"v": 1, "op": "create_topic", "id": 9, "topic": ".x", "queues": 1}))
        answer = await c.recv()
        assert answer is not None and answer["status"] is Status.INVALID_TOPIC


async def test_queue_out_of_range_names_the_field_and_the_queue_count(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="q", queues=2)
        send = await c.call("send", topic="q", body=b"x", queue=2)
        assert send["status"] is Status.BAD_REQUEST
        assert "'queue' is 2" in send["error"] and "2 queue(s)" in send["error"]
        batch = await c.call(
            "send_batch", topic="q", messages=[{"body": b"ok"}, {"body": b"x", "queue": 7}]
        )
        assert batch["status"] is Status.BAD_REQUEST and "messages[1].queue" in batch["error"]
        for op, fields in [("pull", {"offset": 0}), ("get_offsets", {})]:
            answer = await c.call(op, topic="q", queue=5, **fields)
            assert answer["status"] is Status.BAD_REQUEST and "2 queue(s)" in answer["error"]
        assert (await c.ok("status"))["max_offset"] == 0  # the batch was all or nothing


async def test_oversized_message_and_reserved_property(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="big", queues=1)
        too_big = await c.call("send", topic="big", body=bytes(20_000))
        assert (
            too_big["status"] is Status.MESSAGE_TOO_LARGE and "max_message_size" in too_big["error"]
        )
        reserved = await c.call("send", topic="big", body=b"x", props={TAGS_PROPERTY: "sneaky"})
        assert reserved["status"] is Status.BAD_REQUEST and "reserved" in reserved["error"]
        in_batch = await c.call(
            "send_batch", topic="big", messages=[{"body": b"x", "props": {"TAGS": "y"}}]
        )
        assert "messages[0].props['TAGS']" in in_batch["error"]
        assert (await c.ok("status"))["max_offset"] == 0


async def test_internal_errors_answer_one_request_and_the_node_keeps_serving(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("bug in get_record_runs")

    async def broken_wait(_offset: int, _timeout: float) -> bool:
        raise ZeroDivisionError("bug in a deferred wait")

    async with client(node) as c, client(node) as other:
        await c.ok("create_topic", topic="t", queues=1)
        monkeypatch.setattr(node.store, "get_record_runs", broken)
        monkeypatch.setattr(node.store, "wait_durable", broken_wait)
        answer_through_waits(node, monkeypatch)
        inline = await c.call("pull", topic="t", queue=0, offset=0)
        deferred = await c.call("send", topic="t", body=b"x", acks="durable")
        for answer in (inline, deferred):
            assert answer["status"] is Status.INTERNAL_ERROR
            assert answer["status"].outcome_unknown
        assert "RuntimeError" in inline["error"] and "ZeroDivisionError" in deferred["error"]
        assert "bug in get_record_runs" in caplog.text  # logged with its traceback
        assert (await c.ok("status"))["role"] == "master"
        assert (await other.ok("send", topic="t", body=b"y", acks="leader"))["queue_offset"] == 1


async def test_disk_full_is_reported_and_clears(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.store is not None
    real_put = node.store.put

    async def full(_message: object) -> None:
        raise DiskFullError("no room for the next segment")

    async with client(node) as c:
        await c.ok("create_topic", topic="f", queues=1)
        monkeypatch.setattr(node.store, "put", full)
        answer = await c.call("send", topic="f", body=b"x")
        assert answer["status"] is Status.DISK_FULL
        assert (await c.ok("status"))["writable"] is False
        monkeypatch.setattr(node.store, "put", real_put)
        await c.ok("send", topic="f", body=b"x")
        assert (await c.ok("status"))["writable"] is True


# ---- hostile input ----------------------------------------------------------------------------


async def test_protocol_errors_are_answered_and_the_connection_reads_on(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="t", queues=1)
        stream = b"".join(
            [
                encode_request("status", 1),
                HEADER.pack(3) + b"\xff\xff\xff",  # malformed CBOR
                frame({"v": 1, "op": "nope", "id": 2}),  # unknown op
                frame({"v": 1, "op": "pull", "id": 3, "topic": "t", "queue": "0", "offset": 0}),
                frame({"v": 1, "op": "send", "id": 4}),  # missing fields
                frame({"v": 9, "op": "status", "id": 5}),
                frame({"v": 1, "op": "status"}),  # no id: answered with id 0
                HEADER.pack(2) + cbor2.dumps([1]),  # not a map
                encode_request("status", 6),
            ]
        )
        await c.send_raw(stream)
        answers = [await c.recv() for _ in range(9)]
        by_id: dict[int, list[Status]] = {}
        for answer in answers:
            assert answer is not None
            by_id.setdefault(answer["id"], []).append(answer["status"])
        assert by_id[1] == [Status.OK] and by_id[6] == [Status.OK]
        assert by_id[2] == [Status.UNKNOWN_OP]
        assert by_id[3] == [Status.BAD_REQUEST]
        assert by_id[4] == [Status.BAD_REQUEST]
        assert by_id[5] == [Status.UNSUPPORTED_VERSION]
        assert by_id[0] == [Status.MALFORMED_FRAME] * 3
        wrong_type = next(a for a in answers if a and a["id"] == 3)
        assert "'queue'" in wrong_type["error"] and "text string '0'" in wrong_type["error"]


async def test_huge_length_prefix_closes_only_that_connection(node: Node) -> None:
    async with client(node) as bystander, client(node) as hostile:
        await bystander.ok("status")
        await hostile.send_raw(HEADER.pack(0xFFFF_FFFF) + b"garbage that follows")
        answers = await hostile.recv_until_eof()
        assert [(a["id"], a["status"]) for a in answers] == [(0, Status.FRAME_TOO_LARGE)]
        assert answers[0]["status"].closes_connection
        await hostile.aclose()
        assert node.server is not None
        await until(lambda: node.server.connections == 1)
        assert (await bystander.ok("status"))["connections"] == 1


async def test_random_bytes_do_not_disturb_the_node(node: Node) -> None:
    rng = random.Random(7)
    async with client(node) as bystander:
        for _ in range(5):
            async with client(node) as hostile:
                garbage = rng.randbytes(4096)
                await hostile.send_raw(garbage)
                await hostile.stream.send_eof()
                answers = await hostile.recv_until_eof()
                assert all(a["status"] is not Status.OK for a in answers)
        # Small frames of random bytes: each one is answered, the connection stays open.
        async with client(node) as noisy:
            await noisy.send_raw(b"".join(HEADER.pack(64) + rng.randbytes(64) for _ in range(20)))
            replies = [await noisy.recv() for _ in range(20)]
            assert all(a is not None and a["status"] is not Status.OK for a in replies)
            await noisy.ok("status")
        await bystander.ok("status")


async def test_truncated_frame_then_close_is_cleaned_up(node: Node) -> None:
    assert node.server is not None
    async with client(node) as bystander:
        await bystander.ok("status")
        hostile = await Raw.connect(node)
        whole = encode_request("send", 1, topic="t", body=b"x" * 100)
        await hostile.send_raw(whole[: len(whole) // 2])
        await until(lambda: node.server.connections == 2)
        await hostile.aclose()
        assert node.server is not None
        await until(lambda: node.server.connections == 1)
        assert (await bystander.ok("status"))["connections"] == 1


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_a_client_that_vanishes_mid_request_is_cleaned_up(
    node: Node, monkeypatch: pytest.MonkeyPatch, reset: bool
) -> None:
    assert node.store is not None and node.server is not None
    gate, parked = trio.Event(), trio.Event()
    real_wait = node.store.wait_durable

    async def gated(offset: int, timeout: float) -> bool:
        parked.set()
        await gate.wait()
        return await real_wait(offset, timeout)

    monkeypatch.setattr(node.store, "wait_durable", gated)
    answer_through_waits(node, monkeypatch)
    async with client(node) as bystander:
        await bystander.ok("create_topic", topic="v", queues=1)
        leaving = await Raw.connect(node)
        for i in range(5):
            await leaving.send("send", topic="v", body=b"%d" % i, acks="durable")
        await parked.wait()
        if reset:  # SO_LINGER 0: close() sends a reset
            leaving.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await leaving.aclose()
        if not reset:
            await trio.testing.wait_all_tasks_blocked()
            assert node.server.connections == 2  # still owes answers: waits for them
            gate.set()
        await until(lambda: node.server.connections == 1)
        gate.set()
        assert node.server._inflight == 0
        assert (await bystander.ok("get_offsets", topic="v"))["offsets"][0]["max_offset"] == 5


@contextmanager
def open_files_limit(needed: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_two_thousand_idle_connections_then_a_normal_request(node: Node) -> None:
    idle: list[trio.SocketStream] = []
    assert node.address is not None and node.server is not None
    with open_files_limit(2 * 2000 + 500):
        try:
            for _ in range(2000):
                idle.append(await trio.open_tcp_stream(*node.address))
            async with client(node) as c:
                await until(lambda: node.server.connections == 2001)
                status = await c.ok("status")
                assert status["connections"] == 2001
                await c.ok("create_topic", topic="busy", queues=1)
                assert (await c.ok("send", topic="busy", body=b"x"))["queue_offset"] == 0
        finally:
            for stream in idle:
                await stream.aclose()
    await until(lambda: node.server.connections == 0)


async def test_connections_beyond_the_limit_get_one_error_frame(tmp_path: Path) -> None:
    async with running(node_config(tmp_path, server={"max_connections": 2})) as node:
        assert node.server is not None
        async with client(node) as a, client(node) as b:
            await a.ok("status")
            await b.ok("status")
            async with client(node) as refused:
                answers = await refused.recv_until_eof()
            assert [(x["id"], x["status"]) for x in answers] == [(0, Status.TOO_MANY_CONNECTIONS)]
            assert answers[0]["max_connections"] == 2 and answers[0]["status"].retryable
            await a.ok("status")
        await until(lambda: node.server.connections == 0)
        async with client(node) as later:
            await later.ok("status")
        assert node.server.refused == 1


async def test_an_idle_connection_is_closed_but_a_long_poll_is_not(tmp_path: Path) -> None:
    """Issue 8 point 4: idle clients must not hold descriptors forever. A connection
    waiting for its long poll's answer is not idle, however long it sends nothing."""
    async with running(node_config(tmp_path, server={"idle_timeout_ms": 200})) as node:
        async with client(node) as idle, client(node) as polling:
            await idle.ok("status")
            await polling.ok("create_topic", topic="t", queues=1)
            answer = await polling.ok("pull", topic="t", queue=0, offset=0, wait_ms=800)
            assert answer["messages"] == []
            assert await idle.recv() is None  # the node closed it: EOF, no error frame
        async with client(node) as later:
            await later.ok("status")


async def test_a_client_that_does_not_read_gets_backpressure(tmp_path: Path) -> None:
    config = node_config(tmp_path, server={"max_inflight_per_connection": 2})
    async with running(config) as node, client(node) as slow, client(node) as producer:
        await producer.ok("create_topic", topic="bp", queues=1)
        first = await slow.send("pull", topic="bp", queue=0, offset=0, wait_ms=30_000)
        second = await slow.send("pull", topic="bp", queue=0, offset=0, wait_ms=30_000)
        status = await slow.send("status")
        # Both slots are held by parked polls: the status frame waits, unread.
        await trio.testing.wait_all_tasks_blocked()
        await producer.ok("send", topic="bp", body=b"go", acks="leader")
        order = []
        for _ in range(3):
            answer = await slow.recv()
            assert answer is not None
            order.append(answer["id"])
        assert sorted(order[:2]) == [first, second] and order[2] == status


async def test_answers_a_client_does_not_read_are_bounded_in_bytes(tmp_path: Path) -> None:
    """Issue 8 point 5: pipelined large pulls that are never read used to pile up in the
    node (the in-flight bound counts requests, not bytes). Past the byte bound the node
    stops reading that client; another client is served meanwhile."""
    cap = 256 << 10
    config = node_config(tmp_path, server={"max_connection_response_bytes": cap})
    async with running(config) as node, client(node) as greedy, client(node) as other:
        await other.ok("create_topic", topic="big", queues=1)
        body = bytes(16_000)
        await other.ok(
            "send_batch", topic="big", messages=[{"body": body} for _ in range(64)], acks="leader"
        )
        pulls = 200
        for _ in range(pulls):
            await greedy.send("pull", topic="big", queue=0, offset=0, max_messages=64)
        await trio.testing.wait_all_tasks_blocked()
        assert node.server is not None
        one_answer = 64 * 16_100
        assert node.server.response_bytes <= cap + one_answer
        await other.ok("status")
        answers = await greedy.recv_n(pulls)  # reading resumes the rest, none lost
        assert all(len(a["messages"]) == 64 for a in answers.values())
        await until(lambda: node.server is not None and node.server.response_bytes == 0)


async def test_large_frames_being_received_share_one_byte_budget(tmp_path: Path) -> None:
    """Issue 8 point 5: many clients each sending most of a large frame used to make the
    node hold all of them. A large frame reserves its size first; past the node's budget
    a connection is not read until another frame completes. Every frame is answered."""
    budget = 1 << 20
    config = node_config(tmp_path, server={"max_buffered_request_bytes": budget})
    frame_size = 600_000
    async with running(config) as node:
        assert node.server is not None
        clients = [await Raw.connect(node) for _ in range(3)]
        try:
            frames = [encode_request("send", 1, topic="t", body=bytes(frame_size)) for _ in clients]
            for raw, data in zip(clients, frames, strict=True):
                await raw.send_raw(data[:100_000])
            reserved = node.server.request_bytes
            # The node reads what the kernel has delivered; under load that can take more
            # than one idle point, so wait until a connection found the budget spent.
            await until(lambda: reserved.waits >= 1)
            assert 0 < reserved.used <= budget and reserved.waits >= 1
            answers: list[dict[str, Any] | None] = []

            async def finish(raw: Raw, rest: bytes) -> None:
                await raw.send_raw(rest)  # blocks while the node does not read this one
                answers.append(await raw.recv())

            async with trio.open_nursery() as nursery:
                for raw, data in zip(clients, frames, strict=True):
                    nursery.start_soon(finish, raw, data[100_000:])
            assert [answer and answer["id"] for answer in answers] == [1, 1, 1]
            await until(lambda: reserved.used == 0)
        finally:
            for raw in clients:
                await raw.aclose()


# ---- shutdown and restart ---------------------------------------------------------------------


async def test_shutdown_answers_durable_waits_in_flight_and_refuses_new_requests(
    tmp_path: Path,
) -> None:
    config = node_config(tmp_path)
    node = Node(config)
    gate = trio.Event()
    waiting = trio.Event()
    count = 20
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert node.store is not None
        real_wait = node.store.wait_durable

        async def gated(offset: int, timeout: float) -> bool:
            waiting.set()
            await gate.wait()
            return await real_wait(offset, timeout)

        node.store.wait_durable = gated  # type: ignore[method-assign]
        c = await Raw.connect(node)
        await c.ok("create_topic", topic="s", queues=1)
        ids = [
            await c.send("send", topic="s", body=b"%d" % i, acks="durable") for i in range(count)
        ]
        await waiting.wait()  # one connection's waits queue behind the first
        assert node.server is not None
        await until(lambda: node.server._inflight == count)  # every send read and appended
        node.request_shutdown()
        assert node.server is not None
        await until(lambda: node.server.draining)
        late = await c.send("status")
        refused = await c.recv()
        assert refused is not None and refused["id"] == late
        assert refused["status"] is Status.SHUTTING_DOWN and refused["status"].retryable
        gate.set()
        answers = await c.recv_n(count)
        assert sorted(answers) == ids
        assert all(a["status"] is Status.OK for a in answers.values())
        assert await c.recv() is None  # then the node closes the connection
        await c.aclose()
    async with running(config) as again, client(again) as c:
        page = await c.ok("pull", topic="s", queue=0, offset=0, max_messages=100)
        assert [m["body"] for m in page["messages"]] == [b"%d" % i for i in range(count)]


# ---- sans-IO pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidTopicError("bad"), Status.INVALID_TOPIC),
        (MessageTooLargeError("big"), Status.MESSAGE_TOO_LARGE),
        (InvalidMessageError("bad"), Status.BAD_REQUEST),
        (OffsetOutOfRangeError("gone"), Status.OFFSET_OUT_OF_RANGE),
        (DiskFullError("full"), Status.DISK_FULL),
        (StorageFailedError("fsync"), Status.STORAGE_FAILED),
        (InvalidTopicNameError("bad"), Status.INVALID_TOPIC),
        (QueueCountError("0"), Status.BAD_REQUEST),
        (TopicExistsError(Topic("t", 3, 0)), Status.TOPIC_EXISTS),
        (RequestError(Status.UNKNOWN_TOPIC, "no", extra=1), Status.UNKNOWN_TOPIC),
        (CorruptSegmentError("rot"), Status.INTERNAL_ERROR),
        (KeyError("bug"), Status.INTERNAL_ERROR),
    ],
)
def test_every_error_maps_to_one_status(error: Exception, status: Status) -> None:
    answer = response_for_error(42, error, "send")
    assert (answer["id"], answer["status"]) == (42, status)
    assert answer["error"]
    if status is Status.TOPIC_EXISTS:
        assert answer["queues"] == 3
    if isinstance(error, RequestError):
        assert answer["extra"] == 1
    if status is Status.INTERNAL_ERROR:
        assert "'send'" in answer["error"] and type(error).__name__ in answer["error"]


def test_queue_choice() -> None:
    chooser = QueueChooser()
    topic = Topic("t", 4, 0)
    assert chooser.choose(topic, 3, None) == 3
    assert chooser.choose(topic, None, b"k") == queue_for_key(b"k", 4)
    assert [chooser.choose(topic, None, None) for _ in range(5)] == [0, 1, 2, 3, 0]
    assert chooser.choose(Topic("other", 2, 0), None, None) == 0  # per topic
    batch: list[dict[str, Any]] = [
        {"queue": None, "key": None},
        {"queue": 0, "key": None},
        {"queue": None, "key": "k"},
        {"queue": None, "key": None},
    ]
    assert chooser.choose_batch(topic, batch) == [1, 0, queue_for_key("k", 4), 1]
    assert chooser.choose(topic, None, None) == 2  # the batch took one turn
    with pytest.raises(RequestError) as caught:
        chooser.choose_batch(topic, [{"queue": 4, "key": None}])
    assert "messages[0].queue" in caught.value.message
    with pytest.raises(RequestError):
        check_queue(topic, 4, "queue")


def test_tags_travel_in_a_reserved_property() -> None:
    fields = {"body": b"b", "tags": "red", "props": {"k": "v"}, "born_us": None}
    message = build_message("t", fields, 2)
    assert (message.topic, message.queue_id, message.tags, message.born_us) == ("t", 2, "red", 0)
    assert message.properties == encode_properties({"k": "v", TAGS_PROPERTY: "red"})
    record = StoredRecord(
        100, 90, 2, 7, 0, 5, 6, 0, "t", memoryview(message.properties), memoryview(b"b")
    )
    mapped = message_map(7, record)
    assert mapped == {
        "queue_offset": 7,
        "offset": 100,
        "body": b"b",
        "born_us": 5,
        "store_us": 6,
        "tags": "red",
        "props": {"k": "v"},
    }
    bare = build_message("t", {"body": b"b", "tags": None, "props": None, "born_us": 9}, 0)
    assert bare.properties == b"" and bare.born_us == 9
    with pytest.raises(RequestError, match="reserved"):
        build_message("t", {**fields, "props": {TAGS_PROPERTY: "x"}}, 0)


async def test_wakeups_end_parked_waits_early() -> None:
    wakeups = Wakeups()
    ended: list[bool] = []

    async def park() -> None:
        with wakeups.deadline(trio.current_time() + 3600):
            await trio.sleep_forever()
        ended.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(park)
        await trio.testing.wait_all_tasks_blocked()
        wakeups.wake_all()
    assert ended == [True]
    with wakeups.deadline(trio.current_time() + 3600):  # after wake_all: already over
        await trio.sleep_forever()


# ---- a model of request sequences -------------------------------------------------------------

_topic = st.sampled_from(("alpha", "alpha", "beta", "gamma"))
"""Sequences start by creating alpha or beta or both; gamma is created only by chance."""
_create = st.tuples(st.just("create_topic"), _topic, st.integers(1, 3))
_setup = st.tuples(st.just("create_topic"), st.sampled_from(("alpha", "beta")), st.integers(1, 3))
_route = st.one_of(
    st.none(),
    st.tuples(st.just("queue"), st.integers(0, 2)),
    st.tuples(st.just("key"), st.text("abc", min_size=1, max_size=3)),
)
_message = st.tuples(st.binary(max_size=12), _route, st.one_of(st.none(), st.sampled_from("xy")))
_ops = st.one_of(
    _create,
    st.tuples(st.just("send"), _topic, _message, st.sampled_from(["leader", "durable"])),
    st.tuples(st.just("send_batch"), _topic, st.lists(_message, min_size=1, max_size=4)),
    st.tuples(st.just("pull"), _topic, st.integers(0, 2), st.integers(0, 3), st.integers(1, 4)),
    st.tuples(st.just("get_offsets"), _topic, st.one_of(st.none(), st.integers(0, 2))),
)
_sequences = st.builds(
    list.__add__, st.lists(_setup, min_size=1, max_size=2), st.lists(_ops, min_size=5, max_size=30)
)


def _message_fields(message: tuple[bytes, Any, str | None]) -> dict[str, Any]:
    body, route, tags = message
    fields: dict[str, Any] = {"body": body}
    if route is not None:
        fields[route[0]] = route[1]
    if tags is not None:
        fields["tags"] = tags
    return fields


class Model:
    """What the node should answer, applying requests in the order one connection sent them."""

    def __init__(self) -> None:
        self.queues: dict[str, int] = {}
        self.logs: dict[tuple[str, int], list[tuple[bytes, str | None]]] = {}

    def check(self, op: tuple[Any, ...], answer: dict[str, Any]) -> None:
        getattr(self, "_" + op[0])(*op[1:], answer=answer)

    def _create_topic(self, topic: str, queues: int, *, answer: dict[str, Any]) -> None:
        if topic in self.queues:
            assert answer["status"] is Status.TOPIC_EXISTS
            assert answer["queues"] == self.queues[topic]
            return
        assert answer["status"] is Status.OK
        self.queues[topic] = queues

    def _expected_queue(self, topic: str, route: Any) -> int | None:
        """None: the server chooses; -1: out of range."""
        if route is None:
            return None
        kind, value = route
        if kind == "key":
            return queue_for_key(value, self.queues[topic])
        return value if value < self.queues[topic] else -1

    def _send(self, topic: str, message: Any, _acks: str, *, answer: dict[str, Any]) -> None:
        self._send_batch(topic, [message], answer=answer, results=[answer])

    def _send_batch(
        self,
        topic: str,
        messages: list[Any],
        *,
        answer: dict[str, Any],
        results: list[dict[str, Any]] | None = None,
    ) -> None:
        if topic not in self.queues:
            assert answer["status"] is Status.UNKNOWN_TOPIC
            return
        expected = [self._expected_queue(topic, m[1]) for m in messages]
        if -1 in expected:
            assert answer["status"] is Status.BAD_REQUEST
            return
        assert answer["status"] is Status.OK, answer
        if results is None:
            results = batch_results(answer)
            assert (
                len({r["queue"] for r, e in zip(results, expected, strict=True) if e is None}) <= 1
            )
        for (body, _route, tags), want, result in zip(messages, expected, results, strict=True):
            queue = result["queue"]
            assert want is None or queue == want
            assert 0 <= queue < self.queues[topic]
            log = self.logs.setdefault((topic, queue), [])
            assert result["queue_offset"] == len(log)
            log.append((body, tags))

    def _pull(
        self, topic: str, queue: int, offset: int, limit: int, *, answer: dict[str, Any]
    ) -> None:
        if topic not in self.queues:
            assert answer["status"] is Status.UNKNOWN_TOPIC
            return
        if queue >= self.queues[topic]:
            assert answer["status"] is Status.BAD_REQUEST
            return
        log = self.logs.get((topic, queue), [])
        if offset > len(log):
            assert answer["status"] is Status.OFFSET_OUT_OF_RANGE
            assert answer["max_offset"] == len(log)
            return
        assert answer["status"] is Status.OK
        got = [(m["body"], m.get("tags")) for m in answer["messages"]]
        assert got == log[offset : offset + limit]
        assert answer["next_offset"] == offset + len(got)
        assert answer["max_offset"] == len(log)

    def _get_offsets(self, topic: str, queue: int | None, *, answer: dict[str, Any]) -> None:
        if topic not in self.queues:
            assert answer["status"] is Status.UNKNOWN_TOPIC
            return
        if queue is not None and queue >= self.queues[topic]:
            assert answer["status"] is Status.BAD_REQUEST
            return
        queues = range(self.queues[topic]) if queue is None else [queue]
        assert answer["offsets"] == [
            {"queue": q, "min_offset": 0, "max_offset": len(self.logs.get((topic, q), []))}
            for q in queues
        ]


def _encode(req_id: int, op: tuple[Any, ...]) -> bytes:
    name, topic = op[0], op[1]
    if name == "create_topic":
        return encode_request(name, req_id, topic=topic, queues=op[2])
    if name == "send":
        return encode_request(name, req_id, topic=topic, acks=op[3], **_message_fields(op[2]))
    if name == "send_batch":
        return encode_request(
            name, req_id, topic=topic, messages=[_message_fields(m) for m in op[2]]
        )
    if name == "pull":
        return encode_request(
            name, req_id, topic=topic, queue=op[2], offset=op[3], max_messages=op[4]
        )
    return encode_request(name, req_id, topic=topic, queue=op[2])


@given(ops=_sequences)
def test_pipelined_request_sequences_match_a_model(tmp_path_factory: Any, ops: list[Any]) -> None:
    data_dir = tmp_path_factory.mktemp("model")

    async def scenario() -> None:
        async with running(node_config(data_dir)) as node, client(node) as c:
            await c.send_raw(b"".join(_encode(i, op) for i, op in enumerate(ops, 1)))
            answers = await c.recv_n(len(ops))
        model = Model()
        for req_id, op in enumerate(ops, 1):
            model.check(op, answers[req_id])

    trio.run(scenario)
