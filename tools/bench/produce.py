"""`tidelog bench produce` (and the harness `bench consume` runs in): a real node over loopback.

The node runs as its own process (so client and node each get a core, as on
two machines), started here unless ``--bootstrap`` names one. Each figure comes
with its floor or ceiling measured in the same run: a bare trio echo server's
pipelined round trips for unbatched sends, and the storage engine in-process
for batched throughput.

With ``replicas`` (``--replicas N``) the node started is a master with an HA port
and N slave processes follow it (``--min-insync-replicas N``), so
``acks=in_sync`` and ``acks=replicated`` figures -- every slave acknowledged;
``replicated`` adds the master's fsync -- sit beside ``acks=leader`` ones from a
cluster of the same shape in the same run: the difference is the price of
replication, not of a different setup. Each ack level gets fresh nodes (as the
peers get a fresh server per level), so no level pays for the writeback of the
one before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import anyio
import trio

from cluster.client import Client, open_client
from cluster.protocol import Status
from tools.bench.consume import bench_consume_on
from tools.bench.stats import CpuMeter, percentile
from tools.process import NodeProcess, node_status, wait_until

ProgressFn = Callable[[str], None]
SIZES = (128, 1024)
IN_FLIGHT = 64
BATCH = 64


async def _sequential(
    client: Client, topic: str, body: bytes, acks: str, seconds: float, latencies: list[float]
) -> float:
    """One send at a time; messages/s, and each latency added to ``latencies``, sorted."""
    producer = client.producer(acks=acks, batch_size=1)
    began = time.perf_counter()
    deadline = began + seconds
    while True:  # at least one send: a process not scheduled for the window still measures
        start = time.perf_counter()
        (await producer.send(topic, body, queue=0)).raise_for_outcome()
        end = time.perf_counter()
        latencies.append(end - start)
        if end >= deadline:
            break
    latencies.sort()
    return len(latencies) / (end - began)


async def _senders(seconds: float, step: Callable[[int], Awaitable[int]]) -> float:
    """``IN_FLIGHT`` tasks each calling ``step(index)`` (which returns how many messages it
    sent) back to back for ``seconds``; messages/s over all of them."""
    count = 0
    deadline = time.perf_counter() + seconds

    async def sender(index: int) -> None:
        nonlocal count
        while True:  # at least one step each, even if the window passed before it ran
            sent = await step(index)  # not `count += await ...`: that reads count before
            count += sent  # the await and loses the other tasks' increments
            if time.perf_counter() >= deadline:
                break

    start = time.perf_counter()
    async with anyio.create_task_group() as group:  # trio or asyncio (`--client`)
        for index in range(IN_FLIGHT):
            group.start_soon(sender, index)
    return count / (time.perf_counter() - start)


async def _in_flight(
    client: Client, topic: str, body: bytes, acks: str, seconds: float, *, batched: bool
) -> float:
    """One message per ``send`` call; batched: the producer merges concurrent sends."""
    producer = client.producer(acks=acks, batch_size=256 if batched else 1)

    async def step(index: int) -> int:
        (await producer.send(topic, body, queue=index % 4)).raise_for_outcome()
        return 1

    return await _senders(seconds, step)


async def _explicit_batches(
    client: Client, topic: str, body: bytes, acks: str, seconds: float, *, idempotent: bool = False
) -> float:
    """Each request an explicit batch of ``BATCH`` messages (numbered by an idempotent
    producer with ``idempotent``: the price of deduplication beside the plain figure)."""
    producer = client.producer(acks=acks, idempotent=idempotent)
    bodies = [body] * BATCH

    async def step(index: int) -> int:
        for result in await producer.send_batch(topic, bodies, queue=index % 4):
            result.raise_for_outcome()
        return BATCH

    return await _senders(seconds, step)


async def bench_produce_on(
    address: str,
    seconds: float,
    progress: ProgressFn,
    acks_levels: tuple[str, ...],
    node_pids: Sequence[int] = (),
    *,
    client_tag: str = "",
) -> dict[str, float]:
    """Every workload at every size and ack level; beside each rate, the CPU microseconds
    per message of this client and of the node processes (``node_pids``, when known).
    Runs under trio or asyncio; ``client_tag`` follows the ack level in every name."""
    figures: dict[str, float] = {}
    meter = CpuMeter(node_pids)

    async def measured(name: str, run: Callable[[], Awaitable[float]]) -> float:
        """``{name}_msgs_per_s`` from ``run()``, and the CPU microseconds per message."""
        meter.start()
        started = time.perf_counter()
        rate = await run()
        messages = rate * (time.perf_counter() - started)
        figures[f"{name}_msgs_per_s"] = rate
        for side, value in meter.per_message_us(messages).items():
            figures[f"{name}_{side}_cpu_us_per_msg"] = value
        return rate

    async with open_client(address) as client:
        for size in SIZES:
            topic = f"bench-{size}"
            await client.admin.create_topic(topic, 4, exist_ok=True)
            body = os.urandom(size)
            for acks in acks_levels:
                tag = f"{size}B_{acks}{client_tag}"
                progress(f"{tag}: sequential")
                latencies: list[float] = []
                await measured(
                    f"sequential_{tag}",
                    partial(_sequential, client, topic, body, acks, seconds, latencies),
                )
                for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
                    figures[f"sequential_{tag}_{name}_us"] = percentile(latencies, q) * 1e6
                progress(f"{tag}: batches of {BATCH}, {IN_FLIGHT} in flight")
                batches = f"batch{BATCH}_inflight{IN_FLIGHT}_{tag}"
                rate = await measured(
                    batches, partial(_explicit_batches, client, topic, body, acks, seconds)
                )
                figures[f"{batches}_mb_per_s"] = rate * size / 1e6
                progress(f"{tag}: batches of {BATCH}, {IN_FLIGHT} in flight, idempotent")
                # The node rebuilds its producers from the log tail at the first idempotent
                # send after a start: a one-time cost, not the price per message.
                warm_up = client.producer(acks=acks, idempotent=True)
                (await warm_up.send(topic, body, queue=0)).raise_for_outcome()
                await measured(
                    f"{batches}_idempotent",
                    partial(_explicit_batches, client, topic, body, acks, seconds, idempotent=True),
                )
                progress(f"{tag}: {IN_FLIGHT} concurrent sends, producer batching")
                await measured(
                    f"linger_{IN_FLIGHT}_senders_{tag}",
                    partial(_in_flight, client, topic, body, acks, seconds, batched=True),
                )
                progress(f"{tag}: unbatched, {IN_FLIGHT} in flight")
                await measured(
                    f"pipelined_{IN_FLIGHT}_{tag}",
                    partial(_in_flight, client, topic, body, acks, seconds, batched=False),
                )
    return figures


# ---- floors and ceilings from the same run -------------------------------------------------

_ECHO_SERVER = """
import sys, trio
async def echo(stream):
    try:
        while data := await stream.receive_some(262144):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(echo, listeners)
trio.run(main)
"""


async def echo_floor(frame_size: int, seconds: float, in_flight: int) -> tuple[float, list[float]]:
    """Round trips/s and latencies against a bare trio echo server in another process:
    the floor under one request per message (framing, loopback, two trio loops)."""
    server = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        frame = struct.pack(">I", frame_size) + os.urandom(frame_size)
        window = trio.Semaphore(in_flight)
        sent_at: list[float] = []
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def reader() -> None:
            buffered = 0
            while True:
                buffered += len(await stream.receive_some(262144))
                while buffered >= len(frame):
                    buffered -= len(frame)
                    latencies.append(time.perf_counter() - sent_at[len(latencies)])
                    window.release()

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            while time.perf_counter() < deadline:
                await window.acquire()
                sent_at.append(time.perf_counter())
                await stream.send_all(frame)
            for _ in range(in_flight):
                await window.acquire()
            nursery.cancel_scope.cancel()
        await stream.aclose()
        rate = len(latencies) / (time.perf_counter() - start)
        latencies.sort()
        return rate, latencies
    finally:
        server.kill()
        server.wait()


async def storage_ceiling(directory: Path, seconds: float) -> dict[str, float]:
    """The store alone, in this process: put_batch of 64 (what a batched send costs at most)."""
    from storage import Message, MessageStore, StoreConfig

    figures: dict[str, float] = {}
    config = StoreConfig(data_dir=directory / "ceiling")
    async with MessageStore.open(config) as store:
        for size in SIZES:
            batch = [Message("ceiling", os.urandom(size), i % 4) for i in range(64)]
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                await store.put_batch(batch)
                count += 64
            figures[f"storage_put_batch64_{size}B_msgs_per_s"] = count / (
                time.perf_counter() - start
            )
    return figures


REPLICA_START_TIMEOUT = 30.0


async def start_replicated(
    root: Path,
    replicas: int,
    processes: list[NodeProcess],
    progress: ProgressFn,
    *,
    node_env: Callable[[str], dict[str, str]] | None = None,
) -> str:
    """Start a master with an HA port and ``replicas`` slaves following it (appended to
    ``processes`` as they start, so the caller stops them whatever fails); return the
    master's client address once every slave is in sync. ``node_env(name)`` adds to a
    node's environment (``--trace`` uses it)."""
    progress(f"starting a master and {replicas} slave(s)")
    master = NodeProcess(
        root / "master",
        name="master",
        extra_args=["--ha-port", "0", "--min-insync-replicas", str(replicas)],
        env=node_env("master") if node_env is not None else None,
    )
    processes.append(master)
    master.start()
    ha_address = (await node_status(master.address))["replication"]["ha_address"]
    for index in range(replicas):
        name = f"slave-{index + 1}"
        slave = NodeProcess(
            root / name,
            name=name,
            extra_args=[
                "--role", "slave", "--master-ha", ha_address, "--master-client", master.address,
            ],
            env=node_env(name) if node_env is not None else None,
        )  # fmt: skip
        processes.append(slave)
        slave.start()

    async def all_in_sync() -> bool:
        status = await node_status(master.address)
        return len(status["replication"].get("in_sync", [])) >= replicas

    await wait_until(f"{replicas} slaves in sync", all_in_sync, timeout=REPLICA_START_TIMEOUT)
    async with open_client(master.address) as client:  # admitted, not refused: in sync
        await client.admin.create_topic("bench-warmup", 1, exist_ok=True)
        reply = await client.call(
            "send", topic="bench-warmup", body=b"x", queue=0, acks="replicated", timeout_ms=5000
        )
        if reply["status"] is not Status.OK:
            raise RuntimeError(f"the replicated warm-up write failed: {reply}")
    return master.address


async def run_bench(
    kind: str,
    bootstrap: str | None,
    *,
    seconds: float,
    acks_levels: tuple[str, ...],
    progress: ProgressFn,
    replicas: int = 0,
    trace: bool = False,
    clients: tuple[str, ...] = ("trio",),
) -> dict[str, float]:
    """``kind`` is "produce" or "consume"; starts a node unless ``bootstrap`` is given,
    with ``replicas`` > 0 a master and that many slaves (see the module doc). With
    ``trace``, instead of the workloads: one write's hops (:mod:`tools.bench.hops`).
    ``clients``: produce from each of these kinds of client (:mod:`tools.bench.clients`)."""
    if trace:
        from tools.bench.hops import run_trace

        return {"replicas": float(replicas)} | await run_trace(
            replicas, acks_levels, seconds, progress
        )
    root = Path(tempfile.mkdtemp(prefix="tidelog-bench-"))
    try:
        figures: dict[str, float] = {"replicas": float(replicas)} if replicas else {}
        if kind == "produce":
            for index, acks in enumerate(acks_levels):
                async with _nodes_for(bootstrap, root / f"level-{index}", replicas, progress) as (
                    address,
                    pids,
                ):
                    figures.update(
                        await _produce_workloads(address, seconds, progress, acks, pids, clients)
                    )
            if clients != ("trio",):  # the summary ratios over every level, not the last
                from tools.bench.clients import client_ratios

                figures.update(client_ratios(figures, clients))
            progress("floor: trio echo server")
            for size in SIZES:
                rate, _ = await echo_floor(size + 40, seconds, IN_FLIGHT)
                figures[f"echo_pipelined_{size}B_round_trips_per_s"] = rate
                _, latencies = await echo_floor(size + 40, seconds, 1)
                figures[f"echo_sequential_{size}B_p50_us"] = percentile(latencies, 0.5) * 1e6
                figures[f"echo_sequential_{size}B_p99_us"] = percentile(latencies, 0.99) * 1e6
            progress("ceiling: storage in-process")
            figures.update(await storage_ceiling(root, seconds))
        else:
            async with _nodes_for(bootstrap, root / "node", replicas, progress) as (address, pids):
                leader = ("leader",)
                figures.update(await bench_produce_on(address, seconds / 2, progress, leader, pids))
                figures.update(
                    await bench_consume_on(
                        address, seconds, progress, SIZES, pids, produced=figures
                    )
                )
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _produce_workloads(
    address: str,
    seconds: float,
    progress: ProgressFn,
    acks: str,
    pids: list[int],
    clients: tuple[str, ...],
) -> dict[str, float]:
    """Every produce workload at one ack level, from each kind of client in ``clients``."""
    if clients == ("trio",):
        return await bench_produce_on(address, seconds, progress, (acks,), pids)
    from tools.bench.clients import bench_clients_on

    return await bench_clients_on(address, seconds, progress, (acks,), pids, clients)


@contextlib.asynccontextmanager
async def _nodes_for(
    bootstrap: str | None, directory: Path, replicas: int, progress: ProgressFn
) -> AsyncIterator[tuple[str, list[int]]]:
    """The node to measure and the PIDs of the node processes: ``bootstrap`` as it is, or
    fresh nodes in ``directory`` (a master and ``replicas`` slaves, or one node), stopped
    and removed on exit.

    Fresh nodes for each ack level, as the peers get a fresh server for each level: the
    kernel's writeback of one level's gigabytes of page-cache writes must not land in the
    next level's window (it slowed the ``replicated`` batches by a third, measured), and an
    ``fsync`` must not carry the dirty pages an earlier level left in the same segment."""
    if bootstrap is not None:
        yield bootstrap, []
        return
    processes: list[NodeProcess] = []
    try:
        if replicas > 0:
            address = await start_replicated(directory, replicas, processes, progress)
        else:
            progress("starting a node")
            node = NodeProcess(directory / "node")
            processes.append(node)
            address = node.start().address
        yield address, [pid for process in processes if (pid := process.pid) is not None]
    finally:
        for process in reversed(processes):  # slaves first: the master's exit is clean
            with contextlib.suppress(RuntimeError):  # ignored SIGTERM: stop() killed it
                process.stop()
        shutil.rmtree(directory, ignore_errors=True)
