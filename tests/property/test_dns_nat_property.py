"""The DNS-resource NAT's rewriting on random packets, checked against scapy (docs/protocol.md §3.4).

For TCP, UDP and ICMP echo in both families, random addresses, ports, flags and payloads: the outbound packet is the
client's with only the destination address (and, on a collision, the source port) changed, every checksum right as
scapy recomputes it; the answer comes back with the proxy address and the client's port; an ICMP error quoting the
translated packet is rebuilt from the proxy address and quotes the packet as the client sent it.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, ICMPerror, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
)
from scapy.packet import Packet, Raw

from dataplane.dns_nat import DnsNat, InboundVerdict, IpAddress

CLIENT = {4: "100.64.3.9", 6: "fd00:2021:1111::3:9"}
PROXIES: dict[int, list[IpAddress]] = {
    4: [ipaddress.IPv4Address(f"100.96.7.{i}") for i in range(1, 5)],
    6: [ipaddress.IPv6Address(f"fd00:2021:1111:8000::7:{i}") for i in range(1, 5)],
}

v4_reals = st.integers(0x01000000, 0xDFFFFFFF).map(ipaddress.IPv4Address)
v6_reals = st.integers(0x2000 << 112, (0x3FFF << 112) | ((1 << 112) - 1)).map(ipaddress.IPv6Address)
ports = st.integers(1, 65535)
payloads = st.binary(max_size=64)
protocols = st.sampled_from(["tcp", "udp", "echo"])


def layers(version: int, src: str, dst: str) -> Packet:
    return IP(src=src, dst=dst) if version == 4 else IPv6(src=src, dst=dst)


def transport(protocol: str, version: int, sport: int, dport: int, flags: str, *, reply: bool = False) -> Packet:
    if protocol == "tcp":
        return TCP(sport=sport, dport=dport, flags=flags, seq=12345)
    if protocol == "udp":
        return UDP(sport=sport, dport=dport)
    if version == 4:
        return ICMP(type=0 if reply else 8, id=sport if not reply else dport, seq=7)
    identifier = sport if not reply else dport
    return ICMPv6EchoReply(id=identifier, seq=7) if reply else ICMPv6EchoRequest(id=identifier, seq=7)


def recomputed(raw: bytes) -> bytes:
    """The packet as scapy rebuilds it with every checksum recomputed."""
    packet = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    for layer in packet.iterpayloads():
        for name in ("chksum", "cksum"):
            if name in layer.fields and not isinstance(layer, IPerror | IPerror6 | TCPerror | UDPerror | ICMPerror):
                delattr(layer, name)  # (not layer.fields: that would leave scapy's cached bytes in place)
    return bytes(packet)


def ident(packet: Packet, protocol: str, *, source: bool) -> int:
    if protocol in ("tcp", "udp"):
        layer = packet[TCP] if protocol == "tcp" else packet[UDP]
        return int(layer.sport if source else layer.dport)
    for kind in (ICMP, ICMPv6EchoRequest, ICMPv6EchoReply):
        if kind in packet:
            return int(packet[kind].id)
    raise AssertionError("no echo")


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    protocol=protocols,
    real4=v4_reals,
    real6=v6_reals,
    proxy_index=st.integers(0, 3),
    sport=ports,
    dport=ports,
    flags=st.sampled_from(["S", "SA", "A", "PA", "FA"]),
    payload=payloads,
    error=st.sampled_from(["unreachable", "time_exceeded", "too_big"]),
)
def test_translation_round_trip_against_scapy(
    version: int,
    protocol: str,
    real4: IpAddress,
    real6: IpAddress,
    proxy_index: int,
    sport: int,
    dport: int,
    flags: str,
    payload: bytes,
    error: str,
) -> None:
    nat = DnsNat()
    nat.setup("x.example", "r", PROXIES[4] + PROXIES[6], [real4, real6])
    proxy, real, client = str(PROXIES[version][proxy_index]), str(real4 if version == 4 else real6), CLIENT[version]
    sent = bytes(layers(version, client, proxy) / transport(protocol, version, sport, dport, flags) / Raw(payload))
    out = nat.translate_outbound(sent, 0.0).packet
    assert out is not None
    assert recomputed(out) == out
    parsed = IP(out) if version == 4 else IPv6(out)
    assert (parsed.src, parsed.dst, ident(parsed, protocol, source=True)) == (client, real, sport)
    assert out.endswith(payload)

    answer = bytes(
        layers(version, real, client) / transport(protocol, version, dport, sport, "A", reply=True) / Raw(payload)
    )
    back = nat.translate_inbound(answer, 1.0)
    assert back.verdict is InboundVerdict.TRANSLATED and back.packet is not None
    assert recomputed(back.packet) == back.packet
    parsed_back = IP(back.packet) if version == 4 else IPv6(back.packet)
    assert (parsed_back.src, parsed_back.dst) == (proxy, client)
    assert ident(parsed_back, protocol, source=False) == sport

    router = "192.0.2.1" if version == 4 else "2001:db8::1"
    if version == 4:
        icmp: Packet = ICMP(type=3, code=1) if error != "time_exceeded" else ICMP(type=11, code=0)
    else:
        icmp = {
            "unreachable": ICMPv6DestUnreach(code=3),
            "time_exceeded": ICMPv6TimeExceeded(),
            "too_big": ICMPv6PacketTooBig(mtu=1280),
        }[error]
    quote = out[: 576 - 28] if version == 4 else out[: 1280 - 48]
    rebuilt = nat.translate_inbound(bytes(layers(version, router, client) / icmp / Raw(quote)), 2.0)
    assert rebuilt.verdict is InboundVerdict.TRANSLATED and rebuilt.packet is not None
    assert recomputed(rebuilt.packet) == rebuilt.packet
    outer = IP(rebuilt.packet) if version == 4 else IPv6(rebuilt.packet)
    assert (outer.src, outer.dst) == (proxy, client)
    quoted = outer[IPerror] if version == 4 else outer[IPerror6]
    assert (quoted.src, quoted.dst) == (client, proxy)
    # The quote is the client's packet again, byte for byte (checksums included).
    assert bytes(quoted)[: len(sent)] == sent[: len(bytes(quoted))]
