"""The pure HA decisions, exhaustively: election, fencing deadline, timing rule and the
recorded in-sync set."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cluster.coordination.decisions import (
    Candidate,
    ForgetRefused,
    Ineligible,
    InSyncRecord,
    LeaseFence,
    PendingOutcome,
    caught_up_since_start,
    election_view,
    fencing_deadline_s,
    members_to_record,
    state_after_election,
    state_after_forgetting,
    timing_problems,
)
from cluster.coordination.keys import GroupState
from cluster.coordination.settings import CoordinationSettings

NODES = ["n1", "n2", "n3", "n4", "n5"]


@st.composite
def groups(draw: st.DrawFn) -> tuple[GroupState, list[Candidate], int]:
    """A recorded state, the live members, and the highest acked offset: every member
    of the recorded in-sync set that did not crash holds it (acks waited for them)."""
    epoch = draw(st.integers(1, 6))
    in_sync = draw(st.frozensets(st.sampled_from(NODES), min_size=1))
    master = draw(st.sampled_from(sorted(in_sync)))
    state = GroupState(epoch, master, in_sync, draw(st.integers(1, 3)))
    acked = draw(st.integers(0, 1000))
    live_names = draw(st.lists(st.sampled_from(NODES), unique=True))
    live = []
    for node in live_names:
        node_epoch = draw(st.integers(0, epoch + 1))
        clean_start, caught_up = draw(st.booleans()), draw(st.booleans())
        holds_acked = node in in_sync and (clean_start or caught_up)
        live.append(
            Candidate(
                node=node,
                epoch=node_epoch,
                log_end=draw(st.integers(acked if holds_acked else 0, 2000)),
                priority=draw(st.integers(0, 2)),
                clean_start=clean_start,
                caught_up=caught_up,
            )
        )
    return state, live, acked


@given(groups())
def test_election_picks_one_eligible_member_with_every_acked_record(
    group: tuple[GroupState, list[Candidate], int],
) -> None:
    state, live, acked = group
    view = election_view(state, live)
    assert {c.node for c in view.eligible} | set(view.refused) == {c.node for c in live}
    assert not {c.node for c in view.eligible} & set(view.refused)
    for candidate in view.eligible:
        assert candidate.node in state.in_sync
        assert candidate.epoch <= state.epoch
        assert candidate.clean_start or candidate.caught_up
    campaigners = [c.node for c in live if view.may_campaign(c.node)]
    assert len(campaigners) <= 1
    assert (view.best is None) == (not view.eligible)
    if view.best is not None:
        best = next(c for c in view.eligible if c.node == view.best)
        assert best.log_end >= acked
        assert all(best.rank() <= c.rank() for c in view.eligible)


@given(groups(), st.randoms(use_true_random=False))
def test_election_does_not_depend_on_the_order_members_are_listed(
    group: tuple[GroupState, list[Candidate], int], random: object
) -> None:
    state, live, _ = group
    shuffled = list(live)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    assert election_view(state, shuffled).best == election_view(state, live).best


@given(groups(), st.data())
def test_whoever_campaigns_on_a_partial_view_is_in_the_recorded_set(
    group: tuple[GroupState, list[Candidate], int], data: st.DataObject
) -> None:
    """Nodes see different live members (stale watches), so several may campaign; the
    transaction picks one, and each of them is eligible on the recorded state."""
    state, live, acked = group
    for me in live:
        seen = data.draw(st.lists(st.sampled_from(live), unique_by=lambda c: c.node))
        view = election_view(state, [me, *(c for c in seen if c.node != me.node)])
        if view.may_campaign(me.node):
            assert me.node in state.in_sync and me.epoch <= state.epoch
            assert me.clean_start or me.caught_up
            assert me.log_end >= acked


def test_refusal_reasons() -> None:
    state = GroupState(5, "n1", frozenset({"n1", "n2", "n3", "n4"}), 1)
    live = [
        Candidate("n2", 5, 100, clean_start=False, caught_up=False),
        Candidate("n3", 6, 900),
        Candidate("n4", 5, 50),
        Candidate("n5", 5, 999),
    ]
    view = election_view(state, live)
    assert view.refused == {
        "n2": Ineligible.CRASHED_NOT_CAUGHT_UP,
        "n3": Ineligible.EPOCH_AHEAD,
        "n5": Ineligible.NOT_IN_SYNC,
    }
    assert view.best == "n4"
    caught_up = [Candidate("n2", 5, 100, clean_start=False, caught_up=True), *live[1:]]
    assert election_view(state, caught_up).best == "n2"


@st.composite
def states(draw: st.DrawFn) -> GroupState:
    in_sync = draw(st.frozensets(st.sampled_from(NODES), min_size=1))
    return GroupState(draw(st.integers(1, 6)), draw(st.sampled_from(sorted(in_sync))), in_sync)


@given(st.sampled_from(NODES), st.none() | st.integers(0, 7), st.none() | states())
def test_a_crashed_node_is_caught_up_only_by_a_catch_up_in_the_recorded_term(
    node: str, caught_up_epoch: int | None, state: GroupState | None
) -> None:
    """Safety: without the latch, only a catch-up with the master of the recorded term,
    in a state that names the node, re-admits it; liveness: that suffices, whatever
    became of the connection (the function is not even told)."""
    caught_up = caught_up_since_start(
        node, latched=False, caught_up_epoch=caught_up_epoch, state=state
    )
    proven = state is not None and caught_up_epoch == state.epoch and node in state.in_sync
    assert caught_up is proven
    assert caught_up_since_start(node, latched=True, caught_up_epoch=caught_up_epoch, state=state)


@given(st.sampled_from(NODES), states(), st.lists(st.sampled_from(NODES), unique=True))
def test_a_node_that_caught_up_in_the_recorded_term_is_eligible_after_its_master_died(
    node: str, recorded: GroupState, others: list[str]
) -> None:
    """The stuck election: every live slave started unclean, caught up with the master
    that then died, and is named by the recorded set: the best of them may campaign."""
    state = GroupState(recorded.epoch, recorded.master, recorded.in_sync | {node})
    live = [
        Candidate(
            name,
            state.epoch,
            0,
            clean_start=False,
            caught_up=caught_up_since_start(
                name, latched=False, caught_up_epoch=state.epoch, state=state
            ),
        )
        for name in {node, *others} - {state.master}
    ]
    view = election_view(state, live)
    named = {candidate.node for candidate in live if candidate.node in state.in_sync}
    assert {candidate.node for candidate in view.eligible} == named
    assert (view.best is not None) is bool(named)


def test_a_newer_epoch_beats_a_longer_log_and_an_older_epoch_stays_eligible() -> None:
    """The master of epoch 3 died before any slave saw epoch 3: its slaves still lead."""
    state = GroupState(3, "dead", frozenset({"dead", "a", "b"}), 1)
    assert election_view(state, [Candidate("a", 2, 100), Candidate("b", 2, 90)]).best == "a"
    assert election_view(state, [Candidate("a", 2, 100), Candidate("b", 3, 90)]).best == "b"


def test_ties_go_to_priority_then_to_the_lowest_name() -> None:
    state = GroupState(2, None, frozenset({"a", "b", "c"}), 1)
    assert election_view(state, [Candidate("b", 2, 10), Candidate("c", 2, 10)]).best == "b"
    prioritised = [Candidate("b", 2, 10), Candidate("c", 2, 10, priority=1)]
    assert election_view(state, prioritised).best == "c"
    longer = [Candidate("b", 2, 11), Candidate("c", 2, 10, priority=9)]
    assert election_view(state, longer).best == "b"


def test_a_switchover_target_wins_only_when_it_has_caught_up() -> None:
    state = GroupState(2, "a", frozenset({"a", "b", "c"}), 1)
    live = [Candidate("a", 2, 10), Candidate("b", 2, 10), Candidate("c", 2, 9)]
    assert election_view(state, live, preferred="b").best == "b"
    assert election_view(state, live, preferred="c").best == "a"
    assert election_view(state, live, preferred="zz").best == "a"


def test_a_new_cluster_elects_among_clean_starters() -> None:
    live = [Candidate("a", 0, 0, clean_start=False), Candidate("b", 3, 0), Candidate("c", 0, 0)]
    view = election_view(None, live)
    assert view.refused == {"a": Ineligible.NO_STATE}
    assert view.best == "b"
    state = state_after_election(None, view, "b", min_insync_replicas=2)
    assert state == GroupState(4, "b", frozenset({"b"}), 2)


@given(groups(), st.data())
def test_the_winner_records_a_higher_epoch_and_a_subset_of_the_old_set(
    group: tuple[GroupState, list[Candidate], int], data: st.DataObject
) -> None:
    state, live, _ = group
    view = election_view(state, live)
    assume(view.eligible)
    winner = data.draw(st.sampled_from([c.node for c in view.eligible]))
    after = state_after_election(state, view, winner)
    assert after.epoch == state.epoch + 1 and after.master == winner
    assert winner in after.in_sync <= state.in_sync
    assert after.in_sync == {c.node for c in view.eligible}
    assert after.min_insync_replicas == state.min_insync_replicas


def test_an_ineligible_winner_is_refused() -> None:
    state = GroupState(1, "a", frozenset({"a"}), 1)
    view = election_view(state, [Candidate("b", 1, 5)])
    with pytest.raises(ValueError, match="'b' is not eligible"):
        state_after_election(state, view, "b")


# ----------------------------------------------------------------------------- fencing

times = st.floats(0, 1e6, allow_nan=False)


@given(st.lists(times, max_size=20), st.integers(2, 30), st.floats(0, 1))
def test_the_deadline_never_moves_back(sends: list[float], ttl_s: int, margin_s: float) -> None:
    fence = LeaseFence(ttl_s, margin_s)
    assert fence.deadline_s == -math.inf and not fence.may_acknowledge(0)
    previous = fence.deadline_s
    for sent in sends:
        fence.keepalive_succeeded(sent)
        assert fence.deadline_s >= previous
        previous = fence.deadline_s
    if sends:
        assert fence.deadline_s == fencing_deadline_s(max(sends), ttl_s, margin_s)


@given(
    st.lists(st.tuples(times, st.floats(0, 100)), min_size=1),
    st.integers(2, 30),
    st.floats(0, 1),
    times,
    times,
)
def test_a_master_that_may_acknowledge_still_holds_its_lease(
    keepalives: list[tuple[float, float]], ttl_s: int, margin_s: float, now_s: float, later_s: float
) -> None:
    """etcd renews a lease when it processes the keepalive, never before it was sent, so
    the lease lives until at least max(processed) + ttl; the fence closes earlier."""
    fence = LeaseFence(ttl_s, margin_s)
    for sent, _delay in keepalives:
        fence.keepalive_succeeded(sent)
    lease_expiry = max(sent + delay for sent, delay in keepalives) + ttl_s
    if fence.may_acknowledge(now_s):
        assert now_s < lease_expiry
    if not fence.may_acknowledge(now_s) and later_s >= now_s:
        assert not fence.may_acknowledge(later_s)


def test_margin_must_be_below_the_ttl() -> None:
    with pytest.raises(ValueError, match="fencing margin"):
        LeaseFence(2, 2)


@given(
    ttl_s=st.integers(2, 20),
    interval_s=st.floats(0.01, 10),
    timeout_s=st.floats(0.01, 10),
    margin_s=st.floats(0, 5),
    fraction=st.floats(0, 0.999),
)
def test_sound_timings_survive_one_timed_out_keepalive(
    ttl_s: int, interval_s: float, timeout_s: float, margin_s: float, fraction: float
) -> None:
    """Patroni's rule with the margin: a keepalive times out, the retry is answered
    within the request timeout, and the master never had to stop acknowledging."""
    problems = timing_problems(
        lease_ttl_s=ttl_s,
        keepalive_interval_s=interval_s,
        request_timeout_s=timeout_s,
        fencing_margin_s=margin_s,
    )
    assert (not problems) == (interval_s + 2 * timeout_s + margin_s <= ttl_s)
    if problems:
        return
    fence = LeaseFence(ttl_s, margin_s)
    fence.keepalive_succeeded(0.0)
    retry_sent_s = interval_s + timeout_s
    retry_answered_s = retry_sent_s + fraction * timeout_s
    assert fence.may_acknowledge(retry_answered_s)
    fence.keepalive_succeeded(retry_sent_s)
    assert fence.deadline_s > retry_answered_s


def test_timing_problems_name_the_rule() -> None:
    (problem,) = timing_problems(
        lease_ttl_s=2, keepalive_interval_s=1, request_timeout_s=1, fencing_margin_s=0
    )
    assert "keepalive_interval_s + 2 x request_timeout_s = 3s exceeds lease_ttl_s = 2s" in problem
    assert timing_problems(
        lease_ttl_s=0, keepalive_interval_s=1, request_timeout_s=1, fencing_margin_s=-1
    ) == ["lease_ttl_s must be positive, got 0", "fencing_margin_s must be >= 0, got -1"]


def test_default_settings_obey_the_rule() -> None:
    settings = CoordinationSettings()
    assert not timing_problems(
        lease_ttl_s=settings.lease_ttl_s,
        keepalive_interval_s=settings.keepalive_interval_s,
        request_timeout_s=settings.request_timeout_s,
        fencing_margin_s=settings.fencing_margin_s,
    )


# -------------------------------------------------------------- recorded in-sync set


def test_an_expansion_counts_at_once_and_a_shrink_once_committed() -> None:
    record = InSyncRecord("m", frozenset({"m", "a"}), min_insync_replicas=1)
    assert record.propose(frozenset({"m", "a", "b"})) == frozenset({"m", "a", "b"})
    assert record.counted == {"m", "a", "b"}
    assert record.propose(frozenset({"m"})) is None  # one change at a time
    record.resolve(PendingOutcome.COMMITTED)
    assert record.recorded == {"m", "a", "b"}
    assert record.propose(frozenset({"m", "b"})) == frozenset({"m", "b"})
    assert record.counted == {"m", "a", "b"}  # "a" counts until the shrink commits
    record.resolve(PendingOutcome.COMMITTED)
    assert record.counted == {"m", "b"}
    assert record.propose(frozenset({"b"})) is None  # the master is always in: no change
    assert record.propose(frozenset({"m", "b"})) is None


def test_replicated_acks_need_enough_slaves_whichever_way_a_change_ends() -> None:
    record = InSyncRecord("m", frozenset({"m", "a"}), min_insync_replicas=1)
    assert record.admits_replicated()
    record.propose(frozenset({"m"}))
    assert not record.admits_replicated()  # the shrink may commit
    record.resolve(PendingOutcome.REFUSED)
    assert record.admits_replicated() and record.counted == {"m", "a"}
    with pytest.raises(ValueError, match="no in-sync change is pending"):
        record.resolve(PendingOutcome.COMMITTED)
    with pytest.raises(ValueError, match="must contain the master"):
        record.observed(frozenset({"a"}))


member_sets = st.frozensets(st.sampled_from(["a", "b", "c", "d"])).map(lambda s: s | {"m"})


class InSyncRecording(RuleBasedStateMachine):
    """The master's record against a model of etcd, with CAS answers lost and delayed:
    whatever etcd holds at any moment is inside the set that acks wait for."""

    def __init__(self) -> None:
        super().__init__()
        self.etcd: frozenset[str] = frozenset({"m", "a"})
        self.record = InSyncRecord("m", self.etcd, min_insync_replicas=1)
        self.in_flight: frozenset[str] | None = None
        self.base: frozenset[str] | None = None
        self.applied = False

    @rule(wanted=member_sets)
    def propose(self, wanted: frozenset[str]) -> None:
        proposed = self.record.propose(wanted)
        if proposed is not None:
            assert self.in_flight is None
            self.in_flight, self.base, self.applied = proposed, self.record.recorded, False

    @precondition(lambda self: self.in_flight is not None and not self.applied)
    @rule()
    def etcd_applies(self) -> None:
        assert self.in_flight is not None
        if self.etcd == self.base:  # the compare on the state's revision holds
            self.etcd, self.applied = self.in_flight, True

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def answer_arrives(self) -> None:
        self.record.resolve(PendingOutcome.COMMITTED if self.applied else PendingOutcome.REFUSED)
        self.in_flight = None

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def answer_lost_then_read_back(self) -> None:
        self.record.observed(self.etcd)
        self.in_flight = None

    @invariant()
    def etcd_set_is_counted(self) -> None:
        assert self.etcd <= self.record.counted
        assert self.record.recorded <= self.record.counted
        assert "m" in self.record.counted

    @invariant()
    def replicated_admission_is_safe(self) -> None:
        if self.record.admits_replicated():
            assert len(self.etcd - {"m"}) >= 1
            if self.in_flight is not None:
                assert len(self.in_flight - {"m"}) >= 1


TestInSyncRecording = InSyncRecording.TestCase


@given(
    acks=st.dictionaries(st.sampled_from(NODES[1:]), st.integers(0, 1000)),
    counted=st.frozensets(st.sampled_from(NODES[1:])),
    acked=st.integers(0, 1000),
    slack=st.integers(0, 1000),
)
def test_a_slave_joins_the_record_only_holding_every_acked_record(
    acks: dict[str, int], counted: frozenset[str], acked: int, slack: int
) -> None:
    """``acked`` is the end of the highest acked record; the floor the master passes is
    at or above it. Whoever is newly recorded holds it; counted members stay."""
    master = NODES[0]
    recorded = members_to_record(master, acks, counted | {master}, acked + slack)
    assert master in recorded
    assert recorded - {master} <= set(acks)
    for name in recorded - {master}:
        assert name in counted or acks[name] >= acked
    assert {name for name in acks if name in counted} <= recorded


def test_a_slave_far_behind_is_recorded_only_once_it_reached_the_floor() -> None:
    acks = {"a": 4096, "b": 100}
    assert members_to_record("m", acks, frozenset({"m"}), 4096) == {"m", "a"}
    assert members_to_record("m", acks, frozenset({"m", "b"}), 4096) == {"m", "a", "b"}
    assert members_to_record("m", {**acks, "b": 4096}, frozenset({"m"}), 4096) == {"m", "a", "b"}


# ------------------------------------------------- recovery when every member crashed

REVISION = 40
"""The etcd revision of the recorded state in the recovery tests."""


@st.composite
def all_crashed(draw: st.DrawFn) -> tuple[GroupState, list[Candidate], int]:
    """A group whose every node crashed (none clean, none caught up since), and the
    highest acked offset. One history of terms: each member holds a prefix of it, so a
    longer log never has an older last epoch. A recorded member held every acked record
    before the crash and may have lost any tail in it (power loss), or its whole data
    dir; a member outside the recorded set may hold anything. Most records are fresh
    (written in this vacancy), some stale or missing."""
    epoch = draw(st.integers(1, 6))
    starts = sorted(draw(st.lists(st.integers(0, 2000), min_size=epoch, max_size=epoch)))
    starts[0] = 0
    in_sync = draw(st.frozensets(st.sampled_from(NODES), min_size=1))
    state = GroupState(epoch, draw(st.sampled_from(sorted(in_sync))), in_sync, 1)
    acked = draw(st.integers(0, 2000))

    def last_epoch(log_end: int) -> int:
        return max(k + 1 for k, start in enumerate(starts) if start <= log_end)

    live = []
    for node in NODES:
        if draw(st.integers(0, 9)) == 0:
            continue  # down
        if node in in_sync:
            before_crash = draw(st.integers(acked, 2500))
            log_end = draw(st.integers(0, before_crash) | st.just(before_crash))
        else:
            log_end = draw(st.integers(0, 2500))
        wiped = draw(st.integers(0, 5)) == 0
        live.append(
            Candidate(
                node=node,
                epoch=0 if wiped else last_epoch(log_end),
                log_end=0 if wiped else log_end,
                priority=draw(st.integers(0, 2)),
                clean_start=False,
                caught_up=False,
                vacant_state_revision=draw(st.sampled_from([REVISION] * 8 + [0, REVISION - 1])),
            )
        )
    return state, live, acked


@given(all_crashed())
def test_a_group_whose_every_member_crashed_recovers_only_with_every_recorded_member_back(
    group: tuple[GroupState, list[Candidate], int],
) -> None:
    state, live, acked = group
    view = election_view(state, live, state_revision=REVISION)
    reported = {c.node: c for c in live if c.vacant_state_revision == REVISION}
    recorded = [reported[node] for node in state.in_sync if node in reported]
    missing = state.in_sync - reported.keys()
    assert view.waiting_for == missing  # safety: nobody leads while one may hold more
    if missing:
        assert view.best is None and not view.no_data
        assert "waiting for recorded in-sync members " + ", ".join(sorted(missing)) in (
            view.reason()
        )
        return
    # liveness: every recorded member is back, so someone leads unless none has data
    with_data = [c for c in recorded if c.epoch > 0 or c.log_end > 0]
    assert view.no_data == (not with_data)
    if not with_data:
        assert view.best is None
        return
    assert view.recovered and view.best in state.in_sync
    best = reported[view.best]
    assert [c.node for c in live if view.may_campaign(c.node)] == [best.node]
    # safety: the winner's log is at least as long as every recorded member's, so it
    # holds every acked record any of them kept through the crash
    assert all(best.log_end >= c.log_end for c in recorded)
    if any(c.log_end >= acked for c in recorded):
        assert best.log_end >= acked
    after = state_after_election(state, view, best.node)
    assert after == GroupState(state.epoch + 1, best.node, frozenset({best.node}), 1)


@given(all_crashed(), st.randoms(use_true_random=False))
def test_the_recovery_does_not_depend_on_the_order_members_are_listed(
    group: tuple[GroupState, list[Candidate], int], random: object
) -> None:
    state, live, _ = group
    shuffled = list(live)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    assert election_view(state, shuffled, state_revision=REVISION) == election_view(
        state, live, state_revision=REVISION
    )


def crashed(node: str, epoch: int, log_end: int, *, revision: int = REVISION) -> Candidate:
    return Candidate(
        node, epoch, log_end, clean_start=False, caught_up=False, vacant_state_revision=revision
    )


def test_every_member_crashed_the_longest_log_of_the_newest_epoch_leads() -> None:
    state = GroupState(4, "a", frozenset({"a", "b", "c"}), 1)
    live = [crashed("a", 4, 700), crashed("b", 4, 900), crashed("c", 3, 950)]
    view = election_view(state, live, state_revision=REVISION)
    assert (view.best, view.recovered) == ("b", True)
    assert view.refused == {
        "a": Ineligible.CRASHED_NOT_CAUGHT_UP,
        "c": Ineligible.CRASHED_NOT_CAUGHT_UP,
    }
    assert view.reason() == "b leads the recovery: every recorded in-sync member is back"
    with pytest.raises(ValueError, match="'a' is not eligible"):
        state_after_election(state, view, "a")


def test_a_recorded_member_down_or_with_a_record_of_another_time_is_waited_for() -> None:
    state = GroupState(4, "a", frozenset({"a", "b", "c"}), 1)
    down = election_view(state, [crashed("a", 4, 700), crashed("b", 4, 900)], state_revision=40)
    assert down.best is None and down.waiting_for == {"c"}
    assert down.reason().startswith("waiting for recorded in-sync members c to return")
    stale = [crashed("a", 4, 700), crashed("b", 4, 900), crashed("c", 4, 10, revision=0)]
    assert election_view(state, stale, state_revision=40).waiting_for == {"c"}
    assert election_view(state, stale, state_revision=0).waiting_for == {"a", "b", "c"}
    outsider = [*stale[:2], crashed("c", 4, 10), crashed("d", 4, 5000)]
    view = election_view(state, outsider, state_revision=40)
    assert view.best == "b" and view.refused["d"] is Ineligible.NOT_IN_SYNC


def test_a_wiped_member_never_leads_a_member_with_data_and_all_wiped_leads_nobody() -> None:
    state = GroupState(4, "a", frozenset({"a", "b", "c"}), 1)
    live = [crashed("a", 0, 0), crashed("b", 0, 0), crashed("c", 1, 0)]
    assert election_view(state, live, state_revision=REVISION).best == "c"
    wiped = [crashed("a", 0, 0), crashed("b", 0, 0), crashed("c", 0, 0)]
    view = election_view(state, wiped, state_revision=REVISION)
    assert view.best is None and view.no_data and not view.waiting_for
    assert "empty log and no epoch history" in view.reason()


def test_an_epoch_ahead_or_an_ordinary_candidate_means_no_recovery() -> None:
    state = GroupState(4, "a", frozenset({"a", "b"}), 1)
    ahead = election_view(state, [crashed("a", 5, 9), crashed("b", 4, 9)], state_revision=40)
    assert ahead.best is None and not ahead.waiting_for and not ahead.recovered
    clean = Candidate("b", 4, 10, vacant_state_revision=40)
    ordinary = election_view(state, [crashed("a", 4, 99), clean], state_revision=40)
    assert (ordinary.best, ordinary.recovered) == ("b", False)
    assert state_after_election(state, ordinary, "b").in_sync == {"b"}


@given(all_crashed(), st.sampled_from(NODES), st.none() | st.sampled_from(NODES))
def test_forgetting_a_lost_member_lets_the_others_recover_and_is_refused_otherwise(
    group: tuple[GroupState, list[Candidate], int], node: str, leader: str | None
) -> None:
    state, live, _ = group
    live_names = {c.node for c in live}
    refusal = (
        "not in the recorded in-sync set"
        if node not in state.in_sync
        else "the group has a master"
        if leader is not None
        else "is live"
        if node in live_names
        else "the last recorded in-sync member"
        if state.in_sync == {node}
        else None
    )
    if refusal is not None:
        with pytest.raises(ForgetRefused, match=refusal):
            state_after_forgetting(state, node, live=live_names, leader=leader)
        return
    after = state_after_forgetting(state, node, live=live_names, leader=leader)
    assert after.in_sync == state.in_sync - {node} and after.epoch == state.epoch
    assert after.master == (None if state.master == node else state.master)
    assert after.min_insync_replicas == state.min_insync_replicas
    # the forgotten member is no longer waited for: with the others back (records of the
    # new state's vacancy) the best of them with data leads, as if it had never been
    fresh = [attrs.evolve(c, vacant_state_revision=REVISION + 1) for c in live]
    view = election_view(after, fresh, state_revision=REVISION + 1)
    assert node not in view.waiting_for
    if not view.waiting_for and not view.no_data:
        assert view.best in after.in_sync and view.recovered


def test_forgetting_needs_a_recorded_state() -> None:
    with pytest.raises(ForgetRefused, match="never elected"):
        state_after_forgetting(None, "a", live=[], leader=None)
