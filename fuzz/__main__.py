"""``python -m fuzz <target> [libFuzzer flags] [corpus dir]``: runs one target under atheris (see fuzz/harness.py)."""

from __future__ import annotations

import sys

from fuzz import TARGETS
from fuzz.harness import fuzz_main

if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
    sys.exit(f"usage: python -m fuzz <target> [libFuzzer flags] [corpus dir]; targets: {', '.join(TARGETS)}")
fuzz_main(sys.argv[1], [sys.argv[0], *sys.argv[2:]])
