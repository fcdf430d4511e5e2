"""Idempotent sends on a master: the thin I/O around :mod:`cluster.node.idempotence`.

The state lives in memory and is rebuilt from the log whenever it may be stale: at
the first idempotent send after the handler was built (a start) and after every role
change (:meth:`IdempotentSends.forget`, called when the ack policy is switched: a
promotion, an election, a demotion). The rebuild reads the log tail: from the first
segment holding records stored within the last :data:`REBUILD_WINDOW_S`, and never
more than the last :data:`REBUILD_MAX_BYTES`; only records flagged
``FLAG_PRODUCER_BATCH`` are decoded. It runs on the event loop in slices (no thread
shares the segment maps with the writer); idempotent sends wait for it, everything
else is served meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import attrs
import trio

from cluster.node.idempotence import (
    MAX_PRODUCER_ID,
    PRODUCER_PROPERTY,
    IdempotenceState,
    LandedBatch,
    ProducerMark,
    Verdict,
    format_mark,
    parse_mark,
)
from cluster.protocol import Status
from storage import (
    BatchAppendResult,
    CorruptSegmentError,
    Message,
    MessageStore,
    OffsetOutOfRangeError,
)
from storage.record import FLAG_PRODUCER_BATCH, encode_properties

_REFUSALS: Final = {
    Verdict.TOO_OLD: Status.SEQUENCE_TOO_OLD,
    Verdict.CONFLICT: Status.BAD_REQUEST,
    Verdict.FENCED: Status.PRODUCER_FENCED,
}
"""The status of each verdict that refuses a batch."""

__all__ = ["REBUILD_MAX_BYTES", "REBUILD_WINDOW_S", "IdempotentSends", "SendRefused", "Stored"]

log = logging.getLogger(__name__)

REBUILD_WINDOW_S: Final = 600
"""A rebuild reads every record stored within this many seconds (by the storing
master's clock): five times a producer's longest delivery timeout, the rest is margin
for clock skew between the masters."""
REBUILD_MAX_BYTES: Final = 256 * 1024 * 1024
"""A rebuild never reads more than this much of the log tail (about a second)."""
REBUILD_SLICE_RECORDS: Final = 4096
"""Records read between two checkpoints of the event loop during a rebuild."""


class SendRefused(Exception):
    """An idempotent batch refused before anything was written: ``status`` and why (the
    request handler answers with them)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen(slots=True)
class Stored:
    """Where a batch is: just appended, or found stored before (``duplicate``)."""

    queues: list[int]
    queue_offsets: list[int]
    offsets: list[int]
    end_offset: int
    store_us: int
    duplicate: bool


class IdempotentSends:
    """Appends idempotent batches at most once each; one per request handler.

    Invariant: every batch in :attr:`state` is in the log where it says (a batch is
    landed only once its records are written). Used by the handler's tasks on one
    event loop; an append cancelled midway may or may not have written its batch, so
    it looks in the log written since the append started: the batch is landed if
    there, its claim abandoned if not (a batch is never written without being
    remembered), and nothing else in the state changes.
    """

    def __init__(self, store: MessageStore) -> None:
        self._store = store
        self.state: IdempotenceState | None = None
        """None: to be rebuilt from the log before the next idempotent send."""
        self._generation = 0
        self._rebuilding = trio.Lock()
        self._landed = trio.Event()
        """Set (and replaced) when an append in progress ends while a copy of a batch
        waits (IN_PROGRESS); :attr:`_waiting` counts those copies."""
        self._waiting = 0
        self.rebuilds = 0
        self.last_rebuild: dict[str, Any] | None = None

    def forget(self) -> None:
        """The log may have changed under the state (a role change): rebuild before use."""
        self.state = None
        self._generation += 1

    def new_producer_id(self) -> int:
        """A random 63-bit id, none of the producers this node remembers."""
        while True:
            producer = secrets.randbelow(MAX_PRODUCER_ID) + 1
            if self.state is None or not self.state.remembers(producer):
                return producer

    async def append(
        self,
        producer: int,
        sequence: int,
        messages: Sequence[Any],
        build: Callable[[], list[Message]],
        put_batch: Callable[[list[Message]], Awaitable[BatchAppendResult]],
        epoch: int = 0,
    ) -> Stored:
        """Append the batch ``build`` makes, unless it is stored already.

        ``messages`` are the request's message maps (checked for the reserved property);
        ``build`` routes and builds the storage messages (what it raises passes through).
        Raises :class:`SendRefused` for a batch that breaks the rules.
        """
        count = len(messages)
        props = messages[0]["props"]
        if props and PRODUCER_PROPERTY in props:
            raise SendRefused(
                Status.BAD_REQUEST,
                f"property {PRODUCER_PROPERTY!r} is reserved (it carries the producer id and "
                "sequence of an idempotent send): rename it",
            )
        while True:
            state = await self._ready()
            decision = state.claim(producer, sequence, count, epoch)
            verdict = decision.verdict
            if verdict is Verdict.APPEND:
                return await self._append_claimed(
                    state, ProducerMark(producer, sequence, count, epoch), build, put_batch
                )
            if verdict is Verdict.DUPLICATE:
                assert decision.landed is not None
                return self._read_back(producer, epoch, decision.landed)
            if verdict is Verdict.IN_PROGRESS:
                self._waiting += 1
                try:
                    await self._landed.wait()
                finally:
                    self._waiting -= 1
                continue
            raise SendRefused(_REFUSALS[verdict], decision.reason)

    async def restart(self, producer: int, last_epoch: int) -> int:
        """A new epoch for a producer starting again with its id (``last_epoch``: the
        one it had, if it knows): every older copy of it is fenced from now on."""
        state = await self._ready()
        epoch = state.bump(producer, last_epoch)
        log.info("producer_restarted producer=%d epoch=%d", producer, epoch)
        return epoch

    async def _append_claimed(
        self,
        state: IdempotenceState,
        mark: ProducerMark,
        build: Callable[[], list[Message]],
        put_batch: Callable[[list[Message]], Awaitable[BatchAppendResult]],
    ) -> Stored:
        landed = False
        producer, sequence, epoch = mark.producer, mark.sequence, mark.epoch
        try:
            built = build()
            assert len(built) == mark.count
            built[0] = _marked(built[0], mark)
            before = self._store.commit_log.max_offset
            try:
                result = await put_batch(built)
            except BaseException:
                # Cancelled, or failed after writing (indexing it): whether the batch
                # was written is not known here (a shield on every batch cost more
                # than the rest of the bookkeeping); the log written since tells.
                landed = self._land_if_written(state, mark, before)
                raise
            state.land(producer, sequence, len(built), result.offsets[0], epoch)
            landed = True
            if state is not self.state:  # a role change while appending: re-read the log
                self.forget()
            return Stored(
                [m.queue_id for m in built],
                result.queue_offsets,
                result.offsets,
                result.end_offset,
                result.store_us,
                duplicate=False,
            )
        finally:
            if not landed:
                state.abandon(producer, sequence, epoch)
            if self._waiting:  # rare: a copy of a batch arrived while it was appended
                self._landed.set()
                self._landed = trio.Event()

    def _land_if_written(self, state: IdempotenceState, mark: ProducerMark, start: int) -> bool:
        """After an append was cancelled or failed: land its batch if the log holds it past
        ``start`` (the log's end before the append; the batch is written at once after
        the append's only wait, or not at all). True if landed; False leaves the claim
        to be abandoned. Other producers' state is untouched: it holds appends still in
        progress and epoch bumps that the log cannot give back."""
        commit_log = self._store.commit_log
        found: int | None = None
        try:
            for header in commit_log.iter_headers(start):
                offset, flags = header[0], header[6]
                if flags & FLAG_PRODUCER_BATCH:
                    record = commit_log.read(offset)
                    written = _mark_of(flags, record.properties)
                    record.release()
                    if written == mark:
                        found = offset
                        break
        except (OffsetOutOfRangeError, CorruptSegmentError, ValueError) as exc:
            # the log moved under the scan (a cut or retention): only a rebuild can tell
            log.warning("idempotence_cancelled_append_unknown start=%d error=%s", start, exc)
            self.forget()
            return False
        if state is not self.state:  # a role change meanwhile: the rebuild re-reads the log
            self.forget()
        if found is None:
            return False
        state.land(mark.producer, mark.sequence, mark.count, found, mark.epoch)
        return True

    def _read_back(self, producer: int, epoch: int, batch: LandedBatch) -> Stored:
        """The original answer of a stored batch, from its records."""
        commit_log = self._store.commit_log
        try:
            records = list(itertools.islice(commit_log.scan(batch.offset), batch.count))
        except (OffsetOutOfRangeError, CorruptSegmentError) as exc:
            raise SendRefused(
                Status.SEQUENCE_TOO_OLD,
                f"sequence {batch.sequence} of producer {producer} was stored at offset "
                f"{batch.offset}, which the log no longer holds ({exc})",
            ) from None
        try:
            mark = _mark_of(records[0].flags, records[0].properties) if records else None
            if len(records) != batch.count or mark != ProducerMark(
                producer, batch.sequence, batch.count, epoch
            ):
                raise SendRefused(
                    Status.INTERNAL_ERROR,
                    f"the batch of producer {producer} at sequence {batch.sequence} is "
                    f"remembered at offset {batch.offset} but the log holds {mark} there; "
                    "resend to the master",
                )
            stored_at = records[0].store_us  # one append stamps every record of a batch
            whole = sum(1 for record in records if record.store_us == stored_at)
            if whole != batch.count:
                raise SendRefused(
                    Status.INTERNAL_ERROR,
                    f"the batch of producer {producer} at sequence {batch.sequence} was only "
                    f"partly stored at offset {batch.offset} ({whole} of {batch.count} "
                    "records: its write failed or the node crashed during it) and was never "
                    "acknowledged: its other records are not in the log; read it back and "
                    "send what is missing as a new batch",
                )
            return Stored(
                [r.queue_id for r in records],
                [r.queue_offset for r in records],
                [r.physical_offset for r in records],
                records[-1].end_offset,
                records[0].store_us,
                duplicate=True,
            )
        finally:
            for record in records:
                record.release()

    async def _ready(self) -> IdempotenceState:
        state = self.state
        if state is not None:
            return state
        async with self._rebuilding:
            while self.state is None:
                generation = self._generation
                rebuilt = await self._rebuild()
                if generation == self._generation:
                    self.state = rebuilt
            return self.state

    async def _rebuild(self) -> IdempotenceState:
        """The state the log tail implies (see the module docstring for the bounds)."""
        started = time.monotonic()
        commit_log = self._store.commit_log
        end = commit_log.max_offset
        start = self._scan_start(end)
        marks: list[tuple[int, ProducerMark]] = []
        scanned = 0
        try:
            headers = commit_log.iter_headers(start, end)
            while True:
                chunk = list(itertools.islice(headers, REBUILD_SLICE_RECORDS))
                for offset, _size, _topic, _queue, _queue_offset, _tags, flags in chunk:
                    if flags & FLAG_PRODUCER_BATCH:
                        record = commit_log.read(offset)
                        mark = _mark_of(flags, record.properties)
                        record.release()
                        if mark is not None:
                            marks.append((offset, mark))
                scanned += len(chunk)
                if len(chunk) < REBUILD_SLICE_RECORDS:
                    break
                await trio.lowlevel.checkpoint()
        except (OffsetOutOfRangeError, CorruptSegmentError, ValueError) as exc:
            # retention removed a segment under the scan: what it read is still right
            log.warning("idempotence_rebuild_cut_short start=%d error=%s", start, exc)
        state = IdempotenceState.replay(marks)
        self.rebuilds += 1
        self.last_rebuild = {
            "start": start,
            "end": end,
            "records": scanned,
            "batches": len(marks),
            "producers": len(state),
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        log.info(
            "idempotence_rebuilt %s", " ".join(f"{k}={v}" for k, v in self.last_rebuild.items())
        )
        return state

    def _scan_start(self, end: int) -> int:
        """The base of the first segment that may hold a record stored within the window,
        and at most :data:`REBUILD_MAX_BYTES` before ``end``."""
        commit_log = self._store.commit_log
        low = max(commit_log.min_offset, end - REBUILD_MAX_BYTES)
        segments = list(commit_log.files.between(low, end))
        if not segments:
            return end
        cutoff_us = time.time_ns() // 1000 - REBUILD_WINDOW_S * 1_000_000
        for segment in reversed(segments):
            if segment.base >= end:
                continue
            try:
                record = commit_log.read(segment.base)
            except (OffsetOutOfRangeError, CorruptSegmentError):
                continue
            stored_us = record.store_us
            record.release()
            if stored_us < cutoff_us:
                return max(segment.base, segments[0].base)
        return segments[0].base


def _marked(message: Message, mark: ProducerMark) -> Message:
    """The first message of a batch, carrying its producer mark."""
    extra = encode_properties({PRODUCER_PROPERTY: format_mark(mark)})
    return Message(
        message.topic,
        message.body,
        message.queue_id,
        message.tags,
        message.properties + extra,
        message.born_us,
        message.flags | FLAG_PRODUCER_BATCH,
    )


def _mark_of(flags: int, properties: dict[str, str]) -> ProducerMark | None:
    if not flags & FLAG_PRODUCER_BATCH:
        return None
    text = properties.get(PRODUCER_PROPERTY)
    return parse_mark(text) if text is not None else None
