"""dataplane.packet judged by an independent implementation: packets are built by scapy, and what our TSO/USO split and
our coalescing produce is compared with what scapy computes (checksums, lengths) and with the kernel's segmentation
rules as tests/packet_oracle.py states them, never with our own split_gso."""

from __future__ import annotations

import random
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from dataplane import packet as pk
from tests.packet_oracle import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    checksums_ok,
    kernel_segments,
    parse_vnet_frame,
    pseudo_header_partial,
)

_IPV4_OPTIONS = [b"", b"\x01\x01\x01\x00", b"\x07\x07\x04" + bytes(4) + b"\x00"]  # none, NOPs+EOL, record route
_TCP_OPTIONS: list[list[tuple[str, Any]]] = [[], [("NOP", None), ("NOP", None), ("Timestamp", (12345, 678))]]
_TCP_FLAG_BITS = st.sets(st.sampled_from(["P", "F", "U", "C", "E"]))


@st.composite
def ip_layers(draw: st.DrawFn) -> Packet:
    if draw(st.booleans()):
        return IP(
            src="192.0.2.10",
            dst="198.51.100.20",
            id=draw(st.integers(0, 0xFFFF)),
            tos=draw(st.integers(0, 255)),
            ttl=draw(st.integers(1, 255)),
            flags="DF",
            options=draw(st.sampled_from(_IPV4_OPTIONS)),
        )
    return IPv6(src="2001:db8::10", dst="2001:db8:1::20", tc=draw(st.integers(0, 255)), hlim=draw(st.integers(1, 255)))


def _with_partial_checksum(packet: bytes, csum_offset: int) -> tuple[bytes, int]:
    """The packet as the kernel hands a NEEDS_CSUM frame over: the checksum field holds the pseudo-header sum."""
    header_len = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    out = bytearray(packet)
    struct.pack_into("!H", out, header_len + csum_offset, pseudo_header_partial(packet))
    return bytes(out), header_len


# Sizes are drawn explicitly: st.binary mostly yields short strings, which would rarely span more than one segment.
payloads = st.builds(lambda length, seed: random.Random(seed).randbytes(length), st.integers(1, 6000), st.integers())


def _frame(header: pk.VirtioNetHdr, packet: bytes) -> bytes:
    return header.encode() + packet


@settings(max_examples=80)
@given(
    ip_layers(),
    st.integers(0, 0xFFFFFFFF),
    _TCP_FLAG_BITS,
    st.integers(0, 0xFFFF),
    st.sampled_from(_TCP_OPTIONS),
    payloads,
    st.integers(200, 1460),
)
def test_tso_split_equals_kernel_segmentation(
    ip: Packet, seq: int, flags: set[str], urgent: int, options: list[tuple[str, Any]], payload: bytes, mss: int
) -> None:
    tcp = TCP(
        sport=40001, dport=443, seq=seq, ack=99, flags="A" + "".join(sorted(flags)), urgptr=urgent, options=options
    )
    packet, header_len = _with_partial_checksum(bytes(ip / tcp / payload), 16)
    headers = header_len + TCP(packet[header_len:]).dataofs * 4
    gso = pk.VIRTIO_NET_HDR_GSO_TCPV4 if isinstance(ip, IP) else pk.VIRTIO_NET_HDR_GSO_TCPV6
    header = pk.VirtioNetHdr(pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, headers, mss, header_len, 16)
    ours = pk.split_gso(header, packet)
    assert ours == kernel_segments(_frame(header, packet))
    assert all(checksums_ok(segment) for segment in ours)


@settings(max_examples=60)
@given(ip_layers(), payloads, st.integers(100, 1472))
def test_uso_split_equals_kernel_segmentation(ip: Packet, payload: bytes, size: int) -> None:
    packet, header_len = _with_partial_checksum(bytes(ip / UDP(sport=5353, dport=4500) / payload), 6)
    header = pk.VirtioNetHdr(
        pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, pk.VIRTIO_NET_HDR_GSO_UDP_L4, header_len + 8, size, header_len, 6
    )
    ours = pk.split_gso(header, packet)
    assert ours == kernel_segments(_frame(header, packet))
    assert all(checksums_ok(segment) for segment in ours)


@settings(max_examples=60)
@given(ip_layers(), st.booleans(), st.binary(min_size=0, max_size=1500))
def test_needs_csum_completion_equals_scapys_checksum(ip: Packet, is_tcp: bool, payload: bytes) -> None:
    transport = TCP(sport=1, dport=2, flags="PA", seq=5) if is_tcp else UDP(sport=1, dport=2)
    complete = bytes(ip / transport / payload)
    offset = 16 if is_tcp else 6
    partial, header_len = _with_partial_checksum(complete, offset)
    header = pk.VirtioNetHdr(pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, header_len, offset)
    assert pk.split_gso(header, partial) == [complete]


@st.composite
def flows(draw: st.DrawFn) -> list[list[bytes]]:
    """One or two flows of consecutive segments as a sender's kernel emits them: equal-size segments, a last one no
    larger, consecutive IPv4 ids, ACK only (PSH possibly on the last), valid checksums (scapy's)."""
    is_tcp = draw(st.booleans())
    version6 = draw(st.booleans())
    out: list[list[bytes]] = []
    for flow in range(draw(st.integers(1, 2))):
        size = draw(st.integers(1, 1400))
        count = draw(st.integers(1, 20))
        last = draw(st.integers(1, size))
        first_id = draw(st.integers(0, 0xFFFF))
        seq = draw(st.integers(0, 0xFFFFFFFF))
        push = draw(st.booleans())
        segments = []
        offset = 0
        for index in range(count):
            length = last if index == count - 1 else size
            ip: Packet = (
                IPv6(src="2001:db8::1", dst="2001:db8::2")
                if version6
                else IP(src="10.0.0.1", dst="10.0.0.2", id=(first_id + index) & 0xFFFF, flags="DF")
            )
            body = bytes((flow * 31 + index + i) & 0xFF for i in range(length))
            if is_tcp:
                flags = "PA" if push and index == count - 1 else "A"
                l4: Packet = TCP(sport=50000 + flow, dport=443, seq=(seq + offset) & 0xFFFFFFFF, ack=1, flags=flags)
            else:
                l4 = UDP(sport=50000 + flow, dport=443)
            segments.append(bytes(ip / l4 / body))
            offset += length
        out.append(segments)
    return out


@settings(max_examples=80)
@given(flows(), st.randoms(use_true_random=False))
def test_coalesced_frames_segment_back_into_the_same_packets(flow_list: list[list[bytes]], rng: Any) -> None:
    # Interleave the flows, keeping each flow's own order, as packets arrive from several peers.
    pending = [list(flow) for flow in flow_list]
    arrival: list[bytes] = []
    while any(pending):
        choice = rng.choice([f for f in pending if f])
        arrival.append(choice.pop(0))
    frames = pk.coalesce(arrival, tcp=True, udp=True)
    produced: dict[bytes, list[bytes]] = {}
    for frame in frames:
        header, _ = parse_vnet_frame(frame)
        assert header.gso_type in (0, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4)
        for segment in kernel_segments(frame):
            produced.setdefault(_flow_key(segment), []).append(segment)
    assert produced == {_flow_key(flow[0]): flow for flow in flow_list}
    if any(len(flow) > 1 for flow in flow_list):
        assert len(frames) < len(arrival), "nothing merged: the generator no longer produces mergeable flows"


def _flow_key(packet: bytes) -> bytes:
    header_len = 20 if packet[0] >> 4 == 4 else 40
    return packet[header_len : header_len + 4]  # the ports tell the generated flows apart
