"""DNS resources through GatewayState in the simulated network (docs/protocol.md §3.4).

A client authorized for a DNS resource announces proxy IPs with ``assigned_ips``; the gateway asks its driver to
resolve the domain (here a dict stands in for DNS), answers ``domain_status`` and NATs the proxy IPs to the records.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, ip_address

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from dataplane import p2p_control
from dataplane.dns_nat import IpAddress, NatDropReason
from dataplane.gateway import GatewayDropReason, ResolveDomain
from tests.sim.gateway import DNS, PROXY4, PROXY6, GatewayWorld, SimClient, build_gateway_world
from tests.sim.test_gateway_state import connected_client, send


def world_with_records(records: dict[str, list[str]]) -> tuple[GatewayWorld, list[ResolveDomain]]:
    world = build_gateway_world()
    asked: list[ResolveDomain] = []

    def resolve(request: ResolveDomain) -> Sequence[IpAddress] | None:
        asked.append(request)
        found = records.get(request.domain)
        return None if found is None else [ip_address(a) for a in found]

    world.gateway.resolver = resolve
    return world, asked


def statuses(client: SimClient) -> list[p2p_control.DomainStatus]:
    found = []
    for _, packet in client.peer.received:
        message = p2p_control.parse(packet)
        if message is not None and message.event == p2p_control.DOMAIN_STATUS_EVENT:
            status = p2p_control.parse_domain_status(message.body)
            assert status is not None
            found.append(status)
    return found


def assign(world: GatewayWorld, client: SimClient, domain: str, proxies: Sequence[IpAddress]) -> None:
    send(world, client, p2p_control.assigned_ips(DNS["id"], domain, proxies))


def test_assigned_ips_are_resolved_and_traffic_is_translated_both_ways() -> None:
    world, asked = world_with_records({"app.corp.example": ["172.20.0.10", "fd99::10"]})
    client = connected_client(world, DNS)
    assign(world, client, "app.corp.example", PROXY4 + PROXY6)
    assert [a.domain for a in asked] == ["app.corp.example"]
    assert statuses(client) == [p2p_control.DomainStatus(DNS["id"], "app.corp.example", True)]
    send(world, client, bytes(IP(src=client.ipv4, dst=str(PROXY4[0])) / UDP(sport=4000, dport=53) / b"q"))
    send(world, client, bytes(IPv6(src=client.ipv6, dst=str(PROXY6[1])) / UDP(sport=4001, dport=53) / b"q6"))
    arrived = [p for _, p in world.gateway.to_tun]
    assert IP(arrived[0]).dst == "172.20.0.10" and IPv6(arrived[1]).dst == "fd99::10"
    client.peer.received.clear()
    world.gateway.from_resource(bytes(IP(src="172.20.0.10", dst=client.ipv4) / UDP(sport=53, dport=4000) / b"a"))
    world.net.run_for(0.5)
    answers = [IP(p) for _, p in client.peer.received]
    assert [(a.src, a[UDP].dport) for a in answers] == [(str(PROXY4[0]), 4000)]


def test_unauthorized_domain_or_resource_is_inactive_without_resolving() -> None:
    world, asked = world_with_records({"app.other.example": ["172.20.0.10"]})
    client = connected_client(world, DNS)
    assign(world, client, "app.other.example", PROXY4)
    send(world, client, p2p_control.assigned_ips("res-unknown", "app.corp.example", PROXY4))
    assert asked == []
    assert [s.active for s in statuses(client)] == [False, False]
    # Proxy IPs outside the proxy range are refused outright.
    send(world, client, p2p_control.assigned_ips(DNS["id"], "app.corp.example", [IPv4Address("172.20.0.1")] * 4))
    assert world.gateway.state.drops[GatewayDropReason.MALFORMED_CONTROL_MESSAGE] == 1


def test_failed_resolution_is_inactive_and_no_records_is_active_but_unreachable() -> None:
    world, _ = world_with_records({"empty.corp.example": []})
    client = connected_client(world, DNS)
    assign(world, client, "fails.corp.example", PROXY4)
    assign(world, client, "empty.corp.example", PROXY4)
    assert [s.active for s in statuses(client)] == [False, True]
    client.peer.received.clear()
    send(world, client, bytes(IP(src=client.ipv4, dst=str(PROXY4[0])) / UDP(sport=4000, dport=53)))
    assert world.gateway.to_tun == []
    replies = [IP(p) for _, p in client.peer.received]
    assert [(r.proto, bytes(r.payload)[:2]) for r in replies] == [(1, b"\x03\x00")]  # ICMP network unreachable
    assert world.gateway.state.drops[NatDropReason.NO_RECORDS] == 1


def test_changed_records_are_picked_up_on_the_next_assigned_ips() -> None:
    records = {"app.corp.example": ["172.20.0.10"]}
    world, asked = world_with_records(records)
    client = connected_client(world, DNS)
    assign(world, client, "app.corp.example", PROXY4)
    records["app.corp.example"] = ["172.20.0.99"]
    assign(world, client, "app.corp.example", PROXY4)
    assert len(asked) == 2
    send(world, client, bytes(IP(src=client.ipv4, dst=str(PROXY4[0])) / UDP(sport=4000, dport=53)))
    assert [IP(p).dst for _, p in world.gateway.to_tun] == ["172.20.0.99"]


def test_renumbered_proxy_ips_reset_the_client_nat() -> None:
    records = {"a.corp.example": ["172.20.0.10"], "b.corp.example": ["172.20.0.20"]}
    world, _ = world_with_records(records)
    client = connected_client(world, DNS)
    assign(world, client, "a.corp.example", PROXY4)
    send(world, client, bytes(IP(src=client.ipv4, dst=str(PROXY4[0])) / UDP(sport=4000, dport=53)))
    assign(world, client, "b.corp.example", PROXY4)  # the same proxy IPs now stand for another domain
    world.gateway.to_tun.clear()
    send(world, client, bytes(IP(src=client.ipv4, dst=str(PROXY4[0])) / UDP(sport=4000, dport=53)))
    assert [IP(p).dst for _, p in world.gateway.to_tun] == ["172.20.0.20"]


def test_filters_of_the_dns_resource_apply_to_its_proxy_ips() -> None:
    world, _ = world_with_records({"app.corp.example": ["172.20.0.10"]})
    client = connected_client(world, DNS)
    assign(world, client, "app.corp.example", PROXY4)
    client.peer.received.clear()
    send(world, client, bytes(IP(src=client.ipv4, dst=str(PROXY4[0])) / UDP(sport=4000, dport=9001)))
    assert world.gateway.to_tun == []
    replies = [IP(p) for _, p in client.peer.received]
    assert [bytes(r.payload)[:2] for r in replies] == [b"\x03\x0d"]  # administratively prohibited
