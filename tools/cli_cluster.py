"""`tidelog cluster up|status|down` (a local etcd and one broker group electing its master,
on :class:`tools.launcher.LocalCluster`) and `tidelog admin switchover`.

``up`` prints the addresses and a live status (roles, epochs, log ends, lag, in-sync set)
until Ctrl-C or SIGTERM, then stops every process by its PID. ``up --detach`` leaves the
cluster running and writes DIR/cluster.json (PIDs, addresses), which ``status`` and
``down`` read. ``up --etcd-members 3`` runs a three-member etcd, so that etcd's own
faults (its leader killed, a member lost) can be tried; ``status`` shows each member's
health and which one leads, ``down`` stops every member by its PID. ``up --tls`` makes
a throwaway CA and a certificate per node in DIR/tls and runs both ports of every node
on TLS (clients verify the nodes with ``--tls-ca DIR/tls/ca.pem`` and need no
certificate; replication is mutual TLS); ``status`` reads the CA from the state file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import trio

from cluster.client import TidelogError, open_client
from cluster.client.tls import client_tls
from tools.cli_admin import add_forget_member
from tools.cli_client import address_argument, bootstrap_addresses
from tools.launcher.cluster import (
    STATE_FILE,
    ClusterLaunchError,
    LocalCluster,
    NodeView,
    node_answer,
    pid_alive,
    process_matches,
    read_group_state,
    read_state,
    stop_pids,
)
from tools.launcher.etcd import EtcdEndpointHealth, EtcdLaunchError, probe_endpoints
from tools.launcher.pki import PkiError

DEFAULT_DIR = Path("tidelog-cluster")
REFRESH_S = 1.0


# ---- status rows (shared by the live view and `cluster status`) ------------------------------


def status_rows(views: list[NodeView]) -> list[dict[str, Any]]:
    """One row per node: role, epoch, log end, lag behind the master, in the recorded
    in-sync set or not."""
    master = next((view for view in views if view.is_master), None)
    recorded = set(master.coordination.get("recorded_in_sync") or ()) if master else set()
    master_end = master.log_end if master is not None else None
    rows = []
    for view in views:
        lag = (
            master_end - view.log_end
            if master_end is not None and view.log_end is not None
            else None
        )
        rows.append(
            {
                "node": view.name,
                "address": view.address,
                "pid": view.pid,
                "role": view.role,
                "epoch": view.epoch,
                "log_end": view.log_end,
                "lag_bytes": lag,
                "in_sync": view.name in recorded if master is not None else None,
            }
        )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def plain_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no nodes)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def rich_table(rows: list[dict[str, Any]], title: str, caption: str | None = None) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in rows[0] if rows else ["node"]:
        table.add_column(column.replace("_", " "))
    styles = {"master": "bold green", "slave": "cyan", "stopped": "red", "no answer": "yellow"}
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()), style=styles.get(row["role"]))
    return table


# ---- up ---------------------------------------------------------------------------------------


def _running_pids(state: dict[str, Any]) -> list[int]:
    return [
        node["pid"]
        for node in state["nodes"]
        if node.get("pid") and pid_alive(node["pid"]) and process_matches(node["pid"], "tools.cli")
    ]


def _refuse_running(root: Path) -> str | None:
    try:
        state = read_state(root)
    except (OSError, ValueError):
        return None
    running = _running_pids(state)
    if running:
        return (
            f"a cluster started from {root} is still running (pids {running}): "
            f"stop it with `tidelog cluster down --data {root}`, or use another --data"
        )
    return None


def cmd_cluster_up(args: argparse.Namespace) -> int:
    root = args.data.resolve()
    if args.etcd and args.etcd_members:
        print(
            "tidelog cluster up: --etcd-members sizes the etcd `cluster up` starts; with "
            "--etcd the cluster uses yours as it is: drop one of the two",
            file=sys.stderr,
        )
        return 2
    refusal = _refuse_running(root)
    if refusal:
        print(f"tidelog cluster up: {refusal}", file=sys.stderr)
        return 2
    cluster = LocalCluster(
        root,
        replicas=args.replicas,
        etcd_endpoints=tuple(args.etcd.split(",")) if args.etcd else (),
        etcd_members=args.etcd_members or 1,
        min_insync_replicas=args.min_insync_replicas,
        new_session=True,
        tls=args.tls,
    )
    if not args.json:
        members = args.etcd_members or 1
        local = "a local etcd" if members == 1 else f"a local etcd of {members} members"
        where = "etcd at " + args.etcd if args.etcd else local
        secured = ", TLS on every port" if args.tls else ""
        print(f"starting {where} and {args.replicas} nodes{secured} (data: {root}) ...", flush=True)
    detached = False
    try:
        try:
            cluster.start()
            master = trio.run(cluster.wait_for_master)
        except (ClusterLaunchError, EtcdLaunchError, PkiError, TimeoutError) as exc:
            print(f"tidelog cluster up: cannot start: {exc}", file=sys.stderr)
            return 1
        cluster.write_state()
        summary = dict(cluster.describe(), master=master)
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            print(_addresses_text(cluster, master), flush=True)
        if args.detach:
            detached = True
            if not args.json:
                print(
                    f"detached: `tidelog cluster status --data {args.data}` shows it, "
                    f"`tidelog cluster down --data {args.data}` stops it"
                )
            return 0
        trio.run(_live_until_stopped, cluster, args.json)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if not detached:
            if not args.json:
                print("\nstopping the nodes and etcd ...", file=sys.stderr, flush=True)
            cluster.stop()
            (root / STATE_FILE).unlink(missing_ok=True)
            if not args.json:
                print(f"stopped; the data stays in {root}", file=sys.stderr)


def _addresses_text(cluster: LocalCluster, master: str) -> str:
    bootstrap = ",".join(cluster.addresses)
    if cluster.etcd is not None and len(cluster.etcd.members) > 1:
        lines = [f"{m.name}: {m.client_url}  pid {m.pid}" for m in cluster.etcd.members]
    else:
        lines = [f"etcd:   {', '.join(cluster.endpoints)}"]
    for name in cluster.names:
        marker = "  (master)" if name == master else ""
        lines.append(f"{name}: {cluster.address(name)}  pid {cluster.pid(name)}{marker}")
    lines += ["", "in a second terminal:", f"  export TIDELOG_BOOTSTRAP={bootstrap}"]
    if cluster.ca_file is not None:
        lines += [
            f"  export TIDELOG_TLS_CA={cluster.ca_file}    # or --tls-ca {cluster.ca_file}",
            "  # every port speaks TLS: clients trust this CA and need no certificate",
        ]
    lines += [
        "  tidelog topic create orders --queues 4",
        "  printf 'one\\ntwo\\n' | tidelog produce orders --acks replicated",
        "  tidelog consume orders --follow --meta",
        "  kill -9 <the master's pid>    # then watch a new master take over",
    ]
    return "\n".join(lines)


async def _live_until_stopped(cluster: LocalCluster, as_json: bool) -> None:
    """Refresh the status until Ctrl-C (KeyboardInterrupt) or SIGTERM/SIGHUP."""
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        if as_json:
            while True:
                rows = status_rows(await cluster.views())
                etcd = [probe.to_json() for probe in await probe_endpoints(cluster.endpoints)]
                print(json.dumps({"time": time.time(), "nodes": rows, "etcd": etcd}), flush=True)
                await trio.sleep(REFRESH_S)
        from rich.console import Console
        from rich.live import Live

        console = Console()
        with Live(console=console, auto_refresh=False) as live:
            while True:
                rows = status_rows(await cluster.views())
                title = f"tidelog cluster {time.strftime('%H:%M:%S')}  (Ctrl-C stops it)"
                caption = etcd_summary(await probe_endpoints(cluster.endpoints))
                live.update(rich_table(rows, title, caption), refresh=True)
                await trio.sleep(REFRESH_S)


# ---- status and down of a detached cluster -------------------------------------------------


def _state_or_error(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    root = args.data.resolve()
    try:
        return read_state(root)
    except FileNotFoundError:
        print(
            f"tidelog cluster {command}: no cluster state in {root} ({STATE_FILE} is missing): "
            "start one with `tidelog cluster up --detach`, or name its --data",
            file=sys.stderr,
        )
    except ValueError as exc:
        print(f"tidelog cluster {command}: {exc}", file=sys.stderr)
    return None


def _client_tls(state: dict[str, Any]) -> ssl.SSLContext | None:
    """The context to ask the nodes of a cluster started with ``--tls`` (its CA)."""
    tls = state.get("tls")
    return client_tls(str(tls["ca_file"])) if tls else None


async def _views_from_state(state: dict[str, Any]) -> list[NodeView]:
    found: dict[str, NodeView] = {}
    tls = _client_tls(state)

    async def one(node: dict[str, Any]) -> None:
        pid: int | None = node.get("pid")
        running = pid is not None and pid_alive(pid) and process_matches(pid, "tools.cli")
        status = await node_answer(node["address"], "status", tls=tls) if running else None
        found[node["name"]] = NodeView(node["name"], node["address"], pid, running, status)

    async with trio.open_nursery() as nursery:
        for node in state["nodes"]:
            nursery.start_soon(one, node)
    return [found[node["name"]] for node in state["nodes"]]


def etcd_rows(state: dict[str, Any], health: list[EtcdEndpointHealth]) -> list[dict[str, Any]]:
    """One row per etcd endpoint: its member (when `cluster up` started it), PID, whether
    the process runs, whether it answers a linearizable read, whether it leads."""
    members = {m["client_url"]: m for m in state["etcd"].get("members", [])}
    rows = []
    for probe in health:
        member = members.get(probe.endpoint, {})
        pid = member.get("pid")
        root = str(Path(member["data_dir"]).parent) if member else ""
        running = pid_alive(pid) and process_matches(pid, "etcd", root) if pid else None
        rows.append(
            {
                "member": member.get("name"),
                "endpoint": probe.endpoint,
                "pid": pid,
                "running": running,
                "healthy": probe.healthy,
                "leader": probe.leader,
                "error": probe.error,
            }
        )
    return rows


def etcd_summary(health: list[EtcdEndpointHealth]) -> str:
    """One line: how many etcd endpoints are healthy and which one leads."""
    healthy = sum(1 for probe in health if probe.healthy)
    leader = next((probe.endpoint for probe in health if probe.leader), None)
    led = f", leader {leader}" if leader else ", no leader answering"
    return f"etcd: {healthy} of {len(health)} healthy{led}"


async def _etcd_view(state: dict[str, Any]) -> tuple[list[EtcdEndpointHealth], Any]:
    endpoints = state["etcd"]["endpoints"]
    health = await probe_endpoints(endpoints)
    group = await read_group_state(endpoints, state.get("cluster", "tidelog"), state["group"])
    return health, group


def cmd_cluster_status(args: argparse.Namespace) -> int:
    state = _state_or_error(args, "status")
    if state is None:
        return 2
    try:
        rows = status_rows(trio.run(_views_from_state, state))
    except ValueError as exc:  # the CA file of a --tls cluster is gone or unreadable
        print(f"tidelog cluster status: {exc}", file=sys.stderr)
        return 2
    health, group = trio.run(_etcd_view, state)
    etcd = etcd_rows(state, health)
    recorded = (
        {
            "epoch": group.epoch,
            "master": group.master,
            "in_sync": sorted(group.in_sync),
            "min_insync_replicas": group.min_insync_replicas,
        }
        if group is not None
        else None
    )
    if args.json:
        print(
            json.dumps({"etcd": dict(state["etcd"], health=etcd), "group": recorded, "nodes": rows})
        )
    else:
        healthy = sum(1 for row in etcd if row["healthy"])
        print(f"etcd: {healthy} of {len(etcd)} member(s) healthy")
        print(plain_table([{k: v for k, v in row.items() if k != "error"} for row in etcd]))
        for row in etcd:
            if row["error"]:
                print(f"  {row['endpoint']}: {row['error']}")
        if recorded is not None:
            print(
                f"group {state['group']} in etcd: epoch {recorded['epoch']}, master "
                f"{recorded['master']}, in-sync {', '.join(recorded['in_sync'])}"
            )
        else:
            print(f"group {state['group']} in etcd: no state recorded, or etcd does not answer")
        print(plain_table(rows))
    return 0 if any(row["role"] not in ("stopped", "no answer") for row in rows) else 1


def cmd_cluster_down(args: argparse.Namespace) -> int:
    state = _state_or_error(args, "down")
    if state is None:
        return 2
    root = args.data.resolve()
    nodes = stop_pids(
        [(n["pid"], ("tools.cli", n["data_dir"])) for n in state["nodes"] if n.get("pid")]
    )
    etcd = state["etcd"]
    etcd_pids = etcd.get("pids", []) + [m["pid"] for m in etcd.get("members", []) if m.get("pid")]
    stopped_etcd = (
        stop_pids([(pid, ("etcd", str(root))) for pid in sorted(set(etcd_pids))])
        if etcd.get("managed")
        else []
    )
    (root / STATE_FILE).unlink(missing_ok=True)
    summary = {"nodes_stopped": nodes, "etcd_stopped": stopped_etcd, "data": str(root)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"stopped {len(nodes)} node(s) and {len(stopped_etcd)} etcd member(s); "
            f"the data stays in {root}"
        )
    return 0


# ---- admin switchover -----------------------------------------------------------------------


def cmd_admin_switchover(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        tls = client_tls(args.tls_ca) if args.tls_ca else None
        async with open_client(bootstrap_addresses(args.bootstrap), tls=tls) as client:
            return await client.call_master(
                "switchover",
                timeout=args.timeout_ms / 1000 + client.config.request_timeout,
                group=args.group,
                to=args.to,
                timeout_ms=args.timeout_ms,
            )

    try:
        answer = trio.run(main)
    except (TidelogError, ValueError) as exc:  # ValueError: a --tls-ca that cannot be read
        print(f"tidelog admin switchover: {exc}", file=sys.stderr)
        return 2
    if answer["status"].value != "OK":
        print(
            f"tidelog admin switchover: {answer['status'].value}: {answer.get('error', '')}",
            file=sys.stderr,
        )
        return 1
    result = {k: v for k, v in answer.items() if k not in ("v", "id", "status")}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"group {args.group}: {result.get('master')} is master now (epoch "
            f"{result.get('epoch')}); the old master handed over at log end {result.get('log_end')}"
        )
    return 0


# ---- parser ---------------------------------------------------------------------------------


def add_cluster_commands(commands: argparse._SubParsersAction) -> None:
    cluster = commands.add_parser(
        "cluster",
        help="a local cluster: etcd and N nodes that elect their master",
        description="Run a local cluster: an etcd (unless --etcd names one) and one broker "
        "group of N `tidelog node --etcd` processes on free loopback ports, electing their "
        "master and failing over on their own.",
    )
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    data_help = f"the cluster's directory: node data, logs, {STATE_FILE} (default ./{DEFAULT_DIR})"
    up = actions.add_parser(
        "up",
        help="start etcd and the nodes; live status until Ctrl-C, then stop them",
        description="Start etcd and --replicas nodes, print their addresses and a live "
        "status (roles, epochs, log ends, lag, in-sync set) until Ctrl-C or SIGTERM, then "
        "stop every process by its PID. --detach leaves them running and writes "
        f"DIR/{STATE_FILE} for `cluster status` and `cluster down`.",
    )
    up.add_argument("--replicas", type=_count, default=3, help="nodes in the group (default 3)")
    up.add_argument("--data", type=Path, default=DEFAULT_DIR, metavar="DIR", help=data_help)
    up.add_argument(
        "--etcd",
        metavar="URL",
        help="use this etcd (http://host:port[,...]) instead of a local one",
    )
    up.add_argument(
        "--etcd-members",
        type=_etcd_members,
        default=None,
        metavar="N",
        help="members of the local etcd: 1 (default), 3 or 5; 3 lets you kill etcd's leader "
        "or a member and watch the cluster keep its master",
    )
    up.add_argument(
        "--min-insync-replicas",
        type=int,
        default=1,
        help="in-sync slaves acks=replicated needs (default 1)",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every port: a throwaway CA and a certificate per node in DIR/tls "
        "(openssl); clients add --tls-ca DIR/tls/ca.pem (no client certificate); "
        "replication is mutual TLS",
    )
    up.add_argument("--detach", action="store_true", help="leave the cluster running and return")
    up.add_argument(
        "--json", action="store_true", help="the addresses as one JSON object (then status lines)"
    )
    up.set_defaults(handler=cmd_cluster_up)
    status = actions.add_parser("status", help="the status of a detached cluster")
    status.add_argument("--data", type=Path, default=DEFAULT_DIR, metavar="DIR", help=data_help)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(handler=cmd_cluster_status)
    down = actions.add_parser("down", help="stop a detached cluster (its data stays)")
    down.add_argument("--data", type=Path, default=DEFAULT_DIR, metavar="DIR", help=data_help)
    down.add_argument("--json", action="store_true", help="one JSON object")
    down.set_defaults(handler=cmd_cluster_down)

    admin = commands.add_parser("admin", help="operator actions on a running cluster")
    admin_actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    switchover = admin_actions.add_parser(
        "switchover",
        help="hand mastership to another node without losing a write",
        description="Ask the group's master to hand over: it stops taking writes, waits "
        "until the target has everything, resigns, and answers once the target is elected.",
    )
    switchover.add_argument("--group", default="g1", help="the broker group (default g1)")
    switchover.add_argument(
        "--to", metavar="NODE", help="the node to hand over to (default: the best)"
    )
    switchover.add_argument(
        "--bootstrap",
        "-b",
        type=address_argument,
        default=None,
        help="node address(es) host:port[,host:port...] (env TIDELOG_BOOTSTRAP)",
    )
    switchover.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("TIDELOG_TLS_CA"),
        help="speak TLS, trusting this CA (PEM) for the nodes' certificates (env "
        "TIDELOG_TLS_CA; a `cluster up --tls` cluster: DIR/tls/ca.pem)",
    )
    switchover.add_argument(
        "--timeout-ms", type=int, default=10_000, help="how long the hand-over may take"
    )
    switchover.add_argument("--json", action="store_true", help="one JSON object")
    switchover.set_defaults(handler=cmd_admin_switchover)
    add_forget_member(admin_actions)


def _etcd_members(value: str) -> int:
    if value not in ("1", "3", "5"):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an etcd size this launcher runs: use 1, 3 or 5 (an odd number, "
            "so a majority survives the loss of one or two members)"
        )
    return int(value)


def _count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 9:
        raise argparse.ArgumentTypeError(f"{value!r} is not a node count from 1 to 9")
    return int(value)
