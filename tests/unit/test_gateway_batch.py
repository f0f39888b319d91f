"""GatewayState's data path takes batches: the same packets one by one and as one batch must give the same outcome.

Within a batch a packet of the same plain flow as the last one let through reuses that decision (no policy call); the
packets below put look-alikes of one flow (same addresses and ports, but a fragment, IP options, a cut-short length,
another protocol) and refused flows between the packets of allowed ones. Two simulated worlds built from the same
seeds are fed the same packets, one per call in the first and all in one call in the second; what reaches the TUN,
what reaches the client and every drop counter must agree.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from dataplane.base import Address
from dataplane.node import Node, TransmitRun
from tests.sim.gateway import GATEWAY_ID, LAN, GatewayWorld, SimClient, build_gateway_world
from tests.sim.test_gateway_state import connected_client, tcp_syn
from tests.sim.world import ipv4_udp

TCP_80: dict[str, Any] = {
    "id": "res-tcp80",
    "type": "cidr",
    "name": "tcp 80 only",
    "address": "172.22.0.0/24",
    "filters": [{"protocol": "tcp", "port_range_start": 80, "port_range_end": 80}],
}
# Around TCP_80, everything: what TCP_80 filters out (a fragment, UDP) still passes, attributed to this one.
WIDE: dict[str, Any] = {"id": "res-wide", "type": "cidr", "name": "wide", "address": "172.22.0.0/16", "filters": []}
RESOURCE = "172.22.0.5"


class _FlowLog:
    """A flow observer that records what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, bytes]] = []

    def from_client(self, client_id: str, resource_id: str | None, packet: bytes, wall_now: float) -> None:
        self.seen.append(("from", client_id, resource_id, packet))

    def to_client(self, client_id: str, resource_id: str | None, packet: bytes, wall_now: float) -> None:
        self.seen.append(("to", client_id, resource_id, packet))


def _world(*resources: dict[str, Any]) -> tuple[GatewayWorld, SimClient]:
    world = build_gateway_world()
    client = connected_client(world, LAN, TCP_80, *resources)
    world.gateway.state.flow_observer = _FlowLog()
    return world, client


def _tcp(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    packet = bytearray(tcp_syn(src, dst, dport, sport))
    packet[24:28] = struct.pack("!I", seq)
    return bytes(packet)


def _with_length(packet: bytes | bytearray, length: int) -> bytes:
    out = bytearray(packet)
    out[2:4] = struct.pack("!H", length)
    return bytes(out)


def _variants(packet: bytes) -> list[bytes]:
    """Packets with ``packet``'s bytes 12-24 (a TCP packet to or from port 80) that are not plain packets of its flow
    and that TCP_80 refuses: each one the batch must not wave through with the flow's decision."""
    late_fragment = bytearray(packet)
    late_fragment[7] = 1  # fragment offset 8: no transport header, so no port to allow
    far_fragment = bytearray(packet)
    far_fragment[6] |= 0x01  # fragment offset 2048
    # IP options that repeat the flow's ports, with a TCP header for port 22 behind them
    options = bytearray(packet[:24] + packet[20:])
    options[0] = 0x46
    options[24:28] = struct.pack("!HH", 22, 22)
    other_protocol = bytearray(packet)
    other_protocol[9] = 17  # UDP: not allowed
    return [
        bytes(late_fragment),
        bytes(far_fragment),
        _with_length(options, len(options)),
        _with_length(packet, len(packet) + 4),  # claims more than it carries
        _with_length(packet[:36], 36),  # a TCP header cut short
        bytes(other_protocol),
    ]


def _after_each(packet: bytes, others: list[bytes]) -> list[bytes]:
    """``packet`` before each of ``others``: each look-alike comes right after a packet of the flow it imitates."""
    return [p for other in others for p in (packet, other)]


def _observe(world: GatewayWorld, client: SimClient) -> dict[str, Any]:
    state = world.gateway.state
    return {
        "to_tun": [packet for _, packet in world.gateway.to_tun],
        "received": list(client.peer.received),
        "gateway_drops": dict(state.drops.counts),
        "node_drops": dict(state.node.drops.counts),
        "flow_log": state.flow_observer.seen if isinstance(state.flow_observer, _FlowLog) else None,
    }


@pytest.mark.parametrize("wide", [False, True])
def test_tun_packets_in_one_batch_give_what_they_give_one_by_one(wide: bool) -> None:
    extra = [WIDE] if wide else []
    worlds = [_world(*extra), _world(*extra)]
    client_ip = worlds[0][1].ipv4
    assert worlds[1][1].ipv4 == client_ip
    web = [_tcp(RESOURCE, client_ip, 80, 40000, seq) for seq in range(3)]
    ssh = _tcp(RESOURCE, client_ip, 22, 40000, 9)  # source port 22: not what WEB_ONLY allows
    lan = [ipv4_udp("172.20.0.10", client_ip, bytes([n]) * 40, sport=53, dport=4000) for n in range(2)]
    packets = [
        *web,
        *_after_each(web[0], _variants(web[0])),
        web[1],
        ssh,
        ssh,
        web[2],
        *lan,
        ipv4_udp("172.20.0.10", "100.64.7.7", b"nobody"),
        lan[0],
        b"\x45",
        lan[1],
    ]
    one_by_one, batched = worlds
    for packet in packets:
        one_by_one[0].gateway.from_resource(packet)
    gateway = batched[0].gateway
    gateway.state.handle_tun_packets(packets, gateway.net.now)
    gateway.flush(gateway.net.now)
    for world, _ in worlds:
        world.net.run_for(0.5)
    first, second = (_observe(world, client) for world, client in worlds)
    assert first == second
    received = [packet for _, packet in first["received"]]
    assert web[0] in received and lan[1] in received
    assert (ssh in received) == wide  # the test can tell them apart


@pytest.mark.parametrize("wide", [False, True])
def test_datagrams_in_one_batch_give_what_they_give_one_by_one(wide: bool) -> None:
    extra = [WIDE] if wide else []
    worlds = [_world(*extra), _world(*extra)]
    client_ip = worlds[0][1].ipv4
    web = [_tcp(client_ip, RESOURCE, 40000, 80, seq) for seq in range(3)]
    ssh = _tcp(client_ip, RESOURCE, 40000, 22, 9)  # refused and answered with an ICMP error
    spoofed = ipv4_udp("100.64.9.9", "172.20.0.10", b"spoofed")
    lan = [ipv4_udp(client_ip, "172.20.0.10", bytes([n]) * 40) for n in range(2)]
    packets = [*web, *_after_each(web[0], _variants(web[0])), web[1], ssh, web[2], spoofed, *lan, ssh, lan[0]]
    captured: list[list[tuple[bytes, Address, Address]]] = []
    for world, client in worlds:
        datagrams: list[tuple[bytes, Address, Address]] = []

        def capture(
            data: bytes,
            src: Address,
            local: Address,
            now: float,
            into: list[tuple[bytes, Address, Address]] = datagrams,
        ) -> None:
            into.append((data, src, local))

        world.gateway.host.bind(52625, capture)
        for packet in packets:
            client.peer.send_packet(GATEWAY_ID, packet)
        world.net.run_for(0.5)
        world.gateway.host.bind(52625, world.gateway._on_datagram)
        captured.append(datagrams)
    assert captured[0] == captured[1]  # same seeds, same bytes (the tunnel's and ICE's)
    assert sum(data[0] == 4 and len(data) > 32 for data, _, _ in captured[0]) == len(packets)
    (one_by_one, _), (batched, _) = worlds
    for datagram in captured[0]:
        one_by_one.gateway._on_datagram(*datagram, one_by_one.net.now)
    gateway = batched.gateway
    gateway.to_tun.extend((gateway.net.now, p) for p in gateway.state.handle_datagrams(captured[1], gateway.net.now))
    gateway.flush(gateway.net.now)
    for world, _ in worlds:
        world.net.run_for(0.5)
    first, second = (_observe(world, client) for world, client in worlds)
    assert first == second
    assert web[0] in first["to_tun"] and lan[1] in first["to_tun"]
    assert (ssh in first["to_tun"]) == wide
    assert len(first["received"]) >= (0 if wide else 2)  # ICMP errors, for ssh among others


def test_sealed_batches_leave_as_runs_and_poll_transmit_hands_out_the_same_datagrams() -> None:
    world, client = _world()
    state = world.gateway.state
    now = world.net.now
    packets = [ipv4_udp("172.20.0.10", client.ipv4, bytes([n]) * 100, sport=53, dport=4000) for n in range(5)]
    state.handle_tun_packets(packets[:3], now)
    state.handle_tun_packets(packets[3:], now)
    drained = state.drain_transmits()
    assert len(drained) == 1 and isinstance(drained[0], TransmitRun)  # two sealed batches, one way: one run
    run = drained[0]
    assert len(run.payloads) == 5
    node: Node = state.node
    node._transmits.append(TransmitRun(run.dst, list(run.payloads), run.src))
    polled = []
    while (transmit := node.poll_transmit()) is not None:
        polled.append(transmit)
    assert [(t.dst, t.payload, t.src) for t in polled] == [(run.dst, p, run.src) for p in run.payloads]
