"""The client connection's request timeouts (one timer task for all requests in flight),
and how its frames reach the socket.

Under trio with virtual time (``autojump_clock``): the peer never answers, so the loop
idles and the clock jumps to the next deadline; no test waits for real seconds. The timer
is rescheduled through an anyio cancel scope's deadline, which each backend implements
its own way, so the same behaviour also runs under both backends on the real clock with
deadlines of a fraction of a second.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from cluster.client import Connection
from cluster.client.connection import WRITE_EARLY_FRAMES
from cluster.client.errors import RequestTimeoutError
from cluster.protocol import encode_frame, request_frame
from cluster.protocol.codec import FrameDecoder
from cluster.protocol.compact import SEND_MARKER
from tests.cluster.client_harness import BACKENDS, run


@asynccontextmanager
async def peer(
    *,
    answer: bool,
    received: list[dict[str, Any]] | None = None,
    hold_until: int = 0,
    raw: bytearray | None = None,
) -> AsyncIterator[Connection]:
    """A client connection to a loopback peer in the running loop (trio or asyncio) that
    answers every request ``OK`` (or none), and adds each request to ``received`` (and
    the bytes it read to ``raw``).
    ``hold_until``: answers wait until that many requests arrived, then go in one write."""

    async def serve(stream: anyio.abc.SocketStream) -> None:
        decoder = FrameDecoder()
        held = bytearray()
        arrived = 0
        async with stream:
            try:
                while data := await stream.receive(65536):
                    if raw is not None:
                        raw.extend(data)
                    decoder.feed(data)
                    for request in decoder:
                        assert isinstance(request, dict)
                        arrived += 1
                        if received is not None:
                            received.append(dict(request))
                        if answer:  # in the request's version (2 for a compact send)
                            version = decoder.answer_version or 2
                            held += encode_frame(
                                {"v": version, "id": request["id"], "status": "OK"}
                            )
                    if held and arrived >= hold_until:
                        await stream.send(bytes(held))
                        held.clear()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, serve)
        stream = await anyio.connect_tcp("127.0.0.1", port)
        connection = Connection(stream, f"127.0.0.1:{port}", 1 << 20)
        await connection.start(group)
        try:
            yield connection
        finally:
            connection.close()
            group.cancel_scope.cancel()


async def test_each_request_times_out_at_its_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A short timeout queued behind a long one still ends first (the timer wakes early
    for it), and the long one is not cut short by it."""
    ended: dict[str, float] = {}
    async with peer(answer=False) as connection:
        start = trio.current_time()

        async def ask(name: str, timeout_s: float) -> None:
            with pytest.raises(RequestTimeoutError, match="may or may not"):
                await connection.request("status", timeout_s)
            ended[name] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "long", 30.0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, "short", 2.0)
    assert list(ended) == ["short", "long"]
    assert 2.0 <= ended["short"] < 30.0 <= ended["long"]


@BACKENDS
def test_a_short_deadline_behind_a_long_one_ends_first_on_the_real_clock(backend: str) -> None:
    """The virtual-time test above, under both backends: a short timeout queued behind a
    long one wakes the timer early and ends first; neither ends before its own deadline."""
    ended: dict[str, float] = {}

    async def body() -> None:
        async with peer(answer=False) as connection:
            start = anyio.current_time()

            async def ask(name: str, timeout_s: float) -> None:
                with pytest.raises(RequestTimeoutError, match="may or may not"):
                    await connection.request("status", timeout_s)
                ended[name] = anyio.current_time() - start

            async with anyio.create_task_group() as group:
                group.start_soon(ask, "long", 1.0)
                await anyio.wait_all_tasks_blocked()
                group.start_soon(ask, "short", 0.05)

    run(backend, body)
    assert list(ended) == ["short", "long"]
    assert ended["short"] >= 0.05 and ended["long"] >= 1.0


@BACKENDS
def test_answered_requests_do_not_pile_up_in_the_timer(backend: str) -> None:
    """Deadlines of answered requests leave lazily, but the heap stays within twice the
    requests in flight (here one at a time) plus a constant, however many went before."""

    async def body() -> None:
        async with peer(answer=True) as connection:
            for _ in range(1000):
                answer = await connection.request("status", 60.0)
                assert answer["status"].value == "OK"
                assert len(connection._deadlines) <= 2 * 1 + 65
            assert not connection._waiting

    run(backend, body)


@BACKENDS
def test_the_answer_to_a_request_cancelled_while_it_waited_is_dropped_quietly(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A requester parked for its answer and cancelled: the answer that comes later
    wakes nobody (and is not reported as unmatched), and the connection serves the next
    request, answered in the same read."""

    async def body() -> None:
        async with peer(answer=True, hold_until=2) as connection:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(connection.request, "status", 30.0)
                    await anyio.wait_all_tasks_blocked()  # parked for its answer
                    scope.cancel()
            answer = await connection.request("status", 30.0)
            assert answer["status"].value == "OK" and answer["id"] == 2
            assert not connection.closed and not connection._waiting

    with caplog.at_level("WARNING", logger="cluster.client.connection"):
        run(backend, body)
    assert "unmatched_response" not in caplog.text


async def test_frames_queued_in_one_pass_go_out_in_several_writes() -> None:
    """Requests queued in the same pass of the loop while the sender gathers are written
    every ``WRITE_EARLY_FRAMES`` frames by the task that queued the last of them, not in
    one write at the end: the node starts on the first ones meanwhile. Each frame reaches
    the peer once, whole. (Failed before: one write of all the gathered frames.)"""
    received: list[dict[str, Any]] = []
    count = 2 * WRITE_EARLY_FRAMES + 8
    async with (
        peer(answer=False, received=received) as connection,
        trio.open_nursery() as nursery,
    ):
        for _ in range(count):
            nursery.start_soon(connection.request, "status", 30.0)
        await trio.testing.wait_all_tasks_blocked()
        # the first alone, two early writes, and the gatherer's rest
        assert connection.writes == 4
        while len(received) < count:  # the peer reads what it was sent
            await trio.testing.wait_all_tasks_blocked()
        assert sorted(request["id"] for request in received) == list(range(1, count + 1))
        nursery.cancel_scope.cancel()


async def test_more_frames_queued_than_one_write_takes_arrive_whole_and_in_order() -> None:
    """The socket is written with one ``sendmsg`` of the queued frames, at most
    ``IOV_MAX`` (1024) of them at a time, a partly written frame resumed where the write
    left it: 3000 queued frames of odd sizes reach the peer byte for byte, in order
    (through a small send buffer, so that big frames go in parts)."""
    raw = bytearray()
    sizes = [400 * 1024 if index % 500 == 0 else index % 13 for index in range(3000)]
    frames = [
        request_frame("send", index + 1, {"topic": "t", "body": bytes([index % 251]) * size})
        for index, size in enumerate(sizes)
    ]
    async with peer(answer=False, raw=raw) as connection:
        assert connection._socket is not None
        connection._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        connection._outbox = list(frames)
        while connection._outbox and not connection.closed:
            connection._write_now()  # a big frame: the socket takes part of it
            await trio.testing.wait_all_tasks_blocked()  # the peer reads what it was sent
        while len(raw) < sum(map(len, frames)) and not connection.closed:
            await trio.testing.wait_all_tasks_blocked()
        assert connection.writes >= 3 and not connection.closed
    assert raw == b"".join(frames)


@BACKENDS
def test_frames_larger_than_the_socket_takes_at_once_arrive_whole(backend: str) -> None:
    """Frames of 900 KiB, alone and many at once, outgrow what the socket takes in one
    write: the rest follows by an awaited send, in order, and every answer comes back."""
    received: list[dict[str, Any]] = []
    bodies = [bytes([index]) * (900 * 1024) for index in range(12)]

    async def body() -> None:
        async with peer(answer=True, received=received) as connection:

            async def send(index: int) -> None:
                answer = await connection.request(
                    "send", 30.0, topic="big", body=bodies[index], queue=0
                )
                assert answer["status"].value == "OK"

            await send(0)
            async with anyio.create_task_group() as group:
                for index in range(1, len(bodies)):
                    group.start_soon(send, index)

    run(backend, body)
    assert sorted(request["body"] for request in received) == sorted(bodies)


@BACKENDS
def test_many_requests_queued_while_a_sender_gathers_are_all_answered(backend: str) -> None:
    """With a request in flight, the next one gathers (one pass of the loop) while more
    than ``WRITE_EARLY_FRAMES`` others queue, on both backends (asyncio writes by the
    stream only): every one is answered. (Failed under asyncio with the first early
    writes: they took a socket only trio's connection has.)"""
    count = 3 * WRITE_EARLY_FRAMES

    async def body() -> None:
        async with peer(answer=True, hold_until=count) as connection:
            answers: list[str] = []

            async def ask() -> None:
                answers.append((await connection.request("status", 30.0))["status"].value)

            async with anyio.create_task_group() as group:
                group.start_soon(ask)
                await anyio.wait_all_tasks_blocked()  # written, and waiting for its answer
                for _ in range(count - 1):
                    group.start_soon(ask)
            assert answers == ["OK"] * count

    run(backend, body)


@BACKENDS
def test_a_plain_send_goes_compact_and_any_other_as_a_cbor_map(backend: str) -> None:
    """A one-message send in the common shape is written in the compact layout (cheaper
    to build here and to read on the node) once an answer showed the peer speaks version
    2 (before that, as a map); a send with tags, and other ops, as maps."""
    raw = bytearray()
    received: list[dict[str, Any]] = []

    async def body() -> None:
        async with peer(answer=True, received=received, raw=raw) as connection:
            plain = {"topic": "t", "body": b"x", "queue": 1, "acks": "leader", "timeout_ms": 5}
            await connection.request("send", 30.0, **plain)  # no answer yet: a map
            await connection.request("send", 30.0, **plain)
            await connection.request("send", 30.0, topic="t", body=b"y", tags="a")
            await connection.request("status", 30.0)

    run(backend, body)
    first_bytes = []
    at = 0
    while at < len(raw):
        size = int.from_bytes(raw[at : at + 4], "big")
        first_bytes.append(raw[at + 4])
        at += 4 + size
    assert first_bytes[1] == SEND_MARKER
    others = first_bytes[:1] + first_bytes[2:]
    assert all(0xA0 <= byte <= 0xBF for byte in others) and len(first_bytes) == 4
    assert {**received[0], "id": 2} == received[1]
    assert (received[1]["body"], received[1]["queue"], received[2]["tags"]) == (b"x", 1, "a")
