"""The client library stands on the wire protocol alone: no module of ``cluster/client``
imports the storage engine, replication, the node, the server or the tools (only the
protocol and two pure helpers that happen to live in ``storage/``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
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


def test_importing_the_clients_loads_no_trio() -> None:
    """An asyncio application or a script pays for no trio: importing the async and the
    blocking client, in a fresh interpreter, leaves trio and the storage engine unloaded
    (``storage/__init__.py`` used to import the whole engine, and trio with it, as soon as
    the client imported the pure ``storage.names``). Fails on the old code."""
    probe = (
        "import json, sys\n"
        "import cluster.client, cluster.client.sync\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = set(json.loads(_run_python(probe)))
    assert not {module for module in loaded if module.split(".")[0] == "trio"}
    assert {module for module in loaded if module.startswith("storage.")} <= {
        "storage.names",
        "storage.errors",
        "storage.backoff",
    }


def test_the_storage_package_still_exports_its_names() -> None:
    """The package loads its public names on first use: each one resolves to the object
    its module defines, ``from storage import *`` gives them all, and a misspelt name is
    an AttributeError naming it."""
    probe = (
        "import json, importlib, storage\n"
        "homes = {name: getattr(storage, name).__module__ for name in storage.__all__}\n"
        "star = {}\n"
        "exec('from storage import *', star)\n"
        "assert set(storage.__all__) <= set(star), sorted(set(storage.__all__) - set(star))\n"
        "try:\n"
        "    storage.NoSuchName\n"
        "except AttributeError as error:\n"
        "    missing = str(error)\n"
        "print(json.dumps({'homes': homes, 'missing': missing}))\n"
    )
    answer = json.loads(_run_python(probe))
    assert len(answer["homes"]) >= 17
    assert all(module.startswith("storage.") for module in answer["homes"].values())
    assert answer["homes"]["MessageStore"] == "storage.store"
    assert "NoSuchName" in answer["missing"]


def _run_python(code: str) -> str:
    """``code`` run by a fresh interpreter at the project root; its standard output."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=CLIENT.parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
