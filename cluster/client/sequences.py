"""An idempotent producer's sequence numbers and its span rule (sans-IO).

The node remembers the last 32 batches of each producer
(``cluster/node/idempotence.py``); the span rule keeps every batch the producer may
still retry among them: a batch is issued only while fewer than ``span`` batches (the
node's ``init_producer`` answer says how many: 16) were issued from the oldest
unresolved one on.
"""

from __future__ import annotations

import attrs

__all__ = ["IssuedBatch", "SequenceWindow"]


@attrs.frozen(slots=True)
class IssuedBatch:
    index: int
    sequence: int
    count: int


class SequenceWindow:
    """A producer's side: sequence numbers, and the span rule that keeps every batch
    it may still retry inside the node's window.

    A batch may be issued only while ``issued - oldest unresolved index < span``;
    it is resolved once its outcome is final (stored, refused, or given up on). One
    producer's tasks share it on one event loop.
    """

    def __init__(self, span: int = 16) -> None:
        assert span >= 1
        self.span = span
        self.next_sequence = 0
        self.issued = 0
        self._unresolved: set[int] = set()

    def may_issue(self) -> bool:
        return not self._unresolved or self.issued - min(self._unresolved) < self.span

    def issue(self, count: int) -> IssuedBatch:
        assert count >= 1 and self.may_issue(), "wait for may_issue() first"
        batch = IssuedBatch(self.issued, self.next_sequence, count)
        self.issued += 1
        self.next_sequence += count
        self._unresolved.add(batch.index)
        return batch

    def resolve(self, batch: IssuedBatch) -> None:
        self._unresolved.discard(batch.index)

    @property
    def unresolved(self) -> int:
        return len(self._unresolved)
