"""``tidelog chaos check RUN_DIR``: judge a run folder's history, write results and report.

:func:`run_check` reads ``RUN_DIR/history.jsonl``, runs the checker, writes
``results.json`` and ``report.html`` beside it, prints the verdict (a table, or the
results as JSON with ``--json``) and returns the exit code: 0 valid, 1 anomalies found,
2 the run folder or its history could not be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from tools.chaos.checker import CheckResult, check
from tools.chaos.history import HistoryError, read_history
from tools.chaos.report import write_report
from tools.chaos.results import write_results

__all__ = [
    "EXIT_ANOMALIES",
    "EXIT_UNREADABLE",
    "EXIT_VALID",
    "add_check_arguments",
    "format_verdict",
    "main",
    "run_check",
]

EXIT_VALID: Final = 0
EXIT_ANOMALIES: Final = 1
EXIT_UNREADABLE: Final = 2
HISTORY_NAME: Final = "history.jsonl"

log = logging.getLogger(__name__)


def run_check(
    run_dir: str | Path,
    *,
    as_json: bool = False,
    write_html: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Check one run folder; print the verdict to ``out``; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    folder = Path(run_dir)
    history_path = folder / HISTORY_NAME
    if not history_path.is_file():
        print(
            f"error: {history_path} does not exist; give the folder a chaos run wrote "
            "(it holds history.jsonl and run.json)",
            file=err,
        )
        return EXIT_UNREADABLE
    try:
        events = read_history(history_path)
        result = check(events)
    except HistoryError as exc:
        print(f"error: {history_path}: {exc}", file=err)
        return EXIT_UNREADABLE
    results_path = write_results(folder, result)
    report_path = write_report(folder, events, result) if write_html else None
    log.info("chaos check run_dir=%s valid=%s events=%d", folder, result.valid, result.events)
    if as_json:
        print(json.dumps(result.to_json(), sort_keys=True, allow_nan=False), file=out)
    else:
        print(format_verdict(result), file=out)
        print(f"results: {results_path}", file=out)
        if report_path is not None:
            print(f"report:  {report_path}", file=out)
    return EXIT_VALID if result.valid else EXIT_ANOMALIES


def format_verdict(result: CheckResult) -> str:
    """A plain-text verdict table: one line per check with its count and first example."""
    lines = [
        f"verdict: {'PASS' if result.valid else 'FAIL'}  ({result.events} events, "
        f"ack levels: {', '.join(result.ack_levels) or 'none'}, {_injected(result)} faults, "
        f"{max(len(result.master_changes) - 1, 0)} master changes)",
        "",
        f"{'check':<22} {'result':<6} {'count':>7}  first example",
    ]
    for summary in result.kinds:
        label = ("FAIL" if summary.count else "ok") if summary.error else "info"
        example = ""
        if summary.examples:
            first = summary.examples[0]
            where = ",".join(str(line) for line in first.lines[:4])
            example = f"{first.summary} [line {where}]" if where else first.summary
        lines.append(f"{summary.kind:<22} {label:<6} {summary.count:>7}  {example[:120]}")
    if result.rpo.messages:
        lines.append(
            f"\nRPO (leader acks): {result.rpo.messages} messages over {result.rpo.span_s:.3f} s"
        )
    recovered = [r.recovery_s for r in result.recoveries if r.recovery_s is not None]
    if result.recoveries:
        unrecovered = sum(r.recovery_s is None for r in result.recoveries)
        worst = f"{max(recovered):.3f} s" if recovered else "n/a"
        lines.append(
            f"\nrecovery: {len(result.recoveries)} faults, worst {worst}, "
            f"{unrecovered} never recovered"
        )
    return "\n".join(lines)


def _injected(result: CheckResult) -> str:
    """How many faults were injected, and how many could not be (if any)."""
    refused = sum(not fault.started for fault in result.faults)
    injected = len(result.faults) - refused
    return f"{injected} (+{refused} that could not start)" if refused else str(injected)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``chaos check`` (for tools/cli.py to mount as a subcommand)."""
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a chaos run folder (holds history.jsonl)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print results.json's content instead of a table"
    )
    parser.add_argument("--no-report", action="store_true", help="skip writing report.html")


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m tools.chaos.cli RUN_DIR [--json]``."""
    parser = argparse.ArgumentParser(prog="tidelog chaos check", description=__doc__)
    add_check_arguments(parser)
    args = parser.parse_args(argv)
    return run_check(args.run_dir, as_json=args.json, write_html=not args.no_report)


if __name__ == "__main__":
    sys.exit(main())
