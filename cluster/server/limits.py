"""How many client connections this process can afford: a pure decision.

Every connection costs a file descriptor, and so do the node's own files (segments,
consume queues, the checkpoint, the topic registry, the epoch file), the replication
port's peers and the worker threads' work. A client flood that takes the last
descriptor makes the next checkpoint or segment roll fail, which stops the node; so the
client port gets only what the open-file limit leaves after a reserve.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["RESERVED_FDS", "ConnectionBudget", "connection_budget"]

RESERVED_FDS: Final = 128
"""Descriptors kept for the node beyond those open at start: segment rolls and
preallocation, checkpoint and registry writes, replication peers, refused-connection
replies in flight."""


@attrs.frozen
class ConnectionBudget:
    """The connection limit in force, and why it is below the configured one (None:
    it is not)."""

    max_connections: int
    lowered_because: str | None


def connection_budget(
    configured: int, nofile_limit: int | None, open_fds: int, reserved_fds: int = RESERVED_FDS
) -> ConnectionBudget:
    """``configured``, lowered to ``nofile_limit - open_fds - reserved_fds`` when that is
    smaller (never below 1: a node that can take no client at all would be useless, and
    the refusal path closes at once when descriptors run out). ``nofile_limit`` None
    means unlimited."""
    assert configured >= 1 and open_fds >= 0 and reserved_fds >= 0
    if nofile_limit is None:
        return ConnectionBudget(configured, None)
    affordable = nofile_limit - open_fds - reserved_fds
    if affordable >= configured:
        return ConnectionBudget(configured, None)
    return ConnectionBudget(
        max(1, affordable),
        f"the open-file limit is {nofile_limit} (ulimit -n), {open_fds} are open and "
        f"{reserved_fds} are kept for the node's own files: raise the limit to serve "
        f"{configured} connections",
    )
