"""One client connection: frames in, responses out, in-flight requests bounded.

Why a request holds its in-flight slot until its response is *sent*: a client that
pipelines without reading would otherwise make the node buffer answers without limit.
With the slots taken, the reader stops reading and TCP pushes back on the client.
"""

from __future__ import annotations

import logging
import os
import types
from collections import deque
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from cluster.protocol import (
    HEADER,
    MAX_FRAME_SIZE_LIMIT,
    Acks,
    FrameDecoder,
    ProtocolError,
    Request,
    Status,
    encode_frame,
    error_response,
)
from cluster.protocol.codec import COMPACT_ANSWER
from cluster.protocol.compact import encode_send_answer
from cluster.protocol.limits import LOWEST_VERSION, PROTOCOL_VERSION
from cluster.protocol.spliced import Buffer, SplicedBytes, encode_spliced_frame
from cluster.server.errors import response_for_error
from cluster.server.polls import Wakeups
from cluster.server.replies import Deferred, PendingAck, Reply
from cluster.server.request_log import logged
from cluster.server.streams import GONE, RECEIVE_SIZE, linger, peer_name
from storage.waiters import WakeHandle

if TYPE_CHECKING:
    from cluster.server.listener import ClientServer

__all__ = ["Connection"]

log = logging.getLogger(__name__)

RESERVE_FRAMES_OVER: Final = 64 * 1024
"""Frames up to this size are read without a reservation (one receive's worth)."""
QUEUED_ACKS: Final = frozenset({Acks.DURABLE, Acks.IN_SYNC, Acks.REPLICATED})
"""Ack levels whose waits share a task (see :class:`Connection`). Measured with ``tidelog
bench produce --json``, 64 writes in flight: ``durable`` (group commit releases the
whole queue at once) costs the node about a quarter less CPU per message queued than
with a task each. ``in_sync`` and ``replicated`` joined once their policy answered a
write the confirm offset already covers without a scheduling point (before, each queued
wait yielded on its own and the answers went out one at a time): about a fifth less
master CPU per pipelined message than with a task each."""
IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
"""Buffers one ``writev`` takes at most."""
UNKNOWN_OUTCOME: Final = frozenset({Status.FLUSH_DISK_TIMEOUT, Status.FLUSH_SLAVE_TIMEOUT})
"""The statuses of a write appended whose acknowledgement did not come: outcome unknown."""
CUT_ERROR: Final = (
    "appended, but before {what} confirmed it this node's log was cut below the write's "
    "end or its role changed (a demoted master drops the tail the new master lacks), so "
    "the record may be gone and other bytes may take its offset: the outcome is unknown; "
    "read it back from the current master before resending"
)
"""The error of a write whose ack wait a cut (or a role change) ended before its deadline."""
_T = TypeVar("_T")


class Connection:
    """One client connection: reader, coalescing writer, and tasks for waiting requests.

    Every admitted frame gets exactly one response, and holds one of the connection's
    ``max_inflight_per_connection`` slots until that response is sent. Memory is bounded
    in bytes too: no request is admitted while this connection's unsent answers reach
    ``max_connection_response_bytes`` or the node's ``max_buffered_response_bytes``, and a
    large frame is read only with a grant from the node's request-byte budget. The
    reader, the writer and the waiting requests are tasks of this connection's nursery;
    only the owning :class:`ClientServer` calls :meth:`run`.

    Ack waits (:class:`PendingAck`) at the :data:`QUEUED_ACKS` levels do not get a task
    each: they join a FIFO awaited in turn by one task, while each joins at the same
    ``acks`` level as the queue's tail with a deadline no earlier than its. A connection
    appends in the order it reads, so a later write's offset is higher and its level's
    position (the fsynced offset) passes it no earlier: awaiting in order answers no
    write later than a task of its own would, and none after its deadline (a resent
    idempotent batch answered with its earlier offsets may wait for the head, still no
    longer than its own deadline). A wait that breaks the rule (another level, an
    earlier deadline), and every other deferred request (long polls), gets a task.
    The queue's task lives as long as the connection reads, parked while the queue is
    empty; a wait whose level holds when its turn comes (``PendingAck.answer_now``, the
    ack policy's ``holds``) is answered there with no coroutine, so the writes one
    fsync or one slave ack released cost an answer each and nothing more. A queued wait
    that ends in an outcome-unknown status before its deadline (a deadline ends one at
    or after it) was ended by a cut of the log or a role change: it and every wait
    queued behind it are answered at once with that status and :data:`CUT_ERROR`, and
    none waits again (:meth:`_answer_cut_waits`), since other bytes may fill the same
    offsets.

    Answers are written by the task that made them when it can: the reader queues the
    answers of one receive's frames and writes them with one ``write`` on the socket
    before it reads again, and the ack queue's task does the same for the waits it
    answers in one go (see :meth:`_held`), so a request answered at once costs no hop
    to the writer task. Such a "holding" task writes what it queued before it waits for
    anything (another task's answer may not sit behind it). The writer task sends the
    rest: answers of the other deferred tasks, what a short write left, records pulls
    (spliced bytes), and everything under TLS. At most one of them writes at a time,
    so frames never interleave: a direct write happens only while the writer holds
    nothing (:attr:`_writing`).
    """

    def __init__(self, stream: trio.abc.Stream, server: ClientServer) -> None:
        settings = server.settings
        self._stream = stream
        self._server = server
        self._handler = logged(server.handler, peer_name(stream))  # the request log
        self._decoder = FrameDecoder(settings.max_frame_size)
        self._max_inflight = settings.max_inflight_per_connection
        self._max_unsent = settings.max_connection_response_bytes
        self._max_node_unsent = settings.max_buffered_response_bytes
        self._idle_timeout_s = settings.idle_timeout_ms / 1000
        self._free_slots = self._max_inflight
        """In-flight slots not taken (a count, not a semaphore: taking and giving back one
        is on every request's path, and only the reader ever waits for one)."""
        self._slot_freed: trio.Event | None = None
        """Set when a slot is given back while the reader waits for one (see :meth:`_admit`)."""
        self.polls = Wakeups()
        self.peer = peer_name(stream)
        self._out = bytearray()
        """Answers queued, encoded, after those in :attr:`_spliced` (all of them, mostly)."""
        self._spliced: list[Buffer | SplicedBytes] = []
        """Pieces queued before :attr:`_out`: encoded frames and byte strings left in their
        buffers (a records pull's views of the log), written in place (see :meth:`_send`)."""
        self._socket = stream.socket if type(stream) is trio.SocketStream else None
        """The socket under a plain stream (spliced bytes are written with ``writev``);
        None under TLS, whose stream takes them joined."""
        self._out_count = 0
        self._holding = False
        """The running task writes :attr:`_out` itself before it next waits (see
        :meth:`_held`): queuing an answer does not wake the writer."""
        self._writing = False
        """The writer task holds answers taken from :attr:`_out` that are not all sent."""
        self._unsent = 0
        """Bytes of answers queued or being sent (see :meth:`ClientServer.over_response_bytes`)."""
        self._reserved = 0
        """Bytes granted by the node's request budget to the frame being received (0: none)."""
        self._wake = trio.Event()
        self._receiving = False
        """The reader is waiting in ``receive_some`` (see :meth:`_watch_idle`)."""
        self._owe_checkpoint = False
        """The last receive returned without yielding: the next one yields first."""
        self._received_at = trio.current_time()
        self._closed_idle = False
        self._idle_watch = trio.CancelScope()
        self._reading = True
        self._fatal = False
        self._aborted = False
        self._nursery: trio.Nursery | None = None
        self._ack_queue: deque[tuple[int, str, PendingAck, int]] = deque()
        """Ack waits awaited in order by :meth:`_await_acks`; the head is being awaited."""
        self._ack_task_started = False
        self._ack_task_idle: trio.lowlevel.Task | None = None
        """The ack queue's task, parked until a wait joins the empty queue (or the reader
        ends); None while it runs or awaits a wait."""
        self._ack_task_wake: WakeHandle | None = None
        """The policy's wake-up of the idle ack task for the queue's head, if registered
        (see :meth:`_wake_ack_task_for`): whoever else wakes the task cancels it first."""

    @property
    def inflight(self) -> int:
        return self._max_inflight - self._free_slots

    async def run(self) -> None:
        log.debug("connection_open peer=%s", self.peer)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._watch_idle)
                await self._read_loop()
                self._idle_watch.cancel()
                self._reading = False
                self.polls.wake_all()
                self._wake.set()
                self._wake_ack_task()  # an idle one ends now
            if self._fatal:
                await self._linger()
        finally:
            self._release_unsent(self._unsent)  # never to be sent now
            _finish_spliced(self._spliced)
            self._spliced = []
            self._release_request_bytes()
            await trio.aclose_forcefully(self._stream)
            log.debug("connection_closed peer=%s", self.peer)

    # ---- reading -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        decoder = self._decoder
        server = self._server
        try:
            while data := await self._receive():
                decoder.feed(data)
                if self._reserved and decoder.buffered >= HEADER.size + self._reserved:
                    self._release_request_bytes()  # the reserved frame's last byte arrived
                self._holding = True  # this receive's answers go out in one write, below
                try:
                    for item in decoder:
                        if (
                            self._free_slots
                            and self._unsent < self._max_unsent
                            and server.response_bytes < self._max_node_unsent
                        ):
                            self._free_slots -= 1  # the common case of _admit, without a call
                            server.admitted()
                        else:
                            await self._admit()
                        await self._dispatch(item)
                finally:
                    self._holding = False
                    self._write_now()
                await self._reserve_for_incomplete_frame()
        except ProtocolError as fatal:
            log.info("connection_fatal peer=%s status=%s", self.peer, fatal.status)
            await self._admit()
            self._reply(fatal.response())
            self._fatal = True
        except GONE:
            self._abort()

    async def _receive(self) -> bytes | bytearray:
        """The next bytes, or ``b""`` at EOF, or once :meth:`_watch_idle` closed the
        connection for being idle: it then ends like one the client ended."""
        self._receiving = True
        try:
            if self._socket is None:
                return await self._stream.receive_some(RECEIVE_SIZE)
            return await self._receive_plain(self._socket)
        except GONE:
            if self._closed_idle:
                return b""
            raise
        finally:
            self._receiving = False
            self._received_at = trio.current_time()

    async def _receive_plain(self, sock: trio.socket.SocketType) -> bytes:
        """``receive_some`` on the plain socket, minus its scheduler pass after a read
        that did not wait: bytes that are already there are read at once, and the pass
        is owed to the next call instead (each call still yields at least once in two,
        so a client that keeps the socket full cannot starve the other tasks). A
        request read after a wait is thus answered with no scheduler pass in between."""
        waited = False
        if self._owe_checkpoint:
            await trio.lowlevel.checkpoint()
            waited = True
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the connection's socket was closed")
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"reading the requests failed: {exc}") from exc
            self._owe_checkpoint = not waited
            return data

    async def _watch_idle(self) -> None:
        """Close the connection once it has been idle for ``idle_timeout_ms``: nothing
        received, no request in flight, the reader waiting for bytes.

        One task per connection instead of a deadline around every receive (a cancel
        scope per receive cost more than the rest of a small request's reading). A
        period in which a request was in flight, or the reader was held elsewhere
        (back-pressure), is followed by a fresh one, as the reader's own timer did.
        """
        idle_s = self._idle_timeout_s
        with self._idle_watch:
            quiet_since = trio.current_time()
            while True:
                due = max(quiet_since, self._received_at) + idle_s
                await trio.sleep_until(due)
                now = trio.current_time()
                if now < max(quiet_since, self._received_at) + idle_s:
                    continue  # bytes came meanwhile: wait out the rest of the new period
                if self._receiving and not self.inflight:
                    log.info("connection_idle peer=%s idle_s=%g", self.peer, idle_s)
                    self._closed_idle = True
                    await trio.aclose_forcefully(self._stream)  # the reader sees the end
                    return
                quiet_since = now

    async def _reserve_for_incomplete_frame(self) -> None:
        """Before reading on: a frame over :data:`RESERVE_FRAMES_OVER` whose body is not
        all here yet reserves its size in the node's request budget, given back once its
        last byte arrived (see :meth:`_read_loop`). The decoder has every complete frame
        taken out, so the incomplete one is at its head: at most one grant is held.
        Checked once per receive, not per frame."""
        if self._reserved:
            return
        size = self._decoder.incomplete_frame_size()
        if size is not None and size > RESERVE_FRAMES_OVER:
            await self._server.request_bytes.acquire(size)
            self._reserved = size

    def _release_request_bytes(self) -> None:
        if self._reserved:
            self._server.request_bytes.release(self._reserved)
            self._reserved = 0

    async def _admit(self) -> None:
        """Take an in-flight slot; with none free, or with too many answer bytes waiting
        to be sent (this connection's or the node's), stop reading until some are sent.
        Answers held for one write go out first (they may be what frees a slot)."""
        holding = self._holding
        if holding:
            self._holding = False
            self._write_now()
        while self._server.over_response_bytes(self._unsent):
            log.debug("backpressure peer=%s unsent_bytes=%d", self.peer, self._unsent)
            await self._server.wait_response_bytes_sent()
        if not self._free_slots:
            log.debug("backpressure peer=%s inflight=%d", self.peer, self.inflight)
            while not self._free_slots:
                self._slot_freed = trio.Event()
                await self._slot_freed.wait()
            self._slot_freed = None
        self._free_slots -= 1
        self._server.admitted()
        self._holding = holding

    async def _dispatch(self, item: Request | ProtocolError) -> None:
        answer_version = self._decoder.answer_version  # the request's own (or compact)
        if isinstance(item, ProtocolError):
            self._reply(item.response(), answer_version)
            return
        req_id, op = item["id"], item["op"]
        if self._server.draining:
            self._reply(
                error_response(
                    req_id,
                    Status.SHUTTING_DOWN,
                    "the node is shutting down and did not start this request: reconnect "
                    "(possibly to another node) and resend",
                ),
                answer_version,
            )
            return
        try:
            outcome = await self._held(self._handler.handle(item, self.polls))
        except Exception as exc:
            self._reply(response_for_error(req_id, exc, op), answer_version)
            return
        if isinstance(outcome, dict):
            self._reply(outcome, answer_version)
            return
        assert self._nursery is not None
        if isinstance(outcome, PendingAck) and outcome.acks in QUEUED_ACKS:
            queue = self._ack_queue
            if not queue:
                queue.append((req_id, op, outcome, answer_version))
                if not self._ack_task_started:
                    self._ack_task_started = True
                    self._nursery.start_soon(self._await_acks)
                else:
                    self._wake_ack_task_for(outcome)
                return
            tail = queue[-1][2]
            if tail.acks is outcome.acks and tail.deadline_s <= outcome.deadline_s:
                queue.append((req_id, op, outcome, answer_version))
                return
        self._nursery.start_soon(self._finish, req_id, op, outcome, answer_version)

    async def _await_acks(self) -> None:
        """Answer the queued ack waits in order, for as long as the connection reads:
        one task for the connection's life, parked while the queue is empty (a task
        started per write that found the queue empty cost a task's start and end on
        every sequential write). Ends once the reader has ended and the queue is empty."""
        queue = self._ack_queue
        while True:
            if not queue:
                if not self._reading:
                    return
                woken = await self._park_ack_task()
                # False before the head's deadline: a cut of the log past the flushed
                # offset woke it (see OffsetWaiters.rewind), not the deadline
                if woken is False and queue and _ended_early(queue[0][2]):
                    self._answer_cut_waits(head_timed=False)
                continue
            self._holding = True  # waits released together are answered with one write
            try:
                while queue:
                    req_id, op, pending, answer_version = queue[0]
                    try:
                        response = pending.answer_now()  # its level holds already?
                    except Exception as exc:
                        response = response_for_error(req_id, exc, op)
                    if response is None:
                        response = await self._held(self._answer_of(req_id, op, pending))
                        if response is None:  # cut: the head is answered with the rest
                            self._answer_cut_waits(head_timed=True)
                            continue
                    self._reply(response, answer_version)
                    queue.popleft()
            finally:
                self._holding = False
                self._write_now()

    def _answer_cut_waits(self, *, head_timed: bool) -> None:
        """The log was cut (or the role changed) under the queued waits: answer every one
        with an outcome-unknown status now. Waiting again would register for the same
        end offsets, which other bytes may reach (this node's appends once it is master
        again, a new master's records once it follows one): an ``OK`` for a record that
        may be gone. Every queued write was appended before the cut (the queue is in
        append order and the head's end is past the cut), and "unknown" is true of
        each, whether its own bytes survived or not. Each answer is timed for the
        metrics once: the head's already was when ``head_timed`` (its wait returned)."""
        queue = self._ack_queue
        log.warning(
            "ack_waits_cut peer=%s writes=%d first_end_offset=%d",
            self.peer,
            len(queue),
            queue[0][2].end_offset,
        )
        timed = head_timed
        while queue:
            _req_id, _op, pending, answer_version = queue.popleft()
            answer = _cut_answer(pending)
            if not timed:
                pending.record_wait(answer["status"])
            timed = False
            self._reply(answer, answer_version)

    async def _park_ack_task(self) -> object:
        """Park the ack queue's task until :meth:`_wake_ack_task`, or the policy's wake-up
        for the queue's head (:meth:`_wake_ack_task_for`); return what woke it (the
        policy's True or False, else None)."""
        self._ack_task_idle = trio.lowlevel.current_task()

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._ack_task_idle = None
            wake, self._ack_task_wake = self._ack_task_wake, None
            if wake is not None:
                wake.cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        woken: object = None
        try:
            woken = await trio.lowlevel.wait_task_rescheduled(abort)
        except Exception:  # the policy's failure (a stale master): the head's wait answers it
            log.debug("ack_task_woken_by_failure peer=%s", self.peer, exc_info=True)
        self._ack_task_idle = None
        self._ack_task_wake = None
        return woken

    def _wake_ack_task_for(self, pending: PendingAck) -> None:
        """A wait joined the empty queue: have the policy wake the idle ack task when the
        wait's level may hold (the ack that releases it wakes the task, which then
        answers: no step of its own to park on the wait first), else wake it now."""
        task = self._ack_task_idle
        if task is None:
            return
        wake = pending.wake_on(task)
        if wake is None:
            self._wake_ack_task()
        else:
            self._ack_task_wake = wake

    def _wake_ack_task(self) -> None:
        """Wake the ack queue's task if it is parked (a wait joined the empty queue, or
        the reader ended), unless the policy's wake-up for it fired already."""
        task = self._ack_task_idle
        if task is None:
            return
        wake, self._ack_task_wake = self._ack_task_wake, None
        if wake is not None and not wake.cancel():
            return  # rescheduled by the policy already: it runs soon
        self._ack_task_idle = None
        trio.lowlevel.reschedule(task)

    async def _held(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Await ``coroutine`` for a task holding its answers (:attr:`_holding`): run
        straight through when it never waits (the common case), else write the answers
        held so far before its first wait and hold again once it is back."""
        try:
            trap = coroutine.send(None)
        except StopIteration as done:
            return done.value
        if not self._holding:
            return await _resume(coroutine, trap)
        self._holding = False
        self._write_now()
        try:
            return await _resume(coroutine, trap, holder=self)
        finally:
            self._holding = True

    async def _finish(self, req_id: int, op: str, deferred: Deferred, answer_version: int) -> None:
        if isinstance(deferred, PendingAck):
            response = await self._answer_of(req_id, op, deferred)
            if response is None:
                log.warning("ack_wait_cut peer=%s end_offset=%d", self.peer, deferred.end_offset)
                response = _cut_answer(deferred)
            self._reply(response, answer_version)
            return
        try:
            response = await deferred()
        except Exception as exc:
            response = response_for_error(req_id, exc, op)
        self._reply(response, answer_version)

    async def _answer_of(self, req_id: int, op: str, pending: PendingAck) -> Reply | None:
        """Await ``pending``'s wait: its answer, or None when it ended in an
        outcome-unknown status before its deadline (the caller answers it, and those
        queued behind it, with :func:`_cut_answer`). Only a cut of
        the log (group commit's waiters past it are woken with False) or a role change
        (a stale or stepped-down master's waits) ends a wait so early; its own status
        would say the fsync or the slaves were too slow, and the writes queued behind
        it would wait afresh for offsets other bytes may fill."""
        try:
            response = await pending()
        except Exception as exc:
            return response_for_error(req_id, exc, op)
        if response.get("status") in UNKNOWN_OUTCOME and _ended_early(pending):
            return None
        return response

    # ---- writing -------------------------------------------------------------------------

    def _reply(self, response: Reply, answer_version: int = LOWEST_VERSION) -> None:
        """Queue ``response`` in the request's version (the decoder's ``answer_version``):
        :data:`COMPACT_ANSWER` for a compact send, so an ``OK`` one is sent in the compact
        layout too (see :mod:`cluster.protocol.compact`); else the ``v`` of the map."""
        if answer_version == COMPACT_ANSWER:
            frame = encode_send_answer(response)  # None unless OK
        else:
            frame = None
            if answer_version != PROTOCOL_VERSION:  # answers are built in the newest version
                response = {**response, "v": answer_version}
        if frame is None:
            if type(response.get("records")) is SplicedBytes:
                self._reply_spliced(response)
                return
            try:
                frame = encode_frame(response, max_frame_size=MAX_FRAME_SIZE_LIMIT)
            except Exception as exc:
                failed = response_for_error(response.get("id", 0), exc, "encode")
                failed["v"] = response.get("v", LOWEST_VERSION)
                frame = encode_frame(failed)
        self._out += frame
        self._out_count += 1
        self._unsent += len(frame)
        self._server.response_bytes_queued(len(frame))
        if not self._holding:
            self._wake.set()

    def _reply_spliced(self, response: Reply) -> None:
        """Queue an answer whose ``records`` stay in their buffers until written."""
        records = response["records"]
        try:
            frame = encode_spliced_frame(response, "records", max_frame_size=MAX_FRAME_SIZE_LIMIT)
        except Exception as exc:
            records.finish()
            version = response.get("v", LOWEST_VERSION)
            self._reply(response_for_error(response.get("id", 0), exc, "encode"), version)
            return
        self._out += frame.head
        self._spliced += (self._out, records)
        self._out = bytearray(frame.tail)
        self._out_count += 1
        self._unsent += frame.size
        self._server.response_bytes_queued(frame.size)
        self._wake.set()

    def _write_now(self) -> None:
        """Write the queued answers from the calling task, with one ``write`` on the
        socket; what it does not take (a full socket buffer), and anything the writer
        task must send (spliced bytes, TLS, a send of its own under way), is left to
        the writer task, woken here."""
        out = self._out
        if not out:
            if self._spliced:
                self._wake.set()
            return
        sock = self._socket
        if sock is None or self._writing or self._spliced or self._aborted:
            self._wake.set()
            return
        try:
            sent = os.write(sock.fileno(), out)
        except OSError:  # would block, or a broken connection: the writer finds out
            self._wake.set()
            return
        if sent == len(out):
            count = self._out_count
            out.clear()
            self._out_count = 0
            self._release_unsent(sent)
            self._retire(count)
            return
        del out[:sent]  # the rest, and every answer in it, waits for the writer
        self._release_unsent(sent)
        self._wake.set()

    async def _write_loop(self) -> None:
        """Send everything queued in one ``send_all`` (or ``writev``, with spliced bytes);
        release the slots it answered."""
        try:
            while True:
                if self._spliced:
                    pieces, count = self._spliced, self._out_count
                    pieces.append(self._out)
                    self._spliced, self._out, self._out_count = [], bytearray(), 0
                    self._writing = True
                    try:
                        size = await self._send(pieces)
                    finally:
                        self._writing = False
                        _finish_spliced(pieces)
                    self._release_unsent(size)
                    self._retire(count)
                elif self._out:
                    data, count = self._out, self._out_count
                    self._out, self._out_count = bytearray(), 0
                    self._writing = True
                    try:
                        await self._stream.send_all(data)
                    finally:
                        self._writing = False
                    self._release_unsent(len(data))
                    self._retire(count)
                elif not self._reading and not self.inflight:
                    return
                else:
                    self._wake = trio.Event()
                    await self._wake.wait()
        except GONE:
            self._abort()

    async def _send(self, pieces: list[Buffer | SplicedBytes]) -> int:
        """Write ``pieces`` in order, spliced bytes from their own buffers; their size.

        ``writev`` on the socket, resumed after partial writes; the buffers are listed
        afresh for each call, so a lent view replaced by its copy meanwhile (a cut) is
        never written. The socket's descriptor is read right before each call: once the
        stream is closed it is -1, and the number may name another file by then."""
        size = sum(len(piece) for piece in pieces)
        sock = self._socket
        if sock is None:
            await self._stream.send_all(b"".join(_buffers(pieces, 0, 0, limit=None)))
            return size
        index = skip = 0
        while index < len(pieces):
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the connection's socket was closed")
            try:
                sent = os.writev(fd, _buffers(pieces, index, skip, limit=IOV_MAX))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"writing the answers failed: {exc}") from exc
            skip += sent
            while index < len(pieces) and skip >= len(pieces[index]):
                skip -= len(pieces[index])
                index += 1
        await trio.lowlevel.checkpoint()
        return size

    def _release_unsent(self, count: int) -> None:
        self._unsent -= count
        self._server.response_bytes_sent(count)

    def _retire(self, count: int) -> None:
        if self._aborted:  # _abort already retired everything outstanding
            return
        self._free_slots += count
        assert self._free_slots <= self._max_inflight, (self._free_slots, self._max_inflight)
        if self._slot_freed is not None:
            self._slot_freed.set()
        self._server.retired(count)

    # ---- closing -------------------------------------------------------------------------

    def _abort(self) -> None:
        """The peer is gone: stop everything, nobody is left to answer."""
        if self._aborted:
            return
        self._aborted = True
        log.debug("connection_reset peer=%s inflight=%d", self.peer, self.inflight)
        self._server.retired(self.inflight)  # their responses will never be sent
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _linger(self) -> None:
        await linger(self._stream)


_EARLY_MARGIN_S: Final = 1e-6
"""Slack on the deadline test: a policy's own deadline is the write's, recomputed from
whole milliseconds left (never earlier, but for float rounding)."""


def _ended_early(pending: PendingAck) -> bool:
    """Whether ``pending``'s wait ended before its deadline (a deadline wakes it at or
    after it)."""
    return trio.current_time() < pending.deadline_s - _EARLY_MARGIN_S


def _cut_answer(pending: PendingAck) -> Reply:
    """The outcome-unknown answer of a write whose wait a cut or role change ended:
    the level's timeout status, with :data:`CUT_ERROR`."""
    if pending.acks is Acks.DURABLE:
        return pending.answer(Status.FLUSH_DISK_TIMEOUT, _DURABLE_CUT_ERROR)
    return pending.answer(Status.FLUSH_SLAVE_TIMEOUT, _REPLICATED_CUT_ERROR)


_DURABLE_CUT_ERROR: Final = CUT_ERROR.format(what="its fsync")
_REPLICATED_CUT_ERROR: Final = CUT_ERROR.format(what="the in-sync slaves")


@types.coroutine
def _resume(
    coroutine: Coroutine[Any, Any, _T], trap: Any, holder: Connection | None = None
) -> Generator[Any, Any, _T]:
    """Go on awaiting ``coroutine``, which has run up to the yield of ``trap`` (a
    ``yield from`` whose first step was taken by hand: see :meth:`Connection._held`).

    With a ``holder`` (the connection whose task holds its answers) each step of
    ``coroutine`` runs holding, so an answer it queues (such as the one its wake-up
    makes) wakes no writer, and what it queued is written before it waits again.
    Without this, a released ack wait woke the writer task for an answer the ack
    queue's task wrote itself right after: a wasted task step per sequential write."""
    while True:
        try:
            value = yield trap
        except BaseException as exc:  # a cancellation, delivered where it waits
            if holder is not None:
                holder._holding = True
            try:
                trap = coroutine.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            if holder is not None:
                holder._holding = True
            try:
                trap = coroutine.send(value)
            except StopIteration as done:
                return done.value
        if holder is not None:  # it waits again: what it queued goes out first
            holder._holding = False
            holder._write_now()


def _buffers(
    pieces: list[Buffer | SplicedBytes], index: int, skip: int, *, limit: int | None
) -> list[Buffer]:
    """The buffers of ``pieces`` from piece ``index``, its first ``skip`` bytes left
    out, at most ``limit`` of them (empty ones left out)."""
    out: list[Buffer] = []
    for piece in pieces[index:]:
        parts = piece.parts if isinstance(piece, SplicedBytes) else (piece,)
        for part in parts:
            length = len(part)
            if skip >= length:
                skip -= length  # sent already, or empty
                continue
            out.append(memoryview(part)[skip:] if skip else part)
            skip = 0
            if len(out) == limit:
                return out
    return out


def _finish_spliced(pieces: list[Buffer | SplicedBytes]) -> None:
    """The spliced byte strings among ``pieces`` were sent or never will be."""
    for piece in pieces:
        if type(piece) is SplicedBytes:
            piece.finish()
