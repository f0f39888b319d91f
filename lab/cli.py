"""``firezone-lab``: the local world from the command line (``portal``, ``client``, ``demo``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range")
    return host, number


async def _run_portal(config: Path, host: str, port: int) -> int:
    from lab.portal import DevPortal, load_config

    portal = DevPortal(load_config(config), host=host, port=port)
    await portal.start()
    print(f"dev portal: FIREZONE_API_URL={portal.url}  admin: {portal.admin_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await portal.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from lab.portal import DEFAULT_CONFIG

    parser = argparse.ArgumentParser(prog="firezone-lab", description="The gateway's local test world.")
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default info)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    portal = commands.add_parser("portal", help="run the dev portal until SIGINT/SIGTERM")
    portal.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="portal config JSON (default: the dev one)")
    portal.add_argument(
        "--listen", type=parse_listen, default=("127.0.0.1", 4000), help="HOST:PORT (default 127.0.0.1:4000)"
    )
    commands.add_parser("demo", help="the end-to-end demo (what `make demo` runs)", add_help=False)
    commands.add_parser(
        "client", help="the headless client (python -m lab.client --portal URL --token T ...)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from lab.demo import main as demo_main

        return demo_main(rest)
    if args.command == "client":
        from lab.client import headless_main
        from lab.client import main as client_main

        # Portal mode unless the caller asks for the bare Node driver (--role).
        if any(a == "--role" or a.startswith("--role=") for a in rest):
            return client_main(rest)
        return headless_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        config_path: Path = args.config
        host, port = args.listen
        return asyncio.run(_run_portal(config_path, host, port))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
