"""Taking a connection's failures out of a trio exception group.

A connection runs several tasks (sender and ack reader, apply loop and heartbeat); they
can fail together, and together with the cancellation of an enclosing scope. The loops
catch stream errors with ``except*`` and report every leaf (:func:`leaves`), while a
``Cancelled`` goes on to the scope that was cancelled.
"""

from __future__ import annotations

__all__ = ["leaves"]


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions of ``group`` and its nested groups, in order."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
