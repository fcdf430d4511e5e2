"""`tidelog bench produce --client trio,asyncio,blocking`: the same workloads from each kind
of client, against the same node, in one run.

The trio figures keep their names. The others name the client after the size and ack
level (``pipelined_64_128B_leader_asyncio_msgs_per_s``), and each gets two summary ratios
against trio, geometric means over the workloads: of msgs/s
(``client_asyncio_vs_trio_rate_ratio``) and of client CPU per message
(``client_asyncio_vs_trio_client_cpu_ratio``).

- ``asyncio``: the async client in an asyncio loop on a thread of this process (the
  trio loop meanwhile only waits for that thread).
- ``blocking``: the blocking client (its portal loop on asyncio, the default), called
  from threads: one for sequential sends, ``IN_FLIGHT`` for the concurrent workloads,
  as a threaded script would.

CPU per message counts this whole process, so every thread the client uses is in it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Final

import anyio
import trio

from cluster.client.sync import SyncClient, connect
from tools.bench.produce import BATCH, IN_FLIGHT, SIZES, ProgressFn, bench_produce_on
from tools.bench.stats import CpuMeter, percentile

__all__ = ["CLIENTS", "bench_clients_on", "client_ratios", "parse_clients"]

CLIENTS: Final = ("trio", "asyncio", "blocking")
"""The kinds of client ``--client`` takes; trio's figures keep their unsuffixed names."""


def parse_clients(text: str) -> tuple[str, ...]:
    """``--client``'s comma-separated list, each once, in the given order; ValueError
    naming the unknown ones."""
    chosen = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in chosen if name not in CLIENTS]
    if unknown or not chosen:
        raise ValueError(
            f"unknown client {', '.join(unknown) or repr(text)}: use a comma-separated "
            f"list of {', '.join(CLIENTS)}"
        )
    return chosen


async def bench_clients_on(
    address: str,
    seconds: float,
    progress: ProgressFn,
    acks_levels: tuple[str, ...],
    node_pids: Sequence[int],
    clients: Sequence[str],
) -> dict[str, float]:
    """Every produce workload from each client in ``clients``, one after the other."""
    figures: dict[str, float] = {}
    by_client: dict[str, dict[str, float]] = {}
    for client in clients:
        progress(f"client: {client}")
        if client == "trio":
            run = await bench_produce_on(address, seconds, progress, acks_levels, node_pids)
        elif client == "asyncio":
            on_asyncio = partial(
                bench_produce_on,
                address,
                seconds,
                progress,
                acks_levels,
                node_pids,
                client_tag="_asyncio",
            )
            run = await trio.to_thread.run_sync(partial(anyio.run, on_asyncio, backend="asyncio"))
        else:
            run = await trio.to_thread.run_sync(
                bench_blocking_on, address, seconds, progress, acks_levels, node_pids
            )
        by_client[client] = run
        figures.update(run)
    return figures | client_ratios(figures, clients)


def client_ratios(figures: dict[str, float], clients: Sequence[str]) -> dict[str, float]:
    """Each non-trio client's summary ratios to trio over every workload in ``figures``
    (which may hold several ack levels' runs); none without trio's figures."""
    if "trio" not in clients:
        return {}
    others = [client for client in clients if client != "trio"]
    trio_run = {
        key: value
        for key, value in figures.items()
        if not key.startswith("client_") and not any(f"_{other}" in key for other in others)
    }
    ratios: dict[str, float] = {}
    for client in others:
        run = {key: value for key, value in figures.items() if f"_{client}" in key}
        ratios.update(ratios_to_trio(client, run, trio_run))
    return ratios


def ratios_to_trio(
    client: str, run: dict[str, float], trio_run: dict[str, float]
) -> dict[str, float]:
    """Geometric means over the workloads of ``client``'s msgs/s and client CPU per
    message, each divided by trio's (msgs/s above 1: faster; CPU above 1: dearer)."""
    rates: list[float] = []
    cpus: list[float] = []
    for key, value in run.items():
        trio_key = key.replace(f"_{client}", "", 1)
        base = trio_run.get(trio_key)
        if base is None or not (value > 0 and base > 0):
            continue
        if key.endswith("_msgs_per_s"):
            rates.append(value / base)
        elif key.endswith("_client_cpu_us_per_msg"):
            cpus.append(value / base)
    return {
        f"client_{client}_vs_trio_rate_ratio": _geometric_mean(rates),
        f"client_{client}_vs_trio_client_cpu_ratio": _geometric_mean(cpus),
    }


def _geometric_mean(values: list[float]) -> float:
    if not values:
        return math.nan
    return math.exp(sum(math.log(value) for value in values) / len(values))


# ---- the blocking client: the same workloads from threads ----------------------------------


def bench_blocking_on(
    address: str,
    seconds: float,
    progress: ProgressFn,
    acks_levels: tuple[str, ...],
    node_pids: Sequence[int] = (),
) -> dict[str, float]:
    """:func:`tools.bench.produce.bench_produce_on`'s workloads through the blocking
    client, each concurrent sender a thread; names tagged ``_blocking``."""
    figures: dict[str, float] = {}
    meter = CpuMeter(node_pids)

    def measured(name: str, run: Callable[[], float]) -> float:
        meter.start()
        started = time.perf_counter()
        rate = run()
        messages = rate * (time.perf_counter() - started)
        figures[f"{name}_msgs_per_s"] = rate
        for side, value in meter.per_message_us(messages).items():
            figures[f"{name}_{side}_cpu_us_per_msg"] = value
        return rate

    with connect(address) as client:
        for size in SIZES:
            topic = f"bench-{size}"
            client.admin.create_topic(topic, 4, exist_ok=True)
            body = os.urandom(size)
            for acks in acks_levels:
                tag = f"{size}B_{acks}_blocking"
                progress(f"{tag}: sequential")
                latencies: list[float] = []
                measured(
                    f"sequential_{tag}",
                    partial(_sequential, client, topic, body, acks, seconds, latencies),
                )
                for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
                    figures[f"sequential_{tag}_{name}_us"] = percentile(latencies, q) * 1e6
                progress(f"{tag}: batches of {BATCH}, {IN_FLIGHT} threads")
                batches = f"batch{BATCH}_inflight{IN_FLIGHT}_{tag}"
                rate = measured(batches, partial(_batches, client, topic, body, acks, seconds))
                figures[f"{batches}_mb_per_s"] = rate * size / 1e6
                progress(f"{tag}: batches of {BATCH}, {IN_FLIGHT} threads, idempotent")
                measured(
                    f"{batches}_idempotent",
                    partial(_batches, client, topic, body, acks, seconds, idempotent=True),
                )
                progress(f"{tag}: {IN_FLIGHT} threads sending, producer batching")
                measured(
                    f"linger_{IN_FLIGHT}_senders_{tag}",
                    partial(_each_alone, client, topic, body, acks, seconds, batch_size=256),
                )
                progress(f"{tag}: unbatched, {IN_FLIGHT} threads")
                measured(
                    f"pipelined_{IN_FLIGHT}_{tag}",
                    partial(_each_alone, client, topic, body, acks, seconds, batch_size=1),
                )
    return figures


def _sequential(
    client: SyncClient,
    topic: str,
    body: bytes,
    acks: str,
    seconds: float,
    latencies: list[float],
) -> float:
    producer = client.producer(acks=acks, batch_size=1)
    began = time.perf_counter()
    deadline = began + seconds
    while True:  # at least one send, as the trio workloads
        start = time.perf_counter()
        producer.send(topic, body, queue=0).raise_for_outcome()
        end = time.perf_counter()
        latencies.append(end - start)
        if end >= deadline:
            break
    latencies.sort()
    return len(latencies) / (end - began)


def _threads(seconds: float, step: Callable[[int], int]) -> float:
    """``IN_FLIGHT`` threads each calling ``step(index)`` (messages it sent) back to back
    for ``seconds``; messages/s over all of them. A failure in any thread is raised."""
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()
    count = 0

    def sender(index: int) -> None:
        nonlocal count
        sent = 0
        while True:  # at least one step each, even if the window passed before it ran
            sent += step(index)
            if time.perf_counter() >= deadline:
                break
        with lock:
            count += sent

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="bench-sender") as pool:
        for future in [pool.submit(sender, index) for index in range(IN_FLIGHT)]:
            future.result()
    return count / (time.perf_counter() - start)


def _batches(
    client: SyncClient,
    topic: str,
    body: bytes,
    acks: str,
    seconds: float,
    *,
    idempotent: bool = False,
) -> float:
    producer = client.producer(acks=acks, idempotent=idempotent)
    bodies = [body] * BATCH

    def step(index: int) -> int:
        for result in producer.send_batch(topic, bodies, queue=index % 4):
            result.raise_for_outcome()
        return BATCH

    return _threads(seconds, step)


def _each_alone(
    client: SyncClient, topic: str, body: bytes, acks: str, seconds: float, *, batch_size: int
) -> float:
    """One message per ``send`` call; with ``batch_size`` > 1 the producer merges the
    threads' concurrent sends."""
    producer = client.producer(acks=acks, batch_size=batch_size)

    def step(index: int) -> int:
        producer.send(topic, body, queue=index % 4).raise_for_outcome()
        return 1

    return _threads(seconds, step)
