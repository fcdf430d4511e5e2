"""The node: the server side of tidelog.

- :mod:`~cluster.node.lifecycle`: :class:`Node` (start and stop in order, the role's
  I/O: promote, repoint) and :func:`serve_until_signalled`.
- :mod:`~cluster.node.role`: the role as a value, with pure transitions.
- :mod:`~cluster.node.acks`: the ack policies.
- :mod:`~cluster.node.handler`: the request handler with the role gate and admin ops.
- :mod:`~cluster.node.status`: the ``status`` answer, typed.
- :mod:`~cluster.node.topics` and :mod:`~cluster.node.topic_sync`: the topic registry,
  and a slave's copy of its master's.
- :mod:`~cluster.node.config`: the node's configuration.

The names below are resolved on first use, not at import: the client server imports
this package's config and topics, and the node imports the server, so an eager import
here would make ``import cluster.server`` circular.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from cluster.node.acks import StandaloneAcks
    from cluster.node.handler import NodeRequestHandler
    from cluster.node.lifecycle import Node, serve_until_signalled
    from replication.slave import SlaveReplication
    from replication.state import begin_term

__all__ = [
    "Node",
    "NodeRequestHandler",
    "SlaveReplication",
    "StandaloneAcks",
    "begin_term",
    "serve_until_signalled",
]

_HOMES: Final = {
    "Node": "cluster.node.lifecycle",
    "serve_until_signalled": "cluster.node.lifecycle",
    "NodeRequestHandler": "cluster.node.handler",
    "StandaloneAcks": "cluster.node.acks",
    "SlaveReplication": "replication.slave",
    "begin_term": "replication.state",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(home), name)
