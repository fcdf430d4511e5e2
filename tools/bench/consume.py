"""`tidelog bench consume`: read back the bench topics with large pulls (messages/s).

The node and the messages come from :func:`tools.bench.produce.run_bench`, which fills
the topics with a short produce run first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from cluster.client import open_client

__all__ = ["bench_consume_on"]


async def bench_consume_on(
    address: str, seconds: float, progress: Callable[[str], None], sizes: tuple[int, ...]
) -> dict[str, float]:
    """Read back everything in the bench topics with large pulls; messages/s."""
    figures: dict[str, float] = {}
    async with open_client(address) as client:
        for size in sizes:
            topic = f"bench-{size}"
            progress(f"consume {topic}")
            count, start = 0, time.perf_counter()
            for entry in await client.admin.offsets(topic):
                offset = entry["min_offset"]
                while offset < entry["max_offset"] and time.perf_counter() - start < seconds * 4:
                    response = await client.checked(
                        "pull", topic=topic, queue=entry["queue"], offset=offset,
                        max_messages=1024, max_bytes=8 << 20,
                    )  # fmt: skip
                    count += len(response["messages"])
                    offset = response["next_offset"]
            elapsed = time.perf_counter() - start
            figures[f"consume_{size}B_msgs_per_s"] = count / elapsed if count else math.nan
            figures[f"consume_{size}B_messages"] = count
    return figures
