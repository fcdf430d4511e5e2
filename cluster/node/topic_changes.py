"""Changing a topic across the cluster: a queue count or a deletion recorded in etcd,
and a listing (the master's ``list_topics``, or etcd's topics) applied to a node's
registry.

A listing adds: a topic the registry lacks is created, one with fewer queues than
listed is grown; a listing with fewer queues than the registry (an older one) is
ignored, since queue counts only grow. A topic goes from a follower's registry only
when the listing that had it no longer does (:class:`ListingFollower`): the records of
a deleted topic are dropped by the deletion marker in the replicated log, not here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import attrs

from cluster.coordination.etcd import Compare, EtcdClient, EtcdError, PutOp
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

__all__ = [
    "ADMIN_ETCD_TIMEOUT_S",
    "ALTER_ATTEMPTS",
    "ListingFollower",
    "alter_in_etcd",
    "apply_listing",
    "delete_in_etcd",
    "etcd_for_topic_change",
]

log = logging.getLogger(__name__)

ALTER_ATTEMPTS = 5
"""Compare-and-swap rounds before two admins growing one topic at once give up."""

ADMIN_ETCD_TIMEOUT_S = 5.0
"""Deadline of each etcd call of a topic change. The coordinator's own calls are bounded
by a fraction of the lease (0.5 s by default) because leadership depends on them; a topic
change has no lease to keep, and under load a commit can take longer than that."""


@asynccontextmanager
async def etcd_for_topic_change(action: str) -> AsyncIterator[None]:
    """Answer an etcd failure during ``action`` with ``COORDINATION_UNAVAILABLE``, naming
    what may have happened and what to do, instead of an internal error."""
    try:
        yield
    except EtcdError as exc:
        log.warning("topic_change_etcd_failed action=%r error=%r", action, exc)
        raise RequestError(
            Status.COORDINATION_UNAVAILABLE,
            f"{action}: etcd did not answer in time ({type(exc).__name__}: {exc}); nothing "
            "was written to the log, and etcd may or may not hold the change: run it again "
            "(it finishes the job, or says it is done); if this persists, check etcd with "
            "`tidelog cluster status`",
        ) from exc


async def alter_in_etcd(etcd: EtcdClient, keys: ClusterKeys, name: str, queues: int) -> TopicRecord:
    """Grow ``topics/<name>`` in etcd to ``queues`` (compare-and-swap on its revision),
    so every node applies it and a failover keeps it. Shrinking raises
    :class:`~cluster.node.topics.QueueCountError`; an absent topic ``UNKNOWN_TOPIC``."""
    check_queue_count(queues)
    key = keys.topic(name)
    for _attempt in range(ALTER_ATTEMPTS):
        stored = await etcd.get(key, timeout_s=ADMIN_ETCD_TIMEOUT_S)
        if stored is None:
            raise unknown_topic(name)
        existing = TopicRecord.decode(stored.key, stored.value)
        check_growth(Topic(existing.name, existing.queues, existing.created_us), queues)
        if existing.queues == queues:
            return existing
        grown = attrs.evolve(existing, queues=queues)
        result = await etcd.txn(
            [Compare.mod_revision(key, stored.mod_revision)],
            [PutOp(key, grown.encode())],
            timeout_s=ADMIN_ETCD_TIMEOUT_S,
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


async def delete_in_etcd(etcd: EtcdClient, keys: ClusterKeys, name: str) -> None:
    """Remove ``topics/<name>`` from etcd (every node's registry follows); an absent
    topic is ``UNKNOWN_TOPIC``."""
    deleted = await etcd.delete(keys.topic(name), timeout_s=ADMIN_ETCD_TIMEOUT_S)
    if not deleted.deleted:
        raise unknown_topic(name)


class ListingFollower:
    """Applies successive listings of the authority (the master, or etcd) to a follower's
    registry: adds and grows (:func:`apply_listing`), and forgets a topic a listing had
    and the next one has not (a deletion). A topic the first listing already lacks
    stays: absence alone proves nothing (a node's own topic, or an empty answer).
    One task calls :meth:`apply`."""

    def __init__(self, registry: TopicRegistry) -> None:
        self._registry = registry
        self._listed: set[str] | None = None

    async def apply(self, listed: Iterable[tuple[str, int]]) -> None:
        listing = list(listed)
        names = {name for name, _queues in listing}
        if self._listed is not None:
            for name in sorted(self._listed - names):
                try:
                    await self._registry.delete(name)
                except UnknownTopicError:
                    continue
                log.info("topic_unlisted topic=%s action=forgotten", name)
        self._listed = names
        await apply_listing(self._registry, listing)
