"""``tidelog chaos summary DIR...``: the totals of many chaos runs, read from their folders.

A seeded campaign (say a hundred 2-minute runs) is judged run by run; what a person wants
at the end is one table and its totals: runs, faults by kind, acknowledged messages, lost,
how many runs were valid, recovery times across all of them. This reads each run folder's
``run.json`` and ``results.json`` (what the checker wrote at the end of the run, or
``tidelog chaos check`` later), never re-runs the checker, and prints the table as text,
markdown or JSON.

A DIR may be a run folder or a folder of run folders (one level down). A run folder whose
history was never judged (no ``results.json``) is listed as unreadable with the command
that judges it; the exit code is 0 when every run is valid, 1 when one is not, 2 when a
folder could not be read or none was found.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import attrs

from tools.chaos.results import RESULTS_NAME

__all__ = [
    "RunFigures",
    "SummaryError",
    "Totals",
    "find_run_folders",
    "format_markdown",
    "format_text",
    "percentile",
    "read_run",
    "summarize_runs",
    "totals",
]

MANIFEST_NAME: Final = "run.json"
HISTORY_NAME: Final = "history.jsonl"
EXIT_VALID: Final = 0
EXIT_INVALID: Final = 1
EXIT_UNREADABLE: Final = 2


class SummaryError(Exception):
    """A run folder that cannot be summarised; the message says which and what to do."""


@attrs.frozen
class RunFigures:
    """The figures of one judged run, as its ``results.json`` and ``run.json`` state them.

    ``recoveries_s`` holds the recovery time of every started fault that recovered;
    ``windowed_s`` only those of faults that opened an unavailability window (the rest
    recovered in 0 s, which would hide the figures that matter in a median).
    """

    folder: str
    seed: int | None
    cluster: str
    revision: str | None
    duration_s: float | None
    acked: int
    faults: Mapping[str, int]
    refused: int
    master_changes: int
    lost: int
    valid: bool
    anomalies: Mapping[str, int]
    recoveries_s: tuple[float, ...]
    windowed_s: tuple[float, ...]
    never_recovered: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self) | {
            "faults": dict(sorted(self.faults.items())),
            "anomalies": dict(sorted(self.anomalies.items())),
        }


@attrs.frozen
class Totals:
    """The sums over runs; percentiles are nearest-rank over every fault of every run."""

    runs: int
    valid: int
    by_cluster: Mapping[str, int]
    acked: int
    faults: Mapping[str, int]
    refused: int
    master_changes: int
    lost: int
    anomalies: Mapping[str, int]
    recovery_p50_s: float | None
    recovery_p99_s: float | None
    windowed: int
    windowed_p50_s: float | None
    windowed_p99_s: float | None
    never_recovered: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self) | {
            "faults": dict(sorted(self.faults.items())),
            "anomalies": dict(sorted(self.anomalies.items())),
            "by_cluster": dict(sorted(self.by_cluster.items())),
        }


def percentile(values: Iterable[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in (0, 1]); None for no values."""
    assert 0 < fraction <= 1, fraction
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def find_run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """Each path if it is a run folder, else its sub-folders that are (sorted by name).

    Raises SummaryError for a path that neither is nor holds a run folder.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if _is_run_folder(path):
            found.append(path)
            continue
        if not path.is_dir():
            raise SummaryError(f"{path} is not a folder; give chaos run folders or their parent")
        children = sorted(child for child in path.iterdir() if _is_run_folder(child))
        if not children:
            raise SummaryError(
                f"{path} holds no chaos run folder (none has {MANIFEST_NAME} or {HISTORY_NAME})"
            )
        found.extend(children)
    return found


def _is_run_folder(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file() or (path / HISTORY_NAME).is_file()


def read_run(folder: str | Path) -> RunFigures:
    """The figures of one run folder; SummaryError if it was never judged or is unreadable."""
    folder = Path(folder)
    results_path = folder / RESULTS_NAME
    if not results_path.is_file():
        raise SummaryError(
            f"{results_path} does not exist: the run was not judged (it may have died); "
            f"run `tidelog chaos check {folder}` if it has a history"
        )
    results = _read_json(results_path)
    manifest = _read_json(folder / MANIFEST_NAME) if (folder / MANIFEST_NAME).is_file() else {}
    try:
        return _figures(folder, results, manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise SummaryError(
            f"{results_path} lacks what a checker writes ({exc!r}); re-judge it with "
            f"`tidelog chaos check {folder}`"
        ) from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SummaryError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SummaryError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def _figures(folder: Path, results: dict[str, Any], manifest: dict[str, Any]) -> RunFigures:
    started = [fault for fault in results["faults"] if fault["started"]]
    recoveries = results["recoveries"]
    recovered = [r for r in recoveries if r["recovery_s"] is not None]
    settings = manifest.get("settings", {})
    figures = manifest.get("figures", {})
    return RunFigures(
        folder=str(folder),
        seed=manifest.get("seed", settings.get("seed")),
        cluster=str(settings.get("cluster", "bootstrap" if settings.get("bootstrap") else "?")),
        revision=manifest.get("git_revision"),
        duration_s=figures.get("duration_s"),
        acked=sum(int(queue["acked"]) for queue in results["queues"]),
        faults=dict(Counter(str(fault["fault"]) for fault in started)),
        refused=len(results["faults"]) - len(started),
        master_changes=max(len(results["master_changes"]) - 1, 0),
        lost=len(results["lost"]),
        valid=bool(results["valid"]),
        anomalies={
            k["kind"]: int(k["count"]) for k in results["kinds"] if k["error"] and k["count"]
        },
        recoveries_s=tuple(float(r["recovery_s"]) for r in recovered),
        windowed_s=tuple(float(r["recovery_s"]) for r in recovered if r["windows"]),
        never_recovered=len(recoveries) - len(recovered),
    )


def totals(runs: Sequence[RunFigures]) -> Totals:
    """Sum the runs' figures; recovery percentiles over all their faults together."""
    faults: Counter[str] = Counter()
    anomalies: Counter[str] = Counter()
    for run in runs:
        faults.update(run.faults)
        anomalies.update(run.anomalies)
    recoveries = [s for run in runs for s in run.recoveries_s]
    windowed = [s for run in runs for s in run.windowed_s]
    return Totals(
        runs=len(runs),
        valid=sum(run.valid for run in runs),
        by_cluster=dict(Counter(run.cluster for run in runs)),
        acked=sum(run.acked for run in runs),
        faults=dict(faults),
        refused=sum(run.refused for run in runs),
        master_changes=sum(run.master_changes for run in runs),
        lost=sum(run.lost for run in runs),
        anomalies=dict(anomalies),
        recovery_p50_s=percentile(recoveries, 0.5),
        recovery_p99_s=percentile(recoveries, 0.99),
        windowed=len(windowed),
        windowed_p50_s=percentile(windowed, 0.5),
        windowed_p99_s=percentile(windowed, 0.99),
        never_recovered=sum(run.never_recovered for run in runs),
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _kinds(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())) or "none"


def _row(run: RunFigures) -> list[str]:
    return [
        str(run.seed if run.seed is not None else Path(run.folder).name),
        run.cluster,
        (run.revision or "?")[:10],
        str(run.acked),
        f"{sum(run.faults.values())}: {_kinds(run.faults)}",
        str(run.master_changes),
        str(run.lost),
        "yes" if run.valid else f"NO ({_kinds(run.anomalies)})",
        f"{_seconds(percentile(run.windowed_s, 0.5))} / {_seconds(percentile(run.windowed_s, 0.99))}",
    ]


HEADER: Final = [
    "seed",
    "cluster",
    "commit",
    "acked",
    "faults",
    "master changes",
    "lost",
    "valid",
    "recovery p50 / p99 s",
]


def _totals_lines(total: Totals) -> list[str]:
    return [
        f"runs: {total.runs} ({_kinds(total.by_cluster)}), valid {total.valid} of {total.runs}",
        f"acked: {total.acked}; lost: {total.lost}; master changes: {total.master_changes}",
        f"faults: {sum(total.faults.values())} ({_kinds(total.faults)}); "
        f"could not start: {total.refused}",
        f"anomalies: {_kinds(total.anomalies)}",
        f"recovery over every fault: p50 {_seconds(total.recovery_p50_s)} s, "
        f"p99 {_seconds(total.recovery_p99_s)} s; over the {total.windowed} faults that "
        f"opened a window: p50 {_seconds(total.windowed_p50_s)} s, "
        f"p99 {_seconds(total.windowed_p99_s)} s; never recovered: {total.never_recovered}",
    ]


def format_markdown(runs: Sequence[RunFigures], total: Totals) -> str:
    """A markdown table (recovery per run over faults that opened a window), then totals."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_row(run)) + " |" for run in runs]
    return "\n".join([*lines, "", *(f"- {line}" for line in _totals_lines(total))])


def format_text(runs: Sequence[RunFigures], total: Totals) -> str:
    """A plain aligned table, then totals."""
    rows = [HEADER, *(_row(run) for run in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join([*(line.rstrip() for line in lines), "", *_totals_lines(total)])


def summarize_runs(
    paths: Sequence[str | Path],
    *,
    style: str = "text",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the table of the runs under ``paths`` in ``style`` (text, markdown, json);
    return the exit code (0 all valid, 1 one invalid, 2 a folder unreadable or none found)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        folders = find_run_folders(paths)
    except SummaryError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_UNREADABLE
    runs: list[RunFigures] = []
    unreadable = 0
    for folder in folders:
        try:
            runs.append(read_run(folder))
        except SummaryError as exc:
            unreadable += 1
            print(f"error: {exc}", file=err)
    runs.sort(key=lambda run: (run.seed is None, run.seed or 0, run.folder))
    total = totals(runs)
    if style == "json":
        document = {"runs": [run.to_json() for run in runs], "totals": total.to_json()}
        print(json.dumps(document, sort_keys=True, allow_nan=False), file=out)
    else:
        print((format_markdown if style == "markdown" else format_text)(runs, total), file=out)
    if unreadable or not runs:
        return EXIT_UNREADABLE
    return EXIT_VALID if total.valid == total.runs else EXIT_INVALID
