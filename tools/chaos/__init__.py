"""Chaos runs: the history format, the checker that judges it, and the HTML report.

history.py defines the event contract a runner writes; checker.py judges a history
against the promises of docs/design.md from the history alone; report.py renders one
self-contained report.html; cli.py is ``tidelog chaos check RUN_DIR``.
"""
