"""Consumer-group membership on the master: who is live, the generation, who reads what
(sans-IO: the caller passes the time in seconds, e.g. ``trio.current_time()``).

Like Kafka's group coordinator, simplified, with revocation before hand-over: a member
joins with its id and topics; every change of the live set (a join of a new member, a
leave, a member silent for its session timeout) starts a new *generation* whose target
assignment is :func:`~cluster.node.group_assignment.assign` (sticky balanced). A join
*grants* a member only the target queues no other live member still holds from its own
last join; a holder gives a queue up by joining again (after committing it), which it
does when its heartbeat answers ``rejoin``; the member waiting for the queue is told
``rejoin`` at its next heartbeat once the queue is free. So among live members a queue
is never held twice, and its last holder's final commit lands before the next holder
fetches. A dead member's queues are free once its session runs out. A topic that
grew queues (``topic alter --queues``) starts a new generation too (:meth:`resize`,
checked at every heartbeat), so its new queues are shared without waiting for a
membership change. A commit is
accepted from a live member, in the generation of its last join, for queues it was
granted then; anything else is fenced. Membership lives in memory only: after a
failover the new master knows no members and every heartbeat answers ``rejoin``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from cluster.node.group_assignment import QueueRef, assign

__all__ = ["DEFAULT_SESSION_TIMEOUT_MS", "GroupMembership", "GroupState", "Joined"]

DEFAULT_SESSION_TIMEOUT_MS: Final = 10_000


@attrs.frozen
class Joined:
    """What a join answers: the member's generation and its queues."""

    generation: int
    assignment: list[QueueRef]
    members: int


@attrs.define
class GroupState:
    """One group's live members (id -> deadline, seconds), its generation and assignments.

    Invariant: ``assignment`` covers every queue of ``queues`` exactly once, over exactly
    the live members (empty when none are live); ``previous`` is the last generation's.
    """

    topics: tuple[str, ...]
    queues: list[QueueRef]
    generation: int = 0
    deadlines_s: dict[str, float] = attrs.field(factory=dict)
    session_s: dict[str, float] = attrs.field(factory=dict)
    assignment: dict[str, list[QueueRef]] = attrs.field(factory=dict)
    previous: dict[str, list[QueueRef]] = attrs.field(factory=dict)
    held: dict[str, list[QueueRef]] = attrs.field(factory=dict)
    """Live member -> the queues its last join granted it (disjoint between members)."""
    joined_in: dict[str, int] = attrs.field(factory=dict)
    """Live member -> the generation of its last join."""

    def rebalance(self) -> None:
        self.previous = self.assignment
        self.generation += 1
        self.assignment = assign(self.queues, list(self.deadlines_s), self.previous)

    def drop(self, member: str) -> None:
        for table in (self.deadlines_s, self.session_s, self.held, self.joined_in):
            table.pop(member, None)

    def grantable(self, member: str) -> list[QueueRef]:
        """``member``'s target queues that no other live member holds."""
        taken = {q for other, queues in self.held.items() if other != member for q in queues}
        return [q for q in self.assignment.get(member, []) if q not in taken]


class GroupMembership:
    """Every group this master coordinates. One task (the event loop) calls it; each
    call first drops the members whose session ran out."""

    def __init__(self) -> None:
        self._groups: dict[str, GroupState] = {}

    def expire(self, now_s: float) -> list[tuple[str, str]]:
        """Drop members silent past their session; returns ``(group, member)`` dropped."""
        dropped = []
        for name, group in self._groups.items():
            gone = [m for m, deadline_s in group.deadlines_s.items() if deadline_s < now_s]
            for member in gone:
                group.drop(member)
                dropped.append((name, member))
            if gone:
                group.rebalance()
        return dropped

    def join(
        self,
        name: str,
        member: str,
        topics: Mapping[str, int],
        session_timeout_ms: int,
        now_s: float,
    ) -> Joined:
        """Join (or re-join) ``member``; ``topics`` maps each topic to its queue count.
        A group's members must consume the same topics (ValueError otherwise)."""
        self.expire(now_s)
        wanted = tuple(sorted(topics))
        queues = [(t, q) for t in wanted for q in range(topics[t])]
        group = self._groups.get(name)
        if group is None or not group.deadlines_s:
            group = self._groups[name] = GroupState(
                wanted, queues, group.generation if group else 0
            )
        elif group.topics != wanted:
            raise ValueError(
                f"group {name!r} consumes {', '.join(group.topics)}; a member of it cannot "
                f"consume {', '.join(wanted)}: use another group name"
            )
        session_s = session_timeout_ms / 1000
        changed = member not in group.deadlines_s or queues != group.queues
        group.deadlines_s[member] = now_s + session_s
        group.session_s[member] = session_s
        if changed:
            group.queues = queues
            group.rebalance()
        granted = group.grantable(member)
        group.held[member] = granted
        group.joined_in[member] = group.generation
        return Joined(group.generation, list(granted), len(group.deadlines_s))

    def resize(self, name: str, topics: Mapping[str, int], now_s: float) -> bool:
        """The group's topics now have these queue counts (topic -> count; a topic left
        out, e.g. deleted, keeps its queues): when they changed, a new generation shares
        them out, and every member is told to join again at its next heartbeat.
        Returns whether it did."""
        self.expire(now_s)
        group = self._groups.get(name)
        if group is None or not group.deadlines_s:
            return False
        counts = dict.fromkeys(group.topics, 0)
        for topic, _queue in group.queues:
            counts[topic] += 1
        counts.update((t, n) for t, n in topics.items() if t in counts)
        queues = [(t, q) for t in group.topics for q in range(counts[t])]
        if queues == group.queues:
            return False
        group.queues = queues
        group.rebalance()
        return True

    def heartbeat(self, name: str, member: str, generation: int, now_s: float) -> int | None:
        """Keep ``member`` alive; the current generation when it holds it, None when it
        must join again (unknown member, or a new generation started)."""
        self.expire(now_s)
        group = self._groups.get(name)
        if group is None or member not in group.deadlines_s:
            return None
        group.deadlines_s[member] = now_s + group.session_s[member]
        if generation != group.generation:
            return None
        held = group.held.get(member, [])
        if held != group.assignment.get(member, []) and group.grantable(member) != held:
            return None  # a queue it waits for was given up: join again to take it
        return group.generation

    def leave(self, name: str, member: str, now_s: float) -> bool:
        """Remove ``member`` at once (its queues move now, not after its session)."""
        self.expire(now_s)
        group = self._groups.get(name)
        if group is None or member not in group.deadlines_s:
            return False
        group.drop(member)
        group.rebalance()
        return True

    def commit_refusal(
        self,
        name: str,
        member: str | None,
        generation: int | None,
        queues: Sequence[QueueRef],
        now_s: float,
    ) -> str | None:
        """Why a commit of ``queues`` must be refused (None: accept it). Without a member
        (an admin reset) the group must have no live members."""
        self.expire(now_s)
        group = self._groups.get(name)
        live = group is not None and bool(group.deadlines_s)
        if member is None:
            if live:
                assert group is not None
                return (
                    f"group {name!r} has {len(group.deadlines_s)} live member(s): stop its "
                    "consumers first (a commit without a member is an admin reset)"
                )
            return None
        if group is None or member not in group.deadlines_s:
            return f"member {member!r} is not in group {name!r} (expired or the master changed)"
        if generation != group.joined_in.get(member):
            return (
                f"member {member!r} joined generation {group.joined_in.get(member)}, not "
                f"{generation} (the group is at generation {group.generation})"
            )
        held = set(group.held.get(member, ()))
        for queue in queues:
            if queue not in held:
                return (
                    f"member {member!r} does not hold {queue[0]}/{queue[1]} in generation "
                    f"{generation} (the group is at generation {group.generation})"
                )
        return None

    def live(self, name: str) -> int:
        group = self._groups.get(name)
        return len(group.deadlines_s) if group is not None else 0

    def state(self, name: str, now_s: float) -> GroupState | None:
        self.expire(now_s)
        return self._groups.get(name)

    def names(self, now_s: float) -> list[str]:
        self.expire(now_s)
        return sorted(self._groups)
