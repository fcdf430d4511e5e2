"""Storage errors: each names what went wrong and what the operator or caller can do.

They form one hierarchy so that the node can map them onto wire statuses in one
place, and so that callers can tell *bad input* (nothing was written, fix the
request) from *storage failure* (the node must stop taking writes).
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by ``storage``."""


class InvalidMessageError(StorageError):
    """The message was rejected before anything was written."""


class InvalidTopicError(InvalidMessageError):
    """A topic name breaks the naming rules."""


class MessageTooLargeError(InvalidMessageError):
    """A record would exceed ``max_message_size``."""


class CorruptSegmentError(StorageError):
    """A segment file on disk is not what the log expects (wrong size, bad name, bad bytes)."""


class SegmentMissingError(CorruptSegmentError):
    """A segment file the log needs was deleted, replaced or cut short outside the store."""


class OffsetOutOfRangeError(StorageError):
    """An offset that is not (or no longer) in the log or queue."""


class DiskFullError(StorageError):
    """No room for the next segment; reads still work, writes resume once space is freed."""


class StorageFailedError(StorageError):
    """An fsync or write failed; the store takes no more writes until it is restarted.

    After a failed fsync the kernel may have dropped the dirty pages and cleared
    the error ("fsyncgate"), so retrying would falsely report success. The only
    honest answer is to refuse writes until an operator restarts the node, which
    recovers from what is really on disk.
    """
