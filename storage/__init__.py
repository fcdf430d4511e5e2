"""tidelog's storage engine: an mmap CommitLog with consume queues, flush services and recovery.

It knows nothing of sockets. Start with :class:`storage.store.MessageStore`.

The names below are loaded on first use (module ``__getattr__``), not when the package is:
the client library imports the pure ``storage.names`` and ``storage.backoff``, and importing
a submodule runs this file first, which must not drag in the engine and its event loop
(``trio``). ``from storage import X`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from storage.commit_log import AppendResult, BatchAppendResult, CommitLog
    from storage.config import StoreConfig
    from storage.errors import (
        CorruptSegmentError,
        DiskFullError,
        InvalidMessageError,
        InvalidTopicError,
        MessageTooLargeError,
        OffsetOutOfRangeError,
        StorageError,
        StorageFailedError,
    )
    from storage.lock import DataDirLockedError
    from storage.record import Message, StoredRecord
    from storage.store import GetResult, MessageStore

_HOMES: Final = {
    "AppendResult": "storage.commit_log",
    "BatchAppendResult": "storage.commit_log",
    "CommitLog": "storage.commit_log",
    "CorruptSegmentError": "storage.errors",
    "DataDirLockedError": "storage.lock",
    "DiskFullError": "storage.errors",
    "GetResult": "storage.store",
    "InvalidMessageError": "storage.errors",
    "InvalidTopicError": "storage.errors",
    "Message": "storage.record",
    "MessageStore": "storage.store",
    "MessageTooLargeError": "storage.errors",
    "OffsetOutOfRangeError": "storage.errors",
    "StorageError": "storage.errors",
    "StorageFailedError": "storage.errors",
    "StoreConfig": "storage.config",
    "StoredRecord": "storage.record",
}
"""Each public name and the module it lives in."""

__all__ = [
    "AppendResult",
    "BatchAppendResult",
    "CommitLog",
    "CorruptSegmentError",
    "DataDirLockedError",
    "DiskFullError",
    "GetResult",
    "InvalidMessageError",
    "InvalidTopicError",
    "Message",
    "MessageStore",
    "MessageTooLargeError",
    "OffsetOutOfRangeError",
    "StorageError",
    "StorageFailedError",
    "StoreConfig",
    "StoredRecord",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use, then keep it on the package."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
