"""Every input that made a fuzz target (fuzz/) fail, replayed as a test, with the direct check of the parser behind it.

A new finding goes here as: the smallest input that reproduces it, the target that found it, and an assertion on the
parser's documented behaviour for that input.
"""

from __future__ import annotations

import struct

import pytest

from dataplane import packet as pk
from fuzz import fuzz_ip_packet


def _tso_frame(gso_type: int, l3_l4_headers: bytes, payload_length: int, gso_size: int) -> bytes:
    header = pk.VirtioNetHdr(gso_type=gso_type, gso_size=gso_size, hdr_len=len(l3_l4_headers)).encode()
    return header + l3_l4_headers + bytes(payload_length)


_IPV4_TCP = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 1, 0x4000, 64, pk.IPPROTO_TCP, 0, bytes(4), bytes(4))
_IPV4_TCP += struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 5 << 4, pk.TCP_ACK, 0, 0, 0)
_IPV4_TCP_WITH_OPTION = bytes([0x46]) + _IPV4_TCP[1:20] + bytes(4) + _IPV4_TCP[20:]
_IPV6_TCP = struct.pack("!IHBB16s16s", 6 << 28, 0, pk.IPPROTO_TCP, 64, bytes(16), bytes(16)) + _IPV4_TCP[20:]
_IPV4_UDP = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 1, 0, 64, pk.IPPROTO_UDP, 0, bytes(4), bytes(4)) + bytes(8)

# fuzz_ip_packet: a TUN frame of the largest size the reader accepts (65536 bytes after the virtio_net_hdr) whose
# gso_size lets the first segment outgrow the 16-bit IP length fields raised struct.error out of split_gso, which the
# TUN reader does not catch (it drops only PacketParseError).
OVERSIZED_SEGMENTS = [
    pytest.param(pk.VIRTIO_NET_HDR_GSO_TCPV4, _IPV4_TCP, id="tso-ipv4"),
    pytest.param(pk.VIRTIO_NET_HDR_GSO_TCPV4, _IPV4_TCP_WITH_OPTION, id="tso-ipv4-options"),
    pytest.param(pk.VIRTIO_NET_HDR_GSO_TCPV6, _IPV6_TCP, id="tso-ipv6"),
    pytest.param(pk.VIRTIO_NET_HDR_GSO_UDP_L4, _IPV4_UDP, id="uso-ipv4"),
]


@pytest.mark.parametrize(("gso_type", "headers"), OVERSIZED_SEGMENTS)
def test_segment_longer_than_an_ip_packet_is_a_parse_error(gso_type: int, headers: bytes) -> None:
    frame = _tso_frame(gso_type, headers, 65536 - len(headers), gso_size=0xFFFF)
    with pytest.raises(pk.PacketParseError, match="segment longer than an IP packet"):
        pk.split_gso(pk.VirtioNetHdr.decode(frame), frame[pk.VIRTIO_NET_HDR_LEN :])
    fuzz_ip_packet.TestOneInput(fuzz_ip_packet.join([frame]))


@pytest.mark.parametrize(("gso_type", "headers"), OVERSIZED_SEGMENTS)
def test_the_same_frame_with_mtu_sized_segments_still_splits(gso_type: int, headers: bytes) -> None:
    frame = _tso_frame(gso_type, headers, 65536 - len(headers), gso_size=1400)
    segments = pk.split_gso(pk.VirtioNetHdr.decode(frame), frame[pk.VIRTIO_NET_HDR_LEN :])
    assert len(segments) == -(-(65536 - len(headers)) // 1400)
    assert max(len(segment) for segment in segments) == len(headers) + 1400
