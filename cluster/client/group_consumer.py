"""Consuming as a member of a consumer group: the group's queues are shared among its
live members and positions are committed to the cluster.

What a member does (the node side is :mod:`cluster.node.groups`):

1. ``join_group`` on the master: a generation number and the queues this member holds.
2. ``fetch_offsets``: where the group left off in each held queue (a queue the group
   never committed starts at ``start``: its earliest or latest offset).
3. Pull the held queues, heartbeat every ``heartbeat_interval_ms``, commit the positions
   every ``auto_commit_interval_ms`` (and on :meth:`GroupConsumer.commit`).
4. A heartbeat answered ``REJOIN_GROUP`` (a member joined, left or died, the master
   changed, or a queue this member waits for was given up): stop pulling, commit what
   was processed, join again, go to 2.

A message's position is committed only once the application asked for the next one
(it finished with it), so delivery is at least once. A queue changes hands only after
its holder committed and re-joined, so a rebalance among live members repeats at most
the message in the application's hands. A member that dies repeats what it processed
after its last commit (at most one auto-commit interval), read again by the queue's
next holder once the member's session ran out. After a failover the new master knows
no members: until they all re-joined (about one heartbeat interval) a queue can be
read by its old and its new holder, the old holder's commits are refused, and the new
one starts from the last commit the new master holds.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from cluster.client.consumer import ConsumedMessage, Consumer
from cluster.client.errors import (
    ConnectionLostError,
    RequestTimeoutError,
    TidelogError,
    lone_error_as_itself,
)
from cluster.protocol import Status

if TYPE_CHECKING:
    from cluster.client.client import Client

__all__ = ["GroupConsumer", "default_member_id"]

log = logging.getLogger(__name__)

QueueRef = tuple[str, int]


def default_member_id() -> str:
    """A member id unique to this process and start: host, pid and a random part."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return f"{host[:60] or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _Rejoin(Exception):
    """The group moved on: the member's session ends and it joins again."""


class GroupConsumer:
    """One member of consumer group ``group`` reading ``topics``.

    Use it as an async context manager and iterate it. :attr:`positions` holds, per held
    queue, the next offset to read (everything below it was processed);
    :attr:`assignment` and :attr:`generation` say what this member holds now. One task
    iterates; the heartbeat, auto-commit and pullers run in the consumer's own nursery.
    Leaving the block commits and leaves the group (its queues move at once).
    """

    def __init__(
        self,
        client: Client,
        group: str,
        topics: Sequence[str],
        *,
        member: str | None = None,
        start: Literal["earliest", "latest"] = "earliest",
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int | None = None,
        auto_commit_interval_ms: int = 1000,
        commit_acks: str = "durable",
        max_messages: int = 256,
        wait_ms: int = 500,
    ) -> None:
        assert topics, "a group consumer reads at least one topic"
        self.client = client
        self.group = group
        self.topics = sorted(set(topics))
        self.member = member or default_member_id()
        self.start = start
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_s = (heartbeat_interval_ms or session_timeout_ms // 3) / 1000
        self.auto_commit_interval_s = auto_commit_interval_ms / 1000
        self.commit_acks = commit_acks
        self.max_messages = max_messages
        self.wait_ms = wait_ms
        self.generation: int | None = None
        self.assignment: list[QueueRef] = []
        self.positions: dict[QueueRef, int] = {}
        self.rebalances = 0
        """How many times this member joined (the first join counts)."""
        self._committed: dict[QueueRef, int] = {}
        self._assigned = anyio.Event()
        self._joined = anyio.Event()
        """Set at each join, then replaced (:meth:`wait_next_join`)."""

    # ---- the session ---------------------------------------------------------------------

    @asynccontextmanager
    async def _running(
        self,
    ) -> AsyncIterator[MemoryObjectReceiveStream[tuple[int, ConsumedMessage]]]:
        send, receive = anyio.create_memory_object_stream[tuple[int, ConsumedMessage]](
            self.max_messages
        )
        with lone_error_as_itself(), send, receive:
            async with anyio.create_task_group() as nursery:
                nursery.start_soon(self._sessions, send)
                try:
                    yield receive
                finally:
                    nursery.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await self._goodbye()

    async def _goodbye(self) -> None:
        try:
            await self.commit()
        except TidelogError as exc:
            log.warning("group_final_commit_failed group=%s error=%s", self.group, exc)
        try:
            await self.client.call_master(
                "leave_group", group=self.group, member=self.member, resends=1
            )
        except TidelogError as exc:
            log.info("group_leave_failed group=%s error=%s", self.group, exc)

    async def _sessions(self, out: MemoryObjectSendStream[tuple[int, ConsumedMessage]]) -> None:
        """Join, consume until the group moves on, commit, join again; forever."""
        while True:
            try:
                await self._session(out)
            except _Rejoin:
                continue
            except BaseExceptionGroup as group:
                rejoin, rest = group.split(_Rejoin)
                if rest is not None or rejoin is None:
                    raise

    async def _session(self, out: MemoryObjectSendStream[tuple[int, ConsumedMessage]]) -> None:
        generation = await self._join()
        try:
            with lone_error_as_itself():
                async with anyio.create_task_group() as nursery:
                    for topic in self.topics:
                        queues = [q for t, q in self.assignment if t == topic]
                        if queues:
                            nursery.start_soon(self._pull, topic, queues, generation, out)
                    nursery.start_soon(self._heartbeats, generation)
                    if self.auto_commit_interval_s > 0:
                        nursery.start_soon(self._auto_commit)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self.commit()  # the previous generation's last commit
                except TidelogError as exc:
                    log.info("group_commit_on_rebalance_refused group=%s error=%s", self.group, exc)

    async def _join(self) -> int:
        answer = await self._master(
            "join_group",
            group=self.group,
            member=self.member,
            topics=self.topics,
            session_timeout_ms=self.session_timeout_ms,
        )
        generation: int = answer["generation"]
        assignment = [(a["topic"], a["queue"]) for a in answer["assignment"]]
        fetched = await self._master("fetch_offsets", group=self.group)
        committed = {(o["topic"], o["queue"]): o["offset"] for o in fetched["offsets"]}
        kept = set(assignment) & set(self.assignment)
        positions: dict[QueueRef, int] = {}
        for key in assignment:
            if key in kept and key in self.positions:
                positions[key] = max(self.positions[key], committed.get(key, 0))
            elif key in committed:
                positions[key] = committed[key]
            else:
                positions[key] = await self._start_offset(*key)
        self.generation, self.assignment, self.positions = generation, assignment, positions
        self._committed = {k: v for k, v in committed.items() if k in positions}
        self.rebalances += 1
        self._assigned.set()
        self._joined.set()
        self._joined = anyio.Event()
        log.info(
            "group_member_joined group=%s member=%s generation=%d queues=%s",
            self.group,
            self.member,
            generation,
            ",".join(f"{t}/{q}" for t, q in assignment) or "-",
        )
        return generation

    async def _start_offset(self, topic: str, queue: int) -> int:
        answer = await self.client.checked("get_offsets", topic=topic, queue=queue)
        bounds = answer["offsets"][0]
        return int(bounds["min_offset" if self.start == "earliest" else "max_offset"])

    async def _master(self, op: str, **fields: Any) -> dict[str, Any]:
        answer = await self.client.call_master(op, **fields)
        if answer["status"] is Status.REJOIN_GROUP:
            raise _Rejoin(answer.get("error", ""))
        if answer["status"] is not Status.OK:
            raise TidelogError(answer["status"], answer.get("error", ""), answer)
        return answer

    async def _heartbeats(self, generation: int) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval_s)
            try:
                await self._master(
                    "heartbeat", group=self.group, member=self.member, generation=generation
                )
            except (ConnectionLostError, RequestTimeoutError) as exc:
                log.info("group_heartbeat_unanswered group=%s error=%s", self.group, exc)
            except _Rejoin:
                log.info("group_rebalance group=%s member=%s", self.group, self.member)
                raise

    async def _auto_commit(self) -> None:
        while True:
            await anyio.sleep(self.auto_commit_interval_s)
            try:
                await self.commit()
            except (ConnectionLostError, RequestTimeoutError) as exc:
                log.info("group_commit_unanswered group=%s error=%s", self.group, exc)
            except TidelogError as exc:
                if exc.status is Status.REJOIN_GROUP:
                    raise _Rejoin(str(exc)) from None
                raise

    async def _pull(
        self,
        topic: str,
        queues: list[int],
        generation: int,
        out: MemoryObjectSendStream[tuple[int, ConsumedMessage]],
    ) -> None:
        start = {q: self.positions[(topic, q)] for q in queues}
        async with Consumer(
            self.client,
            topic,
            queues=queues,
            start=start,
            max_messages=self.max_messages,
            wait_ms=self.wait_ms,
        ) as consumer:
            async for message in consumer:
                await out.send((generation, message))

    # ---- commits -------------------------------------------------------------------------

    async def commit(self) -> int:
        """Commit the positions that moved since the last commit; how many were sent.
        A fenced commit (the group moved on and the queue's next holder already read its
        offset) raises :class:`TidelogError` with ``REJOIN_GROUP``."""
        generation = self.generation
        moved = [
            (key, offset)
            for key, offset in sorted(self.positions.items())
            if self._committed.get(key) != offset
        ]
        if not moved or generation is None:
            return 0
        answer = await self.client.call_master(
            "commit_offsets",
            group=self.group,
            member=self.member,
            generation=generation,
            offsets=[{"topic": t, "queue": q, "offset": o} for (t, q), o in moved],
            acks=self.commit_acks,
        )
        if answer["status"] is not Status.OK:
            raise TidelogError(answer["status"], answer.get("error", ""), answer)
        self._committed.update(moved)
        return len(moved)

    # ---- iteration -----------------------------------------------------------------------

    def processed(self, message: ConsumedMessage) -> None:
        """Count ``message`` as processed now (the iteration does it when the next one is
        asked for): call it before leaving the loop with ``break`` after handling one,
        or the group's next reader gets that message again."""
        key: QueueRef = (message.topic, message.queue)
        if self.positions.get(key) == message.queue_offset:
            self.positions[key] = message.queue_offset + 1

    async def wait_assigned(self) -> None:
        """Return once this member joined the group at least once."""
        await self._assigned.wait()

    async def wait_next_join(self) -> None:
        """Return at this member's next join (after a rebalance, with its new assignment)."""
        await self._joined.wait()

    async def __aenter__(self) -> GroupConsumer:
        self._context: AbstractAsyncContextManager[
            MemoryObjectReceiveStream[tuple[int, ConsumedMessage]]
        ] = self._running()
        self._channel = await self._context.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._context.__aexit__(*exc_info)

    def __aiter__(self) -> AsyncIterator[ConsumedMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ConsumedMessage]:
        """Messages of the current generation; one pulled before a rebalance is dropped
        (its queue's next holder reads it from the committed offset)."""
        async for generation, message in self._channel:
            key: QueueRef = (message.topic, message.queue)
            position = self.positions.get(key)
            if generation != self.generation or position is None or message.queue_offset < position:
                continue
            yield message
            if generation == self.generation and key in self.positions:
                self.positions[key] = message.queue_offset + 1
