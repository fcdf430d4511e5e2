"""One TCP connection to a node: pipelined requests, answered in any order, matched by id."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from cluster.client.backend import (
    NO_ANSWER,
    Slot,
    direct_socket,
    loop_clock_and_checkpoint,
    parking,
    shield_scope_class,
)
from cluster.client.errors import (
    ConnectionLostError,
    NotSentError,
    RequestTimeoutError,
    TidelogError,
)
from cluster.protocol import ProtocolError, ResponseDecoder, Status, request_frame
from cluster.protocol.limits import PROTOCOL_VERSION

if TYPE_CHECKING:
    import trio  # a caller's own nursery may hold the tasks

__all__ = ["Connection"]

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 256 * 1024
_IOV_MAX = 1024
"""Buffers one ``sendmsg`` takes at most (Linux's ``IOV_MAX``)."""
WRITE_EARLY_FRAMES = 16
"""Frames a gathering sender lets queue before they are written without waiting for it:
the node starts on them while the client still queues the rest, instead of the two
taking turns (measured with 64 one-message sends in flight: about 1.8x the messages/s
of one write of all 64, at the same CPU per message on each side)."""


async def _no_wait(sock: Any) -> None:
    raise AssertionError("only a connection with a direct socket waits on it")


_TIMED_OUT = object()
"""A slot's answer when its deadline passed first (see :meth:`Connection._expire_loop`)."""


class _TrioStream(anyio.abc.ByteStream):
    """A trio stream (``receive_some``/``send_all``) that a caller dialled itself, as the
    anyio byte stream a :class:`Connection` reads; trio's stream errors become anyio's.
    trio is imported only here, for such callers: the client itself dials with anyio."""

    def __init__(self, stream: Any) -> None:
        import trio

        self._stream = stream
        self._errors = (trio.BrokenResourceError, trio.ClosedResourceError)

    async def receive(self, max_bytes: int = RECEIVE_CHUNK) -> bytes:
        try:
            data: bytes = await self._stream.receive_some(max_bytes)
        except self._errors as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        try:
            await self._stream.send_all(item)
        except self._errors as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Connection:
    """One TCP connection with pipelined requests, answered in any order and matched by id.

    Owns two tasks (in the nursery given to :meth:`start`): the reader that matches
    responses to waiting requests, and the timer of their deadlines. There is no writer
    task: a request appends its frame to the outbox, and if nobody is sending, it sends
    everything queued itself (frames queued meanwhile by others go in the same loop), so
    pipelined requests share syscalls and an idle connection costs no task switch. Under
    trio on plain TCP, the socket is written to without an await whenever no ``send`` is
    under way (see :func:`~cluster.client.backend.direct_socket`).
    Any number of tasks may call :meth:`request` concurrently.

    Request timeouts share one timer task rather than a cancel scope each (a scope with
    a deadline costs more than the rest of a small request's own work): requests push
    their deadline on a heap, and the timer answers the ones still waiting at their
    deadline. Entries of answered requests leave the heap lazily, and the heap is
    rebuilt when they outnumber the waiting ones, so it stays within twice the requests
    in flight (plus a constant).
    """

    def __init__(
        self, stream: anyio.abc.ByteStream | Any, address: str, max_frame_size: int
    ) -> None:
        self.address = address
        self._stream = stream if isinstance(stream, anyio.abc.ByteStream) else _TrioStream(stream)
        self._decoder = ResponseDecoder(max_frame_size)
        self._max_frame_size = max_frame_size
        self._compact_sends = False
        """An answer on this connection came in protocol version 2: plain sends go compact."""
        self._version = PROTOCOL_VERSION
        """The ``v`` of the CBOR maps sent; 1 once the node refused version 2 (a node from
        before compact sends), and then for the connection's life."""
        self._ids = itertools.count(1)
        self._waiting: dict[int, Slot] = {}
        self._park, self._wake = parking()
        self._new_scope = shield_scope_class()
        self._now, self._checkpoint = loop_clock_and_checkpoint()
        self._outbox: list[bytes | memoryview] = []
        """Frames queued and not yet written, in order (the first may be a view of the part
        of a frame a write left)."""
        self._outbox_frames = 0
        self._sending = False
        """A task is sending the outbox (or parked to gather more before it does)."""
        self._gathering = False
        """The sending task is parked for one pass of the loop: nothing is being written."""
        self._socket = direct_socket(self._stream)
        """Written to without an await when no ``send`` is under way, and read by the
        reader task itself (see :func:`direct_socket`)."""
        self._wait_readable: Callable[[Any], Awaitable[None]] = _no_wait
        if self._socket is not None:  # under trio
            import trio

            self._wait_readable = trio.lowlevel.wait_readable
        self.writes = 0
        """Writes to the stream so far (diagnostics: frames per write)."""
        self._answered_any = False
        self._answered_last_read = 0
        """Answers the last receive held: more than one woke as many requesters at once."""
        self._closed: str | None = None
        self._cancel = anyio.CancelScope()
        self._deadlines: list[tuple[float, int]] = []
        """A heap of (deadline, request id); ids no longer waiting are dropped lazily."""
        self._timer_task = anyio.CancelScope()
        self._timer = anyio.CancelScope()
        """The timer task's sleep, due at the earliest deadline (see :meth:`_expire_loop`)."""

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def start(self, nursery: anyio.abc.TaskGroup | trio.Nursery) -> None:
        nursery.start_soon(self._run)
        nursery.start_soon(self._expire_loop)

    async def _run(self) -> None:
        """Read until the connection ends; the socket is closed however it ends (a
        cancelled nursery too: its Cancelled passes through ``self._cancel``, so the close
        must sit in ``finally``, forcefully since we are cancelled)."""
        try:
            with self._cancel:
                try:
                    await self._read_loop()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    self._fail(f"connection to {self.address} lost: {exc}{self._not_a_node_hint()}")
        finally:
            self._fail(f"connection to {self.address} closed")
            self._timer_task.cancel()  # nothing is left waiting
            await anyio.aclose_forcefully(self._stream)

    def _not_a_node_hint(self) -> str:
        """A peer that drops us before its first answer is rarely a tidelog client port:
        most often it is a master's replication port (``--ha-port``)."""
        if self._answered_any:
            return ""
        return (
            f". {self.address} hung up before answering anything: is it a node's client "
            "port (--port)? A master's replication port (--ha-port) hangs up on clients "
            "like this"
        )

    async def _receive(self) -> bytes:
        """The next bytes from the node (empty: it closed the connection)."""
        try:
            return await self._stream.receive(RECEIVE_CHUNK)
        except anyio.EndOfStream:
            return b""

    async def _receive_direct(self) -> bytes:
        """:meth:`_receive` from the socket itself under trio (see :func:`direct_socket`).

        After a read that answered one request, more is rarely there yet: wait until the
        socket is readable, then read, instead of the stream's read that tries first,
        fails and waits (a syscall less on each lone answer's path). After a read that
        answered several, more is likely there: read at once, then let the woken
        requesters run (as the stream's read does)."""
        sock = self._socket
        assert sock is not None
        if self._answered_last_read > 1:
            try:
                data = sock.recv(RECEIVE_CHUNK)
            except BlockingIOError:
                pass
            else:
                await self._checkpoint()
                return data
        while True:
            await self._wait_readable(sock)
            try:
                return sock.recv(RECEIVE_CHUNK)
            except BlockingIOError:  # woken without data after all: wait again
                continue

    async def _read_loop(self) -> None:
        receive = self._receive if self._socket is None else self._receive_direct
        while True:
            data = await receive()
            if not data:
                self._fail(f"node {self.address} closed the connection{self._not_a_node_hint()}")
                return
            self._decoder.feed(data)
            answered = 0
            for frame in self._decoder:
                answered += 1
                if isinstance(frame, ProtocolError):
                    self._answer(frame.req_id, frame)
                else:
                    if not self._compact_sends:
                        self._compact_sends = self._version == frame["v"] == PROTOCOL_VERSION
                    self._answer(frame["id"], frame)
            if answered:
                self._answered_any = True
            self._answered_last_read = answered

    def _answer(self, req_id: int, answer: object) -> None:
        slot = self._waiting.pop(req_id, None)
        if slot is None:
            if isinstance(answer, dict) and answer.get("status") is Status.FRAME_TOO_LARGE:
                self._fail(f"node closed the connection: {answer.get('error')}")
            else:
                log.warning("unmatched_response address=%s id=%d", self.address, req_id)
            return
        slot.answer = answer
        if slot.waker is not None:
            self._wake(slot.waker)

    # ---- request deadlines ------------------------------------------------------------------

    def _add_deadline(self, deadline: float, req_id: int) -> None:
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._waiting) + 64:  # mostly answered entries: drop them
            waiting = self._waiting
            deadlines[:] = [entry for entry in deadlines if entry[1] in waiting]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, (deadline, req_id))
        if deadline < self._timer.deadline:
            self._timer.deadline = deadline  # wakes the timer earlier

    async def _expire_loop(self) -> None:
        """Answer each request still waiting at its deadline with a timeout; ends with
        :meth:`_run` (a task of the same nursery)."""
        with self._timer_task:
            await self._expire_until_cancelled()

    async def _expire_until_cancelled(self) -> None:
        deadlines = self._deadlines
        while True:
            waiting = self._waiting
            while deadlines and deadlines[0][1] not in waiting:
                heapq.heappop(deadlines)
            now = anyio.current_time()
            while deadlines and deadlines[0][0] <= now:
                _, req_id = heapq.heappop(deadlines)
                slot = waiting.pop(req_id, None)
                if slot is not None and slot.answer is NO_ANSWER:
                    slot.answer = _TIMED_OUT
                    if slot.waker is not None:
                        self._wake(slot.waker)
            with anyio.CancelScope(deadline=deadlines[0][0] if deadlines else math.inf) as timer:
                self._timer = timer
                await anyio.sleep_forever()

    async def _send_outbox(self, *, gather: bool) -> None:
        """Send until the outbox is empty. Shielded: a half-sent frame would corrupt the
        stream for every other request on this connection.

        ``gather``: other requests are in flight, or the last receive answered several
        at once, so other tasks are likely about to queue frames too: let them run first
        (one pass of the event loop), and send their frames in one write instead of
        this one alone and then the rest (two writes, and two reads and two answers on
        the node; measured: 12% less CPU per message on each side with 64 one-message
        sends in flight). A lone request sends at once: waiting would only add latency.
        While the sender gathers, every :data:`WRITE_EARLY_FRAMES` queued frames are
        written by the task that queued the last of them (see :meth:`request`)."""
        self._sending = True
        try:
            with self._new_scope(shield=True):
                if gather:
                    self._gathering = True
                    try:
                        await self._checkpoint()
                    finally:
                        self._gathering = False
                while self._outbox:
                    if self._socket is not None:
                        self._write_now()  # what does not fit goes by ``send``
                        if not self._outbox:
                            break
                    frames, self._outbox = self._outbox, []
                    self._outbox_frames = 0
                    await self._stream.send(b"".join(frames))
                    self.writes += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._lost_while_sending(exc)
        finally:
            self._sending = False

    def _write_now(self) -> None:
        """Write as much of the outbox as the socket takes at once, without an await;
        only while no ``send`` is under way (the rest waits for one). One ``sendmsg`` of
        the frames as they are: none is copied into one buffer first (measured: 0.25 us a
        1 KiB frame less than appending each to a bytearray)."""
        assert self._socket is not None
        outbox = self._outbox
        try:
            sent = self._socket.sendmsg(outbox if len(outbox) <= _IOV_MAX else outbox[:_IOV_MAX])
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost_while_sending(exc)
            return
        self.writes += 1
        self._outbox_frames = 0  # a socket that took only part is not tried again at once
        written = 0
        for frame in outbox:
            size = len(frame)
            if sent < size:
                break
            sent -= size
            written += 1
        if written == len(outbox):
            self._outbox = []
        else:
            del outbox[:written]
            if sent:
                outbox[0] = memoryview(outbox[0])[sent:]

    def _lost_while_sending(self, exc: BaseException) -> None:
        self._outbox = []
        self._outbox_frames = 0
        self._fail(
            f"connection to {self.address} lost while sending: {exc}{self._not_a_node_hint()}"
        )

    def _fail(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot.answer = ConnectionLostError(reason)
            if slot.waker is not None:
                self._wake(slot.waker)

    def close(self) -> None:
        self._fail(f"connection to {self.address} closed by the client")
        self._cancel.cancel()

    async def request(self, op: str, timeout_s: float, /, **fields: Any) -> dict[str, Any]:
        """Send one request and return its response (any status): :meth:`request_fields`."""
        return await self.request_fields(op, timeout_s, fields)

    async def request_fields(
        self, op: str, timeout_s: float, fields: dict[str, Any]
    ) -> dict[str, Any]:
        """Send one request with ``fields`` (read, not changed) and return its response (any
        status); the one-message send's path, which builds ``fields`` itself.

        Raises :class:`ConnectionLostError` or :class:`RequestTimeoutError` when no
        answer comes (outcome unknown), :class:`NotSentError` when the connection was
        closed before the request was queued (nothing sent), ``ProtocolError`` for a
        request this client can tell is invalid before sending it.
        """
        if self._closed is not None:
            raise NotSentError(self._closed)
        req_id = next(self._ids)
        # Once an answer showed the node speaks version 2 (_compact_sends), a one-message
        # send in the common shape goes as a compact send (fixed layout); CBOR maps before.
        version = self._version
        frame = request_frame(
            op,
            req_id,
            fields,
            max_frame_size=self._max_frame_size,
            version=version,
            compact=self._compact_sends,
        )
        slot = Slot()
        waiting = self._waiting
        waiting[req_id] = slot
        self._outbox.append(frame)
        self._outbox_frames += 1
        if not self._sending:
            gather = len(waiting) > 1 or self._answered_last_read > 1
            if gather or self._socket is None:
                await self._send_outbox(gather=gather)
            else:  # a lone request: written at once, with no await unless the socket is full
                self._write_now()
                if self._outbox:
                    await self._send_outbox(gather=False)
        elif (
            self._gathering
            and self._outbox_frames >= WRITE_EARLY_FRAMES
            and self._socket is not None
        ):
            # The sender is parked, gathering: write what it gathered so far, so the
            # node starts on these while the other tasks still queue theirs.
            self._write_now()
        if slot.answer is NO_ANSWER:
            self._add_deadline(self._now() + timeout_s, req_id)
            await self._park(slot)
        answer = slot.answer
        if answer is _TIMED_OUT:
            raise RequestTimeoutError(
                f"no answer to {op!r} from {self.address} within {timeout_s:.1f}s; "
                "a write may or may not have been applied"
            )
        if log.isEnabledFor(logging.DEBUG):  # the request log: tidelog --log-level debug
            shown = answer.get("status") if isinstance(answer, dict) else answer
            log.debug("request op=%s id=%d address=%s answer=%s", op, req_id, self.address, shown)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, ProtocolError):
            raise TidelogError(answer.status, str(answer))
        assert isinstance(answer, dict)
        if (
            not self._compact_sends
            and answer["status"] is Status.UNSUPPORTED_VERSION
            and self._speak_older(version, answer)
        ):  # refused, so not executed: resend it in the version the node speaks
            return await self.request_fields(op, timeout_s, fields)
        return answer

    def _speak_older(self, sent_version: int, refusal: dict[str, Any]) -> bool:
        """Whether the node that refused a request of ``sent_version`` speaks version 1
        but not 2 (a node from before compact sends): if so, this connection speaks
        version 1 from now on."""
        supported = refusal.get("supported")
        if sent_version != PROTOCOL_VERSION or not isinstance(supported, list):
            return False
        if PROTOCOL_VERSION in supported or 1 not in supported:
            return False
        if self._version != 1:
            log.info("protocol_fallback address=%s version=1", self.address)
        self._version = 1
        return True
