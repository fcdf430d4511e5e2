"""Which live member of a consumer group reads which queue: a pure, deterministic rule.

Policy (sticky balanced): every queue goes to exactly one member; each member's share is
``len(queues) // len(members)`` queues, and the first ``len(queues) % len(members)``
members in sorted order get one more. A member keeps the queues it held before, up to
its share; the queues left over (the dead or departed members', and any a member holds
beyond its new share) go, in sorted order, to the members below their share, in sorted
order. So a join or a departure moves only the queues the new shares require.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["QueueRef", "assign"]

QueueRef = tuple[str, int]
"""One queue of a topic: ``(topic, queue id)``."""


def assign(
    queues: Sequence[QueueRef],
    members: Sequence[str],
    previous: Mapping[str, Sequence[QueueRef]] | None = None,
) -> dict[str, list[QueueRef]]:
    """Member -> its queues (sorted). No members: an empty mapping. ``previous`` is the
    last assignment (members gone from ``members`` and queues gone are ignored)."""
    ordered_members = sorted(set(members))
    if not ordered_members:
        return {}
    ordered_queues = sorted(set(queues))
    base, extra = divmod(len(ordered_queues), len(ordered_members))
    share = {m: base + (1 if i < extra else 0) for i, m in enumerate(ordered_members)}
    result: dict[str, list[QueueRef]] = {m: [] for m in ordered_members}
    taken: set[QueueRef] = set()
    wanted = set(ordered_queues)
    for member in ordered_members:
        for queue in sorted((previous or {}).get(member, ())):
            if queue in wanted and queue not in taken and len(result[member]) < share[member]:
                result[member].append(queue)
                taken.add(queue)
    free = iter(q for q in ordered_queues if q not in taken)
    for member in ordered_members:
        while len(result[member]) < share[member]:
            result[member].append(next(free))
    for member in ordered_members:
        result[member].sort()
    return result
