"""The hostile-frame run of issue 8, bounded and seeded, against a real ``tidelog node``.

Several connections send hostile frames (random bytes and malformed CBOR, extreme
numbers, deep nesting, 4 GiB length prefixes, invalid UTF-8, hostile topic names)
while a slowloris connection dribbles a frame, many idle connections sit open, and a
producer interleaves durable sends. Every hostile frame gets an answer or, for the
fatal ones, a closed connection (never a hang); afterwards every durable ack reads back
with its body at its offset, the node still serves, and it stops cleanly with no
traceback in its log. Bounded in frames (:data:`FRAMES`) and time (:data:`RUN_S`);
the seed makes a failure reproducible.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio

from cluster.client import open_client
from cluster.protocol import ResponseDecoder, Status
from cluster.protocol.limits import DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT
from tools.process import NodeProcess

SEED = 20261130
FRAMES = 2000
"""Hostile frames in all (spread over :data:`FUZZERS` connections)."""
FUZZERS = 4
IDLE = 200
DURABLE = 200
RUN_S = 90
ANSWER_S = 10
TOPIC = "fuzz"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path / "node", name="fuzzed")
    try:
        yield process.start()
    finally:
        process.kill()


def _frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def _envelope(rng: random.Random, **fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "op": rng.choice(["send", "pull", "status", "create_topic", "read"]),
        "id": rng.randrange(1 << 20),
        **fields,
    }


def _random_bytes(rng: random.Random) -> bytes:
    return _frame(rng.randbytes(rng.randrange(1, 200)))


def _malformed_cbor(rng: random.Random) -> bytes:
    good = cbor2.dumps({"v": 1, "op": "status", "id": 1, "topic": "x" * rng.randrange(40)})
    choices = [
        good[: rng.randrange(1, len(good))],  # truncated
        b"\xbf" + good[1:],  # indefinite map that never breaks
        bytes([0xA1, 0x1C]) + good,  # reserved additional information
        bytes([0xF8, rng.randrange(32)]),  # a simple value that must not be two bytes
        good + good,  # two items in one frame
        b"\xa1\x61op\xff",  # a break where a value belongs
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
    ]
    return _frame(rng.choice(choices))


def _extreme_numbers(rng: random.Random) -> bytes:
    values = [2**64 - 1, -(2**64), 2**200, -(2**200), math.inf, -math.inf, math.nan, -0.0, 1e308]
    fields = {
        key: rng.choice(values)
        for key in rng.sample(
            [
                "id",
                "queue",
                "offset",
                "max_messages",
                "max_bytes",
                "timeout_ms",
                "wait_ms",
                "queues",
                "v",
            ],
            4,
        )
    }
    return _frame(cbor2.dumps({**_envelope(rng, topic=TOPIC), **fields}))


def _deep_nesting(rng: random.Random) -> bytes:
    depth = rng.choice([17, 100, 10_000, 100_000])
    opener = rng.choice([b"\x81", b"\xa1\x00"])
    return _frame(b"\xa2\x62op\x66status\x62id" + opener * depth + b"\x00")


def _huge_prefix(rng: random.Random) -> bytes:
    size = rng.choice([0xFFFFFFFF, 0x80000000, DEFAULT_MAX_FRAME_SIZE + 1])
    return struct.pack("!I", size) + rng.randbytes(rng.randrange(64))


def _invalid_utf8(rng: random.Random) -> bytes:
    bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"])
    text = bytes([0x60 + len(bad)]) + bad  # a text string holding invalid UTF-8
    where = rng.choice(["key", "op", "topic"])
    if where == "key":
        return _frame(b"\xa4\x61v\x01\x62op\x66status\x62id\x01" + text + b"\x00")
    if where == "op":
        return _frame(b"\xa3\x61v\x01\x62id\x01\x62op" + text)
    return _frame(b"\xa4\x61v\x01\x62id\x01\x62op\x64send\x65topic" + text)


HOSTILE_TOPICS = [
    "../../etc/passwd", "", " ", "a" * 10_000, "\x00", "topic\nname", "%s%n", "CON",
    "\u202eevil", "😀", "a/b", ".", "..", "-", "x" * 256, "sp ace",
]  # fmt: skip


def _hostile_topic(rng: random.Random) -> bytes:
    op = rng.choice(["send", "create_topic", "pull"])
    fields: dict[str, Any] = {"v": 1, "op": op, "id": rng.randrange(1 << 20)}
    fields["topic"] = rng.choice(HOSTILE_TOPICS)
    if op == "send":
        fields.update(body=b"hostile", queue=0, acks="durable")
    elif op == "create_topic":
        fields["queues"] = rng.choice([1, 0, -1, 1 << 40])
    else:
        fields.update(queue=0, offset=0)
    return _frame(cbor2.dumps(fields))


GENERATORS: list[Callable[[random.Random], bytes]] = [
    _random_bytes,
    _malformed_cbor,
    _extreme_numbers,
    _deep_nesting,
    _huge_prefix,
    _invalid_utf8,
    _hostile_topic,
]


async def _answer_or_close(
    stream: trio.SocketStream, decoder: ResponseDecoder
) -> dict[str, Any] | None:
    """The node's answer to the frame just sent, or None when it closed the connection."""
    with trio.fail_after(ANSWER_S):
        while (item := decoder.next_frame()) is None:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            decoder.feed(data)
    assert isinstance(item, dict), item
    return item


async def _fuzz(
    host: str, port: int, rng: random.Random, frames: int, tally: dict[str, int]
) -> None:
    stream = await trio.open_tcp_stream(host, port)
    decoder = ResponseDecoder(max_frame_size=MAX_FRAME_SIZE_LIMIT)
    for _ in range(frames):
        generator = rng.choice(GENERATORS)
        try:
            await stream.send_all(generator(rng))
            answer = await _answer_or_close(stream, decoder)
        except trio.BrokenResourceError:
            answer = None
        if answer is None:  # a fatal frame: the node closed this connection; open another
            tally["closed"] += 1
            await stream.aclose()
            stream = await trio.open_tcp_stream(host, port)
            decoder = ResponseDecoder(max_frame_size=MAX_FRAME_SIZE_LIMIT)
        else:
            assert isinstance(answer.get("status"), Status), answer
            tally["answered"] += 1
    await stream.aclose()


async def _slowloris(host: str, port: int, stop: trio.Event) -> None:
    """One frame a byte at a time, a pause between bytes, until the run ends."""
    stream = await trio.open_tcp_stream(host, port)
    frame = _frame(cbor2.dumps({"v": 1, "op": "status", "id": 1}))
    with trio.move_on_after(RUN_S):
        for byte in frame * 1000:
            if stop.is_set():
                break
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break  # the node may close a peer that dribbles: that is fine too
            with trio.move_on_after(0.05):  # pacing, not synchronisation
                await stop.wait()
    await stream.aclose()


async def test_hostile_frames_lose_no_durable_ack_and_leave_the_node_up(node: NodeProcess) -> None:
    rng = random.Random(SEED)
    host, port = node.host, node.port
    acked: dict[int, bytes] = {}
    tally = {"answered": 0, "closed": 0}
    async with open_client(node.address) as client:
        await client.admin.create_topic(TOPIC, 1)
        idle = [await trio.open_tcp_stream(host, port) for _ in range(IDLE)]
        stop = trio.Event()

        async def produce() -> None:
            for i in range(DURABLE):
                body = b"durable-%d-" % i + rng.randbytes(rng.randrange(2000))
                sent = await client.call("send", topic=TOPIC, body=body, queue=0, acks="durable")
                assert sent["status"] is Status.OK, sent
                acked[sent["queue_offset"]] = body

        with trio.fail_after(RUN_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_slowloris, host, port, stop)
                async with trio.open_nursery() as work:
                    for index in range(FUZZERS):
                        seeded = random.Random(SEED + index)
                        work.start_soon(_fuzz, host, port, seeded, FRAMES // FUZZERS, tally)
                    work.start_soon(produce)
                stop.set()
        assert tally["answered"] + tally["closed"] == FUZZERS * (FRAMES // FUZZERS)
        assert tally["answered"] > tally["closed"]  # most hostile frames are answered
        assert len(acked) == DURABLE

        stored: dict[int, bytes] = {}
        offset = 0
        while len(stored) < len(acked):
            page = await client.checked("pull", topic=TOPIC, queue=0, offset=offset)
            assert page["messages"], f"nothing readable at {offset}: {len(stored)} of {len(acked)}"
            stored.update((m["queue_offset"], m["body"]) for m in page["messages"])
            offset = page["next_offset"]
        assert {offset: stored.get(offset) for offset in acked} == acked
        status = await client.admin.status()
        assert status["writable"] is True
        for stream in idle:
            await stream.aclose()
    assert node.stop() == 0, node.stderr
    assert "Traceback" not in node.stderr
