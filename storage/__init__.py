"""tidelog's storage engine: an mmap CommitLog with consume queues, flush services and recovery.

It knows nothing of sockets. Start with :class:`storage.store.MessageStore`.
"""

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
