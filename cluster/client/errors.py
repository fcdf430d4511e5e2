"""What the client raises: an error status from the node, or no answer at all."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cluster.protocol import Status

__all__ = [
    "ConnectFailedError",
    "ConnectionLostError",
    "NotSentError",
    "RequestTimeoutError",
    "TidelogError",
    "lone_error_as_itself",
]


class TidelogError(Exception):
    """A request the node answered with an error status (or could not be sent at all)."""

    def __init__(
        self, status: Status | None, message: str, response: Mapping[str, Any] | None = None
    ):
        super().__init__(f"{status.value if status else 'NO_ANSWER'}: {message}")
        self.status = status
        self.message = message
        self.response = dict(response or {})


class ConnectionLostError(TidelogError):
    """The connection closed with the request in flight: its outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class NotSentError(ConnectionLostError):
    """The request never left this client (its connection was closed before the request
    was queued), so nothing was applied: the outcome is known (failed) and it may be resent.

    A subclass of :class:`ConnectionLostError` so that code catching "no answer" still
    catches it; code that cares (the producer, retries of reads) tells them apart.
    """


class ConnectFailedError(NotSentError):
    """No connection could be made, so nothing was sent: the outcome is known (failed)."""


class RequestTimeoutError(TidelogError):
    """No answer in time: the request's outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


@contextmanager
def lone_error_as_itself() -> Iterator[None]:
    """A nursery around a caller's block (:func:`open_client`, a consumer) wraps what it raises in an
    ``ExceptionGroup``; a single error should reach the caller's ``except`` as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        flat = group
        while len(flat.exceptions) == 1 and isinstance(flat.exceptions[0], BaseExceptionGroup):
            flat = flat.exceptions[0]
        if len(flat.exceptions) != 1:
            raise
        raise flat.exceptions[0] from group
