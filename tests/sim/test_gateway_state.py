"""GatewayState in the simulated network: portal messages, a client's connection and the policy, end to end.

A client Node behind a NAT gets authorized through the portal stub, ICE and WireGuard come up, and its packets are
judged by the gateway's policy: allowed ones reach the TUN, denied ones are answered with ICMP administratively
prohibited through the tunnel, spoofed ones vanish. Access changes (reject_access, expiry, resource_updated, init)
take effect on the next packet, and a client that loses its last resource is told goodbye.
"""

from __future__ import annotations

import struct
from typing import Any

from dataplane import p2p_control
from dataplane.gateway import AuthorizationOutcome, GatewayDropReason
from dataplane.policy import PolicyDropReason
from protocol.messages import BroadcastIceCandidates, BroadcastInvalidatedIceCandidates, NoRelays
from tests.sim.gateway import GATEWAY_ID, GATEWAY_IPV4, LAN, GatewayWorld, SimClient, build_gateway_world
from tests.sim.nat import PORT_RESTRICTED_CONE
from tests.sim.relay import SIM_EPOCH
from tests.sim.world import ipv4_udp

WEB_ONLY: dict[str, Any] = {
    "id": "res-web",
    "type": "cidr",
    "name": "web",
    "address": "172.21.0.0/24",
    "filters": [{"protocol": "tcp", "port_range_start": 80, "port_range_end": 80}, {"protocol": "udp"}],
}


def tcp_syn(src: str, dst: str, dport: int, sport: int = 40000) -> bytes:
    """An IPv4 TCP SYN (checksums are not judged by the policy)."""
    import ipaddress

    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp),
        0,
        0x4000,
        64,
        6,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + tcp


def connected_client(world: GatewayWorld, *resources: dict[str, Any], expires_at: float | None = None) -> SimClient:
    client = world.add_client(PORT_RESTRICTED_CONE)
    world.net.run_for(2.0)
    for resource in resources:
        assert world.portal.authorize(client, resource, expires_at=expires_at) is AuthorizationOutcome.ACCEPTED
    assert world.net.run_until_true(lambda: client.peer.node.connection(GATEWAY_ID) is not None, timeout=1.0)
    # The gateway answers the client's handshake: the client's first packet brings the tunnel up.
    hello = ipv4_udp(client.ipv4, GATEWAY_IPV4, b"hello")
    client.peer.send_packet(GATEWAY_ID, hello)
    assert world.net.run_until_true(lambda: any(p == hello for _, p in world.gateway.to_tun), timeout=30.0)
    world.gateway.to_tun.clear()
    client.peer.received.clear()
    return client


def send(world: GatewayWorld, client: SimClient, packet: bytes) -> None:
    client.peer.send_packet(GATEWAY_ID, packet)
    world.net.run_for(0.5)


def icmp_replies(client: SimClient) -> list[bytes]:
    return [p for _, p in client.peer.received if p[9] == 1]


def test_allowed_packets_reach_the_tun_and_answers_go_back() -> None:
    world = build_gateway_world()
    client = connected_client(world, LAN)
    packet = ipv4_udp(client.ipv4, "172.20.0.10", b"request")
    send(world, client, packet)
    assert [p for _, p in world.gateway.to_tun] == [packet]
    answer = ipv4_udp("172.20.0.10", client.ipv4, b"answer", sport=5000, dport=4000)
    world.gateway.from_resource(answer)
    world.net.run_for(0.5)
    assert (GATEWAY_ID, answer) in client.peer.received


def test_denied_port_is_answered_with_administratively_prohibited() -> None:
    world = build_gateway_world()
    client = connected_client(world, WEB_ONLY)
    send(world, client, tcp_syn(client.ipv4, "172.21.0.5", 80))
    assert len(world.gateway.to_tun) == 1
    send(world, client, tcp_syn(client.ipv4, "172.21.0.5", 22))
    assert len(world.gateway.to_tun) == 1
    replies = icmp_replies(client)
    assert len(replies) == 1
    reply = replies[0]
    assert reply[20] == 3 and reply[21] == 13  # destination unreachable, administratively prohibited
    assert reply[12:16] == bytes([172, 21, 0, 5]) and reply[16:20] == bytes([100, 64, 1, 1])
    assert world.gateway.state.drops[PolicyDropReason.FILTERED] == 1


def test_spoofed_source_never_reaches_the_tun() -> None:
    world = build_gateway_world()
    client = connected_client(world, LAN)
    send(world, client, ipv4_udp("100.64.9.9", "172.20.0.10", b"spoofed"))
    send(world, client, ipv4_udp("172.20.0.99", "172.20.0.10", b"spoofed"))
    assert world.gateway.to_tun == []
    assert world.gateway.state.drops[PolicyDropReason.SPOOFED_SOURCE] == 2


def test_reject_access_applies_to_the_next_packet_and_the_last_one_says_goodbye() -> None:
    world = build_gateway_world()
    client = connected_client(world, LAN, WEB_ONLY)
    world.portal.push("reject_access", {"client_id": client.client_id, "resource_id": "res-lan"})
    send(world, client, ipv4_udp(client.ipv4, "172.20.0.10", b"x"))
    assert world.gateway.to_tun == [] and len(icmp_replies(client)) == 1
    send(world, client, tcp_syn(client.ipv4, "172.21.0.5", 80))
    assert len(world.gateway.to_tun) == 1
    world.portal.push("reject_access", {"client_id": client.client_id, "resource_id": "res-web"})
    world.net.run_for(0.5)
    goodbyes = [p for _, p in client.peer.received if p2p_control.is_control_packet(p)]
    assert [p2p_control.parse(p) for p in goodbyes] == [p2p_control.ControlMessage(p2p_control.GOODBYE_EVENT, b"")]
    assert world.gateway.state.peer(client.client_id) is None
    assert world.gateway.state.node.connection(client.client_id) is None


def test_expiry_cuts_traffic_within_a_tick() -> None:
    world = build_gateway_world()
    client = connected_client(world, LAN, expires_at=SIM_EPOCH + world.net.now + 20)
    send(world, client, ipv4_udp(client.ipv4, "172.20.0.10", b"before"))
    assert len(world.gateway.to_tun) == 1
    world.net.run_for(20.0)
    send(world, client, ipv4_udp(client.ipv4, "172.20.0.10", b"after"))
    assert len(world.gateway.to_tun) == 1
    assert world.gateway.state.peer(client.client_id) is None  # evicted by the tick, with a goodbye
    assert any(p2p_control.is_control_packet(p) for _, p in client.peer.received)


def test_narrowed_filter_applies_to_the_next_packet() -> None:
    world = build_gateway_world()
    client = connected_client(world, LAN)
    send(world, client, tcp_syn(client.ipv4, "172.20.0.10", 22))
    assert len(world.gateway.to_tun) == 1
    narrowed = dict(LAN, filters=[{"protocol": "tcp", "port_range_start": 443, "port_range_end": 443}])
    world.portal.push("resource_updated", narrowed)
    send(world, client, tcp_syn(client.ipv4, "172.20.0.10", 22))
    assert len(world.gateway.to_tun) == 1 and len(icmp_replies(client)) == 1


def test_a_second_client_cannot_use_the_first_ones_authorization() -> None:
    world = build_gateway_world()
    first = connected_client(world, LAN)
    second = connected_client(world, WEB_ONLY)
    send(world, second, ipv4_udp(second.ipv4, "172.20.0.10", b"not mine"))
    assert world.gateway.to_tun == [] and len(icmp_replies(second)) == 1
    send(world, first, ipv4_udp(first.ipv4, "172.20.0.10", b"mine"))
    assert len(world.gateway.to_tun) == 1
    # A resource's answer addressed to the second client is not let through either.
    world.gateway.from_resource(ipv4_udp("172.20.0.10", second.ipv4, b"leak", sport=5000, dport=4000))
    world.net.run_for(0.5)
    assert not any(p.endswith(b"leak") for _, p in second.peer.received)


def test_init_resync_keeps_listed_grants_and_drops_the_rest() -> None:
    world = build_gateway_world()
    client = connected_client(world, LAN, WEB_ONLY)
    world.portal.init([{"client_id": client.client_id, "resource_id": "res-web", "expires_at": None}])
    assert world.gateway.state.peer(client.client_id).resources == ("res-web",)  # type: ignore[union-attr]
    world.portal.init([])
    # The reference keeps the client with an empty set until its next tick, which closes the connection.
    assert world.gateway.state.peer(client.client_id) is not None
    world.net.run_for(1.5)
    assert world.gateway.state.peer(client.client_id) is None


def test_client_goodbye_drops_the_client() -> None:
    world = build_gateway_world()
    client = connected_client(world, LAN)
    send(world, client, p2p_control.goodbye())
    assert world.gateway.state.peer(client.client_id) is None
    assert world.gateway.state.node.connection(client.client_id) is None


def test_candidates_are_held_while_the_portal_is_away_and_flushed_in_one_batch() -> None:
    world = build_gateway_world(relays=2)
    client = world.add_client(PORT_RESTRICTED_CONE)
    world.net.run_for(2.0)
    world.gateway.outbound.clear()
    world.portal.set_connected(False)
    # An authorization delivered just before the link dropped: the new connection's candidates have nowhere to go.
    world.portal.authorize(client, LAN)
    world.net.run_for(5.0)
    candidate_messages = (BroadcastIceCandidates, BroadcastInvalidatedIceCandidates)
    assert not any(isinstance(m, candidate_messages) for m in world.gateway.outbound)
    world.portal.set_connected(True)
    batches = [m for m in world.gateway.outbound if isinstance(m, candidate_messages)]
    assert len(batches) == 1 and isinstance(batches[0], BroadcastIceCandidates)
    assert batches[0].client_ids == [client.client_id]
    announced = {c.to_sdp() for c in world.gateway.state.node._connections[client.client_id].announced}
    assert set(batches[0].candidates) == announced
    # Delivered late, they still connect the client.
    hello = ipv4_udp(client.ipv4, GATEWAY_IPV4, b"hello")
    client.peer.send_packet(GATEWAY_ID, hello)
    assert world.net.run_until_true(lambda: any(p == hello for _, p in world.gateway.to_tun), timeout=30.0)


def test_no_relay_means_no_relays_and_no_authorization() -> None:
    world = build_gateway_world()
    world.portal.push("relays_presence", {"disconnected_ids": ["relay-0"], "connected": []})
    world.gateway.outbound.clear()
    client = world.add_client(None)
    assert world.portal.authorize(client, LAN) is AuthorizationOutcome.NO_RELAYS
    assert any(isinstance(m, NoRelays) for m in world.gateway.outbound)
    assert world.gateway.state.peer(client.client_id) is None


def test_tun_packets_for_unknown_addresses_are_counted() -> None:
    world = build_gateway_world()
    world.gateway.from_resource(ipv4_udp("172.20.0.10", "100.64.7.7", b"nobody"))
    world.gateway.from_resource(b"\x45")
    assert world.gateway.state.drops[GatewayDropReason.NO_PEER_FOR_ADDRESS] == 1
    assert world.gateway.state.drops[GatewayDropReason.MALFORMED_TUN_PACKET] == 1
