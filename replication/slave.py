"""The slave's side of replication: :class:`HAClient` follows one connection, and
:class:`SlaveReplication` is the follower's loop that reconnects with backoff, switches
masters (``repoint``) and stops cleanly (``promote``).

Before the first chunk the slave carries out :func:`replication.state.follow_plan`: it
cuts a tail the master's history rules out (log first, then history) and then adopts the
master's newer epochs, each once its log reaches the epoch's start (so its history never
names a term it holds no place in, and a later promotion appends an epoch that starts at
or after every adopted one). Liveness: the slave re-sends its ack every
``heartbeat_ms`` and gives a master silent for ``peer_timeout_ms`` up. With a cluster
secret, a master is believed only once it proved the same secret
(:func:`replication.wire.slave_handshake`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
from collections.abc import Callable

import attrs
import trio

from replication import hop_trace
from replication.epochs import EpochEntry, EpochFile, EpochHistory, EpochHistoryError
from replication.errors import leaves
from replication.settings import ReplicationSettings
from replication.state import FollowPlan, follow_plan
from replication.tls import HANDSHAKE_ERRORS, TlsSocket, client_context, handshake_failure
from replication.transfer import ChunkReader, TransferError
from replication.wire import (
    CHUNK_CONFIRM,
    HAAuthError,
    HAProtocolError,
    MasterHello,
    NotAnHAPortError,
    epochs_text,
    pack_ack,
    pack_refusal,
    send_all,
    set_no_delay,
    slave_handshake,
)
from storage.backoff import Backoff
from storage.concurrency import lone_error_unwrapped
from storage.errors import CorruptSegmentError, StorageError, StorageFailedError
from storage.store import MessageStore

__all__ = [
    "RECONNECT_BACKOFF_MAX_S",
    "RECONNECT_BACKOFF_MIN_S",
    "STREAM_ERRORS",
    "BadStreamError",
    "HAClient",
    "SlaveReplication",
    "SlaveStatus",
]

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_MIN_S = 0.05
"""First pause of a slave before reconnecting to its master."""
RECONNECT_BACKOFF_MAX_S = 2.0
"""The pause doubles per failed attempt up to this, so a master that is down for long
is not hammered, and one that is back is found within two seconds."""


class BadStreamError(HAProtocolError):
    """The master's bytes failed this slave's validation (a record that does not check,
    a chunk that does not continue the log): the slave refused them, told the master,
    and reconnects; nothing of the bad chunk is visible."""


STREAM_ERRORS = (OSError, HAProtocolError, TransferError, StorageError)
"""What ends one connection of the follow loop without ending the loop (the node stays up)."""


class HAClient:
    """The slave's end of one connection: reports its log end, carries out the master's
    plan, then applies chunks in order and acknowledges its visible end once per read
    (after the chunks that arrived together). With ``slave_ack="durable"`` every ack,
    the hello's log end included, follows this slave's fsync of the bytes it covers, so
    the master's confirm offset never runs past bytes a slave power loss could take back.

    With a ``history`` (the node's epoch history, loaded from ``epoch_file``) the slave
    takes part in the epoch protocol and saves the history after every change (without
    a file it only changes in memory). Without one it behaves as before epochs.

    Reads on a slave stop at :meth:`read_limit`: the master's confirm offset as the
    stream carries it (:data:`~replication.wire.CHUNK_CONFIRM` frames), capped at what
    this log holds, so a consumer of a slave never sees a record a failover could take
    back.

    Invariants: :attr:`acked_offset` never passes the end of what was received and
    applied (asserted per chunk) and never moves back within a connection;
    :meth:`read_limit` never exceeds the log's end. One :meth:`run` at a time; the
    attributes are read by the node's status from any task.
    """

    def __init__(
        self,
        store: MessageStore,
        name: str,
        settings: ReplicationSettings | None = None,
        *,
        history: EpochHistory | None = None,
        epoch_file: EpochFile | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.settings = settings if settings is not None else ReplicationSettings()
        self.history = history
        self.epoch_file = epoch_file
        self.master_offset: int | None = None
        """The master's log end when it answered the hello."""
        self.master_history: EpochHistory | None = None
        """The master's history from its hello."""
        self.acked_offset = -1
        self.last_truncation: tuple[int, int] | None = None
        """(old end, new end) of the last divergent tail this client cut, or None."""
        self.last_restart: tuple[int, int] | None = None
        """(old end, new start) of the last full resync (the log restarted at the
        master's log start because this slave was behind it or new), or None."""
        self.master_confirm = 0
        """The master's confirm offset as last heard in the stream (not capped)."""
        self.on_read_limit_moved: Callable[[], None] | None = None
        """Called when :meth:`read_limit` may have moved: the master's confirm offset
        arrived, or bytes it covers were applied (the node wakes the long polls that
        waited for the limit to cover their next record). Must not block."""
        self.master_name: str | None = None
        """The name the master gave in the handshake."""
        self.caught_up_epoch: int | None = None
        """The master's epoch on the last connection on which this slave's ack reached
        the master's log end as of the handshake (None: none since this process
        started). It outlives the connection: a master that dies right after recording
        this slave in sync must not take the proof with it (the HA election asks)."""
        self._ack_lock = trio.Lock()
        """Acks come from the apply loop and the heartbeat task: one frame at a time."""
        self._heard_at = math.inf
        """When the apply loop began waiting for the chunk it waits for now (inf: it is
        not waiting for one)."""
        self._tls_context: ssl.SSLContext | None = None
        """Built from ``settings.tls`` on the first connection (None: plain TCP)."""

    def read_limit(self) -> int:
        """How far consumers of this slave may read: the master's confirm offset, never
        beyond what this log holds (0 until a master has said)."""
        limit = min(self.master_confirm, self.store.commit_log.max_offset)
        assert limit <= self.store.commit_log.max_offset
        return limit

    async def _send_ack(self, sock: trio.socket.SocketType, offset: int) -> None:
        """Send an ack frame. With nobody else sending one, it goes out in one plain
        ``write`` at once: no lock and no scheduler pass before the syscall (trio's send
        has one after it, and a lock one before), since the master waits for it. A
        write that does not take the whole frame, and TLS, go the locked way."""
        frame = pack_ack(offset)
        if not self._ack_lock.locked() and not isinstance(sock, TlsSocket):
            if hop_trace.enabled:
                hop_trace.record("s.ack", offset)
            try:
                written = os.write(sock.fileno(), frame)
            except BlockingIOError:
                written = 0
            if written == len(frame):
                return
            frame = frame[written:]  # the rest before anyone else's frame: the lock is free
        async with self._ack_lock:
            if hop_trace.enabled:
                hop_trace.record("s.ack", offset)
            await send_all(sock, frame)

    async def _refuse(self, sock: trio.socket.SocketType, offset: int) -> None:
        """Tell the master the bytes at ``offset`` were refused (best effort: the
        connection closes right after, which the master sees anyway)."""
        with trio.move_on_after(self.settings.heartbeat_ms / 1000), contextlib.suppress(OSError):
            async with self._ack_lock:
                await send_all(sock, pack_refusal(offset))

    async def _heartbeat(self, sock: trio.socket.SocketType) -> None:
        """Repeat the current ack every ``heartbeat_ms``, whatever the apply loop does:
        a slave stuck applying still says where it stands, and the master's in-sync
        set (not its peer timeout) decides what that lag means."""
        while True:
            await trio.sleep(self.settings.heartbeat_ms / 1000)
            await self._send_ack(sock, self.acked_offset)

    async def _watch_silence(self) -> None:
        """Raise :class:`HAProtocolError` once a receive waited ``peer_timeout_ms`` for
        the next chunk: the master sent nothing, not even a heartbeat. The apply loop
        notes when each receive starts in :attr:`_heard_at` (a time read per chunk,
        where a deadline scope per receive cost several microseconds)."""
        timeout_ms = self.settings.peer_timeout_ms
        while True:
            if self._heard_at == math.inf:  # not receiving: look again a timeout later
                await trio.sleep(timeout_ms / 1000)
                continue
            due = self._heard_at + timeout_ms / 1000
            if trio.current_time() >= due:
                raise HAProtocolError(
                    f"master sent nothing for {timeout_ms:.0f} ms (slave {self.name} at "
                    f"{self.acked_offset}): reconnecting"
                )
            await trio.sleep_until(due)

    async def run(self, host: str, port: int) -> None:
        """Replicate until the master closes the stream (returns) or it breaks (raises).
        Reconnecting is the caller's loop: each run starts from the store's current end.
        A divergent tail is cut inside the run, with no reconnect."""
        raw = trio.socket.socket()
        with raw:
            await raw.connect((host, port))
            set_no_delay(raw)
            if self.settings.slave_ack == "durable":
                # The master counts the hello's offset as this slave's ack: on disk first
                # (a connection that ended between an apply and its flush left some unflushed).
                await self.store.commit_log.flush()
            end = self.store.commit_log.max_offset
            timeout_ms = self.settings.peer_timeout_ms
            master: MasterHello | None = None
            sock = raw
            with trio.move_on_after(timeout_ms / 1000):
                sock = await self._secure(raw, host, port)
                try:
                    master = await self._handshake(sock, end)
                except NotAnHAPortError as exc:
                    raise NotAnHAPortError(f"{host}:{port} {exc}") from None
            if master is None:
                raise HAProtocolError(
                    f"master did not complete the handshake within {timeout_ms:.0f} ms"
                )
            self.master_offset = master.max_offset
            self.master_history = master.history
            start, pending = await self._carry_out(self._plan(master, end), end)
            self.acked_offset = start
            self._note_caught_up()
            log.info(
                "ha_connected slave=%s slave_offset=%d master_offset=%d",
                self.name,
                start,
                self.master_offset,
            )
            with lone_error_unwrapped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat, sock)
                    nursery.start_soon(self._watch_silence)
                    await self._apply(sock, pending)
                    nursery.cancel_scope.cancel()

    async def _secure(
        self, sock: trio.socket.SocketType, host: str, port: int
    ) -> trio.socket.SocketType:
        """``sock`` itself without TLS; else the mutual-TLS socket over it (this slave's
        certificate presented, the master's checked against the CA and ``host``). A
        failed handshake is an :class:`~replication.wire.HAAuthError` saying why."""
        tls = self.settings.tls
        if tls is None:
            return sock
        if self._tls_context is None:
            self._tls_context = await trio.to_thread.run_sync(
                client_context, tls.ca_file, tls.cert_file, tls.key_file
            )
        try:
            return await TlsSocket.wrap(
                sock, self._tls_context, server_side=False, server_hostname=host
            )
        except HANDSHAKE_ERRORS as exc:
            raise HAAuthError(
                f"TLS handshake with the master at {host}:{port} failed: "
                f"{handshake_failure(exc)}: every node needs a certificate signed by the "
                "cluster's CA, naming the host it is reached at, and TLS on its HA port"
            ) from None

    async def _handshake(self, sock: trio.socket.SocketType, end: int) -> MasterHello:
        """Authenticate both ways, send the hello, and return the master's hello once its
        proof checks (:mod:`replication.auth`): with a secret, nothing a master says is
        believed before it proved it holds the same secret, and a master without one is
        refused (:class:`~replication.wire.HAAuthError`). Over TLS, a master that ends
        the connection unanswered may have refused this slave's certificate (TLS 1.3
        verifies the client's after the client's handshake is done): said so."""
        try:
            master, self.master_name = await slave_handshake(
                sock, self.name, end, self.history, self.settings.cluster_secret
            )
        except (HAProtocolError, OSError) as exc:
            if not isinstance(sock, TlsSocket) or isinstance(exc, HAAuthError):
                raise
            raise HAAuthError(
                f"{exc}; over TLS this is also how a master refuses a certificate that "
                "the cluster's CA did not sign (its log says which: ha_peer_refused)"
            ) from exc
        return master

    def _plan(self, master: MasterHello, end: int) -> FollowPlan:
        try:
            return follow_plan(
                self.history, end, master.history, master.max_offset, master.stream_from
            )
        except ValueError as exc:
            raise HAProtocolError(str(exc)) from exc

    async def _carry_out(self, plan: FollowPlan, end: int) -> tuple[int, list[EpochEntry]]:
        """Restart or cut the log as planned, adopt what the log already reaches; return
        the start and the epochs still pending."""
        if plan.restart:
            await self._restart_log(end, plan.start)
        elif plan.cut_to is not None:
            await self._cut_divergent_tail(end, plan.cut_to)
        pending = list(plan.adopt)
        await self._adopt_epochs(pending, plan.start)
        return plan.start, pending

    async def _apply(self, sock: trio.socket.SocketType, pending: list[EpochEntry]) -> None:
        """Apply chunks and ack each advance until the master closes the stream.

        The chunks that came in one read (:class:`~replication.transfer.ChunkReader`)
        get one ack, sent once no whole frame is left in the buffer: always before the
        next read, so an ack never waits for bytes still to arrive, and a lone chunk is
        acked at once. With ``slave_ack = "durable"`` one flush before the ack covers
        them all; :attr:`acked_offset` (which the heartbeat repeats) moves only then. A
        frame that ends the stream (a bad header, a refused chunk) has the chunks applied
        before it acked first, as if it had not arrived with them."""
        reader = ChunkReader(sock, self.settings.max_chunk)
        applied = self.acked_offset
        while True:
            if applied > self.acked_offset and not reader.buffered():
                await self._ack_applied(sock, applied)
            self._heard_at = trio.current_time()  # the silence counts from here
            try:
                header = await reader.next_chunk()
            except TransferError:  # a bad frame behind chunks of the same read: ack those
                await self._ack_before_closing(sock, applied)
                raise
            self._heard_at = math.inf  # applying is not the master's silence
            if header is None:
                log.info("ha_master_closed slave=%s offset=%d", self.name, self.acked_offset)
                return
            if header.flags & CHUNK_CONFIRM:
                self.master_confirm = header.offset
                if self.on_read_limit_moved is not None:
                    self.on_read_limit_moved()
                continue
            if header.length == 0:  # the master's heartbeat: it is alive, nothing to apply
                continue
            if hop_trace.enabled:
                hop_trace.record("s.received", header.offset + header.length)
            try:
                end = await self.store.append_replicated(header.offset, reader.data)
            except CorruptSegmentError as exc:
                await self._ack_before_closing(sock, applied)
                await self._refuse(sock, header.offset)
                raise BadStreamError(
                    f"slave {self.name} refused the master's {header.length} B at "
                    f"{header.offset}: {exc}; told the master, reconnecting"
                ) from exc
            assert end <= header.offset + header.length, (
                f"applied up to {end}, past the received {header.offset + header.length}"
            )
            if self.master_confirm > header.offset and self.on_read_limit_moved is not None:
                self.on_read_limit_moved()  # the limit was capped at the log's end
            if hop_trace.enabled:
                hop_trace.record("s.applied", end)
            if pending:
                await self._adopt_epochs(pending, end)
            applied = max(applied, end)

    async def _ack_applied(self, sock: trio.socket.SocketType, applied: int) -> None:
        """Ack ``applied``, the end of the chunks applied since the last ack. With
        ``slave_ack = "durable"`` they are flushed first (``flush()`` covers everything
        written so far), and :attr:`acked_offset`, which the heartbeat repeats, moves
        only after that."""
        if self.settings.slave_ack == "durable":
            await self.store.commit_log.flush()
        self.acked_offset = applied
        self._note_caught_up()
        await self._send_ack(sock, applied)

    async def _ack_before_closing(self, sock: trio.socket.SocketType, applied: int) -> None:
        """The stream is about to close on a frame this slave cannot take: the chunks of
        the same read before it were applied, so ack them first (best effort on the
        socket; a failed flush still raises, it halts following)."""
        if applied > self.acked_offset:
            with contextlib.suppress(OSError):
                await self._ack_applied(sock, applied)

    def _note_caught_up(self) -> None:
        """Latch :attr:`caught_up_epoch` once the ack reaches the handshake's log end."""
        if self.master_offset is None or self.acked_offset < self.master_offset:
            return
        current = self.master_history.current if self.master_history is not None else None
        epoch = current.epoch if current is not None else None
        if epoch is not None and epoch != self.caught_up_epoch:
            self.caught_up_epoch = epoch
            log.info(
                "ha_caught_up slave=%s epoch=%d master_offset=%d",
                self.name,
                epoch,
                self.master_offset,
            )

    async def _cut_divergent_tail(self, end: int, point: int) -> None:
        """Cut the log and history to ``point`` (where they stop agreeing with the
        master's, by the plan both ends computed)."""
        old_epochs = self.history.entries if self.history is not None else ()
        if point < end:
            await self.store.truncate(point)
        new_end = self.store.commit_log.max_offset
        if new_end != point:
            raise HAProtocolError(f"truncating at {point} left the log ending at {new_end}")
        # Log first, then history: a crash in between leaves epochs past the log end,
        # which divergence_point clamps to the end (the reverse could keep a bad tail
        # tagged with an epoch it does not belong to).
        if self.history is not None:
            self.history.truncate(point)
            await self._save_history()
        if point == end:
            return
        self.last_truncation = (end, point)
        log.warning(
            "ha_slave_truncated slave=%s old_end=%d new_end=%d dropped_bytes=%d "
            "old_epochs=%s kept_epochs=%s master_epochs=%s",
            self.name,
            end,
            point,
            end - point,
            epochs_text(old_epochs),
            epochs_text(self.history.entries if self.history is not None else ()),
            epochs_text(self.master_history.entries if self.master_history else ()),
        )

    async def _restart_log(self, end: int, start: int) -> None:
        """The full resync: drop the whole log (nothing of it is provably the master's,
        or the master no longer holds what follows it) and restart it empty at the
        master's log start; the history restarts empty too and adopts every epoch of
        the master's. Log first, then history, as for a cut."""
        try:
            await self.store.restart_log_at(start)
        except ValueError as exc:
            raise HAProtocolError(
                f"slave {self.name} cannot restart its log at the master's log start {start}: {exc}"
            ) from exc
        if self.history is not None:
            self.history.truncate(0)
            await self._save_history()
        self.last_restart = (end, start)
        log.warning(
            "ha_slave_resync slave=%s old_end=%d new_start=%d reason=%s",
            self.name,
            end,
            start,
            "behind_master_log_start" if end < start else "log_not_provably_the_masters",
        )

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
                epochs_text(self.history.entries),
            )

    async def _save_history(self) -> None:
        if self.epoch_file is not None and self.history is not None:
            snapshot = EpochHistory(self.history.entries)
            await trio.to_thread.run_sync(self.epoch_file.save, snapshot)


@attrs.frozen
class SlaveStatus:
    """A slave's replication state, typed; the node turns it into the wire dict."""

    master_ha: str
    connected: bool
    acked_offset: int
    master_offset: int | None
    reconnects: int
    last_truncation: tuple[int, int] | None
    confirm_offset: int
    """The master's confirm offset as this slave holds it: reads stop here."""
    last_restart: tuple[int, int] | None
    """(old end, new start) of the last full resync, or None."""
    last_error: str | None
    """Why the last connection ended (None while the first one lasts)."""
    halted: str | None
    """Why this slave stopped following for good (its store failed), or None."""


class SlaveReplication:
    """The follower: follow the master's HA port, reconnecting with backoff, until
    :meth:`stop` (promotion) or cancellation; :meth:`repoint` switches masters.

    One :class:`HAClient` (and so one epoch history object, the node's) is used for
    every connection: the history it adopts or cuts is the one the node saves and, on
    promotion, extends. :meth:`run` runs in one task; :meth:`repoint`, :meth:`stop` and
    :meth:`status` may be called from any other task of the same trio loop.

    Invariants: :meth:`run` ends only by :meth:`stop` or cancellation and never raises
    anything else, whatever a connection was doing when it ended (a stream error, a
    refused chunk, a storage error and a stop can arrive together). A connection that
    fails is logged, its reason kept in :attr:`last_error`, and retried with backoff. A
    failed fsync (:class:`~storage.StorageFailedError`) halts following for good
    (:attr:`halted`): the node stays up and read-only, as a master does, until an
    operator restarts it.
    """

    def __init__(
        self,
        store: MessageStore,
        name: str,
        master_ha: str,
        settings: ReplicationSettings,
        *,
        history: EpochHistory,
        epoch_file: EpochFile,
    ) -> None:
        self.master_ha = master_ha
        self.client = HAClient(store, name, settings, history=history, epoch_file=epoch_file)
        self.connected = False
        self.reconnects = 0
        self.last_error: str | None = None
        self.halted: str | None = None
        self._attempt = trio.CancelScope()
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    @property
    def _address(self) -> tuple[str, int]:
        host, _, port = self.master_ha.rpartition(":")
        return host, int(port)

    def read_limit(self) -> int:
        """How far consumers of this slave may read (see :meth:`HAClient.read_limit`)."""
        return self.client.read_limit()

    def repoint(self, master_ha: str) -> None:
        """Follow ``master_ha`` from now on: the current connection is dropped and the
        next one (to the new address, at once, no backoff) resumes from the log's end;
        a divergent tail is cut by the epoch check of that handshake."""
        self.master_ha = master_ha
        self._attempt.cancel()

    def request_stop(self) -> None:
        """Start ending the follow loop (from any task, at any moment); :meth:`stop`
        also waits for it."""
        self._scope.cancel()

    async def stop(self) -> None:
        """End the follow loop and wait until it has (no chunk is being applied then).
        Safe at any moment, also before :meth:`run` started or after it ended."""
        self.request_stop()
        await self._done.wait()

    async def run(self) -> None:
        """Replicate until stopped or cancelled. Each attempt resumes from the store's
        end (the client says where it stands), so a broken stream loses nothing."""
        settings = self.client.settings
        if settings.cluster_secret is None and settings.tls is None:
            log.warning(
                "ha_unauthenticated master=%s: no cluster secret, so this slave follows "
                "whoever answers at that address: set [replication] cluster_secret or "
                "cluster_secret_file (the same on every node), or mutual TLS",
                self.master_ha,
            )
        try:
            with self._scope:
                await self._follow()
        finally:
            self.connected = False
            self._done.set()

    async def _follow(self) -> None:
        backoff = Backoff(RECONNECT_BACKOFF_MIN_S, RECONNECT_BACKOFF_MAX_S)
        while True:
            self.client.master_offset = None
            self._attempt = trio.CancelScope()
            start = self.client.store.commit_log.max_offset
            failure = await self._one_connection()
            progressed = self.client.store.commit_log.max_offset != start
            self.reconnects += 1
            if isinstance(failure, StorageFailedError):
                await self._halt(failure)
            if self._attempt.cancelled_caught:
                log.info("ha_repointed master=%s", self.master_ha)
                backoff.reset()
                continue
            self.last_error = "master closed the stream" if failure is None else repr(failure)
            if isinstance(failure, HAAuthError):
                log.error("ha_auth_refused master=%s reason=%s", self.master_ha, failure)
            if progressed:
                backoff.reset()  # it applied something: the next failure is a new one
            delay_s = backoff.next_delay_s()
            log.warning(
                "ha_reconnect master=%s reason=%s in_s=%.2f attempt=%d",
                self.master_ha,
                self.last_error,
                delay_s,
                self.reconnects,
            )
            # in the attempt's scope, so a repoint ends the pause too and the new
            # master is tried at once
            self._attempt = trio.CancelScope()
            with self._attempt:
                await trio.sleep(delay_s)
            if self._attempt.cancelled_caught:
                log.info("ha_repointed master=%s", self.master_ha)
                backoff.reset()

    async def _one_connection(self) -> BaseException | None:
        """Run one connection; return what ended it (None: the master closed it).

        A connection's tasks can fail together: an ack sent into a reset socket while
        a stop cancels the apply loop arrives as a group of the stream error and
        ``Cancelled``. The stream errors are taken here; a ``Cancelled`` goes on to the
        scope that was cancelled (the stop's or the repoint's), so a stop is never
        mistaken for a failure and a failure never escapes the loop.
        """
        failures: list[BaseException] = []
        try:
            with self._attempt:
                self.connected = True
                await self.client.run(*self._address)
        except* STREAM_ERRORS as group:
            failures.extend(leaves(group))
        except* Exception as group:  # a bug in one connection must not take the node down
            log.exception("ha_follow_crashed master=%s", self.master_ha, exc_info=group)
            failures.extend(leaves(group))
        finally:
            self.connected = False
        for failure in failures:
            if isinstance(failure, StorageFailedError):
                return failure
        return failures[0] if failures else None

    async def _halt(self, failure: StorageFailedError) -> None:
        """The store can no longer make anything durable: stop following for good (until
        a restart) and stay up read-only, as a master whose fsync failed does."""
        self.halted = f"store failed: {failure}"
        self.last_error = repr(failure)
        log.critical("ha_follow_halted master=%s reason=%s", self.master_ha, failure)
        await trio.sleep_forever()

    def status(self) -> SlaveStatus:
        client = self.client
        return SlaveStatus(
            master_ha=self.master_ha,
            connected=self.connected and client.master_offset is not None,
            acked_offset=client.acked_offset,
            master_offset=client.master_offset,
            reconnects=self.reconnects,
            last_truncation=client.last_truncation,
            confirm_offset=client.read_limit(),
            last_restart=client.last_restart,
            last_error=self.last_error,
            halted=self.halted,
        )
