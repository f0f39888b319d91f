"""``firezone-gateway status``: what ``wg show`` is to WireGuard, for the running gateway.

The gateway listens on a Unix socket (``FIREZONE_STATUS_SOCKET``, default ``/run/firezone/status.sock``), created
mode 0600: only root and the gateway's own user may connect. A connection gets one JSON document (the portal link,
the relays with their allocations and RTTs, every client with its resources and expiries, path, last handshake and
bytes each way) and is closed; nothing is read from it. The ``status`` subcommand prints that document as text, or
as it is with ``--json``.

The listener is bounded like the health server: at most :data:`MAX_CONNECTIONS` at once (more are closed at
once), each answer written within :data:`WRITE_TIMEOUT`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.main import Gateway

logger = logging.getLogger(__name__)

STATUS_SOCKET_VARIABLE = "FIREZONE_STATUS_SOCKET"
DEFAULT_STATUS_SOCKET = "/run/firezone/status.sock"
MAX_CONNECTIONS = 4
WRITE_TIMEOUT = 5.0
CLIENT_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024  # 65,536 clients with a few resources each stay well below
STATUS_VERSION = 1


def status_socket_path(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(STATUS_SOCKET_VARIABLE) or DEFAULT_STATUS_SOCKET


def _address(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def status_document(gateway: Gateway, *, wall_now: float, now: float) -> dict[str, Any]:
    """The status of the running gateway as a JSON-ready dict (``now``: the monotonic clock the data plane uses)."""
    state = gateway.state
    node = state.node
    link = gateway.link
    stats = link.stats
    interface = state.interface
    received, sent = node.wireguard_bytes()
    relays = []
    for relay in sorted(node.relays, key=lambda r: r.relay_id):
        relays.append(
            {
                "id": relay.relay_id,
                "server": _address(relay.server),
                "allocation": relay.state,
                "rtt_ms": None if relay.rtt is None else round(relay.rtt * 1000, 3),
                "srflx": [_address(a) for a in relay.srflx],
                "relayed": [_address(a) for a in relay.relayed],
                "expires_in_s": None if relay.expires_at is None else round(max(0.0, relay.expires_at - now), 1),
            }
        )
    connections = node.connections
    clients = []
    for peer in sorted(state.peers, key=lambda p: p.client_id):
        connection = connections.get(peer.client_id)
        resources = [
            {"id": resource_id, "expires_at": expires_at}
            for resource_id, expires_at in state.resource_expiries(peer.client_id).items()
        ]
        entry: dict[str, Any] = {
            "id": peer.client_id,
            "ipv4": peer.ipv4,
            "ipv6": peer.ipv6,
            "resources": resources,
            "connection": None,
        }
        if connection is not None:
            entry["connection"] = {
                "established": connection.established,
                "path": None if connection.path is None else connection.path.value,
                "relay_id": connection.relay_id,
                "local": _address(connection.local),
                "remote": _address(connection.remote),
                "handshakes": connection.handshakes,
                "last_handshake": connection.last_handshake_wall,
                "rx_bytes": connection.rx_bytes,
                "tx_bytes": connection.tx_bytes,
            }
        clients.append(entry)
    return {
        "version": STATUS_VERSION,
        "time": wall_now,
        "gateway": {
            "name": gateway.settings.name,
            "public_key": gateway.public_key_b64,
            "tunnel_ipv4": None if interface is None else str(interface.ipv4),
            "tunnel_ipv6": None if interface is None else str(interface.ipv6),
            "rx_bytes": received,
            "tx_bytes": sent,
            "flow_logs": gateway.flow_tracker is not None,
        },
        "portal": {
            "url": gateway.settings.api_url,
            "joined": link.joined,
            "ready": gateway.ready(),
            "connect_attempts": stats.connect_attempts,
            "reconnects": stats.reconnects,
            "joins": stats.joins,
        },
        "relays": relays,
        "clients": clients,
    }


class StatusServer:
    """The Unix-socket listener; ``document`` builds the answer on the event loop for each connection."""

    def __init__(self, path: str, document: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._document = document
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._active = 0

    async def start(self) -> bool:
        """Listens; False when the socket cannot be made (a warning) or another gateway answers on it (several
        gateways on one host, in network namespaces of their own): the gateway runs on without a status socket
        rather than fail or take over another's."""
        try:
            if _answers(self.path):
                logger.info(
                    "another gateway answers on %s; this one has no status socket (set %s)",
                    self.path,
                    STATUS_SOCKET_VARIABLE,
                )
                return False
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)  # a stale socket of a gateway that did not stop cleanly
            old_umask = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=self.path)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            self._inode = os.lstat(self.path).st_ino
        except OSError as exc:
            logger.warning("no status socket at %s: %s", self.path, exc.strerror or exc)
            await self.stop()
            return False
        logger.debug("status socket listening", extra={"path": self.path})
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._inode is not None:
            with contextlib.suppress(OSError):
                if os.lstat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            self._inode = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            body = json.dumps(self._document(), separators=(",", ":")).encode() + b"\n"
            writer.write(body)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            logger.debug("status connection ended early: %s", exc)
        except Exception:
            logger.exception("could not build the status document")
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.wait_closed()


def _answers(path: str) -> bool:
    """Whether a process accepts connections on the socket at ``path`` right now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def fetch_status(path: str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Reads one status document from the socket at ``path``; raises OSError or ValueError."""
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_DOCUMENT_BYTES:
                raise ValueError("the status document is too large")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
    document = json.loads(b"".join(chunks))
    if not isinstance(document, dict):
        raise ValueError("the status document is not an object")
    return document


# -- text rendering -------------------------------------------------------------------------------------------------


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{count} B"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size or (unit == "second" and not parts):
            amount, seconds = divmod(seconds, size)
            parts.append(f"{amount} {unit}{'' if amount == 1 else 's'}")
    return ", ".join(parts[:2])


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_text(document: dict[str, Any]) -> str:
    now = float(document.get("time") or time.time())
    gateway = document.get("gateway", {})
    portal = document.get("portal", {})
    lines = [f"gateway: {gateway.get('name')}"]
    lines.append(f"  public key: {gateway.get('public_key')}")
    lines.append(f"  tunnel: {gateway.get('tunnel_ipv4')}, {gateway.get('tunnel_ipv6')}")
    lines.append(
        f"  transfer: {_bytes(gateway.get('rx_bytes', 0))} received, {_bytes(gateway.get('tx_bytes', 0))} sent"
    )
    link = "ready" if portal.get("ready") else "joined" if portal.get("joined") else "disconnected"
    lines.append(f"portal: {link} ({portal.get('url')}), {portal.get('reconnects', 0)} reconnects")
    for relay in document.get("relays", []):
        rtt = "not measured" if relay.get("rtt_ms") is None else f"rtt {relay['rtt_ms']:.1f} ms"
        lines.append("")
        lines.append(f"relay: {relay.get('id')}")
        lines.append(f"  server: {relay.get('server')}, {rtt}")
        lines.append(f"  allocation: {relay.get('allocation')}")
        if relay.get("relayed"):
            lines.append(f"  relayed: {', '.join(relay['relayed'])}")
        if relay.get("srflx"):
            lines.append(f"  server-reflexive: {', '.join(relay['srflx'])}")
    for client in document.get("clients", []):
        lines.append("")
        lines.append(f"client: {client.get('id')}")
        lines.append(f"  addresses: {client.get('ipv4')}, {client.get('ipv6')}")
        connection = client.get("connection")
        if connection is None:
            lines.append("  connection: none")
        else:
            path = connection.get("path")
            if path == "relayed":
                shown = f"relayed via {connection.get('relay_id')}"
            else:
                shown = path or "no path yet"
            if connection.get("remote"):
                shown += f" ({connection.get('local')} -> {connection.get('remote')})"
            lines.append(f"  path: {shown}")
            last = connection.get("last_handshake")
            lines.append(f"  latest handshake: {'none' if last is None else _ago(now - float(last)) + ' ago'}")
            lines.append(
                f"  transfer: {_bytes(connection.get('rx_bytes', 0))} received, "
                f"{_bytes(connection.get('tx_bytes', 0))} sent"
            )
        for resource in client.get("resources", []):
            expires = resource.get("expires_at")
            if expires is None:
                until = "never expires"
            elif float(expires) > now:
                until = f"expires {_when(float(expires))}, in {_ago(float(expires) - now)}"
            else:
                until = f"expired {_when(float(expires))}"
            lines.append(f"  resource: {resource.get('id')} ({until})")
    return "\n".join(lines) + "\n"


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firezone-gateway status",
        description="Show the running gateway's portal link, relays and clients (needs root or the gateway's user).",
    )
    parser.add_argument("--json", action="store_true", help="print the status document as JSON, for scripts")
    parser.add_argument(
        "--socket",
        default=None,
        help=f"the gateway's status socket [{STATUS_SOCKET_VARIABLE}, default {DEFAULT_STATUS_SOCKET}]",
    )
    return parser


def status_main(argv: Sequence[str]) -> int:
    """``firezone-gateway status [--json] [--socket PATH]``: 0 on success, 1 when the gateway cannot be asked."""
    args = build_status_parser().parse_args(list(argv))
    path = args.socket or status_socket_path()
    try:
        document = fetch_status(path)
    except PermissionError:
        print(f"error: permission denied on {path} (run as root)", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"error: no gateway answers on {path}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the status from {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render_text(document))
    return 0
