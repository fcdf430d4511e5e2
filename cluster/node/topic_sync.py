"""A slave's topic registry kept in step with its master's ``list_topics``.

Topics are not in the replicated log, so without this a consumer pulling from a slave
would get ``UNKNOWN_TOPIC`` for topics whose records the slave holds. The list is
fetched at start, every :data:`TOPIC_SYNC_INTERVAL_S`, and on demand (a read naming a
topic the slave does not know yet).

One client connection to the master serves every round for as long as the master's
address stays the same: opening one per round made the master's connection count
swing with every round, each socket lingering until garbage collection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import trio

from cluster.client import Client, TidelogError, open_client
from cluster.node.topic_changes import ListingFollower
from cluster.node.topics import TopicRegistry

__all__ = ["TOPIC_SYNC_INTERVAL_S", "TOPIC_SYNC_TIMEOUT_S", "TopicSync"]

TOPIC_SYNC_INTERVAL_S: Final = 1.0
"""How often a slave fetches the master's topic list: a topic created on the master is
pullable from the slave within this, or at once on a pull naming it."""
TOPIC_SYNC_TIMEOUT_S: Final = 2.0
"""Bound on one fetch, so a pull naming an unknown topic never hangs on a dead master."""

log = logging.getLogger(__name__)


class TopicSync:
    """Creates here every topic the master lists that this registry lacks, grows each
    the master lists with more queues, and forgets each the master stopped listing (a
    deletion; its queues went with the deletion marker replication brought).

    ``master_client()`` says where the master's client port is now (None: unknown,
    nothing to do); it may change at any time (a repoint), and the next round follows.
    :meth:`run` runs in one task; :meth:`sync_now` may be called from any task of the
    same trio run, rounds never overlap (a lock), and a failed round is logged, not
    raised: the next one tries again.
    """

    def __init__(
        self,
        topics: TopicRegistry,
        master_client: Callable[[], str | None],
        *,
        interval_s: float = TOPIC_SYNC_INTERVAL_S,
        timeout_s: float = TOPIC_SYNC_TIMEOUT_S,
    ) -> None:
        self._topics = topics
        self._follower = ListingFollower(topics)
        self._master_client = master_client
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._lock = trio.Lock()
        self._client: tuple[str, Client] | None = None
        self.rounds = 0
        """Rounds that fetched a list (for status and tests)."""

    async def run(self) -> None:
        """Sync every interval until cancelled, over one connection per master address."""
        while True:
            master = self._master_client()
            if master is None:
                await trio.sleep(self._interval_s)
                continue
            async with open_client(master, connect_timeout=self._timeout_s) as client:
                self._client = (master, client)
                try:
                    while self._master_client() == master:
                        await self.sync_now()
                        await trio.sleep(self._interval_s)
                finally:
                    self._client = None

    async def sync_now(self) -> None:
        """One round, bounded by the timeout; logged, not raised, when it fails."""
        master = self._master_client()
        if master is None:
            return
        async with self._lock:
            with trio.move_on_after(self._timeout_s) as timer:
                try:
                    topics = await self._fetch(master)
                except (OSError, TidelogError) as exc:
                    log.warning("topic_sync_failed master=%s error=%r", master, exc)
                    return
            if timer.cancelled_caught:
                log.warning("topic_sync_timeout master=%s", master)
                return
            self.rounds += 1
            await self._create_missing(topics)

    async def _fetch(self, master: str) -> list[dict[str, Any]]:
        if self._client is not None and self._client[0] == master:
            return (await self._client[1].checked("list_topics"))["topics"]
        # No shared connection to this master yet (the first round, or a repoint that
        # the loop has not followed yet): a connection for this round only.
        async with open_client(master, connect_timeout=self._timeout_s) as client:
            topics: list[dict[str, Any]] = (await client.checked("list_topics"))["topics"]
            return topics

    async def _create_missing(self, topics: list[dict[str, Any]]) -> None:
        await self._follower.apply([(t["topic"], t["queues"]) for t in topics])
