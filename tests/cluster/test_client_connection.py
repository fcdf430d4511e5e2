"""The client connection's request timeouts: one timer task for all requests in flight.

Virtual time (``autojump_clock``): the peer never answers, so the loop idles and the
clock jumps to the next deadline; no test waits for real seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
import trio
import trio.testing

from cluster.client import Connection
from cluster.client.errors import RequestTimeoutError
from cluster.protocol import encode_frame
from cluster.protocol.codec import FrameDecoder


@asynccontextmanager
async def peer(*, answer: bool) -> AsyncIterator[Connection]:
    """A client connection to a loopback peer that answers every request ``OK`` (or none)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def serve(stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        async with stream:
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                for request in decoder:
                    if answer:
                        assert isinstance(request, dict)
                        await stream.send_all(
                            encode_frame({"v": 1, "id": request["id"], "status": "OK"})
                        )
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        port = listeners[0].socket.getsockname()[1]
        stream = await anyio.connect_tcp("127.0.0.1", port)
        connection = Connection(stream, f"127.0.0.1:{port}", 1 << 20)
        await connection.start(nursery)
        try:
            yield connection
        finally:
            connection.close()
            nursery.cancel_scope.cancel()


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


async def test_answered_requests_do_not_pile_up_in_the_timer() -> None:
    """Deadlines of answered requests leave lazily, but the heap stays within twice the
    requests in flight (here one at a time) plus a constant, however many went before."""
    async with peer(answer=True) as connection:
        for _ in range(1000):
            answer = await connection.request("status", 60.0)
            assert answer["status"].value == "OK"
            assert len(connection._deadlines) <= 2 * 1 + 65
        assert not connection._waiting
