"""One self-contained ``report.html`` per chaos run, readable offline.

plotly's script is inlined once (no CDN), each chart is a div drawn by it. The page shows
the verdict table with a few examples per anomaly and the history lines behind them,
latency over time (ok / fail / unknown) with fault windows shaded and master changes
marked, throughput, recovery times, lost messages by class, the queue counts, and the
manifest with the command that reproduces the run.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from tools.chaos.checker import CheckResult
from tools.chaos.history import Event, event_to_json

__all__ = ["REPORT_NAME", "render_report", "write_report"]

REPORT_NAME: Final = "report.html"
MAX_LATENCY_POINTS: Final = 20_000
"""Successful sends beyond this are sampled evenly (every failed or unknown one is kept)."""
OUTCOME_COLOURS: Final = {"ok": "#2e7d32", "fail": "#c62828", "info": "#f9a825"}
OUTCOME_NAMES: Final = {"ok": "ok", "fail": "failed", "info": "unknown (info)"}
POSITION_COLOURS: Final = {"prefix": "#6a1b9a", "middle": "#c62828", "postfix": "#ef6c00"}
FAULT_FILL: Final = "rgba(120, 144, 156, 0.18)"
MAX_FAULT_LABELS: Final = 24
"""More fault windows than this are shaded without a label each (they would overlap)."""
LEGEND_NOTE: Final = (
    "<p class=lines>Grey bands: fault windows (the recovery table names them); "
    "dotted blue lines: master changes.</p>"
)


def render_report(
    events: Sequence[Event], result: CheckResult, manifest: Mapping[str, Any] | None = None
) -> str:
    """The whole HTML page as a string (deterministic for the same inputs)."""
    manifest = manifest or {}
    sections = [
        _verdict_section(events, result),
        _figure_section("Latency of sends", "latency", _latency_figure(events, result)),
        _figure_section("Throughput", "throughput", _throughput_figure(events, result)),
        _recovery_section(result),
        _lost_section(result),
        _queues_section(result),
        _manifest_section(manifest),
    ]
    title = f"tidelog chaos run: {'PASS' if result.valid else 'FAIL'}"
    return _PAGE.format(
        title=html.escape(title),
        style=_STYLE,
        plotly=get_plotlyjs(),
        body="\n".join(sections),
    )


def write_report(
    run_dir: str | os.PathLike[str], events: Sequence[Event], result: CheckResult
) -> Path:
    """Write ``report.html`` into the run folder, with ``run.json`` as its manifest if present."""
    folder = Path(run_dir)
    manifest_path = folder / "run.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    path = folder / REPORT_NAME
    temp = path.with_suffix(".html.tmp")
    temp.write_text(render_report(events, result, manifest), encoding="utf-8")
    os.replace(temp, path)
    return path


# --- sections -------------------------------------------------------------------------------


def _verdict_section(events: Sequence[Event], result: CheckResult) -> str:
    verdict = "PASS" if result.valid else "FAIL"
    levels = ", ".join(result.ack_levels) or "none"
    rows = []
    for summary in result.kinds:
        if summary.error:
            state = "fail" if summary.count else "pass"
            label = "FAIL" if summary.count else "ok"
        else:
            state, label = "info", "info"
        examples = "".join(_example(events, a.summary, a.lines) for a in summary.examples)
        more = summary.count - len(summary.examples)
        if more > 0:
            examples += f"<div class=more>and {more} more in results.json</div>"
        rows.append(
            f"<tr class={state}><td>{html.escape(summary.kind)}</td><td>{label}</td>"
            f"<td class=num>{summary.count}</td><td>{examples}</td></tr>"
        )
    rpo = ""
    if result.rpo.messages:
        rpo = (
            f"<p>RPO at <code>leader</code> acks: {result.rpo.messages} message(s) lost, "
            f"acked over {result.rpo.span_s:.3f} s.</p>"
        )
    return (
        f"<section id=verdict><h1 class=verdict-{verdict.lower()}>Verdict: {verdict}</h1>"
        f"<p>{result.events} history events; ack levels: {html.escape(levels)}; "
        f"{_fault_count(result)}; {max(len(result.master_changes) - 1, 0)} master change(s).</p>"
        f"{rpo}<table><thead><tr><th>check</th><th>result</th><th>count</th>"
        f"<th>examples (history.jsonl lines)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "</section>"
    )


def _example(events: Sequence[Event], summary: str, lines: Sequence[int]) -> str:
    refs = ", ".join(str(line) for line in lines) or "none"
    raw = "\n".join(
        _clip(event_to_json(events[line - 1]), 400) for line in lines if 0 < line <= len(events)
    )
    return (
        f"<details><summary>{html.escape(summary)} <span class=lines>(line {refs})</span>"
        f"</summary><pre>{html.escape(raw)}</pre></details>"
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _figure_section(title: str, div_id: str, figure: go.Figure) -> str:
    chart = figure.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )
    return f"<section><h2>{html.escape(title)}</h2>{LEGEND_NOTE}{chart}</section>"


def _send_ops(events: Sequence[Event]) -> list[tuple[float, float, str, int]]:
    """(invoke time, latency s, outcome, completion line) of each completed send."""
    open_sends: dict[str, Event] = {}
    out = []
    for event in events:
        if event.f != "send":
            continue
        if event.type == "invoke":
            open_sends[event.process] = event
            continue
        invoke = open_sends.pop(event.process, None)
        if invoke is not None:
            out.append((invoke.time_s, event.time_s - invoke.time_s, event.type, event.line))
    return out


def _latency_figure(events: Sequence[Event], result: CheckResult) -> go.Figure:
    sends = _send_ops(events)
    figure = go.Figure()
    ok_count = sum(outcome == "ok" for _, _, outcome, _ in sends)
    stride = max(1, math.ceil(ok_count / MAX_LATENCY_POINTS))
    for outcome in ("ok", "fail", "info"):
        points = [s for s in sends if s[2] == outcome]
        if outcome == "ok":
            points = points[::stride]
        figure.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[max(p[1] * 1000, 0.001) for p in points],
                customdata=[p[3] for p in points],
                mode="markers",
                marker={"size": 4, "color": OUTCOME_COLOURS[outcome]},
                name=OUTCOME_NAMES[outcome]
                + (f" (1 in {stride})" if outcome == "ok" and stride > 1 else ""),
                hovertemplate="t=%{x:.3f} s<br>%{y:.2f} ms<br>line %{customdata}<extra></extra>",
            )
        )
    _decorate_time_axis(figure, result)
    figure.update_yaxes(title_text="latency (ms, log)", type="log")
    return figure


def _throughput_figure(events: Sequence[Event], result: CheckResult) -> go.Figure:
    sends = _send_ops(events)
    end_s = result.end_s
    bin_s = _bin_width_s(end_s)
    figure = go.Figure()
    bins = int(end_s // bin_s) + 1
    for outcome in ("ok", "fail", "info"):
        counts = [0] * bins
        for invoke_s, latency_s, kind, _ in sends:
            if kind == outcome:
                counts[int((invoke_s + latency_s) // bin_s)] += 1
        figure.add_trace(
            go.Bar(
                x=[(i + 0.5) * bin_s for i in range(bins)],
                y=[c / bin_s for c in counts],
                name=OUTCOME_NAMES[outcome],
                marker_color=OUTCOME_COLOURS[outcome],
                width=bin_s,
            )
        )
    figure.update_layout(barmode="stack", bargap=0)
    _decorate_time_axis(figure, result)
    figure.update_yaxes(title_text=f"sends completed per second ({bin_s:g} s bins)")
    return figure


def _bin_width_s(end_s: float) -> float:
    for width in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0):
        if end_s / width <= 300:
            return width
    return 120.0


def _fault_count(result: CheckResult) -> str:
    """Faults injected, and those that could not start (they injected nothing)."""
    refused = sum(not fault.started for fault in result.faults)
    said = f"{len(result.faults) - refused} fault(s)"
    return f"{said} (+{refused} that could not start)" if refused else said


def _decorate_time_axis(figure: go.Figure, result: CheckResult) -> None:
    """Shade fault windows and mark master changes (built in one layout update: fast)."""
    shapes: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    for fault in (f for f in result.faults if f.started):
        stop_s = fault.stop_s if fault.stop_s is not None else result.end_s
        shapes.append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": fault.start_s,
                "x1": stop_s,
                "y0": 0,
                "y1": 1,
                "fillcolor": FAULT_FILL,
                "line": {"width": 0},
                "layer": "below",
            }
        )
        if len(result.faults) <= MAX_FAULT_LABELS:
            label = f"{fault.fault} {','.join(fault.targets)}"
            notes.append(_note(fault.start_s, 1.0, label, "#546e7a", "bottom"))
    for change in result.master_changes:
        shapes.append(
            {
                "type": "line",
                "xref": "x",
                "yref": "paper",
                "x0": change.time_s,
                "x1": change.time_s,
                "y0": 0,
                "y1": 1,
                "line": {"color": "#1565c0", "dash": "dot", "width": 1.5},
            }
        )
        notes.append(
            _note(change.time_s, 0.0, f"master {change.master or 'none'}", "#1565c0", "top")
        )
    figure.update_xaxes(title_text="time since start (s)")
    figure.update_layout(
        shapes=shapes,
        annotations=notes,
        height=380,
        margin={"l": 60, "r": 20, "t": 40, "b": 50},
        legend={"orientation": "h", "y": 1.14},
        template="plotly_white",
    )


def _note(x: float, y: float, text: str, colour: str, anchor: str) -> dict[str, Any]:
    return {
        "x": x,
        "y": y,
        "xref": "x",
        "yref": "paper",
        "text": text,
        "showarrow": False,
        "xanchor": "left",
        "yanchor": anchor,
        "font": {"size": 9, "color": colour},
    }


def _recovery_section(result: CheckResult) -> str:
    faults = {f.fault_id: f for f in result.faults}
    rows = []
    for recovery in result.recoveries:
        fault = faults[recovery.fault_id]
        rows.append(
            "<tr>"
            f"<td>{html.escape(recovery.fault_id)}</td><td>{html.escape(recovery.fault)}</td>"
            f"<td>{html.escape(', '.join(fault.targets))}</td><td class=num>{fault.start_s:.3f}</td>"
            f"<td class=num>{_seconds(fault.stop_s)}</td><td class=num>{recovery.windows}</td>"
            f"<td class=num>{_seconds(recovery.recovery_s, 'never')}</td>"
            f"<td class=num>{_seconds(recovery.unavailable_s, 'never recovered')}</td>"
            f"<td class=num>{fault.line}</td></tr>"
        )
    faults_table = (
        "<table><thead><tr><th>fault</th><th>kind</th><th>targets</th><th>start s</th>"
        "<th>stop s</th><th>unavailability windows</th><th>recovery s</th>"
        "<th>unavailable s</th><th>line</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No fault was injected.</p>"
    )
    windows = [
        "<tr>"
        f"<td class=num>{w.start_s:.3f}</td><td class=num>{_seconds(w.end_s, 'never')}</td>"
        f"<td class=num>{_seconds(w.duration_s, 'unrecovered')}</td>"
        f"<td>{html.escape(w.fault_id or 'none')}</td>"
        f"<td class=num>{w.first_line}</td><td class=num>{w.end_line or ''}</td></tr>"
        for w in result.unavailability
    ]
    windows_table = (
        "<table><thead><tr><th>from s</th><th>to s</th><th>length s</th><th>during fault</th>"
        "<th>first failed line</th><th>next success line</th></tr></thead>"
        f"<tbody>{''.join(windows)}</tbody></table>"
        if windows
        else "<p>Every send succeeded: no unavailability.</p>"
    )
    return (
        "<section><h2>Recovery time per fault</h2>"
        "<p>From the first failed or unknown send after the fault started to the next "
        "successful send.</p>"
        f"{faults_table}<h3>Every unavailability window</h3>{windows_table}</section>"
    )


def _seconds(value: float | None, missing: str = "") -> str:
    return missing if value is None else f"{value:.3f}"


def _lost_section(result: CheckResult) -> str:
    if not result.lost:
        return (
            "<section><h2>Lost messages</h2>"
            "<p class=pass>No acknowledged message is missing from the final drain.</p></section>"
        )
    figure = go.Figure()
    for position, colour in POSITION_COLOURS.items():
        points = [p for p in result.lost if p.position == position]
        if not points:
            continue
        figure.add_trace(
            go.Scatter(
                x=[p.ack_time_s for p in points],
                y=[p.queue for p in points],
                customdata=[
                    [p.message, p.acks, p.verdict, ", ".join(p.missing_on), p.line] for p in points
                ],
                mode="markers",
                marker={
                    "size": 8,
                    "color": colour,
                    "symbol": ["x" if p.verdict == "lost" else "circle-open" for p in points],
                },
                name=position,
                hovertemplate=(
                    "%{customdata[0]} (%{customdata[1]}, %{customdata[2]})<br>acked at %{x:.3f} s"
                    "<br>missing on %{customdata[3]}<br>line %{customdata[4]}<extra></extra>"
                ),
            )
        )
    _decorate_time_axis(figure, result)
    figure.update_yaxes(title_text="queue", type="category")
    figure.update_xaxes(title_text="acknowledged at (s)")
    counts: dict[str, int] = {}
    for point in result.lost:
        counts[point.verdict] = counts.get(point.verdict, 0) + 1
    words = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    note = (
        f"<p>{len(result.lost)} acknowledged message(s) missing from the master's final drain "
        f"({html.escape(words)}); colour: position in its producer's sequence; "
        "x: fails the run, open circle: excused or reported as RPO.</p>"
    )
    chart = _figure_section("Lost messages", "lost", figure)
    return chart.replace("</h2>", "</h2>" + note, 1)


def _queues_section(result: CheckResult) -> str:
    rows = [
        f"<tr><td>{html.escape(q.queue)}</td><td class=num>{q.sends}</td><td class=num>{q.acked}</td>"
        f"<td class=num>{q.failed}</td><td class=num>{q.unknown}</td>"
        f"<td class=num>{q.read_distinct}</td><td class=num>{q.drained_on_master}</td>"
        f"<td class=num>{q.lost}</td></tr>"
        for q in result.queues
    ]
    return (
        "<section><h2>Queues</h2><table><thead><tr><th>queue</th><th>sends</th><th>acked</th>"
        "<th>failed</th><th>unknown</th><th>distinct read</th><th>on master at the end</th>"
        f"<th>lost</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _manifest_section(manifest: Mapping[str, Any]) -> str:
    if not manifest:
        return (
            "<section><h2>Manifest</h2><p>No run.json was found beside the history.</p></section>"
        )
    command = manifest.get("command")
    if isinstance(command, list):
        command = " ".join(str(part) for part in command)
    reproduce = (
        f"<p>Reproduce this run with:</p><pre class=command>{html.escape(str(command))}</pre>"
        if command
        else "<p>run.json names no command.</p>"
    )
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    return (
        f"<section><h2>Manifest (run.json)</h2>{reproduce}"
        f"<details><summary>run.json</summary><pre>{html.escape(body)}</pre></details></section>"
    )


_STYLE: Final = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1.verdict-pass { color: #2e7d32; } h1.verdict-fail { color: #c62828; }
table { border-collapse: collapse; width: 100%; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail td:nth-child(2) { color: #fff; background: #c62828; font-weight: bold; }
tr.pass td:nth-child(2) { color: #2e7d32; } tr.info td:nth-child(2) { color: #777; }
p.pass { color: #2e7d32; }
pre { background: #f5f5f5; padding: 6px; overflow-x: auto; font-size: 0.85em; }
pre.command { background: #263238; color: #eceff1; padding: 8px; }
.lines, .more { color: #777; font-size: 0.9em; }
section { margin-bottom: 2em; }
"""

_PAGE: Final = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style>
<script type="text/javascript">{plotly}</script>
</head><body>
{body}
</body></html>
"""
