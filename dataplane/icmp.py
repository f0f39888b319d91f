"""ICMP "destination unreachable" replies the gateway sends back through the tunnel (docs/protocol.md §3.3, §3.4).

A client whose packet the gateway refuses gets an ICMP error quoting that packet; the client uses it to ask the portal
for a fresh authorization. The reply is addressed from the packet's destination to its source, so to the client it
looks like an answer from the resource it tried to reach.

Quoting follows the RFCs' upper bounds rather than their minimum: ICMPv4 quotes as much of the packet as keeps the
reply within 576 bytes (RFC 1812 §4.3.2.3), ICMPv6 as much as keeps it within the IPv6 minimum MTU of 1280 bytes
(RFC 4443 §2.4 c). Both fit the tunnel MTU.

No error is generated where RFC 1122 §3.2.2, RFC 1812 §4.3.2.7 and RFC 4443 §2.4 e forbid one: about an ICMP error (or
an ICMPv6 redirect), a non-initial fragment, a multicast or broadcast destination, or a source that does not name a
single host.
"""

from __future__ import annotations

import enum
import struct

from dataplane.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    internet_checksum,
    pseudo_header_sum,
)

ICMP_HEADER_LEN = 8
ICMPV4_MAX_REPLY_LEN = 576
ICMPV6_MAX_REPLY_LEN = 1280
REPLY_HOP_LIMIT = 64

ICMPV4_DEST_UNREACHABLE = 3
ICMPV6_DEST_UNREACHABLE = 1

# ICMPv4 types that are error messages (RFC 792, RFC 1812 §4.3.2.7): unreachable, source quench, redirect, time exceeded,
# parameter problem.
ICMPV4_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))
# ICMPv6 error messages are types 0-127 (RFC 4443 §2.1); a redirect (137) must not be answered either (§2.4 e).
ICMPV6_REDIRECT = 137
_IPV6_FRAGMENT_HEADER = 44
_LIMITED_BROADCAST = b"\xff\xff\xff\xff"

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_ICMP_HEADER = struct.Struct("!BBHI")
_IPV6_FIXED = struct.Struct("!IHBB16s16s")


class UnreachableKind(enum.Enum):
    """Which "destination unreachable" to send, with its (ICMPv4 code, ICMPv6 code)."""

    # Filtered or not authorized: ICMPv4 3/13 "communication administratively prohibited", ICMPv6 1/1.
    PROHIBITED = (13, 1)
    # A destination the gateway will not route (Internet-resource exclusions, untranslatable DNS proxy IP): ICMPv4 3/0
    # "network unreachable"; ICMPv6 1/3 "address unreachable", the code Firezone's gateway uses for this case.
    NETWORK = (0, 3)

    @property
    def icmpv4_code(self) -> int:
        return self.value[0]

    @property
    def icmpv6_code(self) -> int:
        return self.value[1]


def destination_unreachable(packet: bytes | bytearray | memoryview, kind: UnreachableKind) -> bytes | None:
    """The ICMP destination-unreachable reply to ``packet`` (an IPv4 or IPv6 packet), or None when no error may be
    sent about it (see the module docstring) or it is not a well-formed IP header."""
    if len(packet) < 1:
        return None
    version = packet[0] >> 4
    if version == 4:
        return _unreachable_v4(packet, kind.icmpv4_code)
    if version == 6:
        return _unreachable_v6(packet, kind.icmpv6_code)
    return None


def _unreachable_v4(packet: bytes | bytearray | memoryview, code: int) -> bytes | None:
    if len(packet) < IPV4_HEADER_LEN:
        return None
    header_len = (packet[0] & 0x0F) * 4
    total_len = (packet[2] << 8) | packet[3]
    if header_len < IPV4_HEADER_LEN or total_len < header_len or total_len > len(packet):
        return None
    if ((packet[6] & 0x1F) << 8) | packet[7]:
        return None  # not the first fragment
    src = bytes(packet[12:16])
    dst = bytes(packet[16:20])
    if not _ipv4_names_one_host(src) or dst[0] >> 4 == 0xE or dst == _LIMITED_BROADCAST:
        return None
    if packet[9] == IPPROTO_ICMP:
        if total_len - header_len < 1 or packet[header_len] in ICMPV4_ERROR_TYPES:
            return None
    quoted = bytes(packet[: min(total_len, ICMPV4_MAX_REPLY_LEN - IPV4_HEADER_LEN - ICMP_HEADER_LEN)])
    icmp = bytearray(_ICMP_HEADER.pack(ICMPV4_DEST_UNREACHABLE, code, 0, 0))
    icmp += quoted
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    reply_len = IPV4_HEADER_LEN + len(icmp)
    header = bytearray(_IPV4_HEADER.pack(0x45, 0, reply_len, 0, 0, REPLY_HOP_LIMIT, IPPROTO_ICMP, 0, dst, src))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header + icmp)


def _ipv4_names_one_host(address: bytes) -> bool:
    """False for 0/8 ("this network"), 127/8 (loopback), 224/4 multicast and 240/4 (incl. limited broadcast)."""
    first = address[0]
    return first != 0 and first != 127 and first < 224


def _unreachable_v6(packet: bytes | bytearray | memoryview, code: int) -> bytes | None:
    if len(packet) < IPV6_HEADER_LEN:
        return None
    total_len = IPV6_HEADER_LEN + ((packet[4] << 8) | packet[5])
    if total_len > len(packet):
        return None
    src = bytes(packet[8:24])
    dst = bytes(packet[24:40])
    if src[0] == 0xFF or not any(src) or dst[0] == 0xFF:  # multicast source or destination, unspecified source
        return None
    next_header = packet[6]
    l4_offset = IPV6_HEADER_LEN
    if next_header == _IPV6_FRAGMENT_HEADER:
        # Only the first fragment (offset 0) may be answered; other extension headers are not walked.
        if total_len < IPV6_HEADER_LEN + 8 or ((packet[42] << 8) | packet[43]) & 0xFFF8:
            return None
        next_header = packet[IPV6_HEADER_LEN]
        l4_offset += 8
    if next_header == IPPROTO_ICMPV6:
        if total_len <= l4_offset:
            return None
        icmp_type = packet[l4_offset]
        if icmp_type < 128 or icmp_type == ICMPV6_REDIRECT:
            return None
    quoted = bytes(packet[: min(total_len, ICMPV6_MAX_REPLY_LEN - IPV6_HEADER_LEN - ICMP_HEADER_LEN)])
    icmp = bytearray(_ICMP_HEADER.pack(ICMPV6_DEST_UNREACHABLE, code, 0, 0))
    icmp += quoted
    checksum = internet_checksum(icmp, pseudo_header_sum(dst, src, IPPROTO_ICMPV6, len(icmp)))
    struct.pack_into("!H", icmp, 2, checksum)
    header = _IPV6_FIXED.pack(6 << 28, len(icmp), IPPROTO_ICMPV6, REPLY_HOP_LIMIT, dst, src)
    return header + bytes(icmp)
