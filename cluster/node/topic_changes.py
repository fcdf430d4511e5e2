"""Changing a topic across the cluster: a queue count recorded in etcd, and a listing
(the master's ``list_topics``, or etcd's topics) applied to a node's registry.

A listing only ever adds: a topic the registry lacks is created, one with fewer queues
than listed is grown; a listing with fewer queues than the registry (an older one) is
ignored, since queue counts only grow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import attrs

from cluster.coordination.etcd import Compare, EtcdClient, PutOp
from cluster.coordination.keys import ClusterKeys, TopicRecord
from cluster.node.topics import (
    Topic,
    TopicExistsError,
    TopicRegistry,
    UnknownTopicError,
    check_growth,
    check_queue_count,
)
from cluster.protocol import Status
from cluster.server.errors import RequestError, unknown_topic

__all__ = ["ALTER_ATTEMPTS", "alter_in_etcd", "apply_listing"]

log = logging.getLogger(__name__)

ALTER_ATTEMPTS = 5
"""Compare-and-swap rounds before two admins growing one topic at once give up."""


async def alter_in_etcd(etcd: EtcdClient, keys: ClusterKeys, name: str, queues: int) -> TopicRecord:
    """Grow ``topics/<name>`` in etcd to ``queues`` (compare-and-swap on its revision),
    so every node applies it and a failover keeps it. Shrinking raises
    :class:`~cluster.node.topics.QueueCountError`; an absent topic ``UNKNOWN_TOPIC``."""
    check_queue_count(queues)
    key = keys.topic(name)
    for _attempt in range(ALTER_ATTEMPTS):
        stored = await etcd.get(key)
        if stored is None:
            raise unknown_topic(name)
        existing = TopicRecord.decode(stored.key, stored.value)
        check_growth(Topic(existing.name, existing.queues, existing.created_us), queues)
        if existing.queues == queues:
            return existing
        grown = attrs.evolve(existing, queues=queues)
        result = await etcd.txn(
            [Compare.mod_revision(key, stored.mod_revision)], [PutOp(key, grown.encode())]
        )
        if result.succeeded:
            return grown
    raise RequestError(
        Status.BAD_REQUEST,
        f"topic {name!r} changed in etcd {ALTER_ATTEMPTS} times while it was being altered: "
        "another admin is changing it; try again",
    )


async def apply_listing(registry: TopicRegistry, listed: Iterable[tuple[str, int]]) -> None:
    """Create each listed topic the registry lacks and grow each it has fewer queues of."""
    for name, queues in listed:
        topic = registry.get(name)
        try:
            if topic is None:
                await registry.create(name, queues)
                log.info("topic_synced topic=%s queues=%d", name, queues)
            elif topic.queues < queues:
                await registry.alter(name, queues)
        except (TopicExistsError, UnknownTopicError):
            continue
