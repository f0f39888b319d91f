"""An independent packet oracle built on scapy: checksums, and segmentation the way the kernel does it.

Nothing here uses ``dataplane.packet``: tests judge our splitting and coalescing against these functions so that a bug
shared by our split and our coalesce (a round trip that agrees with itself) still shows up.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw
from scapy.utils import checksum

VNET_HDR_LEN = 10
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
F_NEEDS_CSUM = 1

_FIN, _PSH, _CWR = 0x01, 0x08, 0x80


@dataclass(frozen=True)
class VnetHeader:
    """``struct virtio_net_hdr`` decoded independently of our codec (little-endian fields)."""

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


def parse_vnet_frame(frame: bytes) -> tuple[VnetHeader, bytes]:
    return VnetHeader(*struct.unpack_from("<BBHHHH", frame)), frame[VNET_HDR_LEN:]


def parse(packet: bytes) -> Packet:
    """scapy's view of a raw IPv4 or IPv6 packet."""
    parsed: Packet = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    return parsed


def _transport(parsed: Packet) -> Packet:
    layer: Packet = parsed[TCP] if TCP in parsed else parsed[UDP]
    return layer


def checksums_ok(packet: bytes) -> bool:
    """True when scapy, rebuilding the packet with its checksums cleared, computes the checksums it carries
    (TCP/UDP, and the IPv4 header's)."""
    parsed = parse(packet)
    transport = _transport(parsed)
    stored = transport.chksum
    stored_ip = parsed.chksum if isinstance(parsed, IP) else None
    transport.chksum = None
    if isinstance(parsed, IP):
        parsed.chksum = None
    rebuilt = parse(bytes(parsed))
    if bytes(rebuilt) != packet:
        return False  # scapy changed more than the checksums: the lengths were inconsistent
    if isinstance(rebuilt, IP) and rebuilt.chksum != stored_ip:
        return False
    return bool(_transport(rebuilt).chksum == stored)


def complete_partial_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """What a device does for ``VIRTIO_NET_HDR_F_NEEDS_CSUM``: fold the one's-complement sum from ``csum_start`` to the
    end (the field holds the pseudo-header sum, so it takes part) and store its complement in the field."""
    out = bytearray(packet)
    value = checksum(bytes(out[csum_start:]))  # scapy returns the complemented fold
    field = csum_start + csum_offset
    if value == 0 and csum_offset == 6:
        value = 0xFFFF  # UDP sends "no checksum" as 0, a computed 0 as 0xFFFF
    out[field : field + 2] = struct.pack("!H", value)
    return bytes(out)


def kernel_segments(frame: bytes) -> list[bytes]:
    """The plain packets a kernel produces from one TUN write frame (``virtio_net_hdr`` + packet).

    TSO: payload cut every ``gso_size`` bytes, sequence numbers advance, FIN and PSH only on the last segment, CWR only
    on the first, IPv4 ids count up. USO: datagrams of ``gso_size`` bytes, IPv4 ids count up. Lengths and checksums are
    recomputed by scapy. Before cutting, the partial checksum of the super-packet is completed and must verify: this is
    how the kernel treats a NEEDS_CSUM super-packet it delivers or forwards whole, so a wrong partial sum fails here.
    """
    header, packet = parse_vnet_frame(frame)
    if header.flags & F_NEEDS_CSUM:
        completed = complete_partial_checksum(packet, header.csum_start, header.csum_offset)
        if not checksums_ok(completed):
            raise AssertionError("the partial checksum does not complete to a valid checksum of the super-packet")
    if header.gso_type == GSO_NONE:
        return [packet]
    parsed = parse(packet)
    transport = _transport(parsed)
    payload = bytes(transport.payload)
    size = header.gso_size
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    out: list[bytes] = []
    for index, chunk in enumerate(chunks):
        segment = parsed.copy()
        seg_transport = _transport(segment)
        seg_transport.remove_payload()
        seg_transport.chksum = None
        if isinstance(segment, IP):
            segment.len = None
            segment.chksum = None
            segment.id = (parsed.id + index) & 0xFFFF
        else:
            segment.plen = None
        if isinstance(seg_transport, TCP):
            seg_transport.seq = (transport.seq + index * size) & 0xFFFFFFFF
            flags = int(transport.flags)
            if index != len(chunks) - 1:
                flags &= ~(_FIN | _PSH)
            if index:
                flags &= ~_CWR
            seg_transport.flags = flags
        else:
            seg_transport.len = None
        seg_transport.add_payload(Raw(chunk))
        out.append(bytes(segment))
    return out


def pseudo_header_partial(packet: bytes) -> int:
    """The value the kernel leaves in a NEEDS_CSUM checksum field: the folded, uncomplemented one's-complement sum of
    the pseudo-header (addresses, protocol, whole transport length)."""
    parsed = parse(packet)
    if isinstance(parsed, IP):
        header_len = parsed.ihl * 4
        pseudo = struct.pack("!4s4sBBH", packet[12:16], packet[16:20], 0, parsed.proto, len(packet) - header_len)
    else:
        pseudo = struct.pack("!16s16sIxxxB", packet[8:24], packet[24:40], len(packet) - 40, parsed.nh)
    return ~checksum(pseudo) & 0xFFFF
