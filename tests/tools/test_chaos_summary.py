"""`tidelog chaos summary`: the totals of many run folders, from what the checker wrote."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.tools.test_chaos_histories import HistoryBuilder
from tools.chaos.checker import check
from tools.chaos.results import write_results
from tools.chaos.summary import SummaryError, percentile, read_run, summarize_runs
from tools.cli import main

Q = "chaos:0"


def _history(lose_one: bool) -> HistoryBuilder:
    """Three acked sends around a pause that fails one send for 2 s; ``lose_one`` drops the
    last acked message from the final drain."""
    history = HistoryBuilder()
    history.master("n1", 1)
    history.send("producer-0", Q, "producer-0:0", 0)
    history.nemesis("f1", "pause", "start", ["n2"])
    history.send("producer-0", Q, "producer-0:1", outcome="fail")
    history.wait(2.0)
    history.send("producer-0", Q, "producer-0:2", 1)
    history.nemesis("f1", "pause", "stop", ["n2"])
    history.nemesis("f2", "kill", "start", ["n3"])
    history.nemesis("f2", "kill", "stop", ["n3"])
    history.master("n2", 2)
    history.send("producer-0", Q, "producer-0:3", 2)
    log = [(0, "producer-0:0"), (1, "producer-0:2"), (2, "producer-0:3")]
    history.drain(Q, "n1", "master", log[:2] if lose_one else log)
    return history


def _run_folder(root: Path, seed: int, cluster: str, lose_one: bool) -> Path:
    """A run folder as a chaos run leaves it: history, run.json and the checker's results."""
    folder = root / f"seed-{seed}"
    folder.mkdir()
    history = _history(lose_one)
    history.write(folder / "history.jsonl")
    manifest = {
        "seed": seed,
        "git_revision": f"{seed:040x}",
        "settings": {"seed": seed, "cluster": cluster, "bootstrap": []},
        "figures": {"duration_s": 120.0},
    }
    (folder / "run.json").write_text(json.dumps(manifest))
    write_results(folder, check(history.events))
    return folder


def test_totals_add_up_every_run_and_an_invalid_run_fails(tmp_path: Path) -> None:
    _run_folder(tmp_path, 8, "static", lose_one=True)
    _run_folder(tmp_path, 7, "failover", lose_one=False)
    out = io.StringIO()
    assert summarize_runs([tmp_path], style="json", out=out) == 1
    document = json.loads(out.getvalue())
    assert [run["seed"] for run in document["runs"]] == [7, 8]
    clean, lossy = document["runs"]
    assert clean["valid"] and clean["lost"] == 0
    assert not lossy["valid"] and lossy["lost"] == 1 and lossy["anomalies"]["lost"] == 1
    assert clean["faults"] == {"kill": 1, "pause": 1}
    assert clean["master_changes"] == 1
    assert clean["revision"] == f"{7:040x}"
    (window,) = clean["windowed_s"]
    assert window >= 2.0, "the pause's window spans the 2 s until the next ack"
    total = document["totals"]
    assert total["runs"] == 2 and total["valid"] == 1
    assert total["by_cluster"] == {"failover": 1, "static": 1}
    assert total["acked"] == 6
    assert total["lost"] == 1
    assert total["faults"] == {"kill": 2, "pause": 2}
    assert total["master_changes"] == 2
    assert total["windowed"] == 2 and total["windowed_p99_s"] == max(
        clean["windowed_s"] + lossy["windowed_s"]
    )
    assert total["anomalies"] == {"lost": 1}


def test_all_valid_runs_exit_zero_and_print_a_markdown_table(tmp_path: Path) -> None:
    first = _run_folder(tmp_path, 7, "failover", lose_one=False)
    second = _run_folder(tmp_path, 9, "failover", lose_one=False)
    out = io.StringIO()
    assert summarize_runs([first, second], style="markdown", out=out) == 0
    text = out.getvalue()
    rows = [
        line for line in text.splitlines() if line.startswith("| 7 ") or line.startswith("| 9 ")
    ]
    assert len(rows) == 2 and all("| yes |" in row for row in rows)
    assert "valid 2 of 2" in text and "acked: 6; lost: 0" in text


def test_a_run_never_judged_is_named_with_the_command_that_judges_it(tmp_path: Path) -> None:
    _run_folder(tmp_path, 7, "failover", lose_one=False)
    died = tmp_path / "seed-9"
    died.mkdir()
    _history(lose_one=False).write(died / "history.jsonl")
    out, err = io.StringIO(), io.StringIO()
    assert summarize_runs([tmp_path], out=out, err=err) == 2
    assert f"tidelog chaos check {died}" in err.getvalue()
    assert "runs: 1 " in out.getvalue(), "the readable run is still summed"


def test_a_folder_without_runs_is_refused(tmp_path: Path) -> None:
    err = io.StringIO()
    assert summarize_runs([tmp_path], err=err) == 2
    assert "holds no chaos run folder" in err.getvalue()


def test_a_truncated_results_file_is_named(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path, 7, "static", lose_one=False)
    (folder / "results.json").write_text('{"valid": true}')
    with pytest.raises(SummaryError, match="re-judge it with `tidelog chaos check"):
        read_run(folder)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert percentile([5.0], 0.99) == 5.0


def test_the_cli_mounts_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run_folder(tmp_path, 7, "failover", lose_one=False)
    assert main(["chaos", "summary", str(tmp_path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["runs"] == 1
