"""dataplane.icmp: destination-unreachable replies judged by scapy (fields, checksums, quoted bytes) and the RFC cases
where no error may be sent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_Redirect,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrFragment,
    in6_chksum,
)
from scapy.packet import Packet, Raw
from scapy.utils import checksum

from dataplane.icmp import UnreachableKind, destination_unreachable

CLIENT4, RESOURCE4 = "100.64.0.7", "172.20.1.2"
CLIENT6, RESOURCE6 = "fd00:2021:1111::7", "2001:db8::2"


def _v4_reply_ok(original: bytes, reply: bytes, code: int) -> None:
    sent = IP(original)
    got = IP(reply)
    assert got.version == 4 and got.ihl == 5 and got.proto == 1
    assert got.src == sent.dst and got.dst == sent.src
    assert got.len == len(reply) <= 576
    assert got.ttl > 0
    header = reply[:20]
    assert checksum(header) == 0, "IPv4 header checksum"
    icmp = reply[20:]
    assert checksum(icmp) == 0, "ICMP checksum"
    assert got[ICMP].type == 3 and got[ICMP].code == code
    assert icmp[4:8] == bytes(4)
    quoted = icmp[8:]
    assert quoted == original[: len(quoted)]
    assert len(quoted) == min(sent.len, 576 - 28)


def _v6_reply_ok(original: bytes, reply: bytes, code: int) -> None:
    sent = IPv6(original)
    got = IPv6(reply)
    assert got.version == 6 and got.nh == 58
    assert got.src == sent.dst and got.dst == sent.src
    assert 40 + got.plen == len(reply) <= 1280
    assert got.hlim > 0
    icmp = reply[40:]
    assert in6_chksum(58, got, icmp) == 0, "ICMPv6 checksum over the pseudo-header"
    assert got[ICMPv6DestUnreach].type == 1 and got[ICMPv6DestUnreach].code == code
    assert icmp[4:8] == bytes(4)
    quoted = icmp[8:]
    assert quoted == original[: len(quoted)]
    assert len(quoted) == min(40 + sent.plen, 1280 - 48)


@pytest.mark.parametrize(
    ("kind", "code"),
    [(UnreachableKind.PROHIBITED, 13), (UnreachableKind.NETWORK, 0)],
)
@pytest.mark.parametrize(
    "layer",
    [
        TCP(sport=40000, dport=443, flags="S"),
        UDP(sport=5353, dport=53) / Raw(b"q" * 30),
        ICMP(type=8, id=7, seq=1) / Raw(b"ping"),
        Raw(b"\x00" * 12),  # protocol 0 behind the header below
    ],
)
def test_ipv4_reply_fields_checksums_and_quote(layer: Packet, kind: UnreachableKind, code: int) -> None:
    original = bytes(IP(src=CLIENT4, dst=RESOURCE4, ttl=63) / layer)
    reply = destination_unreachable(original, kind)
    assert reply is not None
    _v4_reply_ok(original, reply, code)


@pytest.mark.parametrize(
    ("kind", "code"),
    [(UnreachableKind.PROHIBITED, 1), (UnreachableKind.NETWORK, 3)],
)
@pytest.mark.parametrize(
    "layer",
    [
        TCP(sport=40000, dport=443, flags="S"),
        UDP(sport=5353, dport=53) / Raw(b"q" * 30),
        ICMPv6EchoRequest(id=7, seq=1, data=b"ping"),
        ICMPv6EchoReply(id=7, seq=1),
    ],
)
def test_ipv6_reply_fields_checksums_and_quote(layer: Packet, kind: UnreachableKind, code: int) -> None:
    original = bytes(IPv6(src=CLIENT6, dst=RESOURCE6, hlim=63) / layer)
    reply = destination_unreachable(original, kind)
    assert reply is not None
    _v6_reply_ok(original, reply, code)


def test_ipv4_options_are_quoted_and_trailing_bytes_beyond_total_length_are_not() -> None:
    original = bytes(IP(src=CLIENT4, dst=RESOURCE4, options=b"\x01\x01\x01\x00") / UDP(dport=53))
    reply = destination_unreachable(original + b"junk", UnreachableKind.PROHIBITED)
    assert reply is not None
    _v4_reply_ok(original, reply, 13)
    assert reply[28:] == original


@given(st.integers(min_value=0, max_value=1400), st.booleans())
def test_large_packets_are_quoted_up_to_the_rfc_limits(payload_len: int, v6: bool) -> None:
    if v6:
        original = bytes(IPv6(src=CLIENT6, dst=RESOURCE6) / UDP(dport=9) / Raw(b"x" * payload_len))
        reply = destination_unreachable(original, UnreachableKind.PROHIBITED)
        assert reply is not None
        _v6_reply_ok(original, reply, 1)
    else:
        original = bytes(IP(src=CLIENT4, dst=RESOURCE4) / UDP(dport=9) / Raw(b"x" * payload_len))
        reply = destination_unreachable(original, UnreachableKind.PROHIBITED)
        assert reply is not None
        _v4_reply_ok(original, reply, 13)


def test_first_fragment_is_answered() -> None:
    v4 = bytes(IP(src=CLIENT4, dst=RESOURCE4, flags="MF", frag=0) / UDP(dport=9) / Raw(b"x" * 64))
    v6 = bytes(IPv6(src=CLIENT6, dst=RESOURCE6) / IPv6ExtHdrFragment(offset=0, m=1) / UDP(dport=9) / Raw(b"x" * 64))
    assert destination_unreachable(v4, UnreachableKind.PROHIBITED) is not None
    assert destination_unreachable(v6, UnreachableKind.PROHIBITED) is not None


NEVER_ANSWERED = [
    # ICMP errors (RFC 1122 §3.2.2, RFC 4443 §2.4 e)
    IP(src=CLIENT4, dst=RESOURCE4) / ICMP(type=3, code=1) / IP(src=RESOURCE4, dst=CLIENT4) / UDP(),
    IP(src=CLIENT4, dst=RESOURCE4) / ICMP(type=11, code=0) / IP(src=RESOURCE4, dst=CLIENT4) / UDP(),
    IP(src=CLIENT4, dst=RESOURCE4) / ICMP(type=12),
    IP(src=CLIENT4, dst=RESOURCE4) / ICMP(type=5),
    IP(src=CLIENT4, dst=RESOURCE4) / ICMP(type=4),
    IPv6(src=CLIENT6, dst=RESOURCE6) / ICMPv6DestUnreach() / IPv6(src=RESOURCE6, dst=CLIENT6) / UDP(),
    IPv6(src=CLIENT6, dst=RESOURCE6) / ICMPv6PacketTooBig(mtu=1280),
    IPv6(src=CLIENT6, dst=RESOURCE6) / ICMPv6TimeExceeded(),
    IPv6(src=CLIENT6, dst=RESOURCE6) / ICMPv6ParamProblem(),
    IPv6(src=CLIENT6, dst=RESOURCE6) / ICMPv6ND_Redirect(),
    IPv6(src=CLIENT6, dst=RESOURCE6) / IPv6ExtHdrFragment(offset=0, m=1) / ICMPv6DestUnreach(),
    # non-initial fragments
    IP(src=CLIENT4, dst=RESOURCE4, frag=8) / Raw(b"x" * 16),
    IPv6(src=CLIENT6, dst=RESOURCE6) / IPv6ExtHdrFragment(offset=8, nh=17) / Raw(b"x" * 16),
    # multicast / broadcast destinations, sources that name no single host
    IP(src=CLIENT4, dst="224.0.0.251") / UDP(dport=5353),
    IP(src=CLIENT4, dst="255.255.255.255") / UDP(dport=67),
    IP(src="0.0.0.0", dst=RESOURCE4) / UDP(dport=67),
    IP(src="127.0.0.1", dst=RESOURCE4) / UDP(dport=67),
    IP(src="239.1.1.1", dst=RESOURCE4) / UDP(dport=67),
    IPv6(src=CLIENT6, dst="ff02::fb") / UDP(dport=5353),
    IPv6(src="::", dst=RESOURCE6) / UDP(dport=547),
    IPv6(src="ff02::1", dst=RESOURCE6) / UDP(dport=547),
]


@pytest.mark.parametrize("packet", NEVER_ANSWERED, ids=lambda p: p.summary())
def test_no_error_about_errors_fragments_multicast_or_unnamed_sources(packet: Packet) -> None:
    for kind in UnreachableKind:
        assert destination_unreachable(bytes(packet), kind) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x45",
        b"\x45" + bytes(18),  # truncated IPv4 header
        bytes(IP(src=CLIENT4, dst=RESOURCE4) / UDP())[:-1],  # total length beyond the buffer
        b"\x44" + bytes(IP(src=CLIENT4, dst=RESOURCE4) / UDP())[1:],  # IHL below 5
        bytes(IPv6(src=CLIENT6, dst=RESOURCE6) / UDP())[:-1],
        b"\x60" + bytes(30),
        b"\x50" + bytes(40),  # version 5
        bytes(IP(src=CLIENT4, dst=RESOURCE4, proto=1)),  # ICMP with no ICMP header: its type is unknown
        bytes(IPv6(src=CLIENT6, dst=RESOURCE6, nh=58)),
    ],
)
def test_malformed_input_gets_no_reply(data: bytes) -> None:
    assert destination_unreachable(data, UnreachableKind.PROHIBITED) is None


@given(st.binary(max_size=120), st.sampled_from(list(UnreachableKind)))
def test_never_raises_on_garbage(data: bytes, kind: UnreachableKind) -> None:
    reply = destination_unreachable(data, kind)
    if reply is not None:
        assert reply[0] >> 4 in (4, 6)
