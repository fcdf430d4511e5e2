"""The `tidelog` command line: people get tables and progress, machines get ``--json``."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

from tools.cli_client import add_client_commands, address_argument
from tools.cli_cluster import add_cluster_commands
from tools.cli_times import attach_relative_times

log = logging.getLogger(__name__)


def _progress(enabled: bool) -> Callable[[str], None]:
    """A one-line progress indicator on stderr (silent with --json or when not a terminal)."""
    if not enabled:
        return lambda _msg: None

    def show(message: str) -> None:
        sys.stderr.write(f"\r\033[K... {message}")
        sys.stderr.flush()

    return show


def print_figures(figures: dict[str, float]) -> None:
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
        print(f"  {key:<{width}}  {shown:>14}")


def report_figures(
    args: argparse.Namespace,
    title: str,
    figures: dict[str, float],
    *,
    ratios: dict[str, float] | None = None,
) -> int:
    """One JSON object with --json; otherwise a titled table (after the progress line)."""
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
        return 0
    sys.stderr.write("\r\033[K")
    print(title)
    print_figures(figures)
    if ratios:
        print("ratios")
        print_figures(ratios)
    return 0


def cmd_bench_storage(args: argparse.Namespace) -> int:
    from tools.bench.storage import run_storage_bench

    progress = _progress(not args.json and sys.stderr.isatty())
    figures = trio.run(lambda: run_storage_bench(args.dir, seconds=args.seconds, progress=progress))
    return report_figures(
        args,
        "tidelog bench storage (ratios against floors measured in this run)",
        figures,
        ratios=storage_ratios(figures),
    )


def cmd_bench_node(args: argparse.Namespace) -> int:
    from tools.bench.produce import run_bench

    if args.replicas < 0:
        raise SystemExit("--replicas must not be negative")
    if getattr(args, "trace", False) and args.bootstrap:
        raise SystemExit("--trace starts its own nodes (they record their hops): drop --bootstrap")
    clients: tuple[str, ...] = ("trio",)
    if getattr(args, "client", None):
        from tools.bench.clients import parse_clients

        try:
            clients = parse_clients(args.client)
        except ValueError as exc:
            raise SystemExit(f"--client: {exc}") from None
    acks = args.acks or ("leader,in_sync,replicated" if args.replicas else "leader,durable")
    progress = _progress(not args.json and sys.stderr.isatty())
    figures = trio.run(
        lambda: run_bench(
            args.kind,
            args.bootstrap,
            seconds=args.seconds,
            acks_levels=tuple(acks.split(",")),
            progress=progress,
            replicas=args.replicas,
            trace=getattr(args, "trace", False),
            clients=clients,
        )
    )
    return report_figures(
        args, f"tidelog bench {args.kind} (floors and ceilings measured in this run)", figures
    )


def cmd_bench_replication(args: argparse.Namespace) -> int:
    import tempfile

    from tools.bench.replication import parse_size, run_catchup_bench, run_lag_bench

    progress = _progress(not args.json and sys.stderr.isatty())
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tidelog-catchup-", dir=args.dir) as directory:
        if not args.lag_only:
            figures.update(
                trio.run(
                    lambda: run_catchup_bench(
                        Path(directory),
                        parse_size(args.size),
                        repeats=args.repeats,
                        progress=progress,
                    )
                )
            )
        if args.lag_seconds > 0:
            figures.update(
                trio.run(
                    lambda: run_lag_bench(
                        Path(directory) / "lag",
                        seconds=args.lag_seconds,
                        rate=args.lag_rate,
                        progress=progress,
                    )
                )
            )
    return report_figures(
        args,
        "tidelog bench replication: catch-up of a fresh slave (sendfile and copy, same run) "
        "and append-to-ack lag under a steady 1 KiB load",
        figures,
    )


def cmd_bench_failover(args: argparse.Namespace) -> int:
    import tempfile

    from tools.bench.failover import run_failover_bench

    progress = _progress(not args.json and sys.stderr.isatty())
    with tempfile.TemporaryDirectory(prefix="tidelog-failover-", dir=args.dir) as directory:
        figures = trio.run(
            lambda: run_failover_bench(Path(directory), kills=args.kills, progress=progress)
        )
    report_figures(
        args,
        "tidelog bench failover: master SIGKILLs under acks=replicated (lease settings below)",
        figures,
    )
    return 0 if figures["acked_lost"] == 0 else 1


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from tools.bench.scale import ScaleSettings, run_scale_bench

    try:
        settings = ScaleSettings(
            seconds=args.seconds,
            queues=args.queues,
            producers=args.producers,
            polls=args.polls,
            poll_connections=args.poll_connections,
        )
    except ValueError as invalid:
        raise SystemExit(str(invalid)) from None
    progress = _progress(not args.json and sys.stderr.isatty())
    figures = trio.run(lambda: run_scale_bench(settings, progress))
    return report_figures(
        args,
        "tidelog bench scale: one message per request from each producer's own connection, "
        "over one queue, many queues, and many queues with long polls parked elsewhere",
        figures,
    )


def storage_ratios(f: dict[str, float]) -> dict[str, float]:
    """The comparisons the storage issue asks for, from one run's figures."""
    return {
        "batch64_128B_vs_copy_floor": f["append_batch64_128B_records_per_s"]
        / f["copy_floor_128B_records_per_s"],
        "group_commit_64w_vs_async_flush_64w_128B": f["group_commit_64w_128B_records_per_s"]
        / f["async_flush_64w_128B_records_per_s"],
        "group_commit_64w_vs_async_flush_64w_1024B": f["group_commit_64w_1024B_records_per_s"]
        / f["async_flush_64w_1024B_records_per_s"],
        "durable_p99_1w_128B_vs_disk_fsync_p99": f["group_commit_1w_128B_p99_us"]
        / f["disk_fsync_p99_us"],
        "durable_p99_64w_128B_vs_disk_fsync_p99": f["group_commit_64w_128B_p99_us"]
        / f["disk_fsync_p99_us"],
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    return run_demo(args.dir, args.rounds, args.acks_per_round)


EXIT_STOPPED_ITSELF = 3
"""`tidelog node`'s exit status when the node stopped on its own (its storage failed)."""


def cmd_node(args: argparse.Namespace) -> int:
    from cluster.node import serve_until_signalled
    from cluster.node.config import ConfigError, load_node_config

    overrides = {
        key: value
        for key, value in {
            "node.name": args.name,
            "node.host": args.host,
            "node.port": args.port,
            "node.metrics_port": args.metrics_port,
            "node.data_dir": args.data_dir,
            "replication.role": args.role,
            "replication.ha_host": args.ha_host,
            "replication.ha_port": args.ha_port,
            "replication.master_ha": args.master_ha,
            "replication.master_client": args.master_client,
            "replication.min_insync_replicas": args.min_insync_replicas,
            "coordination.etcd": args.etcd,
            "coordination.cluster": args.cluster,
            "coordination.group": args.group,
            "coordination.priority": args.priority,
            "coordination.advertise_host": args.advertise_host,
        }.items()
        if value is not None
    }
    try:
        config = load_node_config(args.config, overrides)
    except ConfigError as exc:
        print(f"tidelog node: {exc}", file=sys.stderr)
        return 2
    if args.request_log:
        from cluster.server.request_log import enable_request_log

        enable_request_log()

    started: list[bool] = []

    def ready(host: str, port: int) -> None:
        started.append(True)
        print(
            f"tidelog node {config.node.name} listening on {host}:{port} "
            f"(data: {config.node.data_dir}); Ctrl-C or SIGTERM stops it",
            flush=True,
        )

    try:
        stopped_itself = trio.run(lambda: serve_until_signalled(config, on_ready=ready))
    except BaseException as exc:  # a refusal (port, data dir, lock) becomes a sentence
        refusal = sole_refusal(exc)
        if refusal is None:
            raise
        verdict = "stopped" if started else "cannot start"
        print(f"tidelog node: {verdict}: {node_problem(refusal, config)}", file=sys.stderr)
        return 1
    if stopped_itself is not None:
        print(f"tidelog node {config.node.name} stopped: {stopped_itself}", file=sys.stderr)
        return EXIT_STOPPED_ITSELF
    print(
        f"tidelog node {config.node.name} stopped cleanly: log flushed, checkpoint written "
        f"(data: {config.node.data_dir})",
        flush=True,
    )
    return 0


def monitoring_address(value: str) -> tuple[str, int]:
    """``tidelog health``'s argument: one ``host:port``, checked before anything connects."""
    from cluster.protocol.address import parse_address

    try:
        return parse_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_health(args: argparse.Namespace) -> int:
    from cluster.node.health_http import http_get

    host, port = args.address

    async def ask() -> tuple[int, bytes]:
        with trio.fail_after(args.timeout_ms / 1000):
            answer = await http_get(host, port, "/health")
        return answer.status, answer.body

    try:
        code, body = trio.run(ask)
        health = json.loads(body)
    except (OSError, ValueError, trio.TooSlowError) as exc:
        print(
            f"tidelog health: no health answer from http://{host}:{port}/health ({exc}): "
            "is a node running there with --metrics-port (or [node] metrics_port) set?",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps(health))
    else:
        state = "ok" if code == 200 else "unavailable"
        writable = "writable" if health.get("writable") else "not writable"
        print(
            f"{state}: node {health.get('node')} is {health.get('role')} in epoch "
            f"{health.get('epoch')}, {writable}"
            + (f"; {health['reason']}" if health.get("reason") else "")
        )
    return 0 if code == 200 else 1


def sole_refusal(exc: BaseException) -> Exception | None:
    """The one error behind ``exc`` (trio wraps failures in exception groups) when it is
    the system's or the store's refusal, which its message explains; else None (a bug,
    whose traceback is wanted)."""
    from cluster.node.topics import TopicError
    from storage.errors import StorageError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError | StorageError | TopicError) else None


def node_problem(error: Exception, config: Any) -> str:
    """What stopped a node, with the setting to change."""
    if not isinstance(error, OSError):
        return str(error)
    if error.errno == errno.EADDRINUSE:
        ports = [("--port", config.node.host, config.node.port)]  # or node.port in a config
        if config.replication.ha_port is not None and config.replication.ha_port > 0:
            ha_host = config.replication.ha_host or config.node.host
            ports.append(("--ha-port", ha_host, config.replication.ha_port))
        busy = [(flag, host, port) for flag, host, port in ports if port and _port_busy(host, port)]
        flag, host, port = (busy or ports)[0]
        return (
            f"port {port} on {host} is already in use (set by {flag}): another node or "
            f"program listens there. Stop it, or choose another {flag} (0 picks a free one)."
        )
    where = error.filename or config.node.data_dir
    return (
        f"cannot use the data directory {config.node.data_dir}: {error.strerror} ({where}). "
        "Choose a writable directory with --data-dir."
        if error.filename is not None
        else str(error)
    )


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidelog",
        description="tidelog: a replicated commit-log cluster (mmap CommitLog, group commit, "
        "sendfile replication).",
    )
    parser.add_argument(
        "--log-level", type=log_level, default=None, metavar="LEVEL", help=LOG_LEVEL_HELP
    )
    parser.add_argument("--version", action="version", version=f"tidelog {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser(
        "node",
        help="run a node (stops cleanly on SIGTERM/SIGINT)",
        description="Run one node: its commit log, flush services and client server. "
        "Settings come from --config (TOML), then TIDELOG_<SECTION>_<KEY> environment "
        "variables, then these flags. SIGTERM or Ctrl-C: finish in-flight requests, flush, "
        "write the checkpoint, exit 0.",
    )
    node.add_argument("--config", type=Path, help="TOML file (see docs/design.md)")
    node.add_argument("--name", help="node name (default: node-1)")
    node.add_argument("--host", help="listen address (default 127.0.0.1)")
    node.add_argument("--port", type=int, help="client port (default 7600; 0 picks a free one)")
    node.add_argument(
        "--metrics-port",
        type=int,
        help="serve GET /metrics (Prometheus) and GET /health over HTTP on this port "
        "(0 picks a free one; default: off)",
    )
    node.add_argument("--data-dir", type=Path, help="where the log lives (default ./data)")
    node.add_argument("--role", choices=("master", "slave"), help="default: master")
    node.add_argument(
        "--ha-port",
        type=int,
        help="master: open the replication port for slaves (0 picks a free one; default: none)",
    )
    node.add_argument("--ha-host", help="master: replication listen address (default: --host)")
    node.add_argument("--master-ha", help="slave: the master's replication address host:port")
    node.add_argument(
        "--master-client", help="slave: the master's client address, the NOT_MASTER hint"
    )
    node.add_argument(
        "--min-insync-replicas",
        type=int,
        help="master: connected slaves needed for acks=replicated (default 1)",
    )
    node.add_argument(
        "--etcd",
        help="etcd endpoints http://host:port[,...]: the group elects its master (automatic "
        "failover); needs --ha-port, refuses --role/--master-ha/--master-client; the name "
        "defaults to the data directory's name",
    )
    node.add_argument("--cluster", help="with --etcd: the cluster's name (default tidelog)")
    node.add_argument("--group", help="with --etcd: this node's broker group (default g1)")
    node.add_argument(
        "--priority", type=int, help="with --etcd: higher wins ties in elections (default 0)"
    )
    node.add_argument(
        "--advertise-host",
        help="with --etcd: the host other nodes and clients reach this node at, published "
        "in etcd (default: --host; required when --host is 0.0.0.0 or ::)",
    )
    node.add_argument(
        "--request-log",
        action="store_true",
        help="log one line per request served (peer, op, topic, status, bytes, duration_us); "
        "also on at --log-level debug",
    )
    node.set_defaults(handler=cmd_node)

    health = commands.add_parser(
        "health",
        help="ask a node's monitoring port whether it serves its role (exit 0 yes, 1 no)",
        description="GET /health from a node started with --metrics-port: print its role, "
        "epoch and, when it does not serve its role, why. Exit 0 when healthy, 1 when not, "
        "2 when nothing answers (for health checks and scripts).",
    )
    health.add_argument("address", type=monitoring_address, help="the monitoring port, host:port")
    health.add_argument(
        "--timeout-ms", type=int, default=5000, help="how long to wait for the answer"
    )
    health.add_argument("--json", action="store_true", help="print the answer as JSON")
    health.set_defaults(handler=cmd_health)

    add_client_commands(commands)
    add_cluster_commands(commands)

    demo = commands.add_parser(
        "demo",
        help="SIGKILL a node, then a master (failover by hand, then on etcd); every ack kept",
        description="Part 1: one node takes sends with acks=durable and is SIGKILLed "
        "mid-stream; the bytes after the last ack are overwritten with garbage; the node "
        "restarts and every acknowledged message is read back byte for byte (--rounds "
        "crashes on the same log). Part 2: a master and two slaves take sends with "
        "acks=replicated; the master is SIGKILLed, slave-1 is promoted, slave-2 follows it, "
        "and every replicated ack is checked on both survivors. Part 3: the same with no "
        "operator: etcd and three nodes elect their master, it is SIGKILLed, a new one is "
        "elected, the producers find it on their own, every ack is checked on the survivors "
        "and the old master comes back as a slave with its divergent tail cut. Real "
        "processes, sockets, files.",
    )
    demo.add_argument(
        "--dir", type=Path, default=None, help="keep the data here (default: a temp dir, removed)"
    )
    demo.add_argument("--rounds", type=int, default=3, help="crashes to survive (default 3)")
    demo.add_argument(
        "--acks-per-round",
        "--acks",
        dest="acks_per_round",
        type=positive_int,
        default=3000,
        metavar="N",
        help="acknowledged messages before each SIGKILL (default 3000; a count, unlike "
        "produce --acks, which is a level)",
    )
    demo.set_defaults(handler=cmd_demo)

    bench = commands.add_parser("bench", help="measure throughput and latency")
    bench_kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")
    storage = bench_kinds.add_parser(
        "storage",
        help="appends, batched appends, async flush and group commit against the disk's floor",
        description="Measure the storage engine in-process, with its baselines (the disk's "
        "fsync latency, a raw copy into a map) from the same run. Takes about a minute.",
    )
    storage.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory on the disk to measure (default: the system temp dir)",
    )
    storage.add_argument(
        "--seconds", type=float, default=1.5, help="duration of each measurement (default 1.5)"
    )
    storage.add_argument("--json", action="store_true", help="one JSON object, keys name units")
    storage.set_defaults(handler=cmd_bench_storage)
    replication = bench_kinds.add_parser(
        "replication",
        help="catch-up streaming of a log to a slave process: sendfile against the copy path",
        description="Write a log of --size on this disk and stream it over loopback to a "
        "receiving process with os.sendfile and with read+send, reporting MB/s and the "
        "master's CPU seconds per GiB for each, beside raw blocking loops; then the "
        "replication lag (master append to slave ack, p50/p99) of a steady 1 KiB load on a "
        "master with one slave process.",
    )
    replication.add_argument("--size", default="2GiB", help="log size (default 2GiB)")
    replication.add_argument("--repeats", type=int, default=3, help="runs per mode (median)")
    replication.add_argument("--dir", type=Path, default=None, help="where to write the log")
    replication.add_argument("--json", action="store_true", help="one JSON object")
    replication.add_argument(
        "--lag-seconds", type=float, default=5.0, help="lag measurement length (0: skip it)"
    )
    replication.add_argument(
        "--lag-rate", type=float, default=2000.0, help="lag load in 1 KiB msgs/s (default 2000)"
    )
    replication.add_argument("--lag-only", action="store_true", help="skip the catch-up runs")
    replication.set_defaults(handler=cmd_bench_replication)
    failover = bench_kinds.add_parser(
        "failover",
        help="repeated master SIGKILLs under acks=replicated: time to the next ack, acks lost",
        description="Start etcd and three nodes (LocalCluster), keep producers sending at "
        "acks=replicated, SIGKILL the master --kills times (restarting it as a slave in "
        "between) and report the time from each kill to the new master's election and to the "
        "first replicated ack on it (p50/p99), and the acknowledged messages missing on any "
        "node at the end (must be 0; exit 1 otherwise).",
    )
    failover.add_argument("--kills", type=positive_int, default=20, help="master kills (20)")
    failover.add_argument("--dir", type=Path, default=None, help="where the cluster lives")
    failover.add_argument("--json", action="store_true", help="one JSON object")
    failover.set_defaults(handler=cmd_bench_failover)
    scale = bench_kinds.add_parser(
        "scale",
        help="produce throughput over 1,000 queues, with 1,000 long polls parked, "
        "against one queue",
        description="Start a node; many producers (each its own connection, one 1 KiB "
        "message per request, acks=leader) write one queue, then --queues queues, then "
        "the same with --polls long polls parked on distinct queues of an idle topic. "
        "Reports msgs/s, node CPU per message, the ratios to the single queue and the "
        "node's peak RSS.",
    )
    scale.add_argument("--seconds", type=float, default=3.0, help="per workload (default 3)")
    scale.add_argument("--queues", type=int, default=1000, help="queues written (1000)")
    scale.add_argument("--producers", type=int, default=200, help="producers (200)")
    scale.add_argument("--polls", type=int, default=1000, help="long polls parked (1000)")
    scale.add_argument(
        "--poll-connections", type=int, default=10, help="connections the polls share (10)"
    )
    scale.add_argument("--json", action="store_true", help="one JSON object")
    scale.set_defaults(handler=cmd_bench_scale)
    for kind, text in (
        (
            "produce",
            "send 128 B and 1 KiB messages: sequential latency, batched and pipelined "
            "throughput, beside a bare trio echo server and the store alone",
        ),
        ("consume", "read back with large pulls (msgs/s)"),
    ):
        node_bench = bench_kinds.add_parser(kind, help=text, description=text + ".")
        node_bench.add_argument(
            "--bootstrap",
            "-b",
            type=address_argument,
            help="measure this node, host:port (default: start one in a temp dir)",
        )
        node_bench.add_argument(
            "--acks",
            help="ack levels, comma separated (default leader,durable; with --replicas "
            "leader,in_sync,replicated)",
        )
        node_bench.add_argument(
            "--replicas",
            type=int,
            default=0,
            help="start a master and this many slave processes (min-insync-replicas N) "
            "instead of one node, so acks=replicated can be measured (default 0)",
        )
        node_bench.add_argument("--seconds", type=float, default=2.0, help="per measurement")
        node_bench.add_argument("--json", action="store_true", help="one JSON object")
        if kind == "produce":
            node_bench.add_argument(
                "--trace",
                action="store_true",
                help="instead of the workloads: send one message at a time at each ack "
                "level and print the median of each hop (client, master, slaves) in us",
            )
            node_bench.add_argument(
                "--client",
                metavar="CLIENTS",
                help="produce from each of these clients in turn, comma separated: trio, "
                "asyncio, blocking (default trio); figures of the others carry the client's "
                "name after the ack level, with their ratios to trio",
            )
        node_bench.set_defaults(handler=cmd_bench_node, kind=kind)
    add_chaos_commands(commands)
    add_docker_commands(commands)
    add_log_level_everywhere(parser)
    return parser


def add_docker_commands(commands: Any) -> None:
    """``tidelog docker engine|build|up|status|down|chaos``: a cluster in containers."""
    from tools.docker.commands import add_parser

    add_parser(commands).set_defaults(handler=cmd_docker)


def cmd_docker(args: argparse.Namespace) -> int:
    from tools.docker.commands import run

    return run(args)


def add_chaos_commands(commands: Any) -> None:
    """``tidelog chaos ...``: judge a chaos run from its history."""
    from tools.chaos.cli import add_check_arguments
    from tools.chaos.history import ACK_LEVELS

    chaos = commands.add_parser("chaos", help="chaos runs: judge a run's history")
    kinds = chaos.add_subparsers(dest="chaos_kind", metavar="KIND", required=True)
    text = (
        "judge a chaos run from its history.jsonl alone: lost, duplicated or reordered "
        "messages, replica divergence and recovery times; writes results.json and "
        "report.html into RUN_DIR; exits 0 when valid, 1 on anomalies, 2 when unreadable"
    )
    check = kinds.add_parser("check", help=text.split(":")[0], description=text + ".")
    add_check_arguments(check)
    check.set_defaults(handler=cmd_chaos_check)
    text = (
        "run producers and consumers against a local cluster (or --bootstrap) while a "
        "nemesis drawn from the seed injects faults; then heal, drain every node, write "
        "history.jsonl, run.json, results.json and report.html into the run folder and "
        "exit with the checker's verdict (0 valid, 1 anomalies)"
    )
    run = kinds.add_parser("run", help=text.split(";")[0], description=text + ".")
    run.add_argument(
        "--duration", type=float, default=120.0, help="seconds of workload (default 120)"
    )
    run.add_argument(
        "--nemesis",
        default="kill,pause,partition",
        help="fault kinds, comma separated, or 'none' (default kill,pause,partition)",
    )
    run.add_argument("--acks", choices=ACK_LEVELS, default="replicated")
    run.add_argument("--seed", type=int, default=7, help="draws the schedule and the workload")
    run.add_argument("--out", help="run folder (default chaos-runs/DATE-seedN)")
    run.add_argument(
        "--bootstrap", help="host:port[,host:port...] of a running cluster (no nemesis)"
    )
    run.add_argument("--producers", type=positive_int, default=4)
    run.add_argument("--queues", type=positive_int, default=4)
    run.add_argument(
        "--cluster",
        choices=("static", "failover"),
        default="static",
        help="static: a master and slaves with fixed roles; failover: etcd and elected masters",
    )
    run.set_defaults(handler=cmd_chaos_run)
    from tools.chaos.scenarios import SCENARIOS

    text = "run one fixed failover scenario, judged by the checker, measuring unavailability"
    scenario = kinds.add_parser("scenario", help=text, description=text + ".")
    scenario.add_argument(
        "name", metavar="NAME", choices=sorted(SCENARIOS), help=", ".join(sorted(SCENARIOS))
    )
    scenario.add_argument("--acks", choices=ACK_LEVELS, default="replicated")
    scenario.add_argument("--seed", type=int, default=7)
    scenario.add_argument("--out", help="run folder (default chaos-runs/DATE-NAME)")
    scenario.add_argument(
        "--cluster",
        choices=("static", "failover"),
        default="failover",
        help="failover (default): etcd and elected masters; static: fixed roles",
    )
    scenario.set_defaults(handler=cmd_chaos_scenario)
    text = (
        "the totals of many chaos runs from their run.json and results.json: one row per "
        "run (seed, cluster, commit, acked, faults by kind, master changes, lost, valid, "
        "recovery p50/p99), then runs, faults, acked, lost and recovery across all; exits "
        "0 when every run is valid, 1 when one is not, 2 when a folder cannot be read"
    )
    summary = kinds.add_parser("summary", help=text.split(":")[0], description=text + ".")
    summary.add_argument(
        "dirs", metavar="DIR", nargs="+", help="a chaos run folder, or a folder of run folders"
    )
    summary.add_argument(
        "--format", choices=("text", "markdown", "json"), default="text", dest="style"
    )
    summary.set_defaults(handler=cmd_chaos_summary)


def cmd_chaos_check(args: argparse.Namespace) -> int:
    from tools.chaos.cli import run_check

    return run_check(args.run_dir, as_json=args.json, write_html=not args.no_report)


def cmd_chaos_summary(args: argparse.Namespace) -> int:
    from tools.chaos.summary import summarize_runs

    return summarize_runs(args.dirs, style=args.style)


def quiet_late_answers() -> None:
    """Under faults, answers that arrive after their request timed out are expected: the
    client's warning about each would drown a chaos run's output."""
    logging.getLogger("cluster.client.connection").setLevel(logging.ERROR)


def cmd_chaos_run(args: argparse.Namespace) -> int:
    from tools.chaos.runner import run_chaos, settings_from_args

    quiet_late_answers()

    try:
        settings = settings_from_args(
            duration_s=args.duration,
            nemesis=args.nemesis,
            acks=args.acks,
            seed=args.seed,
            out=args.out,
            bootstrap=args.bootstrap,
            producers=args.producers,
            queues=args.queues,
            cluster=args.cluster,
        )
        return trio.run(lambda: run_chaos(settings)).exit_code
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_chaos_scenario(args: argparse.Namespace) -> int:
    from tools.chaos.scenarios import run_scenario

    quiet_late_answers()

    try:
        return trio.run(
            lambda: run_scenario(
                args.name, acks=args.acks, seed=args.seed, out=args.out, cluster=args.cluster
            )
        ).exit_code
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str) -> str:
    """``--log-level``: one of :data:`LOG_LEVELS`, any case."""
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown level {value!r}; use one of {', '.join(LOG_LEVELS)} (any case)"
        )
    return value.upper()


def add_log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--log-level`` after any subcommand too (``tidelog node --log-level INFO``);
    the subcommand's copy has no default, so it never hides the top-level one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                subparser.add_argument(
                    "--log-level",
                    type=log_level,
                    default=argparse.SUPPRESS,
                    metavar="LEVEL",
                    help=LOG_LEVEL_HELP,
                )
                add_log_level_everywhere(subparser)


LOG_LEVEL_HELP = (
    "stdlib logging level: DEBUG, INFO, WARNING, ERROR, CRITICAL "
    "(default: INFO for `node`, WARNING for the rest); also accepted after the command"
)


def version() -> str:
    try:
        return metadata.version("tidelog")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: run `pip install -e .`)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_relative_times(sys.argv[1:] if argv is None else argv))
    level = args.log_level or ("INFO" if args.command == "node" else "WARNING")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130  # Ctrl-C: the user asked to stop; 128 + SIGINT, as shells expect
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None and not group.subgroup(Exception):
            return 130
        raise
    except BrokenPipeError:  # `tidelog consume ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
