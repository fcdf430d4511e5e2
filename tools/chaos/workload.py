"""The chaos workload: producers, consumers, the final drain and the replica digests, every
operation recorded in the history (:mod:`tools.chaos.history`) exactly per its contract.

- A producer (``producer-N``) sends unique values ``"producer-N:counter"`` one at a time
  to a seeded queue of the topic; the client's outcome maps to the completion: ``ok`` ->
  ``ok`` with the offsets, ``failed`` -> ``fail``, ``unknown`` (a timeout, a lost
  connection, a flush timeout) -> ``info``. A timeout is never ``fail``.
- A consumer (``consumer-Q``) reads queue Q forward by offset with short long-polls.
- After heal and quiesce, :func:`drain` reads every queue from offset 0 on every node
  (``role`` master or replica) until the node has nothing more (``end``), and
  :func:`digest` hashes each node's commit-log bytes below the master's confirm offset.

Every recording goes through one :class:`Recorder` (one trio run, one thread), whose clock
is the run's monotonic clock, so history times never go back.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from cluster.client import Client, TidelogError, open_client
from cluster.client.consumer import consumed_messages
from cluster.protocol import RECORDS_FORMAT, CorruptRecordError, Status
from tools.chaos.history import (
    ACK_LEVELS,
    CORRUPT_READ_PREFIX,
    NOT_SENT_PREFIX,
    Event,
    HistoryWriter,
)

__all__ = [
    "DIGEST_CHUNK_BYTES",
    "NodeView",
    "Recorder",
    "WorkloadSettings",
    "WorkloadStats",
    "commit_log_digest",
    "consume",
    "digest",
    "drain",
    "produce",
]

log = logging.getLogger(__name__)

DIGEST_CHUNK_BYTES: Final = 1 << 20
DRAIN_BATCH: Final = 256


@attrs.frozen
class WorkloadSettings:
    """What the workload does: topic and queues, how many producers and consumers, the ack
    level, and the client's bounds (a send waits ``send_timeout_ms`` on the node plus
    ``request_timeout_s`` on the wire before its outcome is unknown)."""

    topic: str = "chaos"
    queues: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    producers: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    consumers: bool = True
    acks: str = attrs.field(default="replicated", validator=attrs.validators.in_(ACK_LEVELS))
    send_timeout_ms: int = 2000
    request_timeout_s: float = 3.0
    retries: int = 3
    poll_wait_ms: int = 200


@attrs.define
class WorkloadStats:
    """Live counters for the progress view (written by the workload tasks only)."""

    invoked: int = 0
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    polled: int = 0


class Recorder:
    """The one writer of a run's history, stamping each event with the run's clock.

    Invariant: times come from ``trio.current_time()`` minus the run's start, so they never
    go back. Call only from tasks of the trio run that made it.
    """

    def __init__(self, writer: HistoryWriter) -> None:
        self.writer = writer
        self.started_at = trio.current_time()
        self.stats = WorkloadStats()

    def now_s(self) -> float:
        return max(0.0, trio.current_time() - self.started_at)

    def record(
        self,
        type: str,
        process: str,
        f: str,
        value: dict[str, Any],
        *,
        node: str | None = None,
        error: str | None = None,
    ) -> Event:
        return self.writer.append(
            time_s=self.now_s(),
            type=type,
            process=process,
            f=f,
            value=value,
            node=node,
            error=error,
        )


@attrs.frozen
class NodeView:
    """One node as the drain and digest see it: name, client address, role, data dir."""

    name: str
    address: str
    role: str  # "master" | "replica"
    data_dir: Path | None = None


def queue_name(topic: str, queue: int) -> str:
    return f"{topic}:{queue}"


async def produce(
    recorder: Recorder,
    bootstrap: Sequence[str],
    settings: WorkloadSettings,
    index: int,
    seed: int,
    node_names: Mapping[str, str],
    stop: trio.Event,
) -> None:
    """Producer ``producer-<index>``: sends until ``stop`` is set (finishing the send in
    flight), one operation open at a time.

    ``node_names`` maps a client address to its node name (for the ``node`` field).
    Cancellation mid-send leaves the operation open, which the checker reads as unknown.
    """
    process = f"producer-{index}"
    rng = random.Random(f"{seed}:{process}")
    async with open_client(
        list(bootstrap), request_timeout=settings.request_timeout_s, connect_timeout=1.0
    ) as client:
        producer = client.producer(
            acks=settings.acks,
            batch_size=1,
            timeout_ms=settings.send_timeout_ms,
            retries=settings.retries,
        )
        counter = 0
        while not stop.is_set():
            queue = rng.randrange(settings.queues)
            message = f"{process}:{counter}"
            counter += 1
            value: dict[str, Any] = {
                "queue": queue_name(settings.topic, queue),
                "message": message,
                "acks": settings.acks,
            }
            recorder.record("invoke", process, "send", value)
            recorder.stats.invoked += 1
            result = await producer.send(settings.topic, message.encode(), queue=queue)
            node = node_names.get(producer.master or "", None)
            error = result.status.value if result.status is not None else result.error
            if result.outcome == "ok":
                done = {**value, "offset": result.queue_offset, "physical_offset": result.offset}
                recorder.record("ok", process, "send", done, node=node)
                recorder.stats.acked += 1
            elif result.outcome == "failed":
                if result.status is None:  # the client's own refusal: nothing was sent
                    error = f"{NOT_SENT_PREFIX}{result.error}"
                recorder.record("fail", process, "send", value, node=node, error=error)
                recorder.stats.failed += 1
                await trio.sleep(0.05)  # a refused send: do not spin against a node that is down
            else:
                if result.queue_offset is not None:
                    value = {**value, "offset": result.queue_offset}
                recorder.record("info", process, "send", value, node=node, error=error)
                recorder.stats.unknown += 1
                # An unknown can come back at once (a master whose disk failed answers
                # STORAGE_FAILED): do not spin against it either (a 10-minute run recorded
                # ~3,000 unknowns per EIO fault without this).
                await trio.sleep(0.05)


async def consume(
    recorder: Recorder,
    bootstrap: Sequence[str],
    settings: WorkloadSettings,
    queue: int,
    node_names: Mapping[str, str],
    stop: trio.Event,
) -> None:
    """Consumer ``consumer-<queue>``: reads its queue forward from offset 0 until ``stop``.

    Consumers start on different nodes (the bootstrap list rotated by the queue), so reads
    from the master and from each replica are all judged.
    """
    process = f"consumer-{queue}"
    name = queue_name(settings.topic, queue)
    offset = 0
    shift = queue % len(bootstrap)
    rotated = [*bootstrap[shift:], *bootstrap[:shift]]
    async with open_client(
        rotated, request_timeout=settings.request_timeout_s, connect_timeout=1.0
    ) as client:
        while not stop.is_set():
            value = {"queue": name, "offset": offset}
            recorder.record("invoke", process, "poll", value)
            try:
                connection = await client.connection()
                response = await connection.request(
                    "pull",
                    settings.poll_wait_ms / 1000 + settings.request_timeout_s,
                    topic=settings.topic,
                    queue=queue,
                    offset=offset,
                    max_messages=64,
                    wait_ms=settings.poll_wait_ms,
                    format=RECORDS_FORMAT,
                )
            except TidelogError as exc:
                recorder.record("info", process, "poll", value, error=str(exc))
                await trio.sleep(0.05)
                continue
            node = node_names.get(connection.address)
            status = response["status"]
            if status is not Status.OK:
                recorder.record("fail", process, "poll", value, node=node, error=status.value)
                await trio.sleep(0.05)
                continue
            try:
                messages = _pulled(settings.topic, queue, response)
            except CorruptRecordError as exc:
                error = f"{CORRUPT_READ_PREFIX}{exc}"
                recorder.record("fail", process, "poll", value, node=node, error=error)
                await trio.sleep(0.05)
                continue
            recorder.record("ok", process, "poll", {**value, "messages": messages}, node=node)
            recorder.stats.polled += len(messages)
            if messages:
                offset = messages[-1][0] + 1


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


def _pulled(topic: str, queue: int, response: Mapping[str, Any]) -> list[list[Any]]:
    """``[queue offset, body]`` of each message of a ``records`` pull answer, every
    record CRC-checked (:class:`CorruptRecordError` names a damaged one)."""
    return [
        [message.queue_offset, _text(message.body)]
        for message in consumed_messages(topic, queue, response)
    ]


async def drain(
    recorder: Recorder, nodes: Sequence[NodeView], topic: str, queues: int, *, timeout_s: float
) -> None:
    """Read every queue from offset 0 on every node until it has nothing more.

    A node that does not answer within ``timeout_s`` leaves its drain unfinished (the
    checker says so) instead of stalling the run.
    """
    for node in nodes:
        with trio.move_on_after(timeout_s):
            async with open_client(
                node.address, request_timeout=5.0, connect_timeout=2.0
            ) as client:
                for queue in range(queues):
                    await _drain_queue(recorder, client, node, topic, queue)


async def _drain_queue(
    recorder: Recorder, client: Client, node: NodeView, topic: str, queue: int
) -> None:
    offset = 0
    name = queue_name(topic, queue)
    while True:
        value: dict[str, Any] = {"queue": name, "offset": offset, "role": node.role}
        recorder.record("invoke", "drainer", "drain", value, node=node.name)
        try:
            response = await client.call(
                "pull",
                topic=topic,
                queue=queue,
                offset=offset,
                max_messages=DRAIN_BATCH,
                wait_ms=0,
                format=RECORDS_FORMAT,
            )
        except TidelogError as exc:
            recorder.record("info", "drainer", "drain", value, node=node.name, error=str(exc))
            return
        status = response["status"]
        if status is not Status.OK:
            recorder.record("fail", "drainer", "drain", value, node=node.name, error=status.value)
            return
        try:
            messages = _pulled(topic, queue, response)
        except CorruptRecordError as exc:
            error = f"{CORRUPT_READ_PREFIX}{exc}"
            recorder.record("fail", "drainer", "drain", value, node=node.name, error=error)
            return
        next_offset = int(response.get("next_offset", offset + len(messages)))
        end = not messages
        recorder.record(
            "ok",
            "drainer",
            "drain",
            {**value, "messages": messages, "end": end},
            node=node.name,
        )
        if end:
            return
        offset = max(next_offset, messages[-1][0] + 1)


def commit_log_digest(
    data_dir: Path, start_offset: int, end_offset: int, chunk_bytes: int = DIGEST_CHUNK_BYTES
) -> tuple[list[str], int]:
    """Blocking: sha256 per chunk of the commit-log bytes ``[start, end)`` read from the
    segment files (named by base offset). Returns the digests and where the bytes held ran
    out (``end_offset`` when the node holds them all)."""
    directory = data_dir / "store" / "commitlog"
    segments = sorted((int(path.name), path) for path in directory.iterdir() if path.name.isdigit())
    chunks: list[str] = []
    position = start_offset
    while position < end_offset:
        chunk_end = min(position + chunk_bytes, end_offset)
        data = _read_range(segments, position, chunk_end)
        if len(data) < chunk_end - position:
            if data:
                chunks.append(hashlib.sha256(data).hexdigest())
            return chunks, position + len(data)
        chunks.append(hashlib.sha256(data).hexdigest())
        position = chunk_end
    return chunks, end_offset


def _read_range(segments: Sequence[tuple[int, Path]], start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the log across segment files (short when a file is missing)."""
    out = bytearray()
    position = start
    for base, path in segments:
        if position >= end:
            break
        size = path.stat().st_size
        if not base <= position < base + size:
            continue
        with open(path, "rb") as file:
            file.seek(position - base)
            piece = file.read(min(end, base + size) - position)
        out += piece
        position += len(piece)
    return bytes(out)


async def digest(
    recorder: Recorder,
    nodes: Sequence[NodeView],
    confirm_offset: int,
    start_offset: int,
    log_ends: Callable[[str], int],
) -> None:
    """Record each node's commit-log digest below the master's confirm offset.

    ``log_ends(name)`` is the node's log end; the bytes hashed end at the smaller of it and
    ``confirm_offset``. Nodes without a local data dir (a ``--bootstrap`` run) are skipped.
    """
    for node in nodes:
        if node.data_dir is None:
            continue
        value = {"role": node.role}
        recorder.record("invoke", "drainer", "digest", value, node=node.name)
        end = min(log_ends(node.name), confirm_offset)
        chunks, held = await trio.to_thread.run_sync(
            functools.partial(
                commit_log_digest, node.data_dir, start_offset, max(end, start_offset)
            )
        )
        recorder.record(
            "ok",
            "drainer",
            "digest",
            {
                "role": node.role,
                "confirm_offset": confirm_offset,
                "start_offset": start_offset,
                "end_offset": held,
                "chunk_bytes": DIGEST_CHUNK_BYTES,
                "chunks": chunks,
            },
            node=node.name,
        )
