"""Property tests for dataplane.packet: parsers raise only PacketParseError; split(coalesce(x)) == x."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import packet as pk
from tests.unit.test_packet import naive_checksum, naive_l4_ok, tcp_packet, udp_packet, without_df


@given(st.binary(max_size=200))
def test_checksum_equals_naive_reference(data: bytes) -> None:
    assert pk.internet_checksum(data) == naive_checksum(data)


@given(st.binary(max_size=120))
def test_parsers_raise_only_parse_error(data: bytes) -> None:
    try:
        ip = pk.parse_ip(data)
    except pk.PacketParseError:
        return
    for parser in (pk.parse_tcp, pk.parse_udp, pk.parse_icmp):
        try:
            parser(data, ip)
        except pk.PacketParseError:
            pass
    pk.flow_hash(data)


@given(st.binary(min_size=10, max_size=300), st.booleans(), st.booleans())
def test_split_and_coalesce_never_raise_anything_else(data: bytes, tcp: bool, udp: bool) -> None:
    try:
        hdr = pk.VirtioNetHdr.decode(data)
        pk.split_gso(hdr, data[pk.VIRTIO_NET_HDR_LEN :])
    except pk.PacketParseError:
        pass
    frames = pk.coalesce([data, data[10:]], tcp=tcp, udp=udp)
    assert 1 <= len(frames) <= 2


@given(st.binary(min_size=1, max_size=30), st.integers(min_value=0, max_value=0x7FFF))
def test_parsers_on_mutated_valid_packets(noise: bytes, position: int) -> None:
    base = bytearray(tcp_packet(b"payload" * 20))
    position %= len(base)
    base[position : position + len(noise)] = noise
    data = bytes(base)
    try:
        ip = pk.parse_ip(data)
        pk.parse_tcp(data, ip)
    except pk.PacketParseError:
        pass


_segment_sizes = st.lists(st.integers(min_value=1, max_value=1460), min_size=1, max_size=70)


@settings(max_examples=60, deadline=None)
@given(_segment_sizes, st.integers(min_value=0, max_value=0xFFFFFFFF), st.sampled_from([4, 6]), st.booleans())
def test_tcp_coalesce_then_kernel_split_is_identity(sizes: list[int], seq0: int, version: int, push_last: bool) -> None:
    """Whatever gets merged, segmenting the frames again as the kernel does yields the input packets, in order."""
    packets = []
    seq = seq0
    for index, size in enumerate(sizes):
        flags = pk.TCP_ACK | (pk.TCP_PSH if push_last and index == len(sizes) - 1 else 0)
        packets.append(tcp_packet(bytes([index % 256]) * size, seq=seq, version=version, ip_id=index, flags=flags))
        seq = (seq + size) & 0xFFFFFFFF
    frames = pk.coalesce(packets)
    out: list[bytes] = []
    for frame in frames:
        assert len(frame) - pk.VIRTIO_NET_HDR_LEN <= pk.MAX_IP_PACKET
        out.extend(pk.split_gso(pk.VirtioNetHdr.decode(frame), frame[pk.VIRTIO_NET_HDR_LEN :]))
    assert out == packets
    assert all(naive_l4_ok(p) for p in out)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=1400), min_size=1, max_size=70), st.sampled_from([4, 6]))
def test_udp_coalesce_then_kernel_split_is_identity(sizes: list[int], version: int) -> None:
    packets = [
        udp_packet(struct.pack("!I", i) * ((size + 3) // 4), version=version, ip_id=i) for i, size in enumerate(sizes)
    ]
    out: list[bytes] = []
    for frame in pk.coalesce(packets, tcp=False, udp=True):
        out.extend(pk.split_gso(pk.VirtioNetHdr.decode(frame), frame[pk.VIRTIO_NET_HDR_LEN :]))
    assert out == packets


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=1, max_value=1400), st.sampled_from([1, 1, 1, 0, 2, 0x8000])), max_size=40
    ),
    st.integers(min_value=0, max_value=0xFFFF),
    st.booleans(),
)
def test_ipv4_without_df_is_never_renumbered(steps: list[tuple[int, int]], first_id: int, udp: bool) -> None:
    """Without DF an IPv4 id matters, so merging must keep every id as it was: split(coalesce(x)) == x whatever the
    ids (mostly consecutive, sometimes repeated or jumping)."""
    packets = []
    ip_id, seq = first_id, 0
    for index, (size, id_step) in enumerate(steps):
        payload = bytes([index % 256]) * size
        packet = udp_packet(payload, ip_id=ip_id) if udp else tcp_packet(payload, seq=seq, ip_id=ip_id)
        packets.append(without_df(packet))
        ip_id, seq = (ip_id + id_step) & 0xFFFF, seq + size
    out: list[bytes] = []
    for frame in pk.coalesce(packets, tcp=True, udp=True):
        out.extend(pk.split_gso(pk.VirtioNetHdr.decode(frame), frame[pk.VIRTIO_NET_HDR_LEN :]))
    assert out == packets
