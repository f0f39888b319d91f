"""dataplane.io.tun against the real kernel: multi-queue, exclusivity, offload probing, backpressure bounds.

Every device lives in a namespace the test creates (entered from a short-lived thread, see dataplane.io.netlink).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from dataplane import packet as pk
from dataplane.io import tun as tun_module
from dataplane.io.netlink import run_in_netns
from dataplane.io.tun import Tun, TunDropReason, TunError
from lab.netns import Netns, Topology

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TUN_ADDR = "10.71.0.1"
PEER_ADDR = "10.71.0.2"


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Topology("tun") as topo:
        yield topo.add_ns("a")


def create(ns: Netns, name: str = "fztun0", **kwargs: object) -> Tun:
    return run_in_netns(ns.name, lambda: Tun.create(name, **kwargs))  # type: ignore[arg-type]


def configure(ns: Netns, name: str = "fztun0") -> None:
    ns.exec(["ip", "addr", "add", f"{TUN_ADDR}/32", "peer", f"{PEER_ADDR}/32", "dev", name])
    ns.exec(["ip", "link", "set", name, "up"])


def udp_to_tun_address(payload: bytes, *, sport: int = 7000, dport: int = 6000, ip_id: int = 1) -> bytes:
    """An IPv4/UDP packet from the peer to our TUN address, checksums computed the slow way."""
    src, dst = socket.inet_aton(PEER_ADDR), socket.inet_aton(TUN_ADDR)
    udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    struct.pack_into("!H", udp, 6, pk.internet_checksum(pseudo + bytes(udp)) or 0xFFFF)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ip_id, 0, 64, 17, 0, src, dst))
    struct.pack_into("!H", header, 10, pk.internet_checksum(header))
    return bytes(header) + bytes(udp)


def link_details(ns: Netns, name: str = "fztun0") -> str:
    return ns.exec(["ip", "-d", "link", "show", name])


def receive_all(sock: socket.socket, timeout: float = 1.0) -> list[bytes]:
    sock.settimeout(timeout)
    got: list[bytes] = []
    try:
        while True:
            got.append(sock.recv(65535))
    except TimeoutError:
        pass
    return got


def test_multi_queue_opens_one_fd_and_two_threads_per_queue(ns: Netns) -> None:
    with create(ns, queues=3) as tun:
        assert tun.queues == 3
        fds = tun.queue_fds()
        assert len(set(fds)) == 3
        for fd in fds:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                assert "iff:\tfztun0" in f.read()
        details = link_details(ns)
        assert "multi_queue" in details and "numqueues 3" in details
        assert "qlen 10000" in details
        import threading

        names = {t.name for t in threading.enumerate()}
        assert {f"tun-fztun0-{role}{i}" for role in ("rx", "tx") for i in range(3)} <= names
    assert "fztun0" not in ns.exec(["ip", "link", "show"])


def test_single_queue_is_not_multi_queue(ns: Netns) -> None:
    with create(ns, queues=1, offload=False):
        details = link_details(ns)
        assert "multi_queue" not in details and "vnet_hdr off" in details


def test_second_attach_is_refused_in_process_and_from_another_process(ns: Netns) -> None:
    with create(ns, queues=2):
        with pytest.raises(TunError, match="in use by another process") as info:
            create(ns, queues=2)
        assert info.value.errno == errno.EBUSY
        code = "from dataplane.io.tun import Tun\nTun.create('fztun0', queues=2)"
        proc = subprocess.run(ns.argv([sys.executable, "-c", code]), capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0
        assert "in use by another process" in proc.stderr
        assert "numqueues 2" in link_details(ns)


def test_the_lock_file_is_removed_at_close_and_taken_again(ns: Netns) -> None:
    """Issue 11 finding 8: nothing of ours is left in /run/firezone once the device is closed."""
    netns_lock = f"tun-{run_in_netns(ns.name, tun_module._netns_id)}-fztun0.lock"
    with create(ns):
        assert netns_lock in os.listdir(tun_module.LOCK_DIR)
    assert netns_lock not in os.listdir(tun_module.LOCK_DIR)
    with create(ns):  # and the name is usable again
        assert netns_lock in os.listdir(tun_module.LOCK_DIR)
    assert netns_lock not in os.listdir(tun_module.LOCK_DIR)


def test_existing_device_that_is_not_ours_is_refused(ns: Netns) -> None:
    ns.exec(["ip", "link", "add", "fztun0", "type", "veth", "peer", "name", "fzpeer0"])
    with pytest.raises(TunError, match="already exists"):
        create(ns)
    assert "veth" in ns.exec(["ip", "-d", "link", "show", "fztun0"])


def test_same_name_in_two_namespaces_is_fine() -> None:
    with Topology("tun") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        with create(a, queues=2), create(b, queues=2):
            assert "numqueues 2" in link_details(a) and "numqueues 2" in link_details(b)


def _round_trip(ns: Netns, tun: Tun) -> None:
    """A datagram from a socket in the namespace comes out of poll_recv_many; packets sent in come out of a socket."""
    configure(ns)
    receiver = run_in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sender = run_in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with receiver, sender:
        receiver.bind((TUN_ADDR, 6000))
        sender.sendto(b"out" * 100, (PEER_ADDR, 5000))
        deadline = time.monotonic() + 5
        seen: list[bytes] = []
        while time.monotonic() < deadline:
            seen += tun.poll_recv_many()
            if any(p[0] >> 4 == 4 and p[9] == 17 for p in seen):
                break
            time.sleep(0.01)
        (out,) = [p for p in seen if p[0] >> 4 == 4 and p[9] == 17]
        assert out.endswith(b"out" * 100) and pk.l4_checksum_valid(out)
        packets = [udp_to_tun_address(struct.pack("!I", i) * 300, ip_id=i) for i in range(20)]
        assert tun.send_many(packets) == 20
        got = receive_all(receiver)
        assert [struct.unpack_from("!I", g)[0] for g in got] == list(range(20))


def test_offloads_probed_and_round_trip(ns: Netns) -> None:
    with create(ns, queues=2) as tun:
        assert tun.offload_enabled
        assert tun.offload_flags & tun_module.TUN_OFFLOADS_TCP == tun_module.TUN_OFFLOADS_TCP
        assert "vnet_hdr on" in link_details(ns)
        _round_trip(ns, tun)
        stats = tun.stats()
        # 20 equal datagrams of one flow: written as fewer frames when USO was accepted.
        if tun.offload_flags & tun_module.TUN_F_USO4:
            assert stats.tx_frames < stats.tx_packets


def test_offload_disabled_by_flag(ns: Netns) -> None:
    with create(ns, queues=2, offload=False) as tun:
        assert not tun.offload_enabled and tun.offload_flags == 0
        assert "vnet_hdr off" in link_details(ns)
        _round_trip(ns, tun)
        stats = tun.stats()
        assert stats.tx_frames == stats.tx_packets == 20


def test_offload_probe_failure_falls_back_cleanly(ns: Netns, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def refuse(fd: int, flags: int) -> None:
        calls.append(flags)
        raise OSError(errno.EINVAL, "forced")

    monkeypatch.setattr(tun_module, "_set_offload", refuse)
    with create(ns, queues=2) as tun:
        assert calls == [tun_module.TUN_OFFLOADS_FULL, tun_module.TUN_OFFLOADS_TCP]
        assert not tun.offload_enabled
        assert "vnet_hdr off" in link_details(ns)
        _round_trip(ns, tun)


def test_outbound_backpressure_is_bounded_and_counted(ns: Netns) -> None:
    with create(ns, queues=1, offload=False, outbound_capacity=64) as tun:
        configure(ns)
        packets = [udp_to_tun_address(b"x" * 1000, ip_id=i) for i in range(5000)]
        accepted = tun.send_many(packets)
        assert 0 < accepted <= 64
        assert tun.drops[TunDropReason.OUTBOUND_QUEUE_FULL] == 5000 - accepted
        assert tun.pending_outbound() <= 64
        for packet in packets[:500]:
            tun.send(packet)
            assert tun.pending_outbound() <= 64
        deadline = time.monotonic() + 5
        while tun.pending_outbound() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tun.poll_send_ready()
        assert tun.send(packets[0])


@pytest.mark.parametrize("queues", [1, 2])
def test_outbound_wait_makes_a_full_queue_push_back_instead_of_dropping(ns: Netns, queues: int) -> None:
    # The same burst as above: with outbound_wait the caller waits for the writer instead of dropping, and the deque
    # never holds more than its capacity.
    with create(ns, queues=queues, offload=False, outbound_capacity=64, outbound_wait=5.0) as tun:
        configure(ns)
        packets = [udp_to_tun_address(b"x" * 1000, ip_id=i) for i in range(5000)]
        assert tun.send_many(packets) == 5000
        assert tun.drops[TunDropReason.OUTBOUND_QUEUE_FULL] == 0
        assert tun.pending_outbound() <= 64
        deadline = time.monotonic() + 5
        while tun.pending_outbound() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tun.stats().tx_packets == 5000


def test_inbound_queue_is_bounded_and_pushes_back_without_loss(ns: Netns) -> None:
    with create(ns, queues=1, offload=False, inbound_capacity=32) as tun:
        configure(ns)
        sender = run_in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with sender:
            for i in range(300):
                sender.sendto(struct.pack("!I", i), (PEER_ADDR, 5000))
        time.sleep(0.3)
        # Nobody polled: the reader stopped at the bound and left the rest in the kernel's queue.
        assert len(tun._inbound) <= 32
        assert tun.stats().rx_frames <= 32 + 64
        received: list[int] = []
        deadline = time.monotonic() + 10
        while len(received) < 300 and time.monotonic() < deadline:
            batch = tun.poll_recv_many(1000)
            assert len(batch) <= 32
            received += [struct.unpack_from("!I", p, 28)[0] for p in batch if p[0] == 0x45 and p[9] == 17]
            time.sleep(0.002)
        assert received == list(range(300))
        assert tun.drops[TunDropReason.INBOUND_QUEUE_FULL] == 0


def test_inbound_overflow_of_a_split_batch_is_counted(ns: Netns) -> None:
    """With offloads one frame can split into many packets: what does not fit is dropped and counted, not queued."""
    with create(ns, queues=1, offload=True, inbound_capacity=4, adaptive_reads=False) as tun:
        configure(ns)
        ns.exec(["ip", "link", "set", "fztun0", "mtu", "1500"])
        sender = run_in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with sender:
            if tun.offload_flags & tun_module.TUN_F_USO4:
                sender.setsockopt(17, 103, 1000)  # UDP_SEGMENT: one 10-datagram super-packet through the TUN
                sender.sendto(bytes(10000), (PEER_ADDR, 5000))
            else:
                pytest.skip("kernel without USO on TUN")
        deadline = time.monotonic() + 5
        while tun.drops[TunDropReason.INBOUND_QUEUE_FULL] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tun.drops[TunDropReason.INBOUND_QUEUE_FULL] > 0
        assert len(tun._inbound) <= 4


def test_queue_count_from_environment() -> None:
    assert tun_module.queues_from_env({"FIREZONE_NUM_TUN_THREADS": "3"}) == 3
    assert tun_module.queues_from_env({}) in (1, 2)
    with pytest.raises(ValueError):
        tun_module.queues_from_env({"FIREZONE_NUM_TUN_THREADS": "0"})


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        Tun.create("x" * 16)
    with pytest.raises(ValueError):
        Tun.create("fzok0", queues=0)


def test_adaptive_reads_switch_modes_and_keep_order(ns: Netns) -> None:
    """Quiet queues are read by the event loop, bursts by the thread; across the switches a stream stays in order.

    Each round provokes the risky moment: the thread took over a burst and queued it, went quiet and handed the queue
    back to the loop, and a new datagram waits in the kernel while the burst still waits in the deque.
    """
    with create(ns, queues=1, offload=True) as tun:
        configure(ns)
        sender = run_in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        received: list[int] = []

        def take(batch: list[bytes]) -> None:
            received.extend(struct.unpack_from("!I", p, 28)[0] for p in batch if p[0] == 0x45 and p[9] == 17)

        with sender:
            seq = 0
            for _ in range(8):
                time.sleep(0.02)  # quiet: the queue is (or becomes) direct
                for _ in range(60):
                    sender.sendto(struct.pack("!I", seq), (PEER_ADDR, 5000))
                    seq += 1
                first = tun.poll_recv_many(16)  # read directly; the budget runs out, the thread takes over
                assert len(first) <= 16
                take(first)
                time.sleep(0.03)  # the thread queues the rest, goes quiet and hands the queue back
                sender.sendto(struct.pack("!I", seq), (PEER_ADDR, 5000))
                seq += 1
                time.sleep(0.005)
                deadline = time.monotonic() + 2
                while len(received) < seq and time.monotonic() < deadline:
                    take(tun.poll_recv_many(16))
        assert received == list(range(seq))
        stats = tun.stats()
        assert 0 < stats.rx_direct_frames < stats.rx_frames, stats


def test_direct_when_quiet_hands_quiet_queues_to_poll_recv_many_and_keeps_order(ns: Netns) -> None:
    """With ``on_packets`` and ``direct_when_quiet``: a lone datagram on a quiet queue comes out of poll_recv_many, a
    burst goes back to the thread's callback, and a stream stays in order across the switches when the poller takes
    the lock the callback takes (as firezone-wg's event loop does).

    The burst is USO super-packets of 10 datagrams: a direct read that splits one past ``max`` must return all of it,
    since a remainder kept for the next call would be overtaken by the thread the queue was just handed back to."""
    import threading

    lock = threading.Lock()
    received: list[int] = []
    via_callback = {"batches": 0}

    def take(batch: list[bytes]) -> None:
        received.extend(struct.unpack_from("!I", p, 28)[0] for p in batch if p[0] == 0x45 and p[9] == 17)

    def consume(batch: list[bytes]) -> None:
        with lock:
            via_callback["batches"] += 1
            take(batch)

    def poll(limit: int) -> int:
        with lock:
            batch = tun.poll_recv_many(limit)
            take(batch)
            return len(batch)

    segment = 100
    with create(ns, queues=1, offload=True, on_packets=consume, direct_when_quiet=True) as tun:
        if not tun.offload_flags & tun_module.TUN_F_USO4:
            pytest.skip("kernel without USO on TUN")
        configure(ns)
        sender = run_in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        poller = select.poll()
        poller.register(tun.wakeup_fd, select.POLLIN)
        with sender:
            seq = 0
            direct_reads = 0
            for _ in range(6):
                time.sleep(0.03)  # quiet: the queue becomes direct
                sender.setsockopt(17, 103, 0)  # UDP_SEGMENT off: one plain datagram
                sender.sendto(struct.pack("!I", seq), (PEER_ADDR, 5000))
                seq += 1
                assert poller.poll(2000), "a quiet queue's datagram must make wakeup_fd readable"
                direct_reads += poll(16)
                time.sleep(0.03)
                sender.setsockopt(17, 103, segment)
                for _ in range(12):  # super-packets: the loop's read budget runs out and the thread takes over
                    sender.sendto(
                        b"".join(struct.pack("!I", seq + k).ljust(segment) for k in range(10)), (PEER_ADDR, 5000)
                    )
                    seq += 10
                assert poller.poll(2000)
                batches_before = via_callback["batches"]
                direct_reads += poll(4)  # four super-packets: the budget is used up, the queue goes back
                deadline = time.monotonic() + 2
                while via_callback["batches"] == batches_before and time.monotonic() < deadline:
                    time.sleep(0.005)  # the thread delivers the rest before the loop polls again
                while len(received) < seq and time.monotonic() < deadline:
                    if poller.poll(10):
                        direct_reads += poll(4)
        assert received == list(range(seq))
        assert direct_reads >= 6 and via_callback["batches"] >= 1
        stats = tun.stats()
        assert 0 < stats.rx_direct_frames < stats.rx_frames, stats


@pytest.mark.allow_error_logs
def test_a_thread_that_dies_is_logged_counted_and_reported(ns: Netns) -> None:
    """Issue 11 finding 7: a writer thread killed by an unexpected error must not leave a silently dead queue."""
    with create(ns, offload=False) as tun:
        configure(ns)

        def explode(queue: object, packets: list[bytes]) -> bool:
            raise RuntimeError("planted bug")

        tun._write_batch = explode  # type: ignore[method-assign]
        assert tun.failure is None
        tun.send_many([udp_to_tun_address(b"x" * 64) for _ in range(4)])  # more than the inline fast path takes
        deadline = time.monotonic() + 5
        while tun.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tun.failure is not None and "planted bug" in tun.failure
        assert tun.drops[TunDropReason.THREAD_FAILED] == 1
        poller = select.poll()
        poller.register(tun.wakeup_fd, select.POLLIN)
        assert poller.poll(1000), "the event loop must be woken to notice the failure"


@pytest.mark.allow_error_logs
def test_reader_threads_hand_batches_to_on_packets_in_order(ns: Netns) -> None:
    """With ``on_packets`` the reader thread delivers each batch itself (nothing for poll_recv_many); a consumer that
    raises loses its batch, counted, and the thread keeps delivering."""
    import threading

    delivered: list[bytes] = []
    arrived = threading.Event()
    failures = {"left": 1}

    def consume(batch: list[bytes]) -> None:
        udp = [p for p in batch if p[0] >> 4 == 4 and p[9] == 17 and p[22:24] == struct.pack("!H", 5000)]
        if udp and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("consumer bug")
        delivered.extend(udp)
        if len(delivered) >= 50:
            arrived.set()

    with create(ns, queues=1, on_packets=consume) as tun:
        configure(ns)
        sender = run_in_netns(ns.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with sender:
            sender.sendto(b"lost", (PEER_ADDR, 5000))
            deadline = time.monotonic() + 5
            while tun.drops["consumer_failed"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert tun.drops[TunDropReason.CONSUMER_FAILED] >= 1
            for i in range(50):
                sender.sendto(struct.pack("!I", i) * 10, (PEER_ADDR, 5000))
            assert arrived.wait(10)
        assert tun.poll_recv_many() == []
    assert [struct.unpack_from("!I", p, 28)[0] for p in delivered] == list(range(50))
