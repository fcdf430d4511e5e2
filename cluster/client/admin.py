"""Administration: topics, offsets and node status."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cluster.client.errors import TidelogError
from cluster.protocol import Status

if TYPE_CHECKING:
    from cluster.client.client import Client

__all__ = ["Admin"]


class Admin:
    """Topics, offsets and node status, over the client's shared connection."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def create_topic(self, topic: str, queues: int, *, exist_ok: bool = False) -> int:
        """Create ``topic`` on the master; returns its queue count. ``exist_ok`` accepts an
        existing one."""
        response = await self.client.call_master("create_topic", topic=topic, queues=queues)
        status = response["status"]
        if status is Status.OK or (status is Status.TOPIC_EXISTS and exist_ok):
            queue_count: int = response.get("queues", queues)
            return queue_count
        raise TidelogError(status, response.get("error", ""), response)

    async def alter_topic(self, topic: str, queues: int) -> int:
        """Grow ``topic`` to ``queues`` queues on the master; returns its queue count.
        A smaller count is refused (``BAD_REQUEST``, saying why)."""
        response = await self.client.call_master("alter_topic", topic=topic, queues=queues)
        if response["status"] is not Status.OK:
            raise TidelogError(response["status"], response.get("error", ""), response)
        queue_count: int = response["queues"]
        return queue_count

    async def delete_topic(self, topic: str) -> None:
        """Delete ``topic`` on the master: its queues go at once, its records stay in the
        log until retention and are never served again; a topic created later under the
        name starts empty. ``UNKNOWN_TOPIC`` when there is none."""
        response = await self.client.call_master("delete_topic", topic=topic)
        if response["status"] is not Status.OK:
            raise TidelogError(response["status"], response.get("error", ""), response)

    async def list_topics(self) -> list[dict[str, Any]]:
        topics: list[dict[str, Any]] = (await self.client.checked("list_topics"))["topics"]
        return topics

    async def describe_topic(self, topic: str) -> dict[str, Any]:
        return await self.client.checked("describe_topic", topic=topic)

    async def offsets(self, topic: str, queue: int | None = None) -> list[dict[str, int]]:
        offsets: list[dict[str, int]] = (
            await self.client.checked("get_offsets", topic=topic, queue=queue)
        )["offsets"]
        return offsets

    async def offsets_for_time(
        self, topic: str, time_us: int, queue: int | None = None
    ) -> dict[int, int]:
        """Per queue, the first queue offset stored at or after ``time_us`` (us since the
        epoch; the queue's end when everything is older): pass it as a consumer's
        ``start`` to read from that time on."""
        offsets = (
            await self.client.checked("offsets_for_time", topic=topic, time_us=time_us, queue=queue)
        )["offsets"]
        return {entry["queue"]: entry["offset"] for entry in offsets}

    async def status(self) -> dict[str, Any]:
        return await self.client.checked("status")
