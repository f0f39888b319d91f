"""The gateway's DNS forwarder on ``<tunnel ip>:53535``, UDP and TCP (docs/protocol.md §3.5).

Clients send here the queries for DNS-resource names whose record types they do not synthesize themselves (TXT, SRV,
...). Each query goes to the system's nameservers (``/etc/resolv.conf``, port 53), the fastest first: every server
keeps a smoothed round-trip time, and one that fails is tried after the others. The first answer is returned as is;
when no server answers, the client gets SERVFAIL. Queries are parsed and the SERVFAIL built with dnspython; answers are
relayed unchanged (same id, same flags).

Bounds: concurrent queries (further UDP queries are dropped; the client retries), TCP connections, the size of a TCP
message (the protocol's own 64 KiB), and idle TCP connections are closed after a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Coroutine, Sequence
from typing import Any, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.resolver

logger = logging.getLogger(__name__)

FORWARDER_PORT = 53535
UPSTREAM_PORT = 53
UPSTREAM_TIMEOUT = 2.0  # per server; a query tries every server before answering SERVFAIL
MAX_CONCURRENT_QUERIES = 256
MAX_TCP_CONNECTIONS = 64
TCP_IDLE_TIMEOUT = 10.0
_RTT_SMOOTHING = 0.3
_FAILURE_PENALTY = 10.0  # seconds added to a failed server's smoothed RTT: it is tried last until it recovers
RESOLV_CONF = "/etc/resolv.conf"
_IP_FREEBIND = 15  # Linux socket options: bind to an address not (yet) configured
_IPV6_FREEBIND = 78


def system_nameservers(resolv_conf: str = RESOLV_CONF) -> list[str]:
    """The nameserver addresses of ``resolv_conf`` (none when it is missing or lists none)."""
    try:
        return [str(ns) for ns in dns.resolver.Resolver(filename=resolv_conf).nameservers]
    except (OSError, dns.resolver.NoResolverConfiguration):
        return []


def servfail(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()


class DnsForwarder:
    """Listens on the given tunnel addresses (UDP and TCP) and forwards to ``nameservers``."""

    def __init__(
        self,
        addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
        nameservers: Sequence[str] | None = None,
        *,
        port: int = FORWARDER_PORT,
        upstream_port: int = UPSTREAM_PORT,
        upstream_timeout: float = UPSTREAM_TIMEOUT,
    ) -> None:
        self.addresses = list(addresses)
        self.port = port
        self._nameservers = list(nameservers) if nameservers is not None else None
        self._upstream_port = upstream_port
        self._upstream_timeout = upstream_timeout
        self._srtt: dict[str, float] = {}
        self._system_servers: list[str] | None = None
        self._resolv_conf_stamp: tuple[int, int, int] | None = None
        self._queries = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_connections = 0
        self.queries = 0
        self.servfails = 0
        self.dropped = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listens on every address it can (an address family the host lacks is skipped); raises OSError when it can
        listen on none."""
        errors: list[str] = []
        for address in self.addresses:
            try:
                await self._listen(address)
            except OSError as exc:
                logger.warning("DNS forwarder cannot listen on %s: %s", address, exc)
                errors.append(f"{address}: {exc}")
        if not self._transports:
            self.close()
            raise OSError(f"the DNS forwarder could not listen anywhere ({'; '.join(errors)})")
        logger.info("DNS forwarder listening", extra={"addresses": [str(a) for a in self.addresses], "port": self.port})

    async def _listen(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            for sock in (udp, tcp):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # Bind before the TUN address is up (or while IPv6 still checks it for duplicates).
                with contextlib.suppress(OSError):
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    else:
                        sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
                sock.bind((str(address), self.port))
                sock.setblocking(False)
            server = await asyncio.start_server(self._serve_tcp, sock=tcp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp)
        self._transports.append(transport)
        self._servers.append(server)

    def close(self) -> None:
        """Stops listening and abandons queries in flight (synchronous: called while the data plane closes)."""
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        self._transports.clear()
        self._servers.clear()

    # -- forwarding ---------------------------------------------------------------------------------------------

    def _system_nameservers(self) -> list[str]:
        """/etc/resolv.conf's nameservers, re-read only when the file changes."""
        try:
            st = os.stat(RESOLV_CONF)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp != self._resolv_conf_stamp or self._system_servers is None:
            self._system_servers = system_nameservers()
            self._resolv_conf_stamp = stamp
        return self._system_servers

    def _ordered_servers(self) -> list[str]:
        servers = self._nameservers if self._nameservers is not None else self._system_nameservers()
        return sorted(servers, key=lambda s: self._srtt.get(s, 0.0))

    def _record(self, server: str, rtt: float) -> None:
        previous = self._srtt.get(server)
        self._srtt[server] = rtt if previous is None else previous + _RTT_SMOOTHING * (rtt - previous)

    async def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The answer to one query in wire format; None when ``wire`` is not a DNS query (dropped)."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            self.dropped += 1
            return None
        if query.flags & dns.flags.QR:
            self.dropped += 1
            return None
        self.queries += 1
        for server in self._ordered_servers():
            started = time.monotonic()
            try:
                if tcp:
                    response = await dns.asyncquery.tcp(
                        query, server, timeout=self._upstream_timeout, port=self._upstream_port
                    )
                else:
                    response = await dns.asyncquery.udp(
                        query, server, timeout=self._upstream_timeout, port=self._upstream_port, ignore_trailing=True
                    )
            except (dns.exception.DNSException, OSError, ValueError, EOFError) as exc:
                logger.debug("nameserver %s failed: %s", server, exc)
                self._record(server, time.monotonic() - started + _FAILURE_PENALTY)
                continue
            self._record(server, time.monotonic() - started)
            return response.to_wire()
        self.servfails += 1
        return servfail(query)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_udp(self, transport: asyncio.DatagramTransport, wire: bytes, peer: tuple[str, int]) -> None:
        async with self._queries:
            reply = await self.answer(wire, tcp=False)
        if reply is not None and not transport.is_closing():
            transport.sendto(reply, peer)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_connections >= MAX_TCP_CONNECTIONS:
            self.dropped += 1
            writer.close()
            return
        self._tcp_connections += 1
        try:
            while True:
                prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                (length,) = struct.unpack("!H", prefix)
                wire = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                async with self._queries:
                    reply = await self.answer(wire, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self._tcp_connections -= 1
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DnsForwarder) -> None:
        self._forwarder = forwarder
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        forwarder = self._forwarder
        if self._transport is None:
            return
        if forwarder._queries.locked():
            forwarder.dropped += 1  # every slot busy: the client retries
            return
        forwarder._spawn(forwarder._answer_udp(self._transport, data, (addr[0], addr[1])))
