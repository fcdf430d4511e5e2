"""The README's client examples, run as written (trio, asyncio, blocking) against a real
node process: taken from the README itself, so the text users copy is the text tested.
The address is the only thing changed; the asyncio variant is made the way the README
says (``asyncio.run(main())`` instead of ``trio.run(main)``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.protocol.requests import queue_for_key
from tools.process import NodeProcess

README = Path(__file__).resolve().parents[2] / "README.md"


def client_examples() -> dict[str, str]:
    """The Python blocks of the README's "Client library" section: trio's, the asyncio
    variant the README describes, and the blocking client's."""
    section = README.read_text().split("\n## Client library\n", 1)[1].split("\n## ", 1)[0]
    on_trio, blocking = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert "`asyncio.run(main())` instead" in section
    assert on_trio.count("import trio\n") == on_trio.count("trio.run(main)") == 1
    on_asyncio = on_trio.replace("import trio\n", "import asyncio\n").replace(
        "trio.run(main)", "asyncio.run(main())"
    )
    return {"trio": on_trio, "asyncio": on_asyncio, "blocking": blocking}


EXAMPLES = client_examples()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A fresh ``tidelog node`` process per example (its printed offsets are the README's);
    killed by its PID at the end."""
    process = NodeProcess(tmp_path / "node").start()
    try:
        yield process
    finally:
        process.kill()


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_readme_example_runs(
    name: str, node: NodeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    example = EXAMPLES[name]
    assert example.count("127.0.0.1:7600") == 1
    code = compile(example.replace("127.0.0.1:7600", node.address), f"<README {name}>", "exec")
    exec(code, {"__name__": "__main__"})
    sent, read = capsys.readouterr().out.splitlines()
    key_queue = queue_for_key("customer-7", 4)
    assert sent == f"ok {key_queue} 0"
    promised = re.search(r"print\(result\.outcome, .*\)  # (.+)", example)
    if promised:  # what the README says the line prints
        assert sent == promised.group(1)
    # From the earliest offsets: the first message of a queue the example wrote to.
    firsts = {f"{key_queue} 0 b'hello'"}
    if 'send_batch("orders", [b"a", b"b", b"c"], queue=0)' in example:
        firsts.add("0 0 b'a'")
    assert read in firsts
