"""Producing: sends batched like Kafka's ``linger.ms``, and what is known about each one."""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from cluster.client.backend import Event, event_class
from cluster.client.errors import (
    ConnectionLostError,
    NotSentError,
    RequestTimeoutError,
    TidelogError,
)
from cluster.client.sequences import IssuedBatch, SequenceWindow
from cluster.protocol import Acks, ProtocolError, Status, batch_results
from storage.backoff import Backoff

if TYPE_CHECKING:
    from cluster.client.client import Client

__all__ = ["Outcome", "Producer", "SendResult"]

log = logging.getLogger(__name__)

Outcome = Literal["ok", "failed", "unknown"]

_ONE_MESSAGE_REFUSED: Final = frozenset(
    {Status.MESSAGE_TOO_LARGE, Status.BAD_REQUEST, Status.FRAME_TOO_LARGE}
)
"""Statuses that can be about one message of a batch: a batch the producer merged from
separate sends is resent one by one, so only the bad message is refused."""

_OK: Final = Status.OK
"""(A module global: an enum member read through its class costs a descriptor call on
Python 3.11, on every send's path.)"""
_ACKS_VALUES: Final = {acks: acks.value for acks in Acks}
"""Each level's wire value, looked up without the enum's ``value`` descriptor."""

MAX_DELIVERY_TIMEOUT_MS: Final = 300_000
"""An idempotent producer retries for at most this long: a new master rebuilds what it
must deduplicate from the last 10 minutes of its log, with room for clock skew."""


@attrs.frozen
class SendResult:
    """What is known about one sent message.

    ``outcome`` is ``"ok"`` when the node acknowledged it at the requested level,
    ``"failed"`` when nothing was written (``status`` says why; None: no connection could
    be made, so nothing was sent), and
    ``"unknown"`` when it may or may not be stored (a flush timeout, no answer).
    Offsets are set whenever the node reported them (``OK`` and flush timeouts).
    """

    outcome: Outcome
    status: Status | None
    topic: str
    queue: int | None = None
    queue_offset: int | None = None
    offset: int | None = None
    store_us: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def raise_for_outcome(self) -> SendResult:
        """Return self when ok; raise :class:`TidelogError` (status None = unknown) otherwise."""
        if self.outcome != "ok":
            raise TidelogError(self.status, self.error or self.outcome)
        return self


def _worth_resending(result: SendResult) -> bool:
    """An idempotent batch is sent again until the deadline while its outcome is unknown
    (the node recognises it if it was stored) or nothing was applied for a passing
    reason (no node reachable, no master yet): like Kafka's ``delivery.timeout.ms``."""
    if result.outcome == "unknown":
        return result.status is not Status.SEQUENCE_TOO_OLD
    return result.outcome == "failed" and (result.status is None or result.status.retryable)


def _result(topic: str, status: Status, entry: Mapping[str, Any], error: str | None) -> SendResult:
    if status is _OK:
        outcome: Outcome = "ok"
    elif status.outcome_unknown:
        outcome = "unknown"
    else:
        outcome = "failed"
    return SendResult(
        outcome,
        status,
        topic,
        entry.get("queue"),
        entry.get("queue_offset"),
        entry.get("offset"),
        entry.get("store_us"),
        error,
    )


@attrs.define
class _Pending:
    """A message waiting in the accumulator, and where its result goes."""

    message: dict[str, Any]
    done: Event
    result: SendResult | None = None


class Producer:
    """Sends messages, batching concurrent sends like Kafka's ``linger.ms``/``batch.size``.

    Every :meth:`send` joins the open batch of its (topic, acks); a batch leaves
    when it holds ``batch_size`` messages or ``max_batch_bytes`` of bodies, or
    ``linger_ms`` after its first message (0: at the next scheduling point, so
    sends made in the same moment still share a request). Batches are pipelined.
    Retryable statuses (``NOT_MASTER``, ``SLAVE_NOT_AVAILABLE``, ``SHUTTING_DOWN``,
    ``TOO_MANY_CONNECTIONS``) are retried with exponential backoff, nothing else is;
    ``NOT_MASTER`` naming a master is followed at once (the producer then sends there
    until that master cannot be reached). A merged batch the node refuses for one
    message's sake (``MESSAGE_TOO_LARGE``, ...) is resent message by message, so only
    the bad one fails. Any number of tasks may call :meth:`send` concurrently.

    With ``idempotent=True`` the producer asks the master for an id (``init_producer``)
    and numbers its messages; a batch whose outcome is unknown (no answer, a flush
    timeout, a failed disk) or that found no master (no node reachable, an election
    running) is sent again, with the same numbers, until it is answered or
    ``delivery_timeout_ms`` passed since it was first sent: a node that stored it
    answers with the original offsets instead of storing it twice, also after a
    failover. ``producer_id`` (with the ``producer_epoch`` it last had, if known) starts
    a producer again under a stored id: the master hands out a higher epoch, and every
    older copy still sending with that id is refused ``PRODUCER_FENCED`` from then on
    (Kafka's producer fencing; a fenced producer stays fenced: make a new one). At most
    64 batches are outstanding from the oldest unanswered one on (the
    node's window); order between concurrent batches is not kept (neither is it
    without idempotence). ``unknown`` is then reported only past the deadline.
    """

    def __init__(
        self,
        client: Client,
        nursery: anyio.abc.TaskGroup,
        *,
        acks: str = "durable",
        linger_ms: float = 0.0,
        batch_size: int = 256,
        max_batch_bytes: int = 1 << 20,
        timeout_ms: int = 5000,
        retries: int = 10,
        retry_backoff_ms: float = 50.0,
        idempotent: bool = False,
        delivery_timeout_ms: int = 120_000,
        producer_id: int | None = None,
        producer_epoch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (1: no batching), got {batch_size}")
        if idempotent and not 0 < delivery_timeout_ms <= MAX_DELIVERY_TIMEOUT_MS:
            raise ValueError(
                f"delivery_timeout_ms must be 1..{MAX_DELIVERY_TIMEOUT_MS} for an idempotent "
                f"producer (the window a new master rebuilds), got {delivery_timeout_ms}"
            )
        self.idempotent = idempotent
        self.delivery_timeout = delivery_timeout_ms / 1000
        if producer_id is not None and not idempotent:
            raise ValueError("producer_id is for an idempotent producer: pass idempotent=True")
        self.producer_id: int | None = producer_id
        """The id ``init_producer`` handed out (idempotent producers, once they sent), or
        the stored id this producer starts again with (its older copies are then fenced)."""
        self.producer_epoch = producer_epoch
        """This producer's epoch (``init_producer`` hands out a higher one on a restart)."""
        self._sequences: SequenceWindow | None = None
        self._starting = anyio.Lock()
        self._new_event = event_class()
        self._issue_waiters: collections.deque[Event] = collections.deque()
        """Sends waiting for the span rule, first come first woken (as many as may issue)."""
        self._issuers_woken = 0
        """Sends woken from :attr:`_issue_waiters` that have not run yet."""
        self.client = client
        self._nursery = nursery
        self.acks = Acks(acks)
        self.linger = linger_ms / 1000
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.retry_backoff = retry_backoff_ms / 1000
        self._open: dict[tuple[str, Acks], list[_Pending]] = {}
        self._open_bytes: dict[tuple[str, Acks], int] = {}

    @property
    def master(self) -> str | None:
        """The master this producer's client sends to (None: not known yet)."""
        return self.client.master

    async def send(
        self,
        topic: str,
        body: bytes,
        *,
        key: bytes | str | None = None,
        queue: int | None = None,
        tags: str | None = None,
        props: Mapping[str, str] | None = None,
        acks: str | None = None,
    ) -> SendResult:
        """Send one message; returns once its outcome is known (or known to be unknown)."""
        message: dict[str, Any] = {"body": body}
        if key is not None:
            message["key"] = key
        if queue is not None:
            message["queue"] = queue
        if tags is not None:
            message["tags"] = tags
        if props:
            message["props"] = dict(props)
        level = Acks(acks) if acks else self.acks
        if self.batch_size == 1:  # every send is its own request: no accumulator to join
            return (await self._deliver(topic, level, [message]))[0]
        batch_key = (topic, level)
        pending = _Pending(message, self._new_event())
        full = self._join(batch_key, pending)
        if full is not None:  # this send filled the batch: deliver it from this task
            await self._send_batch(batch_key, full)
        else:
            await pending.done.wait()
        assert pending.result is not None
        return pending.result

    async def send_batch(
        self,
        topic: str,
        bodies: Sequence[bytes],
        *,
        queue: int | None = None,
        key: bytes | str | None = None,
        acks: str | None = None,
    ) -> list[SendResult]:
        """Send many messages as one request (RocketMQ's batch send): appended together,
        all or nothing, one ack wait for all. Returns one result per body, in order."""
        message: dict[str, Any] = {}
        if queue is not None:
            message["queue"] = queue
        if key is not None:
            message["key"] = key
        messages = [dict(message, body=body) for body in bodies]
        return await self._deliver(topic, Acks(acks) if acks else self.acks, messages)

    def _join(self, batch_key: tuple[str, Acks], pending: _Pending) -> list[_Pending] | None:
        """Add ``pending`` to the open batch; return the batch if it is now full (closed).
        Only with ``batch_size`` > 1 (:meth:`send` delivers each message itself otherwise)."""
        batch = self._open.get(batch_key)
        if batch is None:
            batch = []
            self._open[batch_key] = batch
            self._open_bytes[batch_key] = 0
            self._nursery.start_soon(self._linger_then_ship, batch_key, batch)
        batch.append(pending)
        self._open_bytes[batch_key] += len(pending.message["body"])
        if len(batch) >= self.batch_size or self._open_bytes[batch_key] >= self.max_batch_bytes:
            self._close(batch_key)
            return batch
        return None

    async def _linger_then_ship(self, batch_key: tuple[str, Acks], batch: list[_Pending]) -> None:
        if self.linger > 0:
            await anyio.sleep(self.linger)
        else:
            await anyio.lowlevel.checkpoint()
        if self._open.get(batch_key) is batch:
            self._close(batch_key)
            await self._send_batch(batch_key, batch)

    def _close(self, batch_key: tuple[str, Acks]) -> None:
        del self._open[batch_key]
        del self._open_bytes[batch_key]

    async def _send_batch(self, batch_key: tuple[str, Acks], batch: list[_Pending]) -> None:
        topic, acks = batch_key
        results = [self._unknown(topic, "the producer closed before the node answered")] * len(
            batch
        )
        try:
            results = await self._deliver(topic, acks, [p.message for p in batch])
            if len(batch) > 1 and results[0].status in _ONE_MESSAGE_REFUSED:
                # Refused whole, so nothing was written: each message gets its own answer.
                results = [(await self._deliver(topic, acks, [p.message]))[0] for p in batch]
        finally:  # every sender gets an answer, even when this task is cancelled
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()

    def _unknown(self, topic: str, why: str) -> SendResult:
        return SendResult("unknown", None, topic, error=why)

    async def _start_idempotence(self, topic: str, count: int) -> SequenceWindow | list[SendResult]:
        """The producer's sequence window, after asking the master for an id the first
        time; the results to report instead when no id could be had."""
        async with self._starting:
            if self._sequences is not None:
                return self._sequences
            restart: dict[str, int] = {}
            if self.producer_id is not None:  # starting again: fence the older copies
                restart = {"producer": self.producer_id, "epoch": self.producer_epoch}
            try:
                answer = await self.client.call_master(
                    "init_producer", resends=self.retries, **restart
                )
            except (ConnectionLostError, RequestTimeoutError, TidelogError) as exc:
                why = f"no producer id: {exc}"
                return [SendResult("failed", None, topic, error=why)] * count
            if answer["status"] is not Status.OK:
                why = f"no producer id ({answer.get('error')}): does the cluster support idempotent sends?"
                return [SendResult("failed", answer["status"], topic, error=why)] * count
            self.producer_id = answer["producer"]
            self.producer_epoch = answer.get("epoch", 0)
            self._sequences = SequenceWindow(answer.get("span", 64))
            log.info(
                "producer_started producer=%d epoch=%d span=%d",
                answer["producer"],
                self.producer_epoch,
                self._sequences.span,
            )
            return self._sequences

    async def _deliver_idempotent(
        self, topic: str, acks: Acks, messages: list[dict[str, Any]]
    ) -> list[SendResult]:
        """Number the batch once, then send it until its outcome is known or the
        delivery timeout passed (the node answers a stored batch with its offsets)."""
        sequences = self._sequences
        if sequences is None:
            started = await self._start_idempotence(topic, len(messages))
            if not isinstance(started, SequenceWindow):
                return started
            sequences = started
        batch = await self._issue(sequences, len(messages))
        deadline = anyio.current_time() + self.delivery_timeout
        backoff = Backoff(max(self.retry_backoff, 1e-3), max(self.retry_backoff, 0.25))
        try:
            while True:
                results = await self._deliver(topic, acks, messages, sequence=batch.sequence)
                if not _worth_resending(results[0]):
                    return results
                first = results[0]
                pause = min(backoff.next_delay_s(), deadline - anyio.current_time())
                if pause <= 0:
                    return results
                log.info(
                    "resend_idempotent producer=%s sequence=%d status=%s error=%s",
                    self.producer_id,
                    batch.sequence,
                    first.status,
                    first.error,
                )
                await anyio.sleep(pause)
        finally:
            sequences.resolve(batch)
            self._wake_issuers(sequences)

    async def _issue(self, sequences: SequenceWindow, count: int) -> IssuedBatch:
        """Number a batch once the span rule allows; waiting sends are woken in order,
        only as many as may issue (waking every waiter at each answer cost more CPU than
        the rest of an idempotent batch's bookkeeping)."""
        while self._issue_waiters or sequences.free() <= self._issuers_woken:
            turn = self._new_event()
            self._issue_waiters.append(turn)
            try:
                await turn.wait()
            except BaseException:
                if turn.is_set():  # woken, then cancelled: the turn passes on
                    self._issuers_woken -= 1
                    self._wake_issuers(sequences)
                else:
                    self._issue_waiters.remove(turn)
                raise
            self._issuers_woken -= 1
            if sequences.may_issue():
                break
        batch = sequences.issue(count)
        self._wake_issuers(sequences)
        return batch

    def _wake_issuers(self, sequences: SequenceWindow) -> None:
        wake = min(sequences.free() - self._issuers_woken, len(self._issue_waiters))
        for _ in range(wake):
            self._issue_waiters.popleft().set()
        self._issuers_woken += max(wake, 0)

    async def _deliver(
        self,
        topic: str,
        acks: Acks,
        messages: list[dict[str, Any]],
        *,
        sequence: int | None = None,
    ) -> list[SendResult]:
        """Send one batch to the master (the client follows hints and rediscovers it,
        resending only what was certainly not applied); one result per message.
        An idempotent producer numbers the batch first (``sequence``)."""
        if self.idempotent and sequence is None:
            return await self._deliver_idempotent(topic, acks, messages)
        timeout = self.timeout_ms / 1000 + self.client.config.request_timeout
        # One dict display (half the cost of a dict updated with the message afterwards).
        op = "send" if len(messages) == 1 else "send_batch"
        if sequence is None and op == "send":
            fields: dict[str, Any] = {
                "topic": topic,
                "acks": _ACKS_VALUES[acks],
                "timeout_ms": self.timeout_ms,
                **messages[0],
            }
        else:
            fields = {"topic": topic, "acks": _ACKS_VALUES[acks], "timeout_ms": self.timeout_ms}
            if sequence is not None:
                fields["producer"] = self.producer_id
                fields["sequence"] = sequence
                if self.producer_epoch:
                    fields["epoch"] = self.producer_epoch
            if op == "send":
                fields.update(messages[0])
            else:
                fields["messages"] = messages
        try:
            delivery = await self.client.deliver(
                op, timeout, fields, resends=self.retries, backoff_initial_s=self.retry_backoff
            )
        except ProtocolError as exc:  # rejected by this client before sending
            return [SendResult("failed", exc.status, topic, error=str(exc))] * len(messages)
        if isinstance(delivery.error, NotSentError):  # nothing was sent
            return [SendResult("failed", None, topic, error=delivery.error.message)] * len(messages)
        if delivery.error is not None:
            return [self._unknown(topic, delivery.error.message)] * len(messages)
        response = delivery.response
        assert response is not None
        status = response["status"]
        error = response.get("error")
        if len(messages) == 1 and "offsets" not in response:
            return [_result(topic, status, response, error)]
        entries = batch_results(response) if "offsets" in response else [{}] * len(messages)
        return [_result(topic, status, entry, error) for entry in entries]
