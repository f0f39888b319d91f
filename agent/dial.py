"""Opening the portal's TCP connection the way the reference does (docs/protocol.md §1.3, §4.1).

At every attempt the host is resolved again and, when it is an IP literal, the literal itself is added to what the
resolver returned. All addresses are dialled at once, each with a 5 s TCP connect timeout; the first socket to connect
wins and the others are abandoned. Every socket carries ``SO_MARK 0xfd002021`` so the gateway's own policy routing never
sends the portal link into the tunnel.

Failing to set the mark is fatal in the reference. We run unprivileged in some tests and deployments (no
``CAP_NET_ADMIN``), where the mark cannot be set and also matters nothing because no Firezone routing rules exist
either: for ``EPERM`` we log one warning per process and continue; any other error is a :class:`SocketMarkError`, which
the caller must treat as fatal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from dataplane.io.udp import FIREZONE_MARK, SO_MARK

logger = logging.getLogger(__name__)

TCP_CONNECT_TIMEOUT = 5.0

SocketAddress = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class DialTarget:
    """One address to dial: the socket family and the address tuple ``socket.connect`` takes."""

    family: socket.AddressFamily
    address: SocketAddress

    def __str__(self) -> str:
        host, port = self.address[0], self.address[1]
        return f"[{host}]:{port}" if self.family is socket.AF_INET6 else f"{host}:{port}"


class SocketMarkError(OSError):
    """SO_MARK could not be set for a reason other than missing privilege: fatal, the gateway must not run unmarked."""


class DialError(OSError):
    """No address accepted a TCP connection (each failure is listed in the message)."""


class SocketMarker:
    """Applies the Firezone fwmark to sockets; remembers whether it already warned about missing privilege."""

    def __init__(self, mark: int = FIREZONE_MARK) -> None:
        self.mark = mark
        self.warned_not_permitted = False

    def apply(self, sock: socket.socket) -> bool:
        """True when the mark is set; False when not permitted (warned once); raises SocketMarkError otherwise."""
        try:
            # Packed unsigned: 0xfd002021 does not fit the C int that setsockopt(int) would pass.
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("=I", self.mark))
        except PermissionError as exc:
            if not self.warned_not_permitted:
                self.warned_not_permitted = True
                logger.warning(
                    "cannot set SO_MARK %#x on portal sockets (%s; needs CAP_NET_ADMIN); continuing without it",
                    self.mark,
                    exc.strerror or exc,
                )
            return False
        except OSError as exc:
            raise SocketMarkError(
                exc.errno, f"cannot set SO_MARK {self.mark:#x} on the portal socket: {exc.strerror or exc}"
            ) from exc
        return True


def literal_target(host: str, port: int) -> DialTarget | None:
    """The host itself as a dial target when it is an IP literal (brackets and a zone index allowed)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 4:
        return DialTarget(socket.AF_INET, (bare, port))
    return DialTarget(socket.AF_INET6, (bare, port, 0, 0))


def merge_targets(resolved: list[DialTarget], literal: DialTarget | None) -> list[DialTarget]:
    """Resolver answers in order, then the literal host when the resolver did not already return it; no duplicates."""
    merged: list[DialTarget] = []
    seen: set[tuple[socket.AddressFamily, Any, Any]] = set()
    for target in [*resolved, *([literal] if literal is not None else [])]:
        key = (target.family, target.address[0], target.address[1])
        if key not in seen:
            seen.add(key)
            merged.append(target)
    return merged


async def resolve_targets(host: str, port: int) -> list[DialTarget]:
    """Resolve ``host`` now (no caching across attempts) and add the host itself if it is an IP literal."""
    literal = literal_target(host, port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        if literal is None:
            raise DialError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        infos = []
    resolved = [
        DialTarget(socket.AddressFamily(family), tuple(address))
        for family, _, _, _, address in infos
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
    targets = merge_targets(resolved, literal)
    if not targets:
        raise DialError(f"{host} resolved to no IPv4/IPv6 address")
    return targets


async def _dial_one(target: DialTarget, marker: SocketMarker, timeout: float) -> socket.socket:
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        marker.apply(sock)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target.address), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def dial_first(
    targets: list[DialTarget], marker: SocketMarker, *, tcp_timeout: float = TCP_CONNECT_TIMEOUT
) -> socket.socket:
    """Dial every target concurrently; return the first connected socket and close the rest.

    Raises :class:`DialError` when all fail (or time out) and :class:`SocketMarkError` as soon as one mark fails.
    """
    if not targets:
        raise DialError("no address to dial")
    attempts = {asyncio.ensure_future(_dial_one(target, marker, tcp_timeout)): target for target in targets}
    pending = set(attempts)
    failures: list[str] = []
    winner: tuple[socket.socket, DialTarget] | None = None
    try:
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for attempt in done:
                error = attempt.exception()
                if isinstance(error, SocketMarkError):
                    raise error
                if error is None and winner is None:
                    winner = (attempt.result(), attempts[attempt])
                elif error is None:
                    attempt.result().close()  # two connected in the same turn: keep one
                else:
                    reason = "timed out" if isinstance(error, TimeoutError) else str(error)
                    failures.append(f"{attempts[attempt]}: {reason}")
    except BaseException:
        if winner is not None:
            winner[0].close()
        raise
    finally:
        for attempt in pending:
            attempt.cancel()
        for late in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(late, socket.socket):
                late.close()
    if winner is None:
        raise DialError("cannot connect to any portal address: " + "; ".join(failures))
    logger.debug("portal TCP connection via %s", winner[1])
    return winner[0]


__all__ = [
    "TCP_CONNECT_TIMEOUT",
    "DialError",
    "DialTarget",
    "SocketMarkError",
    "SocketMarker",
    "dial_first",
    "literal_target",
    "merge_targets",
    "resolve_targets",
]
