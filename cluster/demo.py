"""`tidelog demo`: append with durable acks, SIGKILL the writer, tear its tail, recover.

It shows the storage promise end to end with a real process and real files:
every record acknowledged as durable before the kill is there after recovery,
at the same offset, byte for byte; the torn, unacknowledged tail is cut.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from cluster.demo_writer import QUEUES, TOPIC, body_for
from storage import MessageStore, StoreConfig

SEGMENT = 1 << 20


def run_writer_until(
    data_dir: Path, acks_wanted: int, first_seq: int
) -> tuple[dict[int, tuple], int]:
    """Start the writer, collect ``acks_wanted`` acks, SIGKILL it.

    Returns seq -> (offset, queue id, queue offset) and the end of the last acked record."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.demo_writer",
            str(data_dir),
            "--segment-size",
            str(SEGMENT),
            "--first-seq",
            str(first_seq),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    acks: dict[int, tuple] = {}
    acked_end = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("ACK"):
                _, seq, offset, queue_id, queue_offset, end = line.split()
                acks[int(seq)] = (int(offset), int(queue_id), int(queue_offset))
                acked_end = max(acked_end, int(end))
                if len(acks) >= acks_wanted:
                    break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    return acks, acked_end


def tear_tail(data_dir: Path, after: int) -> int:
    """Write garbage past ``after`` (the end of the last acknowledged record), like a torn
    write of records that were never acknowledged."""
    segment_dir = data_dir / "commitlog"
    base = after - after % SEGMENT
    path = segment_dir / f"{base:020d}"
    pos = after - base
    garbage = os.urandom(min(512, SEGMENT - pos))
    with open(path, "r+b") as f:
        f.seek(pos + 16)  # keep the next record's length and magic, break the rest
        f.write(garbage[: max(0, min(len(garbage), SEGMENT - pos - 16))])
    return len(garbage)


async def verify(data_dir: Path, acks: dict[int, tuple]) -> dict[str, object]:
    config = StoreConfig(data_dir=data_dir, segment_size=SEGMENT, max_message_size=SEGMENT // 2)
    async with MessageStore.open(config) as store:
        report = store.recovery
        lost = []
        for seq, (offset, queue_id, queue_offset) in acks.items():
            try:
                record = store.read(offset)
            except Exception as exc:  # reported below as a lost acknowledged record
                lost.append((seq, str(exc)))
                continue
            if bytes(record.body) != body_for(seq) or (record.queue_id, record.queue_offset) != (
                queue_id,
                queue_offset,
            ):
                lost.append((seq, "different record at its offset"))
        total = sum(
            store.queue_offsets(TOPIC, q)[1] - store.queue_offsets(TOPIC, q)[0]
            for q in range(QUEUES)
        )
        return {
            "acknowledged before the kill": len(acks),
            "records after recovery": total,
            "acknowledged but lost": len(lost),
            "recovery: clean shutdown": report.clean_shutdown,
            "recovery: log end": report.log_end,
            "recovery: stop reason": report.stop_reason,
            "recovery: records checked": report.records_checked,
            "recovery: seconds": round(report.seconds, 3),
            "_lost": lost,
        }


def run_demo(directory: Path | None, rounds: int, acks_per_round: int) -> int:
    root = directory or Path(tempfile.mkdtemp(prefix="tidelog-demo-"))
    data_dir = root / "node"
    print(f"tidelog demo: durable appends, SIGKILL, torn tail, recovery  (data: {data_dir})\n")
    all_acks: dict[int, tuple] = {}
    failures = 0
    try:
        for round_no in range(1, rounds + 1):
            started = time.perf_counter()
            acks, acked_end = run_writer_until(
                data_dir, acks_per_round, first_seq=len(all_acks) * 10
            )
            all_acks.update(acks)
            torn = tear_tail(data_dir, acked_end)
            result = trio.run(verify, data_dir, all_acks)
            lost = result.pop("_lost")
            failures += len(lost)
            print(
                f"round {round_no}: writer killed with SIGKILL after "
                f"{time.perf_counter() - started:.2f}s; {torn} bytes of garbage written past "
                "the last acknowledged record"
            )
            width = max(len(k) for k in result)
            for key, value in result.items():
                print(f"  {key:<{width}}  {value}")
            for seq, why in lost[:10]:
                print(f"  LOST seq={seq}: {why}")
            print()
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)
    verdict = "every acknowledged record survived" if not failures else f"{failures} LOST"
    print(f"verdict: {verdict} ({len(all_acks)} acknowledged over {rounds} crashes)")
    return 0 if not failures else 1
