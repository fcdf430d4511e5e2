"""`tidelog bench storage`: append, flush and group-commit figures beside their floors.

Every figure is measured in the same run as its baseline (a raw copy into a map
for appends, the disk's own write+fdatasync for durable acks), so the ratios
mean something on a shared, noisy machine. Nothing here asserts a figure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from storage.config import MiB, StoreConfig
from storage.record import HEADER_SIZE, Message
from storage.store import MessageStore
from tools.bench.stats import percentile

TOPIC = "bench"
BATCH = 64
ProgressFn = Callable[[str], None]


def fsync_floor(directory: Path, samples: int) -> dict[str, float]:
    """The disk itself: write one page into a warm, zero-filled file and fdatasync it."""
    path = directory / "fsync-floor"
    size = samples * 4096
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, bytes(size), 0)
        os.fdatasync(fd)
        page = os.urandom(4096)
        latencies = []
        for i in range(samples):
            start = time.perf_counter()
            os.pwrite(fd, page, i * 4096)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    latencies.sort()
    return {
        "disk_fsync_p50_us": percentile(latencies, 0.50) * 1e6,
        "disk_fsync_p99_us": percentile(latencies, 0.99) * 1e6,
    }


def copy_floor(body_size: int, seconds: float) -> dict[str, float]:
    """Python's own ceiling: copy the record bytes into a mapped buffer, no header or CRC."""
    import mmap

    record = HEADER_SIZE + len(TOPIC) + body_size
    area = mmap.mmap(-1, 64 * MiB)
    view = memoryview(area)
    blob = os.urandom(record)
    count, pos, deadline = 0, 0, time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(10_000):
            if pos + record > len(area):
                pos = 0
            view[pos : pos + record] = blob
            pos += record
        count += 10_000
    elapsed = time.perf_counter() - start
    view.release()
    area.close()
    return {"records_per_s": count / elapsed, "mb_per_s": count * record / elapsed / 1e6}


async def _timed(seconds: float, step: Callable, per_step: int) -> float:
    """Run ``await step()`` until ``seconds`` pass; return operations per second."""
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(64):
            await step()
        count += 64 * per_step
    return count / (time.perf_counter() - start)


async def _writers(
    store: MessageStore, message: Message, writers: int, seconds: float, durable: bool
) -> tuple[float, list[float]]:
    """``writers`` tasks appending (and, if ``durable``, awaiting group commit) for ``seconds``."""
    latencies: list[float] = []
    count = 0
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            result = await store.put(message)
            if durable:
                if not await store.wait_durable(result.end_offset, 10.0):
                    raise RuntimeError("durable wait timed out during the benchmark")
                latencies.append(time.perf_counter() - start)
            else:
                await trio.lowlevel.checkpoint()
            count += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(writers):
            nursery.start_soon(writer)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return count / elapsed, latencies


async def quiet_disk(store: MessageStore) -> None:
    """Start a durable phase as the fsync floor was measured: nothing dirty, no writeback
    of earlier phases competing for the disk."""
    await store.flush_all()
    await trio.to_thread.run_sync(os.sync)


async def bench_body(
    directory: Path, body_size: int, seconds: float, progress: ProgressFn
) -> dict[str, float]:
    figures: dict[str, float] = {}
    tag = f"{body_size}B"
    body = os.urandom(body_size)
    message = Message(TOPIC, body, 0)
    batch = [Message(TOPIC, body, i % 4) for i in range(BATCH)]
    record = HEADER_SIZE + len(TOPIC) + body_size
    config = StoreConfig(data_dir=directory / f"log-{tag}")  # the default segments users get
    async with MessageStore.open(config) as store:
        progress(f"{tag}: single appends")
        figures[f"append_{tag}_records_per_s"] = await _timed(
            seconds, lambda: store.commit_log.append(message), 1
        )
        progress(f"{tag}: batched appends")
        rate = await _timed(seconds, lambda: store.commit_log.append_batch(batch), BATCH)
        figures[f"append_batch64_{tag}_records_per_s"] = rate
        figures[f"append_batch64_{tag}_mb_per_s"] = rate * record / 1e6
        await store.dispatcher.catch_up()  # index the direct appends outside the timing
        progress(f"{tag}: store put (append + index)")
        figures[f"put_{tag}_records_per_s"] = await _timed(seconds, lambda: store.put(message), 1)
        for writers in (1, 16, 64):
            progress(f"{tag}: {writers} writers, async flush")
            rate, _ = await _writers(store, message, writers, seconds, durable=False)
            figures[f"async_flush_{writers}w_{tag}_records_per_s"] = rate
            progress(f"{tag}: {writers} writers, group commit")
            await quiet_disk(store)
            rate, latencies = await _writers(store, message, writers, seconds, durable=True)
            figures[f"group_commit_{writers}w_{tag}_records_per_s"] = rate
            figures[f"group_commit_{writers}w_{tag}_p50_us"] = percentile(latencies, 0.5) * 1e6
            figures[f"group_commit_{writers}w_{tag}_p99_us"] = percentile(latencies, 0.99) * 1e6
    floor = copy_floor(body_size, seconds)
    figures[f"copy_floor_{tag}_records_per_s"] = floor["records_per_s"]
    figures[f"copy_floor_{tag}_mb_per_s"] = floor["mb_per_s"]
    return figures


async def bench_rollover(directory: Path, preallocate: bool, rolls: int) -> dict[str, float]:
    """Worst append latency (which is the loop stall) across ``rolls`` roll-overs."""
    segment = 16 * MiB
    config = StoreConfig(
        data_dir=directory / f"roll-{preallocate}", segment_size=segment, preallocate=preallocate
    )
    message = Message(TOPIC, os.urandom(1024), 0)
    per_segment = segment // (HEADER_SIZE + len(TOPIC) + 1024)
    worst: list[float] = []
    async with MessageStore.open(config) as store:
        for _ in range(rolls):
            slowest = 0.0
            for _ in range(per_segment):
                start = time.perf_counter()
                await store.commit_log.append(message)
                slowest = max(slowest, time.perf_counter() - start)
            worst.append(slowest)
            if preallocate:  # the allocator works while the app does other things
                await trio.sleep(0.2)
    worst.sort()
    key = "with_allocator" if preallocate else "without_allocator"
    return {
        f"rollover_{key}_max_stall_ms": worst[-1] * 1e3,
        f"rollover_{key}_median_stall_ms": percentile(worst, 0.5) * 1e3,
    }


def write_buffer_vs_direct(body_size: int, seconds: float) -> dict[str, float]:
    """RocketMQ's transient store pool, in Python terms: stage in a buffer, then copy to the
    map, against packing straight into the map (see docs/design.md for the decision)."""
    direct = copy_floor(body_size, seconds)["mb_per_s"]
    import mmap

    record = HEADER_SIZE + len(TOPIC) + body_size
    staging = bytearray(4 * MiB)
    stage = memoryview(staging)
    area = mmap.mmap(-1, 64 * MiB)
    target = memoryview(area)
    blob = os.urandom(record)
    per_flush = len(staging) // record
    moved, dst, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pos = 0
        for _ in range(per_flush):
            stage[pos : pos + record] = blob
            pos += record
        if dst + pos > len(area):
            dst = 0
        target[dst : dst + pos] = stage[:pos]
        dst += pos
        moved += pos
    elapsed = time.perf_counter() - start
    target.release()
    area.close()
    return {
        f"direct_map_{body_size}B_mb_per_s": direct,
        f"write_buffer_{body_size}B_mb_per_s": moved / elapsed / 1e6,
    }


async def run_storage_bench(
    directory: Path | None = None,
    *,
    seconds: float = 1.5,
    progress: ProgressFn = lambda _msg: None,
) -> dict[str, float]:
    """Every storage figure, in one run, on the disk that holds ``directory``."""
    root = Path(tempfile.mkdtemp(prefix="tidelog-bench-", dir=directory))
    try:
        progress("disk fsync floor")
        figures = await trio.to_thread.run_sync(fsync_floor, root, 500)
        for body_size in (128, 1024):
            figures.update(await bench_body(root, body_size, seconds, progress))
        for preallocate in (True, False):
            progress(f"roll-over stall, allocator={'on' if preallocate else 'off'}")
            figures.update(await bench_rollover(root, preallocate, rolls=4))
        progress("write buffer against direct map writes")
        figures.update(write_buffer_vs_direct(128, seconds))
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)
