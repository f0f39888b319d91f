"""The lab's resource host and the probes run against it from inside namespaces.

``python -m lab.resource serve --bind IP --port 80 --size BYTES`` serves ``/blob`` (deterministic bytes, see
:func:`blob`) and ``/blob.sha256`` (their hex digest) over HTTP until killed; it prints one ``ready`` line once it
listens. The other subcommands each print one JSON object and exit 0 when the probe succeeded:

* ``fetch URL``: downloads it → ``{"status", "bytes", "sha256", "seconds"}`` (or ``{"error"}``);
* ``probe-tcp HOST PORT``: one TCP connect, watching for ICMP errors about it on a raw socket →
  ``{"outcome": connected|refused|unreachable|timeout|error, "errno", "icmp": [type, code] | null}``. Exit 0 whenever
  the probe ran; the caller judges the outcome.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.server
import json
import select
import socket
import struct
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

BLOB_PATH = "/blob"
BLOB_SEED = b"firezone-lab-resource"
DEFAULT_BLOB_SIZE = 8 * 1024 * 1024
ICMP_DEST_UNREACHABLE = 3
IPV4_MIN_HEADER = 20
ICMP_HEADER = 8
_CONNECT_ERRORS = {errno.ECONNREFUSED: "refused", errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable"}


def blob(size: int = DEFAULT_BLOB_SIZE, seed: bytes = BLOB_SEED) -> bytes:
    """``size`` bytes that look random but are the same on every machine (SHAKE-256 of the seed)."""
    return hashlib.shake_256(seed).digest(size)


def blob_sha256(size: int = DEFAULT_BLOB_SIZE, seed: bytes = BLOB_SEED) -> str:
    return hashlib.sha256(blob(size, seed)).hexdigest()


def _handler(payload: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    digest = hashlib.sha256(payload).hexdigest().encode() + b"\n"
    routes = {BLOB_PATH: payload, f"{BLOB_PATH}.sha256": digest}

    class BlobHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # the base class names it format
            """Quiet: the lab reads the probes' results, not an access log."""

    return BlobHandler


def serve(bind: str, port: int, size: int) -> None:
    server = http.server.ThreadingHTTPServer((bind, port), _handler(blob(size)))
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


def fetch(url: str, timeout: float) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = int(response.status)
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                received += len(chunk)
    except (OSError, urllib.error.URLError) as exc:
        return 1, {"error": str(exc), "seconds": time.monotonic() - started}
    result = {"status": status, "bytes": received, "sha256": digest.hexdigest(), "seconds": time.monotonic() - started}
    return (0 if status == 200 else 1), result


def _icmp_about(datagram: bytes, host: str, port: int) -> tuple[int, int] | None:
    """(type, code) of an ICMPv4 destination-unreachable that quotes a packet to host:port, else None."""
    if len(datagram) < IPV4_MIN_HEADER:
        return None
    outer = (datagram[0] & 0x0F) * 4
    icmp = datagram[outer:]
    if len(icmp) < ICMP_HEADER + IPV4_MIN_HEADER + 4 or icmp[0] != ICMP_DEST_UNREACHABLE:
        return None
    quoted = icmp[ICMP_HEADER:]
    quoted_header = (quoted[0] & 0x0F) * 4
    if socket.inet_ntoa(quoted[16:20]) != host or len(quoted) < quoted_header + 4:
        return None
    (quoted_port,) = struct.unpack_from("!H", quoted, quoted_header + 2)
    return (icmp[0], icmp[1]) if quoted_port == port else None


def probe_tcp(host: str, port: int, timeout: float) -> dict[str, Any]:
    """Connects once; also reports an ICMP destination-unreachable about this connection seen meanwhile."""
    watcher = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    outcome, code = "connected", 0
    try:
        connection.connect((host, port))
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        code = exc.errno or 0
        outcome = _CONNECT_ERRORS.get(code, "error")
    finally:
        connection.close()
    icmp: tuple[int, int] | None = None
    deadline = time.monotonic() + 0.2
    while icmp is None and (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([watcher], [], [], remaining)
        if not readable:
            break
        icmp = _icmp_about(watcher.recv(2048), host, port)
    watcher.close()
    return {"outcome": outcome, "errno": code, "icmp": list(icmp) if icmp else None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.resource", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_args = commands.add_parser("serve", help="serve the blob over HTTP")
    serve_args.add_argument("--bind", default="0.0.0.0")
    serve_args.add_argument("--port", type=int, default=80)
    serve_args.add_argument("--size", type=int, default=DEFAULT_BLOB_SIZE)
    fetch_args = commands.add_parser("fetch", help="download a URL and print its sha256")
    fetch_args.add_argument("url")
    fetch_args.add_argument("--timeout", type=float, default=20.0)
    probe_args = commands.add_parser("probe-tcp", help="one TCP connect, reporting ICMP errors about it")
    probe_args.add_argument("host")
    probe_args.add_argument("port", type=int)
    probe_args.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.bind, args.port, args.size)
        return 0
    if args.command == "fetch":
        code, result = fetch(args.url, args.timeout)
    else:
        code, result = 0, probe_tcp(args.host, args.port, args.timeout)
    print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
