"""Building response envelopes and the result shapes of each op."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from cluster.protocol.limits import PROTOCOL_VERSION
from cluster.protocol.statuses import Status

if TYPE_CHECKING:
    from cluster.protocol.spliced import SplicedBytes

_OK: Final = Status.OK
"""(A module global: an enum member read through its class costs a descriptor call on
Python 3.11, and this is read for every send's answer.)"""

__all__ = [
    "batch_results",
    "error_response",
    "make_response",
    "not_master_response",
    "pull_records_response",
    "pull_response",
    "pulled_message",
    "read_response",
    "send_batch_response",
    "send_response",
    "send_result",
]


def make_response(
    req_id: int, status: Status = Status.OK, *, error: str | None = None, **fields: Any
) -> dict[str, Any]:
    """A response envelope; every status but OK needs an ``error`` sentence."""
    response: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": req_id, "status": status}
    if status is not Status.OK:
        if not error:
            raise ValueError(f"a {status} response needs an error sentence")
        response["error"] = error
    response.update(fields)
    return response


def error_response(req_id: int, status: Status, error: str, **details: Any) -> dict[str, Any]:
    """An error answer: ``status``, ``error`` and any status-specific ``details``."""
    if status is Status.OK:
        raise ValueError("an error response cannot have status OK")
    return make_response(req_id, status, error=error, **details)


def not_master_response(
    req_id: int, master: str | None, epoch: int | None = None
) -> dict[str, Any]:
    """``NOT_MASTER`` with the master hint ("host:port", or None while none is known) and
    the epoch the hint belongs to (None: unknown), so a client keeps the newest hint."""
    if master is None:
        error = "this node is not the master and knows no master yet; retry after a pause"
    else:
        error = f"this node is not the master; resend to {master}"
    return error_response(req_id, Status.NOT_MASTER, error, master=master, epoch=epoch)


def send_result(queue: int, queue_offset: int, offset: int, store_us: int) -> dict[str, int]:
    """Where one message was stored: one entry of ``send_batch``'s ``results``."""
    return {"queue": queue, "queue_offset": queue_offset, "offset": offset, "store_us": store_us}


def send_response(
    req_id: int,
    topic: str,
    queue: int,
    queue_offset: int,
    offset: int,
    store_us: int,
    *,
    status: Status = Status.OK,
    error: str | None = None,
) -> dict[str, Any]:
    """Answer to ``send``; a flush or slave timeout still reports where the message went."""
    if status is _OK:  # the hot path of one-message requests: no keyword merging
        return {
            "v": PROTOCOL_VERSION,
            "id": req_id,
            "status": status,
            "topic": topic,
            "queue": queue,
            "queue_offset": queue_offset,
            "offset": offset,
            "store_us": store_us,
        }
    return make_response(
        req_id,
        status,
        error=error,
        topic=topic,
        **send_result(queue, queue_offset, offset, store_us),
    )


def send_batch_response(
    req_id: int,
    topic: str,
    queues: list[int],
    queue_offsets: list[int],
    offsets: list[int],
    store_us: int,
    *,
    status: Status = Status.OK,
    error: str | None = None,
) -> dict[str, Any]:
    """Answer to ``send_batch``: parallel arrays, entry ``i`` for ``messages[i]``.

    Arrays, not a map per message: for 64 messages cbor2 encodes this in 23 us
    against 72 us, decodes it in 7 us against 34 us, in 787 bytes against 3,624.
    """
    return make_response(
        req_id,
        status,
        error=error,
        topic=topic,
        store_us=store_us,
        queues=queues,
        queue_offsets=queue_offsets,
        offsets=offsets,
    )


def batch_results(response: Mapping[str, Any]) -> list[dict[str, int]]:
    """Per-message view of a ``send_batch`` answer: entry ``i`` is ``messages[i]``'s
    {queue, queue_offset, offset, store_us}, like a ``send`` result."""
    store_us = response["store_us"]
    return [
        {"queue": queue, "queue_offset": queue_offset, "offset": offset, "store_us": store_us}
        for queue, queue_offset, offset in zip(
            response["queues"], response["queue_offsets"], response["offsets"], strict=True
        )
    ]


def pulled_message(
    queue_offset: int,
    offset: int,
    body: bytes | bytearray | memoryview,
    born_us: int,
    store_us: int,
    *,
    tags: str | None = None,
    props: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One message of a ``pull`` answer (or a ``read`` record); copies a view body into bytes."""
    message: dict[str, Any] = {
        "queue_offset": queue_offset,
        "offset": offset,
        "body": body if type(body) is bytes else bytes(body),
        "born_us": born_us,
        "store_us": store_us,
    }
    if tags is not None:
        message["tags"] = tags
    if props:
        message["props"] = dict(props)
    return message


def pull_response(
    req_id: int,
    messages: list[dict[str, Any]],
    next_offset: int,
    min_offset: int,
    max_offset: int,
) -> dict[str, Any]:
    """Answer to ``pull``; ``max_offset`` is one past the queue's last message."""
    return make_response(
        req_id,
        messages=messages,
        next_offset=next_offset,
        min_offset=min_offset,
        max_offset=max_offset,
    )


def pull_records_response(
    req_id: int,
    records: bytes | SplicedBytes,
    next_offset: int,
    min_offset: int,
    max_offset: int,
) -> dict[str, Any]:
    """Answer to ``pull`` with ``format`` ``records``: ``records`` holds the stored bytes
    of the messages, back to back (docs/format.md; :func:`decode_records` reads them).
    The node passes them as :class:`SplicedBytes` (views of its log, written in place)."""
    return make_response(
        req_id,
        records=records,
        next_offset=next_offset,
        min_offset=min_offset,
        max_offset=max_offset,
    )


def read_response(req_id: int, topic: str, queue: int, record: dict[str, Any]) -> dict[str, Any]:
    """Answer to ``read``: the record (a :func:`pulled_message`) with its topic and queue."""
    return make_response(req_id, topic=topic, queue=queue, record=record)
