"""dataplane.io.udp on loopback: GSO sends, GRO receives, probes, fallbacks, buffers, port fallback."""

from __future__ import annotations

import errno
import socket
import struct
import time

import pytest

from dataplane.base import Transmit
from dataplane.io import udp as udp_module
from dataplane.io.udp import UdpDropReason, UdpSocket, bind_dual_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def drain(sock: UdpSocket, expected: int, timeout: float = 3.0) -> list[tuple[bytes, tuple[str, int]]]:
    got: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = sock.recv_many(64)
        if not batch:
            time.sleep(0.005)
        got += batch
    return got


def numbered(count: int, size: int, dst: tuple[str, int], last_size: int | None = None) -> list[Transmit]:
    out = []
    for i in range(count):
        length = last_size if (last_size is not None and i == count - 1) else size
        out.append(Transmit(dst=dst, payload=struct.pack("!I", i) + bytes(length - 4)))
    return out


class RecordingSocket:
    """Wraps a real socket to count sendmsg/sendto calls (socket.socket has no instance dict to patch)."""

    def __init__(self, sock: socket.socket, fail_gso_with: int | None = None) -> None:
        self.sock = sock
        self.sendmsg_calls = 0
        self.sendto_calls = 0
        self.fail_gso_with = fail_gso_with

    def sendmsg(self, *args):
        self.sendmsg_calls += 1
        if self.fail_gso_with is not None:
            raise OSError(self.fail_gso_with, "forced")
        return self.sock.sendmsg(*args)

    def sendto(self, *args):
        self.sendto_calls += 1
        return self.sock.sendto(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("receiver_gro", [True, False])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_gso_batch_arrives_as_individual_datagrams_in_order(host: str, receiver_gro: bool) -> None:
    with UdpSocket.bind(host, 0, gro=receiver_gro) as rx, UdpSocket.bind(host, 0) as tx:
        assert tx.gso_enabled and rx.gro_enabled == receiver_gro
        recorder = RecordingSocket(tx._sock)
        tx._sock = recorder  # type: ignore[assignment]
        transmits = numbered(150, 1200, rx.local_address, last_size=300)
        tx.send_many(transmits)
        # 150 datagrams to one destination: ceil(150 / 64) GSO sends (the 65,535-byte cap allows 54 of 1200 bytes).
        assert recorder.sendmsg_calls == 3 and recorder.sendto_calls == 0
        got = drain(rx, 150)
        assert [p for p, _ in got] == [t.payload for t in transmits]
        assert all(src == tx.local_address for _, src in got)


def test_mixed_sizes_and_destinations_keep_order() -> None:
    with (
        UdpSocket.bind("127.0.0.1", 0) as rx1,
        UdpSocket.bind("127.0.0.1", 0) as rx2,
        UdpSocket.bind("127.0.0.1", 0) as tx,
    ):
        transmits = [
            *numbered(5, 500, rx1.local_address),
            Transmit(rx1.local_address, b"\x00\x00\x00\x05" + bytes(900)),  # larger: starts a new run
            *numbered(3, 100, rx2.local_address),
            Transmit(rx1.local_address, b"\x00\x00\x00\x06"),
        ]
        tx.send_many(transmits)
        got1 = drain(rx1, 7)
        got2 = drain(rx2, 3)
        assert [p for p, _ in got1] == [t.payload for t in transmits if t.dst == rx1.local_address]
        assert [p for p, _ in got2] == [t.payload for t in transmits if t.dst == rx2.local_address]


def test_gso_disabled_by_flag_sends_one_by_one() -> None:
    with UdpSocket.bind("127.0.0.1", 0, gro=False) as rx, UdpSocket.bind("127.0.0.1", 0, gso=False) as tx:
        assert not tx.gso_enabled and not rx.gro_enabled
        recorder = RecordingSocket(tx._sock)
        tx._sock = recorder  # type: ignore[assignment]
        transmits = numbered(20, 1000, rx.local_address)
        tx.send_many(transmits)
        assert recorder.sendmsg_calls == 0 and recorder.sendto_calls == 20
        assert [p for p, _ in drain(rx, 20)] == [t.payload for t in transmits]


def test_gso_eio_disables_gso_and_resends() -> None:
    with UdpSocket.bind("127.0.0.1", 0) as rx, UdpSocket.bind("127.0.0.1", 0) as tx:
        recorder = RecordingSocket(tx._sock, fail_gso_with=errno.EIO)
        tx._sock = recorder  # type: ignore[assignment]
        transmits = numbered(10, 1000, rx.local_address)
        tx.send_many(transmits)
        assert not tx.gso_enabled
        assert recorder.sendmsg_calls == 1 and recorder.sendto_calls == 10
        tx.send_many(transmits)
        assert recorder.sendmsg_calls == 1 and recorder.sendto_calls == 20
        assert [p for p, _ in drain(rx, 20)] == [t.payload for t in transmits] * 2


def test_other_send_errors_are_counted_not_raised() -> None:
    with UdpSocket.bind("127.0.0.1", 0) as tx:
        recorder = RecordingSocket(tx._sock, fail_gso_with=errno.ENETUNREACH)
        tx._sock = recorder  # type: ignore[assignment]
        tx.send_many(numbered(4, 100, ("127.0.0.1", 9)))
        assert tx.gso_enabled
        assert tx.drops[UdpDropReason.SEND_FAILED] == 4  # every datagram of the failed GSO send


def test_probe_failures_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(UdpSocket, "_probe_gso", staticmethod(lambda sock: False))
    monkeypatch.setattr(UdpSocket, "_probe_gro", staticmethod(lambda sock: False))
    with UdpSocket.bind("127.0.0.1", 0) as rx, UdpSocket.bind("127.0.0.1", 0) as tx:
        assert not tx.gso_enabled and not rx.gro_enabled
        transmits = numbered(30, 700, rx.local_address)
        tx.send_many(transmits)
        assert [p for p, _ in drain(rx, 30)] == [t.payload for t in transmits]


def test_buffers_are_raised() -> None:
    with UdpSocket.bind("127.0.0.1", 0) as sock:
        raw = sock._sock
        # The kernel reports twice the requested size.
        assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= udp_module.RECV_BUFFER
        assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= udp_module.SEND_BUFFER
    with UdpSocket.bind("127.0.0.1", 0, increase_buffers=False) as sock:
        assert sock._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < udp_module.RECV_BUFFER


def test_mark_is_applied() -> None:
    with UdpSocket.bind("127.0.0.1", 0, mark=udp_module.FIREZONE_MARK) as sock:
        assert sock._sock.getsockopt(socket.SOL_SOCKET, udp_module.SO_MARK) & 0xFFFFFFFF == udp_module.FIREZONE_MARK
        sock.set_mark(0x1234)
        assert sock._sock.getsockopt(socket.SOL_SOCKET, udp_module.SO_MARK) == 0x1234


def test_port_in_use_falls_back_to_random_port_only_when_asked() -> None:
    with UdpSocket.bind("127.0.0.1", 0) as first:
        port = first.local_address[1]
        with pytest.raises(OSError) as info:
            UdpSocket.bind("127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
        with UdpSocket.bind("127.0.0.1", port, fallback_random_port=True) as second:
            assert second.local_address[1] not in (0, port)


def test_dual_stack_binds_both_families_on_one_port() -> None:
    with UdpSocket.bind("127.0.0.1", 0) as probe:
        port = probe.local_address[1]
    sockets = bind_dual_stack(port, increase_buffers=False)
    try:
        assert sockets.v4 is not None and sockets.v6 is not None
        assert sockets.v4.local_address == ("0.0.0.0", port)
        assert sockets.v6.local_address == ("::", port)
        with UdpSocket.bind("127.0.0.1", 0) as tx:
            tx.send_many([Transmit(("127.0.0.1", port), b"hello")])
            assert [p for p, _ in drain(sockets.v4, 1)] == [b"hello"]
    finally:
        sockets.close()


def test_recv_errors_do_not_raise() -> None:
    with UdpSocket.bind("127.0.0.1", 0) as sock:
        closed_port = UdpSocket.bind("127.0.0.1", 0)
        target = closed_port.local_address
        closed_port.close()
        sock._sock.connect(target)
        sock.send_many([Transmit(target, b"x")])
        time.sleep(0.05)
        assert sock.recv_many() == []


@pytest.mark.parametrize("gso", [True, False])
def test_send_batch_to_one_destination(gso: bool) -> None:
    with UdpSocket.bind("127.0.0.1", 0) as rx, UdpSocket.bind("127.0.0.1", 0, gso=gso) as tx:
        recorder = RecordingSocket(tx._sock)
        tx._sock = recorder  # type: ignore[assignment]
        payloads = [t.payload for t in numbered(100, 1000, rx.local_address, last_size=10)]
        payloads.insert(30, b"\x00\x00\x00\xff" + bytes(1200))  # larger than its run: ends it, starts another
        tx.send_batch(rx.local_address, payloads)
        if gso:
            # Runs: [0..29]; [30, 31] (a shorter datagram may only end a run); [32..95] (64 segments); [96..100].
            assert (recorder.sendmsg_calls, recorder.sendto_calls) == (4, 0)
        else:
            assert recorder.sendto_calls == 101 and recorder.sendmsg_calls == 0
        assert [p for p, _ in drain(rx, 101)] == payloads


def test_recv_on_a_closed_socket_raises_instead_of_spinning() -> None:
    sock = UdpSocket.bind("127.0.0.1", 0, increase_buffers=False)
    sock.close()
    with pytest.raises(OSError) as raised:
        sock.recv_many()
    assert raised.value.errno == errno.EBADF


def test_receive_queue_reports_what_waits_unread_and_the_buffer_it_fills() -> None:
    receiver = UdpSocket.bind("127.0.0.1", 0)
    sender = UdpSocket.bind("127.0.0.1", 0)
    try:
        queue = receiver.receive_queue()
        assert queue is not None
        assert queue[0] == 0
        assert queue[1] >= 2 * 1024 * 1024  # the enlarged receive buffer, as the kernel accounts it
        sender.send_many(numbered(20, 148, receiver.local_address))
        deadline = time.monotonic() + 3.0
        while (queue := receiver.receive_queue()) is not None and queue[0] < 20 * 148 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert queue is not None and queue[0] >= 20 * 148  # at least the payloads (the kernel counts skb truesize)
        assert len(drain(receiver, 20)) == 20
        assert receiver.receive_queue() == (0, queue[1])
    finally:
        receiver.close()
        sender.close()
