"""The fault proxy over real loopback sockets: every fault observed from the client side,
synchronised on the proxy's own events; timings only as lower bounds."""

from __future__ import annotations

import pytest
import trio

from tools.faults.proxy import (
    FaultProxy,
    ProxyBandwidth,
    ProxyPartition,
    ProxyReset,
    ProxySlow,
)

GREETING = b"hello from target\n"


class Target:
    """Greets each connection, then echoes; records what it received."""

    def __init__(self) -> None:
        self.received = b""
        self._arrived = trio.Event()

    async def wait_received(self, expected: bytes) -> None:
        with trio.fail_after(10):
            while self.received != expected:
                self._arrived = trio.Event()
                await self._arrived.wait()

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                try:
                    await stream.send_all(GREETING)
                    async for data in stream:
                        self.received += data
                        self._arrived.set()
                        await stream.send_all(data)
                except trio.BrokenResourceError:
                    return

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    received = b""
    with trio.fail_after(10):
        while len(received) < size:
            chunk = await stream.receive_some()
            assert chunk, f"stream ended after {len(received)} of {size} bytes"
            received += chunk
    return received


async def connect(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    assert await receive_exactly(stream, len(GREETING)) == GREETING
    return stream


async def round_trip(stream: trio.SocketStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    return await receive_exactly(stream, len(payload))


async def start(nursery: trio.Nursery, **kwargs: object) -> tuple[Target, FaultProxy]:
    target = Target()
    target_port = await nursery.start(target.serve)
    proxy = FaultProxy("127.0.0.1", target_port, **kwargs)  # type: ignore[arg-type]
    await nursery.start(proxy.serve)
    return target, proxy


async def test_blackhole_holds_bytes_and_heal_delivers_them() -> None:
    async with trio.open_nursery() as nursery:
        target, proxy = await start(nursery)
        stream = await connect(proxy.port)
        assert await round_trip(stream, b"before") == b"before"
        async with ProxyPartition(proxy, mode="blackhole"):
            await stream.send_all(b"held")
            with trio.fail_after(10):
                await proxy.wait_held()
            assert target.received == b"before"  # stopped in the proxy, never forwarded
        assert await receive_exactly(stream, 4) == b"held"
        assert target.received == b"beforeheld"
        nursery.cancel_scope.cancel()


async def test_one_way_partition_lets_the_other_way_through() -> None:
    async with trio.open_nursery() as nursery:
        target, proxy = await start(nursery)
        stream = await connect(proxy.port)
        async with ProxyPartition(proxy, directions="from_target"):
            await stream.send_all(b"one way")
            await target.wait_received(b"one way")  # the client's bytes get through...
            with trio.fail_after(10):
                await proxy.wait_held()  # ...the echo does not
        assert await receive_exactly(stream, 7) == b"one way"
        async with ProxyPartition(proxy, directions="to_target"):
            late = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await late.send_all(b"late")
            with trio.fail_after(10):
                await proxy.wait_held(2)  # not even passed on to the target
            assert target.received == b"one way"
        assert await receive_exactly(late, len(GREETING) + 4) == GREETING + b"late"
        nursery.cancel_scope.cancel()


async def test_refuse_resets_open_connections_refuses_new_and_heals_on_the_same_port() -> None:
    async with trio.open_nursery() as nursery:
        _, proxy = await start(nursery)
        port = proxy.port
        stream = await connect(port)
        async with ProxyPartition(proxy, mode="refuse"):
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):
                await stream.receive_some()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
        assert proxy.port == port
        again = await connect(port)
        assert await round_trip(again, b"healed") == b"healed"
        nursery.cancel_scope.cancel()


async def test_reset_sends_rst_to_open_and_optionally_new_connections() -> None:
    async with trio.open_nursery() as nursery:
        _, proxy = await start(nursery)
        stream = await connect(proxy.port)
        async with ProxyReset(proxy, new_too=True):
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):
                await stream.receive_some()
            fresh = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):
                await fresh.receive_some()
        healed = await connect(proxy.port)
        assert await round_trip(healed, b"ok") == b"ok"
        nursery.cancel_scope.cancel()


async def test_slow_adds_at_least_the_delay_each_way_and_keeps_order() -> None:
    delay_s = 0.1
    async with trio.open_nursery() as nursery:
        _, proxy = await start(nursery, seed=3)
        stream = await connect(proxy.port)
        async with ProxySlow(proxy, delay_s=delay_s, jitter_s=0.05):
            started = trio.current_time()
            for index in range(5):
                await stream.send_all(b"%d," % index)
            assert await receive_exactly(stream, 10) == b"0,1,2,3,4,"
            assert trio.current_time() - started >= 2 * delay_s
        assert await round_trip(stream, b"fast again") == b"fast again"
        nursery.cancel_scope.cancel()


async def test_bandwidth_cap_bounds_the_transfer_time_from_below() -> None:
    rate, size = 200_000, 60_000
    async with trio.open_nursery() as nursery:
        _, proxy = await start(nursery)
        stream = await connect(proxy.port)
        async with ProxyBandwidth(proxy, bytes_per_s=rate, directions="from_target"):
            payload = bytes(range(256)) * (size // 256)
            started = trio.current_time()
            assert await round_trip(stream, payload) == payload
            assert trio.current_time() - started >= 0.8 * len(payload) / rate
        nursery.cancel_scope.cancel()


def test_bad_settings_are_refused_with_their_value() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError, match="-1"):
        ProxySlow(proxy, delay_s=-1)
    with pytest.raises(ValueError, match="> 0"):
        ProxyBandwidth(proxy, bytes_per_s=0)
    with pytest.raises(ValueError, match="one way"):
        ProxyPartition(proxy, mode="refuse", directions="to_target")
