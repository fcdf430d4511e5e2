"""Where the client sends a request next, from what it saw: pure decisions, no I/O.

Two questions, answered here so they can be tested exhaustively:

* Which node is the master? Every node serves ``metadata`` from its own view (a slave
  from its watch of etcd), so answers can disagree while a failover is in progress. A
  master is named per epoch and an epoch names at most one master, so the answer with
  the highest epoch wins (:func:`best_view`). A node too old for ``metadata`` is read
  from its ``status`` (:func:`view_from_status`).
* After an attempt, what next (:func:`next_step`)? The rule that matters most: a request
  that may have reached the node and got no answer has an unknown outcome and is never
  resent; only what certainly was not applied (nothing sent, or a retryable status) is.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from cluster.protocol import Status
from cluster.protocol.address import is_address

__all__ = [
    "Attempt",
    "ClusterView",
    "Step",
    "addresses_to_ask",
    "best_view",
    "next_step",
    "view_from_metadata",
    "view_from_status",
]


@attrs.frozen
class ClusterView:
    """One node's idea of its group: who is master in which epoch, who the members are.

    ``master`` and ``members`` are client addresses (``host:port``); ``source`` is the
    address that answered.
    """

    source: str
    epoch: int | None
    master: str | None
    members: tuple[str, ...] = ()


def _address_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and is_address(value) else None


def _epoch_or_none(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def view_from_metadata(source: str, answer: Mapping[str, Any]) -> ClusterView:
    """A ``metadata`` answer as a view. Entries this client cannot read are skipped (a
    newer node may add fields); a master without a client address counts as unknown."""
    master = answer.get("master")
    master_address = _address_or_none(master.get("client")) if isinstance(master, Mapping) else None
    members: list[str] = []
    for member in answer.get("members") or ():
        address = _address_or_none(member.get("client")) if isinstance(member, Mapping) else None
        if address is not None and address not in members:
            members.append(address)
    return ClusterView(source, _epoch_or_none(answer.get("epoch")), master_address, tuple(members))


def view_from_status(source: str, answer: Mapping[str, Any]) -> ClusterView:
    """A ``status`` answer as a view, for nodes that do not serve ``metadata``: a node
    that says it is a writable master is the master (at its epoch); anything else names
    no master."""
    epoch = _epoch_or_none(answer.get("epoch"))
    if answer.get("role") == "master" and answer.get("writable") is True:
        return ClusterView(source, epoch, source, (source,))
    return ClusterView(source, epoch, None, (source,))


def best_view(views: Iterable[ClusterView]) -> ClusterView | None:
    """The view naming a master with the highest epoch (None: no view names one).

    Between views of the same epoch, one the master gave about itself is preferred: it
    proves the master answers. Epoch None (a node without coordination) ranks lowest.
    """
    naming = [view for view in views if view.master is not None]
    if not naming:
        return None
    return max(
        naming,
        key=lambda view: (
            -1 if view.epoch is None else view.epoch,
            view.source == view.master,
        ),
    )


def addresses_to_ask(bootstrap: Iterable[str], members: Iterable[str]) -> tuple[str, ...]:
    """Bootstrap addresses in their order, then learnt members; each once."""
    seen: dict[str, None] = {}
    for address in (*bootstrap, *members):
        seen.setdefault(address, None)
    return tuple(seen)


class Step(enum.Enum):
    """What the client does after one attempt."""

    DONE = "done"
    """Report the outcome: answered for good, unknown, or out of retries or time."""
    FOLLOW_HINT = "follow_hint"
    """Resend at once to the master a ``NOT_MASTER`` answer named."""
    REDISCOVER = "rediscover"
    """Pause, ask the known nodes who the master is, then resend."""
    PAUSE = "pause"
    """Pause, then resend to the same master (it is busy or short of slaves)."""


@attrs.frozen
class Attempt:
    """What one attempt gave.

    ``sent``: the request may have reached the node (False: certainly not: no connection
    could be made, or it closed before the request was queued). ``status`` is the
    answer's status, None when there was no answer. ``hint`` is the master a
    ``NOT_MASTER`` answer named; ``address`` where the attempt went.
    """

    sent: bool
    status: Status | None
    address: str | None = None
    hint: str | None = None

    def __attrs_post_init__(self) -> None:
        assert self.sent or self.status is None, "an answer implies the request was sent"


def next_step(
    attempt: Attempt,
    *,
    resends_left: bool,
    time_left: bool,
    followed_hint_last: bool = False,
    may_wait_for_nodes: bool = True,
) -> Step:
    """The step after ``attempt``.

    ``resends_left`` / ``time_left``: the request's budget of resends and of time.
    ``followed_hint_last``: the previous step followed a hint (a second hint in a row
    is not followed blindly: two nodes naming each other would loop). Without
    ``may_wait_for_nodes`` (no node of this client ever answered) an attempt that
    could not connect is final: waiting will not make a wrong address right.
    """
    if attempt.sent and attempt.status is None:
        return Step.DONE  # maybe applied: resending could store it twice
    if attempt.status is not None and not attempt.status.retryable:
        return Step.DONE
    if not (resends_left and time_left):
        return Step.DONE
    if not attempt.sent:
        return Step.REDISCOVER if may_wait_for_nodes else Step.DONE
    if attempt.status is Status.NOT_MASTER:
        usable = attempt.hint is not None and attempt.hint != attempt.address
        return Step.FOLLOW_HINT if usable and not followed_hint_last else Step.REDISCOVER
    if attempt.status is Status.SHUTTING_DOWN:
        return Step.REDISCOVER
    return Step.PAUSE
