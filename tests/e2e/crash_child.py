"""A writer process for tests/test_crash.py: appends with durable acks until it is killed.

Run as ``python tests/crash_child.py DATA_DIR SEGMENT_SIZE FIRST_SEQ [WRITERS]``. It prints
``READY <log end>`` once the store is open, then several writer tasks append messages
(single ``put`` and ``put_batch``), wait for group commit, and only then print one line
per message, ``ACK <seq> <offset> <queue_offset>``. A printed line is a promise: the
record is on disk. Everything about message ``seq`` (topic, queue, body, properties)
follows from ``seq`` alone (:func:`message_for`), so the parent can check every record
of the log without being told more.

``python tests/crash_child.py --cut DATA_DIR SEGMENT_SIZE truncate|restart OFFSET STEP``
instead cuts the log and kills itself at a step of the cut (:func:`cut_and_die`).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import trio

from storage import Message, MessageStore, StoreConfig

TOPICS = ("crash.a", "crash.b", "crash-c")
QUEUES = 3
DURABLE_TIMEOUT = 30.0


def message_for(seq: int) -> Message:
    """Message number ``seq``: its body starts with the number and has a random-length tail."""
    rng = random.Random(seq)
    topic = rng.choice(TOPICS)
    queue_id = rng.randrange(QUEUES)
    body = f"seq={seq};".encode() + rng.randbytes(rng.choice((0, 10, rng.randrange(3000))))
    properties = {"seq": str(seq)} if rng.random() < 0.5 else None
    tags = rng.choice((None, "red", "blue"))
    return Message.create(topic, body, queue_id, tags=tags, properties=properties)


def config_for(data_dir: Path, segment_size: int) -> StoreConfig:
    """The child's and the checker's store settings (the segment size must agree)."""
    return StoreConfig(
        data_dir=data_dir,
        segment_size=segment_size,
        max_message_size=min(16 * 1024, segment_size // 2),
        consume_queue_entries=8,  # queue files roll over often: kills land in between too
        flush_interval_ms=20,
        flush_thorough_interval_ms=100,
        retention_check_interval_ms=3_600_000,
        disk_max_used_ratio=1.0,
    )


async def writer(store: MessageStore, seqs: Iterator[int], rng: random.Random) -> None:
    out = sys.stdout
    while True:
        batch = [next(seqs) for _ in range(rng.choice((1, 1, 1, 2, 5, 12)))]
        if len(batch) == 1 and rng.random() < 0.8:
            result = await store.put(message_for(batch[0]))
            offsets, queue_offsets = [result.offset], [result.queue_offset]
            end = result.end_offset
        else:
            batch_result = await store.put_batch([message_for(seq) for seq in batch])
            offsets, queue_offsets, end = (
                batch_result.offsets,
                batch_result.queue_offsets,
                batch_result.end_offset,
            )
        if not await store.wait_durable(end, DURABLE_TIMEOUT):
            continue  # not known to be durable: never acknowledged
        out.write(
            "".join(
                f"ACK {seq} {offset} {queue_offset}\n"
                for seq, offset, queue_offset in zip(batch, offsets, queue_offsets, strict=True)
            )
        )
        out.flush()


async def main(data_dir: Path, segment_size: int, first_seq: int, writers: int) -> None:
    async with MessageStore.open(config_for(data_dir, segment_size)) as store:
        print(f"READY {store.commit_log.max_offset}", flush=True)
        seqs = itertools.count(first_seq)
        async with trio.open_nursery() as nursery:
            for index in range(writers):
                nursery.start_soon(writer, store, seqs, random.Random(first_seq + index))


async def cut_and_die(data_dir: Path, segment_size: int, kind: str, offset: int, step: str) -> None:
    """Truncate the log at (or restart it at) ``offset`` and SIGKILL this process when the
    cut reaches ``step``: how tests/e2e/test_crash.py proves every step crash-safe."""

    def die_at(reached: str) -> None:
        if reached == step:
            os.kill(os.getpid(), signal.SIGKILL)

    async with MessageStore.open(config_for(data_dir, segment_size)) as store:
        store.after_cut_step = die_at
        if kind == "truncate":
            await store.truncate(offset)
        else:
            await store.restart_log_at(offset)
    print("CUT_DONE", flush=True)  # the step was never reached: the parent fails on this


if __name__ == "__main__":
    if sys.argv[1] == "--cut":
        data_dir, segment_size, kind, offset, step = sys.argv[2:]
        trio.run(cut_and_die, Path(data_dir), int(segment_size), kind, int(offset), step)
        sys.exit(0)
    data_dir, segment_size, first_seq, *rest = sys.argv[1:]
    trio.run(main, Path(data_dir), int(segment_size), int(first_seq), int(rest[0]) if rest else 6)
