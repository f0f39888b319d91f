"""The lab's headless Firezone client, and a bare Node driver for the NAT traversal test.

**Portal mode** (``--portal``), a headless client as docs/protocol.md §2.3 describes it from the client's side: it
generates its WireGuard key, joins the portal's ``client`` channel (``/client/websocket``, Phoenix V1), takes its tunnel
addresses from ``init``, creates its TUN (MTU 1280, /32 + /128), asks for each resource with ``create_flow`` and, on
``flow_created``, opens a Node connection to the gateway (ICE controlling, WireGuard initiator; connection id = gateway
id), trickles candidates through the portal and routes the resource's prefix and the gateway's tunnel addresses into
the TUN. TUN packets go to the gateway whose routed prefix matches best; decrypted packets go to the TUN, except
p2p-control messages (a ``goodbye`` closes that connection, §3.4).

    python -m lab.client --portal ws://172.31.0.254:8081 --token TOKEN --resource RESOURCE_ID --tun tun-firezone

* stdin: ``{"request": "<resource id>"}``, ``{"resolve": "<domain>", "resource": "<DNS resource id>"}`` (as if an
  application looked the name up: proxy IPs are assigned and announced, §3.4), ``{"quit": true}`` (also EOF)
* stdout: ``joined`` {ipv4, ipv6, public_key, local, resources}, ``flow_created`` {resource_id, gateway_id,
  gateway_ipv4, flow_seconds}, ``flow_creation_failed`` {resource_id, reason}, ``established`` {gateway_id, path,
  local, remote, setup_seconds: flow_created → established}, ``flow_retry`` {resource_id, reason: unanswered,
  attempt} (no answer yet: asked again, as Firezone's client does, at 3, 7 and 15 s; without any answer 20 s after
  the last ask the request ends with ``flow_creation_failed`` reason ``unanswered``), ``path_changed``, ``failed``
  {gateway_id?, reason}, ``closed`` {gateway_id, reason: goodbye|closed}, ``no_relays`` (also told to the portal, which
  answers with relays), ``domain_status`` {resource_id, domain,
  status: Active|Inactive, proxy_ips}, ``portal_lost`` {reason, retry_seconds} (one per failed session or attempt),
  ``portal_rejoined`` {down_seconds} (the next ``init``), ``error`` (a bad command).

A lost portal is reconnected with the gateway's backoff (docs/protocol.md §1.7) while connections, routes and traffic
go on; after the rejoin only requests that went unanswered are sent again. Exit status 1 when the portal refuses the
token or the join, or stays unreachable (15 s at start, a day once joined), else 0.

**Stdio mode** (``--role``): one Node connection whose keys and credentials are given on the command line and whose
candidates the caller carries (tests/integration/test_nat_traversal.py plays the portal):

It plays either side of a connection: ``--role client`` (ICE controlling, WireGuard initiator, what the lab's headless
client does) or ``--role gateway``. The portal's part, carrying candidates between the two, is done by whoever
starts it (the netns test, later the lab demo) through JSON lines:

* stdin: ``{"candidate": "<sdp>"}``, ``{"invalidate": "<sdp>"}``, ``{"quit": true}``
* stdout: ``{"event": "ready"}`` (relays measured, connection created), ``{"event": "candidate", "sdp": ...}``,
  ``{"event": "invalidated", "sdp": ...}``, ``{"event": "established", "path": ..., "local": ..., "remote": ...,
  "setup_seconds": <first ICE check → established>}``, ``{"event": "path_changed", ...}``, ``{"event": "failed", ...}``,
  ``{"event": "no_relays"}``.

Every IP packet read from the TUN goes to the one connection; every decrypted packet is written to the TUN.

    python -m lab.client --role client --id gw --private-key HEX --peer-public-key HEX --psk HEX \\
        --local-ice ufrag:pwd --remote-ice ufrag:pwd --relay relay-1,192.0.2.254:3478,USER,PASS \\
        --bind 10.2.0.2 --tun tun-fz --tun-address 100.64.0.2/32 --tun-route 100.64.0.1/32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backoff import Backoff, initial_connect_policy, reconnect_policy
from dataplane import p2p_control, stun
from dataplane.base import Address, DropCounter, Transmit
from dataplane.io.rng import SystemRng
from dataplane.io.tun import Tun
from dataplane.io.udp import UdpSocket
from dataplane.node import (
    CandidateGathered,
    CandidateInvalidated,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    ConnectionPathChanged,
    IceCredentials,
    Node,
    NodeRole,
    NoRelays,
    RelayConfig,
)
from dataplane.wireguard.allowedips import AllowedIps
from lab.portal_channel import (
    CandidateAnnouncements,
    FlowRequestDue,
    FlowRequests,
    FlowRequestTimer,
    NodeTimer,
    PortalChannelDriver,
    SessionEnd,
    client_socket_url,
)
from protocol.phoenix import ChannelEvent, ChannelFailed, ChannelJoined, PushReceived

log = logging.getLogger("lab.client")
wire = logging.getLogger("lab.client.wire")  # one line per datagram: enable only to debug
CHANNEL_DATA_HEADER = 4


def _is_ice_check(payload: bytes) -> bool:
    """A connectivity check: a BINDING request with USERNAME (relay BINDINGs carry none), maybe inside ChannelData."""
    if payload and 0x40 <= payload[0] <= 0x7F:
        payload = payload[CHANNEL_DATA_HEADER:]
    if not stun.is_stun(payload):
        return False
    try:
        message = stun.decode(payload)
    except stun.StunParseError:
        return False
    return message.method == stun.Method.BINDING and message.is_request and message.username() is not None


def parse_relay(text: str) -> RelayConfig:
    relay_id, address, username, password = text.split(",", 3)
    host, _, port = address.rpartition(":")
    return RelayConfig(relay_id, ((host.strip("[]"), int(port)),), username, password)


def parse_credentials(text: str) -> IceCredentials:
    username, _, password = text.partition(":")
    return IceCredentials(username, password)


class NodeDriver:
    """The event loop around one Node: UDP in/out, TUN in/out, one timer, stdio signalling."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.role = NodeRole(args.role)
        self.node = Node(self.role, bytes.fromhex(args.private_key), rng=SystemRng(), wall_clock=time.time)
        self.socket = UdpSocket.bind(args.bind, args.port, gso=False, gro=False, increase_buffers=False)
        self.local: Address = self.socket.local_address
        self.tun = Tun.create(args.tun, offload=False)
        self.loop = asyncio.get_running_loop()
        self.timer = NodeTimer(self.loop, self.node, self.flush)
        self.done = asyncio.Event()
        self.connection_id: str = args.id
        self.first_check_at: float | None = None
        self.created = False
        # Candidates the peer sent before our connection existed (we wait for a measured relay first).
        self.early_candidates: list[str] = []
        self.stdin_buffer = b""

    def emit(self, **fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def configure_tun(self) -> None:
        name = self.args.tun
        subprocess.run(["ip", "addr", "add", self.args.tun_address, "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "mtu", "1280", "up"], check=True)
        for route in self.args.tun_route:
            subprocess.run(["ip", "route", "replace", route, "dev", name], check=True)

    async def run(self) -> None:
        self.configure_tun()
        self.loop.add_reader(self.socket.fileno(), self.on_udp)
        self.loop.add_reader(self.tun.wakeup_fd, self.on_tun)
        self.loop.add_reader(sys.stdin.fileno(), self.on_stdin)
        relays = [parse_relay(text) for text in self.args.relay]
        self.node.update_relays([], relays, self.now())
        self.flush()
        try:
            await self.done.wait()
        finally:
            log.info(
                "drops: node %s tun %s udp %s",
                dict(self.node.drops.counts),
                dict(self.tun.drops.counts),
                dict(self.socket.drops.counts),
            )
            for fd in (self.socket.fileno(), self.tun.wakeup_fd, sys.stdin.fileno()):
                self.loop.remove_reader(fd)
            self.timer.cancel()
            self.tun.close()
            self.socket.close()

    def now(self) -> float:
        return self.loop.time()

    def maybe_create_connection(self) -> None:
        if self.created or not any(self.node.relay_rtt(r) is not None for r in self.node.relay_ids):
            return
        self.created = True
        ok = self.node.upsert_connection(
            self.connection_id,
            remote_public_key=bytes.fromhex(self.args.peer_public_key),
            preshared_key=bytes.fromhex(self.args.psk),
            local_credentials=parse_credentials(self.args.local_ice),
            remote_credentials=parse_credentials(self.args.remote_ice),
            now=self.now(),
        )
        self.emit(event="ready", ok=ok, local=list(self.local))
        for sdp in self.early_candidates:
            self.node.add_remote_candidate(self.connection_id, sdp, self.now())
        self.early_candidates.clear()

    # -- inputs ---------------------------------------------------------------------------------------------------

    def on_udp(self) -> None:
        now = self.now()
        packets: list[bytes] = []
        for data, src in self.socket.recv_many():
            if wire.isEnabledFor(logging.DEBUG):
                wire.debug("%.3f recv %s <- %s %s", now, self.local, src, data[:4].hex())
            result = self.node.handle_input(data, src, self.local, now)
            if result is not None:
                packets.append(result[1])
        if packets:
            self.tun.send_many(packets)
        self.flush()

    def on_tun(self) -> None:
        now = self.now()
        for packet in self.tun.poll_recv_many():
            if wire.isEnabledFor(logging.DEBUG):
                wire.debug("%.3f tun read %d bytes %s", now, len(packet), packet[:20].hex())
            self.node.encapsulate(self.connection_id, packet, now)
        self.flush()

    def on_stdin(self) -> None:
        # Raw reads: a buffered readline() would keep further lines in its buffer where the selector cannot see them.
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            self.done.set()
            return
        self.stdin_buffer += chunk
        now = self.now()
        while b"\n" in self.stdin_buffer:
            line, self.stdin_buffer = self.stdin_buffer.split(b"\n", 1)
            if line.strip():
                self.on_message(json.loads(line), now)
        self.flush()

    def on_message(self, message: dict[str, object], now: float) -> None:
        candidate, invalidated = message.get("candidate"), message.get("invalidate")
        if isinstance(candidate, str):
            if self.created:
                self.node.add_remote_candidate(self.connection_id, candidate, now)
            else:
                self.early_candidates.append(candidate)
        elif isinstance(invalidated, str):
            if invalidated in self.early_candidates:
                self.early_candidates.remove(invalidated)
            self.node.remove_remote_candidate(self.connection_id, invalidated, now)
        elif message.get("quit"):
            self.done.set()

    # -- outputs --------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        transmits: list[Transmit] = []
        while (transmit := self.node.poll_transmit()) is not None:
            if self.first_check_at is None and _is_ice_check(transmit.payload):
                self.first_check_at = self.now()
            transmits.append(transmit)
            if wire.isEnabledFor(logging.DEBUG):
                wire.debug("%.3f send %s -> %s %s", self.now(), transmit.src, transmit.dst, transmit.payload[:4].hex())
        if transmits:
            self.socket.send_many(transmits)
        while (event := self.node.poll_event()) is not None:
            self.on_event(event)
        self.maybe_create_connection()
        self.timer.arm()

    def on_event(self, event: object) -> None:
        if isinstance(event, CandidateGathered):
            self.emit(event="candidate", sdp=event.candidate.to_sdp())
        elif isinstance(event, CandidateInvalidated):
            self.emit(event="invalidated", sdp=event.candidate.to_sdp())
        elif isinstance(event, ConnectionEstablished):
            setup = None if self.first_check_at is None else self.now() - self.first_check_at
            self.emit(
                event="established",
                path=event.path.value,
                local=list(event.local),
                remote=list(event.remote),
                setup_seconds=setup,
            )
        elif isinstance(event, ConnectionPathChanged):
            self.emit(event="path_changed", path=event.path.value, local=list(event.local), remote=list(event.remote))
        elif isinstance(event, ConnectionFailed):
            self.emit(event="failed", reason=event.reason)
        elif isinstance(event, ConnectionClosed):
            self.emit(event="closed")
        elif isinstance(event, NoRelays):
            self.emit(event="no_relays")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=[r.value for r in NodeRole], default=NodeRole.CLIENT.value)
    parser.add_argument("--id", required=True, help="connection id: the peer's portal id")
    parser.add_argument("--private-key", required=True, help="our WireGuard private key, hex")
    parser.add_argument("--peer-public-key", required=True, help="hex")
    parser.add_argument("--psk", required=True, help="preshared key, hex")
    parser.add_argument("--local-ice", required=True, help="ufrag:pwd")
    parser.add_argument("--remote-ice", required=True, help="ufrag:pwd")
    parser.add_argument("--relay", action="append", default=[], help="id,host:port,username,password (repeatable)")
    parser.add_argument("--bind", required=True, help="local IP for the UDP socket (its address is the host candidate)")
    parser.add_argument("--port", type=int, default=52625)
    parser.add_argument("--tun", required=True)
    parser.add_argument("--tun-address", required=True, help="e.g. 100.64.0.2/32")
    parser.add_argument("--tun-route", action="append", default=[], help="prefixes routed into the TUN")
    parser.add_argument("--log-level", default="WARNING")
    return parser


# -- headless Firezone client (portal mode) ------------------------------------------------------------------------

TUN_MTU = 1280  # docs/protocol.md §4.1
TUN_BATCH = 128  # packets per TUN wake-up, as the gateway takes them
MAX_EARLY_CANDIDATES = 64
"""Per gateway: candidates that arrive before ``flow_created`` (the gateway announces before it confirms, §2.3)."""
MAX_EARLY_GATEWAYS = 16
PORTAL_OPEN_TIMEOUT = 10.0


ASSIGNED_IPS_RETRANSMIT = 2.0  # docs/protocol.md §3.4: until a domain_status arrives
_PROXY_V4_BASE = int(ipaddress.IPv4Address("100.96.0.0"))
_PROXY_V6_BASE = int(ipaddress.IPv6Address("fd00:2021:1111:8000::"))
MAX_DNS_ASSIGNMENTS = 4096  # domains; each takes 4 IPv4 + 4 IPv6 of the 2**21 proxy addresses per family


@dataclass
class _DnsAssignment:
    """Proxy IPs the client handed out for one (resource, domain), as a real client does on a DNS query."""

    resource_id: str
    domain: str
    proxy_ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    status: str | None = None  # the gateway's last domain_status
    retransmit: asyncio.TimerHandle | None = None


class ClientDropReason(enum.Enum):
    NO_ROUTE = "no_route"  # a TUN packet to an address no granted resource covers
    NOT_IP = "not_ip"
    CONTROL_MESSAGE = "control_message"  # a p2p-control message other than goodbye (not for the TUN either way)
    EARLY_CANDIDATES_FULL = "early_candidates_full"
    BAD_PUSH = "bad_push"  # a portal push whose payload has the wrong shape


def parse_address(text: str) -> Address | None:
    """``1.2.3.4:3478`` or ``[2001:db8::1]:3478`` → (ip, port); None when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 0xFFFF:
        return None
    host = host.removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None


def parse_portal_relays(entries: object, *, ipv6: bool) -> list[RelayConfig]:
    """The portal's relay objects (``init``/``flow_created``/``relays_presence``), one per address and family, merged
    per id into :class:`RelayConfig`; STUN-only entries and addresses of the other family are skipped."""
    merged: dict[str, RelayConfig] = {}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("type", "turn") != "turn":
            continue
        relay_id, username, password = entry.get("id"), entry.get("username"), entry.get("password")
        address = parse_address(entry["addr"]) if isinstance(entry.get("addr"), str) else None
        if not (isinstance(relay_id, str) and isinstance(username, str) and isinstance(password, str) and address):
            continue
        if (":" in address[0]) != ipv6:
            continue
        known = merged.get(relay_id)
        addresses = (known.addresses if known else ()) + (address,)
        merged[relay_id] = RelayConfig(relay_id, addresses, username, password)
    return list(merged.values())


@dataclass(frozen=True, slots=True)
class FlowGrant:
    """A parsed ``flow_created``: everything the client needs to connect to the gateway."""

    resource_id: str
    gateway_id: str
    gateway_public_key: bytes
    gateway_ipv4: ipaddress.IPv4Address
    gateway_ipv6: ipaddress.IPv6Address
    preshared_key: bytes
    client_credentials: IceCredentials
    gateway_credentials: IceCredentials
    relays: object

    @classmethod
    def parse(cls, payload: object) -> FlowGrant | None:
        """None when a field is missing or malformed (the push is then dropped)."""
        if not isinstance(payload, dict):
            return None
        try:
            client_creds, gateway_creds = payload["client_ice_credentials"], payload["gateway_ice_credentials"]
            key = base64.b64decode(payload["gateway_public_key"], validate=True)
            psk = base64.b64decode(payload["preshared_key"], validate=True)
            grant = cls(
                resource_id=str(payload["resource_id"]),
                gateway_id=str(payload["gateway_id"]),
                gateway_public_key=key,
                gateway_ipv4=ipaddress.IPv4Address(payload["gateway_ipv4"]),
                gateway_ipv6=ipaddress.IPv6Address(payload["gateway_ipv6"]),
                preshared_key=psk,
                client_credentials=IceCredentials(str(client_creds["username"]), str(client_creds["password"])),
                gateway_credentials=IceCredentials(str(gateway_creds["username"]), str(gateway_creds["password"])),
                relays=payload.get("relays", []),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return grant if len(key) == 32 and len(psk) == 32 else None


def resource_network(resource: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The prefix a CIDR resource covers (DNS and Internet resources are not routed by this client)."""
    if not isinstance(resource, dict) or resource.get("type") != "cidr" or not isinstance(resource.get("address"), str):
        return None
    try:
        return ipaddress.ip_network(resource["address"], strict=False)
    except ValueError:
        return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ResourceRoutes:
    """Which gateway each destination goes to: longest-prefix match over the granted prefixes."""

    def __init__(self) -> None:
        self._table: AllowedIps[str] = AllowedIps()
        self._prefixes: dict[Network, str] = {}

    def add(self, network: Network, gateway_id: str) -> None:
        self._table.insert(network, gateway_id)
        self._prefixes[network] = gateway_id

    def remove_gateway(self, gateway_id: str) -> list[Network]:
        """Forgets every prefix of this gateway; returns them (for the kernel routes)."""
        gone = [n for n, g in self._prefixes.items() if g == gateway_id]
        for network in gone:
            self._table.remove(network)
            del self._prefixes[network]
        return gone

    def prefixes(self, gateway_id: str) -> list[Network]:
        return [n for n, g in self._prefixes.items() if g == gateway_id]

    def lookup(self, packet: bytes) -> str | None:
        """The gateway for an IP packet's destination; None for no match or a packet that is not IPv4/IPv6."""
        if len(packet) >= 20 and packet[0] >> 4 == 4:
            return self._table.lookup(packet[16:20])
        if len(packet) >= 40 and packet[0] >> 4 == 6:
            return self._table.lookup(packet[24:40])
        return None


@dataclass
class _Flow:
    grant: FlowGrant
    resources: set[str]
    granted_at: float
    connected: bool = False  # a Node connection exists (created once a relay has a measured RTT)
    established: bool = False


class HeadlessClient:
    """A Firezone client without a UI: portal channel ``client``, one Node (controlling, initiator), a TUN, routes.

    Progress goes to stdout as JSON lines, commands come from stdin (see the module docstring).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        private_key = X25519PrivateKey.generate().private_bytes_raw()
        self.node = Node(NodeRole.CLIENT, private_key, rng=SystemRng(), wall_clock=time.time)
        self.public_key_b64 = base64.b64encode(self.node.public_key).decode()
        self.portal = PortalChannelDriver(
            self.loop,
            url=client_socket_url(args.portal, self.public_key_b64),
            token=args.token,
            on_event=self.on_portal_event,
            after_input=self.flush,
            open_timeout=PORTAL_OPEN_TIMEOUT,
        )
        self.portal_backoff = Backoff(initial_connect_policy(), SystemRng())
        self.portal_lost_at: float | None = None  # when the portal went away; None while joined
        self.drops = DropCounter()
        self.routes = ResourceRoutes()
        self.resources: dict[str, object] = {}
        self.flows: dict[str, _Flow] = {}  # by gateway id
        self.flow_requests = FlowRequests()  # create_flow sent, no answer yet
        self.flow_request_timer = FlowRequestTimer(self.loop, self.flow_requests, self.on_flow_requests_due)
        self.queued_requests: list[str] = list(args.resource)
        self.early_candidates: dict[str, list[str]] = {}
        self.replaced: set[str] = set()  # gateways whose connection we closed to replace it: no "closed" report
        self.socket: UdpSocket | None = None
        self.local: Address = ("0.0.0.0", 0)
        self.tun: Tun | None = None
        self.initialised = False
        self.timer = NodeTimer(self.loop, self.node, self.flush)
        self.done = asyncio.Event()
        self.exit_code = 0
        self.stdin_buffer = b""
        self.stdin_fd: int | None = None
        self.dns_assignments: dict[tuple[str, str], _DnsAssignment] = {}

    def now(self) -> float:
        return self.loop.time()

    def emit(self, event: str, **fields: object) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    def stop(self, exit_code: int) -> None:
        self.exit_code = self.exit_code or exit_code
        self.done.set()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            self.loop.add_reader(sys.stdin.fileno(), self.on_stdin)
            self.stdin_fd = sys.stdin.fileno()
        except PermissionError:  # a regular file or /dev/null cannot be polled: no commands, run until killed
            log.info("stdin cannot be polled; commands are off")
        portal = self.loop.create_task(self.run_portal())
        try:
            await self.done.wait()
        finally:
            self.say_goodbye()
            portal.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await portal
            self.close()
        return self.exit_code

    def close(self) -> None:
        if self.stdin_fd is not None:
            self.loop.remove_reader(self.stdin_fd)
        self.timer.cancel()
        self.portal.cancel_timer()
        self.flow_request_timer.cancel()
        for assignment in self.dns_assignments.values():
            if assignment.retransmit is not None:
                assignment.retransmit.cancel()
        if self.socket is not None:
            self.loop.remove_reader(self.socket.fileno())
            log.info(
                "drops: node %s udp %s client %s", self.node.drops.counts, self.socket.drops.counts, self.drops.counts
            )
            self.socket.close()
        if self.tun is not None:
            self.loop.remove_reader(self.tun.wakeup_fd)
            self.tun.close()

    def say_goodbye(self) -> None:
        """Tells every connected gateway we are leaving (docs/protocol.md §3.4 ``goodbye``)."""
        if self.socket is None:
            return
        now = self.now()
        for gateway_id, flow in self.flows.items():
            if flow.established:
                self.node.encapsulate(gateway_id, p2p_control.goodbye(), now)
        self.send_transmits()

    # -- the portal -----------------------------------------------------------------------------------------------

    async def run_portal(self) -> None:
        """Holds the portal link until stopped, reconnecting with the gateway's backoff (docs/protocol.md §1.7):
        1 s apart for 15 s at start, then, once joined, 0.5 s growing 1.5x (jittered) for up to a day. Tunnels,
        routes and traffic go on meanwhile; only a refused token or join (or a spent budget) ends the client."""
        while not self.done.is_set():
            ended = await self.portal.session()
            if self.done.is_set():
                return
            self.on_portal_lost(ended)
            delay = None if ended.fatal else self.portal_backoff.next_delay(ended.retry_after)
            if delay is None:
                self.emit("failed", reason=f"portal: {ended}")
                self.stop(1)
                return
            self.emit("portal_lost", reason=str(ended), retry_seconds=round(delay, 3))
            await asyncio.sleep(delay)

    def on_portal_lost(self, ended: SessionEnd) -> None:
        """The portal's socket is gone: what was asked and not answered is asked again after the next ``init`` (the
        portal forgets a flow whose client left before it was created)."""
        if self.portal_lost_at is None and self.initialised:
            self.portal_lost_at = self.now()
            log.info("portal lost: %s", ended)
        unanswered = [r for r in self.flow_requests.resource_ids() if r not in self.queued_requests]
        self.queued_requests.extend(unanswered)
        for resource_id in unanswered:
            self.flow_requests.forget(resource_id)
        self.flow_request_timer.arm()

    def on_portal_event(self, event: ChannelEvent) -> None:
        if isinstance(event, PushReceived):
            self.on_push(event.event, event.payload)
        elif isinstance(event, ChannelJoined):
            log.info("joined the portal's client channel")
            # As the gateway: a link that has joined once is retried with the reconnect policy from its start.
            self.portal_backoff = Backoff(reconnect_policy(), SystemRng())
        elif isinstance(event, ChannelFailed):
            log.warning("portal channel failed: %s", event.detail)

    def on_push(self, event: str, payload: object) -> None:
        body = payload if isinstance(payload, dict) else {}
        if event == "init":
            self.on_init(body)
        elif event == "flow_created":
            self.on_flow_created(payload)
        elif event == "flow_creation_failed":
            self.on_flow_creation_failed(body)
        elif event in ("ice_candidates", "invalidate_ice_candidates"):
            self.on_candidates(event == "ice_candidates", body)
        elif event == "relays_presence":
            removed = [r for r in body.get("disconnected_ids", []) if isinstance(r, str)]
            self.node.update_relays(removed, self.parse_relays(body.get("connected")), self.now())
        else:
            log.debug("ignored portal push %s", event)

    def parse_relays(self, entries: object) -> list[RelayConfig]:
        return parse_portal_relays(entries, ipv6=":" in self.local[0])

    def on_init(self, body: dict[str, Any]) -> None:
        interface = body.get("interface")
        resources = body.get("resources")
        if not isinstance(interface, dict) or not isinstance(resources, list):
            self.drops.drop(ClientDropReason.BAD_PUSH)
            return
        self.resources = {r["id"]: r for r in resources if isinstance(r, dict) and isinstance(r.get("id"), str)}
        if not self.initialised:
            try:
                ipv4 = ipaddress.IPv4Address(interface["ipv4"])
                ipv6 = ipaddress.IPv6Address(interface["ipv6"])
                self.start_data_plane(ipv4, ipv6, body.get("relays"))
            except (KeyError, ValueError, OSError, subprocess.CalledProcessError) as exc:
                self.emit("failed", reason=f"setup: {exc}")
                self.stop(1)
                return
            self.initialised = True
            self.emit(
                "joined",
                ipv4=str(ipv4),
                ipv6=str(ipv6),
                public_key=self.public_key_b64,
                local=list(self.local),
                resources=sorted(self.resources),
            )
        elif self.portal_lost_at is not None:
            # A rejoin: connections, routes and DNS assignments were kept; the relays below are the same ones
            # (same credentials: the Node keeps their allocations).
            self.emit("portal_rejoined", down_seconds=self.now() - self.portal_lost_at)
        self.portal_lost_at = None
        self.node.update_relays([], self.parse_relays(body.get("relays")), self.now())
        queued, self.queued_requests = self.queued_requests, []
        for resource_id in queued:
            self.request(resource_id)

    def start_data_plane(self, ipv4: ipaddress.IPv4Address, ipv6: ipaddress.IPv6Address, relays: object) -> None:
        bind = self.args.bind or self.source_address_towards(relays)
        # Batched I/O as the gateway has it (GSO/GRO, TUN offloads, larger socket buffers): otherwise this client,
        # not the gateway, is what the lab's benchmark measures.
        batched = not self.args.plain_io
        self.socket = UdpSocket.bind(bind, self.args.port, gso=batched, gro=batched, increase_buffers=batched)
        self.local = self.socket.local_address
        self.tun = Tun.create(self.args.tun, offload=batched)
        name = self.args.tun
        run_ip(["link", "set", "dev", name, "addrgenmode", "none"], check=False)
        run_ip(["link", "set", "dev", name, "mtu", str(TUN_MTU), "up"])
        run_ip(["addr", "add", f"{ipv4}/32", "dev", name])
        run_ip(["-6", "addr", "add", f"{ipv6}/128", "dev", name, "nodad"], check=False)
        self.loop.add_reader(self.socket.fileno(), self.on_udp)
        self.loop.add_reader(self.tun.wakeup_fd, self.on_tun)

    def source_address_towards(self, relays: object) -> str:
        """The address the kernel would send from towards the first relay (else the portal): our host candidate."""
        targets = [
            a
            for entry in (relays if isinstance(relays, list) else [])
            if isinstance(entry, dict)
            if isinstance(entry.get("addr"), str) and (a := parse_address(entry["addr"])) and ":" not in a[0]
        ]
        host = urlparse(self.args.portal).hostname or "127.0.0.1"
        target = targets[0] if targets else (host, 443)
        with socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return str(probe.getsockname()[0])

    def request(self, resource_id: str) -> None:
        """``create_flow`` for a resource (queued until ``init`` arrived, also after a rejoin)."""
        if not self.initialised or self.portal_lost_at is not None or not self.portal.joined:
            if resource_id not in self.queued_requests:
                self.queued_requests.append(resource_id)
            return
        # Wanted again while unanswered: asked again only if the last ask is old enough (FlowRequests' spacing).
        pending = resource_id in self.flow_requests
        if self.flow_requests.ask(resource_id, self.now()):
            self.send_create_flow(resource_id)
            self.flow_request_timer.arm()
        elif not pending:
            self.emit("flow_creation_failed", resource_id=resource_id, reason="too_many_requests")

    def send_create_flow(self, resource_id: str) -> None:
        connected = [g for g, f in self.flows.items() if f.connected]
        self.portal.push("create_flow", {"resource_id": resource_id, "connected_gateway_ids": connected})

    def on_flow_requests_due(self, due: list[FlowRequestDue]) -> None:
        """Requests the portal has not answered: asked again, or given up (docs/protocol.md §2.3: a gateway without
        relays says so to the portal only, and the portal answers nothing until it confirms or 15 s passed)."""
        for item in due:
            if not item.ask_again:
                self.emit("flow_creation_failed", resource_id=item.resource_id, reason="unanswered")
            elif self.portal_lost_at is None and self.portal.joined:
                self.emit("flow_retry", resource_id=item.resource_id, reason="unanswered", attempt=item.asks - 1)
                self.send_create_flow(item.resource_id)

    def on_flow_creation_failed(self, body: dict[str, Any]) -> None:
        resource_id, reason = body.get("resource_id"), body.get("reason")
        if not isinstance(resource_id, str):
            self.drops.drop(ClientDropReason.BAD_PUSH)
            return
        # An answer ends the request (Firezone's client, on ``offline``, marks the site offline and asks again only
        # on the application's next packet; the lab reports the failure).
        self.flow_requests.answered(resource_id)
        self.flow_request_timer.arm()
        self.emit("flow_creation_failed", resource_id=resource_id, reason=reason)

    def on_flow_created(self, payload: object) -> None:
        grant = FlowGrant.parse(payload)
        if grant is None:
            self.drops.drop(ClientDropReason.BAD_PUSH)
            log.warning("dropped a malformed flow_created: %r", payload)
            return
        now = self.now()
        requested = self.flow_requests.answered(grant.resource_id)
        self.flow_request_timer.arm()
        flow = self.flows.get(grant.gateway_id)
        if flow is not None and flow.grant.gateway_public_key != grant.gateway_public_key:
            # The gateway restarted (new key): its old connection goes now, quietly; routes stay (same gateway id).
            if flow.connected:
                self.node.close_connection(grant.gateway_id, now)
                self.replaced.add(grant.gateway_id)
            flow = None
        if flow is None:
            flow = _Flow(grant, set(), now)
            self.flows[grant.gateway_id] = flow
        flow.resources.add(grant.resource_id)
        self.node.update_relays([], self.parse_relays(grant.relays), now)
        self.add_routes(grant)
        self.emit(
            "flow_created",
            resource_id=grant.resource_id,
            gateway_id=grant.gateway_id,
            gateway_ipv4=str(grant.gateway_ipv4),
            flow_seconds=None if requested is None else now - requested,
        )
        if flow.connected:
            flow.connected = False  # a new grant from the same gateway: upsert again (identical = kept)
        self.connect_waiting_flows()

    def add_routes(self, grant: FlowGrant) -> None:
        networks: list[Network] = [
            ipaddress.IPv4Network(f"{grant.gateway_ipv4}/32"),
            ipaddress.IPv6Network(f"{grant.gateway_ipv6}/128"),
        ]
        network = resource_network(self.resources.get(grant.resource_id))
        if network is None:
            log.warning(
                "resource %s is not a CIDR resource: only the gateway's tunnel address is routed", grant.resource_id
            )
        else:
            networks.append(network)
        for prefix in networks:
            if prefix not in self.routes.prefixes(grant.gateway_id):
                self.routes.add(prefix, grant.gateway_id)
                run_ip(["route", "replace", str(prefix), "dev", self.args.tun], check=False)

    def remove_flow(self, gateway_id: str) -> None:
        self.flows.pop(gateway_id, None)
        self.early_candidates.pop(gateway_id, None)
        for prefix in self.routes.remove_gateway(gateway_id):
            run_ip(["route", "del", str(prefix), "dev", self.args.tun], check=False)

    def connect_waiting_flows(self) -> None:
        """Creates the Node connection of each granted flow once a relay has a measured RTT (Node samples one)."""
        if not any(self.node.relay_rtt(r) is not None for r in self.node.relay_ids):
            return
        now = self.now()
        for gateway_id, flow in self.flows.items():
            if flow.connected:
                continue
            flow.connected = self.node.upsert_connection(
                gateway_id,
                remote_public_key=flow.grant.gateway_public_key,
                preshared_key=flow.grant.preshared_key,
                local_credentials=flow.grant.client_credentials,
                remote_credentials=flow.grant.gateway_credentials,
                now=now,
            )
            if flow.connected:
                for sdp in self.early_candidates.pop(gateway_id, []):
                    self.node.add_remote_candidate(gateway_id, sdp, now)

    def on_candidates(self, added: bool, body: dict[str, Any]) -> None:
        gateway_id = body.get("gateway_id")
        candidates = body.get("candidates")
        if not isinstance(gateway_id, str) or not isinstance(candidates, list):
            self.drops.drop(ClientDropReason.BAD_PUSH)
            return
        now = self.now()
        flow = self.flows.get(gateway_id)
        for sdp in (c for c in candidates if isinstance(c, str)):
            if flow is not None and flow.connected:
                if added:
                    self.node.add_remote_candidate(gateway_id, sdp, now)
                else:
                    self.node.remove_remote_candidate(gateway_id, sdp, now)
            elif added:
                early = self.early_candidates.get(gateway_id)
                if early is None and len(self.early_candidates) >= MAX_EARLY_GATEWAYS:
                    self.drops.drop(ClientDropReason.EARLY_CANDIDATES_FULL)
                    continue
                early = self.early_candidates.setdefault(gateway_id, [])
                if len(early) >= MAX_EARLY_CANDIDATES:
                    self.drops.drop(ClientDropReason.EARLY_CANDIDATES_FULL)
                elif sdp not in early:
                    early.append(sdp)
            elif gateway_id in self.early_candidates and sdp in self.early_candidates[gateway_id]:
                self.early_candidates[gateway_id].remove(sdp)

    # -- data plane -----------------------------------------------------------------------------------------------

    def on_udp(self) -> None:
        assert self.socket is not None and self.tun is not None
        now = self.now()
        local = self.local
        # Runs of one gateway's transport messages are decrypted together (as the gateway does).
        datagrams = [(data, src, local) for data, src in self.socket.recv_many()]
        packets: list[bytes] = []
        for gateway_id, packet in self.node.handle_input_batch(datagrams, now):
            if not p2p_control.is_control_packet(packet):
                packets.append(packet)
                continue
            message = p2p_control.parse(packet)
            if message is not None and message.event == p2p_control.DOMAIN_STATUS_EVENT:
                self.on_domain_status(message.body)
            elif message is not None and message.event == p2p_control.GOODBYE_EVENT:
                self.node.close_connection(gateway_id, now)
                self.emit("closed", gateway_id=gateway_id, reason="goodbye")
                self.remove_flow(gateway_id)
            else:
                self.drops.drop(ClientDropReason.CONTROL_MESSAGE)
        # Written on this thread, merged: the writer-thread hand-off would cost more than the write.
        self.tun.write_now(packets)
        self.flush()

    def on_tun(self) -> None:
        assert self.tun is not None
        now = self.now()
        # Consecutive packets for one gateway go through one tunnel call, as the gateway batches its TUN reads.
        batch_gateway: str | None = None
        batch: list[bytes] = []
        lookup = self.routes.lookup
        last_destination: bytes | None = None  # a TSO-split burst has one destination: looked up once
        gateway_id: str | None = None
        for packet in self.tun.poll_recv_many(TUN_BATCH):
            destination = packet[16:20] if len(packet) >= 20 and packet[0] >> 4 == 4 else None
            if destination is None or destination != last_destination:
                gateway_id = lookup(packet)
                last_destination = destination
            if gateway_id is None:
                self.drops.drop(ClientDropReason.NO_ROUTE)
                continue
            if gateway_id != batch_gateway and batch_gateway is not None:
                self.node.encapsulate_batch(batch_gateway, batch, now)
                batch = []
            batch_gateway = gateway_id
            batch.append(packet)
        if batch_gateway is not None:
            self.node.encapsulate_batch(batch_gateway, batch, now)
        self.flush()

    def send_transmits(self) -> None:
        # A sealed batch comes as one TransmitRun: sent as GSO batches without a Transmit per datagram (as the gateway).
        entries = self.node.drain_transmits()
        if not entries or self.socket is None:
            return
        singles: list[Transmit] = []
        for entry in entries:
            if isinstance(entry, Transmit):
                singles.append(entry)
                continue
            if singles:
                self.socket.send_many(singles)
                singles = []
            self.socket.send_batch(entry.dst, entry.payloads)
        if singles:
            self.socket.send_many(singles)

    def flush(self) -> None:
        self.send_transmits()
        announced = CandidateAnnouncements()
        while (event := self.node.poll_event()) is not None:
            if not announced.add(event):
                self.on_node_event(event)
        # While the portal is away these are dropped by the channel: the gateway keeps the candidates it has.
        announced.push_to(self.portal)
        self.connect_waiting_flows()
        self.send_transmits()
        self.timer.arm()

    def on_node_event(self, event: object) -> None:
        now = self.now()
        if isinstance(event, ConnectionEstablished):
            flow = self.flows.get(event.connection_id)
            setup = None
            if flow is not None:
                flow.established = True
                setup = now - flow.granted_at
            self.emit(
                "established",
                gateway_id=event.connection_id,
                path=event.path.value,
                local=list(event.local),
                remote=list(event.remote),
                setup_seconds=setup,
            )
        elif isinstance(event, ConnectionPathChanged):
            self.emit(
                "path_changed",
                gateway_id=event.connection_id,
                path=event.path.value,
                local=list(event.local),
                remote=list(event.remote),
            )
        elif isinstance(event, ConnectionFailed):
            self.emit("failed", gateway_id=event.connection_id, reason=event.reason)
            self.remove_flow(event.connection_id)
        elif isinstance(event, ConnectionClosed):
            if event.connection_id in self.replaced:
                self.replaced.discard(event.connection_id)
            elif event.connection_id in self.flows:
                self.emit("closed", gateway_id=event.connection_id, reason="closed")
                self.remove_flow(event.connection_id)
        elif isinstance(event, NoRelays):
            # As Firezone's client: the portal answers with fresh relays (relays_presence, docs/protocol.md §2.3).
            self.emit("no_relays")
            self.portal.push("no_relays", {})

    # -- commands -------------------------------------------------------------------------------------------------

    def on_stdin(self) -> None:
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            self.stop(0)
            return
        self.stdin_buffer += chunk
        while b"\n" in self.stdin_buffer:
            line, self.stdin_buffer = self.stdin_buffer.split(b"\n", 1)
            if line.strip():
                self.on_command(line)

    def on_command(self, line: bytes) -> None:
        try:
            command = json.loads(line)
        except ValueError:
            self.emit("error", detail=f"not JSON: {line[:80]!r}")
            return
        if not isinstance(command, dict):
            self.emit("error", detail="a command is a JSON object")
        elif isinstance(command.get("request"), str):
            self.request(command["request"])
        elif isinstance(command.get("resolve"), str) and isinstance(command.get("resource"), str):
            self.resolve(command["resource"], command["resolve"])
        elif command.get("quit"):
            self.stop(0)
        else:
            self.emit("error", detail=f"unknown command {command!r}")

    # -- DNS resources (docs/protocol.md §3.4) ----------------------------------------------------------------

    def resolve(self, resource_id: str, domain: str) -> None:
        """What the client does when an application asks for ``domain`` of a DNS resource: proxy IPs are handed out
        (the same ones on every later query), routed to the resource's gateway and announced with ``assigned_ips``,
        re-sent every 2 s until the gateway answers; every query re-sends, so the gateway re-resolves."""
        domain = domain.lower().rstrip(".")
        key = (resource_id, domain)
        assignment = self.dns_assignments.get(key)
        if assignment is None:
            if len(self.dns_assignments) >= MAX_DNS_ASSIGNMENTS:
                self.emit("error", detail="too many DNS assignments")
                return
            index = len(self.dns_assignments)
            proxies: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
                ipaddress.IPv4Address(_PROXY_V4_BASE + 4 * index + i + 1) for i in range(4)
            ]
            proxies += [ipaddress.IPv6Address(_PROXY_V6_BASE + 4 * index + i + 1) for i in range(4)]
            assignment = self.dns_assignments[key] = _DnsAssignment(resource_id, domain, proxies)
        assignment.status = None
        self.send_assigned_ips(assignment)

    def gateway_of(self, resource_id: str) -> str | None:
        return next((g for g, f in self.flows.items() if resource_id in f.resources), None)

    def send_assigned_ips(self, assignment: _DnsAssignment) -> None:
        if assignment.retransmit is not None:
            assignment.retransmit.cancel()
            assignment.retransmit = None
        if assignment.status is not None:
            return
        gateway_id = self.gateway_of(assignment.resource_id)
        if gateway_id is not None:
            for proxy in assignment.proxy_ips:
                prefix = ipaddress.ip_network(proxy)
                if prefix not in self.routes.prefixes(gateway_id):
                    self.routes.add(prefix, gateway_id)
                    run_ip(["route", "replace", str(prefix), "dev", self.args.tun], check=False)
            packet = p2p_control.assigned_ips(assignment.resource_id, assignment.domain, assignment.proxy_ips)
            self.node.encapsulate(gateway_id, packet, self.now())
            self.flush()
        assignment.retransmit = self.loop.call_later(ASSIGNED_IPS_RETRANSMIT, self.send_assigned_ips, assignment)

    def on_domain_status(self, body: bytes) -> None:
        status = p2p_control.parse_domain_status(body)
        if status is None:
            self.drops.drop(ClientDropReason.CONTROL_MESSAGE)
            return
        assignment = self.dns_assignments.get((status.resource, status.domain.lower().rstrip(".")))
        if assignment is None:
            self.drops.drop(ClientDropReason.CONTROL_MESSAGE)
            return
        assignment.status = "Active" if status.active else "Inactive"
        if assignment.retransmit is not None:
            assignment.retransmit.cancel()
            assignment.retransmit = None
        self.emit(
            "domain_status",
            resource_id=status.resource,
            domain=status.domain,
            status=assignment.status,
            proxy_ips=[str(ip) for ip in assignment.proxy_ips],
        )


def run_ip(arguments: list[str], *, check: bool = True) -> None:
    """One ``ip`` command; failures raise with ``check``, else are logged (e.g. IPv6 disabled in a namespace)."""
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        if check:
            raise subprocess.CalledProcessError(result.returncode, ["ip", *arguments], result.stdout, result.stderr)
        log.info("ip %s: %s", " ".join(arguments), result.stderr.strip())


def build_headless_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lab.client", description="Headless Firezone client: portal, TUN, routes, JSON lines on stdio."
    )
    parser.add_argument("--portal", required=True, help="the portal's base URL, e.g. ws://172.31.0.254:8081")
    parser.add_argument("--token", required=True, help="the client token (clients[].token of the portal config)")
    parser.add_argument("--resource", action="append", default=[], help="resource id to request at start (repeatable)")
    parser.add_argument("--tun", default="tun-firezone")
    parser.add_argument("--bind", default=None, help="local IP for UDP (default: the source address towards a relay)")
    parser.add_argument("--port", type=int, default=0, help="UDP port (default: random)")
    parser.add_argument(
        "--plain-io", action="store_true", help="one datagram/packet per system call: no GSO/GRO, no TUN offloads"
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


async def _headless_main(argv: Sequence[str]) -> int:
    args = build_headless_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    return await HeadlessClient(args).run()


async def _main(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    driver = NodeDriver(args)
    await driver.run()


def headless_main(argv: Sequence[str]) -> int:
    """Portal mode (``firezone-lab client``): runs until ``quit``, EOF on stdin or a fatal portal error."""
    return asyncio.run(_headless_main(argv))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--portal" or a.startswith("--portal=") for a in arguments):
        return headless_main(arguments)
    asyncio.run(_main(arguments))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
