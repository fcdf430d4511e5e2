"""The connection budget: never more than the open-file limit leaves, never below 1."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cluster.server.limits import connection_budget


@given(
    st.integers(1, 1_000_000),
    st.none() | st.integers(0, 2_000_000),
    st.integers(0, 5_000),
    st.integers(0, 1_000),
)
def test_the_budget(configured: int, nofile: int | None, open_fds: int, reserved: int) -> None:
    budget = connection_budget(configured, nofile, open_fds, reserved)
    assert 1 <= budget.max_connections <= configured
    if nofile is None or nofile - open_fds - reserved >= configured:
        assert budget == type(budget)(configured, None)
    else:
        assert budget.max_connections == max(1, nofile - open_fds - reserved)
        assert budget.lowered_because is not None
        assert f"limit is {nofile}" in budget.lowered_because
        assert str(configured) in budget.lowered_because


def test_a_usual_default_limit_lowers_the_default() -> None:
    budget = connection_budget(10_000, 1024, 40)
    assert budget.max_connections == 1024 - 40 - 128
