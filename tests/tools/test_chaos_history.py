"""history.jsonl: the writer appends flushed lines; the reader refuses bad lines by number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.chaos.history import (
    NOT_SENT_PREFIX,
    HistoryError,
    HistoryWriter,
    is_uncertain_error,
    read_history,
)


def _send_invoke(writer: HistoryWriter, time_s: float = 0.5) -> None:
    writer.append(
        time_s=time_s,
        type="invoke",
        process="producer-0",
        f="send",
        value={"queue": "chaos:0", "message": "producer-0:0", "acks": "replicated"},
    )


def test_each_event_is_on_disk_before_the_next_is_written(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    with HistoryWriter(path) as writer:
        _send_invoke(writer)
        assert path.read_text().count("\n") == 1  # flushed, not buffered until close
        writer.append(
            time_s=1.5,
            type="info",
            process="producer-0",
            f="send",
            value={"queue": "chaos:0", "message": "producer-0:0", "acks": "replicated"},
            node="n1",
            error="timeout",
        )
    events = read_history(path)
    assert [e.index for e in events] == [0, 1]
    assert events[1].error == "timeout" and events[1].node == "n1"
    assert list(json.loads(path.read_text().splitlines()[0])) == [
        "index",
        "time_s",
        "type",
        "process",
        "f",
        "value",
        "node",
        "error",
    ]


def test_the_writer_never_overwrites_a_history(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text("")
    with pytest.raises(FileExistsError):
        HistoryWriter(path)


def test_the_writer_refuses_time_going_back_and_bad_events(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "history.jsonl") as writer:
        _send_invoke(writer, time_s=2.0)
        with pytest.raises(HistoryError, match="goes back"):
            writer.append(time_s=1.0, type="ok", process="producer-0", f="send", value={})
        with pytest.raises(HistoryError, match="type must be one of"):
            writer.append(time_s=3.0, type="timeout", process="producer-0", f="send", value={})
        with pytest.raises(HistoryError, match="completes no open invoke"):
            writer.append(time_s=3.0, type="ok", process="consumer-0", f="poll", value={})
    assert len(read_history(tmp_path / "history.jsonl")) == 1


GOOD = '{"index":0,"time_s":0.1,"type":"invoke","process":"p","f":"send","value":{},"node":null,"error":null}'


@pytest.mark.parametrize(
    ("second_line", "words"),
    [
        ("not json", "history line 2: not JSON"),
        ("[1, 2]", "history line 2: expected a JSON object"),
        ('{"index": 1}', "history line 2: missing key(s) time_s"),
        (
            GOOD.replace('"index":0', '"index":7'),
            "history line 2: index must be the line number - 1",
        ),
        (
            GOOD.replace('"index":0', '"index":1').replace('"type":"invoke"', '"type":"timeout"'),
            "history line 2: type must be one of",
        ),
        (
            GOOD.replace('"index":0', '"index":1').replace('"f":"send"', '"f":"delete"'),
            "history line 2: f must be one of",
        ),
        (
            GOOD.replace('"index":0', '"index":1').replace('"time_s":0.1', '"time_s":0.05'),
            "history line 2: time_s 0.05 goes back",
        ),
        (
            GOOD.replace('"index":0', '"index":1'),
            "history line 2: process 'p' invokes again while its operation of line 1",
        ),
        (
            GOOD.replace('"index":0', '"index":1')
            .replace('"type":"invoke"', '"type":"ok"')
            .replace('"f":"send"', '"f":"poll"'),
            "history line 2: completion f='poll' does not match",
        ),
        (
            GOOD.replace('"index":0', '"index":1').replace('"error":null', '"error":null,"x":1'),
            "unknown key",
        ),
    ],
)
def test_the_reader_names_the_malformed_line(tmp_path: Path, second_line: str, words: str) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(GOOD + "\n" + second_line + "\n")
    with pytest.raises(HistoryError) as caught:
        read_history(path)
    assert words in str(caught.value)


def test_a_torn_last_line_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(GOOD + "\n" + GOOD[:30])
    with pytest.raises(
        HistoryError, match=r"history line 2: no newline at the end .*drop the partial line"
    ):
        read_history(path)


def test_a_completion_without_invoke_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(GOOD.replace('"type":"invoke"', '"type":"ok"') + "\n")
    with pytest.raises(
        HistoryError, match="history line 1: ok of process 'p' completes no open invoke"
    ):
        read_history(path)


@pytest.mark.parametrize(
    "error", ["FLUSH_SLAVE_TIMEOUT", "FLUSH_DISK_TIMEOUT", "TimeoutError: read timed out"]
)
def test_a_timeout_is_never_recorded_as_fail(tmp_path: Path, error: str) -> None:
    with HistoryWriter(tmp_path / "history.jsonl") as writer:
        _send_invoke(writer)
        with pytest.raises(HistoryError, match="record it as 'info'"):
            writer.append(
                time_s=1.0, type="fail", process="producer-0", f="send", value={}, error=error
            )
        writer.append(
            time_s=1.0, type="fail", process="producer-0", f="send", value={}, error="NOT_MASTER"
        )


def test_a_send_the_client_never_made_may_fail_whatever_its_reason_says(tmp_path: Path) -> None:
    """A connect that timed out sent nothing: certain, though its words say 'timed out'
    (a killed container's address answers nothing; such runs used to die here)."""
    reason = f"{NOT_SENT_PREFIX}cannot connect to 10.213.7.11:7600 (connect timed out)"
    assert not is_uncertain_error(reason)
    assert is_uncertain_error("cannot connect to 10.213.7.11:7600 (connect timed out)")
    with HistoryWriter(tmp_path / "history.jsonl") as writer:
        _send_invoke(writer)
        writer.append(
            time_s=1.0, type="fail", process="producer-0", f="send", value={}, error=reason
        )
    assert read_history(tmp_path / "history.jsonl")[-1].error == reason
