"""Small trio helpers shared by every layer above (kept here, at the bottom of the
dependency chain, so that ``replication`` and ``cluster`` can both use them)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def lone_error_unwrapped() -> Iterator[None]:
    """Re-raise a nursery's lone failure as itself.

    trio wraps every error that leaves a nursery in an ``ExceptionGroup``. When a
    context manager runs a nursery around its caller's block, or a task catches errors
    by type (``except HAProtocolError``), a single failure should arrive as itself, not
    slip past those ``except`` clauses inside a group. Several failures stay grouped.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from group
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
