"""Operator actions on a group's records in etcd, taken from outside any node.

Thin I/O around the pure rules of :mod:`cluster.coordination.decisions`: read what the
rule needs in one listing, apply it, write the result by compare-and-swap on the
revision that was read, so a node's own change in between makes the action fail
(and say so) instead of overwriting it.
"""

from __future__ import annotations

import logging

import attrs

from cluster.coordination.decisions import ForgetRefused, state_after_forgetting
from cluster.coordination.etcd import Compare, EtcdClient, PutOp
from cluster.coordination.keys import ClusterKeys, GroupState, LeaderValue, MemberInfo

__all__ = ["ForgetRefused", "Forgotten", "forget_member"]

log = logging.getLogger(__name__)


@attrs.frozen
class Forgotten:
    """What :func:`forget_member` changed: the group state before and after."""

    before: GroupState
    after: GroupState


async def forget_member(etcd: EtcdClient, keys: ClusterKeys, group: str, node: str) -> Forgotten:
    """Drop ``node`` from ``group``'s recorded in-sync set (see
    :func:`~cluster.coordination.decisions.state_after_forgetting` for when and what it
    risks). Raises :class:`ForgetRefused` with the reason, also when the state changed
    while this ran."""
    listing = await etcd.range(keys.prefix, prefix=True)
    state: GroupState | None = None
    state_revision = 0
    leader: str | None = None
    live: set[str] = set()
    for kv in listing.kvs:
        ref = keys.parse(kv.key)
        if ref is None:
            continue
        if ref.kind == "state" and ref.name == group:
            state, state_revision = GroupState.decode(kv.key, kv.value), kv.mod_revision
        elif ref.kind == "leader" and ref.name == group:
            leader = LeaderValue.decode(kv.key, kv.value).node
        elif ref.kind == "member":
            info = MemberInfo.decode(kv.key, kv.value)
            if info.group == group:
                live.add(info.node)
    after = state_after_forgetting(state, node, live=live, leader=leader)
    assert state is not None
    key = keys.state(group)
    # the state unchanged since the listing, and the member still not back (no member key)
    result = await etcd.txn(
        [
            Compare.mod_revision(key, state_revision),
            Compare.create_revision(keys.member(node), 0),
        ],
        [PutOp(key, after.encode())],
    )
    if not result.succeeded:
        raise ForgetRefused(
            f"group {group}'s state changed while this ran, or {node} came back (a node "
            "acted meanwhile): look at `tidelog cluster status` and run it again if it "
            "still applies"
        )
    log.warning(
        "operator_forgot_member group=%s node=%s in_sync_before=%s in_sync_after=%s epoch=%d",
        group,
        node,
        sorted(state.in_sync),
        sorted(after.in_sync),
        after.epoch,
    )
    return Forgotten(state, after)
