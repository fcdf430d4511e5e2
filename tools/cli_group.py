"""`tidelog consume --group G` and `tidelog group list|describe|reset`: consumer groups
from the command line (the library side is :mod:`cluster.client.group_consumer`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from cluster.client import Client, ConsumedMessage, TidelogError
from cluster.client.group_consumer import GroupConsumer
from cluster.protocol import Status
from tools.cli_times import time_argument

__all__ = ["add_group_commands", "add_group_options", "consume_in_group"]

Runner = Callable[[argparse.Namespace, Any], int]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    widths = {c: max([len(c)] + [len(cell(r.get(c))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def add_group_options(consume: argparse.ArgumentParser) -> None:
    """``consume``'s consumer-group options."""
    consume.add_argument(
        "--group",
        "-g",
        metavar="G",
        help="consume as a member of group G: the group's queues are shared among its "
        "running members, positions are committed to the cluster and a restart resumes "
        "there (follows until Ctrl-C or --count; --from applies to queues G never committed)",
    )
    consume.add_argument(
        "--session-timeout-ms",
        type=int,
        default=10_000,
        help="with --group: a member silent this long is dropped and its queues move",
    )
    consume.add_argument(
        "--commit-interval-ms",
        type=int,
        default=1000,
        help="with --group: commit positions this often (what a restart may see again)",
    )


async def consume_in_group(
    client: Client, args: argparse.Namespace, shown: Callable[[ConsumedMessage, Any], str]
) -> int:
    """``consume TOPIC --group G``: print what this member is given until Ctrl-C or
    ``--count``; leaving commits and leaves the group."""
    if args.start not in ("earliest", "latest") or args.from_time is not None or args.queue:
        print(
            "tidelog: with --group, the group decides the queues and positions: use "
            "--from earliest|latest (for queues it never committed), not --queue, a queue "
            "offset or --from-time (tidelog group reset moves a group's positions)",
            file=sys.stderr,
        )
        return 2
    seen = 0
    consumer = GroupConsumer(
        client,
        args.group,
        [args.topic],
        start=args.start,
        session_timeout_ms=args.session_timeout_ms,
        auto_commit_interval_ms=args.commit_interval_ms,
        wait_ms=args.wait_ms,
    )
    async with consumer:
        async for message in consumer:
            if args.tag is None or message.tags == args.tag:
                seen += 1
                print(shown(message, args), flush=True)
            if args.count and seen >= args.count:
                consumer.processed(message)  # printed: the group's next reader skips it
                break
    return 0


async def _group_list(client: Client, args: argparse.Namespace) -> int:
    groups = (await client.checked("list_groups"))["groups"]
    if args.json:
        print(json.dumps(groups))
        return 0
    rows = [dict(g, topics=",".join(g["topics"])) for g in groups]
    print(_table(rows, ["group", "members", "generation", "topics"]))
    return 0


async def _group_describe(client: Client, args: argparse.Namespace) -> int:
    described = await _master_checked(client, "describe_group", group=args.group)
    described = {k: v for k, v in described.items() if k not in ("v", "id", "status")}
    if args.json:
        print(json.dumps(described))
        return 0
    generation = described["generation"]
    print(
        f"group {described['group']}: {len(described['members'])} live member(s), "
        f"generation {'-' if generation is None else generation}, "
        f"topics {', '.join(described['topics']) or '-'}"
    )
    print(_table(described["offsets"], ["topic", "queue", "offset", "end_offset", "lag", "member"]))
    return 0


async def _group_reset(client: Client, args: argparse.Namespace) -> int:
    """Move a group's committed positions; refused (GROUP_HAS_MEMBERS) while it has live
    members, since they would overwrite it with their next commit."""
    positions = await _reset_positions(client, args)
    await _master_checked(client, "commit_offsets", group=args.group, offsets=positions)
    if args.json:
        print(json.dumps({"group": args.group, "offsets": positions}))
    else:
        print(f"group {args.group}: positions of {args.topic} reset")
        print(_table(positions, ["topic", "queue", "offset"]))
    return 0


async def _reset_positions(client: Client, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Where ``group reset`` puts each queue of the topic (or of ``--queue``)."""
    if args.to_time is not None:  # as consume --from-time: the first stored at or after
        found = await client.admin.offsets_for_time(args.topic, args.to_time, args.queue)
        return [{"topic": args.topic, "queue": q, "offset": o} for q, o in sorted(found.items())]
    answer = await client.checked("get_offsets", topic=args.topic, queue=args.queue)
    positions = []
    for entry in answer["offsets"]:
        if args.to_offset is not None:
            offset = min(max(args.to_offset, entry["min_offset"]), entry["max_offset"])
        else:
            offset = entry["min_offset" if args.to_earliest else "max_offset"]
        positions.append({"topic": args.topic, "queue": entry["queue"], "offset": offset})
    return positions


async def _master_checked(client: Client, op: str, **fields: Any) -> dict[str, Any]:
    answer = await client.call_master(op, **fields)
    if answer["status"] is not Status.OK:
        raise TidelogError(answer["status"], answer.get("error", ""), answer)
    return answer


def add_group_commands(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser, run: Runner
) -> None:
    """``tidelog group list|describe|reset``."""
    group = commands.add_parser("group", help="list, describe and reset consumer groups")
    actions = group.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[common], help="every group with committed offsets or live members"
    )
    listing.set_defaults(handler=lambda a: run(a, _group_list))
    describe = actions.add_parser(
        "describe",
        parents=[common],
        help="a group's members, and per queue its committed offset, lag and holder",
    )
    describe.add_argument("group", metavar="G")
    describe.set_defaults(handler=lambda a: run(a, _group_describe))
    reset = actions.add_parser(
        "reset",
        parents=[common],
        help="move a group's committed positions in a topic (only while it has no members)",
    )
    reset.add_argument("group", metavar="G")
    reset.add_argument("--topic", required=True)
    reset.add_argument("--queue", type=int, help="only this queue (default: all)")
    where = reset.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-earliest", action="store_true", help="each queue's first offset")
    where.add_argument("--to-latest", action="store_true", help="each queue's end (skip all)")
    where.add_argument(
        "--to-offset", type=int, metavar="N", help="queue offset N (clamped to what is stored)"
    )
    where.add_argument(
        "--to-time",
        type=time_argument,
        metavar="TIME",
        help="each queue's first message stored at or after TIME (as consume --from-time: "
        "ISO 8601, UTC unless it names a zone, or relative to now: -10m, -90s, -2h, -1d)",
    )
    reset.set_defaults(handler=lambda a: run(a, _group_reset))
