"""The request log: one ``key=value`` line per request a node served, for operators.

Off by default and free then: a connection asks once, when it opens, whether the
``cluster.server.request_log`` logger is enabled for DEBUG, and only then wraps its
handler in :class:`LoggedHandler`; a connection of a node without it never formats,
times or measures anything. ``tidelog node --request-log`` (or ``--log-level debug``)
turns it on, for connections opened from then on.

A line: ``request peer=127.0.0.1:53412 op=send topic=orders status=OK bytes=96
duration_us=412``. ``bytes`` is the size of the answer's frame (0 when the request
raised: the connection builds that answer), ``duration_us`` runs from the handler
taking the request to its answer being ready (a long poll's wait included). Frames
that fail to decode never reach a handler and are not logged here.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from cluster.protocol import MAX_FRAME_SIZE_LIMIT, Request, encode_frame
from cluster.server.errors import status_of
from cluster.server.polls import Wakeups
from cluster.server.replies import Deferred, Reply

if TYPE_CHECKING:
    from cluster.server.handler import RequestHandler

__all__ = ["REQUEST_LOGGER", "LoggedHandler", "enable_request_log", "logged"]

REQUEST_LOGGER: Final = "cluster.server.request_log"
log = logging.getLogger(REQUEST_LOGGER)


def enable_request_log() -> None:
    """Log every request from now on, whatever the root level (``--request-log``)."""
    log.setLevel(logging.DEBUG)


def logged(handler: RequestHandler, peer: str) -> RequestHandler | LoggedHandler:
    """``handler`` itself while the request log is off, else it wrapped to log each
    request of the connection from ``peer`` (asked once per connection)."""
    if not log.isEnabledFor(logging.DEBUG):
        return handler
    return LoggedHandler(handler, peer)


class LoggedHandler:
    """A connection's handler that logs each request it serves, then answers as the
    wrapped one does (same answers, same exceptions). Owned by one connection."""

    def __init__(self, handler: RequestHandler, peer: str) -> None:
        self._handler = handler
        self._peer = peer

    async def handle(self, request: Request, polls: Wakeups) -> Reply | Deferred:
        started_ns = time.perf_counter_ns()
        try:
            outcome = await self._handler.handle(request, polls)
        except Exception as exc:
            self._line(request, status_of(exc).value, 0, started_ns)
            raise
        if isinstance(outcome, dict):
            self._answered(request, outcome, started_ns)
            return outcome

        async def answered_later() -> Reply:
            try:
                response = await outcome()
            except Exception as exc:
                self._line(request, status_of(exc).value, 0, started_ns)
                raise
            self._answered(request, response, started_ns)
            return response

        return answered_later

    def _answered(self, request: Request, response: Reply, started_ns: int) -> None:
        try:
            size = len(encode_frame(response, max_frame_size=MAX_FRAME_SIZE_LIMIT))
        except Exception:  # the connection answers that itself; the log must not fail
            size = 0
        self._line(request, str(response.get("status", "?")), size, started_ns)

    def _line(self, request: Request, status: str, size: int, started_ns: int) -> None:
        log.debug(
            "request peer=%s op=%s topic=%s status=%s bytes=%d duration_us=%d",
            self._peer,
            request["op"],
            request.get("topic", "-"),
            status,
            size,
            (time.perf_counter_ns() - started_ns) // 1000,
        )
