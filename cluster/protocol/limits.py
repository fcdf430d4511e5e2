"""Every size, count and time limit of the wire protocol, and the defaults of optional fields.

docs/protocol.md quotes these numbers; keep the two in step.
"""

from __future__ import annotations

import struct
from typing import Final

from storage.names import MAX_TOPIC_LENGTH

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_TIMEOUT_MS",
    "DEFAULT_WAIT_MS",
    "HEADER",
    "LOWEST_VERSION",
    "MAX_BATCH_MESSAGES",
    "MAX_DEPTH",
    "MAX_FRAME_ITEMS",
    "MAX_FRAME_SIZE_LIMIT",
    "MAX_OFFSET",
    "MAX_PRODUCER_ID",
    "MAX_PULL_BYTES",
    "MAX_PULL_MESSAGES",
    "MAX_QUEUES",
    "MAX_REQUEST_ID",
    "MAX_TIMEOUT_MS",
    "MAX_TOPIC_LENGTH",
    "MAX_WAIT_MS",
    "MIN_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
]

PROTOCOL_VERSION: Final = 2
"""The version this module speaks; every CBOR frame carries it as ``v``. Version 2 is
version 1 plus compact sends (docs/protocol.md section 1): every CBOR field means the same."""
SUPPORTED_VERSIONS: Final = (1, PROTOCOL_VERSION)
"""Versions a server accepts, and answers in; an ``UNSUPPORTED_VERSION`` answer lists them."""
LOWEST_VERSION: Final = SUPPORTED_VERSIONS[0]
"""The version of answers to frames whose own version could not be read or is not spoken:
every client reads it."""

HEADER: Final = struct.Struct(">I")
"""The length prefix: body size in bytes, big-endian, not counting the prefix itself."""
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
MIN_MAX_FRAME_SIZE: Final = 1024
MAX_FRAME_SIZE_LIMIT: Final = 0xFFFF_FFFF
MAX_REQUEST_ID: Final = 2**64 - 1
MAX_OFFSET: Final = 2**63 - 1
MAX_PRODUCER_ID: Final = 2**63 - 1
"""Idempotent producer ids run from 1 to this (``init_producer`` hands them out)."""
MAX_PRODUCER_EPOCH: Final = 2**31 - 1
"""A producer's epochs run from 0 to this (one more each time it starts again with its id)."""
MAX_QUEUES: Final = 1024
"""Queues per topic; queue ids run from 0 to ``MAX_QUEUES - 1``."""
MAX_BATCH_MESSAGES: Final = 4096
MAX_PULL_MESSAGES: Final = 1024
MAX_PULL_BYTES: Final = 8 * 1024 * 1024
"""Half the default frame limit: a full answer fits even with one message over ``max_bytes``."""
MAX_TIMEOUT_MS: Final = 600_000
MAX_WAIT_MS: Final = 60_000

MAX_FRAME_ITEMS: Final = 131_072
"""CBOR data items in one request frame (each container, map key and value, array element).

Decoding costs per item: this bounds the time one frame holds the server's event loop.
A full batch (4096 messages with every field and 10 properties each) holds 126,989."""
MAX_DEPTH: Final = 16
"""CBOR nesting levels in a frame: requests nest four deep (envelope, messages, message,
props); the rest is headroom."""

DEFAULT_TIMEOUT_MS: Final = 5000
DEFAULT_MAX_MESSAGES: Final = 32
DEFAULT_MAX_BYTES: Final = 1024 * 1024
DEFAULT_WAIT_MS: Final = 0
