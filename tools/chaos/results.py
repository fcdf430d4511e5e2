"""Write the checker's verdict as ``results.json`` in a run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tools.chaos.checker import CheckResult

__all__ = ["RESULTS_NAME", "results_text", "write_results"]

RESULTS_NAME = "results.json"


def results_text(result: CheckResult) -> str:
    """The JSON text of a verdict (stable key order, one trailing newline)."""
    return json.dumps(result.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_results(run_dir: str | os.PathLike[str], result: CheckResult) -> Path:
    """Write ``results.json`` atomically (temp file, fsync, rename); returns its path."""
    path = Path(run_dir) / RESULTS_NAME
    temp = path.with_suffix(".json.tmp")
    with open(temp, "w", encoding="utf-8") as file:
        file.write(results_text(result))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    return path
