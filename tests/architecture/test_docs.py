"""docs/design.md's node configuration example cannot drift from the node's config loader.

The TOML block under "## Node configuration" is loaded with the loader itself; it must
name every key of every section the loader accepts, and show each at its default (the
doc says so). A key added to a section without a line in the example fails here, naming
the key.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path

import attrs
import pytest

from cluster.node.config import ConfigError, NodeConfig, load_node_config

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"
HEADING = "## Node configuration"
NOT_IN_FILE = {("store", "data_dir")}
"""Keys the loader refuses in a file: the store always lives in <node.data_dir>/store."""


def _example() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    assert HEADING in text, f"{DESIGN} lost its {HEADING!r} section"
    after = text[text.index(HEADING) :]
    match = re.search(r"^```toml\n(.*?)^```$", after, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no ```toml block under {HEADING!r} in {DESIGN}"
    return match.group(1)


def _accepted_keys() -> dict[str, set[str]]:
    """Section -> keys, from the config classes the loader builds (NodeConfig's fields)."""
    sections = typing.get_type_hints(NodeConfig)
    return {
        field.name: {
            key.name
            for key in attrs.fields(sections[field.name])
            if (field.name, key.name) not in NOT_IN_FILE
        }
        for field in attrs.fields(NodeConfig)
    }


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_loads_with_the_nodes_loader(tmp_path: Path) -> None:
    config = load_node_config(_write(tmp_path, _example()), environ={})
    assert isinstance(config, NodeConfig)


def test_the_example_names_every_key_the_loader_accepts() -> None:
    document = tomllib.loads(_example())
    accepted = _accepted_keys()
    assert set(document) == set(accepted), "sections in the example differ from the loader's"
    missing = [
        f"[{section}] {key}"
        for section, keys in accepted.items()
        for key in sorted(keys - set(document[section]))
    ]
    assert missing == [], f"docs/design.md's node configuration example lacks {missing}"


def test_the_example_shows_the_defaults(tmp_path: Path) -> None:
    """The doc says a node started with the example behaves as one started with no file."""
    example = load_node_config(_write(tmp_path, _example()), environ={})
    defaults = load_node_config(None, environ={})
    for section in _accepted_keys():
        assert getattr(example, section) == getattr(defaults, section), (
            f"[{section}] in docs/design.md's example differs from the defaults"
        )


def _as_failover(text: str) -> str:
    """The example turned into a failover node as the doc says: etcd set, an HA port,
    the static role keys left out."""
    kept = [
        line
        for line in text.splitlines()
        if not re.match(r"(role|master_ha|master_client)\s*=", line)
    ]
    joined = "\n".join(kept) + "\n"
    joined = re.sub(r"^ha_port = .*$", "ha_port = 0", joined, flags=re.MULTILINE)
    return re.sub(r'^etcd = ""', 'etcd = "http://127.0.0.1:2379"', joined, flags=re.MULTILINE)


def test_the_failover_recipe_in_the_doc_loads(tmp_path: Path) -> None:
    config = load_node_config(_write(tmp_path, _as_failover(_example())), environ={})
    assert config.coordinated
    assert config.coordination.endpoints == ("http://127.0.0.1:2379",)


def test_the_loader_refuses_the_static_role_with_etcd_as_the_doc_says(tmp_path: Path) -> None:
    with_role = re.sub(
        r'^etcd = ""', 'etcd = "http://127.0.0.1:2379"', _example(), flags=re.MULTILINE
    )
    with_role = re.sub(r"^ha_port = .*$", "ha_port = 0", with_role, flags=re.MULTILINE)
    with pytest.raises(ConfigError, match="contradict"):
        load_node_config(_write(tmp_path, with_role), environ={})
