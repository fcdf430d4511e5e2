"""`tidelog bench consume`: read back the bench topics with large pulls (messages/s).

The node and the messages come from :func:`tools.bench.produce.run_bench`, which fills
the topics with a short produce run first; its batched figure
(``batch64_inflight64_<size>B_leader_msgs_per_s``) is what ``consume_vs_batched_produce``
compares with.

Each topic is read twice, each time whole, one pull of up to 1024 messages at a time:
once as the library's consumer reads (``format`` ``records``: the stored bytes, decoded
and CRC-checked in this client; ``consume_<size>B_*``), once with a map per message
decoded on the node (``format`` ``messages``; ``consume_maps_<size>B_*``), so the two
answer shapes compare within one run. Then once more through the library's consumer,
which pulls every queue at once (``consumer_<size>B_*``). Beside each rate, the CPU
microseconds per message of this client and of the node.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import trio

from cluster.client import Client, open_client
from cluster.client.consumer import consumed_messages
from cluster.protocol import MESSAGES_FORMAT, RECORDS_FORMAT
from tools.bench.stats import CpuMeter

__all__ = ["bench_consume_on"]

PULL_MESSAGES = 1024
PULL_BYTES = 8 << 20


async def bench_consume_on(
    address: str,
    seconds: float,
    progress: Callable[[str], None],
    sizes: tuple[int, ...],
    node_pids: Sequence[int] = (),
    *,
    produced: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Read back everything in the bench topics in both answer formats; messages/s, CPU
    per message, and with ``produced`` (the same run's produce figures) the ratios of the
    1 KiB consume rates to the batched produce rate."""
    figures: dict[str, float] = {}
    meter = CpuMeter(node_pids)
    async with open_client(address) as client:
        for size in sizes:
            topic = f"bench-{size}"
            for name, answer_format in (("", RECORDS_FORMAT), ("maps_", MESSAGES_FORMAT)):
                progress(f"consume {topic} ({answer_format})")
                meter.start()
                count, elapsed = await _read_all(client, topic, answer_format, seconds * 4)
                tag = f"consume_{name}{size}B"
                figures[f"{tag}_msgs_per_s"] = count / elapsed if count else math.nan
                figures[f"{tag}_messages"] = count
                for side, value in meter.per_message_us(count).items():
                    figures[f"{tag}_{side}_cpu_us_per_msg"] = value
            progress(f"consume {topic} (library consumer)")
            meter.start()
            count, elapsed = await _consume_all(client, topic, seconds * 4)
            tag = f"consumer_{size}B"
            figures[f"{tag}_msgs_per_s"] = count / elapsed if count else math.nan
            figures[f"{tag}_messages"] = count
            for side, value in meter.per_message_us(count).items():
                figures[f"{tag}_{side}_cpu_us_per_msg"] = value
    batched = (produced or {}).get("batch64_inflight64_1024B_leader_msgs_per_s")
    for name in ("consume", "consumer"):
        consumed = figures.get(f"{name}_1024B_msgs_per_s")
        if batched and consumed:
            figures[f"{name}_vs_batched_produce"] = consumed / batched
    return figures


async def _read_all(
    client: Client, topic: str, answer_format: str, limit_s: float
) -> tuple[int, float]:
    """Every message of ``topic`` (or what ``limit_s`` allows), decoded as a consumer
    gets them; how many, and the seconds it took."""
    count, start = 0, time.perf_counter()
    for entry in await client.admin.offsets(topic):
        queue, offset = entry["queue"], entry["min_offset"]
        while offset < entry["max_offset"] and time.perf_counter() - start < limit_s:
            response = await client.checked(
                "pull", topic=topic, queue=queue, offset=offset, max_messages=PULL_MESSAGES,
                max_bytes=PULL_BYTES, format=answer_format,
            )  # fmt: skip
            count += len(consumed_messages(topic, queue, response))
            offset = response["next_offset"]
    return count, time.perf_counter() - start


async def _consume_all(client: Client, topic: str, limit_s: float) -> tuple[int, float]:
    """Every message of ``topic`` (or what ``limit_s`` allows) through the library's
    :class:`~cluster.client.Consumer`, which pulls every queue at once; how many, and the
    seconds it took."""
    stored = sum(e["max_offset"] - e["min_offset"] for e in await client.admin.offsets(topic))
    count, start = 0, time.perf_counter()
    with trio.move_on_after(limit_s):
        consumer = client.consumer(topic, start="earliest", max_messages=PULL_MESSAGES)
        async with consumer:
            async for _message in consumer:
                count += 1
                if count == stored:
                    break
    return count, time.perf_counter() - start
