"""`tidelog bench consume` reads every stored message back in each way it measures, and
prints the figures it promises (rates are not asserted: they depend on the machine)."""

from __future__ import annotations

import math
from pathlib import Path

from cluster.client import open_client
from tests.cluster.test_server import node_config, running
from tools.bench.consume import bench_consume_on


async def test_bench_consume_reads_everything_in_both_formats_and_through_the_consumer(
    tmp_path: Path,
) -> None:
    async with running(node_config(tmp_path)) as node:
        assert node.address is not None
        address = "{}:{}".format(*node.address)
        async with open_client(address) as client:
            await client.admin.create_topic("bench-1024", 4)
            producer = client.producer(acks="leader")
            for index in range(12):
                for result in await producer.send_batch(
                    "bench-1024", [bytes(1024)] * 50, queue=index % 4
                ):
                    result.raise_for_outcome()
        figures = await bench_consume_on(
            address,
            5.0,
            lambda _line: None,
            (1024,),
            produced={"batch64_inflight64_1024B_leader_msgs_per_s": 1000.0},
        )
    for name in ("consume_1024B", "consume_maps_1024B", "consumer_1024B"):
        assert figures[f"{name}_messages"] == 600
    for name in ("consume_1024B", "consume_maps_1024B", "consumer_1024B"):
        assert figures[f"{name}_msgs_per_s"] > 0
        assert figures[f"{name}_client_cpu_us_per_msg"] >= 0
    for name in ("consume", "consumer"):
        ratio = figures[f"{name}_vs_batched_produce"]
        assert math.isclose(ratio, figures[f"{name}_1024B_msgs_per_s"] / 1000.0)
