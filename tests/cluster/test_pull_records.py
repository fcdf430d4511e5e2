"""``pull`` with ``format`` ``records``: the node sends the stored bytes, the client
decodes them (``cluster.protocol.records``) and gets what a ``messages`` answer holds."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from cluster.client import open_client
from cluster.client.consumer import ConsumedMessage, consumed_message, consumed_messages
from cluster.node import Node
from cluster.node.acks import SlaveAcks, StandaloneAcks
from cluster.node.idempotence import PRODUCER_PROPERTY
from cluster.protocol import (
    RECORDS_FORMAT,
    CorruptRecordError,
    Status,
    decode_records,
    encode_frame,
    record_message,
)
from cluster.protocol import records as wire
from cluster.server import TAGS_PROPERTY, message_map
from storage import Message, MessageStore
from storage import record as stored
from tests.cluster.test_server import client, node, node_config, running
from tests.cluster.test_topic_ops import ConfirmedUpTo
from tests.storage.test_raw_append import config_at

__all__ = ["node"]  # the fixture, used by name


def test_the_clients_layout_is_the_one_the_store_writes() -> None:
    """The client spells the record layout out (it does not import the storage engine):
    it must be the store's."""
    assert wire.RECORD_HEADER.format == stored.HEADER.format
    assert wire.RECORD_MAGIC == stored.RECORD_MAGIC
    assert wire.CRC_START == stored.CRC_START
    assert wire.FLAG_PRODUCER_BATCH == stored.FLAG_PRODUCER_BATCH
    assert wire.TAGS_PROPERTY == TAGS_PROPERTY
    assert wire.PRODUCER_PROPERTY == PRODUCER_PROPERTY


async def stored_page(tmp_path: Path, messages: list[Message]) -> tuple[bytes, list[Any]]:
    """The ``records`` bytes of queue 0 of topic ``t`` after appending ``messages``, and
    the message maps a ``messages`` answer would hold for the same page."""
    async with MessageStore.open(config_at(tmp_path)) as store:
        await store.put_batch(messages)
        page = store.get_record_runs("t", 0, 0, max_messages=1024)
        data = b"".join([view for _offset, view in page.runs])
        expected = store.get_messages("t", 0, 0, max_messages=1024)
        maps = [message_map(index, record) for index, record in expected.records]
        return data, maps


async def test_decoded_records_are_the_messages_answer(tmp_path: Path) -> None:
    producer_mark = {PRODUCER_PROPERTY: "7:0:3", "kept": "yes"}
    messages = [
        Message.create("t", b"plain", 0, born_us=11),
        Message.create("u", b"another topic between", 0),
        Message.create("t", b"", 0, tags="red", properties={TAGS_PROPERTY: "red"}),
        Message.create("t", bytes(range(256)) * 8, 0, properties={"k": "v", TAGS_PROPERTY: "b"}),
        Message("t", b"first of a batch", 0, properties=stored.encode_properties(producer_mark),
                flags=stored.FLAG_PRODUCER_BATCH),
        Message.create("t", b"\xff\x00", 0, properties={"\u00e9t\u00e9": "\u2603"}),
    ]  # fmt: skip
    data, maps = await stored_page(tmp_path, messages)
    records = decode_records(data, "t", 0, next_offset=5)
    assert [record_message(record) for record in records] == maps
    assert maps[3]["props"] == {"kept": "yes"} and maps[1]["tags"] == "red"
    assert consumed_messages("t", 0, {"records": data, "next_offset": 5}) == [
        consumed_message("t", 0, m) for m in maps
    ]


@pytest.mark.parametrize(
    ("damage", "complaint"),
    [
        (lambda data: data[:-1], "claims .* bytes"),
        (lambda data: data[:40], "cut short"),
        (lambda data: data[:-3] + bytes([data[-3] ^ 1]) + data[-2:], "CRC"),
        (lambda data: data[:4] + b"\0\0\0\0" + data[8:], "magic"),
        (lambda data: data[: _size(data)] + data[2 * _size(data) :], "queue offset 2, not 1"),
    ],
)
async def test_a_damaged_answer_is_refused_naming_the_record(
    tmp_path: Path, damage: Any, complaint: str
) -> None:
    data, _maps = await stored_page(tmp_path, [Message("t", b"x" * 100, 0) for _ in range(3)])
    decode_records(data, "t", 0, 3)
    with pytest.raises(CorruptRecordError, match=complaint):
        decode_records(damage(data), "t", 0, 3)


def _size(data: bytes) -> int:
    return int(struct.unpack_from("<I", data)[0])


async def test_records_of_another_queue_or_a_short_answer_are_refused(tmp_path: Path) -> None:
    data, _maps = await stored_page(tmp_path, [Message("t", b"x", 0) for _ in range(3)])
    with pytest.raises(CorruptRecordError, match="another topic"):
        decode_records(data, "t", 1, 3)
    with pytest.raises(CorruptRecordError, match="another topic"):
        decode_records(data, "tt", 0, 3)
    with pytest.raises(CorruptRecordError, match="ends at queue offset 3, not 4"):
        decode_records(data, "t", 0, 4)
    assert decode_records(b"", "t", 0, 9) == []


async def test_a_node_answers_both_formats_alike(node: Node) -> None:
    async with client(node) as c:
        await c.ok("create_topic", topic="t", queues=2)
        for index in range(40):
            await c.ok("send", topic="t", queue=index % 2, body=b"m%d" % index, tags="x",
                       props={"n": str(index)}, acks="leader")  # fmt: skip
        for offset, max_messages in ((0, 1024), (3, 5), (20, 1024)):
            fields = {"topic": "t", "queue": 1, "offset": offset, "max_messages": max_messages}
            maps = await c.ok("pull", **fields)
            raw = await c.ok("pull", format=RECORDS_FORMAT, **fields)
            assert "messages" not in raw and isinstance(raw["records"], bytes)
            for key in ("next_offset", "min_offset", "max_offset"):
                assert raw[key] == maps[key]
            decoded = decode_records(raw["records"], "t", 1, raw["next_offset"])
            assert [record_message(record) for record in decoded] == maps["messages"]
        empty = await c.ok("pull", topic="t", queue=1, offset=20, format=RECORDS_FORMAT)
        assert (empty["records"], empty["next_offset"]) == (b"", 20)
        bad = {"v": 1, "op": "pull", "id": 99, "topic": "t", "queue": 1, "offset": 0}
        await c.send_raw(encode_frame({**bad, "format": "json"}))
        wrong = await c.recv()
        assert wrong is not None and wrong["status"] is Status.BAD_REQUEST
        assert "'format'" in wrong["error"] and "'records'" in wrong["error"]


async def test_a_records_pull_stops_at_the_read_limit(tmp_path: Path) -> None:
    """A slave serves records up to the master's confirm offset only, whatever the format."""
    async with running(node_config(tmp_path)) as serving, client(serving) as c:
        await c.ok("create_topic", topic="t", queues=1)
        sent = [await c.ok("send", topic="t", body=b"x", acks="leader") for _ in range(6)]
        assert serving.handler is not None and serving.store is not None
        confirmed = sent[3]["offset"]  # records 0..2 end at or before it; 3 ends past it
        limit = SlaveAcks(StandaloneAcks(serving.store), ConfirmedUpTo(confirmed))
        serving.handler.set_acks(limit)
        page = await c.ok("pull", topic="t", queue=0, offset=0, format=RECORDS_FORMAT)
        assert page["next_offset"] == 3
        assert len(decode_records(page["records"], "t", 0, 3)) == 3
        beyond = await c.ok("pull", topic="t", queue=0, offset=3, format=RECORDS_FORMAT)
        assert (beyond["records"], beyond["next_offset"]) == (b"", 3)


async def test_the_library_consumer_reads_records(node: Node) -> None:
    """The library's consumer asks for ``records`` and hands out the same messages."""
    assert node.address is not None
    async with open_client("{}:{}".format(*node.address)) as library:
        await library.admin.create_topic("t", 1)
        producer = library.producer(acks="leader")
        for body in (b"a", b"b", b"c"):
            sent = await producer.send("t", body, queue=0, tags="red", props={"p": "q"})
            sent.raise_for_outcome()
        got: list[ConsumedMessage] = []
        async with library.consumer("t", wait_ms=100) as consumer:
            async for message in consumer:
                got.append(message)
                if len(got) == 3:
                    break
        assert [(m.body, m.queue_offset, m.tags, dict(m.props)) for m in got] == [
            (body, index, "red", {"p": "q"}) for index, body in enumerate([b"a", b"b", b"c"])
        ]
