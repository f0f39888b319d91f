"""agent/logs.py: human and json formats, and the token redaction guard."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from agent.config import LogSpec
from agent.logs import REDACTED, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("agent.test").setLevel(logging.NOTSET)


def test_json_lines_have_the_documented_fields(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", LogSpec(logging.INFO), stream=stream)
    logging.getLogger("agent.test").info("joined %s", "portal", extra={"relays": 2})
    entry = json.loads(stream.getvalue().strip())
    assert entry["level"] == "INFO" and entry["target"] == "agent.test" and entry["message"] == "joined portal"
    assert entry["relays"] == 2 and entry["timestamp"].endswith("Z")


def test_human_lines(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("human", LogSpec(logging.INFO), stream=stream)
    logging.getLogger("agent.test").warning("portal down", extra={"retry_in": 1.5})
    line = stream.getvalue().strip()
    assert " WARN agent.test: portal down retry_in=1.5" in line


def test_levels_and_targets(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("human", LogSpec(logging.WARNING, (("agent.test", logging.DEBUG),)), stream=stream)
    logging.getLogger("agent.test").debug("shown")
    logging.getLogger("agent.other").info("hidden")
    assert "shown" in stream.getvalue() and "hidden" not in stream.getvalue()


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_token_is_redacted_everywhere(restore_logging: None, fmt: str) -> None:
    stream = io.StringIO()
    configure_logging(fmt, LogSpec(logging.DEBUG), secrets=["tok-123456"], stream=stream)
    log = logging.getLogger("agent.test")
    log.info("header Bearer tok-123456")
    log.info("args %s", "tok-123456")
    log.info("extra", extra={"auth": "Bearer tok-123456"})
    try:
        raise RuntimeError("failed with tok-123456")
    except RuntimeError:
        log.warning("exception", exc_info=True)
    output = stream.getvalue()
    assert "tok-123456" not in output
    assert output.count(REDACTED) >= 4
