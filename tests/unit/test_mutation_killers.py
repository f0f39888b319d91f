"""Tests written to kill mutations that once survived the suite: each one fails if its guard is removed or bent.

- IPv6 allowed-IPs source check disabled in the WireGuard receive path;
- MESSAGE-INTEGRITY no longer checked on ICE binding responses;
- the partial checksum that coalescing leaves for the kernel computed over the wrong length;
- URG (the urgent pointer) left out of the TCP checksum when a TSO frame is split;
- TUN write queues picked round-robin instead of by flow hash (no root needed: the queues are socket pairs).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from dataplane import packet as pk
from dataplane import stun
from dataplane.ice import DropReason as IceDropReason
from dataplane.ice import IceState, PairState
from dataplane.io.tun import Tun
from dataplane.wireguard.device import DropReason
from tests.packet_oracle import checksums_ok, kernel_segments
from tests.unit.test_ice_agent import A_HOST, B_HOST, host_setup
from tests.unit.test_wg_device import TUNNEL6_A, TUNNEL6_B, TUNNEL_A, TUNNEL_B, Pair, ipv4_packet, ipv6_packet

# ---- WireGuard: the inner IPv6 source must belong to the sending peer ----------------------------------------------


def test_ipv6_source_outside_allowed_ips_is_dropped() -> None:
    pair = Pair()
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    spoofed = ipv6_packet("fd00::99", TUNNEL6_B, b"spoofed")
    pair.a.send_packets([spoofed], pair.now)
    pair.pump()
    assert pair.b.drain_packets() == []
    assert pair.b.drops[DropReason.ALLOWED_IPS_MISMATCH] == 1


def test_ipv6_spoofed_source_inside_a_run_of_good_packets_is_dropped_alone() -> None:
    # One receive run: the check is cached per source, so a different source in the same run must be checked again.
    pair = Pair()
    pair.a_to_b()
    good = ipv6_packet(TUNNEL6_A, TUNNEL6_B, b"good")
    spoofed = ipv6_packet("fd00::99", TUNNEL6_B, b"spoofed")
    pair.a.send_packets([good, spoofed, good, ipv4_packet(TUNNEL_A, TUNNEL_B)], pair.now)
    pair.pump()
    assert pair.b.drain_packets() == [good, good, ipv4_packet(TUNNEL_A, TUNNEL_B)]
    assert pair.b.drops[DropReason.ALLOWED_IPS_MISMATCH] == 1


# ---- ICE: a binding response must carry the peer's MESSAGE-INTEGRITY ----------------------------------------------


def _forged_success(check: bytes, key: bytes | None) -> bytes:
    response = stun.decode(check).success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, A_HOST)
    return stun.encode(response, integrity_key=key, fingerprint=True)


@pytest.mark.parametrize("key", [stun.short_term_key("not-the-peer-password"), None], ids=["wrong-key", "no-integrity"])
def test_binding_success_without_the_peers_integrity_is_dropped(key: bytes | None) -> None:
    a, _, _ = host_setup()
    a.handle_timeout(0.0)
    check = a.poll_transmit()
    assert check is not None and check.dst == B_HOST
    assert a.handle_stun(_forged_success(check.payload, key), B_HOST, A_HOST, 0.01)
    assert a.drops[IceDropReason.BAD_INTEGRITY] == 1
    assert all(pair.state is not PairState.SUCCEEDED for pair in a.pairs)
    assert a.state is not IceState.CONNECTED
    # The forgery did not use up the transaction: the real answer still completes the check.
    genuine = _forged_success(check.payload, stun.short_term_key("b-password-0123456789b"))
    assert a.handle_stun(genuine, B_HOST, A_HOST, 0.02)
    assert any(pair.state is PairState.SUCCEEDED for pair in a.pairs)


# ---- coalescing: the partial checksum handed to the kernel covers the whole L4 length --------------------------------


def _tcp_segments(version: int, count: int, size: int) -> list[bytes]:
    out = []
    for i in range(count):
        ip = (
            IP(src="10.1.0.1", dst="10.1.0.2", id=100 + i, flags="DF")
            if version == 4
            else IPv6(src="fd01::1", dst="fd01::2")
        )
        tcp = TCP(sport=40000, dport=443, seq=1000 + i * size, ack=7, flags="A", window=500)
        out.append(bytes(ip / tcp / (bytes([i]) * size)))
    return out


def _udp_segments(version: int, count: int, size: int) -> list[bytes]:
    out = []
    for i in range(count):
        ip = (
            IP(src="10.1.0.1", dst="10.1.0.2", id=100 + i, flags="DF")
            if version == 4
            else IPv6(src="fd01::1", dst="fd01::2")
        )
        out.append(bytes(ip / UDP(sport=40000, dport=4433) / (bytes([i + 1]) * size)))
    return out


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_coalesced_frame_partial_checksum_covers_the_whole_transport_length(version: int, protocol: str) -> None:
    segments = _tcp_segments(version, 5, 1000) if protocol == "tcp" else _udp_segments(version, 5, 1000)
    (frame,) = pk.coalesce(segments, tcp=True, udp=True)
    assert frame[1] != pk.VIRTIO_NET_HDR_GSO_NONE, "the segments were expected to merge"
    # kernel_segments completes the partial sum over the super-packet (and fails if it does not verify), then cuts.
    assert kernel_segments(frame) == segments


def test_coalesced_partial_checksum_with_an_odd_short_last_segment() -> None:
    segments = _tcp_segments(4, 3, 999)
    last = IP(src="10.1.0.1", dst="10.1.0.2", id=103, flags="DF") / TCP(
        sport=40000, dport=443, seq=1000 + 3 * 999, ack=7, flags="PA", window=500
    )
    segments.append(bytes(last / (b"\x7f" * 333)))
    (frame,) = pk.coalesce(segments)
    assert kernel_segments(frame) == segments


# ---- TSO split: the urgent pointer is part of every segment's TCP checksum -----------------------------------------


def _tso_frame(packet: bytes, mss: int) -> tuple[pk.VirtioNetHdr, bytes]:
    parsed = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    ihl = parsed.ihl * 4 if isinstance(parsed, IP) else 40
    headers = ihl + parsed[TCP].dataofs * 4
    gso = pk.VIRTIO_NET_HDR_GSO_TCPV4 if isinstance(parsed, IP) else pk.VIRTIO_NET_HDR_GSO_TCPV6
    return pk.VirtioNetHdr(pk.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, headers, mss, ihl, 16), packet


@pytest.mark.parametrize(
    "ip",
    [
        IP(src="10.2.0.1", dst="10.2.0.2", id=9, flags="DF"),
        IP(src="10.2.0.1", dst="10.2.0.2", id=9, flags="DF", options=b"\x01\x01\x01\x00"),  # generic split path
        IPv6(src="fd02::1", dst="fd02::2"),
    ],
    ids=["ipv4", "ipv4-options", "ipv6"],
)
def test_tso_split_checksums_include_the_urgent_pointer(ip: IP | IPv6) -> None:
    tcp = TCP(sport=5000, dport=80, seq=1, ack=2, flags="AU", urgptr=0x1234, window=1000)
    packet = bytes(ip / tcp / (bytes(range(250)) * 13))
    hdr, frame = _tso_frame(packet, 1000)
    segments = pk.split_gso(hdr, frame)
    assert len(segments) == 4
    for segment in segments:
        assert checksums_ok(segment), "segment checksum wrong"
        parsed = IP(segment) if segment[0] >> 4 == 4 else IPv6(segment)
        assert parsed[TCP].urgptr == 0x1234


# ---- TUN: every packet of a flow is written by the queue its flow hash picks ---------------------------------------


@pytest.fixture
def socket_queue_tun() -> Iterator[tuple[Tun, list[socket.socket]]]:
    """A 4-queue Tun whose queue fds are one end of datagram socket pairs; the test reads the other ends."""
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    for _ in range(4):
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        left.setblocking(False)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ours.append(left)
        theirs.append(right)
    lock_fd = os.open(os.devnull, os.O_RDONLY)
    tun = Tun(
        "mk0",
        [s.detach() for s in ours],
        lock_fd,
        offload_flags=0,
        read_offload=False,
        inbound_capacity=1024,
        outbound_capacity=4096,
    )
    try:
        yield tun, theirs
    finally:
        tun.close()
        for s in theirs:
            s.close()


def _flow_packet(flow: int, index: int) -> bytes:
    return bytes(
        IP(src="10.3.0.1", dst="10.3.0.2", id=index, flags="DF")
        / UDP(sport=10000 + flow, dport=53)
        / struct.pack("!HH", flow, index)
    )


def _read_all(sockets: list[socket.socket], expected: int) -> list[list[bytes]]:
    received: list[list[bytes]] = [[] for _ in sockets]
    for s in sockets:
        s.settimeout(0.05)
    deadline = time.monotonic() + 60.0  # a generous bound for a loaded machine; normally done in milliseconds
    while sum(map(len, received)) < expected and time.monotonic() < deadline:
        for index, s in enumerate(sockets):
            try:
                while True:
                    received[index].append(s.recv(65536))
            except (TimeoutError, BlockingIOError):
                pass
    return received


def test_each_flow_is_written_by_the_queue_its_hash_picks(socket_queue_tun: tuple[Tun, list[socket.socket]]) -> None:
    tun, sockets = socket_queue_tun
    flows = 16
    per_flow = 12
    sent = [_flow_packet(flow, index) for index in range(per_flow) for flow in range(flows)]  # interleaved flows
    # Both entry points: one packet at a time (written inline when the writer is idle) and a large batch.
    half = len(sent) // 2
    for packet in sent[:half]:
        assert tun.send(packet)
    assert tun.send_many(sent[half:]) == len(sent) - half
    received = _read_all(sockets, len(sent))
    assert sum(map(len, received)) == len(sent)
    queues_of_flow: dict[int, set[int]] = {}
    for queue_index, packets in enumerate(received):
        for packet in packets:
            assert pk.flow_hash(packet) % len(sockets) == queue_index
            flow = struct.unpack_from("!H", packet, 28)[0]
            queues_of_flow.setdefault(flow, set()).add(queue_index)
        # ... and each flow's packets leave its queue in the order they were sent.
        for flow in range(flows):
            order = [struct.unpack_from("!H", p, 30)[0] for p in packets if struct.unpack_from("!H", p, 28)[0] == flow]
            assert order == sorted(order)
    assert all(len(queues) == 1 for queues in queues_of_flow.values())
    assert len(set().union(*queues_of_flow.values())) > 1, "16 flows on one queue: the hash test proves nothing"
