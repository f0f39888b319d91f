"""DirectTunWriter without a TUN device: a SOCK_SEQPACKET socket stands in for the queue fd (one record per write)."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from dataplane import packet as pk
from dataplane.io.tun import TUN_F_TSO4, TUN_F_TSO6, TUN_OFFLOADS_TCP, TunDropReason
from dataplane.io.tun_direct import DirectTunWriter
from tests.unit.test_packet import tcp_packet, udp_packet

MSS = 1000


@pytest.fixture
def device() -> Iterator[tuple[int, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    try:
        yield ours.fileno(), theirs
    finally:
        ours.close()
        theirs.close()


def written(reader: socket.socket) -> list[bytes]:
    frames: list[bytes] = []
    while True:
        try:
            frames.append(reader.recv(1 << 17))
        except BlockingIOError:
            return frames


def segments(count: int, start: int = 1000) -> list[bytes]:
    return [tcp_packet(bytes([i]) * MSS, seq=start + i * MSS, ip_id=7 + i) for i in range(count)]


def test_without_offloads_each_packet_is_one_write(device: tuple[int, socket.socket]) -> None:
    fd, reader = device
    writer = DirectTunWriter(fd, 0)
    packets = segments(3) + [udp_packet(b"u")]
    writer.write(packets)
    assert written(reader) == packets
    assert (writer.frames, writer.packets) == (4, 4)


def test_with_offloads_frames_are_what_coalesce_gives(device: tuple[int, socket.socket]) -> None:
    fd, reader = device
    writer = DirectTunWriter(fd, TUN_OFFLOADS_TCP)
    packets = segments(4) + [udp_packet(b"u")] + segments(2, start=1000 + 4 * MSS)
    writer.write(packets)
    frames = written(reader)
    assert frames == pk.coalesce(packets, tcp=True, udp=False)
    assert len(frames) < len(packets)  # something was merged
    assert (writer.frames, writer.packets) == (len(frames), len(packets))


@pytest.mark.parametrize("packet", [tcp_packet(b"x" * 10), udp_packet(b"ping"), b"\x45garbage"])
def test_a_lone_packet_gets_the_frame_coalesce_would_give(device: tuple[int, socket.socket], packet: bytes) -> None:
    fd, reader = device
    DirectTunWriter(fd, TUN_OFFLOADS_TCP).write([packet])
    assert written(reader) == pk.coalesce([packet], tcp=True, udp=False)


def test_nothing_to_write_writes_nothing(device: tuple[int, socket.socket]) -> None:
    fd, reader = device
    writer = DirectTunWriter(fd, TUN_OFFLOADS_TCP)
    writer.write([])
    assert written(reader) == [] and writer.frames == 0


def test_a_failed_write_is_counted_per_frame_and_the_rest_still_goes() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails with EPIPE
    try:
        writer = DirectTunWriter(write_end, 0)
        writer.write([udp_packet(b"a"), udp_packet(b"b")])
    finally:
        os.close(write_end)
    assert writer.drops[TunDropReason.WRITE_FAILED] == 2


def test_a_refused_merged_write_turns_merging_off(
    device: tuple[int, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, reader = device
    real_write = os.write

    def refuse_merged(target: int, frame: bytes) -> int:
        if frame[1] != 0:  # gso_type set: a merged frame
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(target, frame)

    monkeypatch.setattr(os, "write", refuse_merged)
    writer = DirectTunWriter(fd, TUN_F_TSO4 | TUN_F_TSO6)
    writer.write(segments(3))
    assert writer.drops[TunDropReason.WRITE_FAILED] == 1
    assert written(reader) == []
    later = segments(3, start=1000 + 3 * MSS)
    writer.write(later)
    assert written(reader) == pk.coalesce(later, tcp=False, udp=False)  # one plain frame per packet
    assert writer.drops[TunDropReason.WRITE_FAILED] == 1
