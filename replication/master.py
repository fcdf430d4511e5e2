"""The master's side of replication: one :class:`HAConnection` per slave stream and the
:class:`HAService` that accepts slaves and keeps the confirm offset.

What consumers read up to is the *confirm offset*: the smallest ack among the
*in-sync* slaves (:mod:`replication.insync`), never moving back
(:func:`replication.state.next_confirm_offset`). What the master acknowledges to
producers is the *replicated offset*: the same rule, counted only while at least the
ack policy's ``min_insync_replicas`` slaves are in sync
(:meth:`HAService.require_in_sync`), so a slave dropping out after a write was admitted
never lets fewer acknowledge it. Liveness: the master sends an empty chunk when idle
for ``heartbeat_ms`` and drops a slave silent for ``peer_timeout_ms``.
The frames are :mod:`replication.wire`'s, the decisions :mod:`replication.state`'s.

Epochs are active when the service is given a non-empty history: a slave whose current
epoch is newer proves this master stale (:attr:`HAService.stale`, no reply, and
:meth:`HAService.wait_replicated` answers False from then on); otherwise the master
streams from what the two histories prove the slave shares
(:func:`replication.state.stream_start`), which the slave cuts to before the first chunk.

Nothing a peer says counts before it proved the cluster secret
(:mod:`replication.auth`, ``settings.cluster_secret``): a refused peer cannot make this
master stale, count for the confirm offset or replace a slave's connection. A secret
proves a peer belongs to the *cluster*, not which member it is: with a membership
(``peer_allowed``, the node wires etcd's member list of its group), a peer whose name is
not a member is refused at the handshake too, and a slave whose membership ends stops
counting for the confirm offset. The port
survives floods: at most :attr:`HAService.max_peers` connections (lowered to the
open-file limit), a handshake bounded by ``peer_timeout_ms``, and accept errors
(``EMFILE``) that back off instead of ending the service.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import attrs
import trio

from replication import hop_trace
from replication.auth import NO_PROOF, new_nonce, proof, proof_matches, transcript
from replication.epochs import EpochHistory, leader_is_stale
from replication.errors import leaves
from replication.insync import InSyncSet, InSyncWindow, SlaveLag
from replication.settings import ReplicationSettings
from replication.state import StreamRefused, StreamStart, next_confirm_offset, stream_start
from replication.tls import (
    HANDSHAKE_ERRORS,
    TlsSocket,
    certificate_names,
    handshake_failure,
    server_context,
)
from replication.transfer import (
    HEADER_SIZE,
    SMALL_RANGE_BYTES,
    ChunkHeader,
    TransferError,
    send_file_range,
)
from replication.wire import (
    CHUNK_CONFIRM,
    HA_VERSION,
    AckDecoder,
    AckKind,
    HAAuthError,
    HAProtocolError,
    OldVersionError,
    SlaveHello,
    epochs_text,
    pack_challenge,
    pack_handshake_refusal,
    pack_master_hello,
    pack_old_version_refusal,
    pack_proof,
    printable,
    read_proof_and_slave_hello,
    read_slave_challenge,
    send_all,
    set_no_delay,
    unpack_slave_hello,
)
from storage.backoff import Backoff
from storage.concurrency import lone_error_unwrapped
from storage.errors import OffsetOutOfRangeError
from storage.store import MessageStore
from storage.waiters import OffsetWaiters, WakeHandle

__all__ = ["HAConnection", "HAService", "LagReport", "MasterStatus", "lag_status", "warm_pages"]

log = logging.getLogger(__name__)

ACCEPT_BACKOFF_INITIAL_S = 0.01
ACCEPT_BACKOFF_MAX_S = 1.0
"""A failing accept (``EMFILE``) is retried after 10 ms, doubling up to a second."""
HA_FD_SHARE = 8
"""The HA peers may hold at most 1/8 of the descriptors left at start: they come out of
the reserve the client port leaves for the node's own files (128, see
``cluster/server/limits.py``), so a flood of both ports still leaves most of it."""
FDS_PER_PEER = 2
"""A peer's socket, and the segment its sender pins."""


def warm_pages(fd: int, file_offset: int, count: int, scratch: bytearray) -> None:
    """Blocking (run it in a worker thread): read ``count`` bytes of ``fd`` at
    ``file_offset`` into ``scratch`` so they are in the page cache before ``sendfile``.

    Why a thread read and not ``posix_fadvise(WILLNEED)``: the advice only queues a
    readahead the kernel may shrink, delay or drop, and ``sendfile`` (like ``pread`` on
    the copy path) then waits for the disk *on the event loop's thread*, stalling every
    client of the node for each cold page. A read in a worker thread is certain: the
    loop only ever sends cached pages. The price -- one copy into ``scratch`` -- is paid
    only for cold ranges (a sender more than ``cold_distance_bytes`` behind the log end,
    catching up from disk); the hot tail, written through the page cache moments ago,
    still goes out zero-copy.
    """
    view = memoryview(scratch)[:count]
    try:
        while view:
            got = os.preadv(fd, [view], file_offset)
            if got == 0:
                return  # short file: the send that follows reports it
            view = view[got:]
            file_offset += got
    finally:
        view.release()


class _SegmentPin:
    """The master's sender's own descriptor of the segment it streams from.

    Opened by path (in a worker thread), never borrowed from the store: retention may
    delete the segment and close the store's descriptor while a chunk is in flight, and
    a borrowed number could then be reused by another file, sending its bytes to the
    slave. An own descriptor keeps the deleted file's inode, and so its bytes, alive
    until the sender moves on. One sender task owns an instance.
    """

    def __init__(self) -> None:
        self.base = -1
        self.end = -1
        self.fd = -1

    def covers(self, offset: int) -> bool:
        """Whether the pinned segment holds ``offset`` (deleted or not)."""
        return self.base <= offset < self.end

    async def pin(self, base: int, end: int, path: Path) -> int:
        """Pin the segment ``[base, end)`` at ``path``; return its descriptor."""
        self.close()
        try:
            self.fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise HAProtocolError(
                f"segment {path.name} was deleted (retention) before it could be "
                "streamed: the slave resyncs from the log start on its next connection"
            ) from exc
        self.base, self.end = base, end
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.base, self.end = -1, -1, -1

    def __enter__(self) -> _SegmentPin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _open_fds() -> int:
    """Descriptors this process has open now (0 where the OS does not tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


ACK_READS_PER_YIELD = 16
"""An ack reader that always finds bytes waiting yields to the other tasks this often."""


def _receiver(sock: trio.socket.SocketType) -> Callable[[], Awaitable[bytes]]:
    """What the ack reader receives with: over plain TCP a ``read`` of the socket that
    parks only when nothing is waiting, with no scheduler pass after it (trio's
    ``recv`` has one, and the writes waiting on this ack would wait for it too);
    over TLS the TLS stream's ``recv``."""
    if isinstance(sock, TlsSocket):
        return partial(sock.recv, 4096)
    fd = sock.fileno()
    unyielded = 0

    async def receive() -> bytes:
        nonlocal unyielded
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                unyielded = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            unyielded += 1
            if unyielded >= ACK_READS_PER_YIELD:
                unyielded = 0
                await trio.lowlevel.checkpoint()
            return data

    return receive


def _confirm_frame(confirm: int) -> bytes:
    return ChunkHeader(offset=confirm, length=0, flags=CHUNK_CONFIRM).pack()


def _address_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class _StaleMaster(Exception):
    """Fails the confirm-offset waiters once the master is stale (turned into False)."""


class _HAStopped(_StaleMaster):
    """Fails the confirm-offset waiters once :meth:`HAService.serve` has ended (a
    coordinated master that stepped down closed its HA port): turned into False."""


@attrs.frozen
class LagReport:
    """The connected slaves split by the in-sync decision, each with its lag."""

    in_sync: tuple[SlaveLag, ...]
    out_of_sync: tuple[SlaveLag, ...]


def lag_status(lags: list[SlaveLag]) -> LagReport:
    """Split ``lags`` (as :meth:`HAService.slave_lags` gives them) by ``in_sync``."""
    return LagReport(
        in_sync=tuple(lag for lag in lags if lag.in_sync),
        out_of_sync=tuple(lag for lag in lags if not lag.in_sync),
    )


@attrs.frozen
class MasterStatus:
    """The master's replication state, typed; the node turns it into the wire dict."""

    epoch: int | None
    epoch_start: int | None
    log_max_offset: int
    confirm_offset: int
    slaves: dict[str, int]
    lags: LagReport
    stale: str | None
    auth: str = "none"
    """``cluster_secret`` when peers must prove the secret, ``none`` when the port is open."""
    auth_refusals: int = 0
    """Peers refused by the handshake (no or another secret, older version) since start."""
    last_auth_refusal: str | None = None
    """The newest of them: the peer's address, the name it claimed and why."""


class HAConnection:
    """The master's end of one slave's stream: sends the log from where the slave stands,
    reads its acks.

    Invariants: ``ack_offset <= send_offset`` (a slave cannot ack what was not sent; a
    frame that tries closes the connection) and ``ack_offset`` never moves back. One
    task (:meth:`_stream`) writes to the socket, one (:meth:`_read_acks`) reads it;
    both run inside :meth:`run`, and :attr:`cancel_scope` may be cancelled from any
    task (the service does so when the slave reconnects under the same name).
    """

    def __init__(
        self,
        store: MessageStore,
        settings: ReplicationSettings,
        *,
        history: EpochHistory | None = None,
        on_hello: Callable[[HAConnection], None] | None = None,
        on_ack: Callable[[str, int], None] | None = None,
        on_stale: Callable[[str], None] | None = None,
        confirm_source: Callable[[], int] = lambda: 0,
        master_name: str = "master",
        peer_allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        self.peer_allowed = peer_allowed
        """Whether a slave of that name is a member (None: every authenticated peer is)."""
        self.master_name = master_name
        """This master's name in the handshake (covered by the proofs, logged by slaves)."""
        self.claimed_name: str | None = None
        """The name the peer's challenge gave, made printable (not proven: for logs only)."""
        self.settings = settings
        self.confirm_source = confirm_source
        """The master's confirm offset now: the stream carries it to the slave."""
        self.history = history
        """The master's epoch history (shared with the node, read at each hello); None
        turns every epoch check off."""
        self.on_hello = on_hello
        self.on_ack = on_ack
        self.on_stale = on_stale
        """Called with the reason when a slave proves this master stale."""
        self.name: str | None = None
        self.send_offset = -1
        self.ack_offset = -1
        self.cancel_scope = trio.CancelScope()
        copied = settings.max_chunk
        if settings.use_sendfile:  # only small ranges are copied (one write, see transfer)
            copied = min(copied, SMALL_RANGE_BYTES)
        self._buffer = bytearray(2 * HEADER_SIZE + copied)
        """Room for a confirm frame and a chunk header ahead of the data copied."""
        self._push_limit = min(copied, SMALL_RANGE_BYTES)
        """The most bytes :meth:`arrived` writes itself (more: the sender's turn)."""
        self._warm_buffer = bytearray(settings.max_chunk)
        self._confirm_delay_s = settings.confirm_delay_ms / 1000
        self._confirm_due = -math.inf
        """When the confirm offset the slave has not heard yet goes out on its own (inf:
        it has heard the current one; at first: at once)."""
        self._parked: trio.CancelScope | None = None
        """The scope the caught-up sender is parked in, while it is and nobody woke it
        (cleared by the wake-up: the appends after it in the same pass return at once)."""
        self._parked_until = math.inf
        """Its deadline without a pending confirm: the heartbeat's or the poll's."""
        self._parked_task: trio.lowlevel.Task | None = None
        """The parked sender's task, for :meth:`_wake_sender` (no Event per park)."""
        self._sock: trio.socket.SocketType | None = None
        """The slave's socket once the stream runs (for :meth:`arrived`'s direct send)."""
        self._sent_confirm = -1
        """The confirm offset the slave was last sent."""
        self._last_sent = -math.inf
        """When the stream last sent anything (the heartbeat counts silence from here)."""
        self._tail = b""
        """The rest of a frame :meth:`arrived` could not write whole: it goes out first."""
        self._heard_at = math.inf
        """When the ack reader began waiting for the slave's next bytes."""

    async def run(self, sock: trio.socket.SocketType) -> None:
        """Serve one slave until it goes away or the stream breaks. The caller closes
        ``sock`` afterwards (a failed chunk send leaves it unusable anyway)."""
        with self.cancel_scope:
            timeout_ms = self.settings.peer_timeout_ms
            handshake: tuple[SlaveHello, bytes] | None = None
            with trio.move_on_after(timeout_ms / 1000):
                handshake = await self._authenticate(sock)
            if handshake is None:
                raise HAProtocolError(
                    f"no authenticated slave hello within {timeout_ms:.0f} ms"
                    + (f" (peer named itself {self.claimed_name})" if self.claimed_name else "")
                )
            hello, transcript_bytes = handshake
            end = self.store.commit_log.max_offset
            stale = self._stale_reason(hello)
            if stale is not None:
                # No reply: a stale master must not hand its history to a slave that
                # already follows a newer one.
                log.error("ha_refused_stale %s", stale)
                if self.on_stale is not None:
                    self.on_stale(stale)
                return
            start = self._start(hello, end)
            self.name = hello.name
            self.send_offset = self.ack_offset = start.offset
            # Registered before the reply: once the slave hears back, it counts for the
            # confirm offset (with what it already holds) and replaced any older connection.
            if self.on_hello is not None:
                self.on_hello(self)
            if self.on_ack is not None:
                self.on_ack(hello.name, start.offset)
            master_hello = pack_master_hello(end, start.offset, self.history)
            secret = self.settings.cluster_secret
            mine = (
                NO_PROOF
                if secret is None
                else proof(secret, "master", transcript_bytes, master_hello)
            )
            await send_all(sock, pack_proof(mine) + master_hello)
            log.info(
                "ha_slave_connected slave=%s slave_offset=%d stream_from=%d master_offset=%d",
                hello.name,
                hello.max_offset,
                start.offset,
                end,
            )
            with lone_error_unwrapped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_acks, sock, nursery.cancel_scope)
                    try:
                        await self._stream(sock)
                    finally:
                        self._sock = None

    async def _authenticate(self, sock: trio.socket.SocketType) -> tuple[SlaveHello, bytes]:
        """The handshake up to a hello this master may believe: the slave's challenge,
        ours, then the slave's proof over both and over its hello, checked before the
        hello is parsed into anything that decides. Returns the hello and the
        transcript (our proof covers it too). A peer that fails is told why (a refusal
        frame) and :class:`HAAuthError` ends the connection."""
        secret = self.settings.cluster_secret
        try:
            challenge = await read_slave_challenge(sock)
        except OldVersionError:
            await send_all(sock, pack_old_version_refusal())
            raise
        self.claimed_name = claimed = printable(challenge.name)
        if secret is not None and not challenge.authenticated:
            await self._refuse(
                sock,
                f"slave {claimed} has no cluster secret and this master requires "
                "one: set the same [replication] cluster_secret (or cluster_secret_file, "
                "or TIDELOG_REPLICATION_CLUSTER_SECRET) on every node",
            )
        if secret is None and challenge.authenticated:
            log.warning(
                "ha_auth_mismatch slave=%s: the slave holds a cluster secret and this master "
                "none, so the slave will refuse it: set the same cluster_secret here",
                claimed,
            )
        nonce = new_nonce()
        await send_all(
            sock, pack_challenge(self.master_name, nonce, secret is not None, master=True)
        )
        theirs, raw_hello = await read_proof_and_slave_hello(sock)
        handshake = transcript(HA_VERSION, challenge.nonce, nonce, challenge.name, self.master_name)
        if secret is not None and not proof_matches(secret, "slave", handshake, raw_hello, theirs):
            await self._refuse(
                sock,
                f"authentication failed: the proof of slave {claimed} does not match "
                "this master's cluster secret (the secrets differ): set the same "
                "cluster_secret on master and slaves",
            )
        hello = unpack_slave_hello(raw_hello)
        if hello.name != challenge.name:
            await self._refuse(
                sock, f"the hello names {hello.name!r}, the challenge {challenge.name!r} (refused)"
            )
        if self.settings.tls_peer_names and isinstance(sock, TlsSocket):
            names = certificate_names(sock.peer_certificate)
            if hello.name not in names:
                await self._refuse(
                    sock,
                    f"slave {claimed}'s certificate names {', '.join(sorted(names)) or 'nobody'}"
                    f", not {claimed}: give each node a certificate naming it (common name or "
                    "DNS subject alternative name), or turn tls_peer_names off",
                )
        if self.peer_allowed is not None and not self.peer_allowed(hello.name):
            # Before the stale check: a non-member's epoch claim must not stop writes.
            await self._refuse(
                sock,
                f"slave {claimed} is not a member of this master's group (the cluster's "
                "membership, etcd, has no such node): start it with the same [coordination] "
                "etcd, cluster and group, or remove what runs under this name",
            )
        return hello, handshake

    async def _refuse(self, sock: trio.socket.SocketType, reason: str) -> NoReturn:
        """Tell the peer why (best effort, bounded), then end with :class:`HAAuthError`."""
        with trio.move_on_after(self.settings.heartbeat_ms / 1000), contextlib.suppress(OSError):
            await send_all(sock, pack_handshake_refusal(reason))
        raise HAAuthError(reason)

    def _stale_reason(self, hello: SlaveHello) -> str | None:
        """Why this master is stale, judging by the slave's history; None if it is not
        (or if this master runs without epochs)."""
        if self.history is None or not leader_is_stale(hello.followed_epoch, self.history):
            return None
        mine = self.history.current
        return (
            f"reason=slave_epoch_newer slave={hello.name} slave_epoch={hello.followed_epoch} "
            f"slave_epochs={epochs_text(hello.epochs)} "
            f"master_epoch={mine.epoch if mine is not None else None}"
        )

    def _start(self, hello: SlaveHello, end: int) -> StreamStart:
        """Where the stream starts (:func:`replication.state.stream_start`), logged."""
        history = self.history if self.history is not None else EpochHistory()
        log_start = self.store.commit_log.min_offset
        try:
            start = stream_start(
                hello.name, hello.history, hello.max_offset, history, log_start, end
            )
        except StreamRefused as exc:
            raise HAProtocolError(str(exc)) from exc
        if start.resync:
            log.warning(
                "ha_slave_resync slave=%s slave_offset=%d stream_from=%d reason=%s",
                hello.name,
                hello.max_offset,
                start.offset,
                "behind_master_log_start" if not start.diverged else "tail_not_provable",
            )
        elif start.diverged:
            log.warning(
                "ha_slave_diverged slave=%s slave_offset=%d truncate_to=%d "
                "slave_epochs=%s master_epochs=%s",
                hello.name,
                hello.max_offset,
                start.offset,
                epochs_text(hello.epochs),
                epochs_text(history.entries),
            )
        return start

    def confirm_moved(self, now: float | None = None) -> None:
        """The confirm offset moved (any task of the loop; ``now``: the time, if the
        caller read it already): the slave hears it with the next chunk, or in a confirm
        frame of its own once ``confirm_delay_ms`` passed without one. The sender is not
        woken for it: the write that moved it gets its answer first, and a stream busy
        with chunks carries every confirm for free."""
        if self._confirm_due == math.inf:
            if now is None:
                now = trio.current_time()
            self._confirm_due = due = now + self._confirm_delay_s
            parked = self._parked
            if parked is not None and due < parked.deadline:
                parked.deadline = due

    def arrived(self) -> None:
        """The log grew (the service calls this from the appending task, after the
        dispatch, with no await). A parked sender whose slave acked everything sent
        (nothing in flight: a lone write, not a stream of them) gets the new bytes
        written to the slave from here, at once, with no task woken; otherwise the
        sender wakes and sends them in its next turn, together with whatever else was
        appended by then (under load, one chunk for many writes)."""
        if self._parked is None:
            return  # the sender runs: it reads the log end before it parks again
        if hop_trace.enabled:
            hop_trace.record("m.arrival", self.store.commit_log.max_offset)
        if self.send_offset == self.ack_offset and not self._tail and self._send_now():
            return
        self._wake_sender()

    def _wake_sender(self) -> None:
        """Reschedule the parked sender (once: later arrivals see it unparked)."""
        self._parked = None
        task, self._parked_task = self._parked_task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _send_now(self) -> bool:
        """Write the bytes past :attr:`send_offset` (and a moved confirm offset ahead of
        them) to the slave in one non-blocking ``writev`` straight from the active
        segment's map; False when they are not one small range of it or the socket
        takes nothing (the sender does it then). Only while the sender is parked: it is
        the one other writer, and a frame the socket took in part is finished by it
        (:attr:`_tail`) before anything else. The active segment is never deleted nor
        unmapped under a live log, and nothing awaits while its view is held."""
        sock = self._sock
        offset = self.send_offset
        commit_log = self.store.commit_log
        count = commit_log.max_offset - offset
        if sock is None or isinstance(sock, TlsSocket) or not 0 < count <= self._push_limit:
            return False
        segment = commit_log.files.last
        if segment is None or offset < segment.base:  # begins in an earlier segment
            return False
        confirm = self.confirm_source()
        head = ChunkHeader(offset=offset, length=count).pack()
        if confirm != self._sent_confirm:
            head = _confirm_frame(confirm) + head
        pos = offset - segment.base
        with segment.view[pos : pos + count] as data:
            if hop_trace.enabled:
                hop_trace.record(f"m.send:{self.name}", offset + count)
            try:
                written = os.writev(sock.fileno(), [head, data])
            except OSError:  # EAGAIN, or a broken socket the sender's next send reports
                return False
            if hop_trace.enabled:
                hop_trace.record(f"m.sent:{self.name}", offset + count)
            if written < len(head) + count:
                self._tail = (head + bytes(data))[written:]
                self._wake_sender()
        self.send_offset = offset + count
        if confirm != self._sent_confirm:
            self._sent_confirm, self._confirm_due = confirm, math.inf
            parked = self._parked
            if parked is not None:  # no wake-up at the due time for a confirm sent now
                parked.deadline = self._parked_until
        self._last_sent = trio.current_time()
        return True

    async def _idle(self, until: float) -> None:
        """Park the caught-up sender until the log grows (:meth:`arrived`, called by the
        append itself, no relay in between), ``until``, a pending confirm's due time or
        the poll interval (a net: the service's hook on the dispatcher is what wakes)."""
        poll_s = self.settings.poll_interval_ms / 1000
        self._parked_until = min(until, trio.current_time() + poll_s)
        with trio.move_on_at(min(self._parked_until, self._confirm_due)) as parked:
            self._parked = parked
            self._parked_task = trio.lowlevel.current_task()
            try:
                await trio.lowlevel.wait_task_rescheduled(self._unpark)
            finally:
                self._parked = self._parked_task = None

    def _unpark(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        """The park's deadline passed (or the stream is cancelled): no wake-up is due."""
        self._parked_task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _stream(self, sock: trio.socket.SocketType) -> None:
        """Send committed bytes forever: one chunk per turn, within one segment and below
        the log end; the confirm offset ahead of the next chunk whenever it moved (or on
        its own, see :meth:`confirm_moved`); park when caught up, and send an empty chunk
        (the heartbeat) after ``heartbeat_ms`` without one.

        A confirm frame with a chunk to follow goes out in the chunk's own write (one
        syscall, not two: under pipelined writes nearly every chunk has one before it).

        Every byte goes out by this task (one sender on the socket, the transfer
        module's rule)."""
        heartbeat_s = self.settings.heartbeat_ms / 1000
        self._last_sent = trio.current_time()
        self._sent_confirm = -1
        self._sock = sock
        unyielded = False  # a chunk went out with no checkpoint after it (see transfer)
        with _SegmentPin() as pin:
            while True:
                if self._tail:  # the rest of a frame arrived() sent in part
                    tail, self._tail = self._tail, b""
                    await send_all(sock, tail)
                    unyielded = False
                    continue
                confirm = self.confirm_source()
                end = self.store.commit_log.max_offset
                offset = self.send_offset
                if offset < end and unyielded:  # the last send had no scheduling point
                    await trio.lowlevel.checkpoint()
                    unyielded = False
                    continue
                if offset < end:
                    confirm_frame = b""
                    if confirm != self._sent_confirm:
                        confirm_frame = _confirm_frame(confirm)
                        self._sent_confirm, self._confirm_due = confirm, math.inf
                    await self._send_chunk(sock, pin, offset, end, confirm_frame)
                    unyielded = True
                elif confirm != self._sent_confirm and trio.current_time() >= self._confirm_due:
                    self._sent_confirm, self._confirm_due = confirm, math.inf
                    await send_all(sock, _confirm_frame(confirm))
                    unyielded = False
                elif trio.current_time() >= self._last_sent + heartbeat_s:
                    await send_all(sock, ChunkHeader(offset=offset, length=0).pack())
                    unyielded = False
                else:
                    await self._idle(self._last_sent + heartbeat_s)
                    unyielded = False
                    continue
                self._last_sent = trio.current_time()

    async def _send_chunk(
        self,
        sock: trio.socket.SocketType,
        pin: _SegmentPin,
        offset: int,
        end: int,
        before: bytes = b"",
    ) -> None:
        """One chunk from ``offset``: within one segment, below ``end``; ``before`` (whole
        frames) goes out ahead of its header in the same send."""
        settings = self.settings
        if not pin.covers(offset):
            try:
                segment = self.store.commit_log.files.find(offset)  # at a full end: the next
            except OffsetOutOfRangeError as exc:
                raise HAProtocolError(
                    f"slave {self.name} at {offset} is behind the master's log start now "
                    f"(retention): it resyncs from the log start on its next connection ({exc})"
                ) from exc
            await pin.pin(segment.base, segment.end, segment.path)
        fd = pin.fd
        count = min(pin.end, end, offset + settings.max_chunk) - offset
        file_offset = offset - pin.base
        if end - offset > settings.cold_distance_bytes:
            await trio.to_thread.run_sync(warm_pages, fd, file_offset, count, self._warm_buffer)
        header = before + ChunkHeader(offset=offset, length=count).pack()
        if hop_trace.enabled:
            hop_trace.record(f"m.send:{self.name}", offset + count)
        # Before the send: its bytes leave before it returns (it yields after the write),
        # and the slave's ack of them may be read first. A send that fails ends the
        # connection, so this never counts bytes a live stream did not carry.
        self.send_offset = offset + count
        await send_file_range(
            sock,
            fd,
            file_offset,
            count,
            header,
            use_sendfile=settings.use_sendfile,
            max_call=settings.max_chunk,
            buffer=self._buffer,
            checkpoint=False,  # the stream parks or checkpoints before its next send
        )
        if hop_trace.enabled:
            hop_trace.record(f"m.sent:{self.name}", offset + count)

    async def _read_acks(self, sock: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        """Record acks until the slave closes its side (then end the whole connection) or
        stays silent for ``peer_timeout_ms`` (raise: the slave is gone or stuck). Every
        frame, a heartbeat repeating the last offset too, reaches ``on_ack``: the
        in-sync set needs to hear that the slave is alive."""
        decoder = AckDecoder()
        with lone_error_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_silence)
                await self._record_acks(sock, decoder, scope)
                nursery.cancel_scope.cancel()

    async def _watch_silence(self) -> None:
        """Raise :class:`HAProtocolError` once the slave sent nothing for
        ``peer_timeout_ms`` (the reader notes each receive in :attr:`_heard_at`: a time
        read per receive, where a deadline scope per receive cost several us)."""
        timeout_ms = self.settings.peer_timeout_ms
        while True:
            if self._heard_at == math.inf:  # the reader has not started: look again later
                await trio.sleep(timeout_ms / 1000)
                continue
            due = self._heard_at + timeout_ms / 1000
            if trio.current_time() >= due:
                raise HAProtocolError(
                    f"slave {self.name} sent nothing for {timeout_ms:.0f} ms "
                    f"(ack_offset {self.ack_offset}): dropping it"
                )
            await trio.sleep_until(due)

    async def _record_acks(
        self, sock: trio.socket.SocketType, decoder: AckDecoder, scope: trio.CancelScope
    ) -> None:
        receive = _receiver(sock)
        while True:
            self._heard_at = trio.current_time()
            data = await receive()
            if not data:
                if decoder.buffered:
                    raise HAProtocolError(f"stream ended inside an ack ({decoder.buffered} B)")
                log.info("ha_slave_closed slave=%s ack_offset=%d", self.name, self.ack_offset)
                scope.cancel()
                return
            for frame in decoder.feed(data):
                if frame.kind is AckKind.REFUSED:
                    raise HAProtocolError(
                        f"slave {self.name} refused the stream at {frame.offset}: it could "
                        "not apply the bytes sent there (its log says why)"
                    )
                self._on_ack_frame(frame.offset)

    def _on_ack_frame(self, offset: int) -> None:
        if offset > self.send_offset:
            raise HAProtocolError(
                f"slave {self.name} acked {offset}, past what was sent ({self.send_offset})"
            )
        if offset >= self.ack_offset:
            if hop_trace.enabled and offset > self.ack_offset:
                hop_trace.record(f"m.acked:{self.name}", offset)
            self.ack_offset = offset
            if self.on_ack is not None:
                assert self.name is not None
                self.on_ack(self.name, offset)


class HAService:
    """The master's replication endpoint: accepts slaves, one :class:`HAConnection` each,
    and keeps the confirm offset for producers waiting on replication.

    Invariants: :attr:`confirm_offset` and :attr:`replicated_offset` never move back
    (asserted at each update), and the replicated offset never passes the confirm
    offset; every advance of the replicated offset was acknowledged by at least
    :attr:`min_insync_replicas` in-sync slaves; once
    :attr:`stale` is set it stays and no wait answers True again. A slave name is its
    identity: a slave that reconnects under the same name replaces its old connection.

    Concurrency: all methods run in the one trio thread. :meth:`serve` runs the
    listener, one task per connection, the deadline timer and the in-sync watcher (the
    set changes with time as well as with acks); :meth:`wait_replicated` may be called
    from any number of tasks, the read-only accessors from anywhere.
    """

    def __init__(
        self,
        store: MessageStore,
        settings: ReplicationSettings | None = None,
        *,
        history: EpochHistory | None = None,
        name: str = "master",
        peer_allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        self.name = name
        """This master's name in the handshake."""
        self.peer_allowed = peer_allowed
        """The membership: whether a slave of that name belongs to this master's group,
        asked at every handshake and every in-sync judgement (so it must be cheap and
        not block). None: every peer that proves the cluster secret is a member."""
        self.settings = settings = settings if settings is not None else ReplicationSettings()
        self.auth_refusals = 0
        self.last_auth_refusal: str | None = None
        self.accept_failures = 0
        """Accepts that failed (``EMFILE`` and the like) since start."""
        self.peers_refused = 0
        """Connections closed on arrival because :attr:`max_peers` were open."""
        self.max_peers = settings.max_peers
        """The peer cap in force (the setting, lowered to the open-file limit at start)."""
        self._peers = 0
        self.insync = InSyncSet(settings.max_lag_bytes, settings.max_lag_ms)
        self._in_sync_window: InSyncWindow | None = None
        """The last :meth:`in_sync_count` and the ends and times it stands for, until
        the set changes (see :meth:`in_sync_count`)."""
        self.insync.observers.append(self._forget_in_sync_window)
        self._in_sync_names: frozenset[str] = frozenset()
        self._membership_changed = trio.Event()
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
        self._tls_context: ssl.SSLContext | None = None
        """Built from ``settings.tls`` when :meth:`serve` starts (None: plain TCP)."""
        self._confirm = 0
        """The confirm offset (consumers' read limit)."""
        self.min_insync_replicas = 1
        """In-sync slaves an advance of the replicated offset needs (see
        :meth:`require_in_sync`)."""
        self._replicated = OffsetWaiters()
        """The replicated offset, with the writes waiting for it."""
        self._replicated.advance(0)  # an empty prefix is always replicated
        self._fsync_first = False
        """An ``acks=replicated`` write was admitted: fsync before sending its append."""
        self.on_confirm_moved: Callable[[], None] | None = None
        """Called after each advance of :attr:`confirm_offset` (the node wakes the long
        polls that waited for the read limit to cover their next record). Must not block."""

    @property
    def confirm_offset(self) -> int:
        """Every byte below it was acknowledged by every slave in sync when it was."""
        return self._confirm

    @property
    def replicated_offset(self) -> int:
        """Every byte below it was acknowledged by every slave in sync when it was, and
        those were at least :attr:`min_insync_replicas`: what releases acks."""
        return self._replicated.position

    def require_in_sync(self, min_insync_replicas: int) -> None:
        """Have the replicated offset (and so every ack that waits for it) advance only
        while at least ``min_insync_replicas`` slaves are in sync. The ack policy sets
        it (its ``min_insync_replicas``, which with etcd is the group's recorded one)."""
        if min_insync_replicas < 1:
            raise ValueError(f"min_insync_replicas must be at least 1, got {min_insync_replicas}")
        self.min_insync_replicas = min_insync_replicas

    def in_sync_slaves(self) -> dict[str, int]:
        """The in-sync slaves' ack offsets, by name, judged now; only members count."""
        return self._in_sync_at(self.store.commit_log.max_offset, trio.current_time())

    def _in_sync_at(self, end: int, now: float) -> dict[str, int]:
        """:meth:`in_sync_slaves` judged at the log end ``end`` and the time ``now``."""
        in_sync = self.insync.in_sync(end, now)
        allowed = self.peer_allowed
        if allowed is None:
            return in_sync
        return {name: offset for name, offset in in_sync.items() if allowed(name)}

    def in_sync_count(self) -> int:
        """``len(in_sync_slaves())``, judged now, without building the dict (the
        ``acks=in_sync``/``replicated`` admit asks it on every write).

        Answered from the last judgement while its :class:`InSyncWindow` covers the log
        end and the time (no slave added, acked or removed since: those forget it), so
        a write costs two comparisons, not a pass over the slaves. Not with a
        membership (``peer_allowed``): that may change with no event here."""
        end, now = self.store.commit_log.max_offset, trio.current_time()
        allowed = self.peer_allowed
        if allowed is not None:
            return self.insync.count_in_sync(end, now, allowed)
        window = self._in_sync_window
        if window is None or not window.holds(end, now):
            window = self._in_sync_window = self.insync.count_window(end, now)
        return window.count

    def _forget_in_sync_window(self) -> None:
        self._in_sync_window = None

    async def wait_membership_change(self) -> frozenset[str]:
        """Park until a slave joins or leaves the in-sync set; return the new set's
        names. Lets a caller (a test, a monitor) react to a change without polling."""
        await self._membership_changed.wait()
        return self._in_sync_names

    def slave_lags(self) -> list[SlaveLag]:
        """Every connected slave's lag in bytes and ms and whether it is in sync."""
        return self.insync.lags(self.store.commit_log.max_offset, trio.current_time())

    def replicated_now(self, offset: int) -> bool:
        """Whether :meth:`wait_replicated` would answer True at once: the replicated
        offset reached ``offset`` and this master is not stale (no scheduling point: the
        caller answers a satisfied write in the same pass)."""
        return self.stale is None and offset <= self._replicated.position

    def wake_when_replicated(
        self, task: trio.lowlevel.Task, offset: int, deadline: float
    ) -> WakeHandle | None:
        """Have ``task`` (parked by its own means) woken once the replicated offset
        reaches ``offset``, at ``deadline``, or when this master turns stale, as
        :meth:`wait_replicated` would wake it (see :meth:`OffsetWaiters.wake_task`);
        None when nothing was registered (stale, or reached already). Lets a connection's
        idle ack task be woken by the ack that releases its write, with no step of its
        own before (it would only park on :meth:`wait_replicated`)."""
        if self.stale is not None:
            return None
        return self._replicated.wake_task(task, offset, deadline)

    async def wait_replicated(self, offset: int, deadline: float = math.inf) -> bool:
        """True once the replicated offset reaches ``offset``; False at ``deadline`` (which
        needs :meth:`serve` running: it runs the deadline timer), and False at once
        when this master is :attr:`stale` (waits parked before that wake with False):
        a newer master exists, so what we replicate may be cut on every slave. Once
        :meth:`serve` has ended (no slave acks, no deadline timer) it answers False at
        once too, and so do the waits parked then."""
        if self.stale is not None:
            await trio.lowlevel.checkpoint()
            return False
        try:
            return await self._replicated.wait(offset, deadline)
        except _StaleMaster:
            return False

    def status(self) -> MasterStatus:
        """Replication state for ``tidelog status``: epoch, slaves, confirm offset and
        the stale reason (None while healthy)."""
        current = self.history.current if self.history is not None else None
        return MasterStatus(
            epoch=current.epoch if current is not None else None,
            epoch_start=current.start_offset if current is not None else None,
            log_max_offset=self.store.commit_log.max_offset,
            confirm_offset=self.confirm_offset,
            slaves=dict(self.ack_offsets),
            lags=lag_status(self.slave_lags()),
            stale=self.stale,
            auth="none" if self.settings.cluster_secret is None else "cluster_secret",
            auth_refusals=self.auth_refusals,
            last_auth_refusal=self.last_auth_refusal,
        )

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve slaves until cancelled; ``task_status.started`` gets the bound
        port (useful with port 0)."""
        tls = self.settings.tls
        if tls is not None:
            self._tls_context = await trio.to_thread.run_sync(
                lambda: server_context(tls, require_client_cert=True)
            )
        listener = trio.socket.socket()
        with listener:
            listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await listener.bind((host, port))
            listener.listen()
            bound = listener.getsockname()[1]
            log.info(
                "ha_listening host=%s port=%d tls=%s",
                host,
                bound,
                "mutual" if self._tls_context is not None else "none",
            )
            self._apply_fd_budget()
            if self.settings.cluster_secret is None and self._tls_context is None:
                log.warning(
                    "ha_unauthenticated host=%s port=%d: no cluster secret, so anyone who can "
                    "reach this port can pose as a slave (stop acks, confirm writes it never "
                    "stored): set [replication] cluster_secret or cluster_secret_file (the "
                    "same on every node) or mutual TLS (tls_cert_file, tls_key_file, "
                    "tls_ca_file), or keep the port on a network only the cluster reaches",
                    host,
                    bound,
                )
            dispatcher = self.store.dispatcher
            dispatcher.on_dispatched = self._appended
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._replicated.expire_deadlines)
                    nursery.start_soon(self._watch_in_sync)
                    task_status.started(bound)
                    await self._accept_loop(listener, nursery)
            finally:
                if dispatcher.on_dispatched == self._appended:
                    dispatcher.on_dispatched = None
                # No slave acknowledges from now on, and the deadline timer stopped with
                # this nursery: a replicated wait parked now (or later) would never end.
                self._replicated.fail(_HAStopped("this master's HA service stopped"))

    def fsync_before_next_send(self) -> None:
        """Have the next append's group commit start before its bytes go to the slaves
        (an ``acks=replicated`` write waits for both, and the fsync is the longer way)."""
        self._fsync_first = True

    def _appended(self) -> None:
        """The store dispatched new bytes (called from the appending task): every
        slave's stream hears of it at once, back to back (see :meth:`HAConnection.arrived`)."""
        if self._fsync_first:
            self._fsync_first = False
            self.store.group_commit.flush_now()
        for connection in self.connections.values():
            connection.arrived()

    def _apply_fd_budget(self) -> None:
        """Lower :attr:`max_peers` to what the open-file limit affords: each peer holds a
        socket and, while streaming, a segment descriptor."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        affordable = max(1, (soft - _open_fds()) // HA_FD_SHARE // FDS_PER_PEER)
        if affordable < self.max_peers:
            log.warning(
                "ha_max_peers_lowered configured=%d now=%d reason=%r",
                self.settings.max_peers,
                affordable,
                f"the open-file limit is {soft} (ulimit -n): raise it to hold "
                f"{self.settings.max_peers} replication peers",
            )
            self.max_peers = affordable

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Accept until cancelled. A failed accept (``EMFILE`` when descriptors run out)
        backs off and is logged once per burst: it never ends the node. A connection past
        :attr:`max_peers` is closed at once (logged once per burst too)."""
        backoff = Backoff(ACCEPT_BACKOFF_INITIAL_S, ACCEPT_BACKOFF_MAX_S)
        failures = refused = 0
        while True:
            try:
                sock, peer = await listener.accept()
            except OSError as exc:
                failures += 1
                self.accept_failures += 1
                if failures == 1:
                    log.error(
                        "ha_accept_failing error=%r peers=%d: backing off until it succeeds "
                        "(if it is EMFILE, raise ulimit -n)",
                        exc,
                        self._peers,
                    )
                await trio.sleep(backoff.next_delay_s())
                continue
            if failures:
                log.warning("ha_accept_recovered failures=%d", failures)
                failures = 0
                backoff.reset()
            if self._peers >= self.max_peers:
                sock.close()
                self.peers_refused += 1
                refused += 1
                if refused == 1:
                    log.warning(
                        "ha_peers_full max_peers=%d peer=%s: closing new replication "
                        "connections until one ends",
                        self.max_peers,
                        peer,
                    )
                continue
            if refused:
                log.info("ha_peers_accepting_again refused=%d", refused)
                refused = 0
            self._peers += 1
            nursery.start_soon(self._handle, sock, peer)

    async def _handle(self, sock: trio.socket.SocketType, peer: Any) -> None:
        try:
            await self._serve_peer(sock, peer)
        finally:
            self._peers -= 1

    async def _serve_peer(self, sock: trio.socket.SocketType, peer: Any) -> None:
        connection = HAConnection(
            self.store,
            self.settings,
            history=self.history,
            on_hello=self._register,
            on_ack=self._on_ack,
            on_stale=self._on_stale,
            confirm_source=lambda: self.confirm_offset,
            master_name=self.name,
            peer_allowed=self.peer_allowed,
        )
        with sock:
            # except*: a stream error can arrive grouped with the cancellation of a
            # replaced connection or of the whole service; the errors end here, the
            # cancellation goes on to its scope.
            try:
                set_no_delay(sock)
                await connection.run(await self._secure(sock))
            except* HAAuthError as group:
                reason = "; ".join(str(exc) for exc in leaves(group))
                self.auth_refusals += 1
                self.last_auth_refusal = (
                    f"peer={_address_text(peer)} claimed_name={connection.claimed_name} "
                    f"reason={reason}"
                )
                log.warning("ha_peer_refused %s", self.last_auth_refusal)
            except* (OSError, HAProtocolError, TransferError) as group:
                errors = ", ".join(repr(exc) for exc in leaves(group))
                log.warning(
                    "ha_connection_failed slave=%s peer=%s error=%s", connection.name, peer, errors
                )
            except* Exception as group:  # one slave's bug must not take the others' down
                log.error(
                    "ha_connection_crashed slave=%s peer=%s", connection.name, peer, exc_info=group
                )
            finally:
                self._unregister(connection)

    async def _secure(self, sock: trio.socket.SocketType) -> trio.socket.SocketType:
        """``sock`` itself without TLS; else the mutual-TLS socket over it, the handshake
        bounded by ``peer_timeout_ms``. A peer whose certificate the CA did not sign (or
        that has none, or speaks plain TCP) is refused with :class:`HAAuthError`."""
        if self._tls_context is None:
            return sock
        timeout_ms = self.settings.peer_timeout_ms
        try:
            with trio.fail_after(timeout_ms / 1000):
                return await TlsSocket.wrap(sock, self._tls_context, server_side=True)
        except trio.TooSlowError:
            raise HAAuthError(f"no TLS handshake within {timeout_ms:.0f} ms") from None
        except HANDSHAKE_ERRORS as exc:
            raise HAAuthError(
                f"TLS handshake failed: {handshake_failure(exc)}: every node needs a "
                "certificate signed by the cluster's CA ([replication] tls_cert_file, "
                "tls_key_file, tls_ca_file) and must use TLS on this port"
            ) from None

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
        self._replicated.fail(_StaleMaster(reason))

    def _on_ack(self, name: str, offset: int) -> None:
        end, now = self.store.commit_log.max_offset, trio.current_time()
        self.ack_offsets[name] = offset
        self.insync.ack(name, offset, end, now)
        self._update_confirm(end, now)

    def _update_confirm(self, end: int | None = None, now: float | None = None) -> None:
        """Advance the confirm and replicated offsets
        (:func:`~replication.state.next_confirm_offset`) and log membership changes;
        ``end`` and ``now`` (the log end and the time, read here when not given) are
        what the in-sync set is judged at. An ack's update reads each once for the
        whole of it."""
        if end is None:
            end = self.store.commit_log.max_offset
        if now is None:
            now = trio.current_time()
        in_sync = self._in_sync_at(end, now)
        if in_sync.keys() != self._in_sync_names:  # a set built only when it changed
            names = frozenset(in_sync)
            self._log_membership(names, in_sync)
            self._in_sync_names = names
            self._membership_changed.set()
            self._membership_changed = trio.Event()
        released = self._replicated.position
        replicated = next_confirm_offset(released, in_sync, self.min_insync_replicas)
        before = self._confirm
        after = next_confirm_offset(before, in_sync)
        assert after >= before, f"confirm offset moved back from {before} to {after}"
        assert after <= end or after == before, f"confirm offset {after} past the log end {end}"
        assert replicated <= after, f"replicated offset {replicated} past the confirm {after}"
        if replicated > released:
            if hop_trace.enabled:
                hop_trace.record("m.confirmed", replicated)
            self._replicated.advance(replicated)
        if after > before:
            self._confirm = after
            for connection in self.connections.values():
                connection.confirm_moved(now)  # the slaves' read limit follows it
            if self.on_confirm_moved is not None:
                self.on_confirm_moved()

    def _log_membership(self, names: frozenset[str], in_sync: dict[str, int]) -> None:
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

    async def _watch_in_sync(self) -> None:
        """Re-judge the set as time passes: dropping a silent laggard is what lets the
        confirm offset (and the writes waiting on it) move on without it."""
        while True:
            await trio.sleep(self.settings.check_interval_s)
            self._update_confirm()
