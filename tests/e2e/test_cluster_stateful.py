"""Hypothesis state machines over a real local cluster: a master and two slaves with fixed
roles, and (:class:`FailoverClusterMachine`) etcd with three nodes that elect their master,
with a switchover rule. Rules: sends at every ack level, polls, kills, restarts, pauses,
resumes, partitions (of a node's replication links, or of a node from etcd) and heals,
waiting for a master, in any order hypothesis picks. After every step: never two masters
acknowledging in one epoch, and every ``replicated`` ack is readable at its offset whenever
a master is up. At teardown the faults are healed, every node drained and digested, and
the whole history judged by the chaos checker.

hypothesis-trio is abandoned, so one trio loop runs in a helper thread started in
``initialize`` and rules call into it with ``trio.from_thread.run``. Profiles: ``ci`` (the
default) runs a few short examples; ``HYPOTHESIS_PROFILE=chaos`` runs long ones.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cluster.client import Client, TidelogError, open_client
from cluster.protocol import Status
from tools.chaos.checker import check
from tools.chaos.history import ACK_LEVELS, HistoryWriter, read_history
from tools.chaos.runner import FailoverCluster, StaticCluster, acknowledging_epoch, quiesce
from tools.chaos.workload import NodeView, Recorder, digest, drain
from tools.faults import Fault

T = TypeVar("T")
TOPIC = "state"
QUEUES = 2
NODES = ("n1", "n2", "n3")
MASTER = "n1"  # a static cluster: n1 leads whenever it runs
MASTER_WAIT_S = 20.0


class LoopThread:
    """One trio run in a daemon thread, holding a nursery for the cluster's proxies.

    Invariant: ``token`` is set once :meth:`start` returns; :meth:`call` runs an async
    function in that loop from the test's thread and returns its result.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def start(self) -> LoopThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the trio loop thread did not start within 10 s")
        return self

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(function, *args, trio_token=self.token)

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(10)


class ClusterMachine(RuleBasedStateMachine):
    """The model: which nodes are killed or paused, every replicated ack, per-queue poll
    positions. Rules act on the real cluster and record into one history."""

    fixed_master: str | None = MASTER
    """The static cluster's master; None on the failover cluster, where it is elected."""
    fault_kinds: tuple[str, ...] = ("kill", "pause", "partition")
    max_faults = len(NODES)

    def __init__(self) -> None:
        super().__init__()
        self.loop: LoopThread | None = None
        self.cluster: StaticCluster | FailoverCluster | None = None
        self.faults: dict[str, Fault] = {}  # node -> its active kill or pause
        self.fault_ids: dict[str, str] = {}
        self.replicated: dict[tuple[str, int], str] = {}  # (queue, offset) -> message
        self.verified: set[tuple[str, int]] = set()
        self.poll_offsets = [0] * QUEUES
        self.sent = 0
        self.fault_count = 0

    # --- setup and the loop --------------------------------------------------------------

    @initialize()
    def start_cluster(self) -> None:
        self.loop = LoopThread().start()
        self.root = Path(tempfile.mkdtemp(prefix="tidelog-stateful-"))
        self.cluster = self._make_cluster(self.root / "nodes")
        self.loop.call(self._start)

    def _make_cluster(self, root: Path) -> StaticCluster | FailoverCluster:
        return StaticCluster(root)

    async def _start(self) -> None:
        assert self.cluster is not None and self.loop is not None and self.loop.nursery
        await self.cluster.start(self.loop.nursery)
        self.writer = HistoryWriter(self.root / "history.jsonl")
        self.recorder = Recorder(self.writer)
        master = await self._wait_for_master()
        assert master is not None, "no master after the cluster started"
        async with open_client(self.cluster.address(master)) as client:
            await client.admin.create_topic(TOPIC, QUEUES)

    def teardown(self) -> None:
        try:
            if self.loop is not None and self.cluster is not None:
                self.loop.call(self._heal_and_judge)
        finally:
            if self.cluster is not None:
                self.cluster.kill_all()
            if self.loop is not None:
                self.loop.close()

    # --- helpers -------------------------------------------------------------------------

    def _up(self, name: str) -> bool:
        """Answers clients: not killed, not paused (a partition cuts replication links only)."""
        fault = self.faults.get(name)
        return fault is None or fault.kind in ("partition", "partition-etcd")

    def _master_up(self) -> bool:
        return self.fixed_master is None or self._up(self.fixed_master)

    async def _client_call(self, address: str, op: str, **fields: Any) -> dict[str, Any]:
        async with open_client(address, request_timeout=1.0, connect_timeout=0.5) as client:
            return await client.call(op, **fields)

    # --- rules ---------------------------------------------------------------------------

    @rule(acks=st.sampled_from(ACK_LEVELS), queue=st.integers(0, QUEUES - 1))
    def send(self, acks: str, queue: int) -> None:
        assert self.loop is not None
        self.loop.call(self._send, acks, queue)

    async def _send(self, acks: str, queue: int) -> None:
        assert self.cluster is not None
        message = f"producer-0:{self.sent}"
        self.sent += 1
        name = f"{TOPIC}:{queue}"
        value: dict[str, Any] = {"queue": name, "message": message, "acks": acks}
        self.recorder.record("invoke", "producer-0", "send", value)
        addresses = [self.cluster.address(n) for n in NODES if self._up(n)]
        if not addresses:
            self.recorder.record("fail", "producer-0", "send", value, error="no node running")
            return
        async with open_client(addresses, request_timeout=1.0, connect_timeout=0.5) as client:
            producer = client.producer(acks=acks, batch_size=1, timeout_ms=500, retries=1)
            result = await producer.send(TOPIC, message.encode(), queue=queue)
        error = result.status.value if result.status is not None else result.error
        if result.outcome == "ok":
            assert result.queue_offset is not None
            done = {**value, "offset": result.queue_offset, "physical_offset": result.offset}
            self.recorder.record("ok", "producer-0", "send", done)
            if acks == "replicated":
                self.replicated[name, result.queue_offset] = message
        elif result.outcome == "failed":
            self.recorder.record("fail", "producer-0", "send", value, error=error)
        else:
            if result.queue_offset is not None:
                value = {**value, "offset": result.queue_offset}
            self.recorder.record("info", "producer-0", "send", value, error=error)

    @rule(queue=st.integers(0, QUEUES - 1))
    def poll(self, queue: int) -> None:
        assert self.loop is not None
        self.loop.call(self._poll, queue)

    async def _poll(self, queue: int) -> None:
        assert self.cluster is not None
        process = f"consumer-{queue}"
        value = {"queue": f"{TOPIC}:{queue}", "offset": self.poll_offsets[queue]}
        self.recorder.record("invoke", process, "poll", value)
        up = [n for n in NODES if self._up(n)]
        if not up:
            self.recorder.record("fail", process, "poll", value, error="no node running")
            return
        node = up[0]
        try:
            response = await self._client_call(
                self.cluster.address(node), "pull", topic=TOPIC, queue=queue,
                offset=self.poll_offsets[queue], max_messages=32, wait_ms=0,
            )  # fmt: skip
        except TidelogError as exc:
            self.recorder.record("info", process, "poll", value, node=node, error=str(exc))
            return
        if response["status"] is not Status.OK:
            self.recorder.record(
                "fail", process, "poll", value, node=node, error=response["status"].value
            )
            return
        messages = [[m["queue_offset"], m["body"].decode()] for m in response["messages"]]
        self.recorder.record("ok", process, "poll", {**value, "messages": messages}, node=node)
        if messages:
            self.poll_offsets[queue] = messages[-1][0] + 1

    def _nemesis(self, action: str, kind: str, name: str) -> dict[str, Any]:
        return {
            "fault": kind,
            "action": action,
            "fault_id": f"{kind}-{name}-{self.fault_count}",
            "targets": [name],
            "disk_lost": False,
        }

    @precondition(lambda self: len(self.faults) < self.max_faults)
    @rule(data=st.data(), which=st.integers(0, 2))
    def inject(self, data: st.DataObject, which: int) -> None:
        assert self.loop is not None
        kind = self.fault_kinds[which % len(self.fault_kinds)]
        name = data.draw(st.sampled_from([n for n in NODES if n not in self.faults]), label="node")
        self.loop.call(self._inject, kind, name)

    async def _inject(self, kind: str, name: str) -> None:
        assert self.cluster is not None
        self.fault_count += 1
        value = self._nemesis("start", kind, name)
        self.recorder.record("invoke", "nemesis", "nemesis", value)
        fault = self.cluster.fault(kind, [name], 0)
        await fault.inject()
        self.faults[name] = fault
        self.fault_ids[name] = value["fault_id"]
        self.recorder.record("ok", "nemesis", "nemesis", value)

    @precondition(lambda self: bool(self.faults))
    @rule(data=st.data())
    def heal(self, data: st.DataObject) -> None:
        """Restart a killed node or resume a paused one."""
        assert self.loop is not None
        name = data.draw(st.sampled_from(sorted(self.faults)), label="node")
        self.loop.call(self._heal, name)

    async def _heal(self, name: str) -> None:
        fault = self.faults.pop(name)
        value = {**self._nemesis("stop", fault.kind, name), "fault_id": self.fault_ids[name]}
        self.recorder.record("invoke", "nemesis", "nemesis", value)
        await fault.heal()
        self.recorder.record("ok", "nemesis", "nemesis", value)

    @precondition(lambda self: self._electable())
    @rule()
    def wait_for_master(self) -> None:
        assert self.loop is not None
        master = self.loop.call(self._wait_for_master)
        assert master is not None, "no master within the bound"
        assert self.fixed_master is None or master == self.fixed_master

    def _electable(self) -> bool:
        """A master must appear: the static one runs, or (failover) no node is faulted."""
        if self.fixed_master is not None:
            return self._up(self.fixed_master)
        return not self.faults

    async def _wait_for_master(self) -> str | None:
        assert self.cluster is not None
        with trio.move_on_after(MASTER_WAIT_S):
            while True:
                master, _epoch = await self.cluster.master()
                if master is not None:
                    return master
                await trio.sleep(0.05)
        return None

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def one_master_per_epoch(self) -> None:
        if self.loop is None or self.cluster is None:
            return
        masters = self.loop.call(self._acknowledging_masters)
        epochs = [epoch for epoch, _name in masters]
        assert len(epochs) == len(set(epochs)), f"two masters acknowledging in one epoch: {masters}"

    async def _acknowledging_masters(self) -> list[tuple[int, str]]:
        assert self.cluster is not None
        found: list[tuple[int, str]] = []
        for name in NODES:
            if not self._up(name):
                continue  # a paused node cannot answer, a killed one is gone
            epoch = acknowledging_epoch(await self.cluster.status(name))
            if epoch is not None:
                found.append((epoch, name))
        return found

    @invariant()
    def replicated_acks_are_readable(self) -> None:
        if self.loop is None or self.cluster is None or not self._master_up():
            return
        self.loop.call(self._check_replicated)

    async def _check_replicated(self) -> None:
        assert self.cluster is not None
        pending = sorted(set(self.replicated) - self.verified)
        if not pending:
            return
        master = self.fixed_master or (await self.cluster.master())[0]
        if master is None:
            return  # no master up now: checked once one is
        async with open_client(self.cluster.address(master), request_timeout=5.0) as client:
            for queue, offset in pending:
                await self._read_at(client, queue, offset)

    async def _read_at(self, client: Client, queue: str, offset: int) -> None:
        response = await client.call(
            "pull", topic=TOPIC, queue=int(queue.split(":")[1]), offset=offset,
            max_messages=1, wait_ms=0,
        )  # fmt: skip
        assert response["status"] is Status.OK, response
        got = [(m["queue_offset"], m["body"].decode()) for m in response["messages"]]
        expected = self.replicated[queue, offset]
        assert got[:1] == [(offset, expected)], f"{queue}@{offset}: acked {expected}, read {got}"
        self.verified.add((queue, offset))

    # --- teardown: heal, drain, judge ----------------------------------------------------

    async def _heal_and_judge(self) -> None:
        assert self.cluster is not None
        for name in sorted(self.faults):
            await self._heal(name)
        seen = await quiesce(self.cluster)
        master = seen.get("master")
        assert master is not None, f"no master after healing everything: {seen}"
        assert self.fixed_master is None or master == self.fixed_master
        nodes = [
            NodeView(n, self.cluster.address(n), "master" if n == master else "replica", self.cluster.data_dir(n))
            for n in NODES
        ]  # fmt: skip
        await drain(self.recorder, nodes, TOPIC, QUEUES, timeout_s=30.0)
        status = await self.cluster.status(master) or {}
        confirm = int(status["replication"]["confirm_offset"])
        ends = {n: int((await self.cluster.status(n) or {}).get("max_offset", 0)) for n in NODES}
        await digest(self.recorder, nodes, confirm, int(status["min_offset"]), ends.__getitem__)
        self.writer.close()
        result = check(read_history(self.writer.path))
        errors = {summary.kind: summary.examples[:2] for summary in result.errors()}
        if not any(queue.acked for queue in result.queues):
            errors.pop("nothing_acked", None)  # no send, or every one inside a fault
        assert not errors, f"checker found anomalies (history {self.writer.path}): {errors}"


if os.environ.get("HYPOTHESIS_PROFILE") == "chaos":
    ClusterMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=100)
else:
    ClusterMachine.TestCase.settings = settings(max_examples=4, stateful_step_count=12)

TestCluster = ClusterMachine.TestCase


class FailoverClusterMachine(ClusterMachine):
    """The same rules on etcd with elected masters, plus switchover; at most one node is
    faulted at a time, so a majority can always elect."""

    fixed_master = None
    fault_kinds = ("kill", "pause", "partition-etcd")
    max_faults = 1

    def _make_cluster(self, root: Path) -> StaticCluster | FailoverCluster:
        return FailoverCluster(root, etcd_members=1)

    @precondition(lambda self: not self.faults)
    @rule()
    def switchover(self) -> None:
        assert self.loop is not None
        self.loop.call(self._switchover)

    async def _switchover(self) -> None:
        assert self.cluster is not None
        master = await self._wait_for_master()
        assert master is not None, "no master to switch over from"
        self.fault_count += 1
        value = self._nemesis("start", "switchover", master)
        self.recorder.record("invoke", "nemesis", "nemesis", value)
        try:
            await self.cluster.fault("switchover", [master], 0).inject()
        except TidelogError as exc:  # e.g. no caught-up target yet: refused, nothing changed
            self.recorder.record("info", "nemesis", "nemesis", value, error=str(exc))
            return
        self.recorder.record("ok", "nemesis", "nemesis", value)
        stop = {**value, "action": "stop"}
        self.recorder.record("invoke", "nemesis", "nemesis", stop)
        self.recorder.record("ok", "nemesis", "nemesis", stop)


if os.environ.get("HYPOTHESIS_PROFILE") == "chaos":
    FailoverClusterMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=100)
else:
    FailoverClusterMachine.TestCase.settings = settings(max_examples=2, stateful_step_count=12)

TestFailoverCluster = FailoverClusterMachine.TestCase


def test_a_pinned_sequence_of_faults_keeps_every_replicated_ack() -> None:
    """The rules in one fixed order that covers every fault on master and slave, with the
    invariants after each step, as a regression test that needs no search."""
    machine = ClusterMachine()
    machine.start_cluster()
    assert machine.loop is not None
    loop = machine.loop

    def step(function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        loop.call(function, *args)
        machine.one_master_per_epoch()
        machine.replicated_acks_are_readable()

    try:
        for acks in ACK_LEVELS:
            step(machine._send, acks, 0)
        step(machine._inject, "kill", "n2")
        step(machine._send, "replicated", 1)  # one slave is enough (min in-sync 1)
        step(machine._inject, "pause", "n3")
        step(machine._send, "replicated", 0)  # no slave answers: failed or unknown
        step(machine._heal, "n3")
        step(machine._heal, "n2")
        step(machine._inject, "kill", MASTER)
        step(machine._send, "durable", 1)  # nobody takes writes in a static cluster
        step(machine._heal, MASTER)
        assert loop.call(machine._wait_for_master) == MASTER
        step(machine._inject, "pause", MASTER)
        step(machine._send, "leader", 0)
        step(machine._heal, MASTER)
        step(machine._inject, "partition", MASTER)
        step(machine._send, "replicated", 1)  # no slave hears the master: not acked
        step(machine._send, "leader", 1)
        step(machine._heal, MASTER)
        for queue in range(QUEUES):
            step(machine._send, "replicated", queue)
            step(machine._poll, queue)
        assert machine.replicated and machine.verified == set(machine.replicated)
    finally:
        machine.teardown()


def test_a_pinned_failover_sequence_keeps_every_replicated_ack() -> None:
    """On etcd: kill the elected master, a new one takes writes; pause the master past its
    lease, cut a node from etcd, switch over; invariants after every step."""
    machine = FailoverClusterMachine()
    machine.start_cluster()
    assert machine.loop is not None and machine.cluster is not None
    loop, cluster = machine.loop, machine.cluster

    def step(function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        loop.call(function, *args)
        machine.one_master_per_epoch()
        machine.replicated_acks_are_readable()

    try:
        for acks in ACK_LEVELS:
            step(machine._send, acks, 0)
        first = loop.call(machine._wait_for_master)
        assert first is not None
        step(machine._inject, "kill", first)
        second = loop.call(machine._wait_for_master)
        assert second is not None and second != first
        step(machine._send, "replicated", 1)
        step(machine._heal, first)
        step(machine._inject, "pause", second)
        step(machine._send, "replicated", 0)  # a new master is elected meanwhile
        step(machine._heal, second)
        step(machine._inject, "partition-etcd", cluster.names[0])
        step(machine._send, "replicated", 1)
        step(machine._heal, cluster.names[0])
        step(machine._switchover)
        for queue in range(QUEUES):
            step(machine._send, "replicated", queue)
            step(machine._poll, queue)
        assert machine.replicated and machine.verified == set(machine.replicated)
    finally:
        machine.teardown()
