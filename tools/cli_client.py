"""The client-side commands of `tidelog`: topic, produce, consume, status.

They print for people (tables, a progress line on long runs) or, with ``--json``,
one JSON document (``consume --json``: one object per line) for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import trio

from cluster.client import Client, SendResult, TidelogError, open_client


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _run(args: argparse.Namespace, command: Any) -> int:
    async def main() -> int:
        async with open_client(args.bootstrap) as client:
            return await command(client, args)

    try:
        return trio.run(main)
    except TidelogError as exc:
        print(f"tidelog: {exc}", file=sys.stderr)
        return 2


# ---- topic -------------------------------------------------------------------------------


async def _topic_create(client: Client, args: argparse.Namespace) -> int:
    queues = await client.admin.create_topic(args.name, args.queues, exist_ok=args.exist_ok)
    print(
        json.dumps({"topic": args.name, "queues": queues})
        if args.json
        else f"topic {args.name} has {queues} queues"
    )
    return 0


async def _topic_list(client: Client, args: argparse.Namespace) -> int:
    topics = await client.admin.list_topics()
    print(json.dumps(topics) if args.json else _table(topics, ["topic", "queues"]))
    return 0


async def _topic_describe(client: Client, args: argparse.Namespace) -> int:
    described = await client.admin.describe_topic(args.name)
    if args.json:
        described = {k: v for k, v in described.items() if k not in ("v", "id", "status")}
        print(json.dumps(described))
        return 0
    print(f"topic {described['topic']}: {described['queues']} queues")
    rows = [
        dict(entry, messages=entry["max_offset"] - entry["min_offset"])
        for entry in described["offsets"]
    ]
    print(_table(rows, ["queue", "min_offset", "max_offset", "messages"]))
    return 0


# ---- produce -----------------------------------------------------------------------------


def _bodies(args: argparse.Namespace) -> Iterator[bytes]:
    if args.generate is not None:
        payload = os.urandom(args.size)
        for i in range(args.generate):
            yield f"{i:012d}".encode() + payload[12:] if args.size >= 12 else payload
        return
    for line in sys.stdin.buffer:
        yield line.rstrip(b"\n")


class _Progress:
    """A one-line progress indicator on stderr, for terminals only."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total, self.enabled, self.last = total, enabled, 0.0
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        if self.total:
            filled = int(30 * done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            sys.stderr.write(f"\r[{bar}] {done}/{self.total} {rate:,.0f} msg/s")
        else:
            sys.stderr.write(f"\r{done} sent, {rate:,.0f} msg/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")


async def _produce(client: Client, args: argparse.Namespace) -> int:
    producer = client.producer(acks=args.acks, linger_ms=args.linger_ms, timeout_ms=args.timeout_ms)
    counts = {"ok": 0, "failed": 0, "unknown": 0}
    errors: dict[str, int] = {}
    progress = _Progress(args.generate, sys.stderr.isatty() and not args.json)
    limiter = trio.Semaphore(args.in_flight)
    start = time.perf_counter()

    async def one(body: bytes) -> None:
        try:
            result: SendResult = await producer.send(args.topic, body, key=args.key)
        finally:
            limiter.release()
        counts[result.outcome] += 1
        if not result.ok:
            reason = f"{result.status or 'no answer'}: {result.error}"
            errors[reason] = errors.get(reason, 0) + 1
        progress.update(sum(counts.values()))

    async with trio.open_nursery() as nursery:
        for body in _bodies(args):
            await limiter.acquire()
            nursery.start_soon(one, body)
    progress.close()
    elapsed = time.perf_counter() - start
    summary = dict(
        counts,
        seconds=round(elapsed, 3),
        msgs_per_s=round(sum(counts.values()) / max(elapsed, 1e-9)),
        errors=errors,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"sent {sum(counts.values())} messages to {args.topic} (acks={args.acks}) in "
            f"{elapsed:.2f}s: {counts['ok']} ok, {counts['failed']} failed, "
            f"{counts['unknown']} unknown outcome"
        )
        for reason, n in errors.items():
            print(f"  {n} x {reason}")
    return 0 if counts["ok"] == sum(counts.values()) else 1


# ---- consume -----------------------------------------------------------------------------


async def _consume(client: Client, args: argparse.Namespace) -> int:
    queues = [args.queue] if args.queue is not None else None
    if args.start in ("earliest", "latest"):
        start: Any = args.start
    else:
        described = await client.admin.describe_topic(args.topic)
        chosen = queues or range(described["queues"])
        start = dict.fromkeys(chosen, int(args.start))
    ends: dict[int, int] = {}
    if not args.follow:
        for entry in await client.admin.offsets(args.topic, args.queue):
            ends[entry["queue"]] = entry["max_offset"]
    seen = 0
    async with client.consumer(args.topic, queues=queues, start=start, wait_ms=args.wait_ms) as c:
        if not args.follow and all(c.positions[q] >= ends.get(q, 0) for q in c.positions):
            return 0
        async for message in c:
            seen += 1
            if args.json:
                print(
                    json.dumps(
                        {
                            "queue": message.queue,
                            "queue_offset": message.queue_offset,
                            "offset": message.offset,
                            "store_us": message.store_us,
                            "tags": message.tags,
                            "props": dict(message.props),
                            "body": message.body.decode("utf-8", "replace"),
                        }
                    )
                )
            else:
                print(message.body.decode("utf-8", "replace"))
            if (args.count and seen >= args.count) or (
                not args.follow and all(c.positions[q] >= ends.get(q, 0) for q in c.positions)
            ):
                break
    return 0


# ---- status ------------------------------------------------------------------------------


async def _status(client: Client, args: argparse.Namespace) -> int:
    status = await client.admin.status()
    status = {k: v for k, v in status.items() if k not in ("v", "id", "status")}
    if args.json:
        print(json.dumps(status, default=str))
        return 0
    width = max(len(k) for k in _flatten(status))
    for key, value in _flatten(status).items():
        print(f"{key:<{width}}  {value}")
    return 0


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---- parser ------------------------------------------------------------------------------


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bootstrap",
        "-b",
        default=os.environ.get("TIDELOG_BOOTSTRAP", "127.0.0.1:7600"),
        help="node address host:port (env TIDELOG_BOOTSTRAP; default 127.0.0.1:7600)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    topic = commands.add_parser("topic", help="create, list and describe topics")
    topic_commands = topic.add_subparsers(dest="topic_command", required=True, metavar="ACTION")
    create = topic_commands.add_parser("create", parents=[common], help="create a topic")
    create.add_argument("name")
    create.add_argument("--queues", type=int, default=4, help="number of queues (default 4)")
    create.add_argument("--exist-ok", action="store_true", help="succeed if it already exists")
    create.set_defaults(handler=lambda a: _run(a, _topic_create))
    listing = topic_commands.add_parser("list", parents=[common], help="list topics")
    listing.set_defaults(handler=lambda a: _run(a, _topic_list))
    describe = topic_commands.add_parser(
        "describe", parents=[common], help="queues and offsets of a topic"
    )
    describe.add_argument("name")
    describe.set_defaults(handler=lambda a: _run(a, _topic_describe))

    produce = commands.add_parser(
        "produce",
        parents=[common],
        help="send messages from stdin lines or a generated load",
        description="Send one message per stdin line, or --generate N messages of --size bytes. "
        "Exit status 0 only if every message was acknowledged at --acks.",
    )
    produce.add_argument("topic")
    produce.add_argument(
        "--acks",
        choices=["leader", "durable", "replicated"],
        default="durable",
        help="leader: in the master's memory; durable: fsynced (default); "
        "replicated: on the in-sync slaves too",
    )
    produce.add_argument("--key", help="route every message by this key (same key, same queue)")
    produce.add_argument("--generate", type=int, metavar="N", help="send N generated messages")
    produce.add_argument("--size", type=int, default=128, help="body size for --generate")
    produce.add_argument("--in-flight", type=int, default=256, help="messages in flight at once")
    produce.add_argument("--linger-ms", type=float, default=0.0, help="batching delay")
    produce.add_argument("--timeout-ms", type=int, default=5000, help="ack timeout per message")
    produce.set_defaults(handler=lambda a: _run(a, _produce))

    consume = commands.add_parser(
        "consume",
        parents=[common],
        help="print messages of a topic",
        description="Print message bodies (or JSON lines with --json) from a starting offset; "
        "stops once caught up unless --follow.",
    )
    consume.add_argument("topic")
    consume.add_argument("--queue", type=int, help="only this queue (default: all)")
    consume.add_argument(
        "--from",
        dest="start",
        default="earliest",
        help="earliest (default), latest, or a queue offset",
    )
    consume.add_argument("--follow", "-f", action="store_true", help="keep waiting for more")
    consume.add_argument("--count", type=int, default=0, help="stop after N messages")
    consume.add_argument("--wait-ms", type=int, default=1000, help="long-poll wait per pull")
    consume.set_defaults(handler=lambda a: _run(a, _consume))

    status = commands.add_parser("status", parents=[common], help="role, offsets, flush state")
    status.set_defaults(handler=lambda a: _run(a, _status))
