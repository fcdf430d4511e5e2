"""A writer process for the crash demo and crash tests: appends with durable acks.

Run as ``python -m cluster.demo_writer DATA_DIR [--segment-size N] [--writers W]``.
Each writer task appends a message (single or small batch), waits for group
commit, and only then prints ``ACK <seq> <offset> <queue_id> <queue_offset> <end>``
per message. Whatever is printed was acknowledged as durable, so a parent that
kills this process with SIGKILL can check that recovery kept all of it.
"""

from __future__ import annotations

import argparse
import random
import sys

import trio

from storage import Message, MessageStore, StoreConfig

TOPIC = "demo"
QUEUES = 4


def body_for(seq: int) -> bytes:
    """The body of message ``seq``: recognisable, of varying length, checkable later."""
    rng = random.Random(seq)
    return f"msg-{seq:08d}|".encode() + bytes(rng.randrange(256) for _ in range(rng.randrange(200)))


async def writer(store: MessageStore, seqs: iter, rng: random.Random) -> None:
    out = sys.stdout
    while True:
        batch = [next(seqs) for _ in range(rng.choice((1, 1, 1, 4)))]
        messages = [Message(TOPIC, body_for(seq), seq % QUEUES) for seq in batch]
        if len(messages) == 1:
            result = await store.put(messages[0])
            offsets, queue_offsets = [result.offset], [result.queue_offset]
            end = result.end_offset
        else:
            batch_result = await store.put_batch(messages)
            offsets, queue_offsets = batch_result.offsets, batch_result.queue_offsets
            end = batch_result.end_offset
        if not await store.wait_durable(end, 30.0):
            continue  # outcome unknown: not reported as acknowledged
        ends = [*offsets[1:], end]
        for seq, offset, queue_offset, record_end in zip(
            batch, offsets, queue_offsets, ends, strict=True
        ):
            out.write(f"ACK {seq} {offset} {seq % QUEUES} {queue_offset} {record_end}\n")
        out.flush()


async def run(args: argparse.Namespace) -> None:
    config = StoreConfig(
        data_dir=args.data_dir,
        segment_size=args.segment_size,
        max_message_size=min(4 << 20, args.segment_size // 2),
    )
    async with MessageStore.open(config) as store:
        start = store.commit_log.max_offset  # distinct sequence numbers across restarts
        seqs = iter(range(args.first_seq, 1 << 62))
        print(f"READY {start}", flush=True)
        async with trio.open_nursery() as nursery:
            for index in range(args.writers):
                nursery.start_soon(writer, store, seqs, random.Random(index))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--segment-size", type=int, default=1 << 20)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--first-seq", type=int, default=0)
    trio.run(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
