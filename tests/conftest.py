"""Fixtures every test gets: no ERROR log records, no leaked threads, no leaked namespaces (design.md §6)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from lab.netns import leftover_namespaces

# A shared 2-core machine makes per-example timing meaningless, so no deadlines and no "too slow" health check.
# CI replays a fixed set of examples (derandomize): a submission's verdict never depends on a lucky draw, while local
# runs keep exploring new examples.
settings.register_profile(
    "project",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI", "").lower() == "true",
)
# Mutation runs (tools/mutation_report.py) run the selection once per mutant: fixed examples give every mutant the same
# inputs, and fewer of them where a test does not set its own count.
settings.register_profile("mutation", parent=settings.get_profile("project"), max_examples=20, derandomize=True)
settings.load_profile(os.environ.get("FIREZONE_HYPOTHESIS_PROFILE", "project"))
_MUTATION_RUN = os.environ.get("FIREZONE_HYPOTHESIS_PROFILE") == "mutation"
_MUTATION_MAX_EXAMPLES = 20


class _ErrorRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_error_logs: the test provokes ERROR log records on purpose")


@pytest.fixture(autouse=True)
def _no_error_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    recorder = _ErrorRecorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        yield
    finally:
        root.removeHandler(recorder)
    if recorder.records and request.node.get_closest_marker("allow_error_logs") is None:
        lines = "\n".join(f"{r.name}: {r.getMessage()}" for r in recorder.records[:10])
        pytest.fail(f"ERROR log records during the test:\n{lines}")


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        # asyncio's default executor threads and pytest-timeout's watchdog are not ours to join.
        leaked = [t for t in leaked if not t.name.startswith(("asyncio_", "ThreadPoolExecutor", "pytest_timeout"))]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if leaked:
        pytest.fail(f"threads left running: {[t.name for t in leaked]}")


@pytest.fixture(autouse=True)
def _no_leaked_namespaces(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    before = set(leftover_namespaces())
    yield
    leaked = set(leftover_namespaces()) - before
    if leaked:
        pytest.fail(f"network namespaces left behind: {sorted(leaked)}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In a mutation run, tests that set their own example count get at most ``_MUTATION_MAX_EXAMPLES`` too: a
    survivor runs every test that covers it, and hundreds of examples per test per mutant made a module take hours."""
    if not _MUTATION_RUN:
        return
    for item in items:
        test = getattr(item, "obj", None)
        owner = getattr(test, "__self__", None)  # a stateful machine's TestCase.runTest
        for target in (test, type(owner) if owner is not None else None):
            own = getattr(target, "_hypothesis_internal_use_settings", None)
            if isinstance(own, settings) and own.max_examples > _MUTATION_MAX_EXAMPLES:
                target._hypothesis_internal_use_settings = settings(own, max_examples=_MUTATION_MAX_EXAMPLES)  # type: ignore[union-attr]
            case_settings = getattr(target, "settings", None)
            if isinstance(case_settings, settings) and case_settings.max_examples > _MUTATION_MAX_EXAMPLES:
                target.settings = settings(case_settings, max_examples=_MUTATION_MAX_EXAMPLES)  # type: ignore[union-attr]
