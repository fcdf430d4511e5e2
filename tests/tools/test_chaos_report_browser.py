"""report.html renders offline in headless Chromium with its verdict and every chart drawn.

Needs Debian's ``chromium`` package: ``apt-get update && apt-get install -y chromium`` (as
root). Without it this test fails saying so: it never skips silently.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.tools.test_chaos_report import synthetic_run
from tools.chaos.cli import run_check


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "headless Chromium is needed to render report.html: install Debian's package "
        "with `apt-get update && apt-get install -y chromium` (as root) and run again"
    )


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """Open the page offline in Chromium: the verdict is in the DOM and plotly drew its charts."""
    synthetic_run(tmp_path)
    assert run_check(tmp_path) == 1
    report = (tmp_path / "report.html").resolve()
    browser = chromium_binary()
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any fetch of a host would fail
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Verdict: FAIL" in dom.stdout
    assert dom.stdout.count('class="main-svg"') >= 6  # plotly drew every chart (2 svgs each)
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(
        [*common, f"--screenshot={screenshot}", "--window-size=1280,4200", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 50_000
