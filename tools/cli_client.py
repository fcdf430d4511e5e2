"""The client-side commands of `tidelog`: topic, produce, consume, status.

They print for people (tables, a progress line on long runs) or, with ``--json``,
one JSON document (``consume --json``: one object per line) for machines.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import ssl
import sys
import time
from collections.abc import Iterator
from typing import Any

import trio

from cluster.client import Client, ConsumedMessage, SendResult, TidelogError, open_client
from cluster.client.consumer import consumed_messages
from cluster.client.tls import client_tls
from cluster.protocol import RECORDS_FORMAT, CorruptRecordError, Status
from cluster.protocol.address import parse_address
from storage.names import TOPIC_RULE
from tools.cli_group import add_group_commands, add_group_options, consume_in_group
from tools.cli_times import time_argument


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


DEFAULT_BOOTSTRAP = "127.0.0.1:7600"


def address_argument(value: str) -> str:
    """``-b``/``--bootstrap``: ``host:port``, or several comma-separated (any node of a
    cluster will do; the client finds the master), checked before anything connects."""
    try:
        for part in value.split(",") if "," in value else [value]:
            parse_address(part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def bootstrap_addresses(value: str | None) -> list[str]:
    """The addresses of a ``--bootstrap`` value (None: ``TIDELOG_BOOTSTRAP`` or the default)."""
    value = value or os.environ.get("TIDELOG_BOOTSTRAP") or DEFAULT_BOOTSTRAP
    return [part.strip() for part in value.split(",") if part.strip()]


def start_argument(value: str) -> str | int:
    """``consume --from``: ``earliest``, ``latest`` or a queue offset (0 or more)."""
    if value in ("earliest", "latest"):
        return value
    if value.isascii() and value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(
        f"{value!r} is not earliest, latest or a queue offset (a whole number, 0 or more)"
    )


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds


def client_error_text(exc: TidelogError, args: argparse.Namespace) -> str:
    """One paragraph: the node's status and words, and the command that helps."""
    text = f"{exc.status.value}: {exc.message}" if exc.status else exc.message
    topic = getattr(args, "topic", None) or getattr(args, "name", None)
    if exc.status is Status.UNKNOWN_TOPIC and topic:
        text += _create_hint(text, topic, args)
    return text


def _create_hint(text: str, topic: str, args: argparse.Namespace) -> str:
    """The command that creates a missing topic, unless the node's words already name it."""
    if "tidelog topic create" in text:
        return ""
    return f"; to create it: tidelog topic create {topic} -b {args.bootstrap}"


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's TLS context from ``--tls-ca`` (and ``--tls-cert``/``--tls-key``)."""
    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise ValueError("--tls-cert and --tls-key need --tls-ca (the CA of the nodes)")
        return None
    return client_tls(args.tls_ca, args.tls_cert or "", args.tls_key or "")


def _run(args: argparse.Namespace, command: Any) -> int:
    try:
        tls = _tls_context(args)
    except ValueError as exc:
        print(f"tidelog: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        async with open_client(bootstrap_addresses(args.bootstrap), tls=tls) as client:
            result: int = await command(client, args)
            return result

    try:
        return trio.run(main)
    except TidelogError as exc:
        print(f"tidelog: {client_error_text(exc, args)}", file=sys.stderr)
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


async def _topic_alter(client: Client, args: argparse.Namespace) -> int:
    queues = await client.admin.alter_topic(args.name, args.queues)
    print(
        json.dumps({"topic": args.name, "queues": queues})
        if args.json
        else f"topic {args.name} has {queues} queues"
    )
    return 0


async def _topic_delete(client: Client, args: argparse.Namespace) -> int:
    await client.admin.delete_topic(args.name)
    print(
        json.dumps({"topic": args.name, "deleted": True})
        if args.json
        else f"topic {args.name} deleted"
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


class InputLineError(ValueError):
    """A ``produce --jsonl`` line that is not a message object: refused, nothing sent."""


JSONL_FIELDS = frozenset({"body", "body_base64", "key", "queue", "tags", "props"})
JSONL_IGNORED = frozenset({"queue_offset", "offset", "store_us"})
"""Where ``consume --json`` found a message: accepted and ignored, so its output can be
produced again as it is."""


def message_from_json_line(line: bytes, number: int) -> dict[str, Any]:
    """One ``--jsonl`` line -> the keyword arguments of ``Producer.send`` (body first).

    ``{"body": "text"}`` or ``{"body_base64": "..."}`` (binary), plus optional ``key``,
    ``queue``, ``tags`` and ``props`` (string to string): what ``consume --json`` prints.
    """
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise InputLineError(f"line {number}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputLineError(f"line {number}: a JSON object is needed, got {type(obj).__name__}")
    unknown = sorted(set(obj) - JSONL_FIELDS - JSONL_IGNORED)
    if unknown:
        raise InputLineError(
            f"line {number}: unknown field(s) {', '.join(unknown)}; "
            f"use {', '.join(sorted(JSONL_FIELDS))}"
        )
    if ("body" in obj) == ("body_base64" in obj):
        raise InputLineError(f"line {number}: give exactly one of body, body_base64")
    if "body" in obj:
        if not isinstance(obj["body"], str):
            raise InputLineError(f"line {number}: body must be a string (binary: body_base64)")
        body = obj["body"].encode()
    else:
        try:
            body = base64.b64decode(obj["body_base64"], validate=True)
        except (binascii.Error, TypeError) as exc:
            raise InputLineError(f"line {number}: body_base64 is not base64 ({exc})") from None
    message: dict[str, Any] = {"body": body}
    for field in ("key", "queue", "tags", "props"):
        if obj.get(field) is not None:
            message[field] = obj[field]
    return message


def _messages(args: argparse.Namespace) -> Iterator[dict[str, Any] | InputLineError]:
    """What to send: a ``send`` keyword dict per message, or the error of a bad line."""
    if not args.jsonl:
        for body in _bodies(args):
            yield {"body": body}
        return
    for number, line in enumerate(sys.stdin.buffer, start=1):
        if not line.strip():
            continue
        try:
            yield message_from_json_line(line, number)
        except InputLineError as exc:
            yield exc


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
    if args.producer_id is not None and not args.idempotent:
        print("tidelog produce: --producer-id needs --idempotent", file=sys.stderr)
        return 2
    producer = client.producer(
        acks=args.acks,
        linger_ms=args.linger_ms,
        timeout_ms=args.timeout_ms,
        idempotent=args.idempotent,
        producer_id=args.producer_id,
    )
    counts = {"ok": 0, "failed": 0, "unknown": 0}
    errors: dict[str, int] = {}
    progress = _Progress(args.generate, sys.stderr.isatty() and not args.json)
    limiter = trio.Semaphore(args.in_flight)
    start = time.perf_counter()

    async def one(message: dict[str, Any]) -> None:
        try:
            message.setdefault("key", args.key)
            result: SendResult = await producer.send(args.topic, **message)
        except (TidelogError, TypeError, ValueError) as exc:  # refused before sending
            result = SendResult("failed", getattr(exc, "status", None), args.topic, error=str(exc))
        finally:
            limiter.release()
        counts[result.outcome] += 1
        if not result.ok:
            reason = f"{result.status}: {result.error}" if result.status else f"{result.error}"
            errors[reason] = errors.get(reason, 0) + 1
        progress.update(sum(counts.values()))

    async with trio.open_nursery() as nursery:
        for message in _messages(args):
            if isinstance(message, InputLineError):
                counts["failed"] += 1
                reason = f"bad input: {message}"
                errors[reason] = errors.get(reason, 0) + 1
                continue
            await limiter.acquire()
            nursery.start_soon(one, message)
    progress.close()
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = dict(
        counts,
        seconds=round(elapsed, 3),
        msgs_per_s=round(sum(counts.values()) / max(elapsed, 1e-9)),
        errors=errors,
    )
    if args.idempotent:
        summary.update(producer_id=producer.producer_id, producer_epoch=producer.producer_epoch)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{sum(counts.values())} messages for {args.topic} (acks={args.acks}) in "
            f"{elapsed:.2f}s: {counts['ok']} ok, {counts['failed']} failed, "
            f"{counts['unknown']} unknown outcome"
        )
        if args.idempotent and producer.producer_id is not None:
            print(
                f"idempotent producer {producer.producer_id}, epoch {producer.producer_epoch} "
                f"(to continue as it, fencing older copies: --producer-id {producer.producer_id})"
            )
        for reason, n in errors.items():
            print(f"  {n} x {reason}")
        if any(reason.startswith(Status.UNKNOWN_TOPIC.value) for reason in errors):
            print(f"  {_create_hint('', args.topic, args).lstrip('; ')}")
    return 0 if counts["ok"] == sum(counts.values()) else 1


# ---- consume -----------------------------------------------------------------------------


async def _consume(client: Client, args: argparse.Namespace) -> int:
    if args.group is not None:
        return await consume_in_group(client, args, _shown)
    described = await client.admin.describe_topic(args.topic)
    queues = [args.queue] if args.queue is not None else list(range(described["queues"]))
    bounds = {entry["queue"]: entry for entry in described["offsets"]}
    if args.from_time is not None:
        start: Any = await client.admin.offsets_for_time(args.topic, args.from_time, args.queue)
    elif isinstance(args.start, int):
        start = dict.fromkeys(queues, args.start)
    elif args.start == "latest":
        start = {queue: bounds.get(queue, {}).get("max_offset", 0) for queue in queues}
    else:
        start = {queue: bounds.get(queue, {}).get("min_offset", 0) for queue in queues}
    if args.follow:
        return await _follow(client, args, queues, start)
    seen = 0
    unconfirmed = 0
    for queue in queues:
        offset = start[queue]
        while not (args.count and seen >= args.count):
            page = await client.call(
                "pull",
                topic=args.topic,
                queue=queue,
                offset=offset,
                max_messages=1024,
                format=RECORDS_FORMAT,  # the stored bytes: decoded and CRC-checked here
            )
            if page["status"] is Status.OFFSET_OUT_OF_RANGE:  # as the library's consumer does
                print(
                    f"tidelog: queue {queue} holds offsets {page.get('min_offset')} to "
                    f"{page.get('max_offset')}, not {offset}: reading from "
                    f"{page.get('min_offset')}",
                    file=sys.stderr,
                )
                offset = page.get("min_offset", 0)
                continue
            if page["status"] is not Status.OK:
                raise TidelogError(page["status"], page.get("error", ""), page)
            try:
                messages = consumed_messages(args.topic, queue, page)
            except CorruptRecordError as exc:
                print(f"tidelog: {exc}", file=sys.stderr)
                return 2
            for message in messages:
                if args.tag is None or message.tags == args.tag:
                    seen += 1
                    print(_shown(message, args))
                    if args.count and seen >= args.count:
                        break
            if not messages:
                unconfirmed += max(0, page["max_offset"] - page["next_offset"])
                break
            offset = page["next_offset"]
    if unconfirmed and not (args.count and seen >= args.count):
        print(
            f"tidelog: {unconfirmed} more message(s) are stored but not readable yet: "
            "consumers read only up to the confirm offset, which waits for the in-sync "
            "slaves (see `tidelog status`, replication.in_sync)",
            file=sys.stderr,
        )
    return 0


async def _follow(
    client: Client, args: argparse.Namespace, queues: list[int], start: dict[int, int]
) -> int:
    """``--follow``: long polls on every queue until Ctrl-C (or ``--count``)."""
    seen = 0
    consumer = client.consumer(args.topic, queues=queues, start=start, wait_ms=args.wait_ms)
    async with consumer:
        async for message in consumer:
            if args.tag is None or message.tags == args.tag:
                seen += 1
                print(_shown(message, args), flush=True)
            if args.count and seen >= args.count:
                break
    return 0


def message_json(message: ConsumedMessage) -> dict[str, Any]:
    """A consumed message as JSON: ``body`` when it is UTF-8 text, else ``body_base64``
    (so binary bodies survive; ``produce --jsonl`` reads both back)."""
    shown: dict[str, Any] = {
        "queue": message.queue,
        "queue_offset": message.queue_offset,
        "offset": message.offset,
        "store_us": message.store_us,
        "tags": message.tags,
        "props": dict(message.props),
    }
    try:
        shown["body"] = message.body.decode("utf-8")
    except UnicodeDecodeError:
        shown["body_base64"] = base64.b64encode(message.body).decode("ascii")
    return shown


def _shown(message: ConsumedMessage, args: argparse.Namespace) -> str:
    if args.json:
        return json.dumps(message_json(message))
    body = message.body.decode("utf-8", "replace")
    if not args.meta:
        return body
    tags = f" tags={message.tags}" if message.tags else ""
    props = "".join(f" {k}={v}" for k, v in sorted(message.props.items()))
    return f"queue={message.queue} offset={message.queue_offset}{tags}{props}  {body}"


# ---- status ------------------------------------------------------------------------------


async def _watch(client: Client, args: argparse.Namespace) -> int:
    """``status --watch S``: one line every S seconds with the write rate, until Ctrl-C."""
    previous: tuple[float, int] | None = None
    while True:
        status = await client.admin.status()
        now = trio.current_time()
        log_end = int(status.get("max_offset", 0))
        rate = (log_end - previous[1]) / (now - previous[0]) if previous else 0.0
        previous = (now, log_end)
        replication = status.get("replication") or {}
        line = {
            "time": time.strftime("%H:%M:%S"),
            "role": status.get("role"),
            "log_end": log_end,
            "write_bytes_per_s": round(rate),
            "confirm_offset": replication.get("confirm_offset"),
            "replicated_offset": replication.get("replicated_offset"),
            "in_sync": len(replication.get("in_sync") or []),
            "connections": status.get("connections"),
        }
        if args.json:
            print(json.dumps(line), flush=True)
        else:
            print("  ".join(f"{k}={human_value(v)}" for k, v in line.items()), flush=True)
        await trio.sleep(args.watch)


async def _status(client: Client, args: argparse.Namespace) -> int:
    if args.watch:
        return await _watch(client, args)
    status = await client.admin.status()
    status = {k: v for k, v in status.items() if k not in ("v", "id", "status")}
    if args.json:
        print(json.dumps(status, default=str))
        return 0
    width = max(len(k) for k in _flatten(status))
    for key, value in _flatten(status).items():
        print(f"{key:<{width}}  {human_value(value)}")
    return 0


def human_value(value: Any) -> str:
    """A status value for people: no Python reprs (None, True, lists of dicts)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return "; ".join(human_value(item) for item in value) if value else "none"
    if isinstance(value, dict):
        name = value.get("name")
        rest = ", ".join(f"{k} {human_value(v)}" for k, v in value.items() if k != "name")
        return f"{name} ({rest})" if name is not None else rest
    return str(value)


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
        type=address_argument,
        default=os.environ.get("TIDELOG_BOOTSTRAP", DEFAULT_BOOTSTRAP),
        help="node address host:port, or several comma-separated: any node of a cluster "
        f"(env TIDELOG_BOOTSTRAP; default {DEFAULT_BOOTSTRAP})",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("TIDELOG_TLS_CA"),
        help="speak TLS, trusting this CA (PEM) for the nodes' certificates (env TIDELOG_TLS_CA)",
    )
    common.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("TIDELOG_TLS_CERT"),
        help="client certificate (PEM) for nodes that ask for one (env TIDELOG_TLS_CERT)",
    )
    common.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("TIDELOG_TLS_KEY"),
        help="the client certificate's key (PEM) (env TIDELOG_TLS_KEY)",
    )

    topic = commands.add_parser("topic", help="create, alter, delete, list and describe topics")
    topic_commands = topic.add_subparsers(dest="topic_command", required=True, metavar="ACTION")
    create = topic_commands.add_parser("create", parents=[common], help="create a topic")
    create.add_argument("name", metavar="NAME", help=f"the topic: {TOPIC_RULE}")
    create.add_argument("--queues", type=int, default=4, help="number of queues (default 4)")
    create.add_argument("--exist-ok", action="store_true", help="succeed if it already exists")
    create.set_defaults(handler=lambda a: _run(a, _topic_create))
    alter = topic_commands.add_parser(
        "alter",
        parents=[common],
        help="grow a topic's queue count",
        description="Give a topic more queues (never fewer: keyed messages would hash to "
        "other queues and the old queues' records stay in the log; create a new topic "
        "instead). Consumers started before see the new queues when they restart.",
    )
    alter.add_argument("name", metavar="NAME", help="the topic")
    alter.add_argument("--queues", type=int, required=True, help="the new number of queues")
    alter.set_defaults(handler=lambda a: _run(a, _topic_alter))
    delete = topic_commands.add_parser(
        "delete",
        parents=[common],
        help="delete a topic",
        description="Delete a topic: its queues go at once (reads and writes get "
        "UNKNOWN_TOPIC), its messages stay in the log until retention removes their "
        "segments but are never served again. A topic created later under the name "
        "starts empty, at offset 0. With auto_create on, the next write to the name "
        "creates it again.",
    )
    delete.add_argument("name", metavar="NAME", help="the topic")
    delete.set_defaults(handler=lambda a: _run(a, _topic_delete))
    listing = topic_commands.add_parser("list", parents=[common], help="list topics")
    listing.set_defaults(handler=lambda a: _run(a, _topic_list))
    describe = topic_commands.add_parser(
        "describe", parents=[common], help="queues and offsets of a topic"
    )
    describe.add_argument("name", metavar="NAME", help="the topic")
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
        choices=["leader", "durable", "in_sync", "replicated"],
        default="durable",
        help="leader: in the master's memory; durable: fsynced (default); in_sync: in the "
        "memory of the master and every in-sync slave, fsynced nowhere yet (Kafka's "
        "acks=all); replicated: fsynced on the master and held by every in-sync slave",
    )
    produce.add_argument("--key", help="route every message by this key (same key, same queue)")
    produce.add_argument("--generate", type=int, metavar="N", help="send N generated messages")
    produce.add_argument("--size", type=int, default=128, help="body size for --generate")
    produce.add_argument("--in-flight", type=int, default=256, help="messages in flight at once")
    produce.add_argument("--linger-ms", type=float, default=0.0, help="batching delay")
    produce.add_argument("--timeout-ms", type=int, default=5000, help="ack timeout per message")
    produce.add_argument(
        "--idempotent",
        action="store_true",
        help="resend unknown outcomes (lost answers, flush timeouts, a failover) for up to "
        "2 minutes: the master recognises a message it stored and answers with its offsets, "
        "so nothing is stored twice",
    )
    produce.add_argument(
        "--producer-id",
        type=int,
        metavar="ID",
        help="with --idempotent: start again as this producer (the id a previous run "
        "printed): the node gives it a higher epoch and refuses an older copy still "
        "sending under the id (PRODUCER_FENCED)",
    )
    produce.add_argument(
        "--jsonl",
        action="store_true",
        help='stdin lines are JSON objects: {"body": "text"} or {"body_base64": "..."}, '
        "optional key, queue, tags, props (what consume --json prints); a bad line is "
        "refused alone",
    )
    produce.set_defaults(handler=lambda a: _run(a, _produce))

    consume = commands.add_parser(
        "consume",
        parents=[common],
        help="print messages of a topic",
        usage="%(prog)s TOPIC [--from X | --from-time T] [--follow] [--meta] [OPTION ...]",
        description="Print message bodies (with --meta: queue, offset, tags; with --json: one "
        "object per line, binary bodies as body_base64) from a starting offset; stops once "
        "caught up unless --follow (Ctrl-C stops it).",
    )
    consume.add_argument("topic")
    consume.add_argument("--queue", type=int, help="only this queue (default: all)")
    starts = consume.add_mutually_exclusive_group()
    starts.add_argument(
        "--from",
        dest="start",
        type=start_argument,
        default="earliest",
        help="earliest (default), latest, or a queue offset",
    )
    starts.add_argument(
        "--from-time",
        type=time_argument,
        metavar="TIME",
        help="start each queue at its first message stored at or after TIME: ISO 8601 "
        "(UTC unless it names a zone) or relative to now (-10m, -90s, -2h, -1d)",
    )
    consume.add_argument(
        "--meta", action="store_true", help="prefix each body with its queue, offset, tags, props"
    )
    consume.add_argument("--tag", help="only messages with exactly these tags")
    consume.add_argument("--follow", "-f", action="store_true", help="keep waiting for more")
    consume.add_argument("--count", type=int, default=0, help="stop after N messages")
    consume.add_argument("--wait-ms", type=int, default=1000, help="long-poll wait per pull")
    add_group_options(consume)
    consume.set_defaults(handler=lambda a: _run(a, _consume))
    add_group_commands(commands, common, _run)

    status = commands.add_parser("status", parents=[common], help="role, offsets, flush state")
    status.add_argument(
        "--watch",
        type=positive_seconds,
        metavar="S",
        help="print one line every S seconds, with the write rate, until Ctrl-C",
    )
    status.set_defaults(handler=lambda a: _run(a, _status))
