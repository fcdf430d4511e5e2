"""The idempotence decisions: any interleaving of sends, retries, lost answers and late
copies stores every sequence at most once, and every answer a batch gets names the
same offset."""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st

from cluster.client.sequences import IssuedBatch, SequenceWindow
from cluster.node.idempotence import (
    MAX_EPOCH,
    PRODUCER_SPAN,
    WINDOW_BATCHES,
    IdempotenceState,
    ProducerMark,
    Verdict,
    format_mark,
    parse_mark,
)

SMALL_WINDOW = 6
"""The simulation's window (span 3): small, so evictions and late copies happen."""


@attrs.define
class _Simulation:
    """Producers keeping the span rule, a network that loses, delays and repeats
    requests and answers, one node deciding, and a log."""

    state: IdempotenceState = attrs.field(factory=lambda: IdempotenceState(window=SMALL_WINDOW))
    log: list[tuple[int, int]] = attrs.field(factory=list)
    """(producer, sequence) per stored message, in log order; offset = index."""
    windows: dict[int, SequenceWindow] = attrs.field(factory=dict)
    unresolved: dict[tuple[int, int], IssuedBatch] = attrs.field(factory=dict)
    network: list[tuple[int, IssuedBatch]] = attrs.field(factory=list)
    answers: dict[tuple[int, int], set[int]] = attrs.field(factory=dict)

    def deliver(self, producer: int, batch: IssuedBatch, *, answer_arrives: bool) -> None:
        decision = self.state.claim(producer, batch.sequence, batch.count)
        key = (producer, batch.index)
        retry = key in self.unresolved
        if decision.verdict is Verdict.APPEND:
            offset = len(self.log)
            self.log.extend((producer, batch.sequence + i) for i in range(batch.count))
            self.state.land(producer, batch.sequence, batch.count, offset)
        elif decision.verdict is Verdict.DUPLICATE:
            assert decision.landed is not None
            offset = decision.landed.offset
        else:
            # a retry that keeps the span rule is never refused
            assert not retry, (decision, batch)
            return
        self.answers.setdefault(key, set()).add(offset)
        if answer_arrives and retry:
            self.windows[producer].resolve(batch)
            del self.unresolved[key]


@given(st.data())
def test_every_sequence_is_stored_once_and_answered_with_one_offset(data: st.DataObject) -> None:
    sim = _Simulation()
    producers = data.draw(st.lists(st.integers(1, 2**63 - 1), min_size=1, max_size=3, unique=True))
    for producer in producers:
        sim.windows[producer] = SequenceWindow(span=SMALL_WINDOW // 2)
    for _ in range(data.draw(st.integers(0, 60))):
        action = data.draw(st.sampled_from(["issue", "send", "deliver", "lose", "give_up"]))
        if action == "issue":
            producer = data.draw(st.sampled_from(producers))
            window = sim.windows[producer]
            if window.may_issue():
                batch = window.issue(data.draw(st.integers(1, 3)))
                sim.unresolved[(producer, batch.index)] = batch
                sim.network.append((producer, batch))
        elif action == "send" and sim.unresolved:  # a retry of an unanswered batch
            producer, index = data.draw(st.sampled_from(sorted(sim.unresolved)))
            sim.network.append((producer, sim.unresolved[(producer, index)]))
        elif action == "deliver" and sim.network:
            producer, batch = sim.network.pop(data.draw(st.integers(0, len(sim.network) - 1)))
            sim.deliver(producer, batch, answer_arrives=data.draw(st.booleans()))
        elif action == "lose" and sim.network:
            sim.network.pop(data.draw(st.integers(0, len(sim.network) - 1)))
        elif action == "give_up" and sim.unresolved:  # the producer's deadline passed
            key = data.draw(st.sampled_from(sorted(sim.unresolved)))
            sim.windows[key[0]].resolve(sim.unresolved.pop(key))
    assert len(sim.log) == len(set(sim.log)), "a sequence was stored twice"
    for offsets in sim.answers.values():
        assert len(offsets) == 1, "a batch was answered with two offsets"
    replayed = IdempotenceState.replay(
        (
            (offset, ProducerMark(p, s, c))
            for offset, (p, s, c) in _batches_in(sim.log, sim.answers, sim.windows)
        ),
        window=SMALL_WINDOW,
    )
    for producer in producers:
        assert replayed.landed(producer) == sim.state.landed(producer)


def _batches_in(
    log: list[tuple[int, int]],
    answers: dict[tuple[int, int], set[int]],
    windows: dict[int, SequenceWindow],
) -> list[tuple[int, tuple[int, int, int]]]:
    """(offset, (producer, first sequence, count)) of every stored batch, in log order."""
    starts = sorted({next(iter(offsets)) for offsets in answers.values()})
    batches = []
    for index, offset in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(log)
        producer, sequence = log[offset]
        batches.append((offset, (producer, sequence, end - offset)))
    return batches


def test_a_remembered_batch_is_a_duplicate_with_its_offsets() -> None:
    state = IdempotenceState()
    assert state.claim(7, 0, 3).verdict is Verdict.APPEND
    state.land(7, 0, 3, offset=4096)
    decision = state.claim(7, 0, 3)
    assert decision.verdict is Verdict.DUPLICATE
    assert decision.landed is not None and decision.landed.offset == 4096
    assert state.claim(8, 0, 3).verdict is Verdict.APPEND, "another producer's sequence 0"


def test_a_batch_being_appended_is_in_progress_until_it_lands_or_is_abandoned() -> None:
    state = IdempotenceState()
    assert state.claim(7, 10, 2).verdict is Verdict.APPEND
    assert state.claim(7, 10, 2).verdict is Verdict.IN_PROGRESS
    state.abandon(7, 10)
    assert state.claim(7, 10, 2).verdict is Verdict.APPEND


def test_reused_sequences_are_a_conflict() -> None:
    state = IdempotenceState()
    state.claim(7, 10, 5)
    state.land(7, 10, 5, offset=0)
    assert state.claim(7, 10, 4).verdict is Verdict.CONFLICT, "same start, other count"
    assert state.claim(7, 12, 1).verdict is Verdict.CONFLICT, "inside a stored batch"
    assert state.claim(7, 8, 3).verdict is Verdict.CONFLICT, "runs into a stored batch"
    state.claim(7, 20, 5)
    assert state.claim(7, 22, 1).verdict is Verdict.CONFLICT, "inside a pending batch"
    assert state.claim(7, 15, 5).verdict is Verdict.APPEND, "the gap between them"


def test_gaps_are_accepted_and_filled_later() -> None:
    state = IdempotenceState()
    state.claim(7, 5, 1)
    state.land(7, 5, 1, offset=0)
    assert state.claim(7, 0, 5).verdict is Verdict.APPEND


def test_a_batch_at_or_below_an_evicted_one_is_too_old() -> None:
    state = IdempotenceState(window=4)
    for sequence in range(6):
        state.claim(7, sequence, 1)
        state.land(7, sequence, 1, offset=sequence * 100)
    assert [b.sequence for b in state.landed(7)] == [2, 3, 4, 5]
    assert state.claim(7, 1, 1).verdict is Verdict.TOO_OLD
    assert state.claim(7, 2, 1).verdict is Verdict.DUPLICATE
    assert state.claim(7, 6, 1).verdict is Verdict.APPEND


def test_the_least_recently_used_producer_is_forgotten_first() -> None:
    state = IdempotenceState(max_producers=2)
    for producer in (1, 2):
        state.claim(producer, 0, 1)
        state.land(producer, 0, 1, offset=producer)
    state.claim(1, 1, 1)  # producer 1 used again: 2 is now the oldest
    state.claim(3, 0, 1)
    assert state.producers() == [1, 3]
    assert not state.remembers(2)
    assert state.claim(2, 0, 1).verdict is Verdict.APPEND, "forgotten: starts afresh"


def test_the_span_rule_counts_from_the_oldest_unresolved_batch() -> None:
    window = SequenceWindow(span=3)
    first = window.issue(2)
    second = window.issue(1)
    assert (first.sequence, second.sequence) == (0, 2)
    window.issue(1)
    assert not window.may_issue()
    window.resolve(second)
    assert not window.may_issue(), "the oldest unresolved one still holds the span"
    window.resolve(first)
    assert window.may_issue()
    assert window.issue(1).sequence == 4


def test_the_worst_case_the_span_rule_allows_still_finds_the_batch() -> None:
    """Span - 1 batches issued before B and span - 1 after it all land after B (whose
    answer was lost): B's retry is still a duplicate with the node's window. The
    hypothesis simulation rarely builds this order; with a window of 2 * span - 2 it
    would fail here."""
    state = IdempotenceState()
    window = SequenceWindow(PRODUCER_SPAN)
    before = [window.issue(1) for _ in range(PRODUCER_SPAN - 1)]
    late = window.issue(2)
    assert state.claim(1, late.sequence, 2).verdict is Verdict.APPEND
    state.land(1, late.sequence, 2, offset=1000)  # its answer is lost
    for batch in before:
        assert state.claim(1, batch.sequence, 1).verdict is Verdict.APPEND
        state.land(1, batch.sequence, 1, offset=batch.index)
        window.resolve(batch)
    after = []
    while window.may_issue():
        after.append(window.issue(1))
    assert len(after) == PRODUCER_SPAN - 1
    for batch in after:
        assert state.claim(1, batch.sequence, 1).verdict is Verdict.APPEND
        state.land(1, batch.sequence, 1, offset=2000 + batch.index)
    retry = state.claim(1, late.sequence, 2)
    assert retry.verdict is Verdict.DUPLICATE
    assert retry.landed is not None and retry.landed.offset == 1000


def test_the_window_holds_what_the_span_allows() -> None:
    assert WINDOW_BATCHES >= 2 * PRODUCER_SPAN - 1
    assert SequenceWindow().span == PRODUCER_SPAN


@given(
    st.integers(1, 2**63 - 1),
    st.integers(0, 2**63),
    st.integers(1, 4096),
    st.integers(0, MAX_EPOCH),
)
def test_a_mark_reads_back(producer: int, sequence: int, count: int, epoch: int) -> None:
    mark = ProducerMark(producer, sequence, count, epoch)
    assert parse_mark(format_mark(mark)) == mark


@given(st.text(max_size=30))
def test_a_mark_that_is_not_one_is_none(text: str) -> None:
    mark = parse_mark(text)
    assert mark is None or format_mark(mark) == text


@attrs.define
class _PlainWindow:
    """The window rules written plainly (every batch an entry, every check a scan): the
    flat ring with its fast path must decide exactly like this."""

    window: int
    landed: list[tuple[int, int, int]] = attrs.field(factory=list)
    pending: dict[int, int] = attrs.field(factory=dict)
    floor: int = -1

    def claim(self, sequence: int, count: int) -> Verdict:
        for start, landed_count, _offset in self.landed:
            if start == sequence:
                return Verdict.DUPLICATE if landed_count == count else Verdict.CONFLICT
        if self.pending.get(sequence) == count:
            return Verdict.IN_PROGRESS
        spans = [(s, c) for s, c, _ in self.landed] + list(self.pending.items())
        if any(s < sequence + count and sequence < s + c for s, c in spans):
            return Verdict.CONFLICT
        if sequence <= self.floor:
            return Verdict.TOO_OLD
        self.pending[sequence] = count
        return Verdict.APPEND

    def land(self, sequence: int, count: int, offset: int) -> None:
        self.pending.pop(sequence, None)
        if any(s == sequence for s, _, _ in self.landed):
            return
        self.landed.append((sequence, count, offset))
        if len(self.landed) > self.window:
            self.floor = max(self.floor, self.landed.pop(0)[0])


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["claim", "land", "abandon", "replay", "rebuild"]),
            st.integers(0, 40),
            st.integers(1, 4),
        ),
        max_size=80,
    )
)
def test_the_flat_window_decides_like_the_plain_rules(
    steps: list[tuple[str, int, int]],
) -> None:
    state, plain = IdempotenceState(window=5), _PlainWindow(window=5)
    for offset, (action, sequence, count) in enumerate(steps):
        if action == "claim":
            decision = state.claim(1, sequence, count)
            assert decision.verdict is plain.claim(sequence, count), (sequence, count)
            if decision.verdict is Verdict.DUPLICATE:
                assert decision.landed is not None
                assert [(decision.landed.sequence, decision.landed.count)] == [
                    (s, c) for s, c, _ in plain.landed if s == sequence
                ]
        elif action == "land" and plain.pending:  # an append in progress completes
            start = sorted(plain.pending)[sequence % len(plain.pending)]
            pending_count = plain.pending[start]
            state.land(1, start, pending_count, offset)
            plain.land(start, pending_count, offset)
        elif action == "abandon" and plain.pending:
            start = sorted(plain.pending)[sequence % len(plain.pending)]
            state.abandon(1, start)
            plain.pending.pop(start)
        elif action == "replay" and plain.landed:  # the same batch read again from the log
            start, landed_count, landed_offset = plain.landed[sequence % len(plain.landed)]
            state.land(1, start, landed_count, landed_offset)
            plain.land(start, landed_count, landed_offset)
        elif action == "rebuild":  # a batch read from the log that was never claimed here
            spans = [(s, c) for s, c, _ in plain.landed] + list(plain.pending.items())
            if not any(s < sequence + count and sequence < s + c for s, c in spans):
                state.land(1, sequence, count, offset)
                plain.land(sequence, count, offset)
        assert [(b.sequence, b.count, b.offset) for b in state.landed(1)] == plain.landed


@given(
    st.lists(
        st.tuples(st.sampled_from(["old", "new", "bump"]), st.integers(0, 30), st.booleans()),
        max_size=60,
    )
)
def test_after_a_bump_the_older_epoch_is_fenced_and_the_newer_never_is(
    steps: list[tuple[str, int, bool]],
) -> None:
    """A zombie (the older epoch) and its restart (the newer) interleave their batches
    with bumps: once an epoch is bumped past, its batches are FENCED; the newest epoch's
    batches never are; a replay of what landed knows the same epoch."""
    state = IdempotenceState(window=4)
    epochs = {"old": 0, "new": 0}
    landed: list[tuple[int, ProducerMark]] = []
    for offset, (who, sequence, lands) in enumerate(steps):
        if who == "bump":
            epochs["new"] = state.bump(7, epochs["new"])
            assert epochs["new"] == state.epoch(7)
            continue
        epoch = epochs[who]
        decision = state.claim(7, sequence, 1, epoch)
        newest = state.epoch(7)
        assert (decision.verdict is Verdict.FENCED) is (epoch < newest), (who, epoch, newest)
        if decision.verdict is Verdict.FENCED:
            assert f"epoch {newest}" in decision.reason
        if decision.verdict is Verdict.APPEND and lands:
            state.land(7, sequence, 1, offset, epoch)
            landed.append((offset, ProducerMark(7, sequence, 1, epoch)))
        elif decision.verdict is Verdict.APPEND:
            state.abandon(7, sequence, epoch)
    replayed = IdempotenceState.replay(landed, window=4)
    assert replayed.epoch(7) == max((mark.epoch for _, mark in landed), default=0)
    if replayed.epoch(7) == state.epoch(7):
        assert replayed.landed(7) == state.landed(7)
    else:  # bumped, and no batch of the new epoch landed yet: only this state knows it
        assert replayed.epoch(7) < state.epoch(7) and state.landed(7) == []


def test_a_new_epoch_numbers_from_zero_again() -> None:
    state = IdempotenceState()
    state.claim(7, 0, 1)
    state.land(7, 0, 1, offset=0)
    assert state.bump(7) == 1
    assert state.landed(7) == [], "the new epoch's window starts empty"
    assert state.claim(7, 0, 1, epoch=1).verdict is Verdict.APPEND
    assert state.claim(7, 0, 1, epoch=0).verdict is Verdict.FENCED
    assert state.bump(7, at_least=5) == 6, "above what the producer says it had"
