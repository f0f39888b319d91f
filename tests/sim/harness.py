"""Drives :class:`dataplane.node.Node` inside the simulated network, plus a stub portal that relays signalling.

``SimPeer`` is the whole "driver" of one node: a socket on its sim host, a timer at ``poll_timeout`` and a loop that
drains ``poll_transmit``/``poll_event`` after every input. ``StubPortal`` forwards candidates between peers with a
signalling delay, the way the real portal forwards ``broadcast_ice_candidates``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataplane.base import Address
from dataplane.io.rng import SeededRng
from dataplane.node import (
    CandidateGathered,
    CandidateInvalidated,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    ConnectionPathChanged,
    IceCredentials,
    Node,
    NodeEvent,
    NodeRole,
    NoRelays,
    RelayConfig,
)
from tests.sim.net import SimHost, SimNetwork
from tests.sim.relay import SIM_EPOCH, SimRelay

NODE_PORT = 52625


def private_key_for(name: str) -> bytes:
    key = bytearray(hashlib.sha256(name.encode()).digest())
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


class SimPeer:
    """One Node on one sim host."""

    def __init__(self, net: SimNetwork, host: SimHost, role: NodeRole, name: str, *, seed: int = 0) -> None:
        self.net = net
        self.host = host
        self.name = name
        self.node = Node(
            role,
            private_key_for(name),
            rng=SeededRng(seed),
            wall_clock=lambda: SIM_EPOCH + net.now,
        )
        self.events: list[tuple[float, NodeEvent]] = []
        self.received: list[tuple[str, bytes]] = []
        self.on_event: Callable[[NodeEvent], None] | None = None
        self.unsent = 0
        host.bind(NODE_PORT, self._on_datagram)
        net.add_participant(self)

    @property
    def public_key(self) -> bytes:
        return self.node.public_key

    def socket_address(self, version: int = 4) -> Address | None:
        for ip in self.host.addresses:
            if ipaddress.ip_address(ip).version == version:
                return (ip, NODE_PORT)
        return None

    # Participant
    def next_wakeup(self) -> float | None:
        return self.node.poll_timeout()

    def wake(self, now: float) -> None:
        self.node.handle_timeout(now)
        self.flush(now)

    def _on_datagram(self, data: bytes, src: Address, local: Address, now: float) -> None:
        result = self.node.handle_input(data, src, local, now)
        if result is not None:
            self.received.append(result)
        self.flush(now)

    def send_packet(self, connection_id: str, packet: bytes) -> None:
        self.node.encapsulate(connection_id, packet, self.net.now)
        self.flush(self.net.now)

    def flush(self, now: float) -> None:
        while (transmit := self.node.poll_transmit()) is not None:
            version = ipaddress.ip_address(transmit.dst[0]).version
            src = transmit.src or self.socket_address(version)
            if src is None or src[0] not in self.host.addresses:
                self.unsent += 1  # e.g. a check from an address the host lost when it roamed
                continue
            self.host.send(src, transmit.dst, transmit.payload)
        while (event := self.node.poll_event()) is not None:
            self.events.append((now, event))
            if self.on_event is not None:
                self.on_event(event)

    def events_of(self, kind: type) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def first_event_time(self, kind: type) -> float | None:
        return next((t for t, e in self.events if isinstance(e, kind)), None)

    def add_relays(self, relays: list[tuple[str, SimRelay]]) -> None:
        configs = [relay_config(relay_id, relay, self.public_key) for relay_id, relay in relays]
        self.node.update_relays([], configs, self.net.now)
        self.flush(self.net.now)

    def remove_relays(self, relay_ids: list[str]) -> None:
        self.node.update_relays(relay_ids, [], self.net.now)
        self.flush(self.net.now)


def relay_config(relay_id: str, relay: SimRelay, public_key: bytes) -> RelayConfig:
    import base64

    username, password = relay.credentials_for(base64.b64encode(public_key).decode())
    return RelayConfig(relay_id, tuple(relay.addresses), username, password)


@dataclass
class Link:
    """One client↔gateway pair as the portal set it up."""

    client: SimPeer
    gateway: SimPeer
    client_id: str
    gateway_id: str
    client_credentials: IceCredentials
    gateway_credentials: IceCredentials
    preshared_key: bytes


@dataclass
class StubPortal:
    """Forwards candidates between peers (by connection id) with a signalling delay."""

    net: SimNetwork
    delay: float = 0.05
    links: list[Link] = field(default_factory=list)
    no_relays: list[str] = field(default_factory=list)
    relays_online: Callable[[], list[tuple[str, SimRelay]]] | None = None
    _no_relays_answered: dict[str, float] = field(default_factory=dict)

    def connect(self, client: SimPeer, gateway: SimPeer, client_id: str, gateway_id: str) -> Link:
        seed = hashlib.sha256(f"{client_id}:{gateway_id}".encode()).hexdigest()
        link = Link(
            client,
            gateway,
            client_id,
            gateway_id,
            IceCredentials(seed[0:4], seed[4:26]),
            IceCredentials(seed[26:30], seed[30:52]),
            hashlib.sha256(f"psk:{seed}".encode()).digest(),
        )
        existing = next((known for known in self.links if known == link), None)
        if existing is None:
            self.links.append(link)
        else:
            link = existing  # the client asks again (e.g. after its connection failed): same link, same signalling
        self._hook(client)
        self._hook(gateway)
        now = self.net.now
        gateway.node.upsert_connection(
            client_id,
            remote_public_key=client.public_key,
            preshared_key=link.preshared_key,
            local_credentials=link.gateway_credentials,
            remote_credentials=link.client_credentials,
            now=now,
        )
        gateway.flush(now)
        client.node.upsert_connection(
            gateway_id,
            remote_public_key=gateway.public_key,
            preshared_key=link.preshared_key,
            local_credentials=link.client_credentials,
            remote_credentials=link.gateway_credentials,
            now=now,
        )
        client.flush(now)
        return link

    def _hook(self, peer: SimPeer) -> None:
        if peer.on_event is not None:
            return

        def on_event(event: NodeEvent) -> None:
            self._forward(peer, event)

        peer.on_event = on_event

    def _forward(self, peer: SimPeer, event: NodeEvent) -> None:
        if isinstance(event, NoRelays):
            self.no_relays.append(peer.name)
            # The portal answers no_relays with relays_presence listing the relays online (§2.1).
            # Like the portal's presence debounce, at most one answer per peer every few seconds.
            if self.relays_online is not None and self.net.now >= self._no_relays_answered.get(peer.name, -1e9) + 10.0:
                self._no_relays_answered[peer.name] = self.net.now
                online = self.relays_online()
                self.net.schedule(self.net.now + self.delay, lambda: peer.add_relays(online))
            return
        if not isinstance(event, CandidateGathered | CandidateInvalidated):
            return
        for link in self.links:
            if peer is link.client and event.connection_id == link.gateway_id:
                other, other_cid = link.gateway, link.client_id
            elif peer is link.gateway and event.connection_id == link.client_id:
                other, other_cid = link.client, link.gateway_id
            else:
                continue
            sdp = event.candidate.to_sdp()
            gathered = isinstance(event, CandidateGathered)

            def deliver(
                other: SimPeer = other, cid: str = other_cid, sdp: str = sdp, gathered: bool = gathered
            ) -> None:
                if gathered:
                    other.node.add_remote_candidate(cid, sdp, self.net.now)
                else:
                    other.node.remove_remote_candidate(cid, sdp, self.net.now)
                other.flush(self.net.now)

            self.net.schedule(self.net.now + self.delay, deliver)


def established(peer: SimPeer, connection_id: str) -> bool:
    info = peer.node.connection(connection_id)
    return info is not None and info.established


__all__ = [
    "ConnectionClosed",
    "ConnectionEstablished",
    "ConnectionFailed",
    "ConnectionPathChanged",
    "Link",
    "SimPeer",
    "StubPortal",
    "established",
    "private_key_for",
    "relay_config",
]
