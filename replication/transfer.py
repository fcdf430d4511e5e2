"""Moving commit-log bytes from a master's segment file to a slave's socket, and back into memory.

The master streams the log as *chunks*: a small fixed header (:class:`ChunkHeader`:
physical offset and length) followed by exactly ``length`` bytes taken from one
segment file. A chunk never straddles two segments, because its bytes come from
one file descriptor.

Why ``os.sendfile``
    The committed bytes already sit in the page cache (the segment is a shared
    map of the file, so bytes written through the map *are* the file's pages).
    ``sendfile`` hands those pages to the socket inside the kernel: no copy into a
    Python buffer and back out, no Python object per chunk. trio has no sendfile
    of its own (python-trio/trio#45), so :func:`send_file_range` drives it on the
    non-blocking socket itself: try the syscall, and on ``EAGAIN`` park on
    ``trio.lowlevel.wait_writable``.

Why a copy path as well
    ``use_sendfile=False`` reads with ``preadv`` into a reusable buffer and writes
    it to the socket. It is the comparison point for the benchmark, the fallback
    where ``os.sendfile`` does not exist, and the only possible path once a link is
    encrypted (TLS needs the bytes in user space). On loopback the copy path is not
    necessarily slower: the receiver copies out of the socket either way, and that
    copy, not the sender, often sets the pace (see ``replication/bench.py``).

Why small ranges take the copy path anyway
    A chunk of a few records (a sequential or lightly pipelined producer's) is a few
    KiB: ``preadv`` of it is a memory copy, and header and data then leave in *one*
    ``write``, where ``sendfile`` needs a second network syscall for the header and
    trio's send wrapper a scheduler pass between the two, by which the data leaves
    one pass later. Ranges up to :data:`SMALL_RANGE_BYTES` are copied when the caller
    passes a buffer that holds them (the master does); larger ones are sent with
    ``sendfile``.

Why ``MSG_MORE``
    The header is 24 bytes. Sent on its own, TCP could push it out as a tiny
    segment before the data follows (Nagle is usually off on such links). Sending it
    with ``MSG_MORE`` tells the kernel more is coming, so the header rides in the
    same segment as the first data bytes, like ``TCP_CORK`` but without two extra
    ``setsockopt`` calls per chunk. The copy path simply puts the header into the
    same buffer as the first data and writes both with one call.

Why never two senders on one socket
    A chunk is only meaningful as header-then-exactly-``length`` bytes. Two tasks
    writing to one socket would interleave their bytes mid-chunk and the receiver
    would read one chunk's data as the next chunk's header. One task per
    connection sends; :func:`send_file_range` refuses (``trio.BusyResourceError``)
    to start while another call is writing to the same socket. Reading acks on the
    same socket from another task is fine.

Cancellation contract
    Each call is a trio checkpoint (it yields once per chunk, like trio's own
    sends: after the first syscall, so the bytes leave before other tasks run) and
    is cancellable between syscalls: it checks before every syscall
    and yields again every :data:`YIELD_BYTES`, so a fast receiver that never
    causes ``EAGAIN`` cannot starve the other tasks or hide a deadline. But a chunk
    interrupted halfway cannot be resumed or taken back, and a later chunk on the
    same stream would be read as the rest of this one. So **if a send does not
    return normally (cancelled or failed), it shuts down the socket's sending side
    before the exception propagates**: every later send on it fails with
    ``BrokenPipeError``, the peer sees end-of-stream (mid-chunk: a
    :class:`TruncatedChunkError`), and the caller must close the connection. The
    slave reconnects and resumes from the offset it reports, which is how
    replication recovers from any broken connection anyway.

Blocking on the disk
    The socket is non-blocking, the file is not: if the requested bytes are not in
    the page cache, ``sendfile`` and ``preadv`` wait for the disk *on the event
    loop thread*. Bytes per syscall are capped (``max_call``) so one call stays
    short when the pages are cached; a sender catching up from cold segments
    should warm them ahead (``posix_fadvise(WILLNEED)``) or run in a thread.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import attrs
import trio
from crc32c import crc32c

from replication.tls import TlsSocket

__all__ = [
    "DEFAULT_MAX_CALL",
    "HAVE_SENDFILE",
    "HEADER_SIZE",
    "MAGIC",
    "SMALL_RANGE_BYTES",
    "VERSION",
    "YIELD_BYTES",
    "ChunkHeader",
    "ChunkHeaderError",
    "ChunkReader",
    "ChunkTooLargeError",
    "ShortFileError",
    "TransferError",
    "TruncatedChunkError",
    "receive_chunk_into",
    "recv_exactly_into",
    "send_file_range",
]

MAGIC = 0x544C4348  # "TLCH": tidelog chunk
VERSION = 1
_HEADER = struct.Struct("!IHHQII")
"""Network byte order: magic u32, version u16, flags u16, physical offset u64, length u32,
header CRC32C u32 (over the 20 bytes before it). 24 bytes, so the u64 stays 8-aligned."""
HEADER_SIZE = _HEADER.size
_CRC_SPAN = HEADER_SIZE - 4
_LENGTH = struct.Struct("!I")
_LENGTH_AT = struct.calcsize("!IHHQ")
"""Where the length field sits in :data:`_HEADER` (:meth:`ChunkReader.buffered` reads it)."""
MAX_LENGTH = 0xFFFFFFFF

HAVE_SENDFILE = hasattr(os, "sendfile")
_HAVE_PREADV = hasattr(os, "preadv")
MSG_MORE = getattr(socket, "MSG_MORE", 0)

DEFAULT_MAX_CALL = 1 << 20
"""Data bytes per syscall (sendfile, or preadv + write). Measured with ``python -m
tools.bench.replication --sweep`` on the 2-vCPU dev VM (loopback, warm cache, calls of the
chunk size): 64 KiB and 256 KiB calls moved 0.9-1.1 GB/s at 0.17-0.38 CPU s/GiB on
the master; 1, 4 and 16 MiB calls 1.1-2.1 GB/s at 0.13-0.27 s/GiB, with the spread
between runs larger than the differences between those three. 1 MiB keeps one call
around half a millisecond at loopback speed, so other tasks are not held up."""

SMALL_RANGE_BYTES = 64 << 10
"""Ranges up to this many bytes go out by the copy path, header and data in one write
(see the module doc): on the dev VM a 1 KiB chunk took two network syscalls and a
scheduler pass with ``sendfile``, one write with the copy."""

YIELD_BYTES = 4 << 20
"""A sender that never meets ``EAGAIN`` (a fast receiver) would otherwise never let
other tasks run nor notice a deadline: yield to the scheduler after this many bytes."""

_active_senders: set[int] = set()
"""Socket fds with a :func:`send_file_range` in progress (the one-sender rule)."""


class TransferError(Exception):
    """Base class of the errors of this module; the connection must be closed after any."""


class ChunkHeaderError(TransferError):
    """The bytes where a chunk header should be are not one (bad magic, version or CRC)."""


class TruncatedChunkError(TransferError):
    """The stream ended inside a chunk: the sender failed or was cancelled mid-chunk."""


class ChunkTooLargeError(TransferError):
    """A chunk announces more bytes than the receiver's buffer holds."""


class ShortFileError(TransferError):
    """The file ended before the range announced in the chunk header was sent."""


@attrs.frozen(slots=True)
class ChunkHeader:
    """The header in front of every chunk of log bytes.

    ``offset`` is the physical log offset of the first data byte (identical on
    every replica), ``length`` the number of data bytes that follow. ``flags`` are
    the HA protocol's to define; this module carries them untouched. The header
    has its own CRC so a desynchronised stream (data read as a header) fails loudly
    instead of writing garbage at a random offset; the data is covered by the
    records' own CRCs.
    """

    offset: int
    length: int
    flags: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.offset < 1 << 64:
            raise ValueError(f"offset {self.offset} does not fit in u64")
        if not 0 <= self.length <= MAX_LENGTH:
            raise ValueError(f"length {self.length} does not fit in u32")
        if not 0 <= self.flags < 1 << 16:
            raise ValueError(f"flags {self.flags} do not fit in u16")

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, self.flags, self.offset, self.length, 0)
        return body[:_CRC_SPAN] + crc32c(body[:_CRC_SPAN]).to_bytes(4, "big")

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ChunkHeader:
        """Parse and check a header; raises :class:`ChunkHeaderError` on anything wrong."""
        if len(data) != HEADER_SIZE:
            raise ChunkHeaderError(f"chunk header is {HEADER_SIZE} bytes, got {len(data)}")
        magic, version, flags, offset, length, crc = _HEADER.unpack(data)
        if magic != MAGIC:
            raise ChunkHeaderError(
                f"bad chunk magic {magic:#010x} (want {MAGIC:#010x}): the stream is out of step"
            )
        if version != VERSION:
            raise ChunkHeaderError(f"unsupported chunk header version {version}")
        actual = crc32c(bytes(data[:_CRC_SPAN]))
        if crc != actual:
            raise ChunkHeaderError(f"chunk header CRC {crc:#010x} != computed {actual:#010x}")
        return cls(offset=offset, length=length, flags=flags)


# ---- sending ---------------------------------------------------------------------------------


async def send_file_range(
    sock: trio.socket.SocketType,
    fd: int,
    file_offset: int,
    count: int,
    header: bytes,
    *,
    use_sendfile: bool = True,
    max_call: int = DEFAULT_MAX_CALL,
    buffer: bytearray | None = None,
    checkpoint: bool = True,
) -> int:
    """Send ``header`` then ``count`` bytes of file ``fd`` from ``file_offset``; return bytes sent.

    ``sock`` must be a connected stream socket (trio sockets are non-blocking).
    With ``use_sendfile`` (and where ``os.sendfile`` exists) the header goes out
    with ``MSG_MORE`` and the data with ``os.sendfile``, unless ``count`` is at most
    :data:`SMALL_RANGE_BYTES` and ``buffer`` holds header and data: then, as without
    ``use_sendfile``, ``preadv`` fills ``buffer`` and the header shares the write
    with the data. Pass a ``buffer`` of ``len(header) + max_call`` bytes to reuse it
    across calls (one is allocated per call otherwise). At most ``max_call`` data
    bytes go per syscall. ``checkpoint=False`` leaves out the scheduling point after
    the copy path's last write, for a caller that parks or yields right after anyway
    (it must: a loop of such calls would otherwise never let other tasks run).

    Returns ``len(header) + count``. If it raises instead (cancelled, peer gone,
    file too short), the socket's sending side has been shut down and the
    connection must be closed: see the module's cancellation contract. Never call
    it concurrently on one socket (``trio.BusyResourceError`` if you do).
    """
    if file_offset < 0 or count < 0:
        raise ValueError(f"bad file range: offset {file_offset}, count {count}")
    if max_call <= 0:
        raise ValueError(f"max_call must be positive, got {max_call}")
    sock_fd = sock.fileno()
    if sock_fd in _active_senders:
        raise trio.BusyResourceError(
            "another send_file_range is writing to this socket; chunks would interleave"
        )
    _active_senders.add(sock_fd)
    try:
        if isinstance(sock, TlsSocket):  # encrypted in user space: never sendfile
            await _copy_all_tls(sock, fd, file_offset, count, header, max_call, buffer)
        elif use_sendfile and HAVE_SENDFILE and not _fits(buffer, header, count):
            await _send_header_more(sock, header)
            await _sendfile_all(sock, sock_fd, fd, file_offset, count, max_call)
        else:
            await _copy_all(sock, sock_fd, fd, file_offset, count, header, max_call, buffer)
            if checkpoint:
                await trio.lowlevel.cancel_shielded_checkpoint()  # all out: no cancel here
    except BaseException:
        _shut_down_sending(sock)
        raise
    finally:
        _active_senders.discard(sock_fd)
    return len(header) + count


def _fits(buffer: bytearray | None, header: bytes, count: int) -> bool:
    """Whether a range is small and ``buffer`` holds it with its header (one write)."""
    return count <= SMALL_RANGE_BYTES and buffer is not None and len(buffer) >= len(header) + count


def _shut_down_sending(sock: trio.socket.SocketType) -> None:
    """Make a half-sent chunk impossible to miss: no later send, the peer sees end-of-stream."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:  # already reset or not connected: nothing more can go out anyway
        if exc.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET, errno.EBADF):
            raise


async def _send_header_more(sock: trio.socket.SocketType, header: bytes) -> None:
    """Queue the header without pushing it: the data that follows leaves in the same segment.

    trio's ``send`` is also this call's scheduling point (checkpoint before the
    syscall, yield after it); with no header, an explicit checkpoint takes its place.
    """
    view = memoryview(header)
    if not view:
        await trio.lowlevel.checkpoint()
    while view:
        sent = await sock.send(view, MSG_MORE)
        view = view[sent:]


async def _sendfile_all(
    sock: trio.socket.SocketType, sock_fd: int, fd: int, offset: int, count: int, max_call: int
) -> None:
    end = offset + count
    since_yield = 0
    while offset < end:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            sent = os.sendfile(sock_fd, fd, offset, min(end - offset, max_call))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            since_yield = 0
            continue
        if sent == 0:
            raise ShortFileError(
                f"file ended at {offset}, before the {end - offset} more bytes announced"
            )
        offset += sent
        since_yield += sent
        if since_yield >= YIELD_BYTES and offset < end:
            await trio.lowlevel.cancel_shielded_checkpoint()
            since_yield = 0


async def _copy_all(
    sock: trio.socket.SocketType,
    sock_fd: int,
    fd: int,
    offset: int,
    count: int,
    header: bytes,
    max_call: int,
    buffer: bytearray | None,
) -> None:
    """preadv + write. The header shares the first write; ``buffer`` is used if it is
    longer than the header (``len(header) + max_call`` lets every write carry a full
    ``max_call`` of data), else one is allocated for this call. The call's scheduling
    point is the caller's, after the last write (a range that fits one write leaves
    at once)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    head = len(header)
    if buffer is None or len(buffer) <= head:
        buffer = bytearray(head + min(max_call, count))
    view = memoryview(buffer)
    view[:head] = header
    fill = head
    end = offset + count
    since_yield = 0
    try:
        while True:
            want = min(len(view) - fill, max_call, end - offset)
            if want:
                got = _pread_into(fd, view[fill : fill + want], offset)
                if got == 0:
                    raise ShortFileError(
                        f"file ended at {offset}, before the {end - offset} more bytes announced"
                    )
                offset += got
                fill += got
            sent = 0
            while sent < fill:
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    sent += os.write(sock_fd, view[sent:fill])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    since_yield = 0
            since_yield += fill
            fill = 0
            if offset >= end:
                break
            if since_yield >= YIELD_BYTES:
                await trio.lowlevel.cancel_shielded_checkpoint()
                since_yield = 0
    finally:
        view.release()


async def _copy_all_tls(
    sock: TlsSocket,
    fd: int,
    offset: int,
    count: int,
    header: bytes,
    max_call: int,
    buffer: bytearray | None,
) -> None:
    """The copy path over TLS: ``preadv`` into ``buffer``, each fill sent (encrypted)
    by the TLS stream; the header shares the first send."""
    head = len(header)
    if buffer is None or len(buffer) <= head:
        buffer = bytearray(head + min(max_call, count))
    view = memoryview(buffer)
    view[:head] = header
    fill = head
    end = offset + count
    try:
        while True:
            want = min(len(view) - fill, max_call, end - offset)
            if want:
                got = _pread_into(fd, view[fill : fill + want], offset)
                if got == 0:
                    raise ShortFileError(
                        f"file ended at {offset}, before the {end - offset} more bytes announced"
                    )
                offset += got
                fill += got
            await sock.send(view[:fill])  # a checkpoint: cancellable, yields
            fill = 0
            if offset >= end:
                return
    finally:
        view.release()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if _HAVE_PREADV:
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


# ---- receiving -------------------------------------------------------------------------------


async def recv_exactly_into(sock: trio.socket.SocketType, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; return the bytes read, fewer only if the stream ended.

    Reads go straight into ``view`` (``readv`` on the socket's fd is ``recv_into``
    without the scheduler round trip trio's wrapper adds to every call; the loop
    yields on ``EAGAIN`` and every :data:`YIELD_BYTES` instead). Over TLS the bytes
    come through the TLS stream.
    """
    if isinstance(sock, TlsSocket):
        return await _recv_exactly_into_tls(sock, view)
    sock_fd = sock.fileno()
    total = len(view)
    got = 0
    since_yield = 0
    while got < total:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            n = os.readv(sock_fd, [view[got:]])
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            since_yield = 0
            continue
        if n == 0:
            return got
        got += n
        since_yield += n
        if since_yield >= YIELD_BYTES and got < total:
            await trio.lowlevel.cancel_shielded_checkpoint()
            since_yield = 0
    return got


async def _recv_exactly_into_tls(sock: TlsSocket, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = await sock.recv_into(view[got:])
        if n == 0:
            return got
        got += n
    return got


async def receive_chunk_into(sock: trio.socket.SocketType, view: memoryview) -> ChunkHeader | None:
    """Read one chunk: its header, then its data straight into ``view[:header.length]``.

    Returns the header (the data is ``view[:header.length]``), or ``None`` if the
    stream ended cleanly between chunks. Raises :class:`TruncatedChunkError` if it
    ended inside one, :class:`ChunkHeaderError` for a bad header and
    :class:`ChunkTooLargeError` if the data would not fit ``view``. After any
    exception, including a cancellation, the position in the stream is lost and
    the connection must be closed.
    """
    raw = bytearray(HEADER_SIZE)
    got = await recv_exactly_into(sock, memoryview(raw))
    if got == 0:
        return None
    if got < HEADER_SIZE:
        raise TruncatedChunkError(f"stream ended after {got} of {HEADER_SIZE} header bytes")
    header = ChunkHeader.unpack(raw)
    if header.length > len(view):
        raise ChunkTooLargeError(
            f"chunk at offset {header.offset} has {header.length} bytes, "
            f"the receive buffer only {len(view)}"
        )
    got = await recv_exactly_into(sock, view[: header.length])
    if got < header.length:
        raise TruncatedChunkError(
            f"stream ended after {got} of {header.length} bytes of the chunk at {header.offset}"
        )
    return header


class ChunkReader:
    """Reads chunks from one socket through a buffer, so every chunk that arrived
    together is had from one ``readv``.

    The master writes a confirm frame, a chunk header and the chunk's data in one
    write; reading each of them exactly (:func:`receive_chunk_into`) cost the slave
    three ``readv`` calls per chunk, plus the one that finds nothing more. Here one
    ``readv`` takes all that is waiting (up to the buffer's free room) and the frames
    are cut out of it. A chunk's data stays where it was read (no copy) unless its
    frame does not fit after the bytes before it: then the unread part moves to the
    buffer's start first (at most one frame's worth).

    :meth:`buffered` says whether a whole frame is waiting already: the slave acks
    once none is, so the chunks of one read get one ack, and no ack waits for a read
    (it always goes out before the next one). One task owns a reader; :attr:`data`
    is valid until its next :meth:`next_chunk`.
    """

    def __init__(self, sock: trio.socket.SocketType, max_length: int) -> None:
        self._sock = sock
        self._buffer = bytearray(2 * HEADER_SIZE + max_length)
        self._view = memoryview(self._buffer)
        self._start = 0
        """Where the first unread byte is."""
        self._end = 0
        """Where the bytes read so far end."""
        self._unyielded = 0
        """Bytes read since this reader last let other tasks run."""
        self.max_length = max_length
        self.data = self._view[:0]
        """The data of the chunk :meth:`next_chunk` returned last."""

    def buffered(self) -> bool:
        """Whether a whole frame (header and data) waits in the buffer. It trusts the
        length field unchecked: the header itself is checked when :meth:`next_chunk`
        reads it (a bad one counts as buffered, and the caller acks what it applied
        before it on the error)."""
        got = self._end - self._start
        if got < HEADER_SIZE:
            return False
        (length,) = _LENGTH.unpack_from(self._buffer, self._start + _LENGTH_AT)
        return got >= HEADER_SIZE + length

    async def next_chunk(self) -> ChunkHeader | None:
        """The next chunk's header (its data in :attr:`data`), or ``None`` if the
        stream ended cleanly between chunks; the errors of :func:`receive_chunk_into`."""
        while True:
            got = self._end - self._start
            if got >= HEADER_SIZE:
                header = ChunkHeader.unpack(self._view[self._start : self._start + HEADER_SIZE])
                if header.length > self.max_length:
                    raise ChunkTooLargeError(
                        f"chunk at offset {header.offset} has {header.length} bytes, "
                        f"the receive buffer only {self.max_length}"
                    )
                frame = HEADER_SIZE + header.length
                if got >= frame:
                    first = self._start + HEADER_SIZE
                    self.data = self._view[first : first + header.length]
                    self._start += frame
                    return header
                if self._start + frame > len(self._buffer):
                    self._compact()
            elif self._start + HEADER_SIZE > len(self._buffer):
                self._compact()
            if not await self._fill():
                if got == 0:
                    return None
                raise TruncatedChunkError(
                    f"stream ended {got} bytes into a chunk (header and data)"
                )

    def _compact(self) -> None:
        got = self._end - self._start
        self._view[:got] = self._view[self._start : self._end]
        self._start, self._end = 0, got

    async def _fill(self) -> bool:
        """Read what is waiting into the free room (wait for something if nothing is);
        False once the stream ended."""
        if self._start == self._end:
            self._start = self._end = 0
        room = self._view[self._end :]
        sock = self._sock
        if isinstance(sock, TlsSocket):
            count = await sock.recv_into(room)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    count = os.readv(sock.fileno(), [room])
                    break
                except BlockingIOError:
                    self._unyielded = 0
                    await trio.lowlevel.wait_readable(sock)
            self._unyielded += count
            if self._unyielded >= YIELD_BYTES:  # a sender that never pauses: others run too
                self._unyielded = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
        self._end += count
        return count > 0
