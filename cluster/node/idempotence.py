"""Idempotent sends, the decisions (sans-IO): which batch is new, which is a retry.

A producer gets an id (``init_producer``) and numbers its messages 0, 1, 2, ...; a
batch carries its producer id and its first sequence, and a retry is the same batch
again (same first sequence, same count). Per producer the master remembers the last
:data:`WINDOW_BATCHES` batches it stored (first sequence, count, log offset of the
first record); a batch it remembers is a duplicate and is answered with the original
offsets (read back from the log), anything else is appended.

**Gaps are accepted** (no in-order rule): a batch refused for its own sake (too large)
leaves a hole that no later batch could ever fill, and the cluster keeps no order
between a producer's concurrent batches anyway. What makes the window enough is the
producer's **span rule** (:class:`cluster.client.sequences.SequenceWindow`): it issues a batch only while fewer
than :data:`PRODUCER_SPAN` batches were issued from its oldest unanswered one on. So
while a batch B may still be retried, the batches in flight beside it lie within
``PRODUCER_SPAN - 1`` indices before or after it: at most ``2 * PRODUCER_SPAN - 2``
others can land after B, and ``WINDOW_BATCHES = 2 * PRODUCER_SPAN`` keeps B. The
``floor`` of a producer is the highest first sequence it evicted: a batch at or below
it that is not remembered was either stored and forgotten (a late copy) or breaks
the rule; the node cannot tell and answers ``SEQUENCE_TOO_OLD`` (never, for a retry
that keeps the rule: evicting a batch after B takes more landings than the rule allows).

At most :data:`MAX_PRODUCERS` producers are remembered, the least recently used
forgotten first; a forgotten producer starts afresh (its next batch is taken as new).

**Epochs fence a zombie** (Kafka's producer epoch): a producer that starts again with
its stored id (``init_producer`` naming it) gets a higher epoch and numbers from 0
again; from then on a batch of a lower epoch is ``FENCED`` (an older copy of the same
producer still running must stop, not interleave its sequences with the new one's).
The epoch is in every batch's mark, so a rebuild from the log knows it too; a bump
that no batch of the new epoch has landed after is known only to the master that
handed it out (a restarted or new master learns it with the new epoch's first batch).
"""

from __future__ import annotations

import array
import collections
import enum
from collections.abc import Iterable
from typing import Final

import attrs

from cluster.protocol.limits import MAX_PRODUCER_EPOCH, MAX_PRODUCER_ID

__all__ = [
    "MAX_EPOCH",
    "MAX_PRODUCERS",
    "MAX_PRODUCER_ID",
    "PRODUCER_PROPERTY",
    "PRODUCER_SPAN",
    "WINDOW_BATCHES",
    "Decision",
    "IdempotenceState",
    "LandedBatch",
    "ProducerMark",
    "Verdict",
    "format_mark",
    "parse_mark",
]

WINDOW_BATCHES: Final = 128
"""Batches remembered per producer."""
PRODUCER_SPAN: Final = WINDOW_BATCHES // 2
"""Batches a producer may have issued from its oldest unanswered one on."""
MAX_PRODUCERS: Final = 8192
"""Producers remembered at once (least recently used forgotten first): at most
``MAX_PRODUCERS * WINDOW_BATCHES`` entries of 24 bytes: 25 MB at worst."""
PRODUCER_PROPERTY: Final = "PRODUCER"
"""Reserved property of the first record of an idempotent batch (that record has
``FLAG_PRODUCER_BATCH``): ``"<producer id>:<first sequence>:<count>"``, with
``":<epoch>"`` after it from epoch 1 on (a mark of epoch 0 reads as it always did)."""
MAX_EPOCH: Final = MAX_PRODUCER_EPOCH
"""The highest producer epoch (a producer restarting once a second lasts 68 years)."""


@attrs.frozen(slots=True)
class ProducerMark:
    """What the first record of an idempotent batch carries."""

    producer: int
    sequence: int
    count: int
    epoch: int = 0


def format_mark(mark: ProducerMark) -> str:
    if mark.epoch:
        return f"{mark.producer}:{mark.sequence}:{mark.count}:{mark.epoch}"
    return f"{mark.producer}:{mark.sequence}:{mark.count}"


def parse_mark(text: str) -> ProducerMark | None:
    """The mark in a ``PRODUCER`` property; None for text that is not one."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(part.isdigit() for part in parts):
        return None
    producer, sequence, count = (int(part) for part in parts[:3])
    epoch = int(parts[3]) if len(parts) == 4 else 0
    if not 1 <= producer <= MAX_PRODUCER_ID or count < 1 or epoch > MAX_EPOCH:
        return None
    if len(parts) == 4 and epoch == 0:  # epoch 0 is written without it
        return None
    return ProducerMark(producer, sequence, count, epoch)


@attrs.frozen(slots=True)
class LandedBatch:
    """A batch stored in the log: its first sequence, count and first record's offset."""

    sequence: int
    count: int
    offset: int

    @property
    def end_sequence(self) -> int:
        return self.sequence + self.count


class Verdict(enum.Enum):
    APPEND = "append"
    """New: append it (it is now in progress; call land or abandon)."""
    DUPLICATE = "duplicate"
    """Stored before: answer with ``Decision.landed``'s offsets."""
    IN_PROGRESS = "in_progress"
    """The same batch is being appended right now: wait, then decide again."""
    TOO_OLD = "too_old"
    """Older than every batch remembered: whether it was stored cannot be told."""
    CONFLICT = "conflict"
    """Its sequences overlap another batch's: the producer reused sequences."""
    FENCED = "fenced"
    """Its epoch is older than the producer's: another copy of the producer took over."""


@attrs.frozen(slots=True)
class Decision:
    verdict: Verdict
    landed: LandedBatch | None = None
    reason: str = ""


_APPEND: Final = Decision(Verdict.APPEND)


class _Producer:
    """One producer's window: its last ``window`` landed batches in arrival order.

    Kept in three flat arrays used as a ring (24 bytes a batch, no object per batch),
    so a producer's window can be as wide as its pipeline. ``high`` is the end of the
    highest batch ever claimed or landed: a batch starting at or above it is new
    without looking at the window (every in-order send); only a batch below it (a
    retry, a late copy, a gap being filled) scans the window, at most ``window`` entries.
    """

    __slots__ = ("counts", "epoch", "floor", "head", "high", "offsets", "pending", "sequences")

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        """The highest epoch seen; the window holds this epoch's batches only."""
        self.sequences = array.array("Q")
        self.counts = array.array("Q")
        self.offsets = array.array("Q")
        self.head = 0
        """Slot of the oldest landed batch once the ring is full (0 until then)."""
        self.high = 0
        """End sequence of the highest batch claimed or landed (0: none yet)."""
        self.pending: dict[int, int] = {}
        """First sequence -> count of batches being appended now."""
        self.floor = -1
        """The highest first sequence evicted from the window (-1: none yet)."""

    def slot_of(self, sequence: int) -> int:
        """The slot of the landed batch starting at ``sequence``; -1 if none."""
        if sequence >= self.high:
            return -1
        try:
            return self.sequences.index(sequence)
        except ValueError:
            return -1

    def batch(self, slot: int) -> LandedBatch:
        return LandedBatch(self.sequences[slot], self.counts[slot], self.offsets[slot])

    def overlaps(self, sequence: int, count: int) -> int | None:
        """The first sequence of a landed or pending batch sharing a sequence with this one."""
        if sequence >= self.high:
            return None
        end = sequence + count
        for start, other in zip(self.sequences, self.counts, strict=True):
            if start < end and sequence < start + other:
                return start
        for start, pending_count in self.pending.items():
            if start < end and sequence < start + pending_count:
                return start
        return None

    def claim(self, sequence: int, count: int) -> None:
        self.pending[sequence] = count
        self.high = max(self.high, sequence + count)

    def land(self, batch: LandedBatch, window: int) -> None:
        claimed = self.pending.pop(batch.sequence, None) is not None
        if not claimed and self.slot_of(batch.sequence) >= 0:
            return  # landed before (a replay of what is remembered)
        self.high = max(self.high, batch.end_sequence)
        if len(self.sequences) < window:
            self.sequences.append(batch.sequence)
            self.counts.append(batch.count)
            self.offsets.append(batch.offset)
            return
        slot = self.head
        self.floor = max(self.floor, self.sequences[slot])
        self.sequences[slot] = batch.sequence
        self.counts[slot] = batch.count
        self.offsets[slot] = batch.offset
        self.head = (slot + 1) % window

    def arrival_slots(self) -> list[int]:
        """Slots of the landed batches, oldest arrival first."""
        size = len(self.sequences)
        return [(self.head + i) % size for i in range(size)]


class IdempotenceState:
    """What a master remembers of its idempotent producers (see the module docstring).

    Invariants: per producer at most ``window`` landed batches, none overlapping; at
    most ``max_producers`` producers. Not thread-safe: one handler on the event loop
    owns it. The same batches landed in the same order give the same state, whether
    live or replayed from the log (:meth:`land` is all a rebuild calls).
    """

    def __init__(self, window: int = WINDOW_BATCHES, max_producers: int = MAX_PRODUCERS) -> None:
        assert window >= 1 and max_producers >= 1
        self.window = window
        self.max_producers = max_producers
        self._producers: collections.OrderedDict[int, _Producer] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._producers)

    def remembers(self, producer: int) -> bool:
        return producer in self._producers

    def _producer(self, producer: int, epoch: int = 0) -> _Producer:
        """The producer's window, new if it was not remembered or ``epoch`` is newer."""
        state = self._producers.get(producer)
        if state is None:
            state = self._producers[producer] = _Producer(epoch)
            if len(self._producers) > self.max_producers:
                self._producers.popitem(last=False)
        else:
            self._producers.move_to_end(producer)
            if epoch > state.epoch:  # a new epoch numbers from 0 again
                state = self._producers[producer] = _Producer(epoch)
        return state

    def epoch(self, producer: int) -> int:
        """The producer's highest epoch remembered (0 when forgotten or never bumped)."""
        state = self._producers.get(producer)
        return 0 if state is None else state.epoch

    def bump(self, producer: int, at_least: int = 0) -> int:
        """A new epoch for ``producer`` (restarting with its id): one above both what is
        remembered and ``at_least`` (what the producer last had); older epochs are fenced."""
        epoch = max(self.epoch(producer), at_least) + 1
        assert epoch <= MAX_EPOCH
        self._producer(producer, epoch)
        return epoch

    def claim(self, producer: int, sequence: int, count: int, epoch: int = 0) -> Decision:
        """Decide about a batch; an ``APPEND`` verdict marks it in progress."""
        assert count >= 1
        state = self._producer(producer, epoch)
        if epoch < state.epoch:
            return Decision(
                Verdict.FENCED,
                reason=f"producer {producer} was started again (epoch {state.epoch}); this "
                f"copy of it has epoch {epoch} and may no longer send: stop it, or start it "
                "again (init_producer with its id) to take over",
            )
        if sequence >= state.high:  # beyond everything claimed: new (every in-order send)
            state.claim(sequence, count)
            return _APPEND
        slot = state.slot_of(sequence)
        if slot >= 0:
            landed = state.batch(slot)
            if landed.count != count:
                return Decision(
                    Verdict.CONFLICT,
                    reason=f"sequence {sequence} of producer {producer} was a batch of "
                    f"{landed.count}, not {count}: resend a batch exactly as it was first sent",
                )
            return Decision(Verdict.DUPLICATE, landed)
        pending = state.pending.get(sequence)
        if pending == count:
            return Decision(Verdict.IN_PROGRESS)
        other = state.overlaps(sequence, count)
        if other is not None:
            return Decision(
                Verdict.CONFLICT,
                reason=f"sequences {sequence}..{sequence + count - 1} of producer {producer} "
                f"overlap the batch starting at {other}: a producer numbers every message once",
            )
        if sequence <= state.floor:
            return Decision(
                Verdict.TOO_OLD,
                reason=f"sequence {sequence} of producer {producer} is older than the last "
                f"{self.window} batches this node remembers for it: whether it was stored "
                "cannot be told (a producer keeps at most "
                f"{PRODUCER_SPAN} batches outstanding)",
            )
        state.claim(sequence, count)
        return _APPEND

    def land(self, producer: int, sequence: int, count: int, offset: int, epoch: int = 0) -> None:
        """A batch is in the log with its first record at ``offset`` (live or replayed);
        one of an epoch older than the producer's is not remembered (it is never
        resent: its copy of the producer is fenced)."""
        state = self._producer(producer, epoch)
        if epoch == state.epoch:
            state.land(LandedBatch(sequence, count, offset), self.window)

    def abandon(self, producer: int, sequence: int, epoch: int = 0) -> None:
        """An append in progress failed: nothing of it is in the log."""
        state = self._producers.get(producer)
        if state is not None and state.epoch == epoch:
            state.pending.pop(sequence, None)

    def landed(self, producer: int) -> list[LandedBatch]:
        """The producer's remembered batches, oldest arrival first (for tests and status)."""
        state = self._producers.get(producer)
        if state is None:
            return []
        return [state.batch(slot) for slot in state.arrival_slots()]

    def producers(self) -> list[int]:
        """Remembered producers, least recently used first."""
        return list(self._producers)

    @classmethod
    def replay(
        cls,
        marks: Iterable[tuple[int, ProducerMark]],
        *,
        window: int = WINDOW_BATCHES,
        max_producers: int = MAX_PRODUCERS,
    ) -> IdempotenceState:
        """The state a log tail implies: its marks (offset, mark) in log order."""
        state = cls(window, max_producers)
        for offset, mark in marks:
            state.land(mark.producer, mark.sequence, mark.count, offset, mark.epoch)
        return state
