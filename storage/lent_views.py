"""Views of the mapped log lent to answers that wait to be sent.

A ``records`` pull is answered with views of the segment maps (:mod:`storage.record_runs`),
written to the socket as they are (``writev``): the bytes are copied once, by the kernel.
An answer can wait in a connection's out queue for as long as its client reads slowly,
and the log changes meanwhile:

- Retention deletes old segments and a full resync deletes them all: harmless. A view
  keeps its map alive (:meth:`MappedFile.close` defers the unmap while views exist), and
  an unlinked file's pages stay valid while mapped. Segment files are never shrunk, so
  no access can fault.
- A cut (:meth:`MessageStore.truncate`) zeroes the rest of the segment it keeps and a
  slave then writes new records there: a lent view of those bytes would send zeros or
  other records. So before a cut changes any byte, :meth:`LentViews.copy_from` replaces
  every lent view reaching past the cut with a copy of its bytes (taken on the event
  loop, before the cut's worker thread starts), and the answer goes out as it was read.
"""

from __future__ import annotations

import logging

from storage.record_runs import RecordRuns

__all__ = ["LentViews", "Loan"]

log = logging.getLogger(__name__)


class Loan:
    """One answer's views of the log, until :meth:`give_back`.

    ``parts`` is the list the sender reads: a view of the log, or a copy of one made by
    :meth:`LentViews.copy_from`, in place (same list, same bytes). ``offsets`` gives each
    part's log offset. Used on the event loop thread only.
    """

    __slots__ = ("_lender", "offsets", "parts", "size")

    def __init__(self, lender: LentViews, runs: RecordRuns) -> None:
        self._lender: LentViews | None = lender
        self.offsets = [offset for offset, _view in runs.runs]
        self.parts: list[memoryview | bytes] = [view for _offset, view in runs.runs]
        self.size = runs.size

    def give_back(self) -> None:
        """The answer was sent (or never will be): release the views. Idempotent."""
        lender = self._lender
        if lender is None:
            return
        self._lender = None
        lender.returned(self)
        for part in self.parts:
            if isinstance(part, memoryview):
                part.release()
        self.parts = []

    def copy_from(self, offset: int) -> int:
        """Replace each view holding bytes at or past log ``offset`` with a copy; the
        number of bytes copied."""
        copied = 0
        parts = self.parts
        for index, start in enumerate(self.offsets):
            part = parts[index]
            if isinstance(part, memoryview) and start + len(part) > offset:
                parts[index] = bytes(part)
                part.release()
                copied += len(parts[index])
        return copied


class LentViews:
    """The loans of one store's log not given back yet.

    Invariant: a loan is here from :meth:`lend` until its :meth:`Loan.give_back`. The
    store calls :meth:`copy_from` before a cut changes a byte; the server lends and gives
    back. All on the event loop thread.
    """

    def __init__(self) -> None:
        self._loans: set[Loan] = set()

    def __len__(self) -> int:
        return len(self._loans)

    def lend(self, runs: RecordRuns) -> Loan:
        """Take over ``runs``' views (release them with the loan, not with ``runs``)."""
        loan = Loan(self, runs)
        self._loans.add(loan)
        return loan

    def returned(self, loan: Loan) -> None:
        self._loans.discard(loan)

    def copy_from(self, offset: int) -> None:
        """Before the log's bytes at or past ``offset`` change: lent views of them become
        copies, so answers not sent yet still send the bytes they were read with."""
        copied = sum(loan.copy_from(offset) for loan in self._loans)
        if copied:
            log.info("lent_views_copied offset=%d bytes=%d loans=%d", offset, copied, len(self))
