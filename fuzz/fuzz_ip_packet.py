"""IP packets: what peers send through the tunnel and what the TUN device hands over (with a ``virtio_net_hdr``).

The input is a sequence of packets (:func:`fuzz.harness.split_datagrams`). Each goes through the header parsers, the
checksum and flow-hash helpers and, read as a TUN frame, ``VirtioNetHdr.decode`` + ``split_gso``; the sequence goes
through ``coalesce`` (the TUN write path). Invariants: only PacketParseError is raised; ``split_gso`` makes no more
segments than there are bytes and none over MAX_IP_PACKET; every frame ``coalesce`` emits splits again into exactly the packets it merged, in order.
"""

from __future__ import annotations

import struct

from dataplane import packet as pk
from fuzz.harness import fuzz_main, join_datagrams, split_datagrams

# Frames up to the TUN reader's 65536 + 10 bytes need a 3-byte length prefix; libFuzzer must be allowed that long too.
LENGTH_WIDTH = 3
MAX_INPUT_LENGTH = 2 * (LENGTH_WIDTH + 65536 + pk.VIRTIO_NET_HDR_LEN)

SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6, DST6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")


def join(packets: list[bytes]) -> bytes:
    return join_datagrams(packets, width=LENGTH_WIDTH)


def _ipv4(protocol: int, l4: bytes, ident: int = 1) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000, 64, protocol, 0, SRC4, DST4))
    header[10:12] = pk.ipv4_header_checksum(header).to_bytes(2, "big")
    return bytes(header) + l4


def _ipv6(protocol: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(l4), protocol, 64, SRC6, DST6) + l4


def _with_l4_checksum(packet: bytes, src: bytes, dst: bytes, protocol: int, offset: int, field: int) -> bytes:
    segment = packet[offset:]
    checksum = pk.internet_checksum(segment, pk.pseudo_header_sum(src, dst, protocol, len(segment)))
    return packet[: offset + field] + checksum.to_bytes(2, "big") + packet[offset + field + 2 :]


def _tcp(seq: int, payload: bytes, flags: int = pk.TCP_ACK) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 443, seq, 1, 5 << 4, flags, 65535, 0, 0) + payload


def _udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload


def seeds() -> list[bytes]:
    tcp4 = [
        _with_l4_checksum(_ipv4(6, _tcp(1000 + 100 * i, bytes([i]) * 100), i), SRC4, DST4, 6, 20, 16) for i in range(4)
    ]
    tcp6 = [_with_l4_checksum(_ipv6(6, _tcp(5000 + 64 * i, b"x" * 64)), SRC6, DST6, 6, 40, 16) for i in range(3)]
    udp4 = _with_l4_checksum(_ipv4(17, _udp(b"query")), SRC4, DST4, 17, 20, 6)
    udp6 = _with_l4_checksum(_ipv6(17, _udp(b"query")), SRC6, DST6, 17, 40, 6)
    icmp4 = _ipv4(1, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping")
    icmp6 = _ipv6(58, struct.pack("!BBHHH", 128, 0, 0, 1, 1) + b"ping")
    syn = _with_l4_checksum(_ipv4(6, _tcp(1, b"", pk.TCP_SYN)), SRC4, DST4, 6, 20, 16)
    frames = pk.coalesce(tcp4) + pk.coalesce(tcp6)
    singles = [udp4, udp6, icmp4, icmp6, syn]
    # The largest frame the TUN reader takes: 65536 bytes of TSO super-packet in MSS-sized segments.
    big = _ipv4(6, _tcp(1, b""))
    big_frame = pk.VirtioNetHdr(gso_type=pk.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=40, gso_size=1400).encode()
    big_frame += big + bytes(65536 - len(big))
    return [join(tcp4), join(tcp6), join(singles), *(join([f]) for f in [*frames, big_frame])]


def _check_packet(data: bytes) -> None:
    pk.flow_hash(data)
    try:
        ip = pk.parse_ip(data)
    except pk.PacketParseError:
        return
    _ = (ip.src_ip, ip.dst_ip)
    for parse in (pk.parse_tcp, pk.parse_udp, pk.parse_icmp):
        try:
            parse(data, ip)
        except pk.PacketParseError:
            pass
    try:
        pk.l4_checksum_valid(data)
    except pk.PacketParseError:
        pass
    if ip.version == 4:
        pk.ipv4_header_checksum(data)


def _check_frame(data: bytes) -> None:
    try:
        header = pk.VirtioNetHdr.decode(data)
        segments = pk.split_gso(header, data[pk.VIRTIO_NET_HDR_LEN :])
    except pk.PacketParseError:
        return
    # The kernel sets gso_size, so tiny segments are legal; each still carries at least one payload byte.
    if len(segments) > max(1, len(data)) or any(len(segment) > pk.MAX_IP_PACKET for segment in segments):
        raise AssertionError(f"split_gso made {len(segments)} segments out of {len(data)} bytes")


def _check_coalesce(packets: list[bytes]) -> None:
    frames = pk.coalesce(packets, tcp=True, udp=True)
    resplit: list[bytes] = []
    for frame in frames:
        header = pk.VirtioNetHdr.decode(frame)
        resplit += pk.split_gso(header, frame[pk.VIRTIO_NET_HDR_LEN :])
    if len(resplit) != len(packets):
        raise AssertionError(f"coalesce turned {len(packets)} packets into frames that split into {len(resplit)}")


def TestOneInput(data: bytes) -> None:
    packets = split_datagrams(data, limit=16, width=LENGTH_WIDTH)
    for packet in packets:
        _check_packet(packet)
        _check_frame(packet)
    _check_coalesce(packets)


if __name__ == "__main__":
    fuzz_main("fuzz_ip_packet")
