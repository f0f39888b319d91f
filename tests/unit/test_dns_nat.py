"""The per-client DNS-resource NAT (docs/protocol.md §3.4) on a fake clock, translations checked against scapy.

Lifetimes pinned here (seconds since the last packet either way unless said):
* TCP 2 h 4 min: test_tcp_session_lives_2h4m_after_its_last_packet
* UDP 2 min: test_udp_and_icmp_sessions_live_two_minutes
* ICMP echo 2 min: test_udp_and_icmp_sessions_live_two_minutes
* never answered, 60 s: test_unanswered_session_ends_after_60_seconds
* FIN both ways, +5 s: test_fin_both_ways_ends_the_session_5_seconds_later
* RST, at once: test_rst_ends_the_session_at_once
* expired sessions remembered, late replies dropped: test_late_replies_to_an_expired_session_are_dropped
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPerror6, IPv6
from scapy.packet import Raw

from dataplane import dns_nat
from dataplane.dns_nat import DnsNat, InboundVerdict, IpAddress, NatDropReason, is_proxy_address, is_proxy_ip

CLIENT4, CLIENT6 = "100.64.0.7", "fd00:2021:1111::7"
PROXY4: list[IpAddress] = [IPv4Address(f"100.96.0.{i}") for i in range(1, 5)]
PROXY6: list[IpAddress] = [IPv6Address(f"fd00:2021:1111:8000::{i}") for i in range(1, 5)]
REAL4: list[IpAddress] = [IPv4Address("172.20.0.10"), IPv4Address("172.20.0.11")]
REAL6: list[IpAddress] = [IPv6Address("fd99::10")]


def nat_with_records() -> DnsNat:
    nat = DnsNat()
    installed, reset = nat.setup("App.Example.com", "r1", PROXY4 + PROXY6, REAL4 + REAL6)
    assert installed and not reset
    return nat


def checksums_valid(raw: bytes) -> bool:
    """scapy recomputes every checksum from scratch: equal bytes mean ours were right."""
    packet = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    for layer in (IP, TCP, UDP, ICMP):
        if layer in packet:
            del packet[layer].chksum
    for layer6 in (ICMPv6EchoRequest, ICMPv6EchoReply, ICMPv6DestUnreach):
        if layer6 in packet:
            del packet[layer6].cksum
    if UDP in packet and raw[0] >> 4 == 6:
        del packet[UDP].chksum
    return bytes(packet.__class__(bytes(packet))) == raw


def test_round_robin_over_records_per_family_and_none_without_records() -> None:
    nat = nat_with_records()
    reals = [nat.translation(p).real for p in PROXY4]  # type: ignore[union-attr]
    assert reals == [REAL4[0], REAL4[1], REAL4[0], REAL4[1]]
    assert all(nat.translation(p).real == REAL6[0] for p in PROXY6)  # type: ignore[union-attr]
    only_v4 = DnsNat()
    only_v4.setup("a.example", "r1", PROXY4 + PROXY6, REAL4)
    assert only_v4.translation(PROXY6[0]).real is None  # type: ignore[union-attr]
    assert sorted(map(str, only_v4.proxy_ips("r1"))) == sorted(map(str, PROXY4 + PROXY6))


def test_tcp_outbound_rewrites_destination_keeps_port_and_checksums() -> None:
    nat = nat_with_records()
    packet = bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / TCP(sport=40000, dport=443, flags="S") / Raw(b"x" * 10))
    out = nat.translate_outbound(packet, 0.0).packet
    assert out is not None
    parsed = IP(out)
    assert (parsed.src, parsed.dst, parsed[TCP].sport, parsed[TCP].dport) == (CLIENT4, str(REAL4[0]), 40000, 443)
    assert checksums_valid(out)
    reply = bytes(IP(src=str(REAL4[0]), dst=CLIENT4) / TCP(sport=443, dport=40000, flags="SA"))
    back = nat.translate_inbound(reply, 1.0)
    assert back.verdict is InboundVerdict.TRANSLATED and back.packet is not None
    parsed = IP(back.packet)
    assert (parsed.src, parsed[TCP].sport, parsed[TCP].dport) == (str(PROXY4[0]), 443, 40000)
    assert checksums_valid(back.packet)


def test_port_taken_by_another_inside_key_gets_the_next_free_one() -> None:
    nat = nat_with_records()
    # PROXY4[0] and PROXY4[2] both map to REAL4[0]: the same client port must not collide outside.
    first = nat.translate_outbound(bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / UDP(sport=5000, dport=53)), 0.0)
    second = nat.translate_outbound(bytes(IP(src=CLIENT4, dst=str(PROXY4[2])) / UDP(sport=5000, dport=53)), 0.0)
    assert first.packet is not None and second.packet is not None
    assert IP(first.packet)[UDP].sport == 5000 and IP(second.packet)[UDP].sport == 5001
    assert checksums_valid(second.packet)
    reply = nat.translate_inbound(bytes(IP(src=str(REAL4[0]), dst=CLIENT4) / UDP(sport=53, dport=5001) / b"ok"), 1)
    assert reply.packet is not None
    assert (IP(reply.packet).src, IP(reply.packet)[UDP].dport) == (str(PROXY4[2]), 5000)
    assert checksums_valid(reply.packet)


def test_udp_v6_and_icmp_echo_v4_v6_translate_both_ways() -> None:
    nat = nat_with_records()
    udp6 = bytes(IPv6(src=CLIENT6, dst=str(PROXY6[1])) / UDP(sport=7000, dport=9) / b"hello")
    out = nat.translate_outbound(udp6, 0.0).packet
    assert out is not None and IPv6(out).dst == str(REAL6[0]) and checksums_valid(out)
    echo4 = bytes(IP(src=CLIENT4, dst=str(PROXY4[1])) / ICMP(type=8, id=77, seq=1) / b"ping")
    out4 = nat.translate_outbound(echo4, 0.0).packet
    assert out4 is not None and IP(out4).dst == str(REAL4[1]) and IP(out4)[ICMP].id == 77 and checksums_valid(out4)
    reply4 = bytes(IP(src=str(REAL4[1]), dst=CLIENT4) / ICMP(type=0, id=77, seq=1) / b"ping")
    back4 = nat.translate_inbound(reply4, 0.5).packet
    assert back4 is not None and IP(back4).src == str(PROXY4[1]) and checksums_valid(back4)
    echo6 = bytes(IPv6(src=CLIENT6, dst=str(PROXY6[0])) / ICMPv6EchoRequest(id=9, seq=2))
    out6 = nat.translate_outbound(echo6, 0.0).packet
    assert out6 is not None and IPv6(out6).dst == str(REAL6[0]) and checksums_valid(out6)
    reply6 = bytes(IPv6(src=str(REAL6[0]), dst=CLIENT6) / ICMPv6EchoReply(id=9, seq=2))
    back6 = nat.translate_inbound(reply6, 0.5).packet
    assert back6 is not None and IPv6(back6).src == str(PROXY6[0]) and checksums_valid(back6)


def test_icmp_errors_quoting_a_translated_packet_are_rebuilt_about_the_proxy_ip() -> None:
    nat = nat_with_records()
    nat.translate_outbound(bytes(IP(src=CLIENT4, dst=str(PROXY4[2])) / UDP(sport=5000, dport=53)), 0.0)
    sent = nat.translate_outbound(bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / UDP(sport=5000, dport=53)), 0.0).packet
    assert sent is not None
    error = bytes(IP(src="172.20.0.1", dst=CLIENT4) / ICMP(type=3, code=3) / sent)
    back = nat.translate_inbound(error, 1.0)
    assert back.verdict is InboundVerdict.TRANSLATED and back.packet is not None
    parsed = IP(back.packet)
    assert (parsed.src, parsed.dst, parsed.ttl, parsed[ICMP].type, parsed[ICMP].code) == (
        str(PROXY4[0]),
        CLIENT4,
        dns_nat.ICMP_ERROR_HOP_LIMIT,
        3,
        3,
    )
    assert (parsed[IPerror].dst, parsed[UDPerror].sport) == (str(PROXY4[0]), 5000)
    assert checksums_valid(back.packet)
    sent6 = nat.translate_outbound(bytes(IPv6(src=CLIENT6, dst=str(PROXY6[3])) / UDP(sport=6000, dport=53)), 0).packet
    assert sent6 is not None
    error6 = bytes(IPv6(src="fd99::1", dst=CLIENT6) / ICMPv6DestUnreach(code=4) / sent6)
    back6 = nat.translate_inbound(error6, 1.0).packet
    assert back6 is not None
    parsed6 = IPv6(back6)
    assert (parsed6.src, parsed6[IPerror6].dst, parsed6[UDPerror].sport) == (str(PROXY6[3]), str(PROXY6[3]), 6000)
    assert checksums_valid(back6)


def test_refusals_no_translation_no_records_cross_family_unsupported() -> None:
    nat = DnsNat()
    nat.setup("a.example", "r1", PROXY4 + PROXY6, REAL4)  # no AAAA
    unknown = bytes(IP(src=CLIENT4, dst="100.96.9.9") / UDP(sport=1, dport=2))
    result = nat.translate_outbound(unknown, 0.0)
    assert result.packet is None and result.icmp_reply is not None
    assert (IP(result.icmp_reply)[ICMP].type, IP(result.icmp_reply)[ICMP].code) == (3, 0)
    no_aaaa = bytes(IPv6(src=CLIENT6, dst=str(PROXY6[0])) / UDP(sport=1, dport=2))
    result = nat.translate_outbound(no_aaaa, 0.0)
    assert result.packet is None and result.icmp_reply is not None
    assert (IPv6(result.icmp_reply)[ICMPv6DestUnreach].code) == 3
    gre = bytes(IP(src=CLIENT4, dst=str(PROXY4[0]), proto=47) / (b"\x00" * 8))
    assert nat.translate_outbound(gre, 0.0) == dns_nat.OutboundResult(None)
    assert nat.drops[NatDropReason.NO_TRANSLATION] == 1
    assert nat.drops[NatDropReason.NO_RECORDS] == 1
    assert nat.drops[NatDropReason.UNSUPPORTED_PROTOCOL] == 1
    # Cross-family: an IPv4 proxy never maps to an IPv6 record, even when only IPv6 records exist.
    v6_only = DnsNat()
    v6_only.setup("b.example", "r1", PROXY4, REAL6)
    assert v6_only.translation(PROXY4[0]).real is None  # type: ignore[union-attr]


def test_rebinding_a_proxy_ip_to_another_domain_resets_the_table() -> None:
    nat = nat_with_records()
    nat.translate_outbound(bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / UDP(sport=1, dport=2)), 0.0)
    assert nat.session_count == 1
    installed, reset = nat.setup("app.example.com", "r1", PROXY4, REAL4)  # same domain (case folded): no reset
    assert installed and not reset and nat.session_count == 1
    installed, reset = nat.setup("other.example.com", "r2", PROXY4[:1] + [IPv4Address("100.96.1.1")] * 3, REAL4)
    assert installed and reset and nat.session_count == 0
    assert nat.translation(PROXY4[1]) is None and nat.proxy_ips("r1") == []


def test_translations_are_bounded() -> None:
    nat = DnsNat()
    base = int(IPv4Address("100.96.0.0"))
    for domain in range(dns_nat.MAX_TRANSLATIONS // 4):
        proxies = [IPv4Address(base + domain * 4 + i) for i in range(4)]
        assert nat.setup(f"d{domain}.example", "r1", proxies, REAL4) == (True, False)
    assert nat.setup("one-more.example", "r1", [IPv4Address(base + 100_000 + i) for i in range(4)], REAL4) == (
        False,
        False,
    )


def test_sessions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns_nat, "MAX_SESSIONS", 3)
    nat = nat_with_records()
    results = [
        nat.translate_outbound(bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / UDP(sport=port, dport=2)), 0.0)
        for port in range(1, 5)
    ]
    assert [r.packet is not None for r in results] == [True, True, True, False]
    assert nat.drops[NatDropReason.TABLE_FULL] == 1


# --- lifetimes ----------------------------------------------------------------------------------------------------


def udp_out(sport: int = 5000) -> bytes:
    return bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / UDP(sport=sport, dport=53))


def udp_in(dport: int = 5000) -> bytes:
    return bytes(IP(src=str(REAL4[0]), dst=CLIENT4) / UDP(sport=53, dport=dport))


def tcp_out(flags: str) -> bytes:
    return bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / TCP(sport=40000, dport=443, flags=flags))


def tcp_in(flags: str) -> bytes:
    return bytes(IP(src=str(REAL4[0]), dst=CLIENT4) / TCP(sport=443, dport=40000, flags=flags))


def alive_at(nat: DnsNat, now: float) -> bool:
    nat.handle_timeout(now)
    return nat.session_count == 1


def test_unanswered_session_ends_after_60_seconds() -> None:
    nat = nat_with_records()
    nat.translate_outbound(udp_out(), 100.0)
    assert nat.poll_timeout() == 160.0
    assert alive_at(nat, 159.9) and not alive_at(nat, 160.0)


def test_udp_and_icmp_sessions_live_two_minutes() -> None:
    nat = nat_with_records()
    nat.translate_outbound(udp_out(), 0.0)
    nat.translate_inbound(udp_in(), 10.0)
    assert alive_at(nat, 129.9) and not alive_at(nat, 130.0)
    echo = DnsNat()
    echo.setup("a.example", "r1", PROXY4, REAL4)
    echo.translate_outbound(bytes(IP(src=CLIENT4, dst=str(PROXY4[0])) / ICMP(type=8, id=1)), 0.0)
    echo.translate_inbound(bytes(IP(src=str(REAL4[0]), dst=CLIENT4) / ICMP(type=0, id=1)), 1.0)
    assert alive_at(echo, 120.9) and not alive_at(echo, 121.0)


def test_tcp_session_lives_2h4m_after_its_last_packet() -> None:
    nat = nat_with_records()
    nat.translate_outbound(tcp_out("S"), 0.0)
    nat.translate_inbound(tcp_in("SA"), 1.0)
    nat.translate_outbound(tcp_out("A"), 2.0)
    assert dns_nat.TCP_TTL == 7440
    assert alive_at(nat, 2.0 + 7439) and not alive_at(nat, 2.0 + 7440)


def test_fin_both_ways_ends_the_session_5_seconds_later() -> None:
    nat = nat_with_records()
    nat.translate_outbound(tcp_out("S"), 0.0)
    nat.translate_inbound(tcp_in("SA"), 1.0)
    nat.translate_outbound(tcp_out("FA"), 2.0)
    assert alive_at(nat, 100.0)  # one FIN is not enough
    nat.translate_inbound(tcp_in("FA"), 101.0)
    assert alive_at(nat, 105.9) and not alive_at(nat, 106.0)


def test_rst_ends_the_session_at_once() -> None:
    nat = nat_with_records()
    nat.translate_outbound(tcp_out("S"), 0.0)
    nat.translate_inbound(tcp_in("R"), 1.0)
    assert not alive_at(nat, 1.0)


def test_late_replies_to_an_expired_session_are_dropped() -> None:
    nat = nat_with_records()
    nat.translate_outbound(udp_out(), 0.0)
    nat.handle_timeout(60.0)
    late = nat.translate_inbound(udp_in(), 61.0)
    assert late.verdict is InboundVerdict.EXPIRED and nat.drops[NatDropReason.EXPIRED_SESSION] == 1
    # An unrelated packet (no session ever) is left to the policy.
    assert nat.translate_inbound(udp_in(6000), 61.0).verdict is InboundVerdict.NOT_TRANSLATED
    # A new session on the same outside key is translated again.
    nat.translate_outbound(udp_out(), 62.0)
    assert nat.translate_inbound(udp_in(), 62.5).verdict is InboundVerdict.TRANSLATED


def test_expired_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns_nat, "MAX_EXPIRED", 2)
    nat = nat_with_records()
    for port in (1, 2, 3):
        nat.translate_outbound(udp_out(port), 0.0)
    nat.handle_timeout(60.0)
    assert nat.translate_inbound(udp_in(1), 61.0).verdict is InboundVerdict.NOT_TRANSLATED
    assert nat.translate_inbound(udp_in(3), 61.0).verdict is InboundVerdict.EXPIRED


def test_proxy_ranges() -> None:
    assert is_proxy_ip(ip_address("100.96.0.1")) and is_proxy_ip(ip_address("100.127.255.255"))
    assert not is_proxy_ip(ip_address("100.95.0.1")) and not is_proxy_ip(ip_address("100.128.0.1"))
    assert is_proxy_ip(ip_address("fd00:2021:1111:8000::1"))
    assert is_proxy_ip(ip_address("fd00:2021:1111:8000::1f:ffff"))
    assert not is_proxy_ip(ip_address("fd00:2021:1111:8000::20:0"))
    for address in ("100.96.0.1", "100.127.0.1", "100.95.0.1", "100.128.0.1"):
        packet = bytes(IP(src=CLIENT4, dst=address) / UDP())
        assert is_proxy_address(packet) == is_proxy_ip(ip_address(address))
    for address6 in ("fd00:2021:1111:8000::1", "fd00:2021:1111:8000::20:0", "fd00:2021:1111::1"):
        packet = bytes(IPv6(src=CLIENT6, dst=address6) / UDP())
        assert is_proxy_address(packet) == is_proxy_ip(ip_address(address6))
