"""Deleting a topic from a shared log: its queues go, its records stay until retention and
are never indexed again (a restart, a rebuild of every queue, a slave's replicated copy),
and a topic of the same name made after it starts at queue offset 0."""

from __future__ import annotations

import shutil
from pathlib import Path

from storage import Message, MessageStore
from tests.storage.test_raw_append import config_at


def bodies(store: MessageStore, topic: str, queue: int) -> list[bytes]:
    low, _high = store.queue_offsets(topic, queue)
    page = store.get_messages(topic, queue, low, max_messages=1000, max_bytes=1 << 30)
    found = [bytes(record.body) for _offset, record in page.records]
    for _offset, record in page.records:
        record.release()
    return found


async def write(store: MessageStore, topic: str, names: list[str], queues: int = 2) -> list[int]:
    offsets = []
    for index, name in enumerate(names):
        result = await store.put(Message.create(topic, name.encode(), index % queues))
        offsets.append(result.offset)
    return offsets


async def delete_and_recreate(store: MessageStore) -> tuple[int, list[int]]:
    old = await write(store, "gone", [f"old{i}" for i in range(40)])
    await write(store, "kept", [f"k{i}" for i in range(10)])
    marker = await store.delete_topic("gone")
    await write(store, "gone", ["new0", "new1", "new2"])
    await write(store, "kept", ["k10"])
    return marker.offset, old


def assert_after_deletion(store: MessageStore) -> None:
    assert store.queue_offsets("gone", 0) == (0, 2) and store.queue_offsets("gone", 1) == (0, 1)
    assert bodies(store, "gone", 0) == [b"new0", b"new2"]
    assert bodies(store, "gone", 1) == [b"new1"]
    assert bodies(store, "kept", 0) == [b"k0", b"k2", b"k4", b"k6", b"k8", b"k10"]
    assert len(bodies(store, "kept", 1)) == 5


async def test_deleted_queues_go_and_a_new_topic_of_the_name_starts_at_zero(
    tmp_path: Path,
) -> None:
    async with MessageStore.open(config_at(tmp_path)) as store:
        marker, old = await delete_and_recreate(store)
        assert_after_deletion(store)
        record = store.read(old[-1])  # the records stay in the log until retention
        assert bytes(record.body) == b"old39"
        record.release()
        assert marker > old[-1]


async def test_a_restart_and_a_rebuild_of_every_queue_never_index_them_again(
    tmp_path: Path,
) -> None:
    config = config_at(tmp_path)
    async with MessageStore.open(config) as store:
        await delete_and_recreate(store)
    async with MessageStore.open(config) as store:
        assert_after_deletion(store)
        await write(store, "gone", ["new3"])
        assert bodies(store, "gone", 0) == [b"new0", b"new2", b"new3"]
    shutil.rmtree(config.consume_queue_dir)  # every queue rebuilt from the log
    async with MessageStore.open(config) as store:
        assert store.recovery.queues_rebuilt
        assert bodies(store, "gone", 0) == [b"new0", b"new2", b"new3"]
        assert bodies(store, "gone", 1) == [b"new1"]


async def test_a_crash_before_the_queues_were_flushed_replays_the_deletion(
    tmp_path: Path,
) -> None:
    config = config_at(tmp_path)
    async with MessageStore.open(config) as store:
        await store.flush_all()  # the checkpoint: queues flushed before the deletion
        await delete_and_recreate(store)
        await store.commit_log.flush()  # the log is on disk, the queues' checkpoint is not
        store.abandon()
    async with MessageStore.open(config) as store:
        assert not store.recovery.clean_shutdown
        assert_after_deletion(store)


async def test_a_slave_copy_of_the_log_drops_the_topic_at_the_same_place(
    tmp_path: Path,
) -> None:
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await delete_and_recreate(master)
        await master.commit_log.flush()
        async with MessageStore.open(config_at(tmp_path / "slave")) as slave:
            for segment in master.commit_log.files.segments:
                data = bytes(segment.view[: segment.wrote])
                await slave.append_replicated(segment.base, data)
            assert slave.max_offset == master.max_offset
            assert_after_deletion(slave)
            # Promoted, it numbers the topic's next records where the master would.
            assert slave.commit_log.next_queue_offsets == master.commit_log.next_queue_offsets
