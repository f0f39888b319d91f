"""Known-answer vectors shipped with the repo (JSON; README.md names the upstream source of every value).

The files live next to this module so a bare clone in any folder finds them. A missing or unreadable file raises,
which fails the tests that need it: known-answer tests are never skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTOR_DIR = Path(__file__).resolve().parent

VECTOR_FILES = (
    "firezone-relay-credentials.json",
    "noise-ikpsk2.json",
    "stun-rfc5769.json",
    "wireguard-handshake-messages.json",
    "wireguard-kdf.json",
    "wireguard-replay.json",
)


def load_vectors(name: str) -> dict[str, Any]:
    """The parsed JSON of ``tests/vectors/<name>``; raises FileNotFoundError if the file is missing."""
    data: dict[str, Any] = json.loads((VECTOR_DIR / name).read_text())
    return data
