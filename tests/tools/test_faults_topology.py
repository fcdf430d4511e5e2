"""Partition shapes: properties over any node set and seed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools.faults.topology import bridge, complete, halves, isolate, one_way, ring, symmetric

node_sets = st.lists(
    st.sampled_from([f"n{i}" for i in range(9)]), min_size=4, max_size=9, unique=True
)


@given(node_sets, st.integers(0, 2**32))
def test_two_way_shapes_are_symmetric_and_never_self(nodes: list[str], seed: int) -> None:
    for grudge in (
        halves(nodes, random.Random(seed)),
        bridge(nodes, random.Random(seed)),
        ring(nodes, random.Random(seed)),
        isolate(nodes, nodes[0]),
        isolate(nodes, nodes[0], nodes[1]),
    ):
        assert symmetric(grudge)
        assert all(node not in dropped for node, dropped in grudge.items())
        assert set(grudge) <= set(nodes)


@given(node_sets, st.integers(0, 2**32))
def test_halves_are_two_sides_that_hear_only_themselves(nodes: list[str], seed: int) -> None:
    grudge = halves(nodes, random.Random(seed))
    sides = {frozenset(nodes) - dropped for dropped in grudge.values()}
    assert len(sides) == 2
    assert sorted(len(side) for side in sides) == [len(nodes) // 2, len(nodes) - len(nodes) // 2]
    assert halves(nodes, random.Random(seed)) == grudge  # deterministic per seed


@given(node_sets, st.integers(0, 2**32))
def test_bridge_has_one_node_hearing_everyone(nodes: list[str], seed: int) -> None:
    grudge = bridge(nodes, random.Random(seed))
    links = [node for node in nodes if not grudge[node]]
    assert len(links) == 1
    others = [node for node in nodes if node != links[0]]
    assert all(links[0] not in grudge[node] for node in others)
    assert all(grudge[node] for node in others)


@given(st.integers(5, 9), st.integers(0, 2**32))
def test_ring_lets_every_node_hear_exactly_two_others(count: int, seed: int) -> None:
    nodes = [f"n{i}" for i in range(count)]
    grudge = ring(nodes, random.Random(seed))
    assert all(len(nodes) - len(dropped) == 3 for dropped in grudge.values())
    if count == 5:
        heard = {frozenset(nodes) - dropped for dropped in grudge.values()}
        assert len(heard) == 5  # no two nodes see the same majority


def test_one_way_and_bad_shapes() -> None:
    assert one_way(["a"], ["b", "c"]) == {"b": frozenset({"a"}), "c": frozenset({"a"})}
    assert not symmetric(one_way(["a"], ["b"]))
    with pytest.raises(ValueError, match="overlap"):
        complete([{"a", "b"}, {"b"}])
    with pytest.raises(ValueError, match="members"):
        isolate(["a", "b"], "z")
    with pytest.raises(ValueError, match="at least 3"):
        bridge(["a", "b"], random.Random(0))
