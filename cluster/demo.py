"""`tidelog demo`: a real node, durable acks, SIGKILL mid-stream, a torn tail, recovery.

It shows the promise "acknowledged means kept" end to end, with real processes,
sockets and files: producers send with ``acks=durable`` while the node is killed
with SIGKILL; garbage is written where the next, unacknowledged records were;
the node restarts and a consumer reads everything back. Every acknowledged
message must be there, byte for byte, at the queue offset its ack reported.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import trio

from cluster.client import open_client
from cluster.process import NodeProcess
from storage.record import HEADER_SIZE

TOPIC = "demo"
QUEUES = 4
SEGMENT = 1 << 20
PRODUCERS = 16


def body_for(seq: int) -> bytes:
    """Message ``seq``: recognisable, of varying length, checkable after the crash."""
    rng = random.Random(seq)
    return f"msg-{seq:08d}|".encode() + rng.randbytes(rng.randrange(200))


async def produce_until_killed(node: NodeProcess, first_seq: int, acks_wanted: int) -> dict:
    """Send with durable acks from several tasks; SIGKILL the node once ``acks_wanted``
    acks are in. Returns seq -> (queue, queue offset, offset, record end) of each ack."""
    acked: dict[int, tuple[int, int, int, int]] = {}
    seqs = iter(range(first_seq, first_seq + 10 * acks_wanted))
    enough = trio.Event()
    async with open_client(node.address) as client:
        await client.admin.create_topic(TOPIC, QUEUES, exist_ok=True)
        producer = client.producer(acks="durable", retries=0)

        async def send_forever() -> None:
            for seq in seqs:
                body = body_for(seq)
                result = await producer.send(TOPIC, body, queue=seq % QUEUES)
                if result.outcome != "ok":
                    return  # the node is gone: unknown outcome, not counted
                end = result.offset + HEADER_SIZE + len(TOPIC) + len(body)
                acked[seq] = (result.queue, result.queue_offset, result.offset, end)
                if len(acked) >= acks_wanted:
                    enough.set()

        async with trio.open_nursery() as nursery:
            for _ in range(PRODUCERS):
                nursery.start_soon(send_forever)
            await enough.wait()
            node.kill()  # SIGKILL with sends in flight
    return acked


def tear_tail(data_dir: Path, acked_end: int) -> int:
    """Overwrite bytes past the last acknowledged record, like a torn write of records
    nobody acknowledged. Returns how many bytes were overwritten."""
    segment = data_dir / "store" / "commitlog" / f"{acked_end - acked_end % SEGMENT:020d}"
    room = SEGMENT - acked_end % SEGMENT
    if not segment.exists() or room <= 16:
        return 0
    garbage = os.urandom(min(512, room - 16))
    with open(segment, "r+b") as f:
        f.seek(acked_end % SEGMENT + 16)  # keep a length and magic, break the rest
        f.write(garbage)
    return len(garbage)


async def verify(node: NodeProcess, acked: dict[int, tuple[int, int, int, int]]) -> list[str]:
    """Read every queue back; return one line per acknowledged message that is not right."""
    expected = {(queue, queue_offset): seq for seq, (queue, queue_offset, _o, _e) in acked.items()}
    problems = []
    async with open_client(node.address) as client:
        for entry in await client.admin.offsets(TOPIC):
            queue, offset = entry["queue"], entry["min_offset"]
            stored = {}
            while offset < entry["max_offset"]:
                page = await client.checked(
                    "pull", topic=TOPIC, queue=queue, offset=offset, max_messages=1024
                )
                for message in page["messages"]:
                    stored[message["queue_offset"]] = message["body"]
                offset = page["next_offset"]
            for (q, queue_offset), seq in expected.items():
                if q == queue and stored.get(queue_offset) != body_for(seq):
                    problems.append(f"seq {seq} (queue {q}, offset {queue_offset}) lost or changed")
    return problems


async def run_rounds(root: Path, rounds: int, acks_per_round: int) -> int:
    data_dir = root / "node"
    segment_flag = ["--config", str(_config(root))]
    acked: dict[int, tuple[int, int, int, int]] = {}
    lost_total = 0
    for round_no in range(1, rounds + 1):
        node = NodeProcess(data_dir, extra_args=segment_flag).start()
        started = time.perf_counter()
        try:
            new = await produce_until_killed(
                node, first_seq=round_no * 1_000_000, acks_wanted=acks_per_round
            )
        finally:
            node.kill()
        acked.update(new)
        torn = tear_tail(data_dir, max(end for *_r, end in new.values()))
        node = NodeProcess(data_dir, extra_args=segment_flag).start()
        try:
            problems = await verify(node, acked)
        finally:
            exit_code = node.stop()
        lost_total += len(problems)
        print(
            f"round {round_no}: node SIGKILLed after {len(new)} durable acks "
            f"({time.perf_counter() - started:.2f}s), {torn} bytes torn past the last ack"
        )
        print(
            f"  restarted and read back: {len(acked)} acknowledged so far, "
            f"{len(problems)} lost; clean stop exit code {exit_code}"
        )
        for line in problems[:10]:
            print(f"  LOST {line}")
    verdict = "every acknowledged message survived" if not lost_total else f"{lost_total} LOST"
    print(f"\nverdict: {verdict} ({len(acked)} durable acks over {rounds} SIGKILLs)")
    return 0 if not lost_total else 1


def _config(root: Path) -> Path:
    """Small segments, so the demo crosses segment roll-overs in each round."""
    path = root / "node.toml"
    path.write_text(f"[store]\nsegment_size = {SEGMENT}\nmax_message_size = {SEGMENT // 2}\n")
    return path


def run_demo(directory: Path | None, rounds: int, acks_per_round: int) -> int:
    root = directory or Path(tempfile.mkdtemp(prefix="tidelog-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"tidelog demo: durable acks, SIGKILL, torn tail, recovery  (data: {root})\n")
    try:
        return trio.run(run_rounds, root, rounds, acks_per_round)
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)
