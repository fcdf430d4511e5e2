"""The data-dir lock: a second opener is refused before it touches anything."""

from __future__ import annotations

import os
import re

import pytest

from storage import DataDirLockedError, Message, MessageStore, StoreConfig
from storage.lock import lock_data_dir


def listing(config: StoreConfig) -> dict[str, int]:
    """Every file under the data dir with its size."""
    return {
        str(path.relative_to(config.data_dir)): path.stat().st_size
        for path in sorted(config.data_dir.rglob("*"))
        if path.is_file() and path.suffix != ".tmp"
    }


async def test_a_second_open_of_the_same_dir_is_refused_and_the_first_keeps_working(
    store_config: StoreConfig,
) -> None:
    async with MessageStore.open(store_config) as store:
        for i in range(50):
            await store.put(Message.create("t", b"x" * 3000, i % 2))
        await store.flush_all()
        before = listing(store_config)
        expected = (
            f"data dir {store_config.data_dir} is in use by another process (pid {os.getpid()})"
        )
        with pytest.raises(DataDirLockedError, match=re.escape(expected)):
            async with MessageStore.open(store_config):
                raise AssertionError("opened a locked data dir")
        after = listing(store_config)  # the allocator may have added a segment since
        assert {k: v for k, v in after.items() if k in before} == before  # nothing deleted
        result = await store.put(Message.create("t", b"after", 0))
        assert await store.wait_durable(result.end_offset, 30)
    async with MessageStore.open(store_config) as store:  # released on close
        assert bytes(store.read(result.offset).body) == b"after"


def test_the_lock_is_released_and_can_be_taken_again(store_config: StoreConfig) -> None:
    first = lock_data_dir(store_config.data_dir)
    with pytest.raises(DataDirLockedError):
        lock_data_dir(store_config.data_dir)
    first.release()
    assert not first.held
    again = lock_data_dir(store_config.data_dir)
    assert (store_config.data_dir / "lock").read_text() == f"{os.getpid()}\n"
    again.release()
