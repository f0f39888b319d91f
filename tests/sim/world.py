"""Ready-made simulated worlds: relays on the internet, a gateway and clients behind chosen NATs."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from dataplane.node import NodeRole
from tests.sim.harness import Link, SimPeer, StubPortal
from tests.sim.nat import NatBehaviour, NatBox, direct_path_possible
from tests.sim.net import SimHost, SimNetwork
from tests.sim.relay import SimRelay

GATEWAY_ID = "gateway-0"


def ipv4_udp(src: str, dst: str, payload: bytes, sport: int = 4000, dport: int = 5000) -> bytes:
    """A well-formed IPv4/UDP packet (checksums included) to carry through the tunnel."""
    udp_length = 8 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + udp_length,
        0,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    checksum = _checksum(header)
    header = header[:10] + struct.pack("!H", checksum) + header[12:]
    pseudo = header[12:20] + struct.pack("!BBH", 0, 17, udp_length)
    udp = struct.pack("!HHHH", sport, dport, udp_length, 0) + payload
    udp_checksum = _checksum(pseudo + udp) or 0xFFFF
    return header + udp[:6] + struct.pack("!H", udp_checksum) + udp[8:]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class Client:
    peer: SimPeer
    host: SimHost
    nat: NatBox | None
    client_id: str
    tunnel_ip: str
    link: Link | None = None


@dataclass
class World:
    net: SimNetwork
    portal: StubPortal
    relays: dict[str, SimRelay]
    gateway: SimPeer
    gateway_nat: NatBox | None
    clients: list[Client] = field(default_factory=list)
    _nat_count: int = 0

    def relay_list(self) -> list[tuple[str, SimRelay]]:
        """The relays the portal would hand out now: the ones online."""
        return sorted((rid, relay) for rid, relay in self.relays.items() if relay.online)

    def add_client(self, behaviour: NatBehaviour | None, *, seed: int = 0) -> Client:
        index = len(self.clients) + 1
        client_id = f"client-{index}"
        nat, host = self._place(f"c{index}", behaviour, seed=seed + index)
        peer = SimPeer(self.net, host, NodeRole.CLIENT, client_id, seed=seed + 100 + index)
        peer.add_relays(self.relay_list())
        client = Client(peer, host, nat, client_id, f"100.64.0.{index + 1}")
        self.clients.append(client)
        return client

    def _place(self, name: str, behaviour: NatBehaviour | None, *, seed: int) -> tuple[NatBox | None, SimHost]:
        self._nat_count += 1
        n = self._nat_count
        if behaviour is None:
            return None, self.net.add_host(name, [f"198.51.100.{100 + n}"])
        box = NatBox(f"nat-{name}", f"203.0.113.{n}", behaviour, seed=seed)
        inside = self.net.add_nat(box)
        return box, self.net.add_host(name, [f"10.{n}.0.2"], realm=inside)

    def connect(self, client: Client) -> Link:
        client.link = self.portal.connect(client.peer, self.gateway, client.client_id, GATEWAY_ID)
        return client.link

    def roam(self, client: Client, behaviour: NatBehaviour | None, *, seed: int = 0) -> None:
        """The client's host moves behind a different NAT (new public address, new mappings)."""
        self._nat_count += 1
        n = self._nat_count
        if behaviour is None:
            self.net.move_host(client.host, [f"198.51.100.{100 + n}"], self.net.internet)
            client.nat = None
        else:
            box = NatBox(f"nat-roam{n}", f"203.0.113.{n}", behaviour, seed=seed + n)
            inside = self.net.add_nat(box)
            self.net.move_host(client.host, [f"10.{n}.0.2"], inside)
            client.nat = box
        client.peer.node.handle_network_change(self.net.now)
        client.peer.flush(self.net.now)

    def direct_expected(self, client: Client) -> bool:
        return direct_path_possible(
            client.nat.behaviour if client.nat else None,
            self.gateway_nat.behaviour if self.gateway_nat else None,
        )


def build_world(
    gateway_behaviour: NatBehaviour | None,
    *,
    relays: int = 2,
    seed: int = 0,
    relay_v6: bool = False,
    settle: float = 3.0,
) -> World:
    net = SimNetwork(seed=seed)
    relay_map: dict[str, SimRelay] = {}
    for i in range(relays):
        addresses = [f"198.51.100.{10 + i}"] + ([f"2001:db8::{10 + i}"] if relay_v6 else [])
        host = net.add_host(f"relay-{i}", addresses, latency=0.005 + 0.002 * i)
        relay_map[f"relay-{i}"] = SimRelay(net, host)
    portal = StubPortal(net)
    world = World(net, portal, relay_map, None, None)  # type: ignore[arg-type]
    portal.relays_online = world.relay_list
    nat, host = world._place("gw", gateway_behaviour, seed=seed)
    world.gateway = SimPeer(net, host, NodeRole.GATEWAY, GATEWAY_ID, seed=seed)
    world.gateway_nat = nat
    world.gateway.add_relays(world.relay_list())
    net.run_for(settle)
    return world
