"""Master-to-slave log streaming (RocketMQ HA style) over one TCP connection per slave.

The wire protocol, in order, on one socket:

1. slave -> master: a *hello* (:func:`pack_slave_hello`): magic, version, the slave's
   log end (``commit_log.max_offset``), its name and its epoch history (count, then
   u32 epoch + u64 start offset per entry). The slave's own end is where the master
   starts: the slave tells, the master never guesses, so a reconnect after any failure
   resumes exactly where the slave's visible log stops -- unless the histories say the
   slave's tail came from another master (see *Epochs* below).
2. master -> slave: a *hello* back (:func:`pack_master_hello`): magic, version, the
   master's log end at that moment and the master's epoch history.
3. master -> slave: chunks (:mod:`replication.transfer`), each one range of one segment,
   sent with ``sendfile`` from the segment's fd. One task sends; nothing else writes to
   the master's side of the socket (the transfer module's one-sender rule).
4. slave -> master, concurrently: 16-byte *ack* frames (:func:`pack_ack`) carrying the
   slave's visible log end after each chunk it applied. A separate master task reads
   them (reading while another task sends is fine).

The frame codecs are sans-IO (bytes in, values out; :class:`AckDecoder` takes bytes
as they arrive), the classes do the trio I/O.

What the master acknowledges to producers is the *confirm offset*: the smallest ack
among the *in-sync* slaves (:mod:`replication.insync`: within ``max_lag_bytes`` of the
master's end and caught up within ``max_lag_ms``; :meth:`HAService.wait_replicated`).
A slave that falls behind stops holding it back, one that catches up counts again. It
only moves forward: a lagging slave that connects later does not un-confirm bytes
every slave in sync at the time had already acknowledged.

Liveness: the slave sends its ack frame at least every ``heartbeat_ms`` even when
nothing arrived, and the master sends an empty chunk (length 0, at its send offset)
when idle for ``heartbeat_ms``. Either end that hears nothing for ``peer_timeout_ms``
closes the connection (the slave's caller reconnects), so a silently dead peer --
a pulled cable, a frozen process -- is noticed without waiting for TCP keepalive.

Epochs (``replication.epochs``), active only when the master was given a non-empty
history (``HAService(history=...)``) and, on the slave side, the slave was too
(``HAClient(history=..., epoch_file=...)``); without histories everything above is
unchanged:

* Both ends compute the same :func:`~replication.epochs.divergence_point` from the two
  histories and log ends in the hellos. If it is below the slave's end, the master
  streams from the divergence point *on the same connection* and the slave, before it
  reads the first chunk, truncates its log and history to it (and persists the
  history). No second handshake: the function is pure and both ends feed it the same
  inputs, so they agree without another round trip.
* The slave then adopts the master's newer epochs, each once its log reaches the
  epoch's start (so its history never names a term it holds no place in, and a later
  promotion appends an epoch that starts at or after every adopted one).
* A slave whose current epoch is newer than the master's proves the master stale: the
  master closes that connection without replying, sets :attr:`HAService.stale` and
  from then on :meth:`HAService.wait_replicated` answers False (at once for new waits,
  immediately for parked ones). Other slaves keep their streams; the node must demote.
* A slave that has records but sends an empty history cannot be checked against the
  master's terms; an epoch-aware master refuses it when its log would need cutting.

Not handled here: retention deleting a segment under a sender, reconnect/backoff on the
slave side (the node's loop does that).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from replication.epochs import (
    EpochEntry,
    EpochFile,
    EpochHistory,
    EpochHistoryError,
    divergence_point,
    leader_is_stale,
)
from replication.insync import DEFAULT_MAX_LAG_BYTES, DEFAULT_MAX_LAG_MS, InSyncSet, SlaveLag
from replication.transfer import (
    HEADER_SIZE,
    ChunkHeader,
    TransferError,
    receive_chunk_into,
    recv_exactly_into,
    send_file_range,
)
from storage.concurrency import lone_error_unwrapped
from storage.store import MessageStore
from storage.waiters import OffsetWaiters

__all__ = [
    "ACK_SIZE",
    "EPOCH_ENTRY_SIZE",
    "MASTER_HELLO_SIZE",
    "MAX_CHUNK",
    "MAX_EPOCH_ENTRIES",
    "SLAVE_ACK_MODES",
    "SLAVE_HELLO_FIXED",
    "AckDecoder",
    "HAClient",
    "HAConnection",
    "HAProtocolError",
    "HAService",
    "MasterHello",
    "SlaveHello",
    "pack_ack",
    "pack_epochs",
    "pack_master_hello",
    "pack_slave_hello",
    "unpack_epochs",
    "unpack_master_hello",
    "unpack_master_hello_fixed",
    "unpack_slave_hello",
    "unpack_slave_hello_fixed",
    "unpack_slave_hello_header",
]

log = logging.getLogger(__name__)

HA_VERSION = 2
"""2: the hellos carry epoch histories."""
SLAVE_HELLO_MAGIC = 0x544C4853  # "TLHS": tidelog hello from a slave
MASTER_HELLO_MAGIC = 0x544C484D  # "TLHM": tidelog hello from the master
ACK_MAGIC = 0x544C4841  # "TLHA": tidelog HA ack

_SLAVE_HELLO = struct.Struct("!IHHQHH")
"""magic u32, version u16, reserved u16, slave log end u64, name length u16, epoch count
u16; then the name, then the epoch entries."""
_MASTER_HELLO = struct.Struct("!IHHQH")
"""magic u32, version u16, reserved u16, master log end u64, epoch count u16; then the
epoch entries."""
_EPOCH_ENTRY = struct.Struct("!IQ")
"""epoch u32, start offset u64 (the epoch file's field widths)."""
_ACK = struct.Struct("!IHHQ")
"""magic u32, version u16, reserved u16, acknowledged log end u64: 16 bytes."""

SLAVE_HELLO_FIXED = _SLAVE_HELLO.size
MASTER_HELLO_SIZE = _MASTER_HELLO.size
"""The fixed part of the master's hello: all of it when the master has no history."""
EPOCH_ENTRY_SIZE = _EPOCH_ENTRY.size
ACK_SIZE = _ACK.size
MAX_NAME = 255
MAX_EPOCH_ENTRIES = 4096
"""Bound on a hello's history (48 KiB of entries): a peer cannot make us allocate more.
A history only grows by one entry per master election, so this is decades of them."""

MAX_CHUNK = 1 << 20
"""Data bytes per chunk: the size the transfer benchmark found to be the knee (see
``transfer.DEFAULT_MAX_CALL``), and the slave's receive buffer size."""

DEFAULT_HEARTBEAT_MS = 1_000
"""Longest silence of a healthy end: the slave re-sends its ack, the master an empty
chunk. Well under ``DEFAULT_PEER_TIMEOUT_MS`` so a few lost turns do not cut a stream."""
DEFAULT_PEER_TIMEOUT_MS = 5_000
"""Silence after which an end gives the other up and closes the connection."""


def check_liveness(heartbeat_ms: float, peer_timeout_ms: float) -> None:
    """One rule for every end of a connection: both periods positive, and the peer timeout
    longer than the heartbeat (else a healthy, idle peer would be dropped)."""
    if heartbeat_ms <= 0 or peer_timeout_ms <= 0:
        raise ValueError("heartbeat_ms and peer_timeout_ms must be positive")
    if peer_timeout_ms <= heartbeat_ms:
        raise ValueError(
            f"peer_timeout_ms ({peer_timeout_ms}) must exceed heartbeat_ms ({heartbeat_ms})"
        )


DEFAULT_POLL_INTERVAL = 0.05
"""How long a caught-up sender waits for an arrival before looking at the log again. The
dispatcher's arrival event is the fast path; the poll covers appends whose dispatch was
folded into another task's (that one sets the event, but possibly before we waited)."""


class HAProtocolError(Exception):
    """The peer sent something that is not this protocol (or not this version): close."""


class _StaleMaster(Exception):
    """Fails the confirm-offset waiters once the master is stale (turned into False)."""


# ---- sans-IO frames ---------------------------------------------------------------------------


@attrs.frozen
class SlaveHello:
    name: str
    max_offset: int
    epochs: tuple[EpochEntry, ...] = ()
    """The slave's epoch history, oldest first (empty for an epoch-unaware slave)."""

    @property
    def history(self) -> EpochHistory:
        return EpochHistory(self.epochs)


@attrs.frozen
class MasterHello:
    max_offset: int
    epochs: tuple[EpochEntry, ...] = ()
    """The master's epoch history, oldest first (empty for an epoch-unaware master)."""

    @property
    def history(self) -> EpochHistory:
        return EpochHistory(self.epochs)


def _check_magic(magic: int, version: int, want: int, what: str) -> None:
    if magic != want:
        raise HAProtocolError(f"bad {what} magic {magic:#010x} (want {want:#010x})")
    if version != HA_VERSION:
        raise HAProtocolError(f"unsupported {what} version {version} (want {HA_VERSION})")


def _check_epoch_count(count: int, what: str) -> None:
    if count > MAX_EPOCH_ENTRIES:
        raise HAProtocolError(f"{what} carries {count} epochs, more than {MAX_EPOCH_ENTRIES}")


def pack_epochs(history: EpochHistory | None) -> bytes:
    """The entries of ``history`` as a hello carries them (nothing for None)."""
    if history is None:
        return b""
    if len(history) > MAX_EPOCH_ENTRIES:
        raise ValueError(f"{len(history)} epochs do not fit a hello (max {MAX_EPOCH_ENTRIES})")
    try:
        return b"".join(_EPOCH_ENTRY.pack(e.epoch, e.start_offset) for e in history.entries)
    except struct.error as exc:
        raise ValueError(f"an epoch entry does not fit u32 epoch / u64 offset: {exc}") from exc


def unpack_epochs(data: bytes | bytearray | memoryview, count: int) -> tuple[EpochEntry, ...]:
    """Parse ``count`` entries that must fill ``data`` exactly and form a valid history
    (epochs increasing, starts not decreasing): a peer's history we cannot trust must
    not decide what the slave deletes."""
    _check_epoch_count(count, "hello")
    if len(data) != count * EPOCH_ENTRY_SIZE:
        raise HAProtocolError(
            f"{count} epochs need {count * EPOCH_ENTRY_SIZE} bytes, got {len(data)}"
        )
    entries = tuple(EpochEntry(*fields) for fields in _EPOCH_ENTRY.iter_unpack(data))
    try:
        EpochHistory(entries)
    except EpochHistoryError as exc:
        raise HAProtocolError(f"epoch history out of order: {exc}") from exc
    return entries


def pack_slave_hello(name: str, max_offset: int, history: EpochHistory | None = None) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"slave name must be 1..{MAX_NAME} UTF-8 bytes, got {len(raw)}")
    epochs = pack_epochs(history)
    count = len(epochs) // EPOCH_ENTRY_SIZE
    fixed = _SLAVE_HELLO.pack(SLAVE_HELLO_MAGIC, HA_VERSION, 0, max_offset, len(raw), count)
    return fixed + raw + epochs


def unpack_slave_hello_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Parse the fixed part of a slave hello; return (slave log end, name length, epoch
    count): what the reader needs to know how many bytes follow."""
    magic, version, _reserved, max_offset, name_len, count = _SLAVE_HELLO.unpack(data)
    _check_magic(magic, version, SLAVE_HELLO_MAGIC, "slave hello")
    if not 0 < name_len <= MAX_NAME:
        raise HAProtocolError(f"slave name length {name_len} outside 1..{MAX_NAME}")
    _check_epoch_count(count, "slave hello")
    return max_offset, name_len, count


def unpack_slave_hello_fixed(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Parse the fixed part of a slave hello; return (slave log end, name length)."""
    max_offset, name_len, _count = unpack_slave_hello_header(data)
    return max_offset, name_len


def _decode_name(raw: bytes | bytearray | memoryview) -> str:
    try:
        return bytes(raw).decode()
    except UnicodeDecodeError as exc:
        raise HAProtocolError(f"slave name is not UTF-8: {exc}") from exc


def unpack_slave_hello(data: bytes | bytearray | memoryview) -> SlaveHello:
    """Parse a whole slave hello, which must be exactly ``data``."""
    view = memoryview(data)
    if len(view) < SLAVE_HELLO_FIXED:
        raise HAProtocolError(f"slave hello of {len(view)} B is shorter than its fixed part")
    max_offset, name_len, count = unpack_slave_hello_header(view[:SLAVE_HELLO_FIXED])
    name_end = SLAVE_HELLO_FIXED + name_len
    if len(view) < name_end:
        raise HAProtocolError(f"slave hello of {len(view)} B ends inside the name")
    name = _decode_name(view[SLAVE_HELLO_FIXED:name_end])
    return SlaveHello(name, max_offset, unpack_epochs(view[name_end:], count))


def pack_master_hello(max_offset: int, history: EpochHistory | None = None) -> bytes:
    epochs = pack_epochs(history)
    count = len(epochs) // EPOCH_ENTRY_SIZE
    return _MASTER_HELLO.pack(MASTER_HELLO_MAGIC, HA_VERSION, 0, max_offset, count) + epochs


def unpack_master_hello_fixed(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Parse the fixed part of a master hello; return (master log end, epoch count)."""
    magic, version, _reserved, max_offset, count = _MASTER_HELLO.unpack(data)
    _check_magic(magic, version, MASTER_HELLO_MAGIC, "master hello")
    _check_epoch_count(count, "master hello")
    return max_offset, count


def unpack_master_hello(data: bytes | bytearray | memoryview) -> MasterHello:
    """Parse a whole master hello (the fixed part alone when it carries no epochs)."""
    view = memoryview(data)
    if len(view) < MASTER_HELLO_SIZE:
        raise HAProtocolError(f"master hello of {len(view)} B is shorter than its fixed part")
    max_offset, count = unpack_master_hello_fixed(view[:MASTER_HELLO_SIZE])
    return MasterHello(max_offset, unpack_epochs(view[MASTER_HELLO_SIZE:], count))


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


def _epochs_text(entries: tuple[EpochEntry, ...]) -> str:
    """``1@0,2@150``: a history as one log field."""
    return ",".join(f"{e.epoch}@{e.start_offset}" for e in entries) or "-"


def _no_delay(sock: trio.socket.SocketType) -> None:
    """Turn Nagle off: acks and heartbeats are 16-byte frames often sent while the
    previous one is unacknowledged, which Nagle would hold back until the peer's
    (delayed) ACK. Chunk headers are still coalesced with their data by ``MSG_MORE``."""
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)


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
        history: EpochHistory | None = None,
        on_stale: Callable[[str], None] | None = None,
        heartbeat_ms: float = DEFAULT_HEARTBEAT_MS,
        peer_timeout_ms: float = DEFAULT_PEER_TIMEOUT_MS,
    ) -> None:
        if max_chunk <= 0:
            raise ValueError(f"max_chunk must be positive, got {max_chunk}")
        check_liveness(heartbeat_ms, peer_timeout_ms)
        self.heartbeat_ms = heartbeat_ms
        """An idle stream sends an empty chunk this often, so the slave can tell a quiet
        master from a dead one."""
        self.peer_timeout_ms = peer_timeout_ms
        """A slave silent this long (no ack, not even a heartbeat) is dropped."""
        self.store = store
        self.use_sendfile = use_sendfile
        self.max_chunk = max_chunk
        self.poll_interval = poll_interval
        self.on_hello = on_hello
        self.on_ack = on_ack
        self.history = history
        """The master's epoch history (shared with the node, read at each hello); None
        turns every epoch check off."""
        self.on_stale = on_stale
        """Called with the reason when a slave proves this master stale."""
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
            end = self.store.commit_log.max_offset
            stale = self._stale_reason(hello)
            if stale is not None:
                # No reply: a stale master must not hand its history to a slave that
                # already follows a newer one.
                log.error("ha_refused_stale %s", stale)
                if self.on_stale is not None:
                    self.on_stale(stale)
                return
            start = self._start_offset(hello, end)
            self.name = hello.name
            self.send_offset = self.ack_offset = start
            # Registered before the reply: once the slave hears back, it counts for the
            # confirm offset (with what it already holds) and replaced any older connection.
            if self.on_hello is not None:
                self.on_hello(self)
            if self.on_ack is not None:
                self.on_ack(hello.name, start)
            await _send_all(sock, pack_master_hello(end, self.history))
            log.info(
                "ha_slave_connected slave=%s slave_offset=%d stream_from=%d master_offset=%d",
                hello.name,
                hello.max_offset,
                start,
                end,
            )
            with lone_error_unwrapped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_acks, sock, nursery.cancel_scope)
                    await self._stream(sock)

    def _stale_reason(self, hello: SlaveHello) -> str | None:
        """Why this master is stale, judging by the slave's history; None if it is not
        (or if this master runs without epochs)."""
        if self.history is None or not leader_is_stale(hello.history, self.history):
            return None
        theirs = hello.epochs[-1]
        mine = self.history.current
        return (
            f"reason=slave_epoch_newer slave={hello.name} slave_epoch={theirs.epoch} "
            f"slave_epoch_start={theirs.start_offset} "
            f"master_epoch={mine.epoch if mine is not None else None}"
        )

    def _start_offset(self, hello: SlaveHello, end: int) -> int:
        """Where the stream starts: the slave's end, or where its log stops agreeing
        with ours (the slave computes the same point from the same two histories and
        cuts its log there before it reads the first chunk)."""
        offset = hello.max_offset
        history = self.history
        if history is not None and len(history):
            point = divergence_point(hello.history, hello.max_offset, history, end)
            if point < hello.max_offset:
                if not hello.epochs:
                    raise HAProtocolError(
                        f"slave {hello.name} holds records up to {hello.max_offset} but sent "
                        f"no epoch history, so nothing shows which master wrote those past "
                        f"{point}; restore its epoch file or re-seed it"
                    )
                log.warning(
                    "ha_slave_diverged slave=%s slave_offset=%d truncate_to=%d "
                    "slave_epochs=%s master_epochs=%s",
                    hello.name,
                    hello.max_offset,
                    point,
                    _epochs_text(hello.epochs),
                    _epochs_text(history.entries),
                )
                offset = point
        start = self.store.commit_log.min_offset
        if not start <= offset <= end:
            # Past our end: a tail no epoch check cut (epoch-unaware master or slave).
            # Below our start: retention removed what it needs; it must re-seed.
            raise HAProtocolError(
                f"slave {hello.name} is at {offset}, outside the master's log [{start}, {end}]"
            )
        return offset

    async def _read_hello(self, sock: trio.socket.SocketType) -> SlaveHello:
        fixed = await _recv_exactly(sock, SLAVE_HELLO_FIXED, "slave hello")
        max_offset, name_len, count = unpack_slave_hello_header(fixed)
        name = _decode_name(await _recv_exactly(sock, name_len, "slave name"))
        raw = await _recv_exactly(sock, count * EPOCH_ENTRY_SIZE, "slave epochs")
        return SlaveHello(name, max_offset, unpack_epochs(raw, count))

    async def _stream(self, sock: trio.socket.SocketType) -> None:
        """Send committed bytes forever: one chunk per turn, within one segment and below
        the log end; park on the dispatcher's arrival event when caught up, and send an
        empty chunk (the heartbeat) after ``heartbeat_ms`` without one."""
        files = self.store.commit_log.files
        heartbeat = self.heartbeat_ms / 1000
        last_sent = trio.current_time()
        while True:
            end = self.store.commit_log.max_offset
            offset = self.send_offset
            if offset >= end:
                idle_until = last_sent + heartbeat
                if trio.current_time() >= idle_until:
                    # Sent by this task like every chunk: one sender on the socket.
                    await _send_all(sock, ChunkHeader(offset=offset, length=0).pack())
                    last_sent = trio.current_time()
                    continue
                with trio.move_on_at(min(idle_until, trio.current_time() + self.poll_interval)):
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
            last_sent = trio.current_time()

    async def _read_acks(self, sock: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        """Record acks until the slave closes its side (then end the whole connection) or
        stays silent for ``peer_timeout_ms`` (raise: the slave is gone or stuck). Every
        frame, a heartbeat repeating the last offset too, reaches ``on_ack``: the
        in-sync set needs to hear that the slave is alive."""
        decoder = AckDecoder()
        timeout = self.peer_timeout_ms / 1000
        while True:
            data = None
            with trio.move_on_after(timeout):
                data = await sock.recv(4096)
            if data is None:
                raise HAProtocolError(
                    f"slave {self.name} sent nothing for {self.peer_timeout_ms:.0f} ms "
                    f"(ack_offset {self.ack_offset}): dropping it"
                )
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
                if offset >= self.ack_offset:
                    self.ack_offset = offset
                    if self.on_ack is not None:
                        assert self.name is not None
                        self.on_ack(self.name, offset)


class HAService:
    """The master's replication endpoint: accepts slaves, one :class:`HAConnection` each,
    and tracks the confirm offset (minimum ack among in-sync slaves, see
    :mod:`replication.insync`) for producers waiting on replication.

    Membership changes with time as well as with acks (a slave that goes quiet drops
    out after ``max_lag_ms`` without any frame arriving), so :meth:`serve` also runs a
    watcher that re-evaluates the set every ``check_interval`` and logs who left and
    who came back.

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
        history: EpochHistory | None = None,
        max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES,
        max_lag_ms: float = DEFAULT_MAX_LAG_MS,
        heartbeat_ms: float = DEFAULT_HEARTBEAT_MS,
        peer_timeout_ms: float = DEFAULT_PEER_TIMEOUT_MS,
    ) -> None:
        check_liveness(heartbeat_ms, peer_timeout_ms)
        self.store = store
        self.insync = InSyncSet(max_lag_bytes, max_lag_ms)
        self.heartbeat_ms = heartbeat_ms
        self.peer_timeout_ms = peer_timeout_ms
        self.check_interval = max(min(max_lag_ms, heartbeat_ms) / 4000, 0.001)
        """Seconds between re-evaluations of the in-sync set: a quarter of the shorter
        of the lag bound and the heartbeat, so a drop-out is seen within 25% of it."""
        self._in_sync_names: frozenset[str] = frozenset()
        self._membership_changed = trio.Event()
        self.use_sendfile = use_sendfile
        self.max_chunk = max_chunk
        self.poll_interval = poll_interval
        self.history = history
        """This master's epoch history. Pass the node's own object (the one it appends
        its term to on promotion and saves to the epoch file): each hello reads it.
        None (the default) serves without any epoch check, as before epochs existed."""
        self.stale: str | None = None
        """Why this master is stale (a slave reported a newer epoch), or None. Once set
        it stays: :meth:`wait_replicated` answers False and the node must step down."""
        self.ack_offsets: dict[str, int] = {}
        """Connected slaves' acknowledged log ends, by name (in sync or not)."""
        self.connections: dict[str, HAConnection] = {}
        self._confirmed = OffsetWaiters()
        self._confirmed.advance(0)  # an empty prefix is always replicated

    @property
    def confirm_offset(self) -> int:
        """Every byte below it was acknowledged by every slave in sync when it was."""
        return self._confirmed.position

    def in_sync_slaves(self) -> dict[str, int]:
        """The in-sync slaves' ack offsets, by name, judged now."""
        return self.insync.in_sync(self.store.commit_log.max_offset, trio.current_time())

    async def wait_membership_change(self) -> frozenset[str]:
        """Park until a slave joins or leaves the in-sync set; return the new set's
        names. Lets a caller (a test, a monitor) react to a change without polling."""
        await self._membership_changed.wait()
        return self._in_sync_names

    def slave_lags(self) -> list[SlaveLag]:
        """Every connected slave's lag in bytes and ms and whether it is in sync."""
        return self.insync.lags(self.store.commit_log.max_offset, trio.current_time())

    async def wait_replicated(self, offset: int, deadline: float = math.inf) -> bool:
        """True once the confirm offset reaches ``offset``; False at ``deadline`` (which
        needs :meth:`serve` running: it runs the deadline timer), and False at once
        when this master is :attr:`stale` (waits parked before that wake with False):
        a newer master exists, so what we replicate may be cut on every slave."""
        if self.stale is not None:
            await trio.lowlevel.checkpoint()
            return False
        try:
            return await self._confirmed.wait(offset, deadline)
        except _StaleMaster:
            return False

    def status(self) -> dict[str, Any]:
        """Replication state for ``tidelog status``: role, epoch, slaves, confirm offset
        and the stale reason (None while healthy)."""
        current = self.history.current if self.history is not None else None
        return {
            "role": "master",
            "epoch": current.epoch if current is not None else None,
            "epoch_start": current.start_offset if current is not None else None,
            "log_max_offset": self.store.commit_log.max_offset,
            "confirm_offset": self.confirm_offset,
            "slaves": dict(self.ack_offsets),
            **lag_status(self.slave_lags()),
            "stale": self.stale,
        }

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
                nursery.start_soon(self._watch_in_sync)
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
            history=self.history,
            on_stale=self._on_stale,
            heartbeat_ms=self.heartbeat_ms,
            peer_timeout_ms=self.peer_timeout_ms,
        )
        with sock:
            try:
                _no_delay(sock)
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
        self.insync.add(
            connection.name,
            connection.ack_offset,
            self.store.commit_log.max_offset,
            trio.current_time(),
        )

    def _unregister(self, connection: HAConnection) -> None:
        name = connection.name
        if name is not None and self.connections.get(name) is connection:
            del self.connections[name]
            del self.ack_offsets[name]
            self.insync.remove(name)
            self._update_confirm()
            log.info("ha_slave_disconnected slave=%s ack_offset=%d", name, connection.ack_offset)

    def _on_stale(self, reason: str) -> None:
        if self.stale is not None:
            return
        self.stale = reason
        log.error("ha_master_stale %s acks=stopped", reason)
        self._confirmed.fail(_StaleMaster(reason))

    def _on_ack(self, name: str, offset: int) -> None:
        self.ack_offsets[name] = offset
        self.insync.ack(name, offset, self.store.commit_log.max_offset, trio.current_time())
        self._update_confirm()

    def _update_confirm(self) -> None:
        """Advance the confirm offset to the slowest in-sync slave's ack (no in-sync
        slave: it stays, nothing new is replicated), and log membership changes."""
        in_sync = self.in_sync_slaves()
        names = frozenset(in_sync)
        if names != self._in_sync_names:
            for name in sorted(self._in_sync_names - names):
                if name in self.ack_offsets:
                    lag = next(x for x in self.slave_lags() if x.name == name)
                    log.warning(
                        "ha_slave_out_of_sync slave=%s ack_offset=%d lag_bytes=%d lag_ms=%.0f",
                        name,
                        lag.ack_offset,
                        lag.lag_bytes,
                        lag.lag_ms,
                    )
            for name in sorted(names - self._in_sync_names):
                log.info("ha_slave_in_sync slave=%s ack_offset=%d", name, in_sync[name])
            self._in_sync_names = names
            self._membership_changed.set()
            self._membership_changed = trio.Event()
        if in_sync:
            self._confirmed.advance(min(in_sync.values()))

    async def _watch_in_sync(self) -> None:
        """Re-judge the set as time passes: dropping a silent laggard is what lets the
        confirm offset (and the writes waiting on it) move on without it."""
        while True:
            await trio.sleep(self.check_interval)
            self._update_confirm()


def lag_status(lags: list[SlaveLag]) -> dict[str, list[dict[str, Any]]]:
    """``in_sync`` and ``out_of_sync`` lists for a status reply: name, ack offset, lag in
    bytes and in ms (since the slave was last caught up)."""
    out: dict[str, list[dict[str, Any]]] = {"in_sync": [], "out_of_sync": []}
    for lag in lags:
        out["in_sync" if lag.in_sync else "out_of_sync"].append(
            {
                "name": lag.name,
                "ack_offset": lag.ack_offset,
                "lag_bytes": lag.lag_bytes,
                "lag_ms": round(lag.lag_ms, 1),
            }
        )
    return out


# ---- slave ------------------------------------------------------------------------------------


SLAVE_ACK_MODES: Final = ("write", "durable")
"""``write``: ack what is applied (page cache); ``durable``: ack only what is fsynced."""


class HAClient:
    """The slave's end: reports its log end, then applies the master's chunks in order and
    acknowledges its visible end after each. With ``slave_ack="write"`` (the default) the
    ack follows the write; with ``"durable"`` it follows this slave's fsync of the chunk,
    so the master's confirm offset never runs past bytes a slave power loss could take
    back (one fsync per applied chunk is the price).

    With a ``history`` (the node's epoch history, loaded from ``epoch_file``) the slave
    takes part in the epoch protocol: it sends its history, cuts a divergent tail the
    master's history rules out (see the module docstring) and adopts the master's newer
    epochs, saving the history to ``epoch_file`` after every change (without a file the
    history only changes in memory). Without a history it behaves as before epochs.

    Liveness: a task re-sends the current ack every ``heartbeat_ms`` (so the master
    knows a slave with nothing to apply is alive), and a master silent for
    ``peer_timeout_ms`` -- not even its empty heartbeat chunk -- ends :meth:`run` with
    :class:`HAProtocolError`, so the caller's loop reconnects.
    """

    def __init__(
        self,
        store: MessageStore,
        name: str,
        *,
        max_chunk: int = MAX_CHUNK,
        history: EpochHistory | None = None,
        epoch_file: EpochFile | None = None,
        heartbeat_ms: float = DEFAULT_HEARTBEAT_MS,
        peer_timeout_ms: float = DEFAULT_PEER_TIMEOUT_MS,
        slave_ack: str = "write",
    ) -> None:
        check_liveness(heartbeat_ms, peer_timeout_ms)
        if slave_ack not in SLAVE_ACK_MODES:
            raise ValueError(
                f"slave_ack must be one of {', '.join(SLAVE_ACK_MODES)}, got {slave_ack!r}"
            )
        self.store = store
        self.name = name
        self.slave_ack = slave_ack
        self.heartbeat_ms = heartbeat_ms
        self.peer_timeout_ms = peer_timeout_ms
        self.history = history
        self.epoch_file = epoch_file
        self.master_offset: int | None = None
        """The master's log end when it answered the hello."""
        self.master_history: EpochHistory | None = None
        """The master's history from its hello."""
        self.acked_offset = -1
        self.last_truncation: tuple[int, int] | None = None
        """(old end, new end) of the last divergent tail this client cut, or None."""
        self._buffer = bytearray(max_chunk + HEADER_SIZE)
        self._ack_lock = trio.Lock()
        """Acks come from the apply loop and the heartbeat task: one frame at a time."""

    async def _send_ack(self, sock: trio.socket.SocketType, offset: int) -> None:
        async with self._ack_lock:
            await _send_all(sock, pack_ack(offset))

    async def _heartbeat(self, sock: trio.socket.SocketType) -> None:
        """Repeat the current ack every ``heartbeat_ms``, whatever the apply loop does:
        a slave stuck applying still says where it stands, and the master's in-sync
        set (not its peer timeout) decides what that lag means."""
        while True:
            await trio.sleep(self.heartbeat_ms / 1000)
            await self._send_ack(sock, self.acked_offset)

    async def _receive(self, sock: trio.socket.SocketType, view: memoryview) -> ChunkHeader | None:
        """The next chunk, or None at a clean end; :class:`HAProtocolError` when the
        master sent nothing, not even a heartbeat, for ``peer_timeout_ms``."""
        with trio.move_on_after(self.peer_timeout_ms / 1000):
            return await receive_chunk_into(sock, view)
        raise HAProtocolError(
            f"master sent nothing for {self.peer_timeout_ms:.0f} ms (slave {self.name} at "
            f"{self.acked_offset}): reconnecting"
        )

    async def run(self, host: str, port: int) -> None:
        """Replicate until the master closes the stream (returns) or it breaks (raises).
        Reconnecting is the caller's loop: each run starts from the store's current end.
        A divergent tail is cut inside the run, with no reconnect."""
        sock = trio.socket.socket()
        with sock:
            await sock.connect((host, port))
            _no_delay(sock)
            commit_log = self.store.commit_log
            start = commit_log.max_offset
            await _send_all(sock, pack_slave_hello(self.name, start, self.history))
            with trio.move_on_after(self.peer_timeout_ms / 1000) as hello_wait:
                master = await self._read_master_hello(sock)
            if hello_wait.cancelled_caught:
                raise HAProtocolError(
                    f"master did not answer the hello within {self.peer_timeout_ms:.0f} ms"
                )
            self.master_offset = master.max_offset
            self.master_history = master.history
            if self.history is not None and master.epochs:
                start = await self._cut_divergent_tail(start, self.master_history)
            pending = self._newer_epochs(master.epochs)
            await self._adopt_epochs(pending, start)
            self.acked_offset = start
            log.info(
                "ha_connected slave=%s slave_offset=%d master_offset=%d",
                self.name,
                start,
                self.master_offset,
            )
            with lone_error_unwrapped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat, sock)
                    await self._apply(sock, pending)
                    nursery.cancel_scope.cancel()

    async def _apply(self, sock: trio.socket.SocketType, pending: list[EpochEntry]) -> None:
        """Apply chunks and ack each advance until the master closes the stream."""
        view = memoryview(self._buffer)
        while True:
            header = await self._receive(sock, view)
            if header is None:
                log.info("ha_master_closed slave=%s offset=%d", self.name, self.acked_offset)
                return
            if header.length == 0:  # the master's heartbeat: it is alive, nothing to apply
                continue
            end = await self.store.append_replicated(header.offset, view[: header.length])
            if pending:
                await self._adopt_epochs(pending, end)
            if end > self.acked_offset:
                if self.slave_ack == "durable":
                    # Before acked_offset moves: the heartbeat task re-sends it too.
                    # flush() covers everything written so far, so end is on disk after.
                    await self.store.commit_log.flush()
                self.acked_offset = end
                await self._send_ack(sock, end)

    async def _read_master_hello(self, sock: trio.socket.SocketType) -> MasterHello:
        fixed = bytearray(MASTER_HELLO_SIZE)
        got = await recv_exactly_into(sock, memoryview(fixed))
        if got == 0:
            raise HAProtocolError(
                "master closed the connection instead of answering the hello: it refused "
                "this slave (stale master, unverifiable log or out of its range; its log "
                "says which)"
            )
        if got < MASTER_HELLO_SIZE:
            raise HAProtocolError(f"stream ended after {got} of the master hello's bytes")
        max_offset, count = unpack_master_hello_fixed(fixed)
        raw = await _recv_exactly(sock, count * EPOCH_ENTRY_SIZE, "master epochs")
        return MasterHello(max_offset, unpack_epochs(raw, count))

    async def _cut_divergent_tail(self, end: int, master: EpochHistory) -> int:
        """Cut the log and history where they stop agreeing with the master's (the same
        point the master computed and streams from); return the new end."""
        assert self.history is not None and self.master_offset is not None
        point = divergence_point(self.history, end, master, self.master_offset)
        if point >= end:
            return end
        old_epochs = self.history.entries
        await self.store.truncate(point)
        new_end = self.store.commit_log.max_offset
        if new_end != point:
            raise HAProtocolError(f"truncating at {point} left the log ending at {new_end}")
        # Log first, then history: a crash in between leaves epochs past the log end,
        # which divergence_point clamps to the end (the reverse could keep a bad tail
        # tagged with an epoch it does not belong to).
        self.history.truncate(point)
        await self._save_history()
        self.last_truncation = (end, point)
        log.warning(
            "ha_slave_truncated slave=%s old_end=%d new_end=%d dropped_bytes=%d "
            "old_epochs=%s kept_epochs=%s master_epochs=%s",
            self.name,
            end,
            point,
            end - point,
            _epochs_text(old_epochs),
            _epochs_text(self.history.entries),
            _epochs_text(master.entries),
        )
        return point

    def _newer_epochs(self, master: tuple[EpochEntry, ...]) -> list[EpochEntry]:
        """The master's epochs newer than ours: after the cut, ours end with the newest
        common epoch, so these are the master's terms we still have to learn."""
        if self.history is None:
            return []
        current = self.history.current
        return [e for e in master if current is None or e.epoch > current.epoch]

    async def _adopt_epochs(self, pending: list[EpochEntry], end: int) -> None:
        """Append (and save) the pending epochs that start at or below ``end``, removing
        them from ``pending``: an epoch is adopted once the log reaches where it starts,
        so a promotion of this node appends an epoch starting after all of them."""
        if self.history is None:
            return
        adopted = 0
        while adopted < len(pending) and pending[adopted].start_offset <= end:
            entry = pending[adopted]
            try:
                self.history.append(entry.epoch, entry.start_offset)
            except EpochHistoryError as exc:
                raise HAProtocolError(f"cannot adopt the master's epoch: {exc}") from exc
            adopted += 1
        if adopted:
            del pending[:adopted]
            await self._save_history()
            log.info(
                "ha_epochs_adopted slave=%s log_end=%d epochs=%s",
                self.name,
                end,
                _epochs_text(self.history.entries),
            )

    async def _save_history(self) -> None:
        if self.epoch_file is not None and self.history is not None:
            snapshot = EpochHistory(self.history.entries)
            await trio.to_thread.run_sync(self.epoch_file.save, snapshot)
