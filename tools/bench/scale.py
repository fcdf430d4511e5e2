"""`tidelog bench scale`: produce throughput over many queues, with many long polls parked.

Three workloads against one node process, each ``seconds`` long, with the same
producers: every producer has its own client (its own connection) and sends one
1 KiB message per request at ``acks=leader``, one at a time -- the way most client
code sends.

* single queue: every producer writes queue 0 of a one-queue topic (the baseline);
* many queues: producer ``i`` writes queues ``i, i + P, i + 2P, ...`` of a topic with
  ``queues`` queues, in turn;
* parked: the same, while ``polls`` long polls wait on distinct queues of a topic nobody
  writes (from their own connections): what parked consumers cost the writers.

Each queue is written once before the measured runs, so creating its files (once per
65,536 entries) is timed on its own. The node's RSS is sampled throughout beside its
high-water mark (``VmHWM``); ``RssAnon`` leaves out the mapped log and queue files.
Beside the ratios of the rates, ``*_node_cpu_ratio`` compares node CPU per message:
the ratio the rates would show were the node the bottleneck, steady on a shared machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import trio
import trio.testing

from cluster.client import Client, open_client
from cluster.protocol import MAX_QUEUES, MAX_WAIT_MS
from tools.bench.stats import CpuMeter
from tools.process import NodeProcess

ProgressFn = Callable[[str], None]
BODY_SIZE = 1024
SINGLE_TOPIC = "scale-single"
MANY_TOPIC = "scale-queues"
IDLE_TOPIC = "scale-idle"
RSS_SAMPLE_INTERVAL_S = 0.05
POLL_ANSWER_GRACE_S = 10.0
"""How much longer than its ``wait_ms`` a poll's client waits for the answer."""


@attrs.frozen
class ScaleSettings:
    """The workload's shape (the command's options)."""

    seconds: float = 3.0
    queues: int = 1000
    producers: int = 200
    polls: int = 1000
    poll_connections: int = 10

    def __attrs_post_init__(self) -> None:
        for name in ("queues", "polls"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_QUEUES:
                raise ValueError(f"--{name} must be from 1 to {MAX_QUEUES} (queues per topic)")
        if self.producers < 1 or self.poll_connections < 1 or self.seconds <= 0:
            raise ValueError("--producers, --poll-connections and --seconds must be positive")


def producer_queues(index: int, producers: int, queues: int) -> list[int]:
    """The queues producer ``index`` writes in turn: together the producers cover every
    queue, each about equally often."""
    if producers >= queues:
        return [index % queues]
    return list(range(index, queues, producers))


@attrs.define
class RssSampler:
    """The node's resident set, sampled from ``/proc/<pid>/status`` while the bench runs."""

    pid: int
    peak_kib: dict[str, int] = attrs.field(factory=dict)

    def sample(self) -> dict[str, int]:
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0])
        for key, kib in fields.items():
            self.peak_kib[key] = max(self.peak_kib.get(key, 0), kib)
        return fields

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(RSS_SAMPLE_INTERVAL_S)


async def _send_for(
    producers: Sequence[Client], topic: str, plans: Sequence[list[int]], seconds: float
) -> int:
    """Every producer sends its queues in turn for ``seconds``; how many were acked."""
    body = os.urandom(BODY_SIZE)
    acked = 0
    deadline = time.perf_counter() + seconds

    async def send(client: Client, queues: list[int]) -> None:
        nonlocal acked
        producer = client.producer(acks="leader", batch_size=1)
        turn = 0
        while time.perf_counter() < deadline:
            result = await producer.send(topic, body, queue=queues[turn % len(queues)])
            result.raise_for_outcome()
            acked += 1
            turn += 1

    async with trio.open_nursery() as nursery:
        for client, queues in zip(producers, plans, strict=True):
            nursery.start_soon(send, client, queues)
    return acked


async def _write_each_queue_once(producers: Sequence[Client], queues: int) -> None:
    """One message in every queue of the many-queue topic (creates its files)."""
    body = os.urandom(BODY_SIZE)

    async def write(client: Client, chosen: list[int]) -> None:
        producer = client.producer(acks="leader", batch_size=1)
        for queue in chosen:
            (await producer.send(MANY_TOPIC, body, queue=queue)).raise_for_outcome()

    async with trio.open_nursery() as nursery:
        for index, client in enumerate(producers):
            nursery.start_soon(write, client, producer_queues(index, len(producers), queues))


@attrs.define
class ParkedPolls:
    """``count`` long polls on distinct queues of the idle topic, re-issued when answered."""

    clients: Sequence[Client]
    count: int
    answered_with_messages: int = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Parks every poll, reports started once the node has read them all, and keeps
        them parked until cancelled."""
        async with trio.open_nursery() as nursery:
            for queue in range(self.count):
                nursery.start_soon(self._poll, self.clients[queue % len(self.clients)], queue)
            await trio.testing.wait_all_tasks_blocked()  # every pull is on its connection
            for client in self.clients:  # answered in order: the pulls before were read
                await client.call("status")
            task_status.started()

    async def _poll(self, client: Client, queue: int) -> None:
        while True:
            answer = await client.call(
                "pull",
                timeout=MAX_WAIT_MS / 1000 + POLL_ANSWER_GRACE_S,
                topic=IDLE_TOPIC,
                queue=queue,
                offset=0,
                wait_ms=MAX_WAIT_MS,
            )
            if answer.get("messages"):
                self.answered_with_messages += 1


async def bench_scale_on(
    address: str, settings: ScaleSettings, node_pid: int, progress: ProgressFn
) -> dict[str, float]:
    """The three workloads against the node at ``address`` (process ``node_pid``)."""
    figures: dict[str, float] = {
        "queues": settings.queues,
        "producers": settings.producers,
        "parked_polls": settings.polls,
        "poll_connections": settings.poll_connections,
    }
    meter = CpuMeter([node_pid])
    rss = RssSampler(node_pid)
    start_kib = rss.sample()

    async def measured(name: str, run: Callable[[], Awaitable[int]]) -> float:
        meter.start()
        started = time.perf_counter()
        acked = await run()
        rate = acked / (time.perf_counter() - started)
        figures[f"{name}_msgs_per_s"] = rate
        figures[f"{name}_acked"] = acked
        for side, value in meter.per_message_us(acked).items():
            figures[f"{name}_{side}_cpu_us_per_msg"] = value
        return rate

    async with trio.open_nursery() as sampling:
        sampling.start_soon(rss.run)
        async with contextlib.AsyncExitStack() as stack:
            progress(f"connecting {settings.producers} producers")
            producers = [
                await stack.enter_async_context(open_client(address))
                for _ in range(settings.producers)
            ]
            admin = producers[0].admin
            await admin.create_topic(SINGLE_TOPIC, 1, exist_ok=True)
            await admin.create_topic(MANY_TOPIC, settings.queues, exist_ok=True)
            await admin.create_topic(IDLE_TOPIC, settings.polls, exist_ok=True)
            progress(f"writing each of {settings.queues} queues once")
            started = time.perf_counter()
            await _write_each_queue_once(producers, settings.queues)
            figures["scale_first_write_each_queue_s"] = time.perf_counter() - started
            spread = [
                producer_queues(i, settings.producers, settings.queues)
                for i in range(settings.producers)
            ]
            single_plan = [[0]] * settings.producers

            progress("single queue")
            single = await measured(
                "scale_single_queue",
                lambda: _send_for(producers, SINGLE_TOPIC, single_plan, settings.seconds),
            )
            progress(f"{settings.queues} queues")
            many = await measured(
                "scale_many_queues",
                lambda: _send_for(producers, MANY_TOPIC, spread, settings.seconds),
            )
            progress(f"{settings.queues} queues, {settings.polls} long polls parked")
            poll_clients = [
                await stack.enter_async_context(open_client(address))
                for _ in range(settings.poll_connections)
            ]
            polls = ParkedPolls(poll_clients, settings.polls)
            async with trio.open_nursery() as polling:
                await polling.start(polls.run)
                parked = await measured(
                    "scale_parked",
                    lambda: _send_for(producers, MANY_TOPIC, spread, settings.seconds),
                )
                polling.cancel_scope.cancel()
            figures["scale_parked_polls_answered_with_messages"] = polls.answered_with_messages
        sampling.cancel_scope.cancel()

    rss.sample()
    figures["scale_ratio"] = many / single
    figures["scale_parked_ratio"] = parked / single
    figures["scale_parked_vs_many_queues_ratio"] = parked / many
    # On a shared machine the rates swing with the neighbours; node CPU per message does
    # not: these are the ratios the rates would have were the node the bottleneck.
    single_cpu = figures.get("scale_single_queue_node_cpu_us_per_msg", math.nan)
    for name, workload in (("scale", "scale_many_queues"), ("scale_parked", "scale_parked")):
        cpu = figures.get(f"{workload}_node_cpu_us_per_msg", math.nan)
        figures[f"{name}_node_cpu_ratio"] = single_cpu / cpu if cpu else math.nan
    figures["node_rss_start_mib"] = start_kib["VmRSS"] / 1024
    figures["node_rss_peak_mib"] = rss.peak_kib["VmHWM"] / 1024
    figures["node_rss_anon_peak_mib"] = rss.peak_kib["RssAnon"] / 1024
    figures["node_rss_file_peak_mib"] = rss.peak_kib["RssFile"] / 1024
    return figures


async def run_scale_bench(settings: ScaleSettings, progress: ProgressFn) -> dict[str, float]:
    """Start a node in a temp dir, measure, stop it (by its PID) and remove the dir."""
    root = Path(tempfile.mkdtemp(prefix="tidelog-bench-scale-"))
    node = NodeProcess(root / "node")
    try:
        progress("starting a node")
        node.start()
        assert node.pid is not None
        return await bench_scale_on(node.address, settings, node.pid, progress)
    finally:
        with contextlib.suppress(RuntimeError):  # ignored SIGTERM: stop() killed it
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
