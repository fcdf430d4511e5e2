"""Every exception a request can raise, turned into a status: the one place."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from cluster.node.topics import InvalidTopicNameError, QueueCountError, TopicExistsError
from cluster.protocol import Status, error_response
from storage import (
    DiskFullError,
    InvalidMessageError,
    InvalidTopicError,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    StorageFailedError,
)

if TYPE_CHECKING:  # replies builds answers with status_of: no import back at run time
    from cluster.server.replies import Reply

__all__ = ["RequestError", "response_for_error", "status_of", "unknown_topic"]

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request that cannot be served as sent: answer ``status`` with ``details``."""

    def __init__(self, status: Status, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def unknown_topic(name: str) -> RequestError:
    """The answer names the command that fixes it, for people; the op, for programs."""
    return RequestError(
        Status.UNKNOWN_TOPIC,
        f"topic {name!r} does not exist: create it with `tidelog topic create {name}` "
        "(op create_topic)",
    )


_STATUS_OF: Final[tuple[tuple[type[Exception], Status], ...]] = (
    (InvalidTopicNameError, Status.INVALID_TOPIC),
    (QueueCountError, Status.BAD_REQUEST),
    (InvalidTopicError, Status.INVALID_TOPIC),  # before its base class, InvalidMessageError
    (MessageTooLargeError, Status.MESSAGE_TOO_LARGE),
    (InvalidMessageError, Status.BAD_REQUEST),
    (OffsetOutOfRangeError, Status.OFFSET_OUT_OF_RANGE),
    (DiskFullError, Status.DISK_FULL),
    (StorageFailedError, Status.STORAGE_FAILED),
)


def status_of(exc: Exception) -> Status:
    """The status a request that raised ``exc`` is answered with (``INTERNAL_ERROR``: a
    bug); the node's metrics count errors by it."""
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, TopicExistsError):
        return Status.TOPIC_EXISTS
    for kind, status in _STATUS_OF:
        if isinstance(exc, kind):
            return status
    return Status.INTERNAL_ERROR


def response_for_error(req_id: int, exc: Exception, op: str = "?") -> Reply:
    """The answer to a request that raised ``exc``. Anything unexpected is a server bug:
    logged with its traceback and answered ``INTERNAL_ERROR`` for this request only."""
    if isinstance(exc, RequestError):
        return error_response(req_id, exc.status, exc.message, **exc.details)
    if isinstance(exc, TopicExistsError):
        return error_response(req_id, Status.TOPIC_EXISTS, str(exc), queues=exc.topic.queues)
    status = status_of(exc)
    if status is not Status.INTERNAL_ERROR:
        return error_response(req_id, status, str(exc))
    log.error("internal_error op=%s id=%d error=%r", op, req_id, exc, exc_info=exc)
    return error_response(
        req_id,
        Status.INTERNAL_ERROR,
        f"internal error serving op {op!r} ({type(exc).__name__}); the node logged it: "
        "report it, and treat a write as of unknown outcome",
    )
