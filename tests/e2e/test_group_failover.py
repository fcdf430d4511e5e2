"""A consumer group across a master failover (real etcd, three real nodes): committed
offsets are records of the replicated log, so the new master holds them; a member that
kept running re-joins the new master (its heartbeat is answered ``REJOIN_GROUP``) and
misses nothing; a consumer started afterwards resumes at the group's last commit.

Synchronised on consumed messages (events) and bounded polls of other processes'
state; every process is stopped by its PID at the end, also on failure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.client import Client, open_client
from cluster.client.group_consumer import GroupConsumer
from tests.helpers import started
from tools.launcher import LocalCluster
from tools.process import wait_until

WAIT_S = 30.0
OPTIONS: dict[str, Any] = {
    "heartbeat_interval_ms": 200,
    "auto_commit_interval_ms": 100,
    "commit_acks": "replicated",
    "session_timeout_ms": 3000,
    "wait_ms": 200,
}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "cluster", replicas=3)
    async with started(cluster):
        yield cluster


async def produce(client: Client, start: int, count: int) -> None:
    producer = client.producer()
    for n in range(start, start + count):
        result = await producer.send("t", f"m{n}".encode(), acks="replicated")
        assert result.outcome == "ok", result


async def committed_on(address: str) -> int:
    """The sum of the group's committed offsets as the node at ``address`` holds them."""
    async with open_client(address) as client:
        answer = await client.checked("fetch_offsets", group="g")
    return sum(o["offset"] for o in answer["offsets"])


async def test_committed_offsets_survive_a_master_failover(cluster: LocalCluster) -> None:
    first = await cluster.wait_for_master(WAIT_S)
    seen: list[bytes] = []
    enough = {20: trio.Event(), 40: trio.Event()}

    async with open_client(cluster.addresses) as client:
        await client.admin.create_topic("t", 2)
        await produce(client, 0, 20)
        member = GroupConsumer(client, "g", ["t"], **OPTIONS)

        async def consume() -> None:
            async with member:
                async for message in member:
                    seen.append(message.body)
                    for count, event in enough.items():
                        if len(set(seen)) >= count:
                            event.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with trio.fail_after(WAIT_S):
                await enough[20].wait()
            survivor = next(name for name in cluster.names if name != first)

            async def all_committed() -> bool:
                return await committed_on(cluster.address(survivor)) == 20

            # the commit is on a slave (replicated), so the next master has it
            await wait_until("the commit of 20 replicated", all_committed, timeout=WAIT_S)
            joins_before = member.rebalances
            cluster.kill(first)
            killed_at = trio.current_time()
            second = await cluster.wait_for_master(WAIT_S, other_than=first)
            assert await committed_on(cluster.address(second)) == 20  # from the replicated log
            await produce(client, 20, 20)
            with trio.fail_after(WAIT_S):
                await enough[40].wait()
            print(f"group_member_caught_up_after_failover_s={trio.current_time() - killed_at:.2f}")
            # it re-joins the new master (its pulls may reach the new master's records a
            # heartbeat before the rejoin: a long poll now answers once the slaves ack)
            with trio.fail_after(WAIT_S):
                while member.rebalances <= joins_before:
                    await member.wait_next_join()
            assert member.rebalances > joins_before
            nursery.cancel_scope.cancel()
        assert set(seen) == {f"m{n}".encode() for n in range(40)}

        async def resumed_commit() -> bool:
            return await committed_on(cluster.address(second)) == 40

        await wait_until(
            "the group's commit of 40 on the new master", resumed_commit, timeout=WAIT_S
        )
        await produce(client, 40, 5)
        again: list[bytes] = []
        async with GroupConsumer(client, "g", ["t"], **OPTIONS) as restarted:
            async for message in restarted:
                again.append(message.body)
                if len(again) == 5:
                    break
        assert sorted(again) == [f"m{n}".encode() for n in range(40, 45)]
