"""The error a decoder or request builder reports for a frame it cannot serve."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.protocol.responses import error_response
from cluster.protocol.statuses import Status

__all__ = ["ProtocolError"]


class ProtocolError(Exception):
    """A frame the peer sent cannot be served as it is.

    ``fatal`` means the byte stream can no longer be parsed (only an oversized
    length prefix does that): send :meth:`response` and close the connection.
    A non-fatal error concerns one frame whose boundary is known: answer it and
    keep reading. ``req_id`` is 0 when the frame's id could not be read.
    """

    def __init__(
        self,
        status: Status,
        message: str,
        *,
        req_id: int = 0,
        fatal: bool = False,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.req_id = req_id
        self.fatal = fatal
        self.field = field
        """The envelope or op field at fault (e.g. ``"messages[3].body"``), if one is."""
        self.details: dict[str, Any] = dict(details) if details else {}
        """Extra response fields, e.g. ``supported`` for ``UNSUPPORTED_VERSION``."""

    def response(self) -> dict[str, Any]:
        """The error response to send back for this frame."""
        return error_response(self.req_id, self.status, self.message, **self.details)

    def __repr__(self) -> str:
        return (
            f"ProtocolError({self.status.value}, {self.message!r}, req_id={self.req_id}, "
            f"fatal={self.fatal}, field={self.field!r})"
        )
