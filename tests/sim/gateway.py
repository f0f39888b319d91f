"""The whole gateway state (:class:`dataplane.gateway.GatewayState`) in the simulated network, with a portal stub.

``SimGateway`` is the gateway's driver on a sim host: datagrams in, packets "written to the TUN" collected in
``to_tun``, packets "read from the TUN" injected with :meth:`SimGateway.from_resource`. ``GatewayPortal`` plays the portal:
it pushes ``init``/``create_authorization``/``reject_access``/... as the parsed protocol models and carries candidates
between the gateway's ``broadcast_ice_candidates`` and the clients' Nodes, like the real portal (§2.3).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dataplane.base import Address
from dataplane.dns_nat import IpAddress
from dataplane.gateway import AuthorizationOutcome, GatewayState, ResolveDomain
from dataplane.io.rng import SeededRng
from dataplane.node import CandidateGathered, CandidateInvalidated, IceCredentials, NodeEvent, NodeRole
from protocol.messages import (
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    CreateAuthorization,
    Init,
    NoRelays,
    OutboundMessage,
    parse_portal_message,
)
from tests.sim.harness import NODE_PORT, SimPeer, private_key_for
from tests.sim.nat import NatBehaviour, NatBox
from tests.sim.net import SimHost, SimNetwork
from tests.sim.relay import SIM_EPOCH, SimRelay

GATEWAY_ID = "gateway-0"
GATEWAY_IPV4 = "100.64.0.1"
GATEWAY_IPV6 = "fd00:2021:1111::1"
RELAY_SECRET_EXPIRY = 2145916800


# Resources the tests and benches authorize clients for (as the portal sends them).
LAN: dict[str, Any] = {"id": "res-lan", "type": "cidr", "name": "LAN", "address": "172.20.0.0/24", "filters": []}
DNS: dict[str, Any] = {
    "id": "res-dns",
    "type": "dns",
    "name": "corp",
    "address": "*.corp.example",
    "filters": [{"protocol": "udp", "port_range_start": 1, "port_range_end": 9000}],
}
# Proxy IPs a client assigns to a DNS resource's domain (``assigned_ips``).
PROXY4: list[IpAddress] = [ipaddress.IPv4Address(f"100.96.0.{i}") for i in range(1, 5)]
PROXY6: list[IpAddress] = [ipaddress.IPv6Address(f"fd00:2021:1111:8000::{i}") for i in range(1, 5)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class SimGateway:
    """One GatewayState on one sim host (a participant of the network)."""

    def __init__(self, net: SimNetwork, host: SimHost, *, seed: int = 0) -> None:
        self.net = net
        self.host = host
        self.state = GatewayState(
            private_key_for(GATEWAY_ID), rng=SeededRng(seed), wall_clock=lambda: SIM_EPOCH + net.now
        )
        self.to_tun: list[tuple[float, bytes]] = []
        self.outbound: list[OutboundMessage] = []
        self.portal: GatewayPortal | None = None
        # Answers the gateway's DNS resolutions at once (None: they are never answered).
        self.resolver: Callable[[ResolveDomain], Sequence[IpAddress] | None] | None = None
        host.bind(NODE_PORT, self._on_datagram)
        net.add_participant(self)

    @property
    def public_key(self) -> bytes:
        return self.state.public_key

    def next_wakeup(self) -> float | None:
        return self.state.poll_timeout()

    def wake(self, now: float) -> None:
        self.state.handle_timeout(now)
        self.flush(now)

    def _on_datagram(self, data: bytes, src: Address, local: Address, now: float) -> None:
        for packet in self.state.handle_datagrams([(data, src, local)], now):
            self.to_tun.append((now, packet))
        self.flush(now)

    def from_resource(self, packet: bytes) -> None:
        """A packet read from the TUN (a resource answering a client)."""
        self.state.handle_tun_packets([packet], self.net.now)
        self.flush(self.net.now)

    def flush(self, now: float) -> None:
        while (transmit := self.state.poll_transmit()) is not None:
            version = ipaddress.ip_address(transmit.dst[0]).version
            src = transmit.src
            if src is None:
                src = next(
                    ((ip, NODE_PORT) for ip in self.host.addresses if ipaddress.ip_address(ip).version == version),
                    None,
                )
            if src is None or src[0] not in self.host.addresses:
                continue
            self.host.send(src, transmit.dst, transmit.payload)
        while (message := self.state.poll_outbound()) is not None:
            self.outbound.append(message)
            if self.portal is not None:
                self.portal.from_gateway(message)
        resolved = False
        while (event := self.state.poll_event()) is not None:
            if isinstance(event, ResolveDomain) and self.resolver is not None:
                self.state.handle_domain_resolved(event, self.resolver(event), now)
                resolved = True
        if resolved:
            self.flush(now)


@dataclass
class SimClient:
    peer: SimPeer
    client_id: str
    ipv4: str
    ipv6: str
    psk: bytes
    client_credentials: IceCredentials
    gateway_credentials: IceCredentials
    nat: NatBox | None = None

    @classmethod
    def derived(
        cls, peer: SimPeer, client_id: str, ipv4: str, ipv6: str, *, secret: str, nat: NatBox | None = None
    ) -> SimClient:
        """A client whose preshared key and ICE credentials (its own and the gateway's) are derived from ``secret``:
        the same secret gives the same ones, run after run."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        return cls(
            peer,
            client_id,
            ipv4,
            ipv6,
            hashlib.sha256(f"psk:{digest}".encode()).digest(),
            IceCredentials(digest[0:4], digest[4:26]),
            IceCredentials(digest[26:30], digest[30:52]),
            nat,
        )

    @property
    def public_key_b64(self) -> str:
        return b64(self.peer.public_key)


@dataclass
class GatewayPortal:
    """The portal as the gateway sees it, plus candidate signalling to the clients (with a delay)."""

    net: SimNetwork
    gateway: SimGateway
    relays: dict[str, SimRelay]
    clients: dict[str, SimClient] = field(default_factory=dict)
    delay: float = 0.05
    connected: bool = True
    refs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gateway.portal = self

    def relay_entries(self, public_key: bytes, relay_ids: list[str] | None = None) -> list[dict[str, Any]]:
        entries = []
        for relay_id, relay in sorted(self.relays.items()):
            if relay_ids is not None and relay_id not in relay_ids:
                continue
            if not relay.online:
                continue
            username, password = relay.credentials_for(b64(public_key))
            for ip, port in relay.addresses:
                addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                entries.append(
                    {
                        "id": relay_id,
                        "type": "turn",
                        "addr": addr,
                        "username": username,
                        "password": password,
                        "expires_at": RELAY_SECRET_EXPIRY,
                    }
                )
        return entries

    def push(self, event: str, payload: Any) -> Any:
        message = parse_portal_message(event, payload)
        assert not isinstance(message, type(None))
        state = self.gateway.state
        now = self.net.now
        result: Any = None
        if isinstance(message, Init):
            state.apply_init(message, now)
        elif isinstance(message, CreateAuthorization):
            result = state.create_authorization(message, now)
        else:
            handler = {
                "ice_candidates": lambda m: state.add_ice_candidates(m.client_id, m.candidates, now),
                "invalidate_ice_candidates": lambda m: state.remove_ice_candidates(m.client_id, m.candidates, now),
                "reject_access": lambda m: state.reject_access(m.client_id, m.resource_id, now),
                "resource_updated": lambda m: state.update_resource(m.resource, now),
                "relays_presence": lambda m: state.relays_presence(m.disconnected_ids, m.connected, now),
            }[event]
            handler(message)
        self.gateway.flush(now)
        return result

    def init(self, authorizations: list[dict[str, Any]] | None = None) -> None:
        self.push(
            "init",
            {
                "interface": {"ipv4": GATEWAY_IPV4, "ipv6": GATEWAY_IPV6},
                "relays": self.relay_entries(self.gateway.public_key),
                "authorizations": authorizations or [],
                "account_slug": "sim",
            },
        )

    def add_client(self, client: SimClient) -> None:
        """The portal knows the client: the gateway's candidates reach it, and its own reach the gateway."""
        self.clients[client.client_id] = client
        client.peer.on_event = lambda event: self.from_client(client, event)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.gateway.state.set_portal_connected(connected)
        self.gateway.flush(self.net.now)

    def authorize(
        self, client: SimClient, resource: dict[str, Any], *, expires_at: float | None = None
    ) -> AuthorizationOutcome:
        """``create_authorization`` for the client; the first time, the client's Node gets its side of the connection."""
        ref = f"ref-{len(self.refs)}"
        self.refs.append(ref)
        payload = {
            "ref": ref,
            "resource": resource,
            "client": {
                "id": client.client_id,
                "public_key": client.public_key_b64,
                "preshared_key": b64(client.psk),
                "ipv4": client.ipv4,
                "ipv6": client.ipv6,
            },
            "client_ice_credentials": {
                "username": client.client_credentials.username,
                "password": client.client_credentials.password,
            },
            "gateway_ice_credentials": {
                "username": client.gateway_credentials.username,
                "password": client.gateway_credentials.password,
            },
            "expires_at": None if expires_at is None else int(expires_at),
        }
        outcome: AuthorizationOutcome = self.push("create_authorization", payload)
        if outcome is AuthorizationOutcome.ACCEPTED and client.peer.node.connection(GATEWAY_ID) is None:
            client.peer.node.upsert_connection(
                GATEWAY_ID,
                remote_public_key=self.gateway.public_key,
                preshared_key=client.psk,
                local_credentials=client.client_credentials,
                remote_credentials=client.gateway_credentials,
                now=self.net.now,
            )
            client.peer.flush(self.net.now)
        return outcome

    # -- signalling ---------------------------------------------------------------------------------------------

    def from_gateway(self, message: OutboundMessage) -> None:
        if isinstance(message, NoRelays):
            entries = self.relay_entries(self.gateway.public_key)
            self.net.schedule(
                self.net.now + self.delay,
                lambda: self.push("relays_presence", {"disconnected_ids": [], "connected": entries}),
            )
            return
        if not isinstance(message, BroadcastIceCandidates | BroadcastInvalidatedIceCandidates):
            return
        assert self.connected, "the gateway must hold candidates while the portal link is down"
        gathered = isinstance(message, BroadcastIceCandidates)
        for client_id in message.client_ids:
            client = self.clients.get(client_id)
            if client is None:
                continue
            for sdp in message.candidates:

                def deliver(client: SimClient = client, sdp: str = sdp) -> None:
                    node = client.peer.node
                    if gathered:
                        node.add_remote_candidate(GATEWAY_ID, sdp, self.net.now)
                    else:
                        node.remove_remote_candidate(GATEWAY_ID, sdp, self.net.now)
                    client.peer.flush(self.net.now)

                self.net.schedule(self.net.now + self.delay, deliver)

    def from_client(self, client: SimClient, event: NodeEvent) -> None:
        if not isinstance(event, CandidateGathered | CandidateInvalidated) or event.connection_id != GATEWAY_ID:
            return
        name = "ice_candidates" if isinstance(event, CandidateGathered) else "invalidate_ice_candidates"
        payload = {"client_id": client.client_id, "candidates": [event.candidate.to_sdp()]}
        self.net.schedule(self.net.now + self.delay, lambda: self.push(name, payload))


@dataclass
class GatewayWorld:
    net: SimNetwork
    gateway: SimGateway
    portal: GatewayPortal
    relays: dict[str, SimRelay]
    _hosts: int = 0

    def add_client(self, behaviour: NatBehaviour | None = None, *, seed: int = 0) -> SimClient:
        self._hosts += 1
        index = len(self.portal.clients) + 1
        client_id = f"client-{index}"
        if behaviour is None:
            nat = None
            host = self.net.add_host(client_id, [f"198.51.100.{100 + self._hosts}"])
        else:
            nat = NatBox(f"nat-{client_id}", f"203.0.113.{self._hosts}", behaviour, seed=seed + index)
            host = self.net.add_host(client_id, [f"10.{self._hosts}.0.2"], realm=self.net.add_nat(nat))
        peer = SimPeer(self.net, host, NodeRole.CLIENT, client_id, seed=seed + 100 + index)
        peer.add_relays(
            [(rid, relay) for rid, relay in sorted(self.relays.items()) if relay.online]  # the portal's init for it
        )
        client = SimClient.derived(
            peer,
            client_id,
            f"100.64.1.{index}",
            f"fd00:2021:1111::1:{index}",
            secret=f"{client_id}:{GATEWAY_ID}",
            nat=nat,
        )
        self.portal.add_client(client)
        return client


def build_gateway_world(*, relays: int = 1, seed: int = 0, settle: float = 3.0) -> GatewayWorld:
    net = SimNetwork(seed=seed)
    relay_map: dict[str, SimRelay] = {}
    for i in range(relays):
        host = net.add_host(f"relay-{i}", [f"198.51.100.{10 + i}"], latency=0.005 + 0.002 * i)
        relay_map[f"relay-{i}"] = SimRelay(net, host)
    gateway_host = net.add_host("gateway", ["198.51.100.50"])
    gateway = SimGateway(net, gateway_host, seed=seed)
    portal = GatewayPortal(net, gateway, relay_map)
    portal.set_connected(True)
    portal.init()
    net.run_for(settle)
    return GatewayWorld(net, gateway, portal, relay_map)
