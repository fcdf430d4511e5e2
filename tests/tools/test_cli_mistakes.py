"""The first hour's mistakes, made with the real `tidelog` command: each one gets a short
paragraph that names what was wrong and what to do, never a traceback.

Every node here is a real process on a free port, stopped by its PID even on failure.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import trio

from tests.helpers import CLI, running_node, tidelog
from tools.process import NodeProcess, node_status, wait_until


def assert_one_paragraph(text: str, *needles: str) -> None:
    """A few lines, no blank line inside, no traceback, and every needle in it."""
    assert "Traceback" not in text and "Exception Group" not in text, text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "no error message at all"
    assert len(lines) <= 6 and "\n\n" not in text.strip(), text
    for needle in needles:
        assert needle in text, (needle, text)


def error_lines(stderr: str) -> str:
    """stderr without the node's own log lines (timestamped), which are not the error."""
    return "\n".join(line for line in stderr.splitlines() if not line[:4].isdigit())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    with running_node(tmp_path / "node") as process:
        yield process


@pytest.fixture
def master(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path / "master", extra_args=["--ha-port", "0"]).start()
    try:
        yield process
    finally:
        process.kill()


def read_line(stream: IO[str], timeout_s: float = 30.0) -> str:
    """The next line of a child's output, or a failure (never a hang)."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    assert ready, f"no output within {timeout_s}s"
    return stream.readline()


def ha_address(node: NodeProcess) -> str:
    address: str = trio.run(node_status, node.address)["replication"]["ha_address"]
    return address


# ---- a node that cannot start --------------------------------------------------------------


def test_client_port_in_use_names_the_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = tidelog("node", "--data-dir", str(tmp_path / "d"), "--port", str(port))
    assert run.returncode == 1
    assert_one_paragraph(error_lines(run.stderr), f"port {port}", "already in use", "--port")


def test_ha_port_in_use_names_the_ha_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = tidelog("node", "--data-dir", str(tmp_path / "d"), "--port", "0",
                      "--ha-port", str(port))  # fmt: skip
    assert run.returncode == 1
    assert_one_paragraph(error_lines(run.stderr), f"port {port}", "--ha-port")


def test_data_dir_under_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    data_dir = tmp_path / "a-file" / "data"
    run = tidelog("node", "--data-dir", str(data_dir), "--port", "0")
    assert run.returncode == 1
    assert_one_paragraph(error_lines(run.stderr), str(data_dir), "--data-dir")


def test_a_data_dir_in_use_by_another_node_is_named(tmp_path: Path) -> None:
    first = NodeProcess(tmp_path / "d").start()
    try:
        run = tidelog("node", "--data-dir", str(tmp_path / "d"), "--port", "0")
    finally:
        first.kill()
    assert run.returncode == 1
    assert_one_paragraph(error_lines(run.stderr), "in use by another process", "cannot start")


def test_a_node_says_when_it_stopped_cleanly(tmp_path: Path) -> None:
    """At the default level a node logs its life, its shutdown included."""
    process = subprocess.Popen(
        [*CLI, "node", "--data-dir", str(tmp_path / "d"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert "listening on" in read_line(process.stdout)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err
    assert "stopped cleanly" in out
    assert "node_stopped" in err and "Traceback" not in err


# ---- the command line itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("status", "-b", "localhost"), ("'localhost'", "host:port")),
        (("status", "-b", "127.0.0.1:99999"), ("invalid port 99999",)),
        (("consume", "orders", "--from", "abc"), ("--from", "'abc'", "earliest, latest")),
        (("--log-level", "LOUD", "status"), ("--log-level", "'LOUD'", "DEBUG")),
        (("status", "--log-level", "LOUD"), ("--log-level", "'LOUD'")),
    ],
)
def test_bad_arguments_get_one_line(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    run = tidelog(*args)
    assert run.returncode == 2
    assert_one_paragraph(run.stderr, *needles)


def test_version_and_log_level_after_the_command() -> None:
    version = tidelog("--version")
    assert version.returncode == 0 and version.stdout.startswith("tidelog ")
    port = free_port()
    after = tidelog("status", "-b", f"127.0.0.1:{port}", "--log-level", "debug")
    assert after.returncode == 2  # parsed (nothing listens there), not a usage error
    assert "unrecognized arguments" not in after.stderr


# ---- talking to the wrong place ------------------------------------------------------------


def test_connection_refused_names_the_address_at_once() -> None:
    port = free_port()
    run = tidelog("status", "-b", f"127.0.0.1:{port}")
    assert run.returncode == 2
    # The fast path's words ("refused at"), not the retry loop's ("within 5s").
    assert_one_paragraph(run.stderr, f"connection refused at 127.0.0.1:{port}", "running")
    assert "within" not in run.stderr


def test_the_replication_port_is_named_as_such(master: NodeProcess) -> None:
    run = tidelog("status", "-b", ha_address(master))
    assert run.returncode == 2
    assert_one_paragraph(run.stderr, "replication port", "--port")


def test_unknown_topic_names_the_command_that_creates_it(node: NodeProcess) -> None:
    run = tidelog("consume", "nope", "-b", node.address)
    assert run.returncode == 2
    assert_one_paragraph(run.stderr, "UNKNOWN_TOPIC", "tidelog topic create nope")
    produced = tidelog("produce", "nope", "-b", node.address, stdin="x\n")
    assert produced.returncode == 1 and "Traceback" not in produced.stderr
    assert "UNKNOWN_TOPIC" in produced.stdout and "tidelog topic create nope" in produced.stdout


def test_ctrl_c_stops_a_following_consumer_quietly(node: NodeProcess) -> None:
    assert tidelog("topic", "create", "orders", "-b", node.address).returncode == 0
    assert tidelog("produce", "orders", "-b", node.address, stdin="first\n").returncode == 0
    consumer = subprocess.Popen(
        [*CLI, "consume", "orders", "--follow", "-b", node.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert consumer.stdout is not None
        assert read_line(consumer.stdout) == "first\n"  # it is in its follow loop now
        consumer.send_signal(signal.SIGINT)
        _out, err = consumer.communicate(timeout=30)
    finally:
        consumer.kill()
        consumer.wait()
    assert consumer.returncode == 130
    assert err == ""


def test_one_oversized_line_fails_alone(node: NodeProcess) -> None:
    assert tidelog("topic", "create", "big", "-b", node.address).returncode == 0
    lines = "small-1\n" + "x" * (5 << 20) + "\nsmall-2\n"
    run = tidelog("produce", "big", "--json", "-b", node.address, stdin=lines)
    summary = json.loads(run.stdout)
    assert (summary["ok"], summary["failed"]) == (2, 1), summary
    assert list(summary["errors"]) == [
        next(k for k in summary["errors"] if "MESSAGE_TOO_LARGE" in k)
    ]
    consumed = tidelog("consume", "big", "-b", node.address)
    assert sorted(consumed.stdout.split()) == ["small-1", "small-2"]


def test_producing_to_a_slave_lands_on_the_master(tmp_path: Path, master: NodeProcess) -> None:
    node = master
    slave = NodeProcess(
        tmp_path / "slave",
        name="slave-1",
        extra_args=[
            "--role",
            "slave",
            "--master-ha",
            ha_address(node),
            "--master-client",
            node.address,
        ],
    ).start()
    try:
        assert tidelog("topic", "create", "orders", "-b", node.address).returncode == 0
        run = tidelog("produce", "orders", "--json", "-b", slave.address, stdin="hello\n")
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)["ok"] == 1

        async def on_master() -> bool:
            return int((await node_status(node.address))["max_offset"]) > 0

        trio.run(wait_until, "the message on the master", on_master)
    finally:
        slave.kill()


def test_status_for_people_has_no_python_reprs(node: NodeProcess) -> None:
    run = tidelog("status", "-b", node.address)
    assert run.returncode == 0, run.stderr
    for repr_word in ("None", "True", "False", "[{", "{'"):
        assert repr_word not in run.stdout, (repr_word, run.stdout)


def test_health_gives_up_after_its_timeout_and_says_nothing_answered() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        run = tidelog("health", f"127.0.0.1:{port}", "--timeout-ms", "100")
    assert run.returncode == 2, run.stderr
    assert f"no health answer from http://127.0.0.1:{port}/health" in run.stderr
