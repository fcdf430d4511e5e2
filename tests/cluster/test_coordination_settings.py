"""CoordinationSettings: sound defaults, and refusals that say what to change."""

from __future__ import annotations

import attrs
import pytest

from cluster.coordination.settings import CoordinationSettings


def test_defaults_fail_over_fast_on_one_machine() -> None:
    settings = CoordinationSettings()
    assert settings.lease_ttl_s == 2
    assert (
        settings.keepalive_interval_s + 2 * settings.request_timeout_s + settings.fencing_margin_s
        <= settings.lease_ttl_s
    )
    assert settings.keys.leader(settings.group) == "/tidelog/tidelog/groups/g1/leader"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.lease_ttl_s = 5  # type: ignore[misc]


def test_endpoints_are_normalised() -> None:
    settings = CoordinationSettings(etcd_endpoints="http://127.0.0.1:2379/")
    assert settings.etcd_endpoints == ("http://127.0.0.1:2379",)
    many = CoordinationSettings(etcd_endpoints=["http://a:1", " https://b:2 "])
    assert many.etcd_endpoints == ("http://a:1", "https://b:2")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"lease_ttl_s": 1}, "whole number of seconds >= 2"),
        ({"lease_ttl_s": 2.5}, "whole number of seconds"),
        (
            {"keepalive_interval_s": 1.5},
            r"keepalive_interval_s \+ 2 x request_timeout_s = 2.5s exceeds",
        ),
        ({"fencing_margin_s": 0.7}, "would fence itself after one slow keepalive"),
        ({"request_timeout_s": 0}, "request_timeout_s must be positive"),
        ({"fencing_margin_s": -0.1}, "fencing_margin_s must be >= 0"),
        ({"etcd_endpoints": ()}, "at least one URL"),
        ({"etcd_endpoints": ["127.0.0.1:2379"]}, "must be http://host:port"),
        ({"etcd_endpoints": ["http://127.0.0.1"]}, "must be http://host:port"),
        ({"cluster": "a/b"}, "cluster name 'a/b' is invalid"),
        ({"group": ""}, "group name '' is invalid"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        CoordinationSettings(**changes)  # type: ignore[arg-type]


def test_a_slower_network_raises_the_ttl() -> None:
    settings = CoordinationSettings(lease_ttl_s=10, keepalive_interval_s=3, request_timeout_s=3)
    assert settings.lease_ttl_s == 10
