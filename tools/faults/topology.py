"""Partition shapes as pure data: a *grudge* maps each node to the nodes it no longer
hears from (its inbound traffic from them is dropped). Both network backends apply a
grudge; the shapes are Jepsen's: isolate one, isolate the master with one slave, halves,
bridge, majorities ring, and one-way cuts.

A node never holds a grudge against itself; a two-way partition is a symmetric grudge.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping, Sequence

__all__ = [
    "Grudge",
    "bridge",
    "complete",
    "halves",
    "isolate",
    "one_way",
    "ring",
    "symmetric",
]

Grudge = Mapping[str, frozenset[str]]


def complete(components: Iterable[Collection[str]]) -> dict[str, frozenset[str]]:
    """Disjoint components that hear only their own members."""
    groups = [frozenset(group) for group in components]
    everyone = frozenset().union(*groups)
    if sum(len(group) for group in groups) != len(everyone):
        raise ValueError(f"components overlap: {[sorted(group) for group in groups]}")
    return {node: everyone - group for group in groups for node in group}


def isolate(nodes: Sequence[str], *alone: str) -> dict[str, frozenset[str]]:
    """``alone`` (one node, or the master with one slave) on one side, the rest on the other."""
    unknown = set(alone) - set(nodes)
    if unknown or not alone:
        raise ValueError(f"isolate needs members of {list(nodes)}, got {list(alone)}")
    return complete([set(alone), set(nodes) - set(alone)])


def halves(nodes: Sequence[str], rng: random.Random) -> dict[str, frozenset[str]]:
    """A random split; the first half is the smaller one when the count is odd."""
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    middle = len(shuffled) // 2
    return complete([shuffled[:middle], shuffled[middle:]])


def bridge(nodes: Sequence[str], rng: random.Random) -> dict[str, frozenset[str]]:
    """Two halves that cannot hear each other, and one node that hears both."""
    if len(nodes) < 3:
        raise ValueError(f"a bridge needs at least 3 nodes, got {len(nodes)}")
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    middle = len(shuffled) // 2
    left, link, right = shuffled[:middle], shuffled[middle], shuffled[middle + 1 :]
    grudge = dict(complete([left, right]))
    grudge[link] = frozenset()
    return grudge


def ring(nodes: Sequence[str], rng: random.Random) -> dict[str, frozenset[str]]:
    """Each node hears itself and its two ring neighbours (Jepsen's majorities ring for
    five nodes: every node sees a majority, no two see the same one)."""
    if len(nodes) < 4:
        raise ValueError(f"a ring partition needs at least 4 nodes, got {len(nodes)}")
    order = list(nodes)
    rng.shuffle(order)
    count = len(order)
    grudge = {}
    for index, node in enumerate(order):
        heard = {node, order[(index - 1) % count], order[(index + 1) % count]}
        grudge[node] = frozenset(order) - heard
    return grudge


def one_way(senders: Iterable[str], receivers: Iterable[str]) -> dict[str, frozenset[str]]:
    """``receivers`` stop hearing ``senders``; the other way still flows."""
    source = frozenset(senders)
    grudge = {receiver: source - {receiver} for receiver in receivers}
    return {node: dropped for node, dropped in grudge.items() if dropped}


def symmetric(grudge: Grudge) -> bool:
    return all(
        node in grudge.get(other, frozenset())
        for node, dropped in grudge.items()
        for other in dropped
    )
