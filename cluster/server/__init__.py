"""The client server: frames in, requests served against the store, responses out.

One job per module, from the wire inwards:

- :mod:`~cluster.server.listener`: :class:`ClientServer` listens, enforces
  ``max_connections`` and runs the shutdown.
- :mod:`~cluster.server.connection`: :class:`Connection` is one client: a reader that
  decodes frames and serves most requests inline, a writer that coalesces every
  response ready into one ``send_all``, and tasks for the requests that wait (durable
  acks, long polls). Responses carry their request's id and may leave out of order.
- :mod:`~cluster.server.handler`: :class:`RequestHandler`, what each op does.
- :mod:`~cluster.server.routing`: :class:`QueueChooser` (where a message goes),
  :func:`build_message` and :func:`message_map` (the ``TAGS`` property).
- :mod:`~cluster.server.errors`: :func:`response_for_error`, every exception to a
  status in one place.
- :mod:`~cluster.server.polls` (long-poll deadlines), :mod:`~cluster.server.streams`
  (socket helpers), :mod:`~cluster.server.replies` (what a handler returns).

What a write waits for is the node's business: the handler holds an
:class:`~cluster.node.acks.AckPolicy` the node's role chose.
"""

from __future__ import annotations

from cluster.server.connection import Connection
from cluster.server.errors import RequestError, response_for_error
from cluster.server.handler import RequestHandler
from cluster.server.listener import ClientServer
from cluster.server.polls import Wakeups
from cluster.server.replies import Deferred, Reply
from cluster.server.routing import (
    TAGS_PROPERTY,
    QueueChooser,
    build_message,
    check_queue,
    message_map,
)

__all__ = [
    "TAGS_PROPERTY",
    "AckPolicy",
    "ClientServer",
    "Connection",
    "Deferred",
    "QueueChooser",
    "Reply",
    "RequestError",
    "RequestHandler",
    "Wakeups",
    "build_message",
    "check_queue",
    "message_map",
    "response_for_error",
]


def __getattr__(name: str) -> object:
    """``AckPolicy`` lives with the ack policies in :mod:`cluster.node.acks` (which
    imports this package's errors); it is still importable from here, resolved late."""
    if name == "AckPolicy":
        from cluster.node.acks import AckPolicy

        return AckPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
