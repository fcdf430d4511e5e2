"""The topic-name rule: one rule for the store, the wire protocol and the topic registry.

A topic names a directory under ``consumequeue/``, so the rule keeps names portable and
safe as path components: ASCII letters, digits, ``.``, ``_`` and ``-``, starting with a
letter or a digit (so ``.``, ``..`` and option-like ``-x`` are impossible).
"""

from __future__ import annotations

import re
from typing import Final

from storage.errors import InvalidTopicError

__all__ = [
    "INTERNAL_TOPIC_PREFIX",
    "MAX_TOPIC_LENGTH",
    "TOPIC_RULE",
    "is_internal_topic_name",
    "is_valid_topic_name",
    "validate_topic",
]

MAX_TOPIC_LENGTH: Final = 127
TOPIC_RULE: Final = (
    f"1 to {MAX_TOPIC_LENGTH} characters from A-Z a-z 0-9 . _ - starting with a letter or digit"
)
_TOPIC_NAME: Final = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_TOPIC_LENGTH - 1}}}")


def is_valid_topic_name(name: object) -> bool:
    """True when ``name`` is a text string that follows :data:`TOPIC_RULE`."""
    return type(name) is str and _TOPIC_NAME.fullmatch(name) is not None


INTERNAL_TOPIC_PREFIX: Final = "__"
"""Topics the node itself writes (consumer-group offsets): ``__`` then a valid name. The
store takes them; clients cannot name them (the rule above starts with a letter or digit)."""


def is_internal_topic_name(name: object) -> bool:
    """True for the node's own topics: :data:`INTERNAL_TOPIC_PREFIX` then a valid name."""
    return (
        type(name) is str
        and name.startswith(INTERNAL_TOPIC_PREFIX)
        and is_valid_topic_name(name[len(INTERNAL_TOPIC_PREFIX) :])
    )


def validate_topic(topic: str) -> bytes:
    """The topic's ASCII bytes, or :class:`InvalidTopicError` naming the rule it breaks."""
    if topic in (".", ".."):
        raise InvalidTopicError(
            f"invalid topic name {topic!r}: '.' and '..' are reserved "
            "(a topic names its consume-queue directory)"
        )
    if not is_valid_topic_name(topic) and not is_internal_topic_name(topic):
        raise InvalidTopicError(f"invalid topic name {topic!r}: use {TOPIC_RULE}")
    return topic.encode("ascii")
