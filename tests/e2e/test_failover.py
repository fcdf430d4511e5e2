"""Automatic failover end to end: a real etcd and three `tidelog node --etcd` processes.

Every wait polls ``status`` (or etcd) with a bound (:func:`tools.process.wait_until`);
no fixed sleeps. Lease defaults (TTL 2 s) keep each test to seconds. Every process is
stopped by its PID at the end, also on failure (the ExitStack).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from cluster.client.connection import Connection
from cluster.protocol import DEFAULT_MAX_FRAME_SIZE
from tools.faults.proxy import FaultProxy
from tools.launcher import EtcdCluster, LocalCluster, NodeSettings
from tools.process import NodeProcess, wait_until

TOPIC = "failover"
WAIT_S = 20.0


async def call(address: str, op: str, timeout_s: float = 3.0, **fields: Any) -> dict[str, Any]:
    """One request on a connection of its own (any status comes back as the answer)."""
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with trio.open_nursery() as nursery:
        connection = Connection(stream, address, DEFAULT_MAX_FRAME_SIZE)
        await connection.start(nursery)
        try:
            return await connection.request(op, timeout_s, **fields)
        finally:
            connection.close()
            nursery.cancel_scope.cancel()


async def status_of(node: NodeProcess) -> dict[str, Any] | None:
    """The node's status, or None when it cannot answer (killed, stopped, starting)."""
    try:
        with trio.fail_after(2):
            return await call(node.address, "status")
    except (OSError, trio.TooSlowError, Exception):
        return None


@attrs.define
class Group:
    """Nodes n1, n2, ... of one group on a real etcd, started one by one by the test (a
    :class:`LocalCluster` on the test's etcd); ``stack`` stops every process at exit."""

    cluster: LocalCluster

    @classmethod
    def on(
        cls, stack: ExitStack, root: Path, etcd: EtcdCluster, *, min_insync_replicas: int = 1
    ) -> Group:
        cluster = LocalCluster(
            root / "group",
            etcd_endpoints=tuple(etcd.endpoints),
            node_prefix="n",
            min_insync_replicas=min_insync_replicas,
        )
        stack.callback(cluster.stop, kill=True)
        return cls(cluster)

    async def start(self, name: str, *, etcd: str | None = None) -> NodeProcess:
        """Start ``name`` (again, after a kill or stop); ``etcd``: its own endpoint.

        The start waits for the node to listen (seconds on a loaded machine) in a worker
        thread: the test's own tasks go on meanwhile, the fault proxy that carries a
        node's etcd traffic too (a blocked proxy starves that node's keepalives, and it
        loses its lease while the test waits)."""
        if etcd is not None:
            self.cluster.node_settings[name] = NodeSettings(etcd_endpoints=(etcd,))
        return await trio.to_thread.run_sync(self.cluster.start_node, name)

    def alive(self) -> list[NodeProcess]:
        return [node for node in self.cluster.nodes.values() if node.is_running()]

    async def master(self, *, other_than: str | None = None) -> NodeProcess:
        """Wait until exactly one live node is an acknowledging master; return it."""
        name = await self.cluster.wait_for_master(WAIT_S, other_than=other_than)
        return self.cluster.nodes[name]

    async def in_sync(self, master: NodeProcess, count: int) -> None:
        """Wait until the master's recorded in-sync set has ``count`` members."""

        async def recorded() -> bool:
            status = await status_of(master)
            coordination = (status or {}).get("coordination") or {}
            return len(coordination.get("recorded_in_sync") or ()) == count

        await wait_until(f"{count} recorded in-sync members", recorded, timeout=WAIT_S)

    async def caught_up(self, end: int, nodes: list[NodeProcess]) -> None:
        async def all_there() -> bool:
            ends = [((await status_of(n)) or {}).get("max_offset") for n in nodes]
            return all(e is not None and e >= end for e in ends)

        await wait_until(f"every node at log end {end}", all_there, timeout=WAIT_S)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd") as cluster:
        yield cluster


@pytest.fixture
def group(tmp_path: Path, etcd: EtcdCluster) -> Iterator[Group]:
    with ExitStack() as stack:
        yield Group.on(stack, tmp_path, etcd)


async def start_three(group: Group) -> NodeProcess:
    for name in ("n1", "n2", "n3"):
        await group.start(name)
    master = await group.master()
    await group.in_sync(master, 3)
    created = await call(master.address, "create_topic", topic=TOPIC, queues=1)
    assert created["status"] == "OK", created
    return master


@attrs.define
class Acked:
    """What producers were told was stored: body -> physical offset."""

    offsets: dict[bytes, int] = attrs.field(factory=dict)
    answered_ok_by: dict[bytes, str] = attrs.field(factory=dict)


async def produce(
    group: Group, acked: Acked, acks: str, stop: trio.Event, prefix: str = "m"
) -> None:
    """A steady producer: one send at a time to whichever node is master now (found by
    status), each body unique; only OK answers count as acknowledged."""
    sequence = 0
    while not stop.is_set():
        targets = group.alive()
        for node in targets:
            if stop.is_set():
                return
            body = f"{prefix}-{sequence}".encode()
            try:
                with trio.fail_after(3):
                    answer = await call(
                        node.address, "send", topic=TOPIC, body=body, queue=0, acks=acks,
                        timeout_ms=2000,
                    )  # fmt: skip
            except Exception:  # refused, reset, timed out, or any of them grouped by the
                continue  # nursery: this send was not acknowledged, so try the next node
            sequence += 1
            if answer["status"] == "OK":
                acked.offsets[body] = answer["offset"]
                acked.answered_ok_by[body] = node.name
                break
        await trio.sleep(0)  # let the test's own tasks run between sends


async def wait_acks(acked: Acked, count: int) -> None:
    async def enough() -> bool:
        return len(acked.offsets) >= count

    await wait_until(f"{count} acknowledged sends", enough, timeout=WAIT_S)


async def assert_all_readable(acked: Acked, nodes: list[NodeProcess]) -> None:
    """Every acknowledged body is at its acknowledged offset on every node (once the
    node's read limit covers them: a new master's confirm offset moves when its slaves
    have acknowledged, a slave's when its master said so)."""
    last = max(acked.offsets.values())
    for node in nodes:

        async def confirmed(node: NodeProcess = node) -> bool:
            answer = await call(node.address, "read", offset=last)
            return bool(answer["status"] == "OK")

        await wait_until(f"{node.name} to confirm offset {last}", confirmed, timeout=WAIT_S)
        for body, offset in acked.offsets.items():
            answer = await call(node.address, "read", offset=offset)
            assert answer["status"] == "OK", (node.name, offset, answer)
            stored = answer["record"]["body"]
            assert stored == body, (node.name, offset, stored, body)


async def log_end(node: NodeProcess) -> int:
    status = await status_of(node)
    assert status is not None
    return int(status["max_offset"])


# ---------------------------------------------------------------------------------- tests


async def test_one_master_is_elected_and_metadata_names_it(group: Group) -> None:
    master = await start_three(group)
    for node in group.alive():
        metadata = await call(node.address, "metadata")
        assert metadata["status"] == "OK"

        async def names_master(node: NodeProcess = node) -> bool:
            answer = await call(node.address, "metadata")
            return (answer["master"] or {}).get("name") == master.name and any(
                t["name"] == TOPIC for t in answer["topics"]
            )

        await wait_until(f"{node.name}'s metadata to name {master.name}", names_master)
    slave = next(n for n in group.alive() if n is not master)
    refused = await call(slave.address, "send", topic=TOPIC, body=b"x", queue=0, acks="leader")
    assert refused["status"] == "NOT_MASTER"
    assert refused["master"] == master.address and refused["epoch"] >= 1


async def sigkill_the_master_under_load(
    group: Group, acks: str
) -> tuple[NodeProcess, NodeProcess, Acked]:
    """Three nodes under an ``acks`` load: SIGKILL the master after 30 acks, go on until
    the new master acked 30 more, and check every ack is readable on every survivor.
    Returns the old master, the new one and the acks."""
    first = await start_three(group)
    acked = Acked()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce, group, acked, acks, stop)
        await wait_acks(acked, 30)
        first.kill()
        before = len(acked.offsets)
        second = await group.master(other_than=first.name)
        await wait_acks(acked, before + 30)
        stop.set()
    assert any(by == second.name for by in acked.answered_ok_by.values())
    survivors = group.alive()
    await group.caught_up(max(acked.offsets.values()) + 1, survivors)
    await assert_all_readable(acked, survivors)
    return first, second, acked


async def test_sigkill_of_the_master_under_replicated_load_loses_no_ack(group: Group) -> None:
    first, second, acked = await sigkill_the_master_under_load(group, "replicated")
    # the old master comes back as a slave: its tail that no slave held is cut
    old = await group.start(first.name)

    async def following() -> bool:
        status = await status_of(old)
        replication = (status or {}).get("replication") or {}
        return (status or {}).get("role") == "slave" and bool(replication.get("connected"))

    await wait_until("the old master to follow the new one", following, timeout=WAIT_S)
    await group.caught_up(await log_end(second), [old])
    await assert_all_readable(acked, [old])


async def test_a_paused_master_answers_nothing_ok_that_the_new_master_lacks(
    group: Group,
) -> None:
    first = await start_three(group)
    acked = Acked()
    stop = trio.Event()
    assert first.process is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce, group, acked, "leader", stop)
        await wait_acks(acked, 20)
        first.process.send_signal(signal.SIGSTOP)
        try:
            second = await group.master(other_than=first.name)
        finally:
            first.process.send_signal(signal.SIGCONT)

        async def stepped_down() -> bool:
            status = await status_of(first)
            return ((status or {}).get("coordination") or {}).get("role") in ("slave", "fenced")

        await wait_until("the paused master to step down", stepped_down, timeout=WAIT_S)
        before = len(acked.offsets)
        await wait_acks(acked, before + 20)
        stop.set()
    # what the old master answered OK at acks=leader before its pause may be cut (that
    # is acks=leader's promise); nothing it answered after it lost the lease may be.
    after_pause = {
        body: offset
        for body, offset in acked.offsets.items()
        if acked.answered_ok_by[body] == second.name
    }
    await group.caught_up(max(after_pause.values()) + 1, [second])
    await assert_all_readable(Acked(after_pause), [second])


async def test_a_master_cut_from_etcd_steps_down_and_no_ack_is_lost(
    tmp_path: Path, etcd: EtcdCluster, group: Group
) -> None:
    host, _, port = etcd.endpoints[0].removeprefix("http://").rpartition(":")
    proxy = FaultProxy(host, int(port))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        await group.start("n1", etcd=f"http://127.0.0.1:{proxy.port}")
        first = await group.master()
        await group.start("n2")
        await group.start("n3")
        await group.in_sync(first, 3)
        created = await call(first.address, "create_topic", topic=TOPIC, queues=1)
        assert created["status"] == "OK"
        acked = Acked()
        stop = trio.Event()
        async with trio.open_nursery() as producers:
            producers.start_soon(produce, group, acked, "replicated", stop)
            await wait_acks(acked, 20)
            proxy.partition()

            async def stepped_down() -> bool:
                status = await status_of(first)
                return not ((status or {}).get("coordination") or {}).get("may_acknowledge")

            await wait_until("the cut-off master to stop acknowledging", stepped_down)
            second = await group.master(other_than=first.name)
            before = len(acked.offsets)
            await wait_acks(acked, before + 20)
            stop.set()
        survivors = [n for n in group.alive() if n is not first]
        await group.caught_up(max(acked.offsets.values()) + 1, survivors)
        await assert_all_readable(acked, survivors)
        assert second.name != first.name
        proxy.heal()
        nursery.cancel_scope.cancel()


async def test_switchover_at_acks_leader_loses_nothing(group: Group) -> None:
    first = await start_three(group)
    acked = Acked()
    stop = trio.Event()
    target = next(n for n in group.alive() if n is not first)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce, group, acked, "leader", stop)
        await wait_acks(acked, 50)
        answer = await call(first.address, "switchover", timeout_s=15, group="g1", to=target.name)
        assert answer["status"] == "OK", answer
        assert answer["master"] == target.name
        second = await group.master(other_than=first.name)
        assert second is target
        before = len(acked.offsets)
        await wait_acks(acked, before + 20)
        stop.set()
    await group.caught_up(max(acked.offsets.values()) + 1, group.alive())
    await assert_all_readable(acked, group.alive())


async def test_with_min_insync_two_the_last_node_refuses_replicated(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    with ExitStack() as stack:
        group = Group.on(stack, tmp_path, etcd, min_insync_replicas=2)
        first = await start_three(group)
        ok = await call(first.address, "send", topic=TOPIC, body=b"a", queue=0, acks="replicated")
        assert ok["status"] == "OK", ok
        first.kill()
        second = await group.master(other_than=first.name)
        # one slave left: fewer than two recorded in-sync slaves, refused before append
        last_slave = next(n for n in group.alive() if n is not second)
        last_slave.kill()

        async def refused() -> bool:
            answer = await call(
                second.address, "send", topic=TOPIC, body=b"b", queue=0, acks="replicated",
                timeout_ms=500,
            )  # fmt: skip
            return bool(answer["status"] == "SLAVE_NOT_AVAILABLE")

        await wait_until("replicated refused on the last node", refused, timeout=WAIT_S)
        end = await log_end(second)
        again = await call(
            second.address, "send", topic=TOPIC, body=b"c", queue=0, acks="replicated"
        )
        assert again["status"] == "SLAVE_NOT_AVAILABLE"
        assert await log_end(second) == end  # nothing appended
        assert math.isfinite(end)


async def test_a_gracefully_stopped_master_hands_over_without_waiting_for_its_lease(
    group: Group,
) -> None:
    first = await start_three(group)
    ok = await call(first.address, "send", topic=TOPIC, body=b"kept", queue=0, acks="replicated")
    assert ok["status"] == "OK", ok
    assert first.stop() == 0  # SIGTERM: resigns, drains, writes its clean checkpoint
    assert "reason=resigning" in first.stderr  # it gave the leader key up, not the TTL
    second = await group.master(other_than=first.name)
    await assert_all_readable(Acked({b"kept": ok["offset"]}), [second])
    # restarted, it follows the new master (a clean start, so it may campaign later)
    restarted = await group.start(first.name)

    async def following() -> bool:
        status = await status_of(restarted)
        return ((status or {}).get("coordination") or {}).get("master") == second.name

    await wait_until("the restarted node to follow the new master", following, timeout=WAIT_S)


async def test_a_new_master_serves_what_the_old_term_confirmed_before_any_slave_acks(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    """Two nodes: once the master is killed the survivor leads with no slave at all, so
    nothing in its own term is confirmed. It served the old term's confirmed records as
    a slave and keeps serving them (its confirm offset used to restart at 0, hiding
    them until a slave acknowledged again)."""
    with ExitStack() as stack:
        group = Group.on(stack, tmp_path, etcd)
        for name in ("n1", "n2"):
            await group.start(name)
        first = await group.master()
        await group.in_sync(first, 2)
        created = await call(first.address, "create_topic", topic=TOPIC, queues=1)
        assert created["status"] == "OK", created
        ok = await call(
            first.address, "send", topic=TOPIC, body=b"seen", queue=0, acks="replicated"
        )
        assert ok["status"] == "OK", ok
        (survivor,) = (n for n in group.alive() if n is not first)

        async def confirmed_on_the_slave() -> bool:
            answer = await call(survivor.address, "read", offset=ok["offset"])
            return bool(answer["status"] == "OK")

        await wait_until("the slave to serve the record", confirmed_on_the_slave, timeout=WAIT_S)
        first.kill()
        second = await group.master(other_than=first.name)
        assert second is survivor
        answer = await call(second.address, "read", offset=ok["offset"])
        assert answer["status"] == "OK", answer
        assert answer["record"]["body"] == b"seen"
