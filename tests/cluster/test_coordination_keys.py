"""The etcd key layout and its JSON records: round trips, parsing, and refusals that name
the key and the problem."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.coordination.keys import (
    ClusterKeys,
    GroupState,
    KeyRef,
    LeaderValue,
    MemberInfo,
    RecordError,
    TopicRecord,
)

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
offsets = st.integers(min_value=0, max_value=2**62)


def test_layout() -> None:
    keys = ClusterKeys("prod")
    assert keys.prefix == "/tidelog/prod/"
    assert keys.member("node-1") == "/tidelog/prod/members/node-1"
    assert keys.leader("g1") == "/tidelog/prod/groups/g1/leader"
    assert keys.state("g1") == "/tidelog/prod/groups/g1/state"
    assert keys.topic("orders") == "/tidelog/prod/topics/orders"


@given(cluster=names, other=names, node=names, group=names, topic=names)
def test_parse_inverts_the_builders_and_clusters_never_overlap(
    cluster: str, other: str, node: str, group: str, topic: str
) -> None:
    keys = ClusterKeys(cluster)
    assert keys.parse(keys.member(node)) == KeyRef("member", node)
    assert keys.parse(keys.leader(group)) == KeyRef("leader", group)
    assert keys.parse(keys.state(group)) == KeyRef("state", group)
    assert keys.parse(keys.topic(topic)) == KeyRef("topic", topic)
    if other != cluster:
        other_keys = ClusterKeys(other)
        for key in (other_keys.member(node), other_keys.leader(group), other_keys.topic(topic)):
            assert not key.startswith(keys.prefix)
            assert keys.parse(key) is None


def test_unknown_keys_parse_to_none() -> None:
    keys = ClusterKeys("c")
    for key in (
        "/tidelog/c/future/x",
        "/tidelog/c/groups/g1/other",
        "/tidelog/c/members/a/b",
        "/x",
    ):
        assert keys.parse(key) is None


@pytest.mark.parametrize("bad", ["", "a/b", "-x", ".", "..", "x" * 65, "é"])
def test_names_that_could_escape_their_place_are_refused(bad: str) -> None:
    keys = ClusterKeys("c")
    with pytest.raises(ValueError, match="invalid"):
        keys.member(bad)
    with pytest.raises(ValueError, match="invalid"):
        keys.leader(bad)
    with pytest.raises(ValueError, match="invalid"):
        ClusterKeys(bad)


@given(
    node=names,
    group=names,
    epoch=offsets,
    log_end=offsets,
    clean=st.booleans(),
    caught_up=st.booleans(),
    priority=st.integers(-100, 100),
)
def test_member_info_round_trips(
    node: str, group: str, epoch: int, log_end: int, clean: bool, caught_up: bool, priority: int
) -> None:
    info = MemberInfo(
        node, group, "127.0.0.1:7600", "127.0.0.1:7601", epoch, log_end, clean, caught_up, priority
    )
    assert MemberInfo.decode("/k", info.encode()) == info


@given(epoch=offsets, in_sync=st.frozensets(names, min_size=1, max_size=5), data=st.data())
def test_group_state_round_trips(epoch: int, in_sync: frozenset[str], data: st.DataObject) -> None:
    master = data.draw(st.sampled_from(sorted(in_sync)) | st.none())
    state = GroupState(epoch, master, in_sync, data.draw(st.integers(1, 5)))
    assert GroupState.decode("/k", state.encode()) == state


def test_leader_and_topic_round_trip() -> None:
    leader = LeaderValue("n1", 7, "127.0.0.1:1", "127.0.0.1:2")
    assert LeaderValue.decode("/k", leader.encode()) == leader
    topic = TopicRecord("orders", 4, 123)
    assert TopicRecord.decode("/k", topic.encode()) == topic


def test_group_state_invariants() -> None:
    with pytest.raises(ValueError, match="must be in the in-sync set"):
        GroupState(1, "n1", frozenset({"n2"}))
    with pytest.raises(ValueError, match="min_insync_replicas"):
        GroupState(1, "n1", frozenset({"n1"}), 0)
    with pytest.raises(ValueError, match=">= 0"):
        GroupState(-1, None, frozenset())


def _state_json(**changes: object) -> bytes:
    body = json.loads(GroupState(3, "n1", frozenset({"n1", "n2"}), 1).encode())
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "not a JSON group_state record"),
        (b"[1, 2]", "must be a JSON object"),
        (_state_json(kind="member"), "expected a group_state record"),
        (_state_json(format=2), "format 2 is not 1: upgrade"),
        (_state_json(epoch="3"), "field 'epoch' must be int"),
        (_state_json(epoch=True), "field 'epoch' must be int"),
        (_state_json(in_sync="n1"), "field 'in_sync' must be a list"),
        (_state_json(master=5), "field 'master'"),
        (_state_json(master="n9"), "must be in the in-sync set"),
        (_state_json(in_sync=["n1", "a/b"]), "invalid"),
    ],
)
def test_malformed_records_are_refused_naming_the_key(raw: bytes, problem: str) -> None:
    with pytest.raises(RecordError, match=problem) as raised:
        GroupState.decode("/tidelog/c/groups/g1/state", raw)
    assert str(raised.value).startswith("/tidelog/c/groups/g1/state: ")
    assert str(raised.value).count("/tidelog/c/groups/g1/state") == 1


def test_member_record_with_a_bad_name_is_refused() -> None:
    body = json.loads(MemberInfo("n1", "g1", "a:1", "a:2", 0, 0, True).encode())
    body["node"] = "../n1"
    with pytest.raises(RecordError, match=re.escape("node name '../n1' is invalid")):
        MemberInfo.decode("/k", json.dumps(body).encode())


def test_a_member_record_of_an_older_release_reads_with_no_vacancy() -> None:
    info = MemberInfo("n1", "g1", "a:1", "a:2", 3, 10, False, vacant_state_revision=7)
    assert MemberInfo.decode("/k", info.encode()) == info
    body = json.loads(info.encode())
    del body["vacant_state_revision"]
    assert MemberInfo.decode("/k", json.dumps(body).encode()).vacant_state_revision == 0
    del body["log_end"]
    with pytest.raises(RecordError, match="field 'log_end' must be int"):
        MemberInfo.decode("/k", json.dumps(body).encode())
