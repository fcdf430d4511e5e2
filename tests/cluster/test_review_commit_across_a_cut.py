"""A consumer group's offset commit waiting for its ack when the node's log is cut.

An offset commit is a write to the log like a send (its records go to the offsets
topic) and waits for its ``acks`` level in a task of its own. A cut of the log below
its end (a demoted master dropping its tail) ends that wait long before its deadline:
the answer must say the log was cut, not that the fsync did not complete within the
timeout and the commit is "probably stored" (it was cut).
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from cluster.protocol import Status
from tests.cluster.test_ack_across_a_cut import (
    WAIT_MS,
    Gate,
    an_fsync_held_for_a_cut,
    cut_while_the_fsync_is_held,
    gate,
    waiting_for_durable,
)
from tests.cluster.test_server import until

__all__ = ["gate"]  # the fdatasync-holding fixture of the cut tests, used here


async def test_an_offset_commit_waiting_across_a_cut_is_told_the_log_was_cut(
    tmp_path: Path, gate: Gate
) -> None:
    """Fails on the old code: the commit was answered that the fsync did not complete
    within its timeout ("probably stored") right after the cut."""
    async with an_fsync_held_for_a_cut(tmp_path, gate) as setup:
        _node, nursery, store, other, raw, held_id, cut_at = setup
        commit_id = await raw.send(
            "commit_offsets",
            group="g",
            offsets=[{"topic": "t", "queue": 0, "offset": 1}],
            acks="durable",
            timeout_ms=WAIT_MS,
        )
        # appended, and waiting for its fsync beside the held write
        await until(lambda: waiting_for_durable(store) == 2)
        assert store.commit_log.max_offset > cut_at
        started = trio.current_time()
        await cut_while_the_fsync_is_held(store, gate, cut_at, nursery)
        held = await other.recv()
        assert held is not None and held["id"] == held_id and held["status"] is Status.OK
        answer = await raw.recv()
        assert answer is not None and answer["id"] == commit_id
        assert trio.current_time() - started < WAIT_MS / 1000  # not its deadline
        assert answer["status"] is Status.FLUSH_DISK_TIMEOUT, answer
        assert "did not complete within" not in answer["error"], answer
        assert "cut" in answer["error"] and "commit" in answer["error"], answer
        await trio.testing.wait_all_tasks_blocked()
        assert waiting_for_durable(store) == 0
