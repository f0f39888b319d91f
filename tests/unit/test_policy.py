"""dataplane.policy.ClientPolicy: docs/protocol.md §3.3 case by case; packets are built and replies read with scapy."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Packet, Raw

from dataplane.base import DropCounter
from dataplane.policy import (
    CLASSIFICATION_CACHE_SIZE,
    MAX_GRANTS_PER_CLIENT,
    ClientPolicy,
    Decision,
    PolicyDropReason,
    is_internet_excluded,
)
from protocol.messages import CidrResource, DnsResource, IcmpFilter, InternetResource, PortFilter

CLIENT4, CLIENT6 = "100.64.0.7", "fd00:2021:1111::7"
GATEWAY4, GATEWAY6 = "100.64.0.1", "fd00:2021:1111::1"
OTHER_CLIENT4, OTHER_CLIENT6 = "100.64.0.9", "fd00:2021:1111::9"
NOW = 1_000_000.0

R = PolicyDropReason


def policy(drops: DropCounter | None = None) -> ClientPolicy:
    return ClientPolicy(
        IPv4Address(CLIENT4), IPv6Address(CLIENT6), IPv4Address(GATEWAY4), IPv6Address(GATEWAY6), drops=drops
    )


def cidr(rid: str, address: str, *filters: PortFilter | IcmpFilter) -> CidrResource:
    return CidrResource.model_validate({"id": rid, "type": "cidr", "address": address, "filters": list(filters)})


def tcp(start: int, end: int | None = None) -> PortFilter:
    return PortFilter(protocol="tcp", port_range_start=start, port_range_end=start if end is None else end)


def udp(start: int, end: int | None = None) -> PortFilter:
    return PortFilter(protocol="udp", port_range_start=start, port_range_end=start if end is None else end)


ICMP_FILTER = IcmpFilter(protocol="icmp")
INTERNET = InternetResource(id="ffff-internet", type="internet")


def out4(dst: str, layer: Packet, src: str = CLIENT4) -> bytes:
    return bytes(IP(src=src, dst=dst) / layer)


def out6(dst: str, layer: Packet, src: str = CLIENT6) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / layer)


def in4(src: str, layer: Packet, dst: str = CLIENT4) -> bytes:
    return bytes(IP(src=src, dst=dst) / layer)


def in6(src: str, layer: Packet, dst: str = CLIENT6) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / layer)


def refused(decision: Decision, reason: PolicyDropReason) -> Decision:
    assert not decision.allowed
    assert decision.reason is reason
    return decision


def assert_reply(
    decision: Decision, packet: bytes, v4_type_code: tuple[int, int], v6_type_code: tuple[int, int]
) -> None:
    assert decision.icmp_reply is not None
    reply = decision.icmp_reply
    sent: Packet
    got: Packet
    if packet[0] >> 4 == 4:
        sent, got = IP(packet), IP(reply)
        assert (got[ICMP].type, got[ICMP].code) == v4_type_code
        assert reply[28:] == packet
    else:
        sent, got = IPv6(packet), IPv6(reply)
        assert (got[ICMPv6DestUnreach].type, got[ICMPv6DestUnreach].code) == v6_type_code
        assert reply[48:] == packet
    assert got.src == sent.dst and got.dst == sent.src


def prohibited(decision: Decision, packet: bytes) -> None:
    assert_reply(decision, packet, (3, 13), (1, 1))


def network_unreachable(decision: Decision, packet: bytes) -> None:
    assert_reply(decision, packet, (3, 0), (1, 3))


# --- client → resource ------------------------------------------------------------------------------------------------


def test_cidr_grant_without_filters_permits_everything_inside_and_nothing_outside() -> None:
    p = policy()
    p.grant(cidr("r1", "172.20.0.0/16"), None)
    for layer in (TCP(dport=22), UDP(dport=53), ICMP(type=8), ICMP(type=13), Raw(b"gre")):
        decision = p.from_client(out4("172.20.9.9", layer), NOW)
        assert decision.allowed and decision.resource_id == "r1" and decision.icmp_reply is None
    packet = out4("172.21.0.1", TCP(dport=22))
    prohibited(refused(p.from_client(packet, NOW), R.NOT_AUTHORIZED), packet)


def test_ipv6_cidr_grant() -> None:
    p = policy()
    p.grant(cidr("r6", "2001:db8:1::/48", tcp(443)), None)
    assert p.from_client(out6("2001:db8:1::5", TCP(dport=443)), NOW).allowed
    packet = out6("2001:db8:1::5", TCP(dport=80))
    prohibited(refused(p.from_client(packet, NOW), R.FILTERED), packet)
    packet = out6("2001:db8:2::5", TCP(dport=443))
    prohibited(refused(p.from_client(packet, NOW), R.NOT_AUTHORIZED), packet)
    # An IPv4 grant never covers IPv6 and vice versa.
    assert not p.from_client(out4("172.20.0.1", TCP(dport=443)), NOW).allowed


def test_filters_are_unions_of_ranges_and_an_icmp_flag() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(80, 90), tcp(85, 443), udp(53)), None)
    assert p.from_client(out4("10.1.1.1", TCP(dport=80)), NOW).allowed
    assert p.from_client(out4("10.1.1.1", TCP(dport=443)), NOW).allowed
    refused(p.from_client(out4("10.1.1.1", TCP(dport=444)), NOW), R.FILTERED)
    refused(p.from_client(out4("10.1.1.1", TCP(dport=53)), NOW), R.FILTERED)
    assert p.from_client(out4("10.1.1.1", UDP(dport=53)), NOW).allowed
    refused(p.from_client(out4("10.1.1.1", UDP(dport=80)), NOW), R.FILTERED)
    refused(p.from_client(out4("10.1.1.1", ICMP(type=8)), NOW), R.FILTERED)
    refused(p.from_client(out4("10.1.1.1", Raw(b"x" * 8)), NOW), R.FILTERED)  # protocol 0: other protocols refused
    p.grant(cidr("r2", "10.0.0.0/8", ICMP_FILTER), None)
    assert p.from_client(out4("10.1.1.1", ICMP(type=8)), NOW).allowed
    assert p.from_client(out4("10.1.1.1", ICMP(type=13)), NOW).allowed  # any ICMP type, not only echo
    assert p.from_client(out6("2001:db8::1", ICMPv6EchoRequest()), NOW).reason is R.NOT_AUTHORIZED


def test_filter_uses_destination_port_from_client_and_source_port_towards_it() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(443)), None)
    assert p.from_client(out4("10.0.0.1", TCP(sport=50000, dport=443)), NOW).allowed
    refused(p.from_client(out4("10.0.0.1", TCP(sport=443, dport=50000)), NOW), R.FILTERED)
    assert p.to_client(in4("10.0.0.1", TCP(sport=443, dport=50000)), NOW).allowed
    refused(p.to_client(in4("10.0.0.1", TCP(sport=50000, dport=443)), NOW), R.SOURCE_FILTERED)


def test_best_entry_permitting_filter_then_longer_prefix_then_greater_id() -> None:
    p = policy()
    p.grant(cidr("a-wide", "10.0.0.0/8", tcp(80)), None)
    p.grant(cidr("b-narrow", "10.1.0.0/16", tcp(443)), None)
    # The narrower entry does not permit port 80; the wider one does and wins.
    assert p.from_client(out4("10.1.0.1", TCP(dport=80)), NOW).resource_id == "a-wide"
    assert p.from_client(out4("10.1.0.1", TCP(dport=443)), NOW).resource_id == "b-narrow"
    refused(p.from_client(out4("10.2.0.1", TCP(dport=443)), NOW), R.FILTERED)
    p.grant(cidr("c-narrow", "10.1.0.0/16", tcp(80, 443)), None)
    assert p.from_client(out4("10.1.0.1", TCP(dport=80)), NOW).resource_id == "c-narrow"  # longer prefix
    assert p.from_client(out4("10.1.0.1", TCP(dport=443)), NOW).resource_id == "c-narrow"  # same prefix: greater id


def test_spoofed_source_is_refused_and_answered_through_this_tunnel() -> None:
    drops = DropCounter()
    p = policy(drops)
    p.grant(cidr("r1", "0.0.0.0/0"), None)
    p.grant(cidr("r6", "::/0"), None)
    for packet in (
        out4("8.8.8.8", UDP(dport=53), src="100.64.0.99"),
        out4("8.8.8.8", UDP(dport=53), src="192.0.2.1"),
        out6("2001:db8::1", UDP(dport=53), src=OTHER_CLIENT6),
    ):
        prohibited(refused(p.from_client(packet, NOW), R.SPOOFED_SOURCE), packet)
    # No ICMP error may be addressed to the unspecified address.
    assert refused(p.from_client(out6("2001:db8::1", UDP(), src="::"), NOW), R.SPOOFED_SOURCE).icmp_reply is None
    assert drops[R.SPOOFED_SOURCE] == 4


def test_no_client_to_client_even_with_the_internet_resource_or_a_covering_grant() -> None:
    p = policy()
    p.grant(INTERNET, None)
    p.grant(cidr("r1", "100.64.0.0/10"), None)
    for packet in (out4(OTHER_CLIENT4, ICMP(type=8)), out6(OTHER_CLIENT6, ICMPv6EchoRequest())):
        prohibited(refused(p.from_client(packet, NOW), R.CLIENT_TO_CLIENT), packet)


def test_gateway_own_address_is_always_reachable_and_follows_init() -> None:
    p = policy()
    assert p.from_client(out4(GATEWAY4, UDP(dport=53535)), NOW) == Decision(True)
    assert p.from_client(out6(GATEWAY6, TCP(dport=53535)), NOW).allowed
    p.set_gateway_addresses(IPv4Address("100.64.0.2"), None)
    refused(p.from_client(out4(GATEWAY4, UDP(dport=53535)), NOW), R.CLIENT_TO_CLIENT)
    assert p.from_client(out4("100.64.0.2", UDP(dport=53535)), NOW).allowed
    refused(p.from_client(out6(GATEWAY6, UDP(dport=53535)), NOW), R.CLIENT_TO_CLIENT)


def test_icmp_errors_and_multicast_from_the_client_are_dropped_silently() -> None:
    p = policy()
    p.grant(cidr("r1", "0.0.0.0/0"), None)
    p.grant(cidr("r6", "::/0"), None)
    quote4 = IP(src="8.8.8.8", dst=CLIENT4) / UDP(sport=53, dport=5000)
    quote6 = IPv6(src="2001:db8::1", dst=CLIENT6) / UDP(sport=53, dport=5000)
    for packet in (
        out4("8.8.8.8", ICMP(type=3, code=3) / quote4),
        out4("8.8.8.8", ICMP(type=11) / quote4),
        out6("2001:db8::1", ICMPv6DestUnreach(code=4) / quote6),
    ):
        decision = refused(p.from_client(packet, NOW), R.ICMP_ERROR_FROM_CLIENT)
        assert decision.icmp_reply is None
    for packet in (out4("224.0.0.251", UDP(dport=5353)), out6("ff02::fb", UDP(dport=5353))):
        assert refused(p.from_client(packet, NOW), R.MULTICAST_DESTINATION).icmp_reply is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x45\x00",
        bytes(IP(src=CLIENT4, dst="10.0.0.1") / TCP())[:30],  # total length beyond the buffer
        bytes(IP(src=CLIENT4, dst="10.0.0.1", proto=6, len=30) / Raw(b"x" * 10)),  # TCP header cut short
        bytes(IP(src=CLIENT4, dst="10.0.0.1", proto=17, len=24) / Raw(b"x" * 4)),
        bytes(IP(src=CLIENT4, dst="10.0.0.1", proto=1, len=24) / Raw(b"x" * 4)),
        bytes(IPv6(src=CLIENT6, dst="2001:db8::1", nh=6, plen=8) / Raw(b"x" * 8)),
        b"\x60" + bytes(38),
        b"\x70" + bytes(60),
    ],
)
def test_malformed_packets_are_dropped_in_both_directions(data: bytes) -> None:
    p = policy()
    p.grant(cidr("r1", "0.0.0.0/0"), None)
    assert refused(p.from_client(data, NOW), R.MALFORMED_PACKET).icmp_reply is None
    refused(p.to_client(data, NOW), R.MALFORMED_PACKET)


def test_non_initial_fragments_pass_only_permit_all_grants() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(0, 65535), udp(0, 65535), ICMP_FILTER), None)
    p.grant(cidr("r2", "192.168.0.0/16"), None)
    fragment = bytes(IP(src=CLIENT4, dst="10.0.0.1", proto=17, frag=100) / Raw(b"x" * 16))
    refused(p.from_client(fragment, NOW), R.FILTERED)
    assert p.from_client(bytes(IP(src=CLIENT4, dst="192.168.0.1", proto=17, frag=100) / Raw(b"x")), NOW).allowed


def test_internet_resource_and_its_exclusions() -> None:
    p = policy()
    p.grant(INTERNET, None)
    p.grant(cidr("r1", "10.0.0.0/8", tcp(22)), None)
    assert p.from_client(out4("8.8.8.8", UDP(dport=53)), NOW).resource_id == INTERNET.id
    assert p.from_client(out6("2606:4700::1111", TCP(dport=443)), NOW).resource_id == INTERNET.id
    for dst in ("10.0.0.1", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.1.1", "240.0.0.1"):
        packet = out4(dst, TCP(dport=22))
        network_unreachable(refused(p.from_client(packet, NOW), R.INTERNET_EXCLUDED), packet)
    for dst in ("::1", "::ffff:8.8.8.8", "fd12::1", "fe80::1"):
        packet = out6(dst, TCP(dport=22))
        network_unreachable(refused(p.from_client(packet, NOW), R.INTERNET_EXCLUDED), packet)
    # 255.255.255.255 is excluded but no ICMP error may be sent about a broadcast.
    assert refused(p.from_client(out4("255.255.255.255", UDP(dport=67)), NOW), R.INTERNET_EXCLUDED).icmp_reply is None
    assert is_internet_excluded(ip_address("240.0.0.1")) and not is_internet_excluded(ip_address("1.1.1.1"))


def test_dns_proxy_addresses_use_the_routing_table_and_are_not_translated_yet() -> None:
    p = policy()
    p.grant(INTERNET, None)
    p.grant(DnsResource(id="d1", type="dns", address="*.corp.example"), None)
    packet = out4("100.96.0.5", TCP(dport=443))
    prohibited(refused(p.from_client(packet, NOW), R.NOT_AUTHORIZED), packet)
    p.grant(cidr("r1", "100.96.0.0/11"), None)
    network_unreachable(refused(p.from_client(packet, NOW), R.DNS_PROXY_UNTRANSLATED), packet)
    packet6 = out6("fd00:2021:1111:8000::5", TCP(dport=443))
    prohibited(refused(p.from_client(packet6, NOW), R.NOT_AUTHORIZED), packet6)
    assert p.resource_ids == frozenset({INTERNET.id, "d1", "r1"})


# --- changes take effect on the next packet ---------------------------------------------------------------------------


def test_expiry_is_exact_before_expire_runs_and_survives_clock_steps() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8"), NOW + 10)
    p.grant(cidr("r2", "10.0.0.0/8", tcp(22)), NOW + 20)
    p.grant(cidr("r3", "192.168.0.0/16"), None)
    packet = out4("10.0.0.1", TCP(dport=80))
    assert p.from_client(packet, NOW + 9.999).resource_id == "r1"
    refused(p.from_client(packet, NOW + 10), R.FILTERED)
    assert p.from_client(out4("10.0.0.1", TCP(dport=22)), NOW + 19).resource_id == "r2"
    refused(p.from_client(out4("10.0.0.1", TCP(dport=22)), NOW + 20), R.NOT_AUTHORIZED)
    refused(p.to_client(in4("10.0.0.1", TCP(sport=22)), NOW + 20), R.SOURCE_NOT_AUTHORIZED)
    assert p.from_client(packet, NOW).allowed  # the wall clock stepped back: r1 is live again
    assert p.next_expiry() == NOW + 10
    assert p.expire(NOW + 15) == ["r1"]
    assert p.next_expiry() == NOW + 20
    assert p.expire(NOW + 15) == []
    assert p.expire(NOW + 20) == ["r2"]
    assert p.next_expiry() is None and not p.is_empty
    assert p.revoke("r3") and p.is_empty and not p.revoke("r3")


def test_past_expiry_permits_nothing() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8"), NOW - 1)
    refused(p.from_client(out4("10.0.0.1", UDP()), NOW), R.NOT_AUTHORIZED)
    assert p.expire(NOW) == ["r1"]


def test_revoke_and_narrowing_take_effect_on_the_next_packet() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8"), None)
    packet = out4("10.0.0.1", TCP(dport=80))
    assert p.from_client(packet, NOW).allowed and p.to_client(in4("10.0.0.1", TCP(sport=80)), NOW).allowed
    assert p.update_filters(cidr("r1", "10.0.0.0/8", tcp(443)))
    refused(p.from_client(packet, NOW), R.FILTERED)
    refused(p.to_client(in4("10.0.0.1", TCP(sport=80)), NOW), R.SOURCE_FILTERED)
    # Only the filters change: an address in a resource_updated is not applied.
    assert p.update_filters(cidr("r1", "11.0.0.0/8"))
    assert p.from_client(packet, NOW).allowed
    refused(p.from_client(out4("11.0.0.1", TCP(dport=80)), NOW), R.NOT_AUTHORIZED)
    assert p.revoke("r1")
    refused(p.from_client(packet, NOW), R.NOT_AUTHORIZED)


def test_type_changes_are_refused_and_unknown_updates_ignored() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(80)), None)
    dns = DnsResource(id="r1", type="dns", address="x.example")
    assert not p.update_filters(dns)
    assert not p.update_filters(cidr("nope", "10.0.0.0/8"))
    assert not p.grant(dns, NOW + 5)  # refused, but the expiry refresh still applies
    assert p.next_expiry() == NOW + 5
    assert p.from_client(out4("10.0.0.1", TCP(dport=80)), NOW).allowed
    assert p.grant(INTERNET, None) and p.update_filters(INTERNET)


def test_regrant_refreshes_expiry_and_filters_and_keeps_the_address() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(80)), NOW + 5)
    assert p.grant(cidr("r1", "11.0.0.0/8", tcp(443)), None)
    assert p.next_expiry() is None
    assert p.from_client(out4("10.0.0.1", TCP(dport=443)), NOW + 100).allowed
    refused(p.from_client(out4("11.0.0.1", TCP(dport=443)), NOW + 100), R.NOT_AUTHORIZED)


def test_init_resync_retain_and_set_expiry() -> None:
    p = policy()
    for rid in ("a", "b", "c"):
        p.grant(cidr(rid, "10.0.0.0/8"), None)
    assert sorted(p.retain(["a", "c", "unknown"])) == ["b"]
    assert p.set_expiry("a", NOW) and not p.set_expiry("b", NOW)
    assert p.from_client(out4("10.0.0.1", UDP()), NOW).resource_id == "c"
    assert p.resource_ids == frozenset({"a", "c"})


def test_bounds() -> None:
    p = policy()
    for i in range(MAX_GRANTS_PER_CLIENT):
        assert p.grant(cidr(f"r{i}", "10.0.0.0/8"), None)
    assert not p.grant(cidr("one-more", "10.0.0.0/8"), None)
    assert p.grant(cidr("r0", "10.0.0.0/8", tcp(1)), None)  # refreshing a held grant is not growth
    q = policy()
    q.grant(cidr("r1", "10.0.0.0/8"), None)
    for port in range(CLASSIFICATION_CACHE_SIZE + 50):
        assert q.from_client(out4("10.0.0.1", UDP(dport=port)), NOW).allowed
    assert len(q._cache) <= CLASSIFICATION_CACHE_SIZE


# --- resource → client ------------------------------------------------------------------------------------------------


def test_to_client_checks() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(443)), None)
    p.grant(cidr("r6", "2001:db8::/32", tcp(443)), None)
    assert p.to_client(in4("10.0.0.1", TCP(sport=443)), NOW).resource_id == "r1"
    assert p.to_client(in6("2001:db8::1", TCP(sport=443)), NOW).resource_id == "r6"
    assert p.to_client(in4(GATEWAY4, UDP(sport=53535)), NOW) == Decision(True)
    assert p.to_client(in6(GATEWAY6, UDP(sport=53535)), NOW).allowed
    refused(p.to_client(in4("10.0.0.1", TCP(sport=443), dst=OTHER_CLIENT4), NOW), R.WRONG_DESTINATION)
    refused(p.to_client(in6("2001:db8::1", TCP(sport=443), dst=OTHER_CLIENT6), NOW), R.WRONG_DESTINATION)
    refused(p.to_client(in4(OTHER_CLIENT4, TCP(sport=443)), NOW), R.SOURCE_IN_TUNNEL_RANGE)
    refused(p.to_client(in6(OTHER_CLIENT6, TCP(sport=443)), NOW), R.SOURCE_IN_TUNNEL_RANGE)
    refused(p.to_client(in4("192.0.2.1", TCP(sport=443)), NOW), R.SOURCE_NOT_AUTHORIZED)
    refused(p.to_client(in4("10.0.0.1", ICMP(type=0)), NOW), R.SOURCE_FILTERED)
    refused(p.to_client(in6("2001:db8::1", ICMPv6EchoReply()), NOW), R.SOURCE_FILTERED)
    assert p.to_client(in4("10.0.0.1", TCP(sport=443)), NOW).icmp_reply is None


QUOTED_FLOWS: list[Callable[[], Packet]] = [
    lambda: ICMP(type=3, code=3) / IP(src=CLIENT4, dst="10.0.0.1") / UDP(sport=5000, dport=53),
    lambda: ICMP(type=11) / IP(src=CLIENT4, dst="10.0.0.1") / TCP(sport=5000, dport=22),
    lambda: ICMP(type=3, code=4) / IP(src=CLIENT4, dst="10.0.0.1") / ICMP(type=8, id=1),
]


@pytest.mark.parametrize("make", QUOTED_FLOWS)
def test_icmp_errors_towards_the_client_pass_regardless_of_filters(make: Callable[[], Packet]) -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(443)), None)
    # Even from a router outside every granted network.
    assert p.to_client(in4("192.0.2.1", make()), NOW) == Decision(True)


def test_icmpv6_errors_towards_the_client() -> None:
    p = policy()
    p.grant(cidr("r6", "2001:db8::/32", tcp(443)), None)
    quote = IPv6(src=CLIENT6, dst="2001:db8::1") / UDP(sport=5000, dport=53)
    assert p.to_client(in6("2001:db8::99", ICMPv6DestUnreach() / quote), NOW).allowed
    assert p.to_client(in6("2001:db8::99", ICMPv6EchoRequest() / Raw()), NOW).reason is R.SOURCE_FILTERED


@pytest.mark.parametrize(
    "layer",
    [
        ICMP(type=3) / Raw(b"not an ip header at all..."),
        ICMP(type=3) / IP(src=CLIENT4, dst="10.0.0.1", proto=47) / Raw(b"gre!"),  # not a flow Firezone relates
        ICMP(type=3) / IP(src=CLIENT4, dst="10.0.0.1") / ICMP(type=0),  # quoted echo reply
        ICMP(type=12) / IP(src=CLIENT4, dst="10.0.0.1") / UDP(),  # parameter problem: not a passing error type
    ],
)
def test_icmp_errors_without_a_known_flow_are_filtered_as_plain_icmp(layer: Packet) -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8", tcp(443)), None)
    refused(p.to_client(in4("10.0.0.1", layer), NOW), R.SOURCE_FILTERED)
    p.grant(cidr("r2", "10.0.0.0/8", ICMP_FILTER), None)
    assert p.to_client(in4("10.0.0.1", layer), NOW).resource_id == "r2"


def test_to_client_with_the_internet_resource() -> None:
    p = policy()
    p.grant(INTERNET, None)
    assert p.to_client(in4("1.1.1.1", UDP(sport=53)), NOW).resource_id == INTERNET.id
    refused(p.to_client(in4("192.168.0.1", UDP(sport=53)), NOW), R.SOURCE_INTERNET_EXCLUDED)
    refused(p.to_client(in6("fe80::1", UDP(sport=53)), NOW), R.SOURCE_INTERNET_EXCLUDED)


# --- every reason is reachable and counted ----------------------------------------------------------------------------

_ALL_OPEN = ("r4", "0.0.0.0/0")
REASON_EXAMPLES: dict[PolicyDropReason, tuple[str, bytes]] = {
    R.MALFORMED_PACKET: ("from", b"\x45"),
    R.MULTICAST_DESTINATION: ("from", out4("239.1.1.1", UDP())),
    R.ICMP_ERROR_FROM_CLIENT: ("from", out4("8.8.8.8", ICMP(type=11) / IP(src="8.8.8.8", dst=CLIENT4) / UDP())),
    R.SPOOFED_SOURCE: ("from", out4("8.8.8.8", UDP(), src="1.2.3.4")),
    R.CLIENT_TO_CLIENT: ("from", out4(OTHER_CLIENT4, UDP())),
    R.NOT_AUTHORIZED: ("from", out6("2001:db8::1", UDP())),
    R.FILTERED: ("from", out4("8.8.8.8", TCP(dport=1))),
    R.INTERNET_EXCLUDED: ("from", out6("fd99::1", UDP(dport=53))),
    R.DNS_PROXY_UNTRANSLATED: ("from", out4("100.96.1.1", UDP(dport=53))),
    R.WRONG_DESTINATION: ("to", in4("8.8.8.8", UDP(sport=53), dst="100.64.0.8")),
    R.SOURCE_IN_TUNNEL_RANGE: ("to", in4(OTHER_CLIENT4, UDP(sport=53))),
    R.SOURCE_NOT_AUTHORIZED: ("to", in6("2001:db8::1", UDP(sport=53))),
    R.SOURCE_FILTERED: ("to", in4("8.8.8.8", TCP(sport=1))),
    R.SOURCE_INTERNET_EXCLUDED: ("to", in6("fd99::1", UDP(sport=53))),
}


def test_every_reason_has_an_example() -> None:
    assert set(REASON_EXAMPLES) == set(PolicyDropReason)


@pytest.mark.parametrize("reason", list(PolicyDropReason), ids=lambda r: r.value)
def test_every_reason_is_reached_and_counted(reason: PolicyDropReason) -> None:
    drops = DropCounter()
    p = policy(drops)
    p.grant(cidr("r4", "0.0.0.0/0", udp(53)), None)
    if reason in (R.INTERNET_EXCLUDED, R.SOURCE_INTERNET_EXCLUDED):
        p.grant(INTERNET, None)
    direction, packet = REASON_EXAMPLES[reason]
    decision = p.from_client(packet, NOW) if direction == "from" else p.to_client(packet, NOW)
    refused(decision, reason)
    assert drops[reason] == 1 and drops.total() == 1


def test_buffers_of_any_kind_and_client_renumbering() -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8"), None)
    packet = out4("10.0.0.1", UDP(dport=53))
    assert p.from_client(bytearray(packet), NOW).allowed
    assert p.from_client(memoryview(packet), NOW).allowed
    assert p.to_client(memoryview(in4("10.0.0.1", UDP(sport=53))), NOW).allowed
    assert (p.client_ipv4, p.client_ipv6) == (IPv4Address(CLIENT4), IPv6Address(CLIENT6))
    p.set_client_addresses(IPv4Address("100.64.0.8"), IPv6Address("fd00:2021:1111::8"))
    refused(p.from_client(packet, NOW), R.SPOOFED_SOURCE)
    assert p.from_client(out4("10.0.0.1", UDP(dport=53), src="100.64.0.8"), NOW).allowed
    refused(p.to_client(in4("10.0.0.1", UDP(sport=53)), NOW), R.WRONG_DESTINATION)
