"""The gateway's state, sans-IO: portal messages, the Node (ICE + WireGuard per client) and per-client policy, joined.

It is what Firezone's ``GatewayState`` is to its gateway (docs/protocol.md §2, §3.3, §4.6). Inputs are the parsed
portal messages, datagrams from the UDP sockets and packets read from the TUN device, each with ``now`` (monotonic
seconds); wall-clock time (portal expiries) comes from the injected ``wall_clock``. Outputs are pulled:
:meth:`poll_transmit` (datagrams), the packets returned by :meth:`handle_datagrams` (for the TUN), :meth:`poll_outbound`
(portal messages), :meth:`poll_event` (for the driver: the tunnel addresses to configure) and :meth:`poll_timeout`.

Per client the gateway keeps a :class:`~dataplane.policy.ClientPolicy` (its tunnel addresses and the resources it may
reach, each with its own expiry) and one Node connection keyed by the client id. Policy state and the connection live
independently, as in the reference: a connection that fails leaves the authorizations in place (the client may come
back with a new connection and expects them to still hold), and a client whose last resource goes away is sent a
``goodbye`` (p2p control, §3.4) and its connection is closed.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dataplane import dns_pattern, p2p_control
from dataplane.base import Address, DropCounter, Rng, Transmit, WallClock
from dataplane.dns_nat import DnsNat, InboundVerdict, IpAddress, is_proxy_address, is_proxy_ip
from dataplane.native import plain_flow_end
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
    RelayConfig,
    TransmitRun,
)
from dataplane.node import NoRelays as NodeNoRelays
from dataplane.policy import ClientPolicy
from protocol.messages import (
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    CidrResource,
    CreateAuthorization,
    DnsResource,
    FlowLogsConfig,
    Init,
    Interface,
    InternetResource,
    NoRelays,
    OutboundMessage,
    Relay,
    TurnRelay,
)

logger = logging.getLogger(__name__)

Resource = CidrResource | DnsResource | InternetResource
ClientId = str

PERIODIC_TICK = 1.0  # §3.3: expired authorizations are evicted by a 1 Hz tick
MAX_CLIENTS = 65_536  # the portal decides who connects; this only bounds what a misbehaving portal could grow
MAX_HELD_CANDIDATES = 64  # per client and direction, while the portal link is down (a Node announces a handful)
MAX_PENDING_RESOLUTIONS = 1000  # §3.4: the reference resolves at most 1000 domains at once


class AuthorizationOutcome(enum.Enum):
    ACCEPTED = "accepted"  # answer authorization_created
    NO_RELAYS = "no_relays"  # no_relays was queued instead
    REFUSED = "refused"  # not answered: the client's request times out at the portal


class GatewayDropReason(enum.Enum):
    NO_PEER_FOR_CONNECTION = "no_peer_for_connection"
    NO_PEER_FOR_ADDRESS = "no_peer_for_address"
    MALFORMED_TUN_PACKET = "malformed_tun_packet"
    UNKNOWN_CONTROL_EVENT = "unknown_control_event"
    MALFORMED_CONTROL_MESSAGE = "malformed_control_message"
    TOO_MANY_CLIENTS = "too_many_clients"
    TOO_MANY_RESOLUTIONS = "too_many_resolutions"


@dataclass(frozen=True, slots=True)
class TunnelAddressesChanged:
    """The portal assigned (new) tunnel addresses: configure the TUN device with them."""

    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ResolveDomain:
    """A client assigned proxy IPs for ``domain`` (§3.4 ``assigned_ips``): resolve it (A and AAAA) and answer with
    :meth:`GatewayState.handle_domain_resolved`."""

    client_id: str
    resource_id: str
    domain: str
    proxy_ips: tuple[IpAddress, ...]


GatewayEvent = TunnelAddressesChanged | ResolveDomain


class FlowObserver(Protocol):
    """Sees every packet the policy let through, with its client and the resource that allowed it (flow logs)."""

    def from_client(self, client_id: str, resource_id: str | None, packet: bytes, wall_now: float) -> None: ...

    def to_client(self, client_id: str, resource_id: str | None, packet: bytes, wall_now: float) -> None: ...


@dataclass(eq=False)
class _Peer:
    client_id: ClientId
    public_key: bytes
    ipv4: bytes  # packed: the TUN-side lookup key
    ipv6: bytes
    policy: ClientPolicy
    resources: dict[str, Resource] = field(default_factory=dict)
    ingest_tokens: dict[str, str] = field(default_factory=dict)
    expires_at: dict[str, float | None] = field(default_factory=dict)  # by resource id, for status
    nat: DnsNat = field(default_factory=DnsNat)


@dataclass
class _HeldCandidates:
    added: dict[str, None] = field(default_factory=dict)  # insertion-ordered sets of SDP strings
    removed: dict[str, None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A read-only view of one client for metrics and status."""

    client_id: ClientId
    ipv4: str
    ipv6: str
    resources: tuple[str, ...]


# A data-path flow: (bytes 12-24 of a plain IPv4 TCP/UDP packet, protocol, least total length the protocol needs),
# the arguments native.plain_flow_end takes after the packets and the start.
_Flow = tuple[bytes, int, int]
_NO_FLOW: _Flow = (b"", -1, 0)


def _plain_flow(packet: bytes) -> _Flow:
    """The flow of a plain IPv4 TCP or UDP packet (no options, not a fragment, lengths consistent), else _NO_FLOW.

    These are the packets ClientPolicy keeps in its flow tables (``dataplane.policy._flow_table``): the decision on
    such a packet, its client (bytes 16-20 towards the client; the connection from it) and whether it goes to a DNS
    proxy address (bytes 16-17) depend only on the protocol and bytes 12-24. So a packet of the same flow as one that
    was just let through (and needed no NAT) is let through for the same resource without asking again: the run of
    such packets that follows is found by ``native.plain_flow_end`` (C when built), one call per run."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[6] & 0x3F or packet[7]:
        return _NO_FLOW
    end = (packet[2] << 8) | packet[3]
    protocol = packet[9]
    least = 40 if protocol == 6 else 28 if protocol == 17 else 0
    if not least or end < least or end > len(packet):
        return _NO_FLOW
    return (packet[12:24], protocol, least)


def relay_configs(relays: Iterable[Relay]) -> list[RelayConfig]:
    """The portal lists a relay once per address family under one id: one RelayConfig per id (STUN-only relays have no
    allocation to make and are skipped)."""
    grouped: dict[str, list[TurnRelay]] = {}
    for relay in relays:
        if isinstance(relay, TurnRelay):
            grouped.setdefault(relay.id, []).append(relay)
        else:
            logger.debug("ignoring STUN-only relay %s", relay.id)
    return [
        RelayConfig(
            relay_id, tuple(dict.fromkeys(e.address for e in entries)), entries[0].username, entries[0].password
        )
        for relay_id, entries in grouped.items()
    ]


class GatewayState:
    """Everything the gateway decides (see the module docstring)."""

    def __init__(self, private_key: bytes, *, rng: Rng, wall_clock: WallClock) -> None:
        self.node = Node(NodeRole.GATEWAY, private_key, rng=rng, wall_clock=wall_clock)
        self.drops = DropCounter()
        self.interface: Interface | None = None
        self.account_slug: str | None = None
        self._wall_clock = wall_clock
        self._peers: dict[ClientId, _Peer] = {}
        self._peer_by_address: dict[bytes, ClientId] = {}
        self._outbound: deque[OutboundMessage] = deque()
        self._events: deque[GatewayEvent] = deque()
        self._pending_resolutions: set[ResolveDomain] = set()
        self._portal_connected = False
        self._held: dict[ClientId, _HeldCandidates] = {}
        self._next_tick: float | None = None
        self.established_connections = 0
        self.flow_logs: FlowLogsConfig | None = None  # init.flow_logs: the portal wants flow logs
        self.flow_observer: FlowObserver | None = None  # set by the driver while flow logs are on

    # -- queries ------------------------------------------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self.node.public_key

    @property
    def peers(self) -> list[PeerInfo]:
        return [self._info(peer) for peer in self._peers.values()]

    def peer(self, client_id: ClientId) -> PeerInfo | None:
        peer = self._peers.get(client_id)
        return None if peer is None else self._info(peer)

    @staticmethod
    def _info(peer: _Peer) -> PeerInfo:
        return PeerInfo(
            peer.client_id,
            str(ipaddress.IPv4Address(peer.ipv4)),
            str(ipaddress.IPv6Address(peer.ipv6)),
            tuple(sorted(peer.policy.resource_ids)),
        )

    @property
    def client_ids(self) -> frozenset[ClientId]:
        return frozenset(self._peers)

    @property
    def dns_nat_sessions(self) -> int:
        """Sessions in every client's DNS-resource NAT table (metrics)."""
        return sum(peer.nat.session_count for peer in self._peers.values())

    def resource_expiries(self, client_id: ClientId) -> dict[str, float | None]:
        """The client's resources with their expiry (unix seconds, None = never); empty for an unknown client."""
        peer = self._peers.get(client_id)
        return {} if peer is None else {rid: peer.expires_at.get(rid) for rid in sorted(peer.resources)}

    # -- the portal link ------------------------------------------------------------------------------------------

    def set_portal_connected(self, connected: bool) -> None:
        """While the link is down, candidate changes are held; on reconnecting each client gets one batch (§2.2)."""
        if connected == self._portal_connected:
            return
        self._portal_connected = connected
        if not connected:
            return
        held, self._held = self._held, {}
        for client_id, changes in held.items():
            if changes.added:
                self._outbound.append(BroadcastIceCandidates(client_ids=[client_id], candidates=list(changes.added)))
        for client_id, changes in held.items():
            if changes.removed:
                self._outbound.append(
                    BroadcastInvalidatedIceCandidates(client_ids=[client_id], candidates=list(changes.removed))
                )

    def apply_init(self, init: Init, now: float) -> None:
        """§2.1 ``init``: relays added, own tunnel addresses stored, authorizations re-synced."""
        self.account_slug = init.account_slug
        self.flow_logs = init.flow_logs
        self.node.update_relays((), relay_configs(init.relays), now)
        if self.interface != init.interface:
            self.interface = init.interface
            self._events.append(TunnelAddressesChanged(init.interface.ipv4, init.interface.ipv6))
            for peer in self._peers.values():
                peer.policy.set_gateway_addresses(init.interface.ipv4, init.interface.ipv6)
        listed: dict[ClientId, dict[str, int | None]] = {}
        for pair in init.authorizations:
            listed.setdefault(pair.client_id, {})[pair.resource_id] = pair.expires_at
        for peer in self._peers.values():
            keep = listed.get(peer.client_id, {})
            for resource_id in list(peer.resources):
                if resource_id not in keep:
                    self._revoke(peer, resource_id)
                else:
                    expires_at = keep[resource_id]
                    peer.policy.set_expiry(resource_id, None if expires_at is None else float(expires_at))
                    peer.expires_at[resource_id] = None if expires_at is None else float(expires_at)
        # A client left without resources keeps its peer state until the next tick (as the reference does): a
        # create_authorization racing the init may still give it one.
        self._drain_node(now)
        self._schedule_tick(now)

    def create_authorization(self, request: CreateAuthorization, now: float) -> AuthorizationOutcome:
        client = request.client
        if client.id not in self._peers and len(self._peers) >= MAX_CLIENTS:
            self.drops.drop(GatewayDropReason.TOO_MANY_CLIENTS)
            logger.warning("refusing a new client: %d clients already", len(self._peers))
            return AuthorizationOutcome.REFUSED
        if self.interface is None:
            logger.warning("create_authorization before init; ignored")
            return AuthorizationOutcome.REFUSED
        public_key = base64.b64decode(client.public_key)
        created = self.node.upsert_connection(
            client.id,
            remote_public_key=public_key,
            preshared_key=base64.b64decode(client.preshared_key),
            local_credentials=IceCredentials(
                request.gateway_ice_credentials.username, request.gateway_ice_credentials.password
            ),
            remote_credentials=IceCredentials(
                request.client_ice_credentials.username, request.client_ice_credentials.password
            ),
            now=now,
        )
        if not created:
            self._drain_node(now)  # the Node queued NoRelays: the portal answers it with relays_presence
            return AuthorizationOutcome.NO_RELAYS
        peer = self._peers.get(client.id)
        ipv4, ipv6 = client.ipv4.packed, client.ipv6.packed
        if peer is None:
            policy = ClientPolicy(client.ipv4, client.ipv6, self.interface.ipv4, self.interface.ipv6, drops=self.drops)
            peer = self._peers[client.id] = _Peer(client.id, public_key, ipv4, ipv6, policy, nat=DnsNat(self.drops))
        elif (peer.ipv4, peer.ipv6) != (ipv4, ipv6):
            # Same client, new tunnel addresses: its grants carry over, its old addresses do not.
            self._forget_addresses(peer)
            peer.ipv4, peer.ipv6 = ipv4, ipv6
            peer.policy.set_client_addresses(client.ipv4, client.ipv6)
        peer.public_key = public_key
        for address in (ipv4, ipv6):
            self._peer_by_address[address] = client.id
        expires_at = None if request.expires_at is None else float(request.expires_at)
        peer.resources[request.resource.id] = request.resource
        peer.policy.grant(request.resource, expires_at)
        if isinstance(request.resource, DnsResource):
            # Proxy IPs assigned under an earlier authorization of this resource are routed again (the reference keeps
            # its translations across revocations).
            peer.policy.route_proxy_addresses(request.resource.id, peer.nat.proxy_ips(request.resource.id))
        peer.expires_at[request.resource.id] = expires_at
        if request.flow_logs_ingest_token is not None:
            peer.ingest_tokens[request.resource.id] = request.flow_logs_ingest_token
        logger.info(
            "allowing access",
            extra={"client_id": client.id, "resource_id": request.resource.id, "expires_at": request.expires_at},
        )
        self._drain_node(now)
        self._schedule_tick(now)
        return AuthorizationOutcome.ACCEPTED

    def add_ice_candidates(self, client_id: ClientId, candidates: Sequence[str], now: float) -> None:
        for candidate in candidates:
            self.node.add_remote_candidate(client_id, candidate, now)
        self._drain_node(now)

    def remove_ice_candidates(self, client_id: ClientId, candidates: Sequence[str], now: float) -> None:
        for candidate in candidates:
            self.node.remove_remote_candidate(client_id, candidate, now)
        self._drain_node(now)

    def reject_access(self, client_id: ClientId, resource_id: str, now: float) -> None:
        peer = self._peers.get(client_id)
        if peer is None or resource_id not in peer.resources:
            logger.debug("reject_access for an authorization we do not hold")
            return
        self._revoke(peer, resource_id)
        if not peer.resources:
            self._remove_peer(peer, now, "access to its last resource was rejected")
        self._drain_node(now)

    def update_resource(self, resource: Resource, now: float) -> None:
        """``resource_updated``: new filters for every client holding the resource; a type change is refused."""
        if isinstance(resource, InternetResource):
            return  # nothing to update: the Internet resource has no filters
        for peer in self._peers.values():
            current = peer.resources.get(resource.id)
            if current is None:
                continue
            if type(current) is not type(resource):
                logger.warning("resource_updated tried to change the type of resource %s; refused", resource.id)
                continue
            assert isinstance(current, CidrResource | DnsResource)
            updated = current.model_copy(update={"filters": resource.filters})
            peer.resources[resource.id] = updated
            peer.policy.update_filters(updated)

    def relays_presence(self, disconnected_ids: Sequence[str], connected: Sequence[Relay], now: float) -> None:
        self.node.update_relays(disconnected_ids, relay_configs(connected), now)
        self._drain_node(now)

    def poll_outbound(self) -> OutboundMessage | None:
        return self._outbound.popleft() if self._outbound else None

    def poll_event(self) -> GatewayEvent | None:
        return self._events.popleft() if self._events else None

    # -- time ---------------------------------------------------------------------------------------------------

    def poll_timeout(self) -> float | None:
        deadlines = [d for d in (self.node.poll_timeout(), self._next_tick) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timeout(self, now: float) -> None:
        self.node.handle_timeout(now)
        if self._next_tick is not None and now >= self._next_tick:
            wall_now = self._wall_clock()
            for peer in list(self._peers.values()):
                peer.nat.handle_timeout(now)
                for resource_id in peer.policy.expire(wall_now):
                    peer.resources.pop(resource_id, None)
                    peer.ingest_tokens.pop(resource_id, None)
                    peer.expires_at.pop(resource_id, None)
                    logger.info(
                        "authorization expired", extra={"client_id": peer.client_id, "resource_id": resource_id}
                    )
                if not peer.resources:
                    self._remove_peer(peer, now, "no authorizations left")
            self._next_tick = None
            self._schedule_tick(now)
        self._drain_node(now)

    def _schedule_tick(self, now: float) -> None:
        if self._next_tick is None and self._peers:
            self._next_tick = now + PERIODIC_TICK

    # -- data plane -----------------------------------------------------------------------------------------------

    def handle_datagrams(self, datagrams: Iterable[tuple[bytes, Address, Address]], now: float) -> list[bytes]:
        """Feeds received datagrams (data, source, local address); returns the packets to write to the TUN."""
        wall_now = self._wall_clock()
        node = self.node
        observer = self.flow_observer
        to_tun: list[bytes] = []
        append = to_tun.append
        # Runs of transport messages from one client are decrypted together (Node.handle_input_runs); the policy,
        # NAT and p2p-control handling below stays per packet, in order, except that the packets following one let
        # through untranslated that are of its plain flow go through with its decision (_plain_flow).
        # A list is the usual case: checking it against the Sequence ABC costs more than handling a STUN check's header.
        batch = datagrams if type(datagrams) is list or isinstance(datagrams, Sequence) else list(datagrams)
        for client_id, packets in node.handle_input_runs(batch, now):
            peer = self._peers.get(client_id)
            if peer is None:
                self.drops.drop(GatewayDropReason.NO_PEER_FOR_CONNECTION, len(packets))
                continue
            policy = peer.policy
            flow = _NO_FLOW
            resource_id: str | None = None
            count = len(packets)
            position = 0
            while position < count:
                if flow is not _NO_FLOW:
                    end = plain_flow_end(packets, position, *flow)
                    flow = _NO_FLOW  # the packet at ``end`` is not of that flow
                    if end > position:
                        run = packets[position:end]
                        to_tun += run
                        if observer is not None:
                            for packet in run:
                                observer.from_client(client_id, resource_id, packet, wall_now)
                        position = end
                        continue
                packet = packets[position]
                position += 1
                if p2p_control.is_control_packet(packet):
                    self._handle_control(peer, packet, now)
                    if client_id not in self._peers:  # a goodbye: the rest of the run has no peer any more
                        if position < count:
                            self.drops.drop(GatewayDropReason.NO_PEER_FOR_CONNECTION, count - position)
                        break
                    continue
                decision = policy.from_client(packet, wall_now)  # counts its refusals in self.drops
                client_view = packet  # flow logs key a flow by the addresses the client sees (proxy IPs, not NAT'd)
                if decision.allowed and decision.resource_id is not None and is_proxy_address(packet):
                    translated = peer.nat.translate_outbound(packet, now)  # §3.4: counts its refusals in self.drops
                    if translated.packet is None:
                        if translated.icmp_reply is not None:
                            node.encapsulate(client_id, translated.icmp_reply, now)
                        continue
                    packet = translated.packet
                elif decision.allowed:
                    flow = _plain_flow(packet)
                if decision.allowed:
                    resource_id = decision.resource_id
                    append(packet)
                    if observer is not None:
                        observer.from_client(client_id, resource_id, client_view, wall_now)
                elif decision.icmp_reply is not None:
                    node.encapsulate(client_id, decision.icmp_reply, now)
        self._drain_node(now)
        return to_tun

    def handle_tun_packets(self, packets: Iterable[bytes], now: float) -> None:
        """Packets read from the TUN: those addressed to a client it may receive them from are encrypted to it.

        Consecutive packets for one client (a TSO-split burst) are sealed in one batch, in order. The packets following
        one let through (not NAT'd) that are of its plain flow go to the same client with its decision (_plain_flow)."""
        wall_now = self._wall_clock()
        by_address = self._peer_by_address
        peers = self._peers
        node = self.node
        observer = self.flow_observer
        batch: list[bytes] = []
        batch_client: ClientId | None = None
        flow = _NO_FLOW
        resource_id: str | None = None
        read = packets if type(packets) is list else list(packets)
        count = len(read)
        position = 0
        while position < count:
            if flow is not _NO_FLOW:
                end = plain_flow_end(read, position, *flow)
                flow = _NO_FLOW  # the packet at ``end`` is not of that flow
                if end > position:
                    run = read[position:end]
                    batch += run
                    if observer is not None and batch_client is not None:
                        for packet in run:
                            observer.to_client(batch_client, resource_id, packet, wall_now)
                    position = end
                    continue
            packet = read[position]
            position += 1
            version = packet[0] >> 4 if packet else 0
            if version == 4 and len(packet) >= 20:
                client_id = by_address.get(packet[16:20])
            elif version == 6 and len(packet) >= 40:
                client_id = by_address.get(packet[24:40])
            else:
                self.drops.drop(GatewayDropReason.MALFORMED_TUN_PACKET)
                continue
            peer = peers.get(client_id) if client_id is not None else None
            if peer is None:
                self.drops.drop(GatewayDropReason.NO_PEER_FOR_ADDRESS)
                continue
            nat = peer.nat
            if nat.active:
                inbound = nat.translate_inbound(packet, now)
                if inbound.verdict is InboundVerdict.EXPIRED:
                    continue  # counted by the NAT: a late reply for a session that ended
                if inbound.packet is not None:
                    packet = inbound.packet
            decision = peer.policy.to_client(packet, wall_now)
            if not decision.allowed:
                continue  # counted by the policy
            if not nat.active:
                flow = _plain_flow(packet)
            resource_id = decision.resource_id
            if observer is not None:
                observer.to_client(peer.client_id, resource_id, packet, wall_now)
            if client_id != batch_client:
                if batch_client is not None:
                    node.encapsulate_batch(batch_client, batch, now)
                batch, batch_client = [], client_id
            batch.append(packet)
        if batch_client is not None:
            node.encapsulate_batch(batch_client, batch, now)
        self._drain_node(now)

    def handle_domain_resolved(self, request: ResolveDomain, addresses: Sequence[IpAddress] | None, now: float) -> None:
        """The answer to a :class:`ResolveDomain`: ``addresses`` (A and AAAA records, maybe none), or None when the
        resolution failed. Sets up the NAT and answers ``domain_status`` (§3.4)."""
        self._pending_resolutions.discard(request)
        peer = self._peers.get(request.client_id)
        if peer is None:
            return
        resource = peer.resources.get(request.resource_id)
        active = False
        if addresses is None:
            logger.info("resolving a DNS resource's domain failed", extra={"domain": request.domain})
        elif isinstance(resource, DnsResource) and dns_pattern.matches(resource.address, request.domain):
            installed, reset = peer.nat.setup(request.domain, request.resource_id, request.proxy_ips, addresses)
            if reset:
                logger.info(
                    "client re-assigned its proxy IPs; its DNS NAT was reset", extra={"client_id": peer.client_id}
                )
                peer.policy.clear_proxy_addresses()
            active = installed and peer.policy.route_proxy_addresses(request.resource_id, request.proxy_ips)
            logger.info(
                "DNS resource NAT set up" if active else "DNS resource NAT refused: too many proxy IPs",
                extra={"client_id": peer.client_id, "domain": request.domain, "addresses": [str(a) for a in addresses]},
            )
        self._send_domain_status(peer.client_id, request.resource_id, request.domain, active, now)
        self._drain_node(now)

    def poll_transmit(self) -> Transmit | None:
        return self.node.poll_transmit()

    def drain_transmits(self) -> list[Transmit | TransmitRun]:
        """Every datagram :meth:`poll_transmit` would hand out, in order, sealed batches as runs (the data path's)."""
        return self.node.drain_transmits()

    def shut_down(self, now: float) -> None:
        """SIGTERM (§5): every client is told ``goodbye`` and its connection closed."""
        for peer in list(self._peers.values()):
            self._remove_peer(peer, now, "the gateway is shutting down")
        self._drain_node(now)

    # -- internals ------------------------------------------------------------------------------------------------

    def _handle_control(self, peer: _Peer, packet: bytes, now: float) -> None:
        message = p2p_control.parse(packet)
        if message is None:
            self.drops.drop(GatewayDropReason.MALFORMED_CONTROL_MESSAGE)
            return
        if message.event == p2p_control.GOODBYE_EVENT:
            logger.info("client said goodbye", extra={"client_id": peer.client_id})
            self._forget_addresses(peer)
            del self._peers[peer.client_id]
            self.node.close_connection(peer.client_id, now)
        elif message.event == p2p_control.ASSIGNED_IPS_EVENT:
            self._handle_assigned_ips(peer, message.body, now)
        else:
            self.drops.drop(GatewayDropReason.UNKNOWN_CONTROL_EVENT)

    def _handle_assigned_ips(self, peer: _Peer, body: bytes, now: float) -> None:
        """§3.4: an authorized domain of the resource's pattern is resolved (the driver answers with
        :meth:`handle_domain_resolved`); anything else is answered ``Inactive`` at once."""
        request = p2p_control.parse_assigned_ips(body)
        if request is None:
            self.drops.drop(GatewayDropReason.MALFORMED_CONTROL_MESSAGE)
            return
        if not all(is_proxy_ip(ip) for ip in request.proxy_ips):
            # Routing an arbitrary address under a DNS resource's filters would let it through untranslated.
            self.drops.drop(GatewayDropReason.MALFORMED_CONTROL_MESSAGE)
            return
        domain = request.domain
        resource = peer.resources.get(request.resource)
        if not isinstance(resource, DnsResource) or not dns_pattern.matches(resource.address, domain):
            logger.info(
                "assigned_ips for a domain the client is not authorized for",
                extra={"client_id": peer.client_id, "resource_id": request.resource, "domain": domain},
            )
            self._send_domain_status(peer.client_id, request.resource, request.domain, False, now)
            return
        event = ResolveDomain(peer.client_id, request.resource, domain, request.proxy_ips)
        if event in self._pending_resolutions:
            return  # a retransmission: the answer to the first one is on its way
        if len(self._pending_resolutions) >= MAX_PENDING_RESOLUTIONS:
            self.drops.drop(GatewayDropReason.TOO_MANY_RESOLUTIONS)
            return  # the client retransmits every 2 s
        self._pending_resolutions.add(event)
        self._events.append(event)

    def _send_domain_status(self, client_id: ClientId, resource_id: str, domain: str, active: bool, now: float) -> None:
        if self.node.has_session(client_id):
            self.node.encapsulate(client_id, p2p_control.domain_status(resource_id, domain, active), now)

    def _revoke(self, peer: _Peer, resource_id: str) -> None:
        peer.resources.pop(resource_id, None)
        peer.ingest_tokens.pop(resource_id, None)
        peer.expires_at.pop(resource_id, None)
        peer.policy.revoke(resource_id)

    def _remove_peer(self, peer: _Peer, now: float, why: str) -> None:
        logger.info("closing the connection to a client: %s", why, extra={"client_id": peer.client_id})
        if self.node.has_session(peer.client_id):
            self.node.encapsulate(peer.client_id, p2p_control.goodbye(), now)
        self.node.close_connection(peer.client_id, now)
        self._forget_addresses(peer)
        self._peers.pop(peer.client_id, None)
        self._held.pop(peer.client_id, None)

    def _forget_addresses(self, peer: _Peer) -> None:
        for address in (peer.ipv4, peer.ipv6):
            if self._peer_by_address.get(address) == peer.client_id:
                del self._peer_by_address[address]

    def _drain_node(self, now: float) -> None:
        added: dict[ClientId, dict[str, None]] = {}
        removed: dict[ClientId, dict[str, None]] = {}
        while (event := self.node.poll_event()) is not None:
            if isinstance(event, CandidateGathered):
                added.setdefault(event.connection_id, {})[event.candidate.to_sdp()] = None
            elif isinstance(event, CandidateInvalidated):
                removed.setdefault(event.connection_id, {})[event.candidate.to_sdp()] = None
            elif isinstance(event, NodeNoRelays):
                self._outbound.append(NoRelays())
            elif isinstance(event, ConnectionEstablished):
                self.established_connections += 1
                logger.info(
                    "connection established",
                    extra={"client_id": event.connection_id, "path": event.path.value},
                )
            elif isinstance(event, ConnectionPathChanged):
                logger.info(
                    "connection path changed", extra={"client_id": event.connection_id, "path": event.path.value}
                )
            elif isinstance(event, ConnectionFailed | ConnectionClosed):
                # Authorizations stay (the client may come back with a new connection); held candidates are moot.
                self._held.pop(event.connection_id, None)
                if isinstance(event, ConnectionFailed):
                    logger.info("connection failed: %s", event.reason, extra={"client_id": event.connection_id})
        for client_id, candidates in added.items():
            if self._portal_connected:
                self._outbound.append(BroadcastIceCandidates(client_ids=[client_id], candidates=list(candidates)))
            else:
                self._hold(client_id, candidates, added=True)
        for client_id, candidates in removed.items():
            if self._portal_connected:
                self._outbound.append(
                    BroadcastInvalidatedIceCandidates(client_ids=[client_id], candidates=list(candidates))
                )
            else:
                self._hold(client_id, candidates, added=False)

    def _hold(self, client_id: ClientId, candidates: dict[str, None], *, added: bool) -> None:
        held = self._held.setdefault(client_id, _HeldCandidates())
        into, other = (held.added, held.removed) if added else (held.removed, held.added)
        for candidate in candidates:
            other.pop(candidate, None)  # the later change wins
            into[candidate] = None
            while len(into) > MAX_HELD_CANDIDATES:
                del into[next(iter(into))]
