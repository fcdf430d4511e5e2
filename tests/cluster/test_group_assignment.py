"""The pure parts of consumer groups: the assignment rule, the offsets map and its
record, and membership (generations, expiry, fencing of commits)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.node.group_assignment import QueueRef, assign
from cluster.node.group_membership import GroupMembership
from cluster.node.group_offsets import Commit, OffsetsMap, decode_commit, encode_commit

names = st.text("abcdefgh", min_size=1, max_size=4)
queue_sets = st.sets(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 15)), max_size=40)
member_sets = st.sets(names, max_size=8)


def held(assignment: dict[str, list[QueueRef]]) -> list[QueueRef]:
    return sorted(q for queues in assignment.values() for q in queues)


@given(queue_sets, member_sets)
def test_every_queue_goes_to_exactly_one_live_member(
    queues: set[QueueRef], members: set[str]
) -> None:
    assignment = assign(sorted(queues), sorted(members))
    if not members:
        assert assignment == {}
        return
    assert set(assignment) == members
    assert held(assignment) == sorted(queues)
    shares = [len(q) for q in assignment.values()]
    assert max(shares) - min(shares) <= 1


@given(queue_sets, member_sets, st.randoms())
def test_the_rule_is_deterministic(
    queues: set[QueueRef], members: set[str], rnd: random.Random
) -> None:
    shuffled_q, shuffled_m = list(queues), list(members)
    rnd.shuffle(shuffled_q)
    rnd.shuffle(shuffled_m)
    assert assign(shuffled_q, shuffled_m) == assign(sorted(queues), sorted(members))


@given(queue_sets, member_sets, names)
def test_a_departure_moves_only_the_departed_members_queues_and_rebalancing_ones(
    queues: set[QueueRef], members: set[str], gone: str
) -> None:
    before = assign(sorted(queues), sorted(members | {gone}))
    after = assign(sorted(queues), sorted(members), before)
    assert held(after) == sorted(queues) if members else after == {}
    moved = {q for m, qs in after.items() for q in qs if q not in before.get(m, [])}
    # Shares never shrink when a member leaves: only the departed member's queues move.
    assert moved <= set(before.get(gone, []))


@given(queue_sets, member_sets, names)
def test_a_join_takes_queues_only_from_members_above_their_new_share(
    queues: set[QueueRef], members: set[str], new: str
) -> None:
    before = assign(sorted(queues), sorted(members))
    after = assign(sorted(queues), sorted(members | {new}), before)
    for member in members:
        kept = set(after.get(member, [])) & set(before.get(member, []))
        assert len(kept) == min(len(before.get(member, [])), len(after[member]))


offsets = st.integers(0, 2**40)
commits = st.lists(
    st.builds(
        Commit,
        st.sampled_from(["g1", "g2"]),
        st.sampled_from(["t", "u"]),
        st.integers(0, 3),
        offsets,
    ),
    max_size=50,
)


@given(commits)
def test_the_map_is_the_last_commit_per_key_and_survives_the_record_format(
    history: list[Commit],
) -> None:
    replayed = OffsetsMap()
    replayed.apply_all(c for c in (decode_commit(encode_commit(c)) for c in history) if c)
    last: dict[tuple[str, str, int], int] = {}
    for c in history:
        last[(c.group, c.topic, c.queue)] = c.offset
    assert {(c.group, c.topic, c.queue): c.offset for c in replayed} == last
    for (group, topic, queue), offset in last.items():
        assert replayed.get(group, topic, queue) == offset


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"g":"g","t":"t","q":"1","o":2}', b"\xff"])
def test_a_body_that_is_no_commit_is_skipped(body: bytes) -> None:
    assert decode_commit(body) is None


def test_membership_generations_hand_over_expiry_and_fencing() -> None:
    groups = GroupMembership()
    first = groups.join("g", "m1", {"t": 4}, 1000, now_s=0.0)
    assert first.generation == 1 and first.assignment == [("t", q) for q in range(4)]
    second = groups.join("g", "m2", {"t": 4}, 1000, now_s=0.1)
    assert second.generation == 2 and second.assignment == []  # m1 still holds them all
    assert groups.heartbeat("g", "m2", 2, now_s=0.15) == 2  # nothing was given up yet
    assert groups.heartbeat("g", "m1", 1, now_s=0.2) is None  # must re-join
    # m1 commits its queues in the generation it joined, then re-joins with fewer.
    assert groups.commit_refusal("g", "m1", 1, first.assignment, now_s=0.25) is None
    again = groups.join("g", "m1", {"t": 4}, 1000, now_s=0.3)
    assert again.generation == 2 and len(again.assignment) == 2
    assert groups.heartbeat("g", "m2", 2, now_s=0.35) is None  # its queues are free now
    taken = groups.join("g", "m2", {"t": 4}, 1000, now_s=0.4)
    assert sorted(taken.assignment + again.assignment) == first.assignment
    assert groups.heartbeat("g", "m2", 2, now_s=0.45) == 2
    given_up = [q for q in first.assignment if q not in again.assignment]
    assert "joined generation 2" in (groups.commit_refusal("g", "m1", 1, given_up, 0.5) or "")
    assert "does not hold" in (groups.commit_refusal("g", "m1", 2, given_up, now_s=0.5) or "")
    assert groups.commit_refusal("g", "m2", 2, given_up, now_s=0.5) is None
    assert "live member" in (groups.commit_refusal("g", None, None, given_up, 0.5) or "")
    with pytest.raises(ValueError, match="consumes t"):
        groups.join("g", "m3", {"u": 1}, 1000, now_s=0.5)
    # m2 falls silent: at m1's first heartbeat after m2's session, m1 must re-join, and
    # gets everything at once (a dead member holds nothing).
    assert groups.heartbeat("g", "m1", 2, now_s=1.3) == 2
    assert groups.heartbeat("g", "m1", 2, now_s=1.5) is None
    assert groups.join("g", "m1", {"t": 4}, 1000, now_s=1.55).assignment == first.assignment
    assert "not in group" in (groups.commit_refusal("g", "m2", 2, given_up, now_s=1.55) or "")
    assert groups.leave("g", "m1", now_s=1.6)
    assert groups.live("g") == 0
    assert groups.commit_refusal("g", None, None, given_up, now_s=1.7) is None


members_and_times = st.lists(
    st.tuples(st.sampled_from(["join", "beat", "leave", "grow"]), st.sampled_from(["a", "b", "c"])),
    max_size=40,
)


@given(members_and_times)
def test_live_members_never_hold_a_queue_twice(steps: list[tuple[str, str]]) -> None:
    """Any sequence of joins, heartbeats (re-joining when told), leaves and a topic
    growing queues (seen at the next heartbeat, as the node does): the queues held by
    live members are disjoint, and once everyone re-joined they cover all."""
    groups = GroupMembership()
    generation: dict[str, int] = {}
    topics = {"t": 5}
    now = 0.0
    for action, member in steps:
        now += 0.01
        if action == "grow":
            topics["t"] += 1
        elif action == "join" or (action == "beat" and member in generation):
            groups.resize("g", topics, now)
            beat = groups.heartbeat("g", member, generation.get(member, -1), now)
            if action == "join" or beat is None:
                generation[member] = groups.join("g", member, topics, 60_000, now).generation
        elif action == "leave" and member in generation:
            groups.leave("g", member, now)
            del generation[member]
        state = groups.state("g", now)
        held = [q for queues in (state.held.values() if state else []) for q in queues]
        assert len(held) == len(set(held))
    for _ in range(4):  # settle: every member beats and re-joins when told
        for member in sorted(generation):
            now += 0.01
            groups.resize("g", topics, now)
            if groups.heartbeat("g", member, generation[member], now) is None:
                generation[member] = groups.join("g", member, topics, 60_000, now).generation
    state = groups.state("g", now)
    if generation and state is not None:
        held = sorted(q for qs in state.held.values() for q in qs)
        assert held == [("t", q) for q in range(topics["t"])]


def test_a_topic_that_grew_queues_starts_a_new_generation_at_the_next_heartbeat() -> None:
    groups = GroupMembership()
    first = groups.join("g", "m1", {"t": 2, "u": 1}, 1000, now_s=0.0)
    assert groups.heartbeat("g", "m1", first.generation, now_s=0.1) == first.generation
    assert not groups.resize("g", {"t": 2, "u": 1}, now_s=0.2), "unchanged: no rebalance"
    assert not groups.resize("g", {"t": 2}, now_s=0.2), "a topic left out keeps its queues"
    assert groups.resize("g", {"t": 4, "u": 1}, now_s=0.3)
    assert groups.heartbeat("g", "m1", first.generation, now_s=0.4) is None, "told to re-join"
    again = groups.join("g", "m1", {"t": 4, "u": 1}, 1000, now_s=0.5)
    assert again.generation == first.generation + 1
    assert again.assignment == [("t", 0), ("t", 1), ("t", 2), ("t", 3), ("u", 0)]
    assert not groups.resize("nobody", {"t": 8}, now_s=0.6), "no such group"
