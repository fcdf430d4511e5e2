"""`tidelog demo`: durable acks surviving SIGKILL, then replicated acks surviving the
loss of the master (a real cluster of processes, a failover by promote and repoint),
then the same with no operator: etcd, an elected master, an automatic failover.

It shows the promise "acknowledged means kept" end to end, with real processes,
sockets and files: producers send with ``acks=durable`` while the node is killed
with SIGKILL; garbage is written where the next, unacknowledged records were;
the node restarts and a consumer reads everything back. Every acknowledged
message must be there, byte for byte, at the queue offset its ack reported.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from cluster.client import open_client
from cluster.client.consumer import consumed_messages
from cluster.protocol import RECORDS_FORMAT
from storage.record import HEADER_SIZE
from tools.launcher import LocalCluster
from tools.process import NodeProcess, node_status, wait_until

TOPIC = "demo"
QUEUES = 4
SEGMENT = 1 << 20
PRODUCERS = 16
LEADER_ONLY = 12
LEADER_ONLY_BYTES = 64 * 1024
"""12 x 64 KiB at acks=leader while the slaves are stopped: more than their sockets take in."""


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
                assert result.queue is not None and result.queue_offset is not None
                assert result.offset is not None  # an ok answer carries every offset
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
                    "pull",
                    topic=TOPIC,
                    queue=queue,
                    offset=offset,
                    max_messages=1024,
                    format=RECORDS_FORMAT,
                )
                for message in consumed_messages(TOPIC, queue, page):  # CRC-checked here
                    stored[message.queue_offset] = message.body
                offset = page["next_offset"]
            for (q, queue_offset), seq in expected.items():
                if q == queue and stored.get(queue_offset) != body_for(seq):
                    problems.append(f"seq {seq} (queue {q}, offset {queue_offset}) lost or changed")
    return problems


async def run_rounds(root: Path, rounds: int, acks_per_round: int) -> int:
    root.mkdir(parents=True, exist_ok=True)
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


def in_sync(address: str, slaves: int) -> Callable[[], Awaitable[bool]]:
    """A check for :func:`wait_until`: the master at ``address`` has ``slaves`` in sync."""

    async def check() -> bool:
        return len((await node_status(address))["replication"]["in_sync"]) == slaves

    return check


async def read_all(address: str, topic: str = TOPIC) -> dict[tuple[int, int], bytes]:
    """Every readable message of ``topic`` on one node: (queue, queue offset) -> body."""
    stored: dict[tuple[int, int], bytes] = {}
    async with open_client(address, failover_timeout=0.0) as client:  # this node only
        for entry in await client.admin.offsets(topic):
            offset = entry["min_offset"]
            while offset < entry["max_offset"]:
                page = await client.checked(
                    "pull",
                    topic=topic,
                    queue=entry["queue"],
                    offset=offset,
                    max_messages=1024,
                    format=RECORDS_FORMAT,
                )
                for message in consumed_messages(topic, entry["queue"], page):  # CRC-checked
                    stored[(entry["queue"], message.queue_offset)] = message.body
                if page["next_offset"] == offset:
                    break  # nothing readable past the confirm offset yet
                offset = page["next_offset"]
    return stored


async def replicated_failover(root: Path, acks_wanted: int) -> int:
    """A master and two slaves (a static group: node-1 the master); replicated acks;
    SIGKILL the master; promote a slave; every replicated ack must be on the new master
    and on the other slave."""
    cluster = LocalCluster(
        root, replicas=3, coordination="static", node_args=("--config", str(_config(root)))
    )
    try:
        await trio.to_thread.run_sync(cluster.start)
        master, first, second = (cluster.nodes[name] for name in cluster.names)
        await wait_until("both slaves in sync", in_sync(master.address, 2))
        acked: dict[tuple[int, int], bytes] = {}
        enough = trio.Event()
        async with open_client(master.address) as client:
            await client.admin.create_topic(TOPIC, QUEUES, exist_ok=True)
            producer = client.producer(acks="replicated", retries=0)
            seqs = iter(range(10 * acks_wanted))

            async def send_forever() -> None:
                for seq in seqs:
                    result = await producer.send(TOPIC, body_for(seq), queue=seq % QUEUES)
                    if result.outcome != "ok":
                        return
                    assert result.queue is not None and result.queue_offset is not None
                    acked[(result.queue, result.queue_offset)] = body_for(seq)
                    if len(acked) >= acks_wanted:
                        enough.set()

            async with trio.open_nursery() as nursery:
                for _ in range(PRODUCERS):
                    nursery.start_soon(send_forever)
                await enough.wait()
                master.kill()  # the master is lost with replicated sends in flight
        print(f"  {len(acked)} messages acknowledged at acks=replicated; master SIGKILLed")
        async with open_client(first.address) as client:
            promoted = await client.checked("promote", ha_port=0)
        async with open_client(second.address) as client:
            await client.checked(
                "repoint", master_ha=promoted["ha_address"], master_client=first.address
            )
        print(f"  {first.name} promoted (epoch {promoted['epoch']}); {second.name} now follows it")
        await wait_until("slave-2 in sync with the new master", in_sync(first.address, 1))
        async with open_client(first.address) as client:
            more = await client.producer(acks="replicated").send(TOPIC, b"after failover")
        print(f"  a write after the failover: {more.outcome} (acks=replicated)")
        after = 1 if more.ok else 0
        lost = 0
        for node in (first, second):
            stored = await read_all(node.address)
            missing = [key for key, body in acked.items() if stored.get(key) != body]
            lost += len(missing)
            unacked = len(stored) - (len(acked) - len(missing)) - after
            print(
                f"  {node.name}: {len(stored)} messages readable = "
                f"{len(acked) - len(missing)} acknowledged + {after} written after the "
                f"failover + {unacked} in flight when the master died (stored, never "
                f"acknowledged); {len(missing)} acknowledged ones missing"
            )
        return 0 if not lost and more.ok else 1
    finally:
        cluster.stop(kill=True)


async def automatic_failover(root: Path, acks_wanted: int) -> int:
    """etcd and three nodes electing their master; producers at acks=replicated; the
    master SIGKILLed with no operator in the loop: a new master is elected, the producers
    carry on through the client's rediscovery, every ack is checked on the survivors,
    and the old master comes back as a slave with its divergent tail cut."""
    config = str(_config(root))
    cluster = LocalCluster(root / "auto", replicas=3, node_args=("--config", config))
    timings: list[tuple[str, float]] = []
    started = time.perf_counter()
    try:
        await trio.to_thread.run_sync(cluster.start)
        first = await cluster.wait_for_master()
        timings.append(("etcd and 3 nodes up, a master elected", time.perf_counter() - started))
        print(f"  etcd and 3 nodes started; {first} elected master with no operator")
        acked: dict[tuple[int, int], bytes] = {}
        outcomes = {"ok": 0, "unknown": 0, "failed": 0}
        killed_at: list[float] = []
        first_ack_after: list[float] = []
        enough, done = trio.Event(), trio.Event()
        old_address = ""  # the killed master's address, once killed
        async with open_client(cluster.addresses) as client:
            await client.admin.create_topic(TOPIC, QUEUES, exist_ok=True)
            producer = client.producer(acks="replicated", retries=100, retry_backoff_ms=10)
            seqs = iter(range(10 * acks_wanted))

            async def send_forever() -> None:
                for seq in seqs:
                    result = await producer.send(TOPIC, body_for(seq), queue=seq % QUEUES)
                    outcomes[result.outcome] += 1
                    if not result.ok:
                        continue  # in flight at the kill: unknown, never counted as acked
                    assert result.queue is not None and result.queue_offset is not None
                    acked[(result.queue, result.queue_offset)] = body_for(seq)
                    if killed_at and not first_ack_after and client.master != old_address:
                        first_ack_after.append(time.perf_counter())
                    if len(acked) >= acks_wanted:
                        enough.set()
                    if len(acked) >= 2 * acks_wanted:
                        done.set()
                        return

            async with trio.open_nursery() as nursery:
                for _ in range(PRODUCERS):
                    nursery.start_soon(send_forever)
                await enough.wait()
                tail = await _divergent_tail(cluster, first)
                old_address = cluster.address(first)
                killed_at.append(time.perf_counter())
                cluster.kill(first)  # SIGKILL with replicated sends in flight
                for name in cluster.names:
                    if name != first:
                        cluster.resume(name)
                print(
                    f"  {len(acked)} acks at acks=replicated; the slaves paused while the master "
                    f"took {tail} bytes at acks=leader (more than a stopped slave's socket "
                    f"holds: part is on the master alone); master {first} SIGKILLed"
                )
                second = await cluster.wait_for_master(other_than=first)
                timings.append(("kill -> new master elected", time.perf_counter() - killed_at[0]))
                await done.wait()
                nursery.cancel_scope.cancel()
            new_master = cluster.address(second)
            followed = client.master == new_master
        timings.append(("kill -> first replicated ack", first_ack_after[0] - killed_at[0]))
        print(
            f"  {second} elected (no operator); the producers found it on their own "
            f"({'yes' if followed else 'NO'}) and went on: {outcomes['ok']} ok, "
            f"{outcomes['unknown']} unknown (in flight at the kill), {outcomes['failed']} failed"
        )
        lost = 0
        survivors = [name for name in cluster.names if name != first]
        for name in survivors:
            missing = await missing_acks(cluster.address(name), acked)
            lost += len(missing)
            print(f"  {name}: every one of {len(acked)} acks checked, {len(missing)} missing")
        restarted = time.perf_counter()
        await trio.to_thread.run_sync(cluster.restart, first)

        async def back_as_slave() -> bool:
            old, new = await cluster.view(first), await cluster.view(second)
            return old.role == "slave" and old.log_end is not None and old.log_end == new.log_end

        await wait_until(f"{first} back as a slave, caught up", back_as_slave, timeout=30)
        timings.append(("restart -> old master a caught-up slave", time.perf_counter() - restarted))
        old_status = (await cluster.view(first)).status or {}
        cut = (old_status.get("replication") or {}).get("last_truncation")
        missing = await missing_acks(cluster.address(first), acked)
        lost += len(missing)
        cut_text = (
            f"its divergent tail cut (log end {cut[0]} -> {cut[1]}, {cut[0] - cut[1]} bytes)"
            if cut
            else "nothing to cut"
        )
        print(
            f"  {first} restarted: a slave of {second} (epoch {old_status.get('epoch')}), "
            f"{cut_text}; {len(missing)} acks missing on it"
        )
        print("  time each step took:")
        for step, seconds in timings:
            print(f"    {step:<42} {seconds:6.2f} s")
        return 0 if not lost and followed else 1
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def _divergent_tail(cluster: LocalCluster, master: str) -> int:
    """SIGSTOP every slave, then send messages at acks=leader (appended on the master
    alone, a level that promises nothing across its loss): the tail the old master will
    have to cut when it comes back. Returns how many bytes the master appended.

    A stopped slave's kernel still takes what the master sends into its socket, and the
    slave applies it once resumed; so the tail is larger than its receive window (which
    stays at its initial size while nothing reads it), and part of it surely stays on
    the old master alone."""
    for name in cluster.names:
        if name != master:
            cluster.pause(name)
    address = cluster.address(master)
    before = (await cluster.view(master)).log_end or 0
    async with open_client(address, failover_timeout=0.0) as client:
        producer = client.producer(acks="leader", retries=0)
        for seq in range(LEADER_ONLY):
            body = (b"leader-only %d " % seq).ljust(LEADER_ONLY_BYTES, b"x")
            await producer.send(TOPIC, body, queue=seq % QUEUES)
    return ((await cluster.view(master)).log_end or 0) - before


async def missing_acks(
    address: str, acked: dict[tuple[int, int], bytes], topic: str = TOPIC
) -> list[tuple[int, int]]:
    """The acks not readable on the node at ``address``, once its confirm offset covers
    them (a slave serves reads up to it; waited for, bounded)."""
    missing: list[tuple[int, int]] = []

    async def all_there() -> bool:
        stored = await read_all(address, topic)
        missing[:] = [key for key, body in acked.items() if stored.get(key) != body]
        return not missing

    with contextlib.suppress(TimeoutError):
        await wait_until(f"every ack readable on {address}", all_there, timeout=30)
    return missing


def _config(root: Path) -> Path:
    """Small segments, so the demo crosses segment roll-overs in each round."""
    path = root / "node.toml"
    path.write_text(f"[store]\nsegment_size = {SEGMENT}\nmax_message_size = {SEGMENT // 2}\n")
    return path


NEXT_STEPS = """
where the data went: {where}
try next (README, "Running a node"; `tidelog COMMAND --help` for every option):
  tidelog node --data-dir /tmp/tidelog-node --port 7600      # in a second terminal
  tidelog topic create orders --queues 4
  printf 'one\\ntwo\\n' | tidelog produce orders --acks durable
  tidelog consume orders --meta
  tidelog status
or a cluster that fails over on its own (README, "A local cluster"):
  tidelog cluster up                                          # in a second terminal
(run from the repository: .venv/bin/tidelog, or `source .venv/bin/activate` first)"""


def run_demo(directory: Path | None, rounds: int, acks_per_round: int) -> int:
    root = directory or Path(tempfile.mkdtemp(prefix="tidelog-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"tidelog demo  (data: {root})\n")
    print("part 1: one node; durable acks, SIGKILL, torn tail, recovery\n")
    try:
        single = trio.run(run_rounds, root / "single", rounds, acks_per_round)
        print("\npart 2: a master and two slaves; replicated acks, the master lost, failover\n")
        (root / "cluster").mkdir(parents=True, exist_ok=True)
        cluster = trio.run(replicated_failover, root / "cluster", acks_per_round)
        verdict = "every replicated ack survived the loss of the master"
        print(f"\nverdict: {verdict if not cluster else 'REPLICATED ACKS LOST'}")
        print(
            "\npart 3: automatic failover on etcd; replicated acks, the master SIGKILLed, "
            "no operator\n"
        )
        (root / "failover").mkdir(parents=True, exist_ok=True)
        automatic = trio.run(automatic_failover, root / "failover", acks_per_round)
        verdict = "a new master was elected and every replicated ack survived"
        print(f"\nverdict: {verdict if not automatic else 'FAILOVER FAILED OR ACKS LOST'}")
        return single or cluster or automatic
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)
            where = f"{root}, a temporary directory, now removed (keep it: --dir DIR)"
        else:
            where = (
                f"{root} (single/: part 1's node; cluster/: part 2's master node-1 and "
                "slaves node-2, node-3; failover/auto/: part 3's etcd and node-1..3; "
                "each node with its log)"
            )
        print(NEXT_STEPS.format(where=where))
