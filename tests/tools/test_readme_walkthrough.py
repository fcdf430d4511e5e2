"""The README's own commands, run as written (free ports substituted, in a fresh directory):
"Running a node" and "A master and a slave". If the README drifts from the CLI, this fails.

Each ``tidelog node`` line starts a real process in the background (as a reader would in a
second terminal); every other line runs through the shell with the installed ``tidelog``
on ``PATH``. Every node is stopped by its PID, even when a step fails.
"""

from __future__ import annotations

import base64
import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tools.process import node_status, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent
README_PORTS = (7600, 7620, 7621, 7630)


def shell_block(heading: str) -> list[str]:
    """The commands of the first ```sh block after ``heading``, continuation lines joined."""
    text = README.read_text()
    start = text.index(heading)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no sh block after {heading!r}"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


def free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class Walkthrough:
    """Runs README lines in one directory with the README's ports mapped to free ones."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = dict(zip(README_PORTS, free_ports(len(README_PORTS)), strict=True))
        self.env = dict(
            os.environ,
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            TIDELOG_BOOTSTRAP=f"127.0.0.1:{self.ports[7600]}",
        )
        self.nodes: list[subprocess.Popen[str]] = []

    def substitute(self, line: str) -> str:
        return re.sub(r"\b(7600|7620|7621|7630)\b", lambda m: str(self.ports[int(m.group())]), line)

    def run(self, line: str) -> str:
        """A node line starts a node and waits until it listens; others run to the end."""
        command = self.substitute(line)
        if command.startswith("tidelog node"):
            self._start_node(command)
            return ""
        if "--follow" in command:
            return self._follow_then_ctrl_c(command)
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, (line, done.stderr)
        return done.stdout

    def _follow_then_ctrl_c(self, command: str) -> str:
        """A following consumer: its first message, then Ctrl-C, which must end it quietly."""
        follower = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.directory,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert follower.stdout is not None
            ready, _, _ = select.select([follower.stdout], [], [], 30)
            assert ready, f"nothing printed by: {command}"
            first = follower.stdout.readline()
            follower.send_signal(signal.SIGINT)
            _rest, err = follower.communicate(timeout=30)
        finally:
            follower.kill()
            follower.wait()
        assert follower.returncode == 130 and err == "", (command, err)
        return first

    def _start_node(self, command: str) -> None:
        node = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.directory,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.nodes.append(node)
        assert node.stdout is not None
        ready, _, _ = select.select([node.stdout], [], [], 30)
        assert ready, f"no ready line from: {command}"
        assert "listening on" in node.stdout.readline(), command

    def stop(self) -> list[int]:
        """SIGTERM every node (slaves first) and return their exit codes."""
        codes = []
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
            try:
                codes.append(node.wait(30))
            except subprocess.TimeoutExpired:
                node.kill()
                codes.append(node.wait())
        return codes


@pytest.fixture
def walkthrough(tmp_path: Path) -> Iterator[Walkthrough]:
    walk = Walkthrough(tmp_path)
    try:
        yield walk
    finally:
        for node in walk.nodes:
            node.kill()
            node.wait()


def test_running_a_node(walkthrough: Walkthrough) -> None:
    lines = shell_block("## Running a node")
    assert lines[0].startswith("tidelog node")
    outputs = [walkthrough.run(line) for line in lines]
    consumed = outputs[
        next(
            i
            for i, line in enumerate(lines)
            if line.split("#")[0].strip() == "tidelog consume orders"
        )
    ]
    assert sorted(consumed.split()) == ["one", "two"]
    assert "role" in outputs[-1] and "master" in outputs[-1]
    assert (walkthrough.directory / "data").is_dir()  # the README's place, git-ignored
    assert walkthrough.stop() == [0]


def test_a_master_and_a_slave(walkthrough: Walkthrough) -> None:
    lines = shell_block("### A master and a slave")
    outputs = []
    for line in lines:
        outputs.append(walkthrough.run(line))
        if "--role slave" in line:  # a reader waits for the slave too: it logs when in sync
            master = f"127.0.0.1:{walkthrough.ports[7620]}"

            async def in_sync(master: str = master) -> bool:
                return len((await node_status(master))["replication"]["in_sync"]) == 1

            trio.run(wait_until, "the slave in sync", in_sync)
    from_slave = outputs[next(i for i, line in enumerate(lines) if "consume" in line)]
    assert sorted(from_slave.split()) == ["one", "three", "two"]
    assert (walkthrough.directory / "data" / "m").is_dir()
    assert (walkthrough.directory / "data" / "s").is_dir()
    assert walkthrough.stop() == [0, 0]


def test_copying_a_topic_through_json_lines_keeps_binary_bodies(
    walkthrough: Walkthrough,
) -> None:
    walkthrough.run("tidelog node --data-dir data --port 7600")
    walkthrough.run("tidelog topic create a --queues 2")
    walkthrough.run("tidelog topic create b --queues 2")
    binary = base64.b64encode(bytes(range(256))).decode()
    (walkthrough.directory / "in.jsonl").write_text(
        '{"body": "text", "tags": "t", "props": {"k": "v"}, "queue": 1}\n'
        f'{{"body_base64": "{binary}", "queue": 0}}\n'
    )
    walkthrough.run("tidelog produce a --jsonl < in.jsonl")
    walkthrough.run("tidelog consume a --json | tidelog produce b --jsonl")
    copied = walkthrough.run("tidelog consume b --json")
    original = walkthrough.run("tidelog consume a --json")

    def without_positions(text: str) -> list[str]:
        return sorted(re.sub(r'"(offset|store_us)": \d+, ', "", line) for line in text.splitlines())

    assert without_positions(copied) == without_positions(original)
    assert '"body_base64"' in copied and '"tags": "t"' in copied
