"""``Tun.write_now`` and the ``one_writer`` mode without a TUN device: SOCK_SEQPACKET sockets stand in for the queue
fds (one record per write)."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import IP, TCP

from dataplane import packet as pk
from dataplane.io.tun import TUN_F_TSO4, TUN_F_TSO6, TUN_OFFLOADS_TCP, Tun, TunDropReason
from dataplane.native import flow_hash
from tests.unit.test_packet import tcp_packet, udp_packet

MSS = 1000

MakeTun = Callable[..., tuple[Tun, list[socket.socket]]]


@pytest.fixture
def make_tun() -> Iterator[MakeTun]:
    """Builds a Tun whose queue fds are one end of socket pairs; returns it with the ends the test reads."""
    built: list[tuple[Tun, list[socket.socket]]] = []

    def make(
        offload_flags: int, queues: int = 1, *, refuse_writes: bool = False, one_writer: bool = False
    ) -> tuple[Tun, list[socket.socket]]:
        ours: list[socket.socket] = []
        theirs: list[socket.socket] = []
        for _ in range(queues):
            left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            left.setblocking(False)
            right.setblocking(False)
            right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if refuse_writes:
                left.shutdown(socket.SHUT_WR)  # every write fails with EPIPE; reads still wait quietly
            ours.append(left)
            theirs.append(right)
        tun = Tun(
            "wn0",
            [s.detach() for s in ours],
            os.open(os.devnull, os.O_RDONLY),
            offload_flags=offload_flags,
            read_offload=False,
            inbound_capacity=64,
            outbound_capacity=4096,
            one_writer=one_writer,
        )
        built.append((tun, theirs))
        return tun, theirs

    try:
        yield make
    finally:
        for tun, theirs in built:
            tun.close()
            for s in theirs:
                s.close()


def written(reader: socket.socket) -> list[bytes]:
    frames: list[bytes] = []
    while True:
        try:
            frames.append(reader.recv(1 << 17))
        except BlockingIOError:
            return frames


def segments(count: int, start: int = 1000) -> list[bytes]:
    return [tcp_packet(bytes([i]) * MSS, seq=start + i * MSS, ip_id=7 + i) for i in range(count)]


def test_without_offloads_each_packet_is_one_write(make_tun: MakeTun) -> None:
    tun, (reader,) = make_tun(0)
    packets = segments(3) + [udp_packet(b"u")]
    tun.write_now(packets)
    assert written(reader) == packets
    stats = tun.stats()
    assert (stats.tx_frames, stats.tx_packets) == (4, 4)


def test_with_offloads_frames_are_what_coalesce_gives(make_tun: MakeTun) -> None:
    tun, (reader,) = make_tun(TUN_OFFLOADS_TCP)
    packets = segments(4) + [udp_packet(b"u")] + segments(2, start=1000 + 4 * MSS)
    tun.write_now(packets)
    frames = written(reader)
    assert frames == pk.coalesce(packets, tcp=True, udp=False)
    assert len(frames) < len(packets)  # something was merged
    stats = tun.stats()
    assert (stats.tx_frames, stats.tx_packets) == (len(frames), len(packets))


def test_each_flow_is_written_to_the_queue_its_hash_picks_on_the_calling_thread(make_tun: MakeTun) -> None:
    # The kernel hands a flow's replies to the queue it was written on: all on queue 0 would idle the other readers.
    tun, readers = make_tun(0, queues=2)
    flows = [[udp_packet(bytes([flow, i]), sport=20000 + flow) for i in range(5)] for flow in range(8)]
    queue_of = [flow_hash(packets[0]) % 2 for packets in flows]
    assert set(queue_of) == {0, 1}  # both queues get flows (else the test would prove nothing)
    tun.write_now([packet for i in range(5) for packets in flows for packet in packets[i : i + 1]])
    # Written before write_now returned (no writer thread involved), each flow complete and in order on its queue.
    got = [written(reader) for reader in readers]
    for flow, packets in enumerate(flows):
        assert [p for p in got[queue_of[flow]] if p in packets] == packets
    assert sorted(map(len, got)) == sorted(5 * queue_of.count(q) for q in (0, 1))
    assert tun.pending_outbound() == 0


@pytest.mark.parametrize("packet", [tcp_packet(b"x" * 10), udp_packet(b"ping"), b"\x45garbage"])
def test_a_lone_packet_gets_the_frame_coalesce_would_give(make_tun: MakeTun, packet: bytes) -> None:
    tun, (reader,) = make_tun(TUN_OFFLOADS_TCP)
    tun.write_now([packet])
    assert written(reader) == pk.coalesce([packet], tcp=True, udp=False)


def test_nothing_to_write_writes_nothing(make_tun: MakeTun) -> None:
    tun, (reader,) = make_tun(TUN_OFFLOADS_TCP)
    tun.write_now([])
    assert written(reader) == [] and tun.stats().tx_frames == 0


def test_a_failed_write_is_counted_per_frame_and_the_rest_still_goes(make_tun: MakeTun) -> None:
    tun, _ = make_tun(0, refuse_writes=True)
    tun.write_now([udp_packet(b"a"), udp_packet(b"b")])
    assert tun.drops[TunDropReason.WRITE_FAILED] == 2


def test_writing_to_a_closed_device_is_counted_not_attempted(make_tun: MakeTun) -> None:
    tun, _ = make_tun(0)
    tun.close()
    tun.write_now([udp_packet(b"a"), udp_packet(b"b"), udp_packet(b"c")])
    assert tun.drops[TunDropReason.WRITE_FAILED] == 3
    assert tun.stats().tx_frames == 0


def test_a_refused_merged_write_turns_merging_off(make_tun: MakeTun, monkeypatch: pytest.MonkeyPatch) -> None:
    tun, (reader,) = make_tun(TUN_F_TSO4 | TUN_F_TSO6)
    real_write = os.write

    def refuse_merged(target: int, frame: bytes) -> int:
        if frame[1] != 0:  # gso_type set: a merged frame
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(target, frame)

    monkeypatch.setattr(os, "write", refuse_merged)
    tun.write_now(segments(3))
    assert tun.drops[TunDropReason.WRITE_FAILED] == 1
    assert written(reader) == []
    later = segments(3, start=1000 + 3 * MSS)
    tun.write_now(later)
    assert written(reader) == pk.coalesce(later, tcp=False, udp=False)  # one plain frame per packet
    assert tun.drops[TunDropReason.WRITE_FAILED] == 1


def test_the_writer_threads_merge_and_count_the_same_way(make_tun: MakeTun) -> None:
    """send_many's writer thread and write_now share the merging code: the same batch gives the same frames."""
    tun, (reader,) = make_tun(TUN_OFFLOADS_TCP)
    packets = segments(5)
    tun.send_many(packets)
    reader.settimeout(10)  # the writer thread's frame arrives when it has run; the timeout only stops a hang
    frames = [reader.recv(1 << 17)]
    reader.setblocking(False)
    assert written(reader) == []  # the whole batch went as one merged frame
    tun.write_now(segments(5, start=1000 + 5 * MSS))
    assert frames == pk.coalesce(packets, tcp=True, udp=False)
    assert len(written(reader)) == 1
    stats = tun.stats()
    assert (stats.tx_frames, stats.tx_packets) == (2, 10)


def received(reader: socket.socket, count: int) -> list[bytes]:
    """``count`` frames from ``reader``, waiting for the writer thread (the timeout only stops a hang)."""
    reader.settimeout(10)
    try:
        return [reader.recv(1 << 17) for _ in range(count)]
    finally:
        reader.setblocking(False)


def flow_segments(flow: int, count: int) -> list[bytes]:
    """``count`` consecutive full-size segments of one TCP flow (source port 30000 + ``flow``)."""
    return [
        bytes(
            IP(src="10.3.0.1", dst="10.3.0.2", id=i, flags="DF")
            / TCP(sport=30000 + flow, dport=5201, seq=1000 + i * MSS, ack=1, flags="A", window=500)
            / (bytes([i]) * MSS)
        )
        for i in range(count)
    ]


def test_one_writer_thread_writes_each_flow_to_the_queue_its_hash_picks_in_order(make_tun: MakeTun) -> None:
    tun, readers = make_tun(0, queues=2, one_writer=True)
    flows = [[udp_packet(bytes([flow, i]), sport=20000 + flow) for i in range(30)] for flow in range(8)]
    queue_of = [flow_hash(packets[0]) % 2 for packets in flows]
    assert set(queue_of) == {0, 1}  # both queues get flows (else the test would prove nothing)
    for batch in range(3):  # interleaved batches of every flow
        tun.send_many([packet for packets in flows for packet in packets[batch * 10 : (batch + 1) * 10]])
    expected = [[p for flow, packets in enumerate(flows) if queue_of[flow] == q for p in packets] for q in (0, 1)]
    got = [received(readers[q], len(expected[q])) for q in (0, 1)]
    for q in (0, 1):
        # Each flow arrives complete and in order on its queue (flows of one queue may interleave between batches).
        for flow, packets in enumerate(flows):
            if queue_of[flow] == q:
                assert [p for p in got[q] if p in packets] == packets
        assert written(readers[q]) == []
    writers = [t.name for t in threading.enumerate() if t.name.startswith("tun-wn0-tx")]
    assert writers == ["tun-wn0-tx0"]
    assert tun.stats().tx_packets == 8 * 30


def test_one_writer_merges_whole_batches_and_sends_each_merged_frame_to_its_flows_queue(make_tun: MakeTun) -> None:
    tun, readers = make_tun(TUN_OFFLOADS_TCP, queues=2, one_writer=True)
    flows = [flow_segments(flow, 4) for flow in range(6)]
    queue_of = [flow_hash(packets[0]) % 2 for packets in flows]
    assert set(queue_of) == {0, 1}
    batch = [packet for i in range(4) for packets in flows for packet in packets[i : i + 1]]  # flows interleaved
    tun.send_many(batch)
    for q in (0, 1):
        mine = [packets for flow, packets in enumerate(flows) if queue_of[flow] == q]
        frames = received(readers[q], len(mine))
        assert frames == [pk.coalesce(packets, tcp=True, udp=False)[0] for packets in mine]  # one frame per flow
    stats = tun.stats()
    assert (stats.tx_frames, stats.tx_packets) == (6, 24)


def test_without_one_writer_every_queue_has_its_writer(make_tun: MakeTun) -> None:
    make_tun(0, queues=2)
    writers = sorted(t.name for t in threading.enumerate() if t.name.startswith("tun-wn0-tx"))
    assert writers == ["tun-wn0-tx0", "tun-wn0-tx1"]


def test_the_kernel_knows_each_queue_thread_by_its_role(make_tun: MakeTun) -> None:
    # Operators tell the threads apart in `top -H` and /proc/<pid>/task/*/comm (per-thread CPU in the benchmarks too).
    tun, _ = make_tun(0, queues=2, one_writer=True)
    names: list[str] = []
    for _ in range(200):  # the threads name themselves as they start
        names = sorted(_comm(thread.native_id) for thread in tun._threads)
        if names == ["tun-rx0", "tun-rx1", "tun-tx0"]:
            break
        threading.Event().wait(0.01)
    assert names == ["tun-rx0", "tun-rx1", "tun-tx0"]


def _comm(native_id: int | None) -> str:
    with open(f"/proc/self/task/{native_id}/comm") as f:
        return f.read().strip()
