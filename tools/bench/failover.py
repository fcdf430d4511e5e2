"""`tidelog bench failover`: repeated master SIGKILLs under a steady acks=replicated load.

Per kill: the time from the SIGKILL to the first replicated ack on the new master (the
unavailability a producer sees, rediscovery included) and to the new master's election;
the killed node is restarted and waited for until etcd records it back in the in-sync
set before the next kill (so each kill finds the group at full strength).
At the end every acknowledged message is read back on every node: ``acked_lost`` must
be 0. A real etcd and real node processes (LocalCluster), default lease settings.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from cluster.client import open_client
from cluster.coordination.keys import GroupState
from cluster.coordination.settings import CoordinationSettings
from tools.bench.stats import percentile
from tools.demo import missing_acks
from tools.launcher import LocalCluster
from tools.process import wait_until

__all__ = ["run_failover_bench"]

TOPIC = "bench-failover"
QUEUES = 4
PRODUCERS = 8
ACKS_BETWEEN_KILLS = 100
WAIT_S = 60.0


async def run_failover_bench(
    root: Path, *, kills: int = 20, progress: Callable[[str], None] = lambda _m: None
) -> dict[str, float]:
    cluster = LocalCluster(root / "cluster", replicas=3)
    try:
        await trio.to_thread.run_sync(cluster.start)
        await cluster.wait_for_master(WAIT_S)
        await wait_until("every slave caught up", _group_formed(cluster), timeout=WAIT_S)
        return await _measure(cluster, kills, progress)
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def _measure(
    cluster: LocalCluster, kills: int, progress: Callable[[str], None]
) -> dict[str, float]:
    acked: dict[tuple[int, int], bytes] = {}
    outcomes = {"ok": 0, "unknown": 0, "failed": 0}
    to_ack: list[float] = []
    to_elected: list[float] = []
    state: dict[str, float] = {"killed_at": 0.0}
    killed_address = [""]
    acked_since_kill = [0]
    first_ack = trio.Event()
    async with open_client(cluster.addresses) as client:
        await client.admin.create_topic(TOPIC, QUEUES, exist_ok=True)
        producer = client.producer(acks="replicated", retries=10_000, retry_backoff_ms=5)

        async def produce(task: int) -> None:
            seq = task
            while True:
                body = b"%d" % seq
                result = await producer.send(TOPIC, body, queue=seq % QUEUES)
                seq += PRODUCERS
                outcomes[result.outcome] += 1
                if result.ok:
                    assert result.queue is not None and result.queue_offset is not None
                    acked[(result.queue, result.queue_offset)] = body
                    acked_since_kill[0] += 1
                    # An answer the old master sent just before dying is not the new one's:
                    # the client's master changes only once it found the new one.
                    after_kill = state["killed_at"] and client.master != killed_address[0]
                    if after_kill and not first_ack.is_set():
                        to_ack.append(time.perf_counter() - state["killed_at"])
                        first_ack.set()

        async with trio.open_nursery() as nursery:
            for task in range(PRODUCERS):
                nursery.start_soon(produce, task)
            for kill in range(1, kills + 1):
                await wait_until(
                    "acks before the next kill",
                    _at_least(acked_since_kill, ACKS_BETWEEN_KILLS),
                    timeout=WAIT_S,
                )
                master = await cluster.wait_for_master(WAIT_S)
                first_ack = trio.Event()
                killed_address[0] = cluster.address(master)
                state["killed_at"] = time.perf_counter()
                cluster.kill(master)
                acked_since_kill[0] = 0
                new_master = await cluster.wait_for_master(WAIT_S, other_than=master)
                to_elected.append(time.perf_counter() - state["killed_at"])
                with trio.fail_after(WAIT_S):
                    await first_ack.wait()
                state["killed_at"] = 0.0
                progress(f"kill {kill}/{kills}: {master} -> {new_master} in {to_ack[-1]:.2f}s")
                await trio.to_thread.run_sync(cluster.restart, master)
                await cluster.wait_group_state(
                    f"{master} back in sync under {new_master}",
                    _rejoined(master, new_master),
                    WAIT_S,
                )
            nursery.cancel_scope.cancel()
    progress("reading every ack back on every node")
    lost = 0
    for name in cluster.names:
        lost = max(lost, len(await missing_acks(cluster.address(name), acked, TOPIC)))
    return _figures(kills, to_ack, to_elected, outcomes, len(acked), lost)


def _group_formed(cluster: LocalCluster) -> Callable[[], Awaitable[bool]]:
    """Every slave says it has caught up with the master (the latch a fresh node needs
    before it may campaign), so the first kill measures a failover, not a group still
    forming."""

    async def check() -> bool:
        views = await cluster.views()
        slaves = [view for view in views if not view.is_master]
        return len(slaves) == len(views) - 1 and all(
            view.role == "slave" and view.coordination.get("caught_up") for view in slaves
        )

    return check


def _at_least(counter: list[int], wanted: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return counter[0] >= wanted

    return check


def _rejoined(node: str, master: str) -> Callable[[GroupState], bool]:
    def check(state: GroupState) -> bool:
        return state.master == master and node in state.in_sync

    return check


def _figures(
    kills: int,
    to_ack: list[float],
    to_elected: list[float],
    outcomes: dict[str, int],
    acked: int,
    lost: int,
) -> dict[str, float]:
    to_ack, to_elected = sorted(to_ack), sorted(to_elected)
    lease = CoordinationSettings()
    return {
        "kills": kills,
        "kill_to_first_replicated_ack_p50_s": percentile(to_ack, 0.50),
        "kill_to_first_replicated_ack_p99_s": percentile(to_ack, 0.99),
        "kill_to_first_replicated_ack_max_s": to_ack[-1] if to_ack else float("nan"),
        "kill_to_new_master_p50_s": percentile(to_elected, 0.50),
        "kill_to_new_master_p99_s": percentile(to_elected, 0.99),
        "kill_to_new_master_max_s": to_elected[-1] if to_elected else float("nan"),
        "acked_messages": acked,
        "acked_lost": lost,
        "sends_unknown_outcome": outcomes["unknown"],
        "sends_failed": outcomes["failed"],
        "lease_ttl_s": lease.lease_ttl_s,
        "keepalive_interval_s": lease.keepalive_interval_s,
        "request_timeout_s": lease.request_timeout_s,
        "fencing_margin_s": lease.fencing_margin_s,
    }
