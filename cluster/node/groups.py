"""The consumer-group ops on a node: membership (master only, in memory) and committed
offsets (records of :data:`~cluster.node.group_offsets.OFFSETS_TOPIC`, so every node
that holds the log can answer them).

The offsets map follows the log: before a read, the records appended to the offsets
queue since the last look are applied (on a slave only up to its read limit, so it
never shows a commit a failover could take back). A log that was cut under the map (a
demoted master's divergent tail) is noticed by the last applied record no longer being
where it was, and the map is rebuilt from the queue's start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import trio

from cluster.node.group_membership import GroupMembership
from cluster.node.group_offsets import (
    OFFSETS_QUEUE,
    OFFSETS_TOPIC,
    Commit,
    OffsetsMap,
    decode_commit,
    encode_commit,
)
from cluster.node.topics import TopicRegistry
from cluster.protocol import Acks, Status, make_response
from cluster.server import Deferred, Reply, RequestError, Wakeups
from cluster.server.errors import status_of, unknown_topic
from storage import Message, MessageStore

if TYPE_CHECKING:
    from cluster.node.acks import AckPolicy
    from cluster.server.handler import AckTimer

__all__ = ["GroupService"]

log = logging.getLogger(__name__)

SCAN_PAGE: Final = 1024
"""Offsets records read per page while the map catches up with the log."""

_UNKNOWN_OUTCOME: Final = frozenset({Status.FLUSH_DISK_TIMEOUT, Status.FLUSH_SLAVE_TIMEOUT})
"""The statuses of a commit appended whose acknowledgement did not come."""


def _cut_error(acks: Acks) -> str:
    """The error of a commit whose ack wait ended before its deadline: only a cut of the
    log below its end (group commit's waiters past it are woken with False) or a role
    change (a stale or stepped-down master's waits) ends one so early, and the level's
    own sentence would say the fsync or the slaves were too slow and it is probably
    stored."""
    what = "its fsync" if acks is Acks.DURABLE else "the in-sync slaves"
    return (
        f"the offset commit was appended, but before {what} confirmed it this node's log "
        "was cut below it or its role changed (a demoted master drops the tail the new "
        "master lacks), so the committed offsets may be gone: fetch the group's offsets "
        "from the current master and commit again if they are not there"
    )


class GroupService:
    """Serves ``join_group``, ``heartbeat``, ``leave_group``, ``commit_offsets``,
    ``fetch_offsets``, ``list_groups`` and ``describe_group``.

    ``acks`` and ``read_limit`` are read at each call (a promotion changes both): the
    limit is None on a master (its own log is the truth) and the confirm offset on a
    slave. Called from the node's event loop only.
    """

    def __init__(
        self,
        store: MessageStore,
        topics: TopicRegistry,
        acks: Callable[[], AckPolicy],
        read_limit: Callable[[], int | None],
        clock: Callable[[], float] = trio.current_time,
        *,
        ack_timer: AckTimer | None = None,
    ) -> None:
        self._store = store
        self._topics = topics
        self._acks = acks
        self._read_limit = read_limit
        self._clock = clock
        self._ack_timer = ack_timer
        """Told each commit's ack wait (level, status, seconds since its append): metrics."""
        self.membership = GroupMembership()
        self.offsets = OffsetsMap()
        self._next = 0
        """The next offsets-queue offset to apply."""
        self._last: tuple[int, int] | None = None
        """(queue offset, log offset) of the last record applied: moved means cut."""

    def ops(self) -> dict[str, Callable[[Any, Wakeups], Any]]:
        return {
            "join_group": self._join,
            "heartbeat": self._heartbeat,
            "leave_group": self._leave,
            "commit_offsets": self._commit,
            "fetch_offsets": self._fetch,
            "list_groups": self._list,
            "describe_group": self._describe,
        }

    def forget(self) -> None:
        """The role changed: membership is the old master's, drop it; re-read the map."""
        self.membership = GroupMembership()
        self._reset_map()

    def _reset_map(self) -> None:
        self.offsets = OffsetsMap()
        self._next = 0
        self._last = None

    # ---- the offsets map -----------------------------------------------------------------

    async def catch_up(self) -> None:
        """Apply the offsets records appended since the last call (see the module doc).

        A page at a time, yielding to the event loop after each (the queue is never
        compacted, so a rebuild after a start or a role change may read millions of
        records). A page is read and applied whole before the yield, so callers that
        interleave share the progress and never apply a record twice."""
        if self._last is not None and not self._still_there(*self._last):
            log.warning("group_offsets_rebuilt reason=log_cut next=%d", self._next)
            self._reset_map()
        limit = self._read_limit()
        while True:
            page = self._store.get_messages(
                OFFSETS_TOPIC,
                OFFSETS_QUEUE,
                self._next,
                max_messages=SCAN_PAGE,
                max_bytes=1 << 20,
                below_offset=limit,
            )
            for queue_offset, record in page.records:
                commit = decode_commit(bytes(record.body))
                if commit is not None:
                    self.offsets.apply(commit)
                self._last = (queue_offset, record.physical_offset)
            self._next = page.next_offset
            if len(page.records) < SCAN_PAGE:
                return
            await trio.lowlevel.checkpoint()

    def _still_there(self, queue_offset: int, log_offset: int) -> bool:
        low, high = self._store.queue_offsets(OFFSETS_TOPIC, OFFSETS_QUEUE)
        if not low <= queue_offset < high:
            return queue_offset < low  # retention took it: fine; beyond the end: cut
        page = self._store.get_messages(OFFSETS_TOPIC, OFFSETS_QUEUE, queue_offset, max_messages=1)
        return bool(page.records) and page.records[0][1].physical_offset == log_offset

    # ---- membership (master) -------------------------------------------------------------

    def _queue_counts(self, topics: list[str]) -> dict[str, int]:
        counts = {}
        for name in topics:
            topic = self._topics.get(name)
            if topic is None:
                raise unknown_topic(name)
            counts[name] = topic.queues
        return counts

    async def _join(self, req: Mapping[str, Any], _polls: Wakeups) -> Reply:
        group, member = req["group"], req["member"]
        counts = self._queue_counts(req["topics"])
        try:
            joined = self.membership.join(
                group, member, counts, req["session_timeout_ms"], self._clock()
            )
        except ValueError as exc:
            raise RequestError(Status.BAD_REQUEST, str(exc)) from None
        log.info(
            "group_joined group=%s member=%s generation=%d queues=%d members=%d",
            group,
            member,
            joined.generation,
            len(joined.assignment),
            joined.members,
        )
        return make_response(
            req["id"],
            group=group,
            member=member,
            generation=joined.generation,
            members=joined.members,
            assignment=[{"topic": t, "queue": q} for t, q in joined.assignment],
        )

    async def _heartbeat(self, req: Mapping[str, Any], _polls: Wakeups) -> Reply:
        group, member = req["group"], req["member"]
        now = self._clock()
        self._follow_queue_counts(group, now)
        generation = self.membership.heartbeat(group, member, req["generation"], now)
        if generation is None:
            raise RequestError(
                Status.REJOIN_GROUP,
                f"group {group!r} rebalanced or does not know member {member!r}: commit what "
                "you processed, then join_group again",
            )
        return make_response(req["id"], group=group, generation=generation)

    def _follow_queue_counts(self, group: str, now_s: float) -> None:
        """A topic of the group that grew queues since its generation began starts a
        new one (the members hear ``rejoin`` and the new queues are shared)."""
        state = self.membership.state(group, now_s)
        if state is None:
            return
        counts = {}
        for name in state.topics:
            topic = self._topics.get(name)
            if topic is not None:  # a deleted topic keeps its queues until members re-join
                counts[name] = topic.queues
        if self.membership.resize(group, counts, now_s):
            log.info(
                "group_rebalanced group=%s reason=queue_count generation=%d queues=%d",
                group,
                state.generation,
                len(state.queues),
            )

    async def _leave(self, req: Mapping[str, Any], _polls: Wakeups) -> Reply:
        left = self.membership.leave(req["group"], req["member"], self._clock())
        log.info("group_left group=%s member=%s known=%s", req["group"], req["member"], left)
        return make_response(req["id"], group=req["group"], left=left)

    # ---- offsets -------------------------------------------------------------------------

    async def _commit(self, req: Mapping[str, Any], _polls: Wakeups) -> Reply | Deferred:
        group, member, generation = req["group"], req["member"], req["generation"]
        positions = req["offsets"]
        if (member is None) is not (generation is None):
            raise RequestError(
                Status.BAD_REQUEST,
                "op 'commit_offsets': 'member' and 'generation' go together (a member's "
                "commit) or are both left out (an admin reset of a group with no members)",
            )
        for position in positions:
            topic = self._topics.get(position["topic"])
            if topic is None:
                raise unknown_topic(position["topic"])
            if position["queue"] >= topic.queues:
                raise RequestError(
                    Status.BAD_REQUEST,
                    f"topic {topic.name!r} has {topic.queues} queue(s); queue "
                    f"{position['queue']} does not exist",
                )
        queues = [(p["topic"], p["queue"]) for p in positions]
        refusal = self.membership.commit_refusal(group, member, generation, queues, self._clock())
        if refusal is not None:
            status = Status.GROUP_HAS_MEMBERS if member is None else Status.REJOIN_GROUP
            raise RequestError(status, f"commit refused: {refusal}")
        acks = self._acks()
        acks.admit(req["acks"])
        messages = [
            Message.create(
                OFFSETS_TOPIC,
                encode_commit(Commit(group, p["topic"], p["queue"], p["offset"])),
                OFFSETS_QUEUE,
            )
            for p in positions
        ]
        result = await self._store.put_batch(messages)
        appended_s = trio.current_time()
        await self.catch_up()
        committed = len(positions)
        if req["acks"] is Acks.LEADER:
            return make_response(req["id"], group=group, committed=committed)
        timeout_ms = req["timeout_ms"]
        timer = self._ack_timer

        async def acknowledged() -> Reply:
            deadline_s = trio.current_time() + timeout_ms / 1000  # the policy's own
            try:
                status, error = await acks.wait(req["acks"], result.end_offset, timeout_ms)
            except Exception as exc:
                if timer is not None:
                    timer(req["acks"], status_of(exc), trio.current_time() - appended_s)
                raise
            if timer is not None:
                timer(req["acks"], status, trio.current_time() - appended_s)
            if status is not Status.OK:
                if status in _UNKNOWN_OUTCOME and trio.current_time() < deadline_s - 1e-6:
                    error = _cut_error(req["acks"])  # only a cut or role change ends it early
                return make_response(req["id"], status, error=error, group=group)
            return make_response(req["id"], group=group, committed=committed)

        return acknowledged

    async def _fetch(self, req: Mapping[str, Any], _polls: Wakeups) -> Reply:
        """A group's committed offsets, as this node's log holds them."""
        await self.catch_up()
        group = req["group"]
        positions = self.offsets.group(group)
        return make_response(
            req["id"],
            group=group,
            offsets=[
                {"topic": t, "queue": q, "offset": o} for (t, q), o in sorted(positions.items())
            ],
        )

    async def _list(self, req: Mapping[str, Any], _polls: Wakeups) -> Reply:
        await self.catch_up()
        now = self._clock()
        names = sorted(set(self.offsets.groups()) | set(self.membership.names(now)))
        groups = []
        for name in names:
            state = self.membership.state(name, now)
            groups.append(
                {
                    "group": name,
                    "members": len(state.deadlines_s) if state else 0,
                    "generation": state.generation if state else None,
                    "topics": sorted({t for t, _ in self.offsets.group(name)}),
                }
            )
        return make_response(req["id"], groups=groups)

    async def _describe(self, req: Mapping[str, Any], _polls: Wakeups) -> Reply:
        """Members with their target queues (``assignment``) and the ones they hold now
        (``held``; they differ while a rebalance hands queues over), on the master; and
        per queue its committed offset, lag (records between it and the queue's end)
        and holder."""
        await self.catch_up()
        group = req["group"]
        state = self.membership.state(group, self._clock())
        members = []
        owner: dict[tuple[str, int], str] = {}
        if state is not None:
            for member, queues in sorted(state.assignment.items()):
                held = state.held.get(member, [])
                members.append(
                    {
                        "member": member,
                        "assignment": [{"topic": t, "queue": q} for t, q in queues],
                        "held": [{"topic": t, "queue": q} for t, q in held],
                    }
                )
                owner.update(dict.fromkeys(held, member))
        positions = self.offsets.group(group)
        if state is None and not positions:
            raise RequestError(
                Status.BAD_REQUEST,
                f"no group {group!r}: it has no members and never committed (tidelog group list)",
            )
        offsets = []
        for key in sorted(set(positions) | set(owner)):
            topic, queue = key
            end = self._store.queue_offsets(topic, queue)[1]
            committed = positions.get(key)
            offsets.append(
                {
                    "topic": topic,
                    "queue": queue,
                    "offset": committed,
                    "end_offset": end,
                    "lag": None if committed is None else max(0, end - committed),
                    "member": owner.get(key),
                }
            )
        return make_response(
            req["id"],
            group=group,
            generation=state.generation if state else None,
            topics=list(state.topics) if state else sorted({t for t, _ in positions}),
            members=members,
            offsets=offsets,
        )
