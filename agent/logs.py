"""Log setup for the gateway: ``human`` or ``json`` lines on stderr, and a guard that keeps the token out of them.

JSON format: one object per line with ``timestamp`` (RFC 3339, UTC), ``level``, ``target`` (logger name), ``message``,
plus every ``extra=`` field flattened into the object (a mapping value becomes dotted keys, ``relay.rtt_ms``), so log
pipelines can index every field without parsing nested objects.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from agent.config import TRACE, LogSpec

REDACTED = "<redacted>"
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_LEVEL_NAMES = {TRACE: "TRACE", logging.WARNING: "WARN"}


def _level_name(levelno: int) -> str:
    return _LEVEL_NAMES.get(levelno) or logging.getLevelName(levelno)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{_timestamp(record)} {_level_name(record.levelno):>5} {record.name}: {record.getMessage()}"
        if extras:
            line += f" {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": _level_name(record.levelno),
            "target": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            _flatten_into(entry, key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _flatten_into(entry: dict[str, Any], key: str, value: Any, depth: int = 0) -> None:
    """Adds ``value`` under ``key`` (mappings as ``key.sub`` keys, four levels at most); never overrides a field."""
    if isinstance(value, Mapping) and value and depth < 4:
        for sub_key, sub_value in value.items():
            _flatten_into(entry, f"{key}.{sub_key}", sub_value, depth + 1)
    else:
        entry.setdefault(key, value)


class RedactingFilter(logging.Filter):
    """Replaces every occurrence of a secret in the final message (and extras) before any handler writes it."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def add_secret(self, secret: str) -> None:
        if secret:
            self._secrets.append(secret)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        scrubbed = self.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, self.scrub(value))
        if record.exc_info and record.exc_info[1] is not None:
            # Render now, scrubbed, so no formatter re-renders the raw exception text later.
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
            record.msg = f"{record.msg}\n{record.exc_text}"
            record.exc_text = None
        return True


def configure_logging(
    log_format: str, spec: LogSpec, *, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> RedactingFilter:
    """Install one stderr handler on the root logger; returns the redaction filter so more secrets can be added."""
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else HumanFormatter())
    redactor = RedactingFilter(secrets)
    handler.addFilter(redactor)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_firezone_handler", False):
            root.removeHandler(existing)
    handler._firezone_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(spec.default_level)
    for target, level in spec.targets:
        logging.getLogger(target).setLevel(level)
    # Third-party chatter stays at WARNING unless asked for by name.
    named = {target for target, _ in spec.targets}
    for noisy in ("websockets", "aiohttp.access", "asyncio"):
        if noisy not in named and spec.default_level < logging.WARNING:
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return redactor
