"""Sessions sharing our dockerd: each registers as a user, and the engine stops only at
the release of its last user (a session's end once stopped it under another session's
containers). The registry is checked with real processes; the last test with the real
engine and a second session in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.docker.engine import Engine, EngineSettings, EngineUsers, stops_with_last_user


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])


def test_a_user_counts_while_its_process_runs_and_its_file_goes_after(tmp_path: Path) -> None:
    users = EngineUsers(tmp_path / "users")
    child = _sleeper()
    try:
        users.add(child.pid)
        assert users.live() == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert users.live() == []
    assert not (tmp_path / "users" / str(child.pid)).exists()


def test_a_recycled_pid_is_not_a_user(tmp_path: Path) -> None:
    users = EngineUsers(tmp_path / "users")
    child = _sleeper()
    try:
        users.add(child.pid)
        # the same PID with another start time: a different process that got the number
        (tmp_path / "users" / str(child.pid)).write_text("1")
        assert users.live() == []
    finally:
        child.kill()
        child.wait()


def test_remove_and_garbage_files(tmp_path: Path) -> None:
    users = EngineUsers(tmp_path / "users")
    assert users.live() == []  # no folder yet
    child = _sleeper()
    try:
        users.add(child.pid)
        (tmp_path / "users" / "not-a-pid").write_text("x")
        users.remove(child.pid)
        users.remove(child.pid)  # twice is fine
        assert users.live() == []
        assert list((tmp_path / "users").iterdir()) == []
    finally:
        child.kill()
        child.wait()


def test_only_a_session_started_engine_stops_and_only_with_its_last_user() -> None:
    session_started = {"pid": 1, "stop_with_last_user": True}
    cli_started = {"pid": 1, "stop_with_last_user": False}
    older_record = {"pid": 1}
    assert stops_with_last_user(session_started, [])
    assert not stops_with_last_user(session_started, [4242])
    assert not stops_with_last_user(cli_started, [])
    assert not stops_with_last_user(older_record, [])


_SECOND_SESSION = """
import sys
from tools.docker.engine import Engine
engine = Engine().acquire()
print(engine.docker_host, flush=True)
sys.stdin.readline()
engine.release()
print("released", flush=True)
"""


def test_a_second_session_ending_leaves_the_engine_to_the_first(docker_engine: Engine) -> None:
    """A child process acquires the engine this session holds and releases it: the
    engine keeps answering and the child is no user any more."""
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _SECOND_SESSION],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        docker_host = child.stdout.readline().strip()
        assert docker_host == docker_engine.docker_host
        if docker_engine.settings.record_path.exists():  # our dockerd: users are counted
            assert child.pid in docker_engine.users.live()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.pid not in docker_engine.users.live()
    assert docker_engine.answers(docker_engine.docker_host)


def test_engine_stop_while_a_session_uses_it_is_left_to_that_session(tmp_path: Path) -> None:
    """``engine stop`` under a running session stops nothing now: the daemon is marked to
    stop at the release of its last user (no dockerd is touched here: the record names
    none)."""
    settings = EngineSettings(state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    settings.run_dir.mkdir(parents=True)
    record = {"pid": 0, "argv": ["dockerd"], "host_before": {}, "stop_with_last_user": False}
    settings.record_path.write_text(json.dumps(record))
    engine = Engine(settings=settings)
    session = _sleeper()
    try:
        engine.users.add(session.pid)
        assert engine.stop() == [session.pid]
        assert settings.record_path.exists()  # not stopped
        assert json.loads(settings.record_path.read_text())["stop_with_last_user"] is True
        assert stops_with_last_user(json.loads(settings.record_path.read_text()), [])
    finally:
        session.kill()
        session.wait()
