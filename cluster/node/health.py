"""Is this node serving its role? The pure answer ``GET /health`` gives.

Healthy means the node does the job its role gives it now: a master takes writes, a
slave follows a master. Everything else is unhealthy with one sentence saying why, the
first that applies in this order: shutting down, storage failed, then the role's own
check (a slave: halted, or not connected to its master; any other role: the reason it
refuses writes -- stale, fenced, no master elected yet, disk full, lease unconfirmed).

A slave that is connected but behind is healthy: it serves its role and catches up;
lag is for the metrics and alerts, not for a restart. The docker healthcheck and the
launcher read the status code; people read ``reason``.
"""

from __future__ import annotations

from typing import Any

import attrs

from cluster.node.status import NodeStatus, SlaveReplicationStatus

__all__ = ["Health", "judge_health"]


@attrs.frozen
class Health:
    """The ``/health`` answer: ``healthy`` gives 200, else 503; ``reason`` is None
    exactly when healthy."""

    healthy: bool
    node: str
    role: str
    epoch: int | None
    writable: bool
    reason: str | None

    def __attrs_post_init__(self) -> None:
        assert self.healthy == (self.reason is None), "a reason exactly when unhealthy"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "unavailable",
            "node": self.node,
            "role": self.role,
            "epoch": self.epoch,
            "writable": self.writable,
            "reason": self.reason,
        }


def judge_health(status: NodeStatus, *, write_refusal: str | None, shutting_down: bool) -> Health:
    """The health of a node with ``status``; ``write_refusal`` is its role's sentence
    for refusing writes (None when the role takes them)."""
    reason = _unhealthy_because(status, write_refusal, shutting_down)
    return Health(
        healthy=reason is None,
        node=status.node,
        role=status.role,
        epoch=status.epoch,
        writable=status.writable,
        reason=reason,
    )


def _unhealthy_because(
    status: NodeStatus, write_refusal: str | None, shutting_down: bool
) -> str | None:
    if shutting_down:
        return "shutting down: finishing in-flight requests, then flushing and stopping"
    failure = status.store.get("failure")
    if status.store.get("failed"):
        return f"storage failed: {failure or 'writes are refused until a restart'}"
    replication = status.replication
    if isinstance(replication, SlaveReplicationStatus):
        return _slave_problem(replication)
    if write_refusal is not None:
        return write_refusal
    if status.store.get("disk_full"):
        return "disk full: the disk is above its watermark and writes are refused"
    if not status.writable:
        coordination = status.coordination or {}
        if coordination and not coordination.get("may_acknowledge", True):
            return "the etcd lease is not confirmed: acknowledgements are held"
        return "the node refuses writes"
    return None


def _slave_problem(replication: SlaveReplicationStatus) -> str | None:
    if replication.halted is not None:
        return f"replication halted: {replication.halted}"
    if not replication.connected:
        detail = f": {replication.last_error}" if replication.last_error else ""
        return f"not connected to the master at {replication.master_ha}{detail}"
    return None
