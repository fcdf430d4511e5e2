"""``tidelog docker ...``: the engine, the image and a compose cluster from the command line.

``add_parser(commands)`` adds the ``docker`` command to the CLI's subparsers; ``run(args)``
executes a parsed one. ``python -m tools.docker ...`` runs the same commands on its own.

    tidelog docker engine start|stop    our dockerd by PID (installed from Debian if missing)
    tidelog docker build [--no-cache]   the image, with no network inside the build
    tidelog docker up [--etcd-members 3] [--groups 2] [--project P]
    tidelog docker status [--json]      containers, health, role, epoch, offsets of each node
    tidelog docker down [--project P]   removes the project's containers, network, volumes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import trio

from tools.docker.cluster import ClusterSettings, DockerCluster
from tools.docker.engine import Engine, EngineError, ensure_compose
from tools.docker.images import DEFAULT_IMAGE, build_image

__all__ = ["add_parser", "main", "run"]

log = logging.getLogger(__name__)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The ``docker`` command and its actions, on the CLI's subparsers object."""
    docker = commands.add_parser(
        "docker",
        help="run a cluster in docker: engine, image, compose up/status/down",
        description="A tidelog cluster in docker (docker/compose.yaml): etcd and three nodes.",
    )
    actions = docker.add_subparsers(dest="docker_action", metavar="ACTION", required=True)
    engine = actions.add_parser("engine", help="start or stop our own dockerd (by PID)")
    engine.add_argument("engine_action", choices=("start", "stop"))
    engine.add_argument(
        "--force",
        action="store_true",
        help="stop: now, also while test sessions use the engine (their containers die)",
    )
    build = actions.add_parser("build", help="build the tidelog image (no network inside)")
    build.add_argument("--tag", default=DEFAULT_IMAGE, help=f"image tag (default {DEFAULT_IMAGE})")
    build.add_argument(
        "--base",
        default=None,
        help="base image (default: python:3.11-slim, or a debootstrap base when that cannot be pulled)",
    )
    build.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    chaos = actions.add_parser(
        "chaos",
        help="a chaos run on a fresh compose cluster, faults on containers, judged by the checker",
    )
    chaos.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    chaos.add_argument(
        "--nemesis",
        default="kill,pause,partition",
        help="fault kinds (default kill,pause,partition)",
    )
    chaos.add_argument("--seed", type=int, default=7)
    chaos.add_argument("--out", default=None, help="run folder (default: a new one per seed)")
    for name, text in (
        ("up", "start the cluster and wait until healthy"),
        ("status", "containers and nodes"),
        ("down", "remove the cluster and its volumes"),
        ("chaos", ""),
    ):
        action = chaos if name == "chaos" else actions.add_parser(name, help=text)
        action.add_argument(
            "--project", default="tidelog", help="compose project name (default tidelog)"
        )
        action.add_argument(
            "--image", default=DEFAULT_IMAGE, help=f"image (default {DEFAULT_IMAGE})"
        )
        action.add_argument("--etcd-members", type=int, choices=(1, 3), default=1)
        action.add_argument(
            "--groups",
            type=int,
            choices=(1, 2),
            default=1,
            help="broker groups of three nodes (2: profile groups2, nodes 4-6 in group g2)",
        )
        action.add_argument("--json", action="store_true", help="machine-readable output")
    return docker


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``docker`` command; 0 on success, 1 with a message on error."""
    try:
        return _run(args)
    except EngineError as error:
        print(f"tidelog docker: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    engine = Engine()
    if args.docker_action == "engine":
        if args.engine_action == "stop":
            users = engine.stop(force=args.force)
            if users:
                print(
                    f"engine in use by the test sessions {', '.join(map(str, users))}: it "
                    "stops (and host settings are restored) when the last of them ends; "
                    "--force stops it now, under them"
                )
            else:
                print("engine stopped (if ours was running); host settings restored")
            return 0
        engine.start()
        ensure_compose(engine.settings)
        print(f"engine ready: DOCKER_HOST={engine.docker_host or '(default)'}")
        return 0
    engine.start()
    if args.docker_action == "build":
        result = build_image(engine, tag=args.tag, base_image=args.base, no_cache=args.no_cache)
        print(
            f"built {result.tag} on {result.base_image}: {result.size_bytes / 1e6:.0f} MB in {result.build_s:.0f} s"
        )
        return 0
    cluster = DockerCluster(
        engine,
        ClusterSettings(
            project=args.project,
            image=args.image,
            etcd_members=args.etcd_members,
            groups=args.groups,
        ),
    )
    if args.docker_action == "up":
        took_s = cluster.up()
        print(f"cluster {args.project} healthy in {took_s:.1f} s")
        _print_status(cluster, as_json=args.json)
        return 0
    if args.docker_action == "chaos":
        return _chaos(cluster, args)
    if args.docker_action == "down":
        cluster.down()
        print(f"cluster {args.project} removed (containers, network, volumes)")
        return 0
    _print_status(cluster, as_json=args.json)
    return 0


def _chaos(cluster: DockerCluster, args: argparse.Namespace) -> int:
    from tools.chaos.runner import run_chaos, settings_from_args
    from tools.docker.chaos import DockerChaosCluster

    try:
        settings = settings_from_args(
            duration_s=args.duration,
            nemesis=args.nemesis,
            acks="replicated",
            seed=args.seed,
            out=args.out,
            bootstrap=None,
        )
    except ValueError as error:
        print(f"tidelog docker chaos: {error}", file=sys.stderr)
        return 2
    outcome = trio.run(
        lambda: run_chaos(
            settings, cluster_factory=lambda _root, _nursery: DockerChaosCluster.started(cluster)
        )
    )
    return outcome.exit_code


def cluster_status(cluster: DockerCluster) -> list[dict[str, Any]]:
    """Each container's state and health, and for a node its role, epoch and offsets."""
    rows = []
    for info in cluster.status():
        row: dict[str, Any] = {
            "service": info.service,
            "state": info.state,
            "health": info.health,
            "address": info.address,
        }
        if info.service in cluster.settings.node_services:
            row["group"] = cluster.settings.group_of(info.service)
            if info.state == "running":
                row |= trio.run(_node_status, cluster.settings.client_address(info.service))
        rows.append(row)
    return rows


async def _node_status(address: str) -> dict[str, Any]:
    from cluster.client import open_client

    try:
        with trio.fail_after(5):
            async with open_client(address) as client:
                status = await client.admin.status()
    except Exception as error:  # a node that does not answer is a status, not a crash
        return {"client": address, "error": str(error)}
    coordination = status.get("coordination") or {}
    return {
        "client": address,
        "role": coordination.get("role", status.get("role")),
        "epoch": coordination.get("epoch", status.get("epoch")),
        "max_offset": status.get("max_offset"),
        "flushed_offset": status.get("flushed_offset"),
    }


def _print_status(cluster: DockerCluster, *, as_json: bool) -> None:
    rows = cluster_status(cluster)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        extra = (
            f" group={row.get('group')} role={row.get('role')} epoch={row.get('epoch')} max_offset={row.get('max_offset')} client={row.get('client')}"
            if "group" in row
            else ""
        )
        print(
            f"{row['service']:<6} {row['state']:<8} {row['health']:<9} {row['address']:<15}{extra}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docker")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["docker", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    return run(args)
