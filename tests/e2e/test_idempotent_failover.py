"""The idempotent producer across a master kill: a real etcd and three ``tidelog node
--etcd`` processes (LocalCluster). Producers send unique values at ``acks=replicated``
while the master is SIGKILLed; every send ends ``ok`` (an unknown outcome is resent
with the same sequence numbers), and each value is stored exactly once on both
survivors. A batch stored and replicated before the kill, sent again to the new master
with the same producer id and sequence, is answered with its original offsets: the new
master rebuilt what it must deduplicate from its replicated log.

Waits are on acks (events) or bounded polls of ``status``; no fixed sleeps. Every
process is stopped by its PID at the end, also on failure.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cluster.client import SendResult, open_client
from cluster.protocol import Status
from tests.helpers import started
from tools.launcher import LocalCluster
from tools.launcher.load import same_log_end
from tools.process import wait_until

TOPIC = "once"
QUEUES = 2
WAIT_S = 30.0
TASKS = 4


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "cluster", replicas=3)
    async with started(cluster):
        yield cluster


async def stored_bodies(address: str) -> list[bytes]:
    """Every body of the topic that the node at ``address`` serves, all queues."""
    found: list[bytes] = []
    async with open_client(address) as client:
        for queue in range(QUEUES):
            offset = 0
            while True:
                page = await client.checked(
                    "pull", topic=TOPIC, queue=queue, offset=offset, max_messages=1000
                )
                found.extend(bytes(m["body"]) for m in page["messages"])
                if page["next_offset"] == offset:
                    break
                offset = page["next_offset"]
    return found


async def test_every_value_is_stored_once_across_a_master_kill(cluster: LocalCluster) -> None:
    first = await cluster.wait_for_master(WAIT_S)
    results: dict[bytes, SendResult] = {}
    progress = trio.Event()
    async with open_client(cluster.addresses) as client:
        await client.admin.create_topic(TOPIC, QUEUES)
        # a batch stored and replicated before the kill, to resend after it
        producer_id = (await client.call_master("init_producer"))["producer"]
        batch = {
            "topic": TOPIC,
            "acks": "replicated",
            "producer": producer_id,
            "sequence": 0,
            "messages": [{"body": b"early-0", "queue": 0}, {"body": b"early-1", "queue": 1}],
        }
        early = await client.call_master("send_batch", **batch)
        assert early["status"] is Status.OK, early
        producer = client.producer(acks="replicated", idempotent=True, retry_backoff_ms=5)
        killed = trio.Event()

        async def send_until_stopped(task: int) -> None:
            nonlocal progress
            for n in range(1_000_000):
                body = b"v-%d-%d" % (task, n)
                results[body] = await producer.send(TOPIC, body, queue=n % QUEUES)
                progress.set()
                progress = trio.Event()
                if killed.is_set() and n % 50 == 49:
                    return

        async with trio.open_nursery() as nursery:
            for task in range(TASKS):
                nursery.start_soon(send_until_stopped, task)
            while len(results) < 100:
                await progress.wait()
            cluster.kill(first)
            killed.set()
            new = await cluster.wait_for_master(WAIT_S, other_than=first)
        again = await client.call_master("send_batch", **batch)
    assert again["status"] is Status.OK, again
    assert again["offsets"] == early["offsets"], "answered from the new master's rebuilt state"
    assert client.master == cluster.address(new)
    outcomes = collections.Counter(result.outcome for result in results.values())
    odd = {r.outcome: (r.status, r.error) for r in results.values() if not r.ok}
    assert outcomes == {"ok": len(results)}, (outcomes, odd)
    survivors = [name for name in cluster.names if name != first]
    await same_log_end(cluster, survivors, WAIT_S)
    for name in survivors:
        counts: collections.Counter[bytes] = collections.Counter()

        async def holds_every_value(
            address: str = cluster.address(name), counts: collections.Counter[bytes] = counts
        ) -> bool:
            counts.clear()
            counts.update(await stored_bodies(address))
            return set(results) <= set(counts)  # a slave serves up to its confirm offset

        await wait_until(f"{name} serving every acked value", holds_every_value, timeout=WAIT_S)
        twice = sorted(body for body, n in counts.items() if n > 1)
        assert twice == [], f"{name} stores {len(twice)} values twice: {twice[:5]}"
        assert counts[b"early-0"] == counts[b"early-1"] == 1
