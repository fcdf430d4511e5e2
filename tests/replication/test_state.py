"""The pure replication decisions of :mod:`replication.state`, over generated histories:
the confirm offset never moves back, master and slave agree on where a stream starts,
carrying out the slave's plan and catching up makes it the master's exact copy (also
after retention or for a brand-new slave), and a new term is always newest."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from replication.epochs import EpochEntry, EpochHistory, followed_epoch, leader_is_stale
from replication.state import (
    StreamRefused,
    begin_term,
    follow_plan,
    next_confirm_offset,
    stream_start,
)
from tests.replication.test_epochs import Node, common_prefix, failovers, histories

offsets = st.integers(0, 2**40)
ack_maps = st.dictionaries(st.sampled_from("abcde"), offsets, max_size=5)


# ---- the confirm offset ---------------------------------------------------------------------


@given(offsets, ack_maps)
def test_confirm_offset_is_the_slowest_in_sync_ack_but_never_moves_back(
    current: int, acks: dict[str, int]
) -> None:
    after = next_confirm_offset(current, acks)
    assert after >= current
    if acks:
        assert after == max(current, min(acks.values()))
        assert after <= max(current, max(acks.values()))
    else:
        assert after == current


@given(st.lists(ack_maps, max_size=20))
def test_confirm_offset_over_any_sequence_of_memberships_is_monotonic(
    rounds: list[dict[str, int]],
) -> None:
    confirm = 0
    for acks in rounds:
        after = next_confirm_offset(confirm, acks)
        assert after >= confirm
        confirm = after


@given(offsets, ack_maps, st.integers(1, 6))
def test_an_advance_is_held_by_at_least_min_insync_replicas_slaves(
    current: int, acks: dict[str, int], min_insync_replicas: int
) -> None:
    """The replicated offset (what releases acks) never counts fewer slaves than
    ``min_insync_replicas``: with fewer in sync it stays, whoever acknowledged."""
    after = next_confirm_offset(current, acks, min_insync_replicas)
    assert after >= current
    if len(acks) < min_insync_replicas:
        assert after == current
    if after > current:
        assert sum(1 for ack in acks.values() if ack >= after) >= min_insync_replicas
        assert after == min(acks.values())


@given(st.lists(ack_maps, max_size=20), st.integers(1, 6))
def test_the_replicated_offset_never_passes_the_confirm_offset(
    rounds: list[dict[str, int]], min_insync_replicas: int
) -> None:
    """Both offsets follow the same in-sync acks, the replicated one only with enough
    slaves: a released write is always readable, and with a requirement of 1 the two
    are the same offset."""
    confirm = replicated = 0
    for acks in rounds:
        confirm = next_confirm_offset(confirm, acks)
        replicated = next_confirm_offset(replicated, acks, min_insync_replicas)
        assert replicated <= confirm
        if min_insync_replicas == 1:
            assert replicated == confirm


# ---- where a stream starts, and what the slave does -----------------------------------------


def start_for(follower: Node, leader: Node, log_start: int = 0) -> tuple[int, bool, bool]:
    start = stream_start(
        "s", follower.history, len(follower.log), leader.history, log_start, len(leader.log)
    )
    return start.offset, start.diverged, start.resync


@given(failovers())
def test_master_and_slave_agree_and_the_slave_ends_as_the_masters_copy(
    nodes: tuple[Node, Node],
) -> None:
    follower, leader = nodes
    assume(len(leader.history) > 0)
    followed = followed_epoch(follower.history)
    assume(not leader_is_stale(followed, leader.history))  # refused before this
    end = len(follower.log)
    try:
        offset, diverged, resync = start_for(follower, leader)
    except StreamRefused:
        # Only a slave that must be cut and has no history to show who wrote its records.
        assert not len(follower.history)
        assert common_prefix(follower.log, leader.log) < end
        return
    assert not resync
    assert offset == common_prefix(follower.log, leader.log), "trust only the proven prefix"
    assert diverged == (offset < end)
    plan = follow_plan(follower.history, end, leader.history, len(leader.log), offset)
    assert plan.start == offset and not plan.restart
    empty_terms = any(e.start_offset >= offset for e in follower.history.entries)
    assert plan.cut_to == (offset if offset < end or empty_terms else None)
    if plan.cut_to is not None:
        follower.truncate(plan.cut_to)
    for entry in plan.adopt:
        follower.history.append(entry.epoch, entry.start_offset)
    follower.log += leader.log[len(follower.log) :]
    assert follower.log == leader.log
    assert follower.history == leader.history


@given(failovers(), st.data())
def test_a_slave_behind_the_masters_log_start_restarts_there(
    nodes: tuple[Node, Node], data: st.DataObject
) -> None:
    follower, leader = nodes
    assume(len(leader.history) > 0 and len(follower.history) > 0)
    log_start = data.draw(st.integers(0, len(leader.log)), label="master log start")
    offset, _diverged, resync = start_for(follower, leader, log_start)
    proven = common_prefix(follower.log, leader.log)
    assert resync == (proven < log_start)
    assert offset == max(proven, log_start)
    end = len(follower.log)
    plan = follow_plan(follower.history, end, leader.history, len(leader.log), offset)
    assert plan.start == offset and plan.restart == resync
    if resync:  # nothing of the old log is kept: only what the master streams from its start
        assert plan.cut_to is None
        assert plan.adopt == leader.history.entries, "a restarted log takes every epoch"
        follower = Node([-1] * offset, EpochHistory())  # -1: below the log start, absent
        for entry in plan.adopt:
            follower.history.append(entry.epoch, entry.start_offset)
        follower.log += leader.log[offset:]
        assert follower.log[offset:] == leader.log[offset:]
        assert follower.history == leader.history


def test_a_brand_new_slave_of_a_master_whose_log_starts_late_restarts_at_that_start() -> None:
    leader = Node()
    leader.write(1, 4)
    leader.write(2, 3)
    start = stream_start("s", EpochHistory(), 0, leader.history, 5, len(leader.log))
    assert (start.offset, start.resync, start.diverged) == (5, True, False)
    plan = follow_plan(EpochHistory(), 0, leader.history, len(leader.log), start.offset)
    assert plan.restart and plan.start == 5 and plan.adopt == leader.history.entries


@given(failovers(), st.data())
def test_the_slave_never_keeps_more_than_the_histories_prove(
    nodes: tuple[Node, Node], data: st.DataObject
) -> None:
    """Whatever the master says: a stream start past the proven prefix restarts the log."""
    follower, leader = nodes
    assume(len(leader.history) > 0)
    end = len(follower.log)
    proven = common_prefix(follower.log, leader.log)
    assume(proven < len(leader.log))
    claimed = data.draw(st.integers(proven + 1, len(leader.log)), label="stream_from")
    plan = follow_plan(follower.history, end, leader.history, len(leader.log), claimed)
    assert plan.restart and plan.cut_to is None


def test_a_slave_claiming_bytes_of_the_same_epoch_is_trusted_only_as_far_as_proven() -> None:
    """Two terms of the same epoch number cannot both exist once every writer begins a
    term of its own: the copy's writes carry epoch 2, so only epoch 1's part is shared."""
    master = EpochHistory([EpochEntry(1, 0)])
    copy = EpochHistory([EpochEntry(1, 0), EpochEntry(2, 100)])
    start = stream_start("copy", copy, 180, master, 0, 300)
    assert (start.offset, start.diverged) == (100, True)


def test_records_without_a_history_are_refused_when_they_would_need_a_cut() -> None:
    master = EpochHistory([EpochEntry(1, 10)])
    with pytest.raises(StreamRefused, match="no epoch history"):
        stream_start("s", EpochHistory(), 50, master, 0, 100)
    # Without a master history the master can only take the slave's word, within its log.
    assert stream_start("s", EpochHistory(), 50, EpochHistory(), 0, 100).offset == 50
    with pytest.raises(StreamRefused, match="past the master's end"):
        stream_start("s", EpochHistory(), 150, EpochHistory(), 0, 100)


# ---- a new term ---------------------------------------------------------------------------


@given(histories(), st.integers(0, 2**41))
def test_begin_term_appends_the_newest_epoch_at_the_log_end(
    history: EpochHistory, log_end: int
) -> None:
    before = history.entries
    assume(not before or before[-1].epoch < 2**32 - 1)
    entry = begin_term(history, log_end)
    assert entry == history.current and entry.start_offset == log_end
    kept = [e for e in before if e.start_offset <= log_end]
    assert history.entries == (*kept, entry)
    assert all(entry.epoch > e.epoch for e in kept)
