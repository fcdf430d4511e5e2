"""Master-to-slave log streaming (RocketMQ HA style) over one TCP connection per slave.

The wire protocol, in order, on one socket:

1. slave -> master: a *hello* (:func:`pack_slave_hello`): magic, version, the slave's
   log end (``commit_log.max_offset``) and its name. The slave's own end is where the
   master starts: the slave tells, the master never guesses, so a reconnect after any
   failure resumes exactly where the slave's visible log stops.
2. master -> slave: a *hello* back (:func:`pack_master_hello`): magic, version and the
   master's log end at that moment (informational: how far behind the slave starts).
3. master -> slave: chunks (:mod:`replication.transfer`), each one range of one segment,
   sent with ``sendfile`` from the segment's fd. One task sends; nothing else writes to
   the master's side of the socket (the transfer module's one-sender rule).
4. slave -> master, concurrently: 16-byte *ack* frames (:func:`pack_ack`) carrying the
   slave's visible log end after each chunk it applied. A separate master task reads
   them (reading while another task sends is fine).

The frame codecs are sans-IO (bytes in, values out; :class:`AckDecoder` takes bytes
as they arrive), the classes do the trio I/O.

What the master acknowledges to producers is the *confirm offset*: the smallest ack
among the connected slaves (:meth:`HAService.wait_replicated`). It only moves forward:
a lagging slave that connects later does not un-confirm bytes every slave connected
at the time had already acknowledged.

Not handled here (yet): epoch checks and truncation of a divergent slave tail
(``replication.epochs``), durable acks (ack after fsync), retention deleting a segment
under a sender, reconnect/backoff on the slave side.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from typing import Any

import attrs
import trio

from replication.transfer import (
    HEADER_SIZE,
    ChunkHeader,
    TransferError,
    receive_chunk_into,
    recv_exactly_into,
    send_file_range,
)
from storage.store import MessageStore
from storage.waiters import OffsetWaiters

__all__ = [
    "ACK_SIZE",
    "MASTER_HELLO_SIZE",
    "MAX_CHUNK",
    "SLAVE_HELLO_FIXED",
    "AckDecoder",
    "HAClient",
    "HAConnection",
    "HAProtocolError",
    "HAService",
    "MasterHello",
    "SlaveHello",
    "pack_ack",
    "pack_master_hello",
    "pack_slave_hello",
    "unpack_master_hello",
    "unpack_slave_hello_fixed",
]

log = logging.getLogger(__name__)

HA_VERSION = 1
SLAVE_HELLO_MAGIC = 0x544C4853  # "TLHS": tidelog hello from a slave
MASTER_HELLO_MAGIC = 0x544C484D  # "TLHM": tidelog hello from the master
ACK_MAGIC = 0x544C4841  # "TLHA": tidelog HA ack

_SLAVE_HELLO = struct.Struct("!IHHQH")
"""magic u32, version u16, reserved u16, slave log end u64, name length u16; then the name."""
_MASTER_HELLO = struct.Struct("!IHHQ")
"""magic u32, version u16, reserved u16, master log end u64."""
_ACK = struct.Struct("!IHHQ")
"""magic u32, version u16, reserved u16, acknowledged log end u64: 16 bytes."""

SLAVE_HELLO_FIXED = _SLAVE_HELLO.size
MASTER_HELLO_SIZE = _MASTER_HELLO.size
ACK_SIZE = _ACK.size
MAX_NAME = 255

MAX_CHUNK = 1 << 20
"""Data bytes per chunk: the size the transfer benchmark found to be the knee (see
``transfer.DEFAULT_MAX_CALL``), and the slave's receive buffer size."""

DEFAULT_POLL_INTERVAL = 0.05
"""How long a caught-up sender waits for an arrival before looking at the log again. The
dispatcher's arrival event is the fast path; the poll covers appends whose dispatch was
folded into another task's (that one sets the event, but possibly before we waited)."""


class HAProtocolError(Exception):
    """The peer sent something that is not this protocol (or not this version): close."""


# ---- sans-IO frames ---------------------------------------------------------------------------


@attrs.frozen
class SlaveHello:
    name: str
    max_offset: int


@attrs.frozen
class MasterHello:
    max_offset: int


def _check_magic(magic: int, version: int, want: int, what: str) -> None:
    if magic != want:
        raise HAProtocolError(f"bad {what} magic {magic:#010x} (want {want:#010x})")
    if version != HA_VERSION:
        raise HAProtocolError(f"unsupported {what} version {version} (want {HA_VERSION})")


def pack_slave_hello(name: str, max_offset: int) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"slave name must be 1..{MAX_NAME} UTF-8 bytes, got {len(raw)}")
    return _SLAVE_HELLO.pack(SLAVE_HELLO_MAGIC, HA_VERSION, 0, max_offset, len(raw)) + raw


def unpack_slave_hello_fixed(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Parse the fixed part of a slave hello; return (slave log end, name length)."""
    magic, version, _reserved, max_offset, name_len = _SLAVE_HELLO.unpack(data)
    _check_magic(magic, version, SLAVE_HELLO_MAGIC, "slave hello")
    if not 0 < name_len <= MAX_NAME:
        raise HAProtocolError(f"slave name length {name_len} outside 1..{MAX_NAME}")
    return max_offset, name_len


def pack_master_hello(max_offset: int) -> bytes:
    return _MASTER_HELLO.pack(MASTER_HELLO_MAGIC, HA_VERSION, 0, max_offset)


def unpack_master_hello(data: bytes | bytearray | memoryview) -> MasterHello:
    magic, version, _reserved, max_offset = _MASTER_HELLO.unpack(data)
    _check_magic(magic, version, MASTER_HELLO_MAGIC, "master hello")
    return MasterHello(max_offset)


def pack_ack(offset: int) -> bytes:
    return _ACK.pack(ACK_MAGIC, HA_VERSION, 0, offset)


class AckDecoder:
    """Turn the slave's byte stream into ack offsets, whatever the read boundaries are."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[int]:
        """Add received bytes; return the offsets of the frames they completed, in order."""
        self._pending += data
        offsets = []
        whole = len(self._pending) - len(self._pending) % ACK_SIZE
        for start in range(0, whole, ACK_SIZE):
            magic, version, _reserved, offset = _ACK.unpack_from(self._pending, start)
            _check_magic(magic, version, ACK_MAGIC, "ack")
            offsets.append(offset)
        del self._pending[:whole]
        return offsets

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at EOF means a torn frame)."""
        return len(self._pending)


# ---- I/O helpers ------------------------------------------------------------------------------


async def _recv_exactly(sock: trio.socket.SocketType, size: int, what: str) -> bytearray:
    buf = bytearray(size)
    got = await recv_exactly_into(sock, memoryview(buf))
    if got < size:
        raise HAProtocolError(f"stream ended after {got} of {size} bytes of the {what}")
    return buf


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


# ---- master -----------------------------------------------------------------------------------


class HAConnection:
    """The master's end of one slave's stream: sends the log from where the slave stands,
    reads its acks.

    ``send_offset`` is how far the stream has gone, ``ack_offset`` how far the slave says
    its visible log goes. They differ by what is in flight plus a partial record the
    slave holds back; only ``ack_offset`` means anything to producers.
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        use_sendfile: bool = True,
        max_chunk: int = MAX_CHUNK,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        on_hello: Callable[[HAConnection], None] | None = None,
        on_ack: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_chunk <= 0:
            raise ValueError(f"max_chunk must be positive, got {max_chunk}")
        self.store = store
        self.use_sendfile = use_sendfile
        self.max_chunk = max_chunk
        self.poll_interval = poll_interval
        self.on_hello = on_hello
        self.on_ack = on_ack
        self.name: str | None = None
        self.send_offset = -1
        self.ack_offset = -1
        self.cancel_scope = trio.CancelScope()
        self._buffer = bytearray(HEADER_SIZE + max_chunk) if not use_sendfile else None

    async def run(self, sock: trio.socket.SocketType) -> None:
        """Serve one slave until it goes away or the stream breaks. The caller closes
        ``sock`` afterwards (a failed chunk send leaves it unusable anyway)."""
        with self.cancel_scope:
            hello = await self._read_hello(sock)
            commit_log = self.store.commit_log
            start, end = commit_log.min_offset, commit_log.max_offset
            if not start <= hello.max_offset <= end:
                # Past our end: a divergent tail that needs epoch truncation (not done here).
                # Below our start: retention removed what it needs; it must re-seed.
                raise HAProtocolError(
                    f"slave {hello.name} is at {hello.max_offset}, outside the master's log "
                    f"[{start}, {end}]"
                )
            self.name = hello.name
            self.send_offset = self.ack_offset = hello.max_offset
            # Registered before the reply: once the slave hears back, it counts for the
            # confirm offset (with what it already holds) and replaced any older connection.
            if self.on_hello is not None:
                self.on_hello(self)
            if self.on_ack is not None:
                self.on_ack(hello.name, hello.max_offset)
            await _send_all(sock, pack_master_hello(end))
            log.info(
                "ha_slave_connected slave=%s slave_offset=%d master_offset=%d",
                hello.name,
                hello.max_offset,
                end,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_acks, sock, nursery.cancel_scope)
                await self._stream(sock)

    async def _read_hello(self, sock: trio.socket.SocketType) -> SlaveHello:
        fixed = await _recv_exactly(sock, SLAVE_HELLO_FIXED, "slave hello")
        max_offset, name_len = unpack_slave_hello_fixed(fixed)
        raw = await _recv_exactly(sock, name_len, "slave name")
        try:
            name = raw.decode()
        except UnicodeDecodeError as exc:
            raise HAProtocolError(f"slave name is not UTF-8: {exc}") from exc
        return SlaveHello(name, max_offset)

    async def _stream(self, sock: trio.socket.SocketType) -> None:
        """Send committed bytes forever: one chunk per turn, within one segment and below
        the log end; park on the dispatcher's arrival event when caught up."""
        files = self.store.commit_log.files
        while True:
            end = self.store.commit_log.max_offset
            offset = self.send_offset
            if offset >= end:
                with trio.move_on_after(self.poll_interval):
                    await self.store.wait_for_arrival()
                continue
            segment = files.find(offset)  # at a full segment's end: the next one
            count = min(segment.end, end, offset + self.max_chunk) - offset
            header = ChunkHeader(offset=offset, length=count).pack()
            await send_file_range(
                sock,
                segment.fd,
                offset - segment.base,
                count,
                header,
                use_sendfile=self.use_sendfile,
                max_call=self.max_chunk,
                buffer=self._buffer,
            )
            self.send_offset = offset + count

    async def _read_acks(self, sock: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        """Record acks until the slave closes its side; then end the whole connection."""
        decoder = AckDecoder()
        while True:
            data = await sock.recv(4096)
            if not data:
                if decoder.buffered:
                    raise HAProtocolError(f"stream ended inside an ack ({decoder.buffered} B)")
                log.info("ha_slave_closed slave=%s ack_offset=%d", self.name, self.ack_offset)
                scope.cancel()
                return
            for offset in decoder.feed(data):
                if offset > self.send_offset:
                    raise HAProtocolError(
                        f"slave {self.name} acked {offset}, past what was sent ({self.send_offset})"
                    )
                if offset > self.ack_offset:
                    self.ack_offset = offset
                    if self.on_ack is not None:
                        assert self.name is not None
                        self.on_ack(self.name, offset)


class HAService:
    """The master's replication endpoint: accepts slaves, one :class:`HAConnection` each,
    and tracks the confirm offset (minimum ack among connected slaves) for producers
    waiting on replication.

    A slave name is its identity: a slave that reconnects under the same name replaces
    its old connection (which may not have noticed the old socket died yet).
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        use_sendfile: bool = True,
        max_chunk: int = MAX_CHUNK,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.store = store
        self.use_sendfile = use_sendfile
        self.max_chunk = max_chunk
        self.poll_interval = poll_interval
        self.ack_offsets: dict[str, int] = {}
        """Connected slaves' acknowledged log ends, by name."""
        self.connections: dict[str, HAConnection] = {}
        self._confirmed = OffsetWaiters()
        self._confirmed.advance(0)  # an empty prefix is always replicated

    @property
    def confirm_offset(self) -> int:
        """Every byte below it was acknowledged by every slave connected when it was."""
        return self._confirmed.position

    async def wait_replicated(self, offset: int, deadline: float = math.inf) -> bool:
        """True once the confirm offset reaches ``offset``; False at ``deadline`` (which
        needs :meth:`serve` running: it runs the deadline timer)."""
        return await self._confirmed.wait(offset, deadline)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve slaves until cancelled; ``task_status.started`` gets the bound
        port (useful with port 0)."""
        listener = trio.socket.socket()
        with listener:
            listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await listener.bind((host, port))
            listener.listen()
            bound = listener.getsockname()[1]
            log.info("ha_listening host=%s port=%d", host, bound)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._confirmed.expire_deadlines)
                task_status.started(bound)
                while True:
                    sock, peer = await listener.accept()
                    nursery.start_soon(self._handle, sock, peer)

    async def _handle(self, sock: trio.socket.SocketType, peer: Any) -> None:
        connection = HAConnection(
            self.store,
            use_sendfile=self.use_sendfile,
            max_chunk=self.max_chunk,
            poll_interval=self.poll_interval,
            on_hello=self._register,
            on_ack=self._on_ack,
        )
        with sock:
            try:
                await connection.run(sock)
            except (OSError, HAProtocolError, TransferError) as exc:
                log.warning(
                    "ha_connection_failed slave=%s peer=%s error=%r", connection.name, peer, exc
                )
            except Exception:  # one slave's bug must not take the others' streams down
                log.exception("ha_connection_crashed slave=%s peer=%s", connection.name, peer)
            finally:
                self._unregister(connection)

    def _register(self, connection: HAConnection) -> None:
        assert connection.name is not None
        old = self.connections.get(connection.name)
        if old is not None:
            log.info("ha_slave_replaced slave=%s", connection.name)
            old.cancel_scope.cancel()
        self.connections[connection.name] = connection

    def _unregister(self, connection: HAConnection) -> None:
        name = connection.name
        if name is not None and self.connections.get(name) is connection:
            del self.connections[name]
            del self.ack_offsets[name]
            log.info("ha_slave_disconnected slave=%s ack_offset=%d", name, connection.ack_offset)

    def _on_ack(self, name: str, offset: int) -> None:
        self.ack_offsets[name] = offset
        self._confirmed.advance(min(self.ack_offsets.values()))


# ---- slave ------------------------------------------------------------------------------------


class HAClient:
    """The slave's end: reports its log end, then applies the master's chunks in order and
    acknowledges its visible end after each (ack after write, not after fsync)."""

    def __init__(self, store: MessageStore, name: str, *, max_chunk: int = MAX_CHUNK) -> None:
        self.store = store
        self.name = name
        self.master_offset: int | None = None
        """The master's log end when it answered the hello."""
        self.acked_offset = -1
        self._buffer = bytearray(max_chunk + HEADER_SIZE)

    async def run(self, host: str, port: int) -> None:
        """Replicate until the master closes the stream (returns) or it breaks (raises).
        Reconnecting is the caller's loop: each run starts from the store's current end."""
        sock = trio.socket.socket()
        with sock:
            await sock.connect((host, port))
            commit_log = self.store.commit_log
            start = commit_log.max_offset
            await _send_all(sock, pack_slave_hello(self.name, start))
            reply = await _recv_exactly(sock, MASTER_HELLO_SIZE, "master hello")
            self.master_offset = unpack_master_hello(reply).max_offset
            self.acked_offset = start
            log.info(
                "ha_connected slave=%s slave_offset=%d master_offset=%d",
                self.name,
                start,
                self.master_offset,
            )
            view = memoryview(self._buffer)
            while True:
                header = await receive_chunk_into(sock, view)
                if header is None:
                    log.info("ha_master_closed slave=%s offset=%d", self.name, self.acked_offset)
                    return
                end = await self.store.append_replicated(header.offset, view[: header.length])
                if end > self.acked_offset:
                    await _send_all(sock, pack_ack(end))
                    self.acked_offset = end
