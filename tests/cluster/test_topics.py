"""The topic registry (cluster/node/topics.py): names, queue counts, topics.json on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from cluster.node.topics import (
    FORMAT_VERSION,
    InvalidTopicNameError,
    QueueCountError,
    Topic,
    TopicExistsError,
    TopicRegistry,
    TopicRegistryCorruptError,
    check_queue_count,
    check_topic_name,
)
from cluster.protocol import MAX_QUEUES
from storage.names import is_valid_topic_name


def test_topic_validation() -> None:
    assert check_topic_name("a.b_c-1") == "a.b_c-1"
    for bad in ("", ".", "..", "-x", "a/b", "x" * 128, 5):
        with pytest.raises(InvalidTopicNameError):
            check_topic_name(bad)
    assert check_queue_count(1024) == 1024
    for bad_count in (0, 1025, True, "3"):
        with pytest.raises(QueueCountError):
            check_queue_count(bad_count)


async def test_topic_registry_persists_atomically(tmp_path: Path) -> None:
    path = tmp_path / "topics.json"
    registry = await TopicRegistry.open(path)
    assert registry.list() == [] and not path.exists()
    made = await registry.create("b", 2)
    await registry.create("a", 1)
    assert registry.get("b") == made and made.created_us > 0
    with pytest.raises(TopicExistsError) as caught:
        await registry.create("b", 5)
    assert caught.value.topic.queues == 2
    with pytest.raises(InvalidTopicNameError):
        await registry.create("..", 1)
    with pytest.raises(QueueCountError):
        await registry.create("c", 0)
    assert [t.name for t in registry.list()] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topics.json"]  # no tmp left
    reopened = await TopicRegistry.open(path)
    assert reopened.list() == registry.list()


async def test_concurrent_creates_of_one_name_make_one_topic(tmp_path: Path) -> None:
    registry = await TopicRegistry.open(tmp_path / "topics.json")
    outcomes: list[str] = []

    async def create(queues: int) -> None:
        try:
            await registry.create("same", queues)
            outcomes.append("created")
        except TopicExistsError:
            outcomes.append("exists")

    async with trio.open_nursery() as nursery:
        for queues in (1, 2, 3):
            nursery.start_soon(create, queues)
    assert sorted(outcomes) == ["created", "exists", "exists"]


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"version": 2, "topics": []}',
        '{"version": 1, "topics": [{"name": "..", "queues": 1, "created_us": 0}]}',
        '{"version": 1, "topics": [{"name": "a"}]}',
        "[]",
    ],
)
async def test_a_corrupt_registry_refuses_to_start(tmp_path: Path, content: str) -> None:
    path = tmp_path / "topics.json"
    path.write_text(content)
    with pytest.raises(TopicRegistryCorruptError, match=r"topics\.json"):
        await TopicRegistry.open(path)


@given(st.text(max_size=300))
def test_the_registry_uses_the_one_topic_name_rule(name: str) -> None:
    if is_valid_topic_name(name):
        assert check_topic_name(name) == name
    else:
        with pytest.raises(InvalidTopicNameError, match="invalid topic name"):
            check_topic_name(name)


@given(st.integers(-5, MAX_QUEUES + 5))
def test_queue_counts_from_one_to_the_maximum(queues: int) -> None:
    if 1 <= queues <= MAX_QUEUES:
        assert check_queue_count(queues) == queues
    else:
        with pytest.raises(QueueCountError, match=f"1 to {MAX_QUEUES}"):
            check_queue_count(queues)


async def test_the_file_format(tmp_path: Path) -> None:
    path = tmp_path / "topics.json"
    registry = await TopicRegistry.open(path)
    made = await registry.create("orders", 4)
    document = json.loads(path.read_text())
    assert document == {
        "version": FORMAT_VERSION,
        "topics": [{"name": "orders", "queues": 4, "created_us": made.created_us}],
    }
    assert Topic("orders", 4, made.created_us).to_json() == document["topics"][0]
    assert len(registry) == 1


async def test_a_create_that_cannot_be_saved_changes_nothing(tmp_path: Path) -> None:
    """The topic becomes visible only once it is on disk: a failed write leaves none."""
    data_dir = tmp_path / "data"
    registry = await TopicRegistry.open(data_dir / "topics.json")
    data_dir.write_text("a file where the registry's directory should be")
    with pytest.raises(OSError):
        await registry.create("lost", 1)
    assert registry.get("lost") is None and len(registry) == 0


async def test_a_leftover_temporary_file_is_ignored_and_replaced(tmp_path: Path) -> None:
    """A crash between writing topics.json.tmp and the rename leaves the old registry."""
    path = tmp_path / "topics.json"
    first = await TopicRegistry.open(path)
    await first.create("kept", 1)
    (tmp_path / "topics.json.tmp").write_text("half a file")
    reopened = await TopicRegistry.open(path)
    assert [t.name for t in reopened.list()] == ["kept"]
    await reopened.create("next", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topics.json"]
    assert [t.name for t in (await TopicRegistry.open(path)).list()] == ["kept", "next"]
