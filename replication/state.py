"""The replication decisions, pure (no trio, no sockets, no files): what the master
confirms, where a slave's stream starts, what a slave does with its log before it
applies the first chunk, and how a node starts a term.

The I/O classes (:mod:`replication.master`, :mod:`replication.slave`) feed these the
values they read and act on the answers, so every rule here is tested on its own
(``tests/replication/test_state.py``) with generated histories and offsets.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from replication.epochs import EpochEntry, EpochHistory, divergence_point

__all__ = [
    "FollowPlan",
    "StreamRefused",
    "StreamStart",
    "begin_term",
    "follow_plan",
    "next_confirm_offset",
    "stream_start",
]


def next_confirm_offset(
    current: int, in_sync_acks: Mapping[str, int], min_insync_replicas: int = 1
) -> int:
    """The confirm offset after the in-sync slaves acknowledged ``in_sync_acks``.

    It is the slowest in-sync slave's ack, but never lower than ``current``: a lagging
    slave that joins the set later does not un-confirm bytes every slave in sync at the
    time had already acknowledged. With fewer than ``min_insync_replicas`` slaves in
    sync it stays where it is, so every advance is held by at least that many slaves
    (with the default of 1: nothing new is replicated while no slave is in sync).

    The master keeps two offsets by this rule: the confirm offset consumers read up
    to (``min_insync_replicas`` 1, Kafka's high watermark) and the *replicated offset*
    that releases ``in_sync``/``replicated`` acks (the ack policy's
    ``min_insync_replicas``): a write admitted while enough slaves were in sync is not
    acknowledged after the set shrank below that, whoever acknowledged it since.
    """
    if len(in_sync_acks) < min_insync_replicas or not in_sync_acks:
        return current
    return max(current, min(in_sync_acks.values()))


class StreamRefused(Exception):
    """The master cannot serve this slave; the message says why and what to do."""


@attrs.frozen
class StreamStart:
    """Where the master's stream to one slave starts, and why there."""

    offset: int
    """The first chunk's offset: what the slave keeps ends here."""
    diverged: bool = False
    """The slave's log past ``offset`` is not the master's: the slave cuts it."""
    resync: bool = False
    """The slave is behind the master's log start (or empty while the master's log does
    not start at 0): it restarts its log at ``offset`` (a full resync)."""


def proven_end(
    slave_history: EpochHistory, slave_end: int, master_history: EpochHistory, master_end: int
) -> int:
    """How much of the slave's log the epoch histories prove to be the master's: the
    divergence point, or the slave's whole end when the master has no history (an
    epoch-unaware master can only take the slave's word)."""
    if not len(master_history):
        return slave_end
    return divergence_point(slave_history, slave_end, master_history, master_end)


def stream_start(
    name: str,
    slave_history: EpochHistory,
    slave_end: int,
    master_history: EpochHistory,
    master_start: int,
    master_end: int,
) -> StreamStart:
    """The master's decision for a slave that says its log ends at ``slave_end``.

    The slave's claimed end is trusted only as far as the histories prove
    (:func:`proven_end`); past that the slave cuts its tail (``diverged``). A slave
    behind ``master_start`` -- retention removed what it needs, or it is brand new --
    restarts its log at the master's start (``resync``). Raises
    :class:`StreamRefused` when the slave holds records past the proven point but sent
    no history (nothing shows who wrote them), or claims more than the master holds
    with no history to cut by.
    """
    assert 0 <= master_start <= master_end, (master_start, master_end)
    offset = proven_end(slave_history, slave_end, master_history, master_end)
    diverged = offset < slave_end
    if diverged and not len(slave_history):
        raise StreamRefused(
            f"slave {name} holds records up to {slave_end} but sent no epoch history, so "
            f"nothing shows which master wrote those past {offset}; restore its epoch "
            "file or re-seed it"
        )
    if offset > master_end:
        raise StreamRefused(
            f"slave {name} is at {offset}, past the master's end {master_end} with no "
            "epoch history to cut its tail by; re-seed it"
        )
    if offset < master_start:
        return StreamStart(master_start, diverged=diverged, resync=True)
    return StreamStart(offset, diverged=diverged)


@attrs.frozen
class FollowPlan:
    """What a slave does to its log before it applies the master's first chunk."""

    start: int
    """Where the first chunk lands: the slave's log end once the plan is carried out."""
    cut_to: int | None = None
    """Truncate the log and the history to here: the tail past it is not the master's
    (may equal the log's end when only terms that start there are dropped)."""
    restart: bool = False
    """Drop the whole log and restart it empty at ``start`` (the master's log start)."""
    adopt: tuple[EpochEntry, ...] = ()
    """The master's epochs to append to the history, each once the log reaches its start."""


def follow_plan(
    history: EpochHistory | None,
    log_end: int,
    master_history: EpochHistory,
    master_end: int,
    stream_from: int,
) -> FollowPlan:
    """The slave's side of the handshake: the master streams from ``stream_from``.

    The slave checks the master's word against its own reading of the histories and
    never keeps a byte they do not prove: past the proven point (behind the master's log
    start, or new) it drops its whole log and restarts it at ``stream_from``; below its
    end it cuts there; at its end it just goes on.
    """
    assert stream_from <= master_end, (stream_from, master_end)
    mine = history if history is not None else EpochHistory()
    proven = proven_end(mine, log_end, master_history, master_end)
    kept = list(mine.entries)
    if stream_from > proven:
        plan_cut, restart, kept = None, True, []
    elif stream_from < log_end or any(e.start_offset >= stream_from for e in kept):
        # Also at the log's end: a term that starts there wrote nothing the master has.
        plan_cut, restart = stream_from, False
        kept = [e for e in kept if e.start_offset < stream_from]
    else:
        plan_cut, restart = None, False
    if history is None:
        return FollowPlan(stream_from, cut_to=plan_cut, restart=restart)
    current = kept[-1].epoch if kept else None
    adopt = tuple(e for e in master_history.entries if current is None or e.epoch > current)
    return FollowPlan(stream_from, cut_to=plan_cut, restart=restart, adopt=adopt)


def begin_term(history: EpochHistory, log_end: int) -> EpochEntry:
    """Append this node's new epoch (current + 1, or 1) starting at ``log_end``.

    Every node that accepts writes is in a term of its own, so a slave can always tell
    which of its records this master wrote. Epochs recorded past ``log_end`` are dropped
    first: they name terms whose records this log no longer holds (a crash lost the
    tail), and an epoch may not start before the one it follows.
    """
    history.truncate(log_end + 1)
    current = history.current
    history.append(current.epoch + 1 if current is not None else 1, log_end, led=True)
    entry = history.current
    assert entry is not None and entry.start_offset == log_end
    return entry
