"""Load generator: many Firezone client identities in one process, each with its own keys, against one gateway.

Every identity is a lean headless client without a TUN: it joins the portal's ``client`` channel with its own token
and a fresh X25519 key, asks for one resource with ``create_flow``, connects its own Node (ICE controlling, WireGuard
initiator) to the gateway the portal brokers, and sends an ICMP echo request from its tunnel address to a target
behind the gateway as soon as ICE is up, and again every second until one is answered (as ``ping`` does; they wait in
the tunnel behind its WireGuard handshake). An identity is *connected* once an echo reply came back: ICE, the
handshake and one ping done. Once every identity has settled (connected or failed) all of them ping at a fixed rate
for ``--duration`` s, matching the replies they decrypt (so the bring-up measures setting up, not pinging).
Identities share the process's event loop, not their sockets or keys: to the gateway and the portal they are as many
separate clients. Several processes can share a run: ``--first`` picks the identities, ``--start-at`` starts them
together, and every identity's times are listed for figures over all of them (:mod:`lab.load_run`).

    python -m lab.loadgen --portal ws://172.31.0.1:8443 --token-prefix lab-load-token- --clients 20 \\
        --resource RESOURCE_ID --target 172.20.0.10 --rate 2 --duration 5

Progress goes to stderr; stdout gets one JSON object at the end (:meth:`LoadSummary.to_json`): how many identities
connected (an echo reply received), two setup times from the first ``create_flow`` (median, p99, max):
``ice_seconds`` to the connection established (the Node's ``ConnectionEstablished``: ICE nominated a pair, before the
WireGuard handshake) and ``ready_seconds`` to the first echo reply (handshake and one ping done: what the goal calls
connected); the time to bring them all up (first start → last ready), pings sent and answered, round-trip times, the
failures by reason and how often a ``create_flow`` was asked again (``flow_retries``). An identity's application
sends its first packet once connected, so by default it asks once (``--flow-demand 0``): Firezone's client asks again
only when the application wants the resource again. A request nothing answers is given up 20 s after the ask (the
portal answers ``offline`` after 15 s). ``--flow-demand 0,1,3,7,15`` plays an application that opens a TCP connection
instead (asks at 0, 3, 7, 15 s, as the headless client does); with 1,000 identities at once and a slow gateway that
asks again for most of them, which triples the brokering work (docs/scenarios.md). Exit status 0 when every identity
connected.

Used by the scenario tests (a 20-client smoke run), ``make bench`` and the soak.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import resource
import socket
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dataplane.base import Address, Transmit
from dataplane.io.rng import SystemRng
from dataplane.io.udp import UdpSocket
from dataplane.node import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    Node,
    NodeRole,
    NoRelays,
    RelayConfig,
)
from lab.client import FlowGrant, parse_portal_relays
from lab.portal_channel import (
    CandidateAnnouncements,
    FlowRequestDue,
    FlowRequests,
    FlowRequestTimer,
    NodeTimer,
    PortalChannelDriver,
    client_socket_url,
)
from protocol.phoenix import ChannelEvent, ChannelFailed, ChannelJoined, LinkHiccuped, PushReceived

log = logging.getLogger("lab.loadgen")

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
IPV4_HEADER = 20
ICMP_HEADER = 8
PING_PAYLOAD = b"firezone-loadgen"
MAX_PINGS_IN_FLIGHT = 256
"""Per identity: echo requests remembered for matching; older ones count as lost."""
MAX_EARLY_CANDIDATES = 64
READY_PING_INTERVAL = 1.0
"""Seconds between an identity's echo requests while ICE is up and none has been answered yet (``ping``'s pace)."""
PORTAL_OPEN_TIMEOUT = 20.0
PORTAL_ATTEMPTS = 10
PORTAL_RETRY_DELAY = 0.5
"""Seconds before the first retry of a refused portal connection; each later one waits that much longer."""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(source: bytes, destination: bytes, identifier: int, sequence: int) -> bytes:
    """An IPv4 ICMP echo request (TTL 64) from ``source`` to ``destination`` (4 bytes each)."""
    icmp = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, identifier, sequence) + PING_PAYLOAD
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    total = IPV4_HEADER + len(icmp)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, identifier, 0, 64, 1, 0, source, destination)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an IPv4 ICMP echo reply, else None."""
    if len(packet) < IPV4_HEADER + ICMP_HEADER or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    offset = (packet[0] & 0x0F) * 4
    if len(packet) < offset + ICMP_HEADER or packet[offset] != ICMP_ECHO_REPLY:
        return None
    _, _, _, identifier, sequence = struct.unpack_from("!BBHHH", packet, offset)
    return identifier, sequence


def spread(values: Sequence[float], digits: int | None = None) -> dict[str, float | None]:
    """p50, p99 and max of ``values`` (None when empty), rounded to ``digits`` when given."""
    figures = {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "max": max(values, default=None)}
    if digits is None:
        return figures
    return {name: None if value is None else round(value, digits) for name, value in figures.items()}


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class IdentityTimes:
    """One identity's setup, in seconds from its first ``create_flow``; None for a stage it never reached."""

    ice_seconds: float | None
    """To the connection established (ICE nominated a pair; the WireGuard handshake starts then)."""
    ready_seconds: float | None
    """To its first echo reply (handshake and one ping done): the identity counts as connected only with this."""


@dataclass
class LoadSummary:
    clients: int
    identities: list[IdentityTimes]
    bring_up_seconds: float | None
    """First start → last identity ready; None unless every identity became ready."""
    pings_sent: int
    pings_answered: int
    rtt_seconds: list[float]
    failures: Counter[str]
    portal_retries: int
    flow_retries: int = 0
    datagrams: Counter[str] = field(default_factory=Counter)
    started_at: float = 0.0
    """Unix time the first identity started (several load processes' bring-up is measured across them)."""
    last_ready_at: float | None = None
    """Unix time the last ready identity got its first echo reply (None when none did)."""

    @property
    def connected(self) -> int:
        """Identities with an answered ping."""
        return sum(1 for times in self.identities if times.ready_seconds is not None)

    @property
    def ice_connected(self) -> int:
        """Identities whose ICE completed (a few of them may still have had no ping answered)."""
        return sum(1 for times in self.identities if times.ice_seconds is not None)

    def to_json(self) -> dict[str, Any]:
        ice = [t.ice_seconds for t in self.identities if t.ice_seconds is not None]
        ready = [t.ready_seconds for t in self.identities if t.ready_seconds is not None]
        return {
            "clients": self.clients,
            "connected": self.connected,
            "ice_connected": self.ice_connected,
            "ice_seconds": spread(ice),
            "ready_seconds": spread(ready),
            "bring_up_seconds": self.bring_up_seconds,
            "pings_sent": self.pings_sent,
            "pings_answered": self.pings_answered,
            "rtt_ms": {k: None if v is None else v * 1000 for k, v in spread(self.rtt_seconds).items()},
            "failures": dict(self.failures),
            "portal_retries": self.portal_retries,
            "flow_retries": self.flow_retries,
            "datagrams": dict(self.datagrams),
            "started_at": self.started_at,
            "last_ready_at": self.last_ready_at,
            # Per identity, in order, for figures over several processes and the smoke test's checks.
            "identities": [[t.ice_seconds, t.ready_seconds] for t in self.identities],
        }


@dataclass
class _Grant:
    grant: FlowGrant
    connected: bool = False


@dataclass
class LoadClient:
    """One identity: its portal channel, Node, UDP socket and pings. Driven by :class:`LoadGenerator`'s loop."""

    index: int
    token: str
    generator: LoadGenerator
    node: Node = field(init=False)
    portal: PortalChannelDriver = field(init=False)
    timer: NodeTimer = field(init=False)
    flow_requests: FlowRequests = field(init=False)
    flow_request_timer: FlowRequestTimer = field(init=False)
    flow_retries: int = 0
    public_key_b64: str = field(init=False)
    socket: UdpSocket | None = None
    local: Address = ("0.0.0.0", 0)
    tunnel_ipv4: bytes | None = None
    grant: _Grant | None = None
    early_candidates: list[str] = field(default_factory=list)
    portal_retries: int = 0
    portal_joins: int = 0
    joins_at_last_loss: int = 0
    """Joins counted when the portal was last lost: a join since then starts the attempts from one again."""
    requested_at: float | None = None
    established_at: float | None = None
    """When ICE nominated a pair (the Node's ``ConnectionEstablished``)."""
    ready_at: float | None = None
    """When the first echo reply came back: ICE, the WireGuard handshake and one ping done."""
    failure: str | None = None
    has_settled: bool = False
    ping_timer: asyncio.TimerHandle | None = None
    in_flight: dict[int, float] = field(default_factory=dict)
    next_sequence: int = 0
    pings_sent: int = 0
    rtts: list[float] = field(default_factory=list)
    datagrams: Counter[str] = field(default_factory=Counter)
    """Sent and received, to/from a relay or anyone else (the gateway, directly)."""

    def __post_init__(self) -> None:
        key = X25519PrivateKey.generate().private_bytes_raw()
        self.node = Node(NodeRole.CLIENT, key, rng=SystemRng(), wall_clock=time.time)
        self.public_key_b64 = base64.b64encode(self.node.public_key).decode()
        self.portal = PortalChannelDriver(
            self.loop,
            url=client_socket_url(self.generator.args.portal, self.public_key_b64),
            token=self.token,
            on_event=self.on_portal_event,
            after_input=self.flush,
            open_timeout=PORTAL_OPEN_TIMEOUT,
        )
        self.timer = NodeTimer(self.loop, self.node, self.flush)
        self.flow_requests = FlowRequests(demand_offsets=self.generator.args.flow_demand)
        self.flow_request_timer = FlowRequestTimer(self.loop, self.flow_requests, self.on_flow_requests_due)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.generator.loop

    def now(self) -> float:
        return self.loop.time()

    def fail(self, reason: str) -> None:
        """A failure before ICE is up ends the identity; after that its tunnel no longer needs the portal or the flow
        request, so only the data plane's failures (:meth:`fail_tunnel`) count."""
        if self.established_at is None:
            self.fail_tunnel(reason)

    def fail_tunnel(self, reason: str) -> None:
        """A failure before the first echo reply: this identity will not become ready."""
        if self.failure is None and self.ready_at is None:
            self.failure = reason
            log.info("client %d failed: %s", self.index, reason)
            self.settle()

    def settle(self) -> None:
        """Tells the generator, once, that this identity is ready or has failed."""
        if not self.has_settled:
            self.has_settled = True
            self.generator.settled()

    def times(self) -> IdentityTimes:
        def since_request(moment: float | None) -> float | None:
            return None if moment is None or self.requested_at is None else moment - self.requested_at

        return IdentityTimes(since_request(self.established_at), since_request(self.ready_at))

    # -- the portal -------------------------------------------------------------------------------------------------

    async def run_portal(self) -> None:
        """Holds the portal link while the run lasts. A connection refused or lost is tried again (as a client would
        after a portal restart), up to :data:`PORTAL_ATTEMPTS` times in a row: before this identity's ICE was up
        that ends it as failed; after that its connection and pings go on, and so do the rejoins."""
        attempts = 0
        while True:
            reason = f"portal: {(await self.portal.session()).reason}"
            self.flow_requests.forget(self.generator.args.resource)  # asked again after the next init
            self.flow_request_timer.arm()
            if self.generator.stopping or self.failure is not None:
                return
            attempts = 1 if self.portal_joins > self.joins_at_last_loss else attempts + 1
            self.joins_at_last_loss = self.portal_joins
            if attempts >= PORTAL_ATTEMPTS:
                self.fail(reason)
                return
            self.portal_retries += 1
            await asyncio.sleep(PORTAL_RETRY_DELAY * attempts)

    def on_portal_event(self, event: ChannelEvent) -> None:
        if isinstance(event, PushReceived):
            self.on_push(event.event, event.payload)
        elif isinstance(event, ChannelJoined):
            self.portal_joins += 1
        elif isinstance(event, LinkHiccuped | ChannelFailed):
            self.fail(f"portal: {type(event).__name__}")

    def on_push(self, event: str, payload: object) -> None:
        body = payload if isinstance(payload, dict) else {}
        if event == "init":
            self.on_init(body)
        elif event == "flow_created":
            self.on_flow_created(payload)
        elif event == "flow_creation_failed":
            self.flow_requests.answered(self.generator.args.resource)
            self.flow_request_timer.arm()
            self.fail(f"flow_creation_failed: {body.get('reason')}")
        elif event == "ice_candidates":
            self.on_candidates(body)
        elif event == "relays_presence":
            removed = [r for r in body.get("disconnected_ids", []) if isinstance(r, str)]
            self.node.update_relays(removed, self.relays(body.get("connected")), self.now())

    def relays(self, entries: object) -> list[RelayConfig]:
        configs = parse_portal_relays(entries, ipv6=False)
        for config in configs:
            self.generator.relay_addresses.update(config.addresses)
        return configs

    def on_init(self, body: dict[str, Any]) -> None:
        if self.socket is None:
            interface = body.get("interface")
            try:
                assert isinstance(interface, dict)
                self.tunnel_ipv4 = bytes(int(part) for part in str(interface["ipv4"]).split("."))
                self.socket = UdpSocket.bind(self.generator.bind, 0, gso=False, gro=False, increase_buffers=False)
            except (AssertionError, KeyError, ValueError, OSError) as exc:
                self.fail(f"setup: {type(exc).__name__}")
                return
            self.local = self.socket.local_address
            self.loop.add_reader(self.socket.fileno(), self.on_udp)
        self.node.update_relays([], self.relays(body.get("relays")), self.now())
        if self.grant is not None:
            return  # a rejoin after the connection was granted: nothing to ask again
        if self.requested_at is None:
            self.requested_at = self.now()
        resource_id = self.generator.args.resource
        self.flow_requests.forget(resource_id)  # a rejoin: the portal that had the request is gone
        self.flow_requests.ask(resource_id, self.now())
        self.flow_request_timer.arm()
        self.send_create_flow()

    def send_create_flow(self) -> None:
        self.portal.push("create_flow", {"resource_id": self.generator.args.resource, "connected_gateway_ids": []})

    def on_flow_requests_due(self, due: list[FlowRequestDue]) -> None:
        """No answer yet: asked again, as Firezone's client does (a gateway without relays tells only the portal, which
        then answers nothing until the gateway confirms or 15 s passed; docs/protocol.md §2.3); or given up."""
        for item in due:
            if not item.ask_again:
                self.fail("flow request unanswered")
            elif self.portal.joined and self.grant is None:
                self.flow_retries += 1
                self.send_create_flow()

    def on_flow_created(self, payload: object) -> None:
        grant = FlowGrant.parse(payload)
        if grant is None:
            self.fail("malformed flow_created")
            return
        self.flow_requests.answered(grant.resource_id)
        self.flow_request_timer.arm()
        if self.grant is not None:
            return  # a second answer (to an ask the portal had replaced): the first grant stands
        self.grant = _Grant(grant)
        self.node.update_relays([], self.relays(grant.relays), self.now())
        self.connect_when_ready()

    def connect_when_ready(self) -> None:
        """Creates the connection once a relay has a measured RTT (the Node samples one for it)."""
        if self.grant is None or self.grant.connected:
            return
        if not any(self.node.relay_rtt(r) is not None for r in self.node.relay_ids):
            return
        grant, now = self.grant.grant, self.now()
        self.grant.connected = self.node.upsert_connection(
            grant.gateway_id,
            remote_public_key=grant.gateway_public_key,
            preshared_key=grant.preshared_key,
            local_credentials=grant.client_credentials,
            remote_credentials=grant.gateway_credentials,
            now=now,
        )
        if self.grant.connected:
            for sdp in self.early_candidates:
                self.node.add_remote_candidate(grant.gateway_id, sdp, now)
            self.early_candidates.clear()

    def on_candidates(self, body: dict[str, Any]) -> None:
        candidates = body.get("candidates")
        if not isinstance(candidates, list):
            return
        sdps = [c for c in candidates if isinstance(c, str)]
        if self.grant is not None and self.grant.connected and body.get("gateway_id") == self.grant.grant.gateway_id:
            for sdp in sdps:
                self.node.add_remote_candidate(self.grant.grant.gateway_id, sdp, self.now())
        else:
            room = MAX_EARLY_CANDIDATES - len(self.early_candidates)
            self.early_candidates.extend(sdps[: max(0, room)])

    # -- the data plane ---------------------------------------------------------------------------------------------

    def on_udp(self) -> None:
        assert self.socket is not None
        now = self.now()
        datagrams = self.socket.recv_many()
        relays = self.generator.relay_addresses
        for data, src in datagrams:
            self.datagrams["from_relays" if src in relays else "from_others"] += 1
            result = self.node.handle_input(data, src, self.local, now)
            if result is not None:
                self.on_packet(result[1], now)
        self.flush()

    def on_packet(self, packet: bytes, now: float) -> None:
        reply = parse_echo_reply(packet)
        if reply is None or reply[0] != self.identifier:
            return
        sent_at = self.in_flight.pop(reply[1], None)
        if sent_at is not None:
            self.rtts.append(now - sent_at)
            if self.ready_at is None:
                self.on_ready(now)

    def on_ready(self, now: float) -> None:
        self.ready_at = now
        if not self.generator.pinging and self.ping_timer is not None:
            self.ping_timer.cancel()  # answered: no more bring-up pings; the rate pinging starts it again
            self.ping_timer = None
        self.settle()

    @property
    def identifier(self) -> int:
        return self.index & 0xFFFF

    def send_ping(self) -> None:
        self.ping_timer = None
        if self.grant is None or self.tunnel_ipv4 is None or self.generator.stopping or self.failure is not None:
            return
        now = self.now()
        sequence = self.next_sequence
        self.next_sequence = (sequence + 1) & 0xFFFF
        if len(self.in_flight) >= MAX_PINGS_IN_FLIGHT:
            self.in_flight.pop(next(iter(self.in_flight)))
        self.in_flight[sequence] = now
        packet = echo_request(self.tunnel_ipv4, self.generator.target, self.identifier, sequence)
        self.node.encapsulate(self.grant.grant.gateway_id, packet, now)
        self.pings_sent += 1
        self.flush()
        if self.generator.pinging:
            self.ping_timer = self.loop.call_later(1.0 / self.generator.args.rate, self.send_ping)
        elif self.ready_at is None:
            self.ping_timer = self.loop.call_later(READY_PING_INTERVAL, self.send_ping)

    def flush(self) -> None:
        transmits: list[Transmit] = []
        while (transmit := self.node.poll_transmit()) is not None:
            transmits.append(transmit)
        if transmits and self.socket is not None:
            self.socket.send_many(transmits)
            relays = self.generator.relay_addresses
            for transmit in transmits:
                self.datagrams["to_relays" if transmit.dst in relays else "to_others"] += 1
        announced = CandidateAnnouncements()
        while (event := self.node.poll_event()) is not None:
            if announced.add(event):
                continue
            if isinstance(event, ConnectionEstablished):
                self.on_established()
            elif isinstance(event, ConnectionFailed):
                self.fail_tunnel(f"connection failed: {event.reason}")
            elif isinstance(event, ConnectionClosed):
                self.fail_tunnel("connection closed")
            elif isinstance(event, NoRelays):
                self.portal.push("no_relays", {})  # as Firezone's client: the portal answers with fresh relays
        announced.push_to(self.portal)
        if self.grant is not None and not self.grant.connected:
            # A relay may just have been measured: the connection can be made now, and its first checks go out.
            self.connect_when_ready()
            if self.grant.connected:
                self.flush()
                return
        self.timer.arm()

    def on_established(self) -> None:
        if self.established_at is not None:
            return
        self.established_at = self.now()
        self.send_ping()

    def close(self) -> None:
        self.timer.cancel()
        self.flow_request_timer.cancel()
        self.portal.cancel_timer()
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        if self.socket is not None:
            self.loop.remove_reader(self.socket.fileno())
            self.socket.close()
            self.socket = None


class LoadGenerator:
    """Brings ``--clients`` identities up at once, pings for ``--duration`` s once all have settled, summarises."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.target = bytes(int(part) for part in str(args.target).split("."))
        self.stopping = False
        self.bind = args.bind or source_address_towards(urlparse(args.portal).hostname or "127.0.0.1")
        self.clients: list[LoadClient] = []
        self.unsettled = 0
        self.all_settled = asyncio.Event()
        self.pinging = False
        self.relay_addresses: set[Address] = set()
        """Until every identity has settled each sends one ping when it connects; then all ping at ``--rate``."""

    def settled(self) -> None:
        """One more identity is either ready (an echo reply came back) or has failed."""
        self.unsettled -= 1
        if self.unsettled <= 0:
            self.all_settled.set()

    async def run(self) -> LoadSummary:
        _raise_open_file_limit()
        args = self.args
        indexes = range(args.first, args.first + args.clients)
        self.clients = [LoadClient(i, f"{args.token_prefix}{i}", self) for i in indexes]
        self.unsettled = len(self.clients)
        if args.start_at is not None:
            # Several load processes start their identities together (each has made its keys by then).
            await asyncio.sleep(max(0.0, args.start_at - time.time()))
        started, started_wall = self.now(), time.time()
        portals: list[asyncio.Task[None]] = []
        for client in self.clients:
            portals.append(self.loop.create_task(client.run_portal()))
            if args.spread > 0:
                await asyncio.sleep(args.spread)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_settled.wait(), args.setup_timeout)
        # Every identity whose ICE is up pings at the rate, also one not answered yet (its reply may still come).
        tunnels = [c for c in self.clients if c.established_at is not None and c.failure is None]
        log.info(
            "%d of %d ready, %d with ICE up; pinging for %.1f s",
            sum(1 for c in self.clients if c.ready_at is not None),
            len(self.clients),
            len(tunnels),
            args.duration,
        )
        self.start_pinging(tunnels)
        await asyncio.sleep(args.duration)
        self.stopping = True
        # The last pings get one more second to come back before they count as lost.
        await asyncio.sleep(1.0)
        for task in portals:
            task.cancel()
        await asyncio.gather(*portals, return_exceptions=True)
        for client in self.clients:
            client.close()
        ready_moments = [c.ready_at for c in self.clients if c.ready_at is not None]
        last_ready = max(ready_moments, default=None)
        all_ready = len(ready_moments) == len(self.clients)
        return LoadSummary(
            clients=len(self.clients),
            identities=[c.times() for c in self.clients],
            bring_up_seconds=last_ready - started if all_ready and last_ready is not None else None,
            pings_sent=sum(c.pings_sent for c in self.clients),
            pings_answered=sum(len(c.rtts) for c in self.clients),
            rtt_seconds=[rtt for c in self.clients for rtt in c.rtts],
            failures=Counter(_not_ready_reason(c) for c in self.clients if c.ready_at is None),
            portal_retries=sum(c.portal_retries for c in self.clients),
            flow_retries=sum(c.flow_retries for c in self.clients),
            datagrams=sum((c.datagrams for c in self.clients), Counter()),
            started_at=started_wall,
            last_ready_at=None if last_ready is None else started_wall + (last_ready - started),
        )

    def now(self) -> float:
        return self.loop.time()

    def start_pinging(self, connected: Sequence[LoadClient]) -> None:
        """Every identity in ``connected`` (ICE up) pings at ``--rate`` from now on, their first pings spread over one interval
        (1,000 echo requests in the same millisecond would measure a burst, not the rate)."""
        self.pinging = True
        interval = 1.0 / self.args.rate
        for position, client in enumerate(connected):
            if client.ping_timer is None:
                client.ping_timer = self.loop.call_later(interval * position / len(connected), client.send_ping)


def _not_ready_reason(client: LoadClient) -> str:
    if client.failure is not None:
        return client.failure
    return "no echo reply" if client.established_at is not None else "not established in time"


def source_address_towards(host: str) -> str:
    """The address the kernel sends from towards ``host``: the identities' host candidate."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return str(probe.getsockname()[0])


def _raise_open_file_limit() -> None:
    """Two descriptors per identity (socket and WebSocket) exceed the default 1,024 from a few hundred on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- soak ----------------------------------------------------------------------------------------------------------

SOAK_SAMPLE_INTERVAL = 10.0
SOAK_ROUND_SECONDS = 30.0
SOAK_RELAY_FLAP_EVERY = 120.0
SOAK_RELAY_DOWN_SECONDS = 10.0
SOAK_GATEWAY_REJOIN_TIMEOUT = 60.0  # s; the gateway's reconnect backoff starts at 0.5 s (docs/protocol.md §1.7)


@dataclass(frozen=True)
class SoakSample:
    seconds: float
    """Since the start of the run."""
    rss_bytes: int
    open_descriptors: int
    connections: float
    drops: float
    event: str = ""
    """What the run did since the previous sample (round, relay flap, portal restart)."""


def process_sample(pid: int) -> tuple[int, int]:
    """(resident set size in bytes, open descriptors) of a process; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss_kib = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return 0, 0
    return rss_kib * 1024, descriptors


def prometheus_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples in ``text`` whose labels include ``labels`` (0 when absent); a
    counter's samples are found under its name with or without the ``_total`` suffix."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name in (name, f"{name}_total") and all(
            f'{key}="{wanted}"' in label_text for key, wanted in labels.items()
        ):
            with contextlib.suppress(ValueError):
                total += float(value)
    return total


async def soak(minutes: float, clients: int, rate: float, samples_path: str | None) -> list[SoakSample]:
    """The soak run (``make soak``): a lab world with the real gateway and two relays; back-to-back rounds of
    ``clients`` load identities (new keys every round: churn) pinging at ``rate``; relay 2 flaps every two minutes
    (killed and announced gone, back 10 s later); one portal restart halfway (every socket closed, listening again
    2 s later: the gateway and the identities rejoin; the next round waits for the gateway's rejoin, whose time the
    restart's note reports). The gateway's RSS, descriptors, connections and drops are sampled every 10 s, printed,
    and written as JSON lines to ``samples_path``."""
    from lab.world import LabWorld  # only the soak drives a whole world; the identity runner does not need it

    duration = minutes * 60
    samples: list[SoakSample] = []
    notes: list[str] = []
    rounds: list[dict[str, Any]] = []
    async with LabWorld(
        gateway_nat="masquerade", client_nat="masquerade", relays=2, load_clients=clients, blob_size=4096
    ) as world:
        await world.wait_gateway_joined(timeout=30)
        started = time.monotonic()
        gateway_pid = world.need_gateway().pid

        def elapsed() -> float:
            return time.monotonic() - started

        # Set while the gateway is joined to the portal. A round asks the portal for flows through the gateway, so
        # after the portal restart the next round waits for the gateway to rejoin (as an operator would before
        # sending users its way): started earlier, every identity would be refused `offline` by design, which says
        # nothing about the gateway. The gateway's rejoin time is reported in the restart's note instead.
        gateway_present = asyncio.Event()
        gateway_present.set()

        async def churn() -> None:
            while (left := duration - elapsed()) > 5:
                await gateway_present.wait()
                if (left := duration - elapsed()) <= 5:
                    break
                summary = await world.run_loadgen(
                    clients, rate=rate, duration=min(SOAK_ROUND_SECONDS, max(1.0, left - 5)), setup_timeout=60
                )
                rounds.append(summary)
                notes.append(
                    f"round: {summary.get('connected')}/{summary.get('clients')} connected, "
                    f"{summary.get('pings_answered')}/{summary.get('pings_sent')} pings"
                    + (f", {summary['portal_retries']} portal retries" if summary.get("portal_retries") else "")
                    + (
                        f", failures {summary.get('failures') or summary.get('error')}"
                        if summary.get("connected") != clients
                        else ""
                    )
                )

        async def faults() -> None:
            portal_restarted = False
            next_flap = SOAK_RELAY_FLAP_EVERY
            while elapsed() < duration:
                if not portal_restarted and elapsed() >= duration / 2:
                    portal_restarted = True
                    gateway_present.clear()
                    since = world.need_portal().next_seq
                    restarted_at = time.monotonic()
                    try:
                        await world.restart_portal(downtime=2.0)
                        await world.wait_gateway_joined(timeout=SOAK_GATEWAY_REJOIN_TIMEOUT, since=since)
                        notes.append(f"portal restart (gateway rejoined in {time.monotonic() - restarted_at:.1f} s)")
                    except TimeoutError:
                        # A finding, not an expected refusal: the rounds go on and their `offline` failures show it.
                        notes.append(f"portal restart (gateway not back after {SOAK_GATEWAY_REJOIN_TIMEOUT:.0f} s)")
                    finally:
                        gateway_present.set()
                elif elapsed() >= next_flap and duration - elapsed() > SOAK_RELAY_DOWN_SECONDS + 10:
                    next_flap += SOAK_RELAY_FLAP_EVERY
                    await world.kill_relay(1)
                    await asyncio.sleep(SOAK_RELAY_DOWN_SECONDS)
                    await world.start_relay(1)
                    notes.append("relay 2 flapped")
                await asyncio.sleep(1.0)

        async def sampler() -> None:
            while True:
                rss, descriptors = process_sample(gateway_pid)
                metrics = await world.gateway_metrics()
                sample = SoakSample(
                    seconds=round(elapsed(), 1),
                    rss_bytes=rss,
                    open_descriptors=descriptors,
                    connections=prometheus_sum(metrics, "firezone_connections"),
                    drops=prometheus_sum(metrics, "firezone_dataplane_drops"),
                    event="; ".join(notes),
                )
                notes.clear()
                samples.append(sample)
                print(json.dumps(sample.__dict__), flush=True)
                if elapsed() >= duration:
                    return
                await asyncio.sleep(SOAK_SAMPLE_INTERVAL - (elapsed() % SOAK_SAMPLE_INTERVAL))

        await asyncio.gather(churn(), faults(), sampler())
        problems = world.gateway_problems(allowed=("portal link down",))
        drops = [
            line for line in (await world.gateway_metrics()).splitlines() if line.startswith("firezone_dataplane_drops")
        ]
    if samples_path is not None:
        with open(samples_path, "w") as out:
            for sample in samples:
                out.write(json.dumps(sample.__dict__) + "\n")
    connected = sum(int(r.get("connected") or 0) for r in rounds)
    offered = sum(int(r.get("clients") or 0) for r in rounds)
    print(
        json.dumps(
            {
                "soak_minutes": minutes,
                "rounds": len(rounds),
                "connected": f"{connected}/{offered}",
                "rss_mib": [round(s.rss_bytes / 2**20, 1) for s in samples],
                "open_descriptors": [s.open_descriptors for s in samples],
                "drops_by_reason": drops,
                "gateway_warnings": problems[:20],
            }
        ),
        flush=True,
    )
    return samples


# -- the soak's plot: a PNG written with zlib alone (no plotting library in the lab) ---------------------------------

_GLYPHS = {
    "0": "01110100011001110101110011000101110",
    "1": "00100011000010000100001000010001110",
    "2": "01110100010000100010001000100011111",
    "3": "11111000100010000010000011000101110",
    "4": "00010001100101010010111110001000010",
    "5": "11111100001111000001000011000101110",
    "6": "00110010001000011110100011000101110",
    "7": "11111000010001000100010000100001000",
    "8": "01110100011000101110100011000101110",
    "9": "01110100011000101111000010001001100",
    ".": "00000000000000000000000000110001100",
    " ": "0" * 35,
    "-": "00000000000000011111000000000000000",
    "A": "01110100011000111111100011000110001",
    "B": "11110100011000111110100011000111110",
    "C": "01110100011000010000100001000101110",
    "D": "11110100011000110001100011000111110",
    "E": "11111100001000011110100001000011111",
    "F": "11111100001000011110100001000010000",
    "I": "01110001000010000100001000010001110",
    "K": "10001100101010011000101001001010001",
    "L": "10000100001000010000100001000011111",
    "M": "10001110111010110101100011000110001",
    "N": "10001110011010110011100011000110001",
    "O": "01110100011000110001100011000101110",
    "P": "11110100011000111110100001000010000",
    "R": "11110100011000111110101001001010001",
    "S": "01111100001000001110000010000111110",
    "T": "11111001000010000100001000010000100",
    "U": "10001100011000110001100011000101110",
    "W": "10001100011000110101101011101110001",
    "Y": "10001100010101000100001000010000100",
    "G": "01110100011000010111100011000101111",
    "H": "10001100011000111111100011000110001",
    "V": "10001100011000110001100010101000100",
}
_Colour = tuple[int, int, int]


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, colour: _Colour, size: int = 1) -> None:
        for dy in range(size):
            for dx in range(size):
                px, py = x + dx, y + dy
                if 0 <= px < self.width and 0 <= py < self.height:
                    offset = (py * self.width + px) * 3
                    self.pixels[offset : offset + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: _Colour, size: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for step in range(steps + 1):
            self.dot(x0 + (x1 - x0) * step // steps, y0 + (y1 - y0) * step // steps, colour, size)

    def text(self, x: int, y: int, text: str, colour: _Colour = (0, 0, 0), scale: int = 2) -> None:
        for index, char in enumerate(text.upper()):
            glyph = _GLYPHS.get(char, _GLYPHS[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    self.dot(x + index * 6 * scale + (bit % 5) * scale, y + (bit // 5) * scale, colour, scale)

    def png(self) -> bytes:
        raw = b"".join(
            b"\0" + bytes(self.pixels[row * self.width * 3 : (row + 1) * self.width * 3]) for row in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

        header = struct.pack("!IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


def _figure(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.1f}"


def plot_samples(samples: Sequence[SoakSample], path: str) -> None:
    """Four panels over time (RSS in MiB, open descriptors, connections, drops); red marks the portal restart,
    orange the relay flaps."""
    panels: list[tuple[str, list[float]]] = [
        ("RSS MIB", [s.rss_bytes / 2**20 for s in samples]),
        ("OPEN FDS", [float(s.open_descriptors) for s in samples]),
        ("CONNECTIONS", [s.connections for s in samples]),
        ("DROPS", [s.drops for s in samples]),
    ]
    width, panel_height, left, right, top = 900, 170, 90, 20, 30
    canvas = _Canvas(width, top + panel_height * len(panels) + 30)
    end = max((s.seconds for s in samples), default=1.0) or 1.0
    plot_width = width - left - right

    def x_of(seconds: float) -> int:
        return left + round(seconds / end * plot_width)

    for index, (title, values) in enumerate(panels):
        y_top = top + index * panel_height
        y_bottom = y_top + panel_height - 40
        low, high = min(values, default=0.0), max(values, default=1.0)
        if high - low < 1e-9:
            low, high = low - 1, high + 1
        for edge in (y_top, y_bottom):
            canvas.line(left, edge, width - right, edge, (170, 170, 170))
        canvas.line(left, y_top, left, y_bottom, (170, 170, 170))
        for sample in samples:
            if "portal restart" in sample.event:
                canvas.line(x_of(sample.seconds), y_top, x_of(sample.seconds), y_bottom, (220, 40, 40), 2)
            elif "relay" in sample.event:
                canvas.line(x_of(sample.seconds), y_top, x_of(sample.seconds), y_bottom, (240, 160, 30), 2)
        points = [
            (x_of(s.seconds), y_bottom - round((v - low) / (high - low) * (y_bottom - y_top)))
            for s, v in zip(samples, values, strict=True)
        ]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            canvas.line(x0, y0, x1, y1, (30, 90, 200), 2)
        canvas.text(left + 6, y_top - 18, title)
        canvas.text(4, y_top, _figure(high), (90, 90, 90))
        canvas.text(4, y_bottom - 14, _figure(low), (90, 90, 90))
    canvas.text(left, canvas.height - 24, "0 S", (90, 90, 90))
    canvas.text(width - right - 90, canvas.height - 24, f"{end:.0f} S", (90, 90, 90))
    with open(path, "wb") as out:
        out.write(canvas.png())


def read_samples(path: str) -> list[SoakSample]:
    with open(path) as lines:
        return [SoakSample(**json.loads(line)) for line in lines if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--portal", required=True, help="the portal's base URL, e.g. ws://172.31.0.1:8443")
    parser.add_argument("--token-prefix", required=True, help="identity i uses the token PREFIX + i")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--resource", required=True, help="the resource id every identity asks for")
    parser.add_argument("--target", required=True, help="IPv4 address behind the gateway to ping")
    parser.add_argument("--rate", type=float, default=1.0, help="pings per second per identity")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of pinging once all have settled")
    parser.add_argument("--setup-timeout", type=float, default=60.0, help="seconds to wait for every identity")
    parser.add_argument("--bind", default=None, help="local IP for the UDP sockets (default: towards the portal)")
    parser.add_argument("--first", type=int, default=0, help="index of the first identity (token PREFIX + index)")
    parser.add_argument("--spread", type=float, default=0.0, help="seconds between two identities' starts")
    parser.add_argument("--start-at", type=float, default=None, help="unix time to start the identities at")
    parser.add_argument(
        "--flow-demand",
        type=demand_offsets,
        default=(0.0,),
        help="seconds after the first create_flow when the identity wants the resource again, comma-separated; "
        "Firezone's client asks again for a want at least 2 s after its last ask (default 0: ask once)",
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


def demand_offsets(text: str) -> tuple[float, ...]:
    """``0,1,3,7,15`` → the offsets, sorted; 0 is always in (the first ask)."""
    try:
        offsets = {float(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of seconds: {text!r}") from None
    if any(not 0 <= offset <= 300 for offset in offsets):
        raise argparse.ArgumentTypeError("offsets must be within 0..300 s")
    return tuple(sorted(offsets | {0.0}))


def build_soak_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.loadgen soak", description=soak.__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=50, help="load identities per round")
    parser.add_argument("--rate", type=float, default=2.0, help="pings per second per identity")
    parser.add_argument("--samples", default=None, help="write the samples here as JSON lines")
    parser.add_argument("--plot", default=None, help="draw the samples into this PNG")
    parser.add_argument("--log-level", default="WARNING")
    return parser


async def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["plot"] and len(arguments) == 3:
        plot_samples(read_samples(arguments[1]), arguments[2])
        return 0
    if arguments[:1] == ["soak"]:
        soak_args = build_soak_parser().parse_args(arguments[1:])
        logging.basicConfig(level=soak_args.log_level, stream=sys.stderr)
        samples = await soak(soak_args.minutes, soak_args.clients, soak_args.rate, soak_args.samples)
        if soak_args.plot is not None:
            plot_samples(samples, soak_args.plot)
        return 0
    args = build_parser().parse_args(arguments)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    if args.clients < 1 or args.rate <= 0:
        raise SystemExit("--clients must be ≥ 1 and --rate > 0")
    summary = await LoadGenerator(args).run()
    print(json.dumps(summary.to_json()), flush=True)
    return 0 if summary.connected == summary.clients else 1


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
