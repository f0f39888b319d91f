"""The C packet transforms (dataplane._native via dataplane.native) give byte-identical results to their pure twins
in dataplane/packet.py, the reference: TSO/USO split with checksum completion, and the flow hash. Valid super-packets
of every shape and malformed ones (truncated, bad lengths, wrong versions, header fields out of range) must give the
same packets or the same exception."""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import native as dispatch
from dataplane import packet as reference
from dataplane.packet import VIRTIO_NET_HDR_LEN, VirtioNetHdr

native: ModuleType | None
try:
    from dataplane import _native as native
except ImportError:  # pragma: no cover - depends on the build
    native = None

pytestmark = pytest.mark.skipif(
    native is None or not dispatch.NATIVE,
    reason="dataplane._native is not built or FIREZONE_NATIVE=0: pure-Python mode only",
)

Outcome = tuple[str, object]


def _outcome(function: Callable[[], object]) -> Outcome:
    try:
        return "ok", function()
    except Exception as error:  # the point is to compare whatever is raised
        return "raised", (type(error), str(error))


def _sum16(data: bytes) -> int:
    if len(data) & 1:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@st.composite
def super_packets(draw: st.DrawFn) -> tuple[VirtioNetHdr, bytes]:
    """A TSO/USO super-packet as the kernel hands it (IPv4 with options or IPv6; TCP with options or UDP), with the
    NEEDS_CSUM pseudo-header partial sum in its checksum field."""
    version = draw(st.sampled_from((4, 6)), label="version")
    is_tcp = draw(st.booleans(), label="tcp")
    payload_len = draw(
        st.one_of(st.integers(0, 3000), st.integers(60000, 65535 - 120), st.just(0)), label="payload length"
    )
    payload = draw(st.one_of(st.binary(min_size=payload_len, max_size=payload_len), st.just(b"\xff" * payload_len)))
    src = draw(st.binary(min_size=4 if version == 4 else 16, max_size=4 if version == 4 else 16), label="src")
    dst = draw(st.binary(min_size=len(src), max_size=len(src)), label="dst")
    protocol = reference.IPPROTO_TCP if is_tcp else reference.IPPROTO_UDP
    ports = draw(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), label="ports")
    if is_tcp:
        options = draw(st.binary(max_size=10).map(lambda b: b + bytes(-len(b) % 4)), label="tcp options")
        flags = draw(st.integers(0, 255), label="tcp flags")  # URG, PSH, FIN, CWR, anything
        doff_low = draw(st.integers(0, 15), label="reserved bits")
        l4 = struct.pack(
            "!HHIIBBHHH",
            *ports,
            draw(st.integers(0, 2**32 - 1), label="seq"),
            draw(st.integers(0, 2**32 - 1), label="ack"),
            ((20 + len(options)) // 4) << 4 | doff_low,
            flags,
            draw(st.integers(0, 0xFFFF), label="window"),
            0,
            draw(st.integers(0, 0xFFFF), label="urgent"),
        )
        l4 += options
        csum_offset = 16
    else:
        l4 = struct.pack("!HHHH", *ports, (8 + payload_len) & 0xFFFF, 0)
        csum_offset = 6
    l4_total = len(l4) + payload_len
    if version == 4:
        ip_options = draw(st.binary(max_size=40).map(lambda b: b[: len(b) - len(b) % 4]), label="ip options")
        ihl = 20 + len(ip_options)
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl // 4,
            draw(st.integers(0, 255), label="tos"),
            (ihl + l4_total) & 0xFFFF,
            draw(st.integers(0, 0xFFFF), label="ip id"),
            draw(st.sampled_from((0, 0x4000)), label="df"),
            draw(st.integers(0, 255), label="ttl"),
            protocol,
            0,
            src,
            dst,
        )
        ip += ip_options
    else:
        ihl = 40
        first_word = 0x60000000 | draw(st.integers(0, 0x0FFFFFFF), label="tc/flow")
        ip = struct.pack("!IHBB16s16s", first_word, l4_total & 0xFFFF, protocol, 64, src, dst)
    partial = _sum16(src + dst + struct.pack("!HH", protocol, l4_total & 0xFFFF))
    l4 = l4[:csum_offset] + struct.pack("!H", partial) + l4[csum_offset + 2 :]
    gso_size = draw(st.one_of(st.integers(1, 1500), st.integers(1, 65535), st.sampled_from((1, 8, 1448))), label="gso")
    if payload_len > 10000:
        gso_size = max(gso_size, 536)  # keeps the pure reference's segment count (and the test's time) reasonable
    gso_type = (
        (reference.VIRTIO_NET_HDR_GSO_TCPV4 if version == 4 else reference.VIRTIO_NET_HDR_GSO_TCPV6)
        if is_tcp
        else reference.VIRTIO_NET_HDR_GSO_UDP_L4
    )
    if draw(st.booleans(), label="ecn"):
        gso_type |= reference.VIRTIO_NET_HDR_GSO_ECN
    if draw(st.integers(0, 5), label="not gso") == 0:
        gso_type = reference.VIRTIO_NET_HDR_GSO_NONE  # a single packet with a pending checksum
    hdr = VirtioNetHdr(
        reference.VIRTIO_NET_HDR_F_NEEDS_CSUM | draw(st.sampled_from((0, 2)), label="data valid"),
        gso_type,
        ihl + len(l4),
        gso_size,
        ihl,
        csum_offset,
    )
    return hdr, ip + l4 + payload


# Field values a header can hold, around and outside the ranges of the C path (it falls back outside 0..0xFFFF).
_field = st.one_of(st.integers(0, 70), st.integers(0, 0xFFFF), st.integers(-3, 0), st.integers(0xFFFF, 0x10002))


@st.composite
def malformed(draw: st.DrawFn) -> tuple[VirtioNetHdr, bytes]:
    """A valid super-packet broken one or more ways: truncated, bytes flipped, header fields changed."""
    hdr, packet = draw(super_packets())
    for _ in range(draw(st.integers(1, 3), label="damage count")):
        how = draw(st.sampled_from(("truncate", "flip", "field", "version", "garbage")), label="damage")
        if how == "truncate" and packet:
            packet = packet[: draw(st.integers(0, min(len(packet), 120)), label="cut")]
        elif how == "flip" and packet:
            position = draw(st.integers(0, min(len(packet), 80) - 1), label="position")
            value = draw(st.integers(0, 255), label="value")
            packet = packet[:position] + bytes((value,)) + packet[position + 1 :]
        elif how == "version" and packet:
            packet = bytes((draw(st.integers(0, 255), label="first byte"),)) + packet[1:]
        elif how == "garbage":
            packet = draw(st.binary(max_size=120), label="garbage")
        else:
            name = draw(
                st.sampled_from(("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset")),
                label="field",
            )
            values = [hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset]
            index = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset").index(name)
            values[index] = draw(_field, label="value")
            hdr = VirtioNetHdr(*values)
    return hdr, packet


def _check_split(hdr: VirtioNetHdr, packet: bytes) -> Outcome:
    expected = _outcome(lambda: reference.split_gso(hdr, packet))
    assert _outcome(lambda: dispatch.split_gso(hdr, packet)) == expected
    assert _outcome(lambda: dispatch.split_gso(hdr, memoryview(bytearray(packet)))) == expected
    return expected


@settings(max_examples=400, deadline=None)
@given(super_packets())
def test_split_gso_of_valid_super_packets_is_identical(case: tuple[VirtioNetHdr, bytes]) -> None:
    hdr, packet = case
    kind, result = _check_split(hdr, packet)
    assert kind == "ok", result  # generated frames are valid: the test must exercise the C path, not only fallback
    assert native is not None
    direct = native.split_gso(
        hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, packet
    )
    assert direct == result
    for segment in direct or []:
        assert reference.l4_checksum_valid(segment)


@settings(max_examples=400, deadline=None)
@given(malformed())
def test_split_gso_of_malformed_frames_is_identical(case: tuple[VirtioNetHdr, bytes]) -> None:
    _check_split(*case)


@settings(max_examples=300, deadline=None)
@given(st.one_of(malformed(), super_packets()), st.booleans())
def test_split_gso_frame_is_identical(case: tuple[VirtioNetHdr, bytes], cut_header: bool) -> None:
    hdr, packet = case
    try:
        frame = hdr.encode() + packet
    except struct.error:
        return  # fields that do not fit a virtio_net_hdr cannot come from a TUN read
    if cut_header:
        frame = frame[: len(frame) % (VIRTIO_NET_HDR_LEN + 1)]
    expected = _outcome(lambda: reference.split_gso(VirtioNetHdr.decode(frame), memoryview(frame)[VIRTIO_NET_HDR_LEN:]))
    assert _outcome(lambda: dispatch.split_gso_frame(frame)) == expected


def test_split_gso_of_a_64k_tso_frame_is_identical() -> None:
    payload = bytes(range(256)) * 255
    tcp = struct.pack("!HHIIBBHHH", 443, 50000, 0xFFFFF000, 7, 0x50, 0x18 | 0x01 | 0x80, 512, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0xFFFE, 0x4000, 64, 6, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
    hdr = VirtioNetHdr(1, reference.VIRTIO_NET_HDR_GSO_TCPV4, 40, 1448, 20, 16)
    kind, segments = _check_split(hdr, ip + tcp + payload)
    assert kind == "ok" and isinstance(segments, list) and len(segments) == 46


@st.composite
def flow_packets(draw: st.DrawFn) -> bytes:
    base = draw(st.one_of(super_packets().map(lambda case: case[1][:120]), st.binary(max_size=80)))
    if base and draw(st.booleans()):
        position = draw(st.integers(0, min(len(base), 45) - 1))
        base = base[:position] + bytes((draw(st.integers(0, 255)),)) + base[position + 1 :]
    return base


@settings(max_examples=500, deadline=None)
@given(flow_packets())
def test_flow_hash_is_identical(packet: bytes) -> None:
    assert native is not None
    expected = reference.flow_hash(packet)
    assert native.flow_hash(packet) == expected
    assert dispatch.flow_hash(packet) == expected
    assert dispatch.flow_hash(memoryview(bytearray(packet))) == expected


# Payload bytes that differ from segment to segment (a slice at the flow's sequence number).
_PATTERN = bytes(i % 251 for i in range(251 + 1500))


@st.composite
def flow_segments(draw: st.DrawFn) -> list[bytes]:
    """Consecutive segments of a few flows, as the decrypt path hands them to the TUN writer: mostly mergeable (same
    headers, consecutive sequence numbers and IPv4 ids), with PSH, short segments, header differences and garbage."""
    flows = []
    for _ in range(draw(st.integers(1, 3), label="flows")):
        flows.append(
            {
                "version": draw(st.sampled_from((4, 6))),
                "tcp": draw(st.booleans()),
                "seq": draw(st.integers(0, 2**32 - 1)),
                "id": draw(st.integers(0, 0xFFFF)),
                "df": draw(st.booleans()),
                "options": draw(st.sampled_from((b"", b"\x01\x01\x08\x0a" + bytes(8)))),
                "port": draw(st.integers(0, 0xFFFF)),
            }
        )
    size = draw(st.sampled_from((1, 7, 100, 1448)), label="segment size")
    packets: list[bytes] = []
    for _ in range(draw(st.integers(0, 80), label="packets")):
        flow = flows[draw(st.integers(0, len(flows) - 1), label="flow")]
        payload_len = draw(st.one_of(st.just(size), st.integers(0, size + 3)), label="payload")
        start = flow["seq"] % 251  # type: ignore[operator]
        payload = _PATTERN[start : start + payload_len]
        flags = reference.TCP_ACK | draw(
            st.sampled_from((0, 0, 0, reference.TCP_PSH, reference.TCP_FIN, reference.TCP_URG)), label="flags"
        )
        window = draw(st.sampled_from((512, 512, 512, 1024)), label="window")
        urgent = draw(st.sampled_from((0, 0, 0, 9)), label="urgent")
        ttl = draw(st.sampled_from((64, 64, 64, 63)), label="ttl")
        if flow["tcp"]:
            options: bytes = flow["options"]  # type: ignore[assignment]
            l4 = struct.pack(
                "!HHIIBBHHH",
                flow["port"],
                443,
                flow["seq"],
                77,
                (20 + len(options)) // 4 << 4,
                flags,
                window,
                0,
                urgent,
            )
            l4 += options
            flow["seq"] = (flow["seq"] + payload_len) & 0xFFFFFFFF  # type: ignore[operator]
            protocol = reference.IPPROTO_TCP
        else:
            l4 = struct.pack("!HHHH", flow["port"], 53, 8 + payload_len, 0)
            protocol = reference.IPPROTO_UDP
        l4_total = len(l4) + payload_len
        if flow["version"] == 4:
            ip = struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                20 + l4_total,
                flow["id"],
                0x4000 if flow["df"] else 0,
                ttl,
                protocol,
                0,
                b"\x0a\x00\x00\x01",
                b"\x0a\x00\x00\x02",
            )
            flow["id"] = (flow["id"] + draw(st.sampled_from((1, 1, 1, 2)), label="id step")) & 0xFFFF  # type: ignore[operator]
        else:
            ip = struct.pack("!IHBB16s16s", 0x60000000, l4_total, protocol, ttl, b"\x20" * 16, b"\x21" * 16)
        packet = ip + l4 + payload
        damage = draw(st.integers(0, 12), label="damage")
        if damage == 0 and packet:
            packet = packet[: draw(st.integers(0, len(packet) - 1), label="cut")]
        elif damage == 1:
            position = draw(st.integers(0, min(len(packet), 64) - 1), label="position")
            packet = packet[:position] + bytes((draw(st.integers(0, 255), label="value"),)) + packet[position + 1 :]
        elif damage == 2:
            packet = draw(st.binary(max_size=64), label="garbage")
        packets.append(packet)
    return packets


@settings(max_examples=120, deadline=None)
@given(flow_segments(), st.booleans(), st.booleans())
def test_coalesce_is_identical(packets: list[bytes], tcp: bool, udp: bool) -> None:
    assert native is not None
    expected = reference.coalesce(packets, tcp=tcp, udp=udp)
    assert native.coalesce(packets, tcp, udp) == expected
    assert dispatch.coalesce(packets, tcp=tcp, udp=udp) == expected
    assert dispatch.coalesce(tuple(packets), tcp=tcp, udp=udp) == expected


def test_coalesce_of_44_segments_is_one_frame() -> None:
    packets = []
    for index in range(44):
        tcp = struct.pack(
            "!HHIIBBHHH", 443, 50000, 1000 + 1448 * index, 7, 0x50, 0x10 | (8 if index == 43 else 0), 9, 0, 0
        )
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1488, 0, 0x4000, 64, 6, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
        packets.append(ip + tcp + bytes((index + i) % 256 for i in range(1448)))
    frames = dispatch.coalesce(packets)
    assert frames == reference.coalesce(packets) and len(frames) == 1
    assert VirtioNetHdr.decode(frames[0]).gso_type == reference.VIRTIO_NET_HDR_GSO_TCPV4


def test_coalesce_falls_back_for_buffers_other_than_bytes() -> None:
    packets: list[bytes] = [bytearray(60)]  # type: ignore[list-item]
    assert native is not None and native.coalesce(packets, True, False) is None
    assert dispatch.coalesce(packets) == reference.coalesce(packets)
