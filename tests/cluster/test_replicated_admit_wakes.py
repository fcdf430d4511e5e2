"""Admitting an ``acks=replicated`` write starts its fsync from the append itself and
wakes no task of the group commit flusher's.

Each admit used to ask the flusher to start a group commit at its next turn
(``flush_soon``) as well, though the HA service's append hook had started that fsync
already: under pipelined writes the flusher task woke once per round to find an fsync
running and go back to sleep.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from cluster.node.acks import ReplicatedAcks, StandaloneAcks
from cluster.protocol import Acks
from replication.slave import HAClient
from storage import Message, MessageStore
from tests.replication.test_ha_stream import config_at, quiet_config, replicated, serving


class FlusherSteps(trio.abc.Instrument):
    """Counts the steps of the group commit flusher's task."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if "GroupCommitFlusher" in task.name:
            self.steps += 1


async def test_a_replicated_write_is_fsynced_with_no_flusher_step(tmp_path: Path) -> None:
    async with (
        MessageStore.open(quiet_config(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
        serving(master) as (service, port, nursery),
    ):
        nursery.start_soon(HAClient(slave, "s1").run, "127.0.0.1", port)
        first = await master.put(Message.create("t", b"first", 0))  # takes the segment
        assert await master.wait_durable(first.end_offset, 10)
        assert await replicated(service, first.end_offset)
        policy = ReplicatedAcks(StandaloneAcks(master), service, 1)
        fsyncs = master.group_commit.fsyncs
        flusher = FlusherSteps()
        trio.lowlevel.add_instrument(flusher)
        try:
            for index in range(5):
                policy.admit(Acks.REPLICATED)
                result = await master.put(Message.create("t", b"w%d" % index, 0))
                await trio.testing.wait_all_tasks_blocked()  # its fsync started, or is done
                await master.commit_log.flush()  # returns once that fsync is done
                assert master.commit_log.flushed_offset >= result.end_offset
        finally:
            trio.lowlevel.remove_instrument(flusher)
        assert master.group_commit.fsyncs == fsyncs + 5  # one group commit per write
        assert flusher.steps == 0
        nursery.cancel_scope.cancel()
