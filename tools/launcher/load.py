"""A steady producer load on a :class:`~tools.launcher.cluster.LocalCluster`, remembering
every acknowledged message, and the checks that none of them was lost.

The failover tests drive faults while this runs: they wait on its progress (``wait_for``:
woken by each ack, no polling) to know the cluster took writes again after a fault, and at
the end ask :func:`missing_on` whether any acked message is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from cluster.client import open_client
from tools.demo import missing_acks
from tools.launcher.cluster import LocalCluster
from tools.process import wait_until

__all__ = ["Ack", "AckedLoad", "commit_log_bytes", "missing_on", "same_log_end"]


@attrs.frozen
class Ack:
    """One acknowledged send: what was stored where, and which master the client was
    talking to when the answer came (the address; an answer from a node that died just
    after sending it still names that node)."""

    queue: int
    queue_offset: int
    offset: int
    body: bytes
    via: str | None
    at_s: float


@attrs.define
class AckedLoad:
    """``producers`` tasks sending unique bodies (padded to ``body_bytes``) at ``acks``
    through the client library (retries and rediscovery included) to ``topic`` on
    ``cluster``.

    Invariant: ``acked`` holds exactly the sends answered OK, in answer order. Run
    :meth:`run` in a nursery (``await nursery.start(load.run)``) and cancel that nursery to
    stop it; :meth:`wait_for` may be called from any task of the same trio run.
    """

    cluster: LocalCluster
    topic: str
    acks: str = "replicated"
    producers: int = 2
    queues: int = 2
    prefix: str = "m"
    body_bytes: int = 0
    acked: list[Ack] = attrs.field(factory=list)
    outcomes: dict[str, int] = attrs.field(factory=lambda: {"ok": 0, "unknown": 0, "failed": 0})
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_client(self.cluster.addresses, tls=self.cluster.client_tls) as client:
            await client.admin.create_topic(self.topic, self.queues, exist_ok=True)
            producer = client.producer(acks=self.acks, retries=10_000, retry_backoff_ms=5)

            async def send_forever(task: int) -> None:
                sequence = task
                while True:
                    body = f"{self.prefix}-{sequence}-".encode().ljust(self.body_bytes, b"x")
                    queue = sequence % self.queues
                    sequence += self.producers
                    result = await producer.send(self.topic, body, queue=queue)
                    self.outcomes[result.outcome] += 1
                    if result.ok:
                        assert result.queue is not None and result.queue_offset is not None
                        assert result.offset is not None
                        self.acked.append(
                            Ack(
                                result.queue,
                                result.queue_offset,
                                result.offset,
                                body,
                                client.master,
                                time.perf_counter(),
                            )
                        )
                        self._changed.set()
                        self._changed = trio.Event()

            async with trio.open_nursery() as nursery:
                for task in range(self.producers):
                    nursery.start_soon(send_forever, task)
                task_status.started()

    async def wait_for(
        self, what: str, condition: Callable[[list[Ack]], bool], timeout_s: float = 30.0
    ) -> None:
        """Return once ``condition(acked)`` holds (checked after every ack); TimeoutError
        naming ``what`` and the ack counts after ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            while not condition(self.acked):
                await self._changed.wait()
            return
        raise TimeoutError(
            f"timed out after {timeout_s}s waiting for {what} ({len(self.acked)} acked, "
            f"outcomes {self.outcomes})"
        )

    async def wait_acks(self, count: int, timeout_s: float = 30.0) -> None:
        """Wait for ``count`` more acks than there are now."""
        wanted = len(self.acked) + count
        await self.wait_for(f"{count} more acks", lambda acked: len(acked) >= wanted, timeout_s)

    async def wait_ack_via(self, address: str, after: int, timeout_s: float = 30.0) -> Ack:
        """Wait for an ack, past the first ``after`` acks, that the master at ``address``
        gave; return the first such ack."""
        found: list[Ack] = []

        def answered() -> bool:
            found[:] = [ack for ack in self.acked[after:] if ack.via == address]
            return bool(found)

        await self.wait_for(f"an ack from {address}", lambda _acked: answered(), timeout_s)
        return found[0]

    def by_position(self) -> dict[tuple[int, int], bytes]:
        """(queue, queue offset) -> body of every ack (what a reader must find there)."""
        return {(ack.queue, ack.queue_offset): ack.body for ack in self.acked}


async def missing_on(
    cluster: LocalCluster, names: list[str], acked: dict[tuple[int, int], bytes], topic: str
) -> dict[str, list[tuple[int, int]]]:
    """Per node, the acked positions not readable with their body there (waits, bounded,
    for each node's confirm offset to cover them); only nodes missing something appear."""
    missing: dict[str, list[tuple[int, int]]] = {}
    for name in names:
        lost = await missing_acks(cluster.address(name), acked, topic)
        if lost:
            missing[name] = lost
    return missing


async def same_log_end(cluster: LocalCluster, names: list[str], timeout_s: float = 30.0) -> int:
    """Wait until every node of ``names`` reports the same log end (bounded poll of
    ``status``: another process offers no event); return it."""
    ends: list[int | None] = []

    async def agree() -> bool:
        ends[:] = [(await cluster.view(name)).log_end for name in names]
        return ends[0] is not None and len(set(ends)) == 1

    await wait_until(f"{names} at one log end (last seen {ends})", agree, timeout=timeout_s)
    assert ends[0] is not None
    return ends[0]


def commit_log_bytes(data_dir: Path, start: int, end: int) -> bytes:
    """The commit log's bytes ``[start, end)`` as stored in a (stopped) node's segment
    files under ``data_dir``/store/commitlog (segments are named by their base offset)."""
    directory = data_dir / "store" / "commitlog"
    segments = sorted(
        (int(path.name), path)
        for path in directory.iterdir()
        if path.name.isdigit() and path.is_file()
    )
    if not segments:
        raise FileNotFoundError(f"no commit-log segment in {directory}")
    chunks = []
    position = start
    for base, path in segments:
        size = path.stat().st_size
        if base + size <= position or base >= end:
            continue
        if base > position:
            raise ValueError(f"{directory}: no segment holds offset {position}")
        with path.open("rb") as segment:
            segment.seek(position - base)
            chunk = segment.read(min(end, base + size) - position)
        chunks.append(chunk)
        position += len(chunk)
    if position != end:
        raise ValueError(f"{directory}: the segments end at {position}, before {end}")
    return b"".join(chunks)
