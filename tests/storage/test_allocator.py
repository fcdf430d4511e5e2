"""The segment allocator: prepares the next segment ahead, hands each out once, and
never leaves a prepared segment behind (past the log's end a crash would see a gap)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from storage.allocator import SegmentAllocator
from storage.mapped_file import segment_name

SEGMENT = 64 * 1024


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_take_without_the_service_creates_at_once(tmp_path: Path) -> None:
    allocator = SegmentAllocator(tmp_path, SEGMENT, warm=False, ahead=True)
    segment = await allocator.take(0)
    try:
        assert segment.path.name == segment_name(0)
        assert segment.path.stat().st_size == SEGMENT
        assert allocator.created == 1
    finally:
        segment.close()


async def test_each_take_prepares_the_next_segment(tmp_path: Path) -> None:
    allocator = SegmentAllocator(tmp_path, SEGMENT, warm=True, ahead=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(allocator.run)
        first = await allocator.take(0)
        second = await allocator.take(SEGMENT)  # prepared by the first take
        assert [first.path.name, second.path.name] == [segment_name(0), segment_name(SEGMENT)]
        third = await allocator.take(2 * SEGMENT)
        nursery.cancel_scope.cancel()
    for segment in (first, second, third):
        segment.close()
    # the one prepared after the third take was never used: removed when the service ended
    assert _names(tmp_path) == [segment_name(n * SEGMENT) for n in range(3)]


async def test_drop_prepared_deletes_what_lies_past_the_log(tmp_path: Path) -> None:
    allocator = SegmentAllocator(tmp_path, SEGMENT, warm=False, ahead=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(allocator.run)
        allocator.prepare(SEGMENT)
        allocator.prepare(2 * SEGMENT)
        allocator.prepare(SEGMENT)  # idempotent
        taken = await allocator.take(SEGMENT)
        allocator.drop_prepared()  # a truncate: the prepared 2 x SEGMENT must go
        await allocator.wait_dropped()  # its creation may still be running in a thread
        assert _names(tmp_path) == [segment_name(SEGMENT)]
        again = await allocator.take(2 * SEGMENT)  # a fresh one after the drop
        assert again.path.exists()
        nursery.cancel_scope.cancel()
    taken.close()
    again.close()


async def test_a_failed_creation_reaches_the_taker(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    allocator = SegmentAllocator(missing, SEGMENT, warm=False, ahead=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(allocator.run)
        allocator.prepare(0)
        try:
            await allocator.take(0)
        except OSError as error:
            assert "gone" in str(error) or error.filename is not None
        else:
            raise AssertionError("a segment was handed out from a missing directory")
        nursery.cancel_scope.cancel()
