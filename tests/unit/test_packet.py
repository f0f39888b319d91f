"""dataplane.packet: checksums against a naive reference, views, TSO/USO split and GRO-style coalescing."""

from __future__ import annotations

import struct

import pytest

from dataplane import packet as pk


def naive_checksum(data: bytes) -> int:
    """RFC 1071 written the slow, obvious way: add 16-bit words with end-around carry, then complement."""
    if len(data) % 2:
        data = data + b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def naive_l4_ok(packet: bytes) -> bool:
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0xF) * 4
        src, dst, proto = packet[12:16], packet[16:20], packet[9]
        total = struct.unpack("!H", packet[2:4])[0]
    else:
        ihl = 40
        src, dst, proto = packet[8:24], packet[24:40], packet[6]
        total = 40 + struct.unpack("!H", packet[4:6])[0]
    segment = packet[ihl:total]
    if version == 4:
        pseudo = src + dst + bytes([0, proto]) + struct.pack("!H", len(segment))
    else:
        pseudo = src + dst + struct.pack("!I", len(segment)) + bytes([0, 0, 0, proto])
    return naive_checksum(pseudo + segment) == 0


def naive_ipv4_header_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0xF) * 4
    return naive_checksum(packet[:ihl]) == 0


V4_SRC = bytes([10, 0, 0, 1])
V4_DST = bytes([10, 0, 0, 2])
V6_SRC = bytes.fromhex("fd000000000000000000000000000001")
V6_DST = bytes.fromhex("fd000000000000000000000000000002")


def tcp_packet(
    payload: bytes,
    *,
    seq: int = 1000,
    flags: int = pk.TCP_ACK,
    version: int = 4,
    ip_id: int = 7,
    options: bytes = b"",
    checksum: bool = True,
    window: int = 500,
) -> bytes:
    thlen = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 555, (thlen // 4) << 4, flags, window, 0, 0) + options)
    src, dst = (V4_SRC, V4_DST) if version == 4 else (V6_SRC, V6_DST)
    if checksum:
        tcp_len = len(tcp) + len(payload)
        pseudo = pk.pseudo_header_sum(src, dst, pk.IPPROTO_TCP, tcp_len)
        struct.pack_into("!H", tcp, 16, pk.internet_checksum(bytes(tcp) + payload, pseudo))
    return ip_wrap(bytes(tcp) + payload, pk.IPPROTO_TCP, version=version, ip_id=ip_id)


def udp_packet(payload: bytes, *, version: int = 4, ip_id: int = 7, sport: int = 40000) -> bytes:
    src, dst = (V4_SRC, V4_DST) if version == 4 else (V6_SRC, V6_DST)
    udp = bytearray(struct.pack("!HHHH", sport, 5201, 8 + len(payload), 0))
    checksum = pk.internet_checksum(
        bytes(udp) + payload, pk.pseudo_header_sum(src, dst, pk.IPPROTO_UDP, len(udp) + len(payload))
    )
    struct.pack_into("!H", udp, 6, checksum or 0xFFFF)
    return ip_wrap(bytes(udp) + payload, pk.IPPROTO_UDP, version=version, ip_id=ip_id)


def ip_wrap(l4: bytes, protocol: int, *, version: int = 4, ip_id: int = 7) -> bytes:
    if version == 4:
        header = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ip_id, 0x4000, 64, protocol, 0, V4_SRC, V4_DST)
        )
        struct.pack_into("!H", header, 10, naive_checksum(bytes(header)))
        return bytes(header) + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), protocol, 64, V6_SRC, V6_DST) + l4


# -- checksums -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\xff",
        b"\x00\x00",
        b"\xff\xff",
        b"\xff\xff\xff\xff",
        bytes(range(256)) * 7,
        b"\x01\x02\x03",
        b"\xff" * 1501,
    ],
)
def test_internet_checksum_matches_naive_reference(data: bytes) -> None:
    assert pk.internet_checksum(data) == naive_checksum(data)


def test_rfc1071_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded), checksum 220d.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert pk.ones_complement_sum(data) == 0xDDF2
    assert pk.internet_checksum(data) == 0x220D


def test_ipv4_header_checksum_ignores_stored_value() -> None:
    packet = udp_packet(b"hello")
    assert pk.ipv4_header_checksum(packet[:20]) == struct.unpack("!H", packet[10:12])[0]
    zeroed = packet[:10] + b"\x00\x00" + packet[12:20]
    assert pk.ipv4_header_checksum(zeroed) == struct.unpack("!H", packet[10:12])[0]


# -- views -----------------------------------------------------------------------------------------------------------


def test_parse_tcp_and_udp_views() -> None:
    packet = tcp_packet(b"abc", seq=99, flags=pk.TCP_ACK | pk.TCP_PSH)
    ip = pk.parse_ip(packet)
    assert (ip.version, ip.header_len, ip.protocol, ip.total_len) == (4, 20, pk.IPPROTO_TCP, len(packet))
    assert str(ip.src_ip) == "10.0.0.1" and str(ip.dst_ip) == "10.0.0.2"
    tcp = pk.parse_tcp(packet, ip)
    assert (tcp.src_port, tcp.dst_port, tcp.seq, tcp.ack, tcp.flags) == (40000, 5201, 99, 555, pk.TCP_ACK | pk.TCP_PSH)
    v6 = udp_packet(b"xyz", version=6)
    ip6 = pk.parse_ip(v6)
    assert ip6.version == 6 and pk.parse_udp(v6, ip6) == pk.UdpView(40000, 5201, 11)
    assert pk.l4_checksum_valid(packet) and pk.l4_checksum_valid(v6)
    assert naive_l4_ok(packet) and naive_l4_ok(v6)


def test_parse_icmp_echo() -> None:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"ping")
    struct.pack_into("!H", icmp, 2, naive_checksum(bytes(icmp)))
    packet = ip_wrap(bytes(icmp), pk.IPPROTO_ICMP)
    view = pk.parse_icmp(packet, pk.parse_ip(packet))
    assert (view.type, view.code, view.rest) == (8, 0, 0x12340001)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x45",
        b"\x60" + bytes(10),
        b"\x45" + bytes(19),
        b"\x44" + bytes(30),
        b"\x70" + bytes(60),
        b"\x4f" + bytes(19),
    ],
)
def test_parse_ip_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(pk.PacketParseError):
        pk.parse_ip(garbage)


def test_flow_hash_pins_a_flow_and_separates_ports() -> None:
    a = udp_packet(b"1", ip_id=1)
    b = udp_packet(b"22222", ip_id=2)
    other = udp_packet(b"1", sport=40001)
    assert pk.flow_hash(a) == pk.flow_hash(b)
    assert pk.flow_hash(a) != pk.flow_hash(other)
    assert pk.flow_hash(b"") == 0


# -- virtio header ---------------------------------------------------------------------------------------------------


def test_virtio_net_hdr_round_trip_little_endian() -> None:
    hdr = pk.VirtioNetHdr(pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, pk.VIRTIO_NET_HDR_GSO_TCPV4, 52, 1448, 20, 16)
    raw = hdr.encode()
    assert raw == bytes([1, 1, 52, 0, 0xA8, 0x05, 20, 0, 16, 0])
    assert pk.VirtioNetHdr.decode(raw) == hdr
    with pytest.raises(pk.PacketParseError):
        pk.VirtioNetHdr.decode(raw[:9])


# -- split -----------------------------------------------------------------------------------------------------------


def tso_frame(
    payload: bytes, *, version: int = 4, mss: int = 1000, flags: int = pk.TCP_ACK | pk.TCP_PSH, options: bytes = b""
) -> tuple[pk.VirtioNetHdr, bytes]:
    """A super-packet as the kernel hands it over: TCP checksum field holding the pseudo-header partial sum."""
    packet = bytearray(
        tcp_packet(payload, flags=flags, version=version, options=options, checksum=False, seq=0xFFFFF000)
    )
    ihl = 20 if version == 4 else 40
    src, dst = (V4_SRC, V4_DST) if version == 4 else (V6_SRC, V6_DST)
    partial = pk.ones_complement_sum(b"", pk.pseudo_header_sum(src, dst, pk.IPPROTO_TCP, len(packet) - ihl))
    struct.pack_into("!H", packet, ihl + 16, partial)
    gso = pk.VIRTIO_NET_HDR_GSO_TCPV4 if version == 4 else pk.VIRTIO_NET_HDR_GSO_TCPV6
    hdr = pk.VirtioNetHdr(pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, ihl + 20 + len(options), mss, ihl, 16)
    return hdr, bytes(packet)


@pytest.mark.parametrize("version", [4, 6])
def test_tso_split_segments_with_valid_checksums_ids_and_sequence(version: int) -> None:
    payload = bytes((i * 7) % 251 for i in range(3500))
    hdr, frame = tso_frame(payload, version=version, options=b"\x01\x01\x08\x0a" + bytes(8))
    segments = pk.split_gso(hdr, frame)
    assert [len(s) - (20 if version == 4 else 40) - 32 for s in segments] == [1000, 1000, 1000, 500]
    rebuilt = b""
    for index, segment in enumerate(segments):
        ip = pk.parse_ip(segment)
        tcp = pk.parse_tcp(segment, ip)
        assert ip.total_len == len(segment)
        assert naive_l4_ok(segment)
        assert tcp.seq == (0xFFFFF000 + 1000 * index) & 0xFFFFFFFF  # wraps around
        assert bool(tcp.flags & pk.TCP_PSH) == (index == len(segments) - 1)
        if version == 4:
            assert naive_ipv4_header_ok(segment)
            assert struct.unpack("!H", segment[4:6])[0] == 7 + index
        rebuilt += segment[ip.header_len + tcp.header_len :]
    assert rebuilt == payload


@pytest.mark.parametrize("version", [4, 6])
def test_uso_split(version: int) -> None:
    payload = bytes(range(256)) * 10  # 2560 bytes
    packet = bytearray(udp_packet(payload, version=version))
    ihl = 20 if version == 4 else 40
    hdr = pk.VirtioNetHdr(pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, pk.VIRTIO_NET_HDR_GSO_UDP_L4, ihl + 8, 1200, ihl, 6)
    segments = pk.split_gso(hdr, bytes(packet))
    assert len(segments) == 3
    for index, segment in enumerate(segments):
        ip = pk.parse_ip(segment)
        udp = pk.parse_udp(segment, ip)
        assert udp.length == len(segment) - ihl
        assert naive_l4_ok(segment)
        if version == 4:
            assert naive_ipv4_header_ok(segment)
            assert struct.unpack("!H", segment[4:6])[0] == 7 + index
    assert b"".join(s[ihl + 8 :] for s in segments) == payload


def test_needs_csum_without_gso_is_completed() -> None:
    packet = bytearray(udp_packet(b"some payload!"))
    partial = pk.ones_complement_sum(b"", pk.pseudo_header_sum(V4_SRC, V4_DST, pk.IPPROTO_UDP, len(packet) - 20))
    struct.pack_into("!H", packet, 26, partial)
    assert not naive_l4_ok(bytes(packet))
    hdr = pk.VirtioNetHdr(pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
    (done,) = pk.split_gso(hdr, bytes(packet))
    assert naive_l4_ok(done)


def test_plain_frame_passes_through() -> None:
    packet = udp_packet(b"x")
    assert pk.split_gso(pk.VirtioNetHdr(), packet) == [packet]


@pytest.mark.parametrize(
    "hdr",
    [
        pk.VirtioNetHdr(1, pk.VIRTIO_NET_HDR_GSO_TCPV4, 40, 0, 20, 16),  # gso_size 0
        pk.VirtioNetHdr(1, pk.VIRTIO_NET_HDR_GSO_TCPV6, 40, 1000, 20, 16),  # version mismatch
        pk.VirtioNetHdr(1, pk.VIRTIO_NET_HDR_GSO_UDP_L4, 28, 1000, 20, 6),  # not UDP
        pk.VirtioNetHdr(1, 0, 0, 0, 20, 5000),  # checksum offset outside
        pk.VirtioNetHdr(1, 77, 0, 0, 0, 0),  # unknown gso type
    ],
)
def test_split_rejects_inconsistent_frames(hdr: pk.VirtioNetHdr) -> None:
    _, frame = tso_frame(b"a" * 3000)
    with pytest.raises(pk.PacketParseError):
        pk.split_gso(hdr, frame)


# -- coalesce --------------------------------------------------------------------------------------------------------


def without_df(packet: bytes) -> bytes:
    """The IPv4 packet with its DF bit cleared (and the header checksum fixed): its IP id then matters."""
    cleared = bytearray(packet)
    cleared[6] &= ~0x40 & 0xFF
    cleared[10:12] = b"\x00\x00"
    struct.pack_into("!H", cleared, 10, naive_checksum(bytes(cleared[:20])))
    return bytes(cleared)


def ipv4_id(packet: bytes) -> int:
    return int(struct.unpack_from("!H", packet, 4)[0])


def split_frame(frame: bytes) -> list[bytes]:
    return pk.split_gso(pk.VirtioNetHdr.decode(frame), frame[pk.VIRTIO_NET_HDR_LEN :])


@pytest.mark.parametrize("version", [4, 6])
def test_coalesce_merges_contiguous_tcp_segments_and_kernel_split_restores_them(version: int) -> None:
    segments = [tcp_packet(bytes([i]) * 1200, seq=5000 + 1200 * i, version=version, ip_id=10 + i) for i in range(5)]
    segments.append(tcp_packet(b"z" * 100, seq=5000 + 6000, version=version, ip_id=15, flags=pk.TCP_ACK | pk.TCP_PSH))
    (frame,) = pk.coalesce(segments)
    hdr = pk.VirtioNetHdr.decode(frame)
    ihl = 20 if version == 4 else 40
    assert hdr.flags == pk.VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert hdr.gso_type == (pk.VIRTIO_NET_HDR_GSO_TCPV4 if version == 4 else pk.VIRTIO_NET_HDR_GSO_TCPV6)
    assert (hdr.gso_size, hdr.csum_start, hdr.csum_offset, hdr.hdr_len) == (1200, ihl, 16, ihl + 20)
    merged = frame[pk.VIRTIO_NET_HDR_LEN :]
    assert len(merged) == ihl + 20 + 6100
    if version == 4:
        assert naive_ipv4_header_ok(merged)
    # What the kernel does with the frame: segment it again; the result must equal the input.
    assert split_frame(frame) == segments


def test_coalesce_keeps_flows_apart_and_in_order() -> None:
    a = [tcp_packet(b"a" * 1000, seq=1000 * i, ip_id=i) for i in range(3)]
    b = [udp_packet(b"b" * 500, sport=41000, ip_id=i) for i in range(3)]
    interleaved = [a[0], b[0], a[1], b[1], a[2], b[2]]
    frames = pk.coalesce(interleaved, tcp=True, udp=True)
    assert len(frames) == 2
    out = [p for f in frames for p in split_frame(f)]
    assert [p for p in out if p in a] == a
    assert [p for p in out if p in b] == b


@pytest.mark.parametrize(
    "second",
    [
        tcp_packet(b"b" * 1000, seq=1000 + 999),  # gap
        tcp_packet(b"b" * 1000, seq=2000, window=501),  # window differs
        tcp_packet(b"b" * 1000, seq=2000, flags=pk.TCP_ACK | pk.TCP_FIN),  # FIN
        tcp_packet(b"b" * 1000, seq=2000, options=b"\x01\x01\x01\x01"),  # options differ
        tcp_packet(b"b" * 1001, seq=2000),  # larger than the first
        tcp_packet(b"", seq=2000),  # pure ACK
        without_df(tcp_packet(b"b" * 1000, seq=2000, ip_id=8)),  # DF differs
    ],
)
def test_coalesce_refuses_what_the_kernel_would_not_merge(second: bytes) -> None:
    first = tcp_packet(b"a" * 1000, seq=1000)
    frames = pk.coalesce([first, second])
    assert len(frames) == 2
    assert frames[0] == bytes(pk.VIRTIO_NET_HDR_LEN) + first
    assert frames[1] == bytes(pk.VIRTIO_NET_HDR_LEN) + second


def test_coalesce_stops_after_psh_and_short_segment() -> None:
    first = tcp_packet(b"a" * 1000, seq=0, flags=pk.TCP_ACK | pk.TCP_PSH)
    second = tcp_packet(b"b" * 1000, seq=1000)
    assert len(pk.coalesce([first, second])) == 2
    short = tcp_packet(b"a" * 10, seq=0)
    after = tcp_packet(b"b" * 10, seq=10)
    assert len(pk.coalesce([tcp_packet(b"x" * 100, seq=-100 & 0xFFFFFFFF), short, after])) == 2


def test_coalesce_respects_size_and_segment_caps() -> None:
    segments = [tcp_packet(b"q" * 1400, seq=1400 * i, ip_id=i) for i in range(60)]
    frames = pk.coalesce(segments)
    assert all(len(f) - pk.VIRTIO_NET_HDR_LEN <= pk.MAX_IP_PACKET for f in frames)
    assert len(frames) == 2
    assert [p for f in frames for p in split_frame(f)] == segments
    tiny = [tcp_packet(b"t" * 10, seq=10 * i) for i in range(pk.MAX_SEGMENTS + 1)]
    assert len(pk.coalesce(tiny)) == 2


def test_coalesce_udp_only_when_asked_and_garbage_passes_through() -> None:
    datagrams = [udp_packet(b"u" * 700, ip_id=i) for i in range(4)]
    assert len(pk.coalesce(datagrams, udp=False)) == 4
    (frame,) = pk.coalesce(datagrams, udp=True)
    assert split_frame(frame) == datagrams
    assert pk.coalesce([b"\x99garbage"]) == [bytes(pk.VIRTIO_NET_HDR_LEN) + b"\x99garbage"]


def test_flow_hash_ipv6_and_ipv4_options() -> None:
    a6, b6 = udp_packet(b"1", version=6), udp_packet(b"2222", version=6)
    c6 = udp_packet(b"1", version=6, sport=1)
    assert pk.flow_hash(a6) == pk.flow_hash(b6) != pk.flow_hash(c6)
    with_options = bytearray(udp_packet(b"x"))
    with_options[0] = 0x46
    with_options[20:20] = b"\x01\x01\x01\x01"
    other_port = bytearray(with_options)
    other_port[24:26] = b"\x00\x01"
    assert pk.flow_hash(bytes(with_options)) != pk.flow_hash(bytes(other_port))


def test_tso_split_with_ipv4_options_uses_the_generic_path() -> None:
    hdr, frame = tso_frame(bytes(range(200)) * 20)
    framed = bytearray(frame)
    framed[0] = 0x46
    framed[20:20] = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    struct.pack_into("!H", framed, 2, len(framed))
    hdr = pk.VirtioNetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len + 4, 1000, 24, 16)
    segments = pk.split_gso(hdr, bytes(framed))
    assert len(segments) == 4
    for index, segment in enumerate(segments):
        assert segment[:1] == b"\x46" and segment[20:24] == b"\x01\x01\x01\x00"
        assert naive_ipv4_header_ok(segment) and naive_l4_ok(segment)
        assert pk.parse_tcp(segment, pk.parse_ip(segment)).seq == (0xFFFFF000 + 1000 * index) & 0xFFFFFFFF
    assert b"".join(s[44:] for s in segments) == bytes(range(200)) * 20


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_coalesce_without_df_merges_only_consecutive_ipv4_ids(protocol: str) -> None:
    # The kernel numbers the segments of a super-packet first_id, first_id + 1, ...: without DF an id is what
    # reassembly keys on, so packets whose ids do not already follow that rule must not be merged.
    def make(index: int, ip_id: int) -> bytes:
        if protocol == "udp":
            return without_df(udp_packet(b"u" * 700, ip_id=ip_id))
        return without_df(tcp_packet(b"a" * 1000, seq=1000 * index, ip_id=ip_id))

    consecutive = [make(i, (0xFFFE + i) & 0xFFFF) for i in range(4)]  # crosses the 16-bit wrap
    (frame,) = pk.coalesce(consecutive, udp=True)
    assert split_frame(frame) == consecutive
    with_gap = [make(i, ip_id) for i, ip_id in enumerate((5, 6, 8, 9))]
    frames = pk.coalesce(with_gap, udp=True)
    assert len(frames) == 2
    assert [p for f in frames for p in split_frame(f)] == with_gap


def test_coalesce_with_df_merges_whatever_the_ipv4_ids() -> None:
    # With DF the datagram is atomic (RFC 6864): its id carries no meaning, so the kernel renumbering it is harmless.
    segments = [tcp_packet(b"a" * 1000, seq=1000 * i, ip_id=ip_id) for i, ip_id in enumerate((5, 90, 7))]
    (frame,) = pk.coalesce(segments)
    resegmented = split_frame(frame)
    assert [p[20:] for p in resegmented] == [p[20:] for p in segments]
    assert [ipv4_id(p) for p in resegmented] == [5, 6, 7]
    assert all(naive_ipv4_header_ok(p) for p in resegmented)
