"""Packet parsing and checksum rules whose error paths no test reached (``make mutate``, issue 11).

RFC 791/8200 headers, RFC 768/793 checksums (scapy builds the packets and computes the checksums as an independent
oracle), RFC 768's "a UDP checksum of 0 over IPv4 means none", and the refusals of the TSO/USO splitter and the GRO
coalescer for frames that do not make sense.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from dataplane.packet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
    PacketParseError,
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
