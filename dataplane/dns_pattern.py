"""Whether a domain belongs to a DNS resource's address pattern (docs/protocol.md §3.1).

A pattern is a glob over labels, ``.`` being the separator, compared case-insensitively:

* ``*`` matches any run of characters within one label, ``?`` exactly one character of a label;
* ``**`` (a whole label) matches any number of labels, none included, so ``**.example.com`` covers ``example.com``;
* a pattern starting with the label ``*`` also covers the bare remainder: ``*.example.com`` matches ``example.com``.

A pattern using ``**`` inside a label (``a**.example.com``) is invalid, as in the reference's glob, and matches
nothing. Compiled patterns are cached (bounded), because the portal names few patterns and they are checked per
``assigned_ips``.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_DOMAIN_LENGTH = 253


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str] | None:
    labels: list[str] = []
    for label in pattern.split("."):
        if label == "**" and labels and labels[-1] == "**":
            continue  # "**.**" spans the same labels as "**"
        if "**" in label and label != "**":
            return None
        labels.append(label)
    regex = ""
    for index, label in enumerate(labels):
        if label == "**":
            if index == len(labels) - 1:
                # Trailing: zero or more further labels after the previous one (or any name when alone).
                regex = regex[: -len(r"\.")] + r"(?:\.[^.]*)*" if regex else r"[^.]*(?:\.[^.]*)*"
            else:
                regex += r"(?:[^.]*\.)*"
            continue
        regex += "".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c) for c in label)
        if index < len(labels) - 1:
            regex += r"\."
    return re.compile(regex)


def matches(pattern: str, domain: str) -> bool:
    """True when ``domain`` (a trailing dot ignored) falls under the resource address ``pattern``."""
    candidate = domain.lower().rstrip(".")
    if not candidate or len(candidate) > MAX_DOMAIN_LENGTH:
        return False
    normalized = pattern.lower().rstrip(".")
    if normalized.startswith("*.") and candidate == normalized[2:]:
        return True
    compiled = _compile(normalized)
    return compiled is not None and compiled.fullmatch(candidate) is not None
