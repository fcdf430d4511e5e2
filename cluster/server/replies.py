"""What a request handler gives back: an answer now, or a wait that answers later."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

__all__ = ["Deferred", "Reply"]

Reply: TypeAlias = dict[str, Any]
"""A response map, ready to encode (``id``, ``status`` and the op's fields)."""
Deferred: TypeAlias = Callable[[], Awaitable[Reply]]
"""A request that must wait (durable ack, long poll): the connection runs it in a task."""
