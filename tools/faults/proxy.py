"""A fault-injecting TCP proxy on loopback for chosen links: the network backend that works
without root or namespaces, and the one that partitions a node from etcd.

``FaultProxy`` listens on ``127.0.0.1:port`` and forwards each connection to a target.
Its faults switch live, for connections open now and for later ones:

- partition, both ways or one way: ``blackhole`` holds the bytes (a dropped route: the
  sender sees timeouts, and what was held flows once healed, as TCP would retransmit it);
  ``refuse`` closes the listener and resets open connections (a dead host: connection
  refused, connection reset);
- added delay with jitter per chunk, order kept (there is no netem on this kernel);
- a bandwidth cap per direction (a token bucket);
- reset: every open connection gets a TCP RST, and optionally every new one too.

Directions are named from the client's side: ``to_target`` (client -> target) and
``from_target`` (target -> client).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import socket
import struct
from collections.abc import Iterable

import attrs
import trio

from tools.faults.base import Fault, describe

__all__ = [
    "Direction",
    "EtcdPartition",
    "FaultProxy",
    "PartitionMode",
    "ProxyBandwidth",
    "ProxyPartition",
    "ProxyReset",
    "ProxySlow",
]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
SLOW_QUEUE_CHUNKS = 1024
"""Chunks in flight per direction while delayed; beyond this the reader waits
(back-pressure, like a full socket buffer)."""


class Direction(enum.Enum):
    TO_TARGET = "to_target"
    FROM_TARGET = "from_target"

    @classmethod
    def parse(cls, which: str | Direction | Iterable[str | Direction]) -> frozenset[Direction]:
        """``"both"``, one direction, or several."""
        if which == "both":
            return frozenset(cls)
        if isinstance(which, (str, Direction)):
            return frozenset({cls(which)})
        return frozenset(cls(item) for item in which)


class PartitionMode(enum.Enum):
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


@attrs.frozen
class Slowness:
    delay_s: float = 0.0
    jitter_s: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {self.delay_s}, {self.jitter_s}")


def _reset_socket(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Link:
    """One proxied connection: its two sockets and the scope that ends it."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.reset = False

    def abort(self, *, reset: bool) -> None:
        if reset:
            self.reset = True
            _reset_socket(self.client)
            if self.upstream is not None:
                _reset_socket(self.upstream)
        self.scope.cancel()


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` with switchable faults.

    Run :meth:`serve` in a nursery (``port = await nursery.start(proxy.serve)``); the
    fault methods are plain calls from any task of the same trio run and take effect at
    once. Invariant: a direction in ``held`` forwards nothing; ``refusing`` implies no
    listener is open. The port stays the same across refuse/heal.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
        name: str = "",
        seed: int = 0,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self.chunk_bytes = chunk_bytes
        """The largest piece forwarded at once: small values split every message the
        peers exchange across many reads (tests of stream parsers)."""
        self.name = name or f"proxy->{target_host}:{target_port}"
        self.connections = 0
        self.held: frozenset[Direction] = frozenset()
        self.refusing = False
        self.resetting_new = False
        self.slowness: dict[Direction, Slowness] = {}
        self.rate_bytes_per_s: dict[Direction, float] = {}
        self._random = random.Random(seed)
        self._links: set[_Link] = set()
        self._released = trio.Event()
        self._released.set()
        self.holds = 0
        self._held_now = trio.Event()
        self._listener_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"{self.name}@127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._listen)
            task_status.started(self.port)
            await trio.sleep_forever()  # keeps the nursery open across refuse/accept_again

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self._nursery is not None
        try:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        except OSError as error:
            raise RuntimeError(
                f"{self.name}: cannot listen on 127.0.0.1:{self.port} again after a refuse "
                f"fault ({error}); another process took the port, choose a fixed free port"
            ) from error
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as scope:
            self._listener_scope = scope
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=self._nursery)

    # -- faults ---------------------------------------------------------------------------

    def _log(self, what: str, **fields: object) -> None:
        log.info("proxy %s %s", what, describe({"proxy": repr(self), **fields}))

    def hold(self, directions: frozenset[Direction]) -> None:
        """Black-hole these directions (bytes wait in the proxy until released)."""
        self.held = directions
        previous, self._released = self._released, trio.Event()
        if not directions:
            self._released.set()
        previous.set()  # waiters re-check which directions are held now
        self._log("hold", directions=",".join(sorted(d.value for d in directions)) or "none")

    def refuse(self) -> None:
        """Stop listening (new connections are refused) and reset every open one."""
        self.refusing = True
        if self._listener_scope is not None:
            self._listener_scope.cancel()
        self.reset_open()
        self._log("refuse")

    async def accept_again(self) -> None:
        """Undo :meth:`refuse`: listen on the same port again."""
        if not self.refusing:
            return
        self.refusing = False
        assert self._nursery is not None, "serve() is not running"
        await self._nursery.start(self._listen)
        self._log("accept")

    def reset_open(self) -> int:
        """Send RST on every connection open now (both its sockets); returns how many."""
        links = list(self._links)
        for link in links:
            link.abort(reset=True)
        self._log("reset", connections=len(links))
        return len(links)

    def cut(self) -> None:
        """Close every open connection gracefully (FIN); new ones are forwarded."""
        for link in list(self._links):
            link.abort(reset=False)

    def partition(self) -> None:
        """Silence, like a dropped route: open connections are cut, new ones are accepted
        but nothing passes either way until :meth:`heal` (clients see timeouts)."""
        self.cut()
        self.hold(frozenset(Direction))

    def heal(self) -> None:
        """End a :meth:`partition` (or any hold): held connections start forwarding."""
        self.hold(frozenset())

    def set_slowness(
        self, directions: frozenset[Direction], delay_s: float, jitter_s: float
    ) -> None:
        slowness = Slowness(delay_s, jitter_s)
        for direction in directions:
            if delay_s == 0 and jitter_s == 0:
                self.slowness.pop(direction, None)
            else:
                self.slowness[direction] = slowness
        self._log("slow", delay_s=delay_s, jitter_s=jitter_s)

    def set_rate(self, directions: frozenset[Direction], bytes_per_s: float | None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"a bandwidth cap must be > 0 bytes/s, got {bytes_per_s}")
        for direction in directions:
            if bytes_per_s is None:
                self.rate_bytes_per_s.pop(direction, None)
            else:
                self.rate_bytes_per_s[direction] = bytes_per_s
        self._log("rate", bytes_per_s=bytes_per_s)

    def heal_all(self) -> None:
        """Clear every fault except a refusal (which needs :meth:`accept_again`)."""
        self.hold(frozenset())
        self.resetting_new = False
        self.slowness.clear()
        self.rate_bytes_per_s.clear()

    def _note_hold(self) -> None:
        self.holds += 1
        self._held_now.set()

    async def wait_held(self, holds: int = 1) -> None:
        """Return once a hold has stopped something ``holds`` times: a chunk not forwarded
        or a new connection not passed on (a test's proof that the proxy got the bytes and
        kept them)."""
        while self.holds < holds:
            self._held_now = trio.Event()
            await self._held_now.wait()

    # -- forwarding -----------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        link = _Link(client)
        async with client:
            if self.resetting_new or self.refusing:
                link.abort(reset=True)
                return
            self._links.add(link)
            try:
                with link.scope:
                    await self._forward(link)
            finally:
                self._links.discard(link)

    async def _forward(self, link: _Link) -> None:
        if Direction.TO_TARGET in self.held:
            self._note_hold()
        while Direction.TO_TARGET in self.held:
            await self._released.wait()  # a held SYN would not reach the target either
        try:
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError as error:
            self._log("target unreachable", error=repr(error))
            _reset_socket(link.client)
            return
        link.upstream = upstream
        if link.reset:
            _reset_socket(upstream)
        async with upstream, trio.open_nursery() as nursery:
            for source, sink, direction in (
                (link.client, upstream, Direction.TO_TARGET),
                (upstream, link.client, Direction.FROM_TARGET),
            ):
                nursery.start_soon(self._pump, source, sink, direction, nursery.cancel_scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        direction: Direction,
        both: trio.CancelScope,
    ) -> None:
        """Copy one direction through a queue of (due time, bytes); the sender honours
        holds, delay and the rate cap. When either side ends or fails, end both."""
        send_channel, receive_channel = trio.open_memory_channel[tuple[float, bytes]](
            SLOW_QUEUE_CHUNKS
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, receive_channel, sink, direction, both)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                async with send_channel:
                    last_due = 0.0
                    while data := await source.receive_some(self.chunk_bytes):
                        last_due = max(last_due, trio.current_time() + self._delay_s(direction))
                        await send_channel.send((last_due, data))
            # end of stream: let queued bytes drain, then the deliverer closes the sink

    def _delay_s(self, direction: Direction) -> float:
        slowness = self.slowness.get(direction)
        if slowness is None:
            return 0.0
        return slowness.delay_s + self._random.uniform(0.0, slowness.jitter_s)

    async def _deliver(
        self,
        chunks: trio.MemoryReceiveChannel[tuple[float, bytes]],
        sink: trio.SocketStream,
        direction: Direction,
        both: trio.CancelScope,
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with chunks:
                async for due, data in chunks:
                    await trio.sleep_until(due)
                    if direction in self.held:
                        self._note_hold()
                    while direction in self.held:
                        await self._released.wait()
                    await self._send_capped(sink, data, direction)
        both.cancel()

    async def _send_capped(
        self, sink: trio.SocketStream, data: bytes, direction: Direction
    ) -> None:
        view = memoryview(data)
        while view:
            rate = self.rate_bytes_per_s.get(direction)
            if rate is None:
                await sink.send_all(view)
                return
            piece = view[: max(1, int(rate / 20))]  # about 50 ms worth per step
            await sink.send_all(piece)
            await trio.sleep(len(piece) / rate)
            view = view[len(piece) :]


class _ProxyFault(Fault):
    def __init__(self, proxy: FaultProxy) -> None:
        super().__init__()
        self.proxy = proxy

    def fields(self) -> dict[str, object]:
        return {"proxy": repr(self.proxy)}


class ProxyPartition(_ProxyFault):
    """Partition the link: ``blackhole`` (one way or both) or ``refuse`` (both ways)."""

    kind = "partition"

    def __init__(
        self,
        proxy: FaultProxy,
        *,
        mode: PartitionMode | str = PartitionMode.BLACKHOLE,
        directions: str | Iterable[str | Direction] = "both",
    ) -> None:
        super().__init__(proxy)
        self.mode = PartitionMode(mode)
        self.directions = Direction.parse(directions)
        if self.mode is PartitionMode.REFUSE and self.directions != frozenset(Direction):
            raise ValueError("a refusing partition cuts both ways; use blackhole for one way")

    def fields(self) -> dict[str, object]:
        directions = ",".join(sorted(d.value for d in self.directions))
        return {**super().fields(), "mode": self.mode.value, "directions": directions}

    async def _inject(self) -> None:
        if self.mode is PartitionMode.REFUSE:
            self.proxy.refuse()
        else:
            self.proxy.hold(self.proxy.held | self.directions)

    async def _heal(self) -> None:
        if self.mode is PartitionMode.REFUSE:
            await self.proxy.accept_again()
        else:
            self.proxy.hold(self.proxy.held - self.directions)


class EtcdPartition(ProxyPartition):
    """Cut one node from etcd: a partition of the proxy the node reaches etcd through
    (the node's ``--etcd`` endpoint points at the proxy). The node keeps talking to its
    peers and clients; only its lease renewals and watches go silent (``blackhole``) or
    fail fast (``refuse``)."""

    kind = "partition-etcd"


class ProxySlow(_ProxyFault):
    """Add ``delay_s`` plus a uniform ``[0, jitter_s]`` to every chunk, order kept."""

    kind = "slow"

    def __init__(
        self,
        proxy: FaultProxy,
        *,
        delay_s: float,
        jitter_s: float = 0.0,
        directions: str | Iterable[str | Direction] = "both",
    ) -> None:
        super().__init__(proxy)
        Slowness(delay_s, jitter_s)  # validate now, not at inject
        self.delay_s, self.jitter_s = delay_s, jitter_s
        self.directions = Direction.parse(directions)

    def fields(self) -> dict[str, object]:
        return {**super().fields(), "delay_s": self.delay_s, "jitter_s": self.jitter_s}

    async def _inject(self) -> None:
        self.proxy.set_slowness(self.directions, self.delay_s, self.jitter_s)

    async def _heal(self) -> None:
        self.proxy.set_slowness(self.directions, 0.0, 0.0)


class ProxyBandwidth(_ProxyFault):
    """Cap each chosen direction at ``bytes_per_s``."""

    kind = "bandwidth"

    def __init__(
        self,
        proxy: FaultProxy,
        *,
        bytes_per_s: float,
        directions: str | Iterable[str | Direction] = "both",
    ) -> None:
        super().__init__(proxy)
        if bytes_per_s <= 0:
            raise ValueError(f"a bandwidth cap must be > 0 bytes/s, got {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self.directions = Direction.parse(directions)

    def fields(self) -> dict[str, object]:
        return {**super().fields(), "bytes_per_s": self.bytes_per_s}

    async def _inject(self) -> None:
        self.proxy.set_rate(self.directions, self.bytes_per_s)

    async def _heal(self) -> None:
        self.proxy.set_rate(self.directions, None)


class ProxyReset(_ProxyFault):
    """RST every open connection; with ``new_too`` every new one is reset until healed."""

    kind = "reset"

    def __init__(self, proxy: FaultProxy, *, new_too: bool = False) -> None:
        super().__init__(proxy)
        self.new_too = new_too

    def fields(self) -> dict[str, object]:
        return {**super().fields(), "new_too": self.new_too}

    async def _inject(self) -> None:
        self.proxy.resetting_new = self.new_too or self.proxy.resetting_new
        self.proxy.reset_open()

    async def _heal(self) -> None:
        if self.new_too:
            self.proxy.resetting_new = False
