"""The fault-injecting TCP proxy: forwards, cuts open connections, black-holes and heals."""

from __future__ import annotations

import trio

from tools.faults.proxy import FaultProxy


async def echo_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(echo, listeners, handler_nursery=nursery)


async def round_trip(stream: trio.SocketStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await stream.receive_some()
        if not chunk:
            break
        received += chunk
    return received


async def test_forward_cut_partition_heal() -> None:
    async with trio.open_nursery() as nursery:
        target = await nursery.start(echo_server)
        proxy = FaultProxy("127.0.0.1", target)
        port = await nursery.start(proxy.serve)
        assert port == proxy.port

        first = await trio.open_tcp_stream("127.0.0.1", port)
        assert await round_trip(first, b"hello") == b"hello"

        proxy.cut()
        with trio.fail_after(5):
            assert await first.receive_some() == b""  # the open connection was closed
        second = await trio.open_tcp_stream("127.0.0.1", port)
        assert await round_trip(second, b"after the cut") == b"after the cut"

        proxy.partition()
        third = await trio.open_tcp_stream("127.0.0.1", port)  # accepted...
        await third.send_all(b"into the void")
        with trio.move_on_after(0.3) as silent:
            await third.receive_some()  # ...but nothing comes back
        assert silent.cancelled_caught
        proxy.heal()
        with trio.fail_after(5):
            assert await third.receive_some() == b"into the void"
        assert proxy.connections == 3
        for stream in (first, second, third):
            await stream.aclose()
        nursery.cancel_scope.cancel()
