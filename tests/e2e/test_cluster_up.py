"""LocalCluster end to end: a real etcd and three `tidelog node --etcd` processes elect a
master, survive its SIGKILL with a producer carried over by the client's rediscovery,
take the old master back as a slave, and stop leaving no process behind.

Waits poll the nodes' status with bounds (LocalCluster.wait_for_master,
tools.process.wait_until); no fixed sleeps.
"""

from __future__ import annotations

from pathlib import Path

import trio

from cluster.client import open_client
from tools.demo import read_all
from tools.launcher import LocalCluster
from tools.launcher.cluster import pid_alive
from tools.process import wait_until

TOPIC = "up"
WAIT_S = 30.0


async def test_a_local_cluster_elects_fails_over_and_stops_cleanly(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", replicas=3)
    pids: list[int] = []
    try:
        await trio.to_thread.run_sync(cluster.start)
        assert cluster.etcd is not None
        pids = [pid for pid in (cluster.pid(n) for n in cluster.names) if pid]
        pids += [m.pid for m in cluster.etcd.members if m.pid]
        first = await cluster.wait_for_master(WAIT_S)
        acked: dict[tuple[int, int], bytes] = {}
        async with open_client(cluster.addresses) as client:
            await client.admin.create_topic(TOPIC, 2)
            producer = client.producer(acks="replicated", retries=100, retry_backoff_ms=5)
            before, after = trio.Event(), trio.Event()
            killed = False

            async def produce() -> None:
                for seq in range(100_000):
                    body = b"m%d" % seq
                    result = await producer.send(TOPIC, body, queue=seq % 2)
                    if result.ok:
                        assert result.queue is not None and result.queue_offset is not None
                        acked[(result.queue, result.queue_offset)] = body
                        if len(acked) >= 50:
                            before.set()
                        if killed and client.master != cluster.address(first):
                            after.set()
                            if len(acked) >= 150:
                                return
                    else:
                        assert result.outcome == "unknown", result  # only in flight at the kill

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                with trio.fail_after(WAIT_S):
                    await before.wait()
                cluster.kill(first)
                killed = True
                second = await cluster.wait_for_master(WAIT_S, other_than=first)
                with trio.fail_after(WAIT_S):
                    await after.wait()
            assert client.master == cluster.address(second)
            assert client.rediscoveries >= 1
        survivors = [name for name in cluster.names if name != first]
        for name in survivors:

            async def has_every_ack(address: str = cluster.address(name)) -> bool:
                stored = await read_all(address, TOPIC)
                return all(stored.get(key) == body for key, body in acked.items())

            await wait_until(f"every ack readable on {name}", has_every_ack, timeout=WAIT_S)

        await trio.to_thread.run_sync(cluster.restart, first)

        async def follows() -> bool:
            view = await cluster.view(first)
            return view.role == "slave" and await cluster.master() == second

        await wait_until(f"{first} back as a slave of {second}", follows, timeout=WAIT_S)
    finally:
        cluster.stop()
    assert pids and not [pid for pid in pids if pid_alive(pid)]
