"""`tidelog admin forget-member`: drop a member that is lost for good from a leaderless
group's recorded in-sync set, so the others can elect (Kafka's unclean recovery and
Patroni's member removal are the same operator's call).

It talks to etcd, not to the nodes: a group waiting for a lost member has no master to
ask. Without ``--yes`` it only says what it would do and what that risks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from cluster.coordination.etcd import EtcdClient, EtcdError
from cluster.coordination.keys import ClusterKeys
from cluster.coordination.operator import ForgetRefused, forget_member
from tools.launcher.cluster import read_state

__all__ = ["add_forget_member", "cmd_forget_member"]

COMMAND = "tidelog admin forget-member"
ETCD_TIMEOUT_S = 5.0

RISK = (
    "the other recorded members lead without waiting for it; a record acknowledged while "
    "only it held it durably (acks=in_sync and a power loss of the others) is lost"
)


def _etcd_of(args: argparse.Namespace) -> tuple[list[str], str]:
    """The etcd endpoints and cluster name: from --etcd/--cluster, or a detached local
    cluster's state file (--data)."""
    if args.etcd:
        return [url.strip() for url in args.etcd.split(",") if url.strip()], args.cluster
    state = read_state(args.data.resolve())
    return list(state["etcd"]["endpoints"]), str(state.get("cluster", args.cluster))


async def _forget(endpoints: list[str], cluster: str, group: str, node: str) -> dict[str, Any]:
    async with EtcdClient(endpoints, request_timeout_s=ETCD_TIMEOUT_S) as etcd:
        done = await forget_member(etcd, ClusterKeys(cluster), group, node)
    return {
        "group": group,
        "forgotten": node,
        "epoch": done.after.epoch,
        "in_sync_before": sorted(done.before.in_sync),
        "in_sync_after": sorted(done.after.in_sync),
    }


def cmd_forget_member(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            f"{COMMAND}: this drops {args.node} from group {args.group}'s recorded in-sync "
            f"set: {RISK}. Run it again with --yes if {args.node}'s data is lost for good.",
            file=sys.stderr,
        )
        return 1
    try:
        endpoints, cluster = _etcd_of(args)
        result = trio.run(_forget, endpoints, cluster, args.group, args.node)
    except FileNotFoundError:
        print(
            f"{COMMAND}: no cluster state in {args.data.resolve()}: name the cluster's etcd "
            "with --etcd URL (and --cluster NAME), or its directory with --data",
            file=sys.stderr,
        )
        return 2
    except ForgetRefused as exc:
        print(f"{COMMAND}: refused: {exc}", file=sys.stderr)
        return 1
    except (EtcdError, ValueError) as exc:
        print(f"{COMMAND}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"group {args.group}: {args.node} forgotten; recorded in-sync set "
            f"{', '.join(result['in_sync_before'])} -> {', '.join(result['in_sync_after'])}; "
            "the best of those with data leads once each of them is back"
        )
    return 0


def add_forget_member(admin_actions: argparse._SubParsersAction) -> None:
    forget = admin_actions.add_parser(
        "forget-member",
        help="drop a member lost for good from a leaderless group's in-sync set",
        description="A group whose every node crashed elects again only once every member "
        "of its recorded in-sync set is back (one of them may hold acked records the others "
        "lost). If one never returns (its disk is gone), drop it here: " + RISK + ". "
        "Refused while the group has a master, for a live member, and for the last member.",
    )
    forget.add_argument("node", metavar="NODE", help="the member to drop")
    forget.add_argument("--group", default="g1", help="the broker group (default g1)")
    forget.add_argument(
        "--etcd",
        metavar="URL",
        help="the cluster's etcd, http://host:port[,...] (default: "
        "the one of the local cluster in --data)",
    )
    forget.add_argument(
        "--cluster", default="tidelog", help="the cluster name in etcd (default tidelog)"
    )
    forget.add_argument(
        "--data",
        type=Path,
        default=Path("tidelog-cluster"),
        metavar="DIR",
        help="a detached `tidelog cluster up`'s directory, to find its etcd",
    )
    forget.add_argument("--yes", action="store_true", help="do it (without: say what it does)")
    forget.add_argument("--json", action="store_true", help="one JSON object")
    forget.set_defaults(handler=cmd_forget_member)
