"""An idempotent producer's sequence numbers and its span rule (sans-IO).

The node remembers the last 128 batches of each producer
(``cluster/node/idempotence.py``); the span rule keeps every batch the producer may
still retry among them: a batch is issued only while fewer than ``span`` batches (the
node's ``init_producer`` answer says how many: 64) were issued from the oldest
unresolved one on.
"""

from __future__ import annotations

import collections

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
    producer's tasks share it on one event loop. Every call is O(1) (amortised): the
    flags of the batches from the oldest unresolved one on are a deque that
    :meth:`resolve` trims from the front.
    """

    def __init__(self, span: int = 64) -> None:
        assert span >= 1
        self.span = span
        self.next_sequence = 0
        self.issued = 0
        self.unresolved = 0
        """Batches issued and not resolved yet."""
        self._oldest = 0
        """Index of the oldest unresolved batch (``issued`` when none is)."""
        self._resolved: collections.deque[bool] = collections.deque()
        """Whether each batch from ``_oldest`` on is resolved (the first never is)."""

    def free(self) -> int:
        """How many batches may be issued now."""
        return self.span - (self.issued - self._oldest)

    def may_issue(self) -> bool:
        return self.issued - self._oldest < self.span

    def issue(self, count: int) -> IssuedBatch:
        assert count >= 1 and self.may_issue(), "wait for may_issue() first"
        batch = IssuedBatch(self.issued, self.next_sequence, count)
        self.issued += 1
        self.next_sequence += count
        self.unresolved += 1
        self._resolved.append(False)
        return batch

    def resolve(self, batch: IssuedBatch) -> None:
        at = batch.index - self._oldest
        if at < 0 or self._resolved[at]:
            return  # resolved before
        self._resolved[at] = True
        self.unresolved -= 1
        while self._resolved and self._resolved[0]:
            self._resolved.popleft()
            self._oldest += 1
        if not self._resolved:
            self._oldest = self.issued
