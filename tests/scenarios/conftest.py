"""``make test`` runs the representative subset of the scenarios; ``make scenarios`` (FIREZONE_SCENARIOS=all) runs
every one, including those marked ``full_suite`` (slow: they wait out protocol timeouts)."""

from __future__ import annotations

import os

import pytest

ALL_SCENARIOS_VARIABLE = "FIREZONE_SCENARIOS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full_suite: a slow scenario, run by `make scenarios` but not by `make test`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(ALL_SCENARIOS_VARIABLE) == "all":
        return
    skip = pytest.mark.skip(reason=f"slow scenario: run with {ALL_SCENARIOS_VARIABLE}=all (make scenarios)")
    for item in items:
        if item.get_closest_marker("full_suite") is not None:
            item.add_marker(skip)
