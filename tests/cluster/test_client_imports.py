"""The client library stands on the wire protocol alone: no module of ``cluster/client``
imports the storage engine, replication, the node, the server or the tools (only the
protocol and two pure helpers that happen to live in ``storage/``)."""

from __future__ import annotations

import ast
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "cluster" / "client"
ALLOWED_PROJECT_IMPORTS = ("cluster.client", "cluster.protocol", "storage.names", "storage.backoff")
PROJECT_PACKAGES = ("storage", "replication", "cluster", "tools", "tests")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_client_imports_only_the_protocol_and_pure_helpers() -> None:
    modules = sorted(CLIENT.glob("*.py"))
    assert len(modules) > 1  # the package, split by job
    for path in modules:
        for module in imported_modules(path):
            if module.split(".")[0] not in PROJECT_PACKAGES:
                continue  # stdlib and third-party
            assert module.startswith(ALLOWED_PROJECT_IMPORTS), f"{path.name} imports {module}"


def test_the_client_library_is_written_on_anyio_not_trio() -> None:
    """Trio and asyncio applications run the same client: no module of it imports trio
    at load time (only for type hints, and lazily to adapt a trio stream a caller dialled
    itself, :class:`cluster.client.connection.Connection`)."""
    for path in sorted(CLIENT.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for statement in tree.body:  # module level; `if TYPE_CHECKING:` blocks are ifs
            if isinstance(statement, ast.Import):
                names = [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom):
                names = [statement.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] == "trio" for name in names), (
                f"{path.name} imports {names}"
            )
