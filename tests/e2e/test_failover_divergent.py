"""A forced divergent tail cut after an automatic failover (real etcd, three real nodes).

The master takes writes at ``acks=leader`` while both slaves are SIGSTOPped, so it alone
holds most of those bytes (a paused slave still finds what was already in its socket);
it is SIGKILLed, a slave is elected and writes over the same offsets.
The old master restarts as a slave: its handshake with the new master finds where the
two logs part (the epoch walk), cuts its tail there (``status`` and its log name the cut
and the bytes dropped), catches up, and ends byte for byte identical to the new master
on their common range. Everything acked at ``acks=replicated`` survives on every node;
of the leader-only writes, exactly those below the new master's epoch start remain.

Waits are on acks (events) or bounded polls of ``status``; no fixed sleeps. Every process
is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cluster.client import open_client
from tests.helpers import started
from tools.demo import read_all
from tools.faults.process import Pause
from tools.launcher import LocalCluster
from tools.launcher.load import AckedLoad, commit_log_bytes, missing_on, same_log_end
from tools.process import wait_until

TOPIC = "divergent"
WAIT_S = 30.0
LEADER_ONLY = 12
LEADER_ONLY_BYTES = 64 * 1024
"""12 x 64 KiB: more than a stopped slave's socket takes in (its receive window stays at
its initial size while nothing reads it), so the old master surely holds a tail alone."""


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "cluster", replicas=3)
    async with started(cluster):
        yield cluster


async def run_load_until(load: AckedLoad, what: str, done: object) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        await load.wait_for(what, done, WAIT_S)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_the_old_master_cuts_its_divergent_tail_and_matches_the_new_one(
    cluster: LocalCluster,
) -> None:
    old = await cluster.wait_for_master(WAIT_S)
    slaves = [name for name in cluster.names if name != old]
    before = AckedLoad(cluster, TOPIC, acks="replicated", prefix="before")
    await run_load_until(before, "30 replicated acks", lambda acked: len(acked) >= 30)
    common_end = await same_log_end(cluster, cluster.names)

    # the slaves freeze (waited for: stopped before the next write); the master alone
    # takes writes at acks=leader
    pauses = [Pause(cluster.target(name)) for name in slaves]
    leader_only: dict[bytes, int] = {}
    try:
        for pause in pauses:
            await pause.inject()
        async with open_client(cluster.address(old), failover_timeout=0.0) as client:
            producer = client.producer(acks="leader", retries=0)
            for seq in range(LEADER_ONLY):
                body = (b"leader-only-%d-" % seq).ljust(LEADER_ONLY_BYTES, b"x")
                result = await producer.send(TOPIC, body, queue=seq % 2)
                assert result.ok and result.offset is not None, result
                leader_only[body] = result.offset
        tail_end = (await cluster.view(old)).log_end
        assert tail_end is not None and tail_end > common_end
        cluster.kill(old)
    finally:
        for pause in pauses:
            await pause.heal()
    new = await cluster.wait_for_master(WAIT_S, other_than=old)
    # A paused slave still reads what the old master had sent into its socket before it
    # died: the new master's epoch starts at the end of what it holds, and the old
    # master's log parts from it there.
    epoch_start = (await cluster.view(new)).status["replication"]["epoch_start"]  # type: ignore[index]
    assert common_end <= epoch_start < tail_end

    # the new master writes over the offsets only the old master held
    after = AckedLoad(cluster, TOPIC, acks="replicated", prefix="after", body_bytes=16 * 1024)
    await run_load_until(
        after,
        f"replicated acks past offset {tail_end}",
        lambda acked: any(ack.offset >= tail_end for ack in acked),
    )

    await trio.to_thread.run_sync(cluster.restart, old)

    async def cut_and_following() -> bool:
        view = await cluster.view(old)
        replication = (view.status or {}).get("replication") or {}
        return view.role == "slave" and replication.get("last_truncation") is not None

    await wait_until(f"{old} to follow {new} after a cut", cut_and_following, timeout=WAIT_S)
    replication = (await cluster.view(old)).status["replication"]  # type: ignore[index]
    assert tuple(replication["last_truncation"]) == (tail_end, epoch_start)
    logged = re.search(
        rf"ha_slave_truncated slave={old} old_end={tail_end} new_end={epoch_start} "
        rf"dropped_bytes={tail_end - epoch_start}\b",
        cluster.nodes[old].stderr,
    )
    assert logged, cluster.nodes[old].stderr[-3000:]
    final_end = await same_log_end(cluster, cluster.names)
    assert final_end > tail_end

    acked = before.by_position() | after.by_position()
    assert await missing_on(cluster, cluster.names, acked, TOPIC) == {}
    kept = {body for body, offset in leader_only.items() if offset < epoch_start}
    for name in cluster.names:
        bodies = set((await read_all(cluster.address(name), TOPIC)).values())
        assert {body for body in bodies if body.startswith(b"leader-only")} == kept, name

    await trio.to_thread.run_sync(cluster.stop)
    reference = commit_log_bytes(cluster.nodes[new].data_dir, 0, final_end)
    for name in cluster.names:
        stored = commit_log_bytes(cluster.nodes[name].data_dir, 0, final_end)
        assert stored == reference, f"{name}'s log differs from {new}'s below {final_end}"
