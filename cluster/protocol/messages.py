"""Typed views of validated requests: one ``TypedDict`` per op, as the schema normalises them."""

from __future__ import annotations

from typing import Literal, TypeAlias, TypedDict

from cluster.protocol.statuses import Acks

__all__ = [
    "AlterTopicRequest",
    "BatchMessage",
    "CreateTopicRequest",
    "DeleteTopicRequest",
    "DescribeTopicRequest",
    "GetOffsetsRequest",
    "InitProducerRequest",
    "ListTopicsRequest",
    "MetadataRequest",
    "OffsetsForTimeRequest",
    "PromoteRequest",
    "PullRequest",
    "ReadRequest",
    "RepointRequest",
    "Request",
    "SendBatchRequest",
    "SendRequest",
    "StatusRequest",
    "SwitchoverRequest",
]


class BatchMessage(TypedDict):
    body: bytes
    queue: int | None
    key: bytes | str | None
    tags: str | None
    props: dict[str, str] | None
    born_us: int | None


class SendRequest(TypedDict):
    op: Literal["send"]
    id: int
    topic: str
    body: bytes
    queue: int | None
    key: bytes | str | None
    tags: str | None
    props: dict[str, str] | None
    born_us: int | None
    acks: Acks
    timeout_ms: int
    producer: int | None
    sequence: int | None
    epoch: int | None


class SendBatchRequest(TypedDict):
    op: Literal["send_batch"]
    id: int
    topic: str
    messages: list[BatchMessage]
    acks: Acks
    timeout_ms: int
    producer: int | None
    sequence: int | None
    epoch: int | None


class InitProducerRequest(TypedDict):
    op: Literal["init_producer"]
    id: int
    producer: int | None
    epoch: int | None


class PullRequest(TypedDict):
    op: Literal["pull"]
    id: int
    topic: str
    queue: int
    offset: int
    max_messages: int
    max_bytes: int
    wait_ms: int
    format: str


class GetOffsetsRequest(TypedDict):
    op: Literal["get_offsets"]
    id: int
    topic: str
    queue: int | None


class OffsetsForTimeRequest(TypedDict):
    op: Literal["offsets_for_time"]
    id: int
    topic: str
    time_us: int
    queue: int | None


class ReadRequest(TypedDict):
    op: Literal["read"]
    id: int
    offset: int


class CreateTopicRequest(TypedDict):
    op: Literal["create_topic"]
    id: int
    topic: str
    queues: int


class AlterTopicRequest(TypedDict):
    op: Literal["alter_topic"]
    id: int
    topic: str
    queues: int


class DeleteTopicRequest(TypedDict):
    op: Literal["delete_topic"]
    id: int
    topic: str


class ListTopicsRequest(TypedDict):
    op: Literal["list_topics"]
    id: int


class DescribeTopicRequest(TypedDict):
    op: Literal["describe_topic"]
    id: int
    topic: str


class StatusRequest(TypedDict):
    op: Literal["status"]
    id: int


class PromoteRequest(TypedDict):
    op: Literal["promote"]
    id: int
    ha_port: int


class RepointRequest(TypedDict):
    op: Literal["repoint"]
    id: int
    master_ha: str
    master_client: str | None


class MetadataRequest(TypedDict):
    op: Literal["metadata"]
    id: int


class SwitchoverRequest(TypedDict):
    op: Literal["switchover"]
    id: int
    group: str
    to: str | None
    timeout_ms: int


Request: TypeAlias = (
    SendRequest
    | SendBatchRequest
    | PullRequest
    | GetOffsetsRequest
    | OffsetsForTimeRequest
    | ReadRequest
    | CreateTopicRequest
    | AlterTopicRequest
    | DeleteTopicRequest
    | ListTopicsRequest
    | DescribeTopicRequest
    | StatusRequest
    | PromoteRequest
    | RepointRequest
    | MetadataRequest
    | SwitchoverRequest
    | InitProducerRequest
)
"""A validated request: ``op``, ``id`` and every field of the op's schema."""
