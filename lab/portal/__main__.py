"""``python -m lab.portal --config FILE --listen HOST:PORT``: the dev portal as a process."""

from __future__ import annotations

import sys

from lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["portal", *sys.argv[1:]]))
