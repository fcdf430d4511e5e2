"""Issue 8, point 6: one large frame must not freeze everyone else on the node.

A 16 MiB frame of tiny CBOR items once blocked the event loop while it was decoded (a
frame of empty arrays took 6.2 s; five of them took another client's ``status`` from
4 ms to 886 ms). Now a large frame's items are counted before decoding and a frame over
the bound is refused at once. Here, against a real ``tidelog node``, an attacker sends
such frames back to back while another client pings ``status``: the attacker's frames
are refused naming the bound, and the other client's median latency stays within a
generous ratio of its own median before the attack (not a wall-clock figure: a ratio
of two medians measured on the same machine in the same run).
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cluster.client import open_client
from cluster.protocol import ResponseDecoder, Status
from tools.process import NodeProcess

ATTACK_FRAMES = 5
FRAME_BODY_BYTES = 16 * 1024 * 1024 - 16
PINGS = 40
RATIO_BOUND = 50
"""The old node answered ``status`` about 200 times slower during such an attack."""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path / "node", name="large-frames")
    try:
        yield process.start()
    finally:
        process.kill()


def empty_arrays_frame() -> bytes:
    """A request map whose one field is an array of millions of empty arrays."""
    header = b"\xa4\x61v\x01\x62op\x66status\x62id\x01\x61x\x9b" + struct.pack(
        "!Q", FRAME_BODY_BYTES - 30
    )
    body = header + b"\x80" * (FRAME_BODY_BYTES - len(header))
    return struct.pack("!I", len(body)) + body


async def status_latencies_s(
    address: str, pings: int, until: trio.Event | None = None
) -> list[float]:
    """``pings`` status round trips, and more until ``until`` is set (the attack's end)."""
    latencies: list[float] = []
    async with open_client(address) as client:
        while len(latencies) < pings or (until is not None and not until.is_set()):
            start = time.perf_counter()
            await client.admin.status()
            latencies.append(time.perf_counter() - start)
    return latencies


async def attack(address: str, answers: list[dict[str, object]], done: trio.Event) -> None:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        frame = empty_arrays_frame()
        decoder = ResponseDecoder()
        for _ in range(ATTACK_FRAMES):
            await stream.send_all(frame)
        with trio.fail_after(60):
            while len(answers) < ATTACK_FRAMES:
                data = await stream.receive_some(65536)
                if not data:
                    break
                decoder.feed(data)
                while (answer := decoder.next_frame()) is not None:
                    assert isinstance(answer, dict), answer
                    answers.append(answer)
    done.set()


async def test_large_frames_of_tiny_items_are_refused_and_freeze_nobody(
    node: NodeProcess,
) -> None:
    before_s = statistics.median(await status_latencies_s(node.address, PINGS))
    answers: list[dict[str, object]] = []
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack, node.address, answers, done)
        during = await status_latencies_s(node.address, PINGS, until=done)
    assert len(answers) == ATTACK_FRAMES, answers
    assert all(answer["status"] == Status.MALFORMED_FRAME.value for answer in answers), answers
    assert "CBOR data items" in str(answers[0].get("error", "")), answers[0]
    during_s = statistics.median(during)
    assert during_s <= before_s * RATIO_BOUND, (before_s, during_s, len(during))
