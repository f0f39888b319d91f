"""Packet parsing and checksum rules whose error paths no test reached (``make mutate``, issue 11).

RFC 791/8200 headers, RFC 768/793 checksums (scapy builds the packets and computes the checksums as an independent
oracle), RFC 768's "a UDP checksum of 0 over IPv4 means none", and the refusals of the TSO/USO splitter and the GRO
coalescer for frames that do not make sense.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.packet import Packet, Raw
from scapy.utils import checksum

from dataplane.packet import (
    TCP_SYN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
    PacketParseError,
    TcpView,
    VirtioNetHdr,
    coalesce,
    flow_hash,
    ipv4_header_checksum,
    l4_checksum_valid,
    parse_icmp,
    parse_ip,
    parse_tcp,
    parse_udp,
    split_gso,
)
from tests.packet_oracle import checksums_ok, complete_partial_checksum, kernel_segments, pseudo_header_partial


def _v4_udp(payload: bytes = b"data") -> bytes:
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=2000) / payload)


def _v4_tcp(payload: bytes = b"data", flags: str = "A") -> bytes:
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1000, dport=2000, flags=flags) / payload)


def _error(call: object, *args: object) -> str:
    with pytest.raises(PacketParseError) as info:
        call(*args)  # type: ignore[operator]
    return str(info.value)


# ---- transport parsers refuse what is not theirs ------------------------------------------------------------------


def test_transport_parsers_refuse_other_protocols_and_fragments() -> None:
    udp, tcp = _v4_udp(), _v4_tcp()
    assert _error(parse_tcp, udp, parse_ip(udp)) == "not an unfragmented TCP packet"
    assert _error(parse_udp, tcp, parse_ip(tcp)) == "not an unfragmented UDP packet"
    assert _error(parse_icmp, tcp, parse_ip(tcp)) == "not an unfragmented ICMP packet"
    fragment = bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="MF") / UDP() / b"x")
    assert _error(parse_udp, fragment, parse_ip(fragment)) == "not an unfragmented UDP packet"
    later = bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=1, proto=17) / b"12345678")
    assert _error(parse_udp, later, parse_ip(later)) == "not an unfragmented UDP packet"


def test_ipv6_icmp_is_icmpv6_not_icmp() -> None:
    v6_icmp4 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=1) / bytes(8))
    assert _error(parse_icmp, v6_icmp4, parse_ip(v6_icmp4)) == "not an unfragmented ICMP packet"
    v4_icmp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=7, seq=9))
    view = parse_icmp(v4_icmp, parse_ip(v4_icmp))
    assert (view.type, view.code, view.rest) == (8, 0, (7 << 16) | 9)


def test_truncated_transport_headers_are_refused() -> None:
    short_udp = bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=17) / b"1234567")
    assert _error(parse_udp, short_udp, parse_ip(short_udp)) == "truncated UDP header"
    short_tcp = bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=6) / bytes(19))
    assert _error(parse_tcp, short_tcp, parse_ip(short_tcp)) == "truncated TCP header"
    short_icmp = bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=1) / bytes(7))
    assert _error(parse_icmp, short_icmp, parse_ip(short_icmp)) == "truncated ICMP header"


@pytest.mark.parametrize("length", [0, 7, 13])
def test_udp_length_must_cover_the_header_and_fit_the_packet(length: int) -> None:
    packet = bytearray(_v4_udp(b"12345"))  # UDP length 13
    packet[24:26] = (length if length != 13 else 14).to_bytes(2, "big")
    assert _error(parse_udp, bytes(packet), parse_ip(bytes(packet))) == "bad UDP length"


def test_udp_length_equal_to_the_rest_is_fine() -> None:
    packet = _v4_udp(b"12345")
    assert parse_udp(packet, parse_ip(packet)).length == 13


# ---- checksums against scapy ----------------------------------------------------------------------------------------


def test_ipv4_header_checksum_matches_scapy_and_needs_20_bytes() -> None:
    packet = _v4_udp()
    assert ipv4_header_checksum(packet[:20]) == IP(packet).chksum
    assert _error(ipv4_header_checksum, packet[:19]) == "truncated IPv4 header"


def test_udp_checksum_zero_over_ipv4_means_none() -> None:
    packet = bytearray(_v4_udp())
    packet[26:28] = b"\x00\x00"
    assert l4_checksum_valid(bytes(packet))
    packet[26:28] = b"\x00\x01"
    assert not l4_checksum_valid(bytes(packet))


def test_udp_checksum_zero_over_ipv6_is_wrong() -> None:
    packet = bytearray(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1, dport=2) / b"data"))
    assert l4_checksum_valid(bytes(packet))
    packet[46:48] = b"\x00\x00"
    assert not l4_checksum_valid(bytes(packet))


def test_checksum_validation_refuses_non_tcp_udp() -> None:
    icmp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP())
    assert _error(l4_checksum_valid, icmp) == "not an unfragmented TCP/UDP packet"


# ---- flow hash ----------------------------------------------------------------------------------------------------


def test_flow_hash_of_garbage_is_zero() -> None:
    assert flow_hash(b"") == 0
    assert flow_hash(bytes(19)) == 0
    assert flow_hash(b"\x60" + bytes(38)) == 0  # IPv6 shorter than its header
    assert flow_hash(b"\x70" + bytes(40)) == 0


def test_flow_hash_separates_ports_also_with_ipv4_options() -> None:
    def with_options(sport: int) -> bytes:
        return bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / UDP(sport=sport, dport=53))

    assert with_options(1000)[0] == 0x46
    assert flow_hash(with_options(1000)) == flow_hash(with_options(1000))
    assert flow_hash(with_options(1000)) != flow_hash(with_options(1001))


def test_flow_hash_of_ipv6_without_room_for_ports_uses_the_addresses() -> None:
    header_only = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=17, plen=0))
    other = bytes(IPv6(src="2001:db8::1", dst="2001:db8::3", nh=17, plen=0))
    assert flow_hash(header_only) != flow_hash(other)
    assert flow_hash(header_only) == flow_hash(bytes(header_only))


# ---- offload frames that do not make sense ------------------------------------------------------------------------


def test_checksum_offsets_outside_the_packet_are_refused() -> None:
    packet = _v4_udp()
    hdr = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=len(packet) - 1, csum_offset=6)
    assert _error(split_gso, hdr, packet) == "checksum offsets outside the packet"


def test_gso_frames_are_checked_against_their_headers() -> None:
    udp = _v4_udp(bytes(100))
    uso = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4, gso_size=40, csum_start=20, csum_offset=6)
    assert len(split_gso(uso, udp)) == 3
    assert _error(split_gso, uso, b"") == "empty packet"
    assert _error(split_gso, uso, udp[:19]) == "truncated IPv4 header"
    assert _error(split_gso, uso, b"\x60" + bytes(30)) == "truncated IPv6 header"
    assert _error(split_gso, uso, b"\x50" + bytes(40)) == "not IPv4/IPv6 (version 5)"
    assert _error(split_gso, uso, b"\x4f" + udp[1:20]) == "bad IPv4 header length"
    assert _error(split_gso, uso, _v4_tcp(bytes(100))) == "gso_type does not match the transport protocol"
    assert _error(split_gso, uso, udp[:25]) == "truncated transport header"
    zero = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4, gso_size=0, csum_start=20, csum_offset=6)
    assert _error(split_gso, zero, udp) == "USO frame with gso_size 0"
    tso = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=40, csum_start=20, csum_offset=16)
    assert _error(split_gso, tso, _v4_udp(bytes(100))) == "gso_type does not match the transport protocol"
    v6_tcp = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(flags="A") / bytes(100))
    assert _error(split_gso, tso, v6_tcp) == "gso_type does not match the IP version"
    bad_offset = bytearray(_v4_tcp(bytes(100)))
    bad_offset[32] = 0x40  # data offset 16 bytes
    assert _error(split_gso, tso, bytes(bad_offset)) == "bad TCP data offset"
    tso_zero = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=0, csum_start=20, csum_offset=16)
    assert _error(split_gso, tso_zero, _v4_tcp(bytes(100))) == "TSO frame with gso_size 0"


# ---- GRO: what cannot be merged passes through alone ------------------------------------------------------------------


def _unmerged(packets: list[bytes], *, udp: bool = False) -> bool:
    frames = coalesce(packets, udp=udp)
    return [frame[VIRTIO_NET_HDR_LEN:] for frame in frames] == packets


def test_packets_that_cannot_merge_pass_through_alone() -> None:
    padded = _v4_tcp(b"a") + b"\x00"
    assert _unmerged([padded, padded])
    fragments = [bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", id=1) / TCP(flags="A") / b"x")] * 2
    assert _unmerged(fragments)
    with_options = bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / TCP(flags="A") / b"x")
    assert _unmerged([with_options, with_options])
    short_v6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP() / b"x")[:-1]
    assert _unmerged([short_v6, short_v6], udp=True)
    empty_udp = [_v4_udp(b""), _v4_udp(b"")]
    assert _unmerged(empty_udp, udp=True)
    bad_udp_length = bytearray(_v4_udp(b"abc"))
    bad_udp_length[24:26] = (10).to_bytes(2, "big")
    assert _unmerged([bytes(bad_udp_length)] * 2, udp=True)
    assert _unmerged([b"\x50" + bytes(40), b""])
    short_tcp_v6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=6) / bytes(10))
    assert _unmerged([short_tcp_v6, short_tcp_v6])
    syn = [_v4_tcp(b"x", flags="S"), _v4_tcp(b"x", flags="S")]
    assert _unmerged(syn)


def test_same_flow_udp_datagrams_merge_when_asked() -> None:
    first = bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=1) / UDP(sport=1, dport=2) / b"ab")
    second = bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=2) / UDP(sport=1, dport=2) / b"cd")
    assert len(coalesce([first, second], udp=True)) == 1
    assert len(coalesce([first, second], udp=False)) == 2


def test_header_offsets_and_lengths_are_checked() -> None:
    plain = _v4_tcp()
    assert parse_ip(plain).l4_offset == 20
    optioned = bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / TCP(flags="A") / b"x")
    assert parse_ip(optioned).l4_offset == 24
    v6 = bytearray(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP() / b"x"))
    v6[4:6] = (len(v6) - 39).to_bytes(2, "big")
    assert _error(parse_ip, bytes(v6)) == "bad IPv6 payload length"
    short_offset = bytearray(plain)
    short_offset[32] = 0x40
    assert _error(parse_tcp, bytes(short_offset), parse_ip(bytes(short_offset))) == "bad TCP data offset"
    long_offset = bytearray(plain)
    long_offset[32] = 0xF0  # 60 bytes of header, 24 bytes there
    assert _error(parse_tcp, bytes(long_offset), parse_ip(bytes(long_offset))) == "bad TCP data offset"


def test_flow_hash_of_portless_ipv4_ignores_what_follows_the_addresses() -> None:
    def echo(ident: int, dst: str = "10.0.0.2") -> bytes:
        return bytes(IP(src="10.0.0.1", dst=dst) / ICMP(id=ident))

    assert flow_hash(echo(1)) == flow_hash(echo(2))
    assert flow_hash(echo(1)) != flow_hash(echo(1, "10.0.0.3"))


def test_tso_with_ipv4_options_checks_the_tcp_header() -> None:
    tso = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=40, csum_start=24, csum_offset=16)
    optioned = bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / TCP(flags="A") / bytes(100))
    assert len(split_gso(tso, optioned)) == 3
    assert _error(split_gso, tso, optioned[:43]) == "truncated TCP header"
    bad = bytearray(optioned)
    bad[24 + 12] = 0x40
    assert _error(split_gso, tso, bytes(bad)) == "bad TCP data offset"


def test_segments_longer_than_an_ip_packet_are_refused() -> None:
    tso = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=65500, csum_start=20, csum_offset=16)
    huge_tcp = _v4_tcp(b"") + bytes(65500)
    assert _error(split_gso, tso, huge_tcp) == "TSO segment longer than an IP packet"
    uso = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4, gso_size=65510, csum_start=20, csum_offset=6)
    huge_udp = _v4_udp(b"") + bytes(65510)
    assert _error(split_gso, uso, huge_udp) == "USO segment longer than an IP packet"


def test_short_or_optioned_ipv4_is_not_merged() -> None:
    assert _unmerged([b"\x45" + bytes(10), b"\x45" + bytes(10)])
    v6_tcp_bad_len = bytearray(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(flags="A") / b"xy"))
    v6_tcp_bad_len[4:6] = b"\x00\x01"
    assert _unmerged([bytes(v6_tcp_bad_len)] * 2)


def test_an_empty_udp_datagram_parses_but_never_merges() -> None:
    empty = _v4_udp(b"")
    assert parse_udp(empty, parse_ip(empty)).length == 8
    first = bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=1) / UDP(sport=1, dport=2))
    second = bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=2) / UDP(sport=1, dport=2))
    assert _unmerged([first, second], udp=True)


def test_flow_hash_takes_the_ports_when_just_they_are_there() -> None:
    def ports_only(sport: int) -> bytes:
        packet = bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / UDP(sport=sport, dport=53))
        return packet[:28]  # 24-byte IPv4 header + the two ports

    assert flow_hash(ports_only(1000)) != flow_hash(ports_only(1001))


# ---- parse_ip: every refusal says why, and a packet that is just its headers is fine ------------------------------


def test_parse_ip_says_why_it_refuses() -> None:
    udp = _v4_udp()
    assert _error(parse_ip, b"") == "empty packet"
    assert _error(parse_ip, b"\x45") == "truncated IPv4 header"
    assert _error(parse_ip, udp[:19]) == "truncated IPv4 header"
    assert _error(parse_ip, b"\x60") == "truncated IPv6 header"
    assert _error(parse_ip, b"\x60" + bytes(38)) == "truncated IPv6 header"
    assert _error(parse_ip, b"\x00") == "not IPv4/IPv6 (version 0)"
    assert _error(parse_ip, b"\x50" + bytes(40)) == "not IPv4/IPv6 (version 5)"
    assert _error(parse_ip, b"\x44" + udp[1:]) == "bad IPv4 header length"  # IHL 4: 16 bytes
    assert _error(parse_ip, b"\x4f" + udp[1:]) == "bad IPv4 header length"  # IHL 15: 60 bytes, 32 there
    for total_len in (19, len(udp) + 1):
        bad_total = bytearray(udp)
        bad_total[2:4] = total_len.to_bytes(2, "big")
        assert _error(parse_ip, bytes(bad_total)) == "bad IPv4 total length"


def test_header_only_packets_parse_with_their_ttl() -> None:
    v4 = bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=47, ttl=33))
    assert len(v4) == 20
    view = parse_ip(v4)
    assert (view.header_len, view.total_len, view.ttl, view.protocol, view.is_fragment) == (20, 20, 33, 47, False)
    v6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=59, hlim=77))
    view = parse_ip(v6)
    assert (view.header_len, view.total_len, view.ttl, view.protocol, view.is_fragment) == (40, 40, 77, 59, False)


def test_a_tcp_header_without_payload_parses() -> None:
    packet = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, seq=3, ack=4, flags="S", window=1234))
    assert len(packet) == 40
    assert parse_tcp(packet, parse_ip(packet)) == TcpView(1, 2, 3, 4, 20, TCP_SYN, 1234)


def test_an_ipv6_fragment_header_marks_a_fragment() -> None:
    fragment = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(m=1) / UDP() / b"x")
    assert parse_ip(fragment).is_fragment is True
    assert _error(parse_udp, fragment, parse_ip(fragment)) == "not an unfragmented UDP packet"


# ---- checksums ------------------------------------------------------------------------------------------------------


def test_ipv4_header_checksum_of_a_zero_sum_is_all_ones() -> None:
    # RFC 1071: the complement of a one's-complement sum of 0 is 0xFFFF (scapy agrees).
    assert ipv4_header_checksum(bytes(20)) == checksum(bytes(20)) == 0xFFFF


def test_udp_without_payload_may_carry_no_checksum_over_ipv4() -> None:
    packet = bytearray(_v4_udp(b""))
    assert l4_checksum_valid(bytes(packet))
    packet[26:28] = b"\x00\x00"
    assert l4_checksum_valid(bytes(packet))


def test_a_udp_checksum_with_only_its_low_byte_zero_is_checked() -> None:
    packet = bytearray(_v4_udp())
    assert packet[26:28] != b"\x01\x00"
    packet[26:28] = b"\x01\x00"
    assert not l4_checksum_valid(bytes(packet))


def _sum16(data: bytes | bytearray) -> int:
    """Folded one's-complement sum of 16-bit words, independent of dataplane.packet."""
    data = bytes(data) + b"\x00" * (len(data) & 1)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _with_partial_checksum(packet: bytes, csum_offset: int) -> tuple[bytes, int]:
    """The packet as the kernel hands a NEEDS_CSUM frame over: the checksum field holds the pseudo-header sum."""
    header_len = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    out = bytearray(packet)
    struct.pack_into("!H", out, header_len + csum_offset, pseudo_header_partial(packet))
    return bytes(out), header_len


def test_a_udp_checksum_that_computes_to_zero_is_sent_as_all_ones() -> None:
    # RFC 768: a computed checksum of 0 is transmitted as 0xFFFF, since 0 means "no checksum".
    partial, _ = _with_partial_checksum(_v4_udp(b"\x00\x00" + b"payload!"), 6)
    balancing_word = 0xFFFF - _sum16(partial[20:])  # makes the sum from the UDP header on exactly 0xFFFF
    partial = partial[:28] + balancing_word.to_bytes(2, "big") + partial[30:]
    hdr = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=20, csum_offset=6)
    [completed] = split_gso(hdr, partial)
    assert completed == complete_partial_checksum(partial, 20, 6)
    assert completed[26:28] == b"\xff\xff"
    assert l4_checksum_valid(completed)


def test_a_checksum_field_reaching_past_the_end_is_refused() -> None:
    packet = _v4_udp()
    last_two = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=len(packet) - 8, csum_offset=6)
    assert len(split_gso(last_two, packet)) == 1
    last_one = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=len(packet) - 7, csum_offset=6)
    assert _error(split_gso, last_one, packet) == "checksum offsets outside the packet"


def test_a_short_virtio_net_hdr_is_refused() -> None:
    assert _error(VirtioNetHdr.decode, bytes(VIRTIO_NET_HDR_LEN - 1)) == "truncated virtio_net_hdr"
    header = VirtioNetHdr(1, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1400, 20, 16)
    assert VirtioNetHdr.decode(header.encode()) == header


# ---- flow hash: the flow is the protocol, the addresses and the TCP/UDP ports; nothing else counts -------------------

_LAYOUTS = ["ipv4", "ipv4 with options", "ipv6"]


def _ip(layout: str, *, first_src_byte: int = 0x20, last_dst_byte: int = 2, ttl: int = 64, **fields: Any) -> Packet:
    if layout == "ipv6":
        return IPv6(src=f"{first_src_byte:02x}01:db8::1", dst=f"2001:db8::{last_dst_byte:x}", hlim=ttl, **fields)
    if layout == "ipv4 with options":
        fields.setdefault("options", b"\x01\x01\x01\x00")
    return IP(src=f"{first_src_byte}.0.0.1", dst=f"10.0.0.{last_dst_byte}", ttl=ttl, **fields)


def _header_len(packet: bytes) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_flow_hash_changes_with_protocol_addresses_and_ports(layout: str) -> None:
    base = flow_hash(bytes(_ip(layout) / UDP(sport=1000, dport=2000) / b"data"))
    others = [
        _ip(layout) / UDP(sport=1001, dport=2000) / b"data",
        _ip(layout) / UDP(sport=1000, dport=2001) / b"data",
        _ip(layout, first_src_byte=0x30) / UDP(sport=1000, dport=2000) / b"data",
        _ip(layout, last_dst_byte=3) / UDP(sport=1000, dport=2000) / b"data",
        _ip(layout) / TCP(sport=1000, dport=2000) / b"data",
    ]
    for other in others:
        assert flow_hash(bytes(other)) != base, other.summary()


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_flow_hash_ignores_everything_but_the_flow(layout: str) -> None:
    def segment(ttl: int = 64, seq: int = 1, payload: bytes = b"data", **fields: Any) -> bytes:
        return bytes(_ip(layout, ttl=ttl, **fields) / TCP(sport=1000, dport=2000, seq=seq, flags="A") / payload)

    base = flow_hash(segment())
    v4_only: dict[str, Any] = {} if layout == "ipv6" else {"id": 7, "tos": 0x10}
    v6_only: dict[str, Any] = {"tc": 0x10, "fl": 12345} if layout == "ipv6" else {}
    same = [
        segment(ttl=65),
        segment(seq=0x12345678),
        segment(payload=b"more data"),
        segment(**v4_only),
        segment(**v6_only),
    ]
    if layout == "ipv4 with options":
        same.append(segment(options=bytes(4)))  # end-of-list instead of no-operations: other option bytes
    assert [flow_hash(packet) for packet in same] == [base] * len(same)


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_flow_hash_of_portless_protocols_is_protocol_and_addresses(layout: str) -> None:
    is_v6 = layout == "ipv6"
    icmp = 58 if is_v6 else 1
    field = "nh" if is_v6 else "proto"

    def echo(
        echo_type: int = 8, ident: int = 1, ttl: int = 64, protocol: int = icmp, first_src_byte: int = 0x20
    ) -> int:
        body = struct.pack("!BBHHH", echo_type, 0, 0, ident, 1)  # type, code, checksum, id, sequence
        ip = _ip(layout, ttl=ttl, first_src_byte=first_src_byte, **{field: protocol})
        return flow_hash(bytes(ip / Raw(body)))

    assert echo(echo_type=0) == echo(ident=2) == echo(ttl=65) == echo()
    assert echo(protocol=47) != echo()
    assert echo(first_src_byte=0x30) != echo()


@pytest.mark.parametrize("options", [b"", b"\x01\x01\x01\x00"])
def test_all_fragments_of_a_datagram_hash_alike(options: bytes) -> None:
    datagram = IP(src="10.0.0.1", dst="10.0.0.2", options=options) / UDP(sport=1000, dport=2000) / bytes(range(40))
    fragments = [bytes(piece) for piece in fragment(datagram, fragsize=16)]
    assert len(fragments) == 3
    assert fragments[0][0] == 0x45 + len(options) // 4
    assert [flow_hash(piece) for piece in fragments] == [flow_hash(fragments[0])] * 3


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_flow_hash_takes_the_ports_only_when_both_are_there(layout: str) -> None:
    def udp(sport: int) -> bytes:
        return bytes(_ip(layout) / UDP(sport=sport, dport=2000) / b"data")

    ihl = _header_len(udp(1000))
    assert flow_hash(udp(1000)[: ihl + 4]) != flow_hash(udp(1001)[: ihl + 4])
    assert flow_hash(udp(1000)[: ihl + 2]) == flow_hash(udp(1000)[: ihl + 3]) == flow_hash(udp(1000)[:ihl])
    protocol: dict[str, Any] = {"nh" if layout == "ipv6" else "proto": 17}
    header_only, other_dst = bytes(_ip(layout, **protocol)), bytes(_ip(layout, last_dst_byte=3, **protocol))
    assert len(header_only) == ihl
    assert flow_hash(header_only) != flow_hash(other_dst)


# ---- TSO/USO: edge sizes and header fields against the kernel's segmentation (tests/packet_oracle.py) -----------------


def _offload_frame(packet: bytes, gso_size: int) -> tuple[VirtioNetHdr, bytes]:
    """A NEEDS_CSUM TSO/USO frame for ``packet`` (IPv4/IPv6 + TCP/UDP) as the kernel hands it over."""
    ihl = _header_len(packet)
    is_tcp = packet[9 if packet[0] >> 4 == 4 else 6] == 6
    csum_offset = 16 if is_tcp else 6
    partial, _ = _with_partial_checksum(packet, csum_offset)
    if is_tcp:
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4 if packet[0] >> 4 == 4 else VIRTIO_NET_HDR_GSO_TCPV6
        headers_len = ihl + (packet[ihl + 12] >> 4) * 4
    else:
        gso_type, headers_len = VIRTIO_NET_HDR_GSO_UDP_L4, ihl + 8
    return VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, headers_len, gso_size, ihl, csum_offset), partial


def _split_like_the_kernel(packet: bytes, gso_size: int) -> list[bytes]:
    hdr, partial = _offload_frame(packet, gso_size)
    segments = split_gso(hdr, partial)
    assert segments == kernel_segments(hdr.encode() + partial)
    assert all(checksums_ok(segment) for segment in segments)
    return segments


@pytest.mark.parametrize(
    "packet",
    [
        bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="A")),
        bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / TCP(flags="A")),
        bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(flags="A")),
        bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)),
        bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1, dport=2)),
    ],
    ids=["tcp4", "tcp4-options", "tcp6", "udp4", "udp6"],
)
def test_an_offload_frame_without_payload_is_one_packet(packet: bytes) -> None:
    assert len(_split_like_the_kernel(packet, 1000)) == 1


_OPTIONS = b"\x01\x01\x01\x00"


@pytest.mark.parametrize(
    ("headers", "payload_len"),
    [
        (IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="A"), 65495),
        (IP(src="10.0.0.1", dst="10.0.0.2", options=_OPTIONS) / TCP(flags="A"), 65491),
        (IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2), 65507),
    ],
    ids=["tcp4", "tcp4-options", "udp4"],
)
@pytest.mark.parametrize("larger_gso_size", [False, True])
def test_an_offload_segment_of_exactly_65535_bytes_is_allowed(
    headers: Packet, payload_len: int, larger_gso_size: bool
) -> None:
    packet = bytes(headers / bytes(payload_len))
    assert len(packet) == 65535
    [segment] = _split_like_the_kernel(packet, 65535 if larger_gso_size else payload_len)
    assert len(segment) == 65535


def test_an_ipv6_uso_datagram_may_be_longer_than_32_kib() -> None:
    [datagram] = _split_like_the_kernel(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP() / bytes(40000)), 40000)
    assert len(datagram) == 40048


def test_tso_refusals_name_tso_also_with_ipv4_options() -> None:
    optioned = bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=_OPTIONS) / TCP(flags="A") / bytes(100))
    no_size = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=0, csum_start=24, csum_offset=16)
    assert _error(split_gso, no_size, optioned) == "TSO frame with gso_size 0"
    too_long = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=65500, csum_start=24, csum_offset=16)
    assert _error(split_gso, too_long, optioned[:44] + bytes(65500)) == "TSO segment longer than an IP packet"


@pytest.mark.parametrize("ip", [IP(src="10.0.0.1", dst="10.0.0.2"), IPv6(src="2001:db8::1", dst="2001:db8::2")])
def test_tso_checksums_cover_every_bit_of_the_ack_number(ip: Packet) -> None:
    tcp = TCP(sport=40001, dport=443, seq=0xFFFFFE00, ack=0xDEADBEEF, flags="PA", window=0xABCD, urgptr=0x1234)
    assert len(_split_like_the_kernel(bytes(ip / tcp / (bytes(range(256)) * 10)), 1000)) == 3


def test_tso_refuses_packets_of_another_transport_or_version() -> None:
    tsov4 = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=40, csum_start=20, csum_offset=16)
    tsov6 = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV6, gso_size=40, csum_start=40, csum_offset=16)
    udp4 = bytearray(_v4_udp(bytes(100)))
    udp4[10] = 6  # an IP checksum byte equal to the TCP protocol number must not matter
    assert _error(split_gso, tsov4, bytes(udp4)) == "gso_type does not match the transport protocol"
    udp6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=6) / UDP() / bytes(100))
    assert _error(split_gso, tsov6, udp6) == "gso_type does not match the transport protocol"
    tcp6 = bytearray(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(flags="A") / bytes(100)))
    tcp6[1], tcp6[9] = 0x45, 6  # traffic class / flow label and a source address byte that look like IPv4 + TCP
    assert _error(split_gso, tsov4, bytes(tcp6)) == "gso_type does not match the IP version"
    tcp4 = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2", tos=0x60) / TCP(flags="A") / bytes(100)))
    tcp4[6] = 6  # a fragment offset byte equal to the TCP protocol number
    for first_byte in (0x45, 0x70, 0xC5):
        tcp4[0] = first_byte
        assert _error(split_gso, tsov6, bytes(tcp4)) == "gso_type does not match the IP version"


def test_uso_says_which_header_is_truncated() -> None:
    uso = VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4, gso_size=40, csum_start=20, csum_offset=6)
    assert _error(split_gso, uso, b"\x45") == "truncated IPv4 header"
    assert _error(split_gso, uso, b"\x60") == "truncated IPv6 header"
    assert _error(split_gso, uso, _v4_udp(bytes(100))[:20]) == "truncated transport header"
    v6_header = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=17))
    assert _error(split_gso, uso, v6_header) == "truncated transport header"


def test_an_unsupported_gso_type_is_named() -> None:
    legacy_ufo = VirtioNetHdr(gso_type=3, gso_size=1000, csum_start=20, csum_offset=6)  # VIRTIO_NET_HDR_GSO_UDP
    assert _error(split_gso, legacy_ufo, _v4_udp(bytes(2000))) == "unsupported gso_type 3"


def test_a_uso_segment_whose_checksum_computes_to_zero_carries_all_ones() -> None:
    # RFC 768 again, on the USO path: each datagram's checksum is computed, and a computed 0 goes out as 0xFFFF.
    datagram = bytearray(_v4_udp(b"\x00\x00" + b"payload!"))
    datagram[26:28] = b"\x00\x00"
    pseudo_header = datagram[12:20] + struct.pack("!BBH", 0, 17, len(datagram) - 20)
    balancing_word = 0xFFFF - _sum16(pseudo_header + datagram[20:])  # the checksum then computes to 0
    datagram[28:30] = balancing_word.to_bytes(2, "big")
    [segment] = _split_like_the_kernel(bytes(datagram), 1000)
    assert segment[26:28] == b"\xff\xff"


def _tcp_segments(payload_len: int, count: int, *, first_ip_id: int, df: bool) -> list[bytes]:
    return [
        bytes(
            IP(src="10.0.0.1", dst="10.0.0.2", id=first_ip_id + index, flags="DF" if df else 0)
            / TCP(sport=1000, dport=2000, seq=1 + index * payload_len, flags="A")
            / (bytes([index]) * payload_len)
        )
        for index in range(count)
    ]


def test_segments_without_df_starting_at_ip_id_zero_merge() -> None:
    packets = _tcp_segments(100, 3, first_ip_id=0, df=False)
    [frame] = coalesce(packets)
    assert kernel_segments(frame) == packets


def test_a_merged_packet_may_be_exactly_65535_bytes() -> None:
    packets = _tcp_segments(13099, 5, first_ip_id=1, df=True)  # 40 + 5 * 13099 = 65535
    [frame] = coalesce(packets)
    assert len(frame) == VIRTIO_NET_HDR_LEN + 65535
    assert kernel_segments(frame) == packets


def _udp_datagrams(count: int, *, sport: int = 1, **ip_fields: Any) -> list[bytes]:
    return [
        bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=1 + index, **ip_fields) / UDP(sport=sport, dport=2) / bytes(100))
        for index in range(count)
    ]


def test_udp_datagrams_merge_only_when_their_ip_header_allows() -> None:
    assert len(coalesce(_udp_datagrams(2), udp=True)) == 1
    # IPv4 options are never merged, even when the option bytes put a fitting UDP length where the ports would be
    optioned = _udp_datagrams(2, sport=112, options=b"\x01\x01\x01\x00")
    assert len(optioned[0]) == 132 and optioned[0][24:26] == (132 - 20).to_bytes(2, "big")
    assert _unmerged(optioned, udp=True)
    # First fragments: reassembly needs them as they are
    assert _unmerged(_udp_datagrams(2, flags="MF"), udp=True)
    # Link padding after the IP total length, even with a UDP length that counts it
    padded = [bytearray(datagram + bytes(4)) for datagram in _udp_datagrams(2, flags="DF")]
    for datagram in padded:
        datagram[24:26] = (len(datagram) - 20).to_bytes(2, "big")
    assert _unmerged([bytes(datagram) for datagram in padded], udp=True)


def _udp_datagram(index: int = 0, *, src: str = "10.0.0.1", **ip_fields: Any) -> bytes:
    ip_fields.setdefault("id", 1 + index)
    return bytes(IP(src=src, dst="10.0.0.2", **ip_fields) / UDP(sport=1, dport=2) / (bytes([index]) * 100))


def test_udp_datagrams_of_different_ip_headers_stay_apart() -> None:
    assert len(coalesce([_udp_datagram(0), _udp_datagram(1)], udp=True)) == 1
    assert _unmerged([_udp_datagram(0, tos=0), _udp_datagram(1, tos=0x10)], udp=True)
    assert _unmerged([_udp_datagram(0, ttl=64), _udp_datagram(1, ttl=63)], udp=True)
    assert _unmerged([_udp_datagram(0), _udp_datagram(1, src="11.0.0.1")], udp=True)
    # with DF the IPv4 id plays no part in reassembly, so it need not count up
    assert len(coalesce([_udp_datagram(0, flags="DF", id=0), _udp_datagram(1, flags="DF", id=0)], udp=True)) == 1


def test_ipv6_udp_datagrams_of_different_traffic_classes_stay_apart() -> None:
    def datagram(index: int, traffic_class: int) -> bytes:
        ip = IPv6(src="2001:db8::1", dst="2001:db8::2", tc=traffic_class)
        return bytes(ip / UDP(sport=1, dport=2) / (bytes([index]) * 100))

    assert len(coalesce([datagram(0, 0x10), datagram(1, 0x10)], udp=True)) == 1
    assert _unmerged([datagram(0, 0x10), datagram(1, 0x20)], udp=True)


def _v6_tcp_segment(index: int, *, first_seq: int = 1, sport: int = 1000, flags: str = "A") -> bytes:
    tcp = TCP(sport=sport, dport=2000, seq=(first_seq + index * 100) & 0xFFFFFFFF, flags=flags)
    return bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / tcp / (bytes([index]) * 100))


def test_ipv6_tcp_segments_merge_only_when_their_tcp_headers_allow() -> None:
    assert len(coalesce([_v6_tcp_segment(0), _v6_tcp_segment(1)])) == 1
    across_16_mib = [_v6_tcp_segment(0, first_seq=0x00FFFFC0), _v6_tcp_segment(1, first_seq=0x00FFFFC0)]
    assert len(coalesce(across_16_mib)) == 1
    assert _unmerged([_v6_tcp_segment(0, flags="FA"), _v6_tcp_segment(1, flags="FA")])
    assert _unmerged([_v6_tcp_segment(0, sport=1000), _v6_tcp_segment(1, sport=1001)])
    # A data offset shorter than a TCP header (16 bytes), or longer than the packet (60 bytes, 30 bytes there): the
    # sequence numbers are those that would follow if the offset were believed.
    for data_offset, payload, seq_step in ((0x40, bytes(100), 104), (0xF0, bytes(10), -30)):
        segments = []
        for index in range(2):
            tcp = TCP(sport=1000, dport=2000, seq=1000 + index * seq_step, flags="A")
            segment = bytearray(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / tcp / payload))
            segment[52] = data_offset
            segments.append(bytes(segment))
        assert _unmerged(segments)


def test_ipv6_tcp_segments_of_different_ack_window_or_options_stay_apart() -> None:
    def segment(index: int, **tcp_fields: Any) -> bytes:
        tcp = TCP(sport=1000, dport=2000, seq=1 + index * 100, flags="A", **tcp_fields)
        return bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / tcp / (bytes([index]) * 100))

    timestamp = ("Timestamp", (1, 2))
    nops_first = [("NOP", None), ("NOP", None), timestamp]
    assert len(coalesce([segment(0, options=nops_first), segment(1, options=nops_first)])) == 1
    assert _unmerged([segment(0, ack=0x01000000), segment(1, ack=0x02000000)])
    assert _unmerged([segment(0, window=0x1000), segment(1, window=0x2000)])
    assert _unmerged([segment(0, options=nops_first), segment(1, options=[timestamp, ("NOP", None), ("NOP", None)])])
    other_first_option_byte = bytearray(segment(1, options=nops_first))
    other_first_option_byte[60] = 0  # end of option list instead of a no-operation
    assert _unmerged([segment(0, options=nops_first), bytes(other_first_option_byte)])


def test_udp_datagrams_whose_udp_length_disagrees_are_not_merged() -> None:
    datagrams = [bytearray(_udp_datagram(0)), bytearray(_udp_datagram(1))]
    for datagram in datagrams:
        datagram[24:26] = (len(datagram) - 20 - 1).to_bytes(2, "big")
    assert _unmerged([bytes(datagram) for datagram in datagrams], udp=True)


def test_a_truncated_udp_header_passes_through() -> None:
    truncated = bytearray(_udp_datagram(0)[:24])
    truncated[2:4] = (24).to_bytes(2, "big")  # the IP total length agrees: only the UDP header is cut
    assert _unmerged([bytes(truncated), bytes(truncated)], udp=True)


def test_udp_datagrams_are_merged_only_when_asked() -> None:
    datagrams = [_udp_datagram(0), _udp_datagram(1)]
    assert len(coalesce(datagrams, udp=True)) == 1
    assert len(coalesce(datagrams)) == 2  # udp defaults to False


def _v4_tcp_segment(index: int, payload: bytes, seq_step: int, **ip_fields: Any) -> bytes:
    ip_fields.setdefault("id", 1 + index)
    tcp = TCP(sport=1000, dport=2000, seq=1000 + index * seq_step, flags="A")
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2", **ip_fields) / tcp / payload)


def test_a_one_byte_last_segment_joins_its_flow() -> None:
    packets = [_v4_tcp_segment(0, bytes(100), 100), _v4_tcp_segment(1, b"x", 100)]
    assert len(packets[1]) == 41
    [frame] = coalesce(packets)
    assert kernel_segments(frame) == packets


def test_segments_of_one_flow_merge_whatever_their_ip_checksum_bytes() -> None:
    # An id for the second segment that makes its IPv4 checksum start with the byte 6 (the TCP protocol number).
    header_sum = _sum16(_v4_tcp_segment(1, bytes(100), 100, id=0, chksum=0)[:20])

    def checksum_with_id(ident: int) -> int:
        total = header_sum + ident
        return ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF

    second_id = next(ident for ident in range(1, 0xFFFF) if checksum_with_id(ident) >> 8 == 6)
    packets = [_v4_tcp_segment(index, bytes(100), 100, id=second_id - 1 + index) for index in range(2)]
    assert packets[1][10] == 6
    [frame] = coalesce(packets)
    assert kernel_segments(frame) == packets


def test_ipv4_tcp_segments_that_cannot_merge_pass_through_alone() -> None:
    # Data offset 16 bytes; the sequence numbers follow as if it were believed.
    short_offset = [bytearray(_v4_tcp_segment(index, bytes(100), 104)) for index in range(2)]
    for segment in short_offset:
        segment[32] = 0x40
    assert _unmerged([bytes(segment) for segment in short_offset])
    # Link padding after the IP total length (with DF), sequence numbers as if the padding were payload.
    padded = [_v4_tcp_segment(index, bytes(100), 104, flags="DF") + bytes(4) for index in range(2)]
    assert _unmerged(padded)
    # IPv4 options with a type-of-service byte of 0x45 and TCP bytes that, read as if there were no options, would
    # make one flow: still never merged.
    optioned = []
    for index in range(2):
        tcp = TCP(sport=1000, dport=2000 + index * 104, seq=7, ack=0x50100000, flags="A")
        ip = IP(src="10.0.0.1", dst="10.0.0.2", tos=0x45, flags="DF", options=b"\x01\x01\x01\x00")
        optioned.append(bytes(ip / tcp / bytes(100)))
    assert _unmerged(optioned)


def test_ipv4_tcp_segments_with_options_merge_only_when_the_options_are_equal() -> None:
    def segment(index: int, timestamp: int = 1, payload_len: int = 100) -> bytes:
        options = [("NOP", None), ("NOP", None), ("Timestamp", (timestamp, 2))]
        tcp = TCP(sport=1000, dport=2000, seq=1000 + index * 100 * bool(payload_len), flags="A", options=options)
        return bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=1 + index) / tcp / (bytes([index]) * payload_len))

    same_options = [segment(0), segment(1)]
    [frame] = coalesce(same_options)
    assert kernel_segments(frame) == same_options
    assert _unmerged([segment(0, timestamp=1), segment(1, timestamp=2)])
    other_first_option_byte = bytearray(segment(1))
    other_first_option_byte[40] = 0  # end of option list instead of a no-operation
    assert _unmerged([segment(0), bytes(other_first_option_byte)])
    pure_acks = [segment(index, payload_len=0) for index in range(2)]  # same sequence number, no payload
    assert _unmerged(pure_acks)
