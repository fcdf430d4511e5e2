"""report.html: self-contained (no URL to fetch), states the verdict; ``chaos check`` writes it.

The headless-Chromium render is in test_chaos_report_browser.py (it needs Debian's chromium).
"""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import attrs

from tests.tools.test_chaos_histories import HistoryBuilder, clean_history
from tools.chaos.checker import check
from tools.chaos.cli import run_check
from tools.chaos.history import Event
from tools.chaos.report import render_report

COMMAND = "tidelog chaos run --duration 30 --nemesis kill,partition --acks replicated --seed 7"


def _insert(events: list[Event], position: int, process: str, f: str, value: dict) -> None:
    """Insert a lone event at ``position`` (same time as the one before) and renumber."""
    time_s = events[position - 1].time_s
    events.insert(position, Event(position, time_s, "info", process, f, value))
    for i in range(position + 1, len(events)):
        events[i] = attrs.evolve(events[i], index=i)


def synthetic_run(folder: Path, lose: int = 3) -> list[Event]:
    """A 30-second run with faults, one master change and ``lose`` acked messages lost."""
    history = clean_history(11, steps=3000, producers=4, consumers=2, queues=2)
    events = copy.deepcopy(history.events)
    _insert(events, len(events) // 2, "observer", "master", {"master": "n2", "epoch": 2})
    acked = [e.value["message"] for e in events if e.f == "send" and e.type == "ok"]
    gone = set(acked[-lose:]) if lose else set()
    for i, event in enumerate(events):
        if event.f == "drain" and event.type == "ok":
            kept = [m for m in event.value["messages"] if m[1] not in gone]
            events[i] = attrs.evolve(event, value=event.value | {"messages": kept})
    builder = HistoryBuilder()
    builder.events = events
    folder.mkdir(parents=True, exist_ok=True)
    builder.write(folder / "history.jsonl")
    manifest = {"seed": 7, "git_revision": "0123abc", "command": COMMAND, "acks": "replicated"}
    (folder / "run.json").write_text(json.dumps(manifest))
    return events


def test_the_report_is_self_contained_and_states_the_verdict(tmp_path: Path) -> None:
    events = synthetic_run(tmp_path)
    result = check(events)
    assert not result.valid
    page = render_report(events, result, json.loads((tmp_path / "run.json").read_text()))
    assert "Verdict: FAIL" in page
    assert re.search(r"<tr class=fail><td>lost</td><td>FAIL</td><td class=num>3</td>", page)
    assert COMMAND in page
    assert page.count("Plotly.newPlot(") == 3  # latency, throughput, lost
    assert page.count('<script type="text/javascript">/**') == 1  # plotly.js inlined once
    assert _external_references(page) == []


class _References(HTMLParser):
    """Every src/href attribute of the page's tags (script bodies are not tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") or (tag == "link" and name == "rel"):
                self.found.append((tag, name, value or ""))


def _external_references(page: str) -> list[tuple[str, str, str]]:
    parser = _References()
    parser.feed(page)
    return [ref for ref in parser.found if ref[1] == "rel" or not ref[2].startswith("#")]


def test_a_clean_run_reports_pass_and_no_loss(tmp_path: Path) -> None:
    events = synthetic_run(tmp_path, lose=0)
    page = render_report(events, check(events), {})
    assert "Verdict: PASS" in page
    assert "No acknowledged message is missing" in page
    assert "No run.json was found" in page


def test_check_cli_writes_results_and_report_and_exits_by_verdict(tmp_path: Path, capsys) -> None:
    synthetic_run(tmp_path / "bad")
    synthetic_run(tmp_path / "good", lose=0)
    assert run_check(tmp_path / "bad") == 1
    table = capsys.readouterr().out
    assert "verdict: FAIL" in table
    assert re.search(r"^lost +FAIL +3 ", table, re.M)
    assert (tmp_path / "bad" / "report.html").exists()
    assert json.loads((tmp_path / "bad" / "results.json").read_text())["valid"] is False
    assert run_check(tmp_path / "good", as_json=True, write_html=False) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is True
    assert not (tmp_path / "good" / "report.html").exists()


def test_check_cli_names_a_missing_or_broken_history(tmp_path: Path, capsys) -> None:
    assert run_check(tmp_path) == 2
    assert "history.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "history.jsonl").write_text("{\n")
    assert run_check(tmp_path) == 2
    assert "history line 1: not JSON" in capsys.readouterr().err
