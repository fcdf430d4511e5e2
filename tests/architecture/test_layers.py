"""The folder tree is the architecture: imports point one way,
storage <- replication <- cluster <- tools.

Parsed from the source (not imported), so a violation is found even in a module no other
test loads, including imports inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("storage", "replication", "cluster", "tools")
"""Lowest first: a package may import only itself and the packages before it."""


def _imported_packages(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _violations(layer: str) -> list[str]:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in _imported_packages(path):
            top = module.split(".")[0]
            if top in LAYERS and top not in allowed:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down(layer: str) -> None:
    assert _violations(layer) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser finds imports in every form the layers could use."""
    source = tmp_path / "m.py"
    source.write_text(
        "import cluster.protocol\n"
        "from tools.cli import main\n"
        "def f():\n    from replication import state\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import tools\n"
    )
    modules = {module for _, module in _imported_packages(source)}
    assert {"cluster.protocol", "tools.cli", "replication", "tools"} <= modules
