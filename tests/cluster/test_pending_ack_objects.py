"""A write waiting for its ack holds a few objects, not a closure web.

With 64 one-message writes in flight at ``acks=in_sync`` each waiting write used to keep
about twenty objects the garbage collector tracks alive (the handler's closures, their
cells, the request map): more than the collector's young-generation threshold (700)
in all, so the master ran young and full collections that the same writes at
``acks=leader`` never trigger. The writes here wait for a slave whose acks are held.
"""

from __future__ import annotations

import gc
from pathlib import Path

import trio
import trio.testing

from cluster.protocol import Status
from tests.cluster.test_queued_ack_policy import master_with_a_held_slave
from tests.cluster.test_server import until

IN_FLIGHT = 64
TRACKED_PER_WAITING_WRITE = 8
"""The bound: a waiting write is its PendingAck, its answer's fields and its queue
entry (about 4 tracked objects; the old code held about 20)."""


def tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


async def test_a_waiting_write_keeps_few_objects_alive(tmp_path: Path) -> None:
    async with master_with_a_held_slave(tmp_path) as (store, _handler, proxy, raw, nursery):
        # One write waits first, so the queue's task and its wake-up exist already.
        await raw.send("send", topic="t", body=b"w", acks="in_sync", timeout_ms=60_000)
        await trio.testing.wait_all_tasks_blocked()
        gc.disable()
        try:
            before = tracked_objects()
            for _ in range(IN_FLIGHT):
                await raw.send("send", topic="t", body=b"w", acks="in_sync", timeout_ms=60_000)
            # All appended (one idle point does not wait for a put on a thread), and queued.
            await until(lambda: store.queue_offsets("t", 0)[1] == 2 + IN_FLIGHT)
            await trio.testing.wait_all_tasks_blocked()
            held = tracked_objects() - before
        finally:
            gc.enable()
        assert held <= IN_FLIGHT * TRACKED_PER_WAITING_WRITE, (
            f"{held} objects kept alive by {IN_FLIGHT} waiting writes"
        )
        proxy.hold(frozenset())  # released: every write is answered OK
        answers = await raw.recv_n(IN_FLIGHT + 1)
        assert {a["status"] for a in answers.values()} == {Status.OK}
        nursery.cancel_scope.cancel()
