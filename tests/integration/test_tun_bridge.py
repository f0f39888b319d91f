"""Two namespaces joined only by two of our Tun devices and a forwarding thread (a tunnel without crypto).

Real kernel TCP runs across it, so TSO super-packets are split on read and segments merged on write; a sequence-numbered
UDP stream checks that 2 queues never reorder a flow.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from dataplane.io.netlink import run_in_netns
from dataplane.io.tun import Tun
from lab.netns import Netns, Topology
from tests.integration.helpers_flow_order import send_sequenced_flows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ADDR_A = "10.72.0.1"
ADDR_B = "10.72.0.2"
ADDR6_A = "fd72::1"
ADDR6_B = "fd72::2"


@contextmanager
def bridged(queues: int, offload: bool, read_offload: bool = True) -> Iterator[tuple[Netns, Netns, Tun, Tun]]:
    with Topology("tbr") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        options = {"queues": queues, "offload": offload, "read_offload": read_offload}
        tun_a = run_in_netns(a.name, lambda: Tun.create("fzbr0", **options))  # type: ignore[arg-type]
        tun_b = run_in_netns(b.name, lambda: Tun.create("fzbr0", **options))  # type: ignore[arg-type]
        stop_r, stop_w = os.pipe()
        forwarder = threading.Thread(target=_forward, args=(tun_a, tun_b, stop_r), name="test-forwarder")
        try:
            for ns, local, peer, local6 in ((a, ADDR_A, ADDR_B, ADDR6_A), (b, ADDR_B, ADDR_A, ADDR6_B)):
                ns.exec(["ip", "addr", "add", f"{local}/32", "peer", f"{peer}/32", "dev", "fzbr0"])
                ns.exec(["ip", "-6", "addr", "add", f"{local6}/64", "dev", "fzbr0", "nodad"])
                ns.exec(["ip", "link", "set", "fzbr0", "up"])
            forwarder.start()
            yield a, b, tun_a, tun_b
        finally:
            os.write(stop_w, b"x")
            if forwarder.is_alive():
                forwarder.join()
            os.close(stop_r)
            os.close(stop_w)
            tun_a.close()
            tun_b.close()


def _forward(tun_a: Tun, tun_b: Tun, stop_fd: int) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(tun_a.wakeup_fd, selectors.EVENT_READ, (tun_a, tun_b))
        selector.register(tun_b.wakeup_fd, selectors.EVENT_READ, (tun_b, tun_a))
        selector.register(stop_fd, selectors.EVENT_READ, None)
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    return
                source, sink = key.data
                while packets := source.poll_recv_many(100):
                    sink.send_many(packets)


def sock_in(ns: Netns, kind: int, family: int = socket.AF_INET) -> socket.socket:
    return run_in_netns(ns.name, lambda: socket.socket(family, kind))


def tcp_transfer_digest(a: Netns, b: Netns, family: int, server_addr: str, port: int, data: bytes) -> list[str]:
    """Sends ``data`` from ``a`` to ``b`` over one TCP connection; the SHA-256 (hex) of what ``b`` received, in a list
    (empty when the receiver never finished)."""
    server = sock_in(b, socket.SOCK_STREAM, family)
    client = sock_in(a, socket.SOCK_STREAM, family)
    digest: list[str] = []
    with server, client:
        server.bind((server_addr, port))
        server.listen(1)
        server.settimeout(20)  # a failing connect must not leave the receiver thread blocked in accept

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                h = hashlib.sha256()
                while chunk := conn.recv(1 << 16):
                    h.update(chunk)
                digest.append(h.hexdigest())

        receiver = threading.Thread(target=receive, name="test-receiver")
        receiver.start()
        client.settimeout(30)
        client.connect((server_addr, port))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        receiver.join(timeout=60)
    return digest


@pytest.mark.parametrize(("queues", "family"), [(1, socket.AF_INET), (2, socket.AF_INET), (2, socket.AF_INET6)])
def test_tcp_bulk_transfer_with_offloads_is_intact(queues: int, family: int) -> None:
    data = os.urandom(1 << 20) * 12
    server_addr = ADDR_B if family == socket.AF_INET else ADDR6_B
    with bridged(queues, offload=True) as (a, b, tun_a, tun_b):
        assert tun_a.offload_enabled and tun_b.offload_enabled
        digest = tcp_transfer_digest(a, b, family, server_addr, 5201, data)
        assert digest == [hashlib.sha256(data).hexdigest()]
        sent, got = tun_a.stats(), tun_b.stats()
        assert sent.rx_packets > sent.rx_frames, "no TSO super-packet was split on read"
        assert got.tx_frames < got.tx_packets, "no segments were merged on write"
        assert tun_a.drops.total() == 0 and tun_b.drops.total() == 0


def test_tcp_without_read_offload_reads_single_packets_and_still_merges_writes() -> None:
    data = os.urandom(1 << 20) * 6
    with bridged(2, offload=True, read_offload=False) as (a, b, tun_a, tun_b):
        assert tun_a.offload_enabled and not tun_a.read_offload
        digest = tcp_transfer_digest(a, b, socket.AF_INET, ADDR_B, 5202, data)
        assert digest == [hashlib.sha256(data).hexdigest()]
        sent, got = tun_a.stats(), tun_b.stats()
        assert sent.rx_packets == sent.rx_frames, "the kernel handed over super-packets although asked not to"
        assert got.tx_frames < got.tx_packets, "no segments were merged on write"
        assert tun_a.drops.total() == 0 and tun_b.drops.total() == 0


@pytest.mark.parametrize("offload", [False, True])
def test_udp_flows_are_never_reordered_at_two_queues(offload: bool) -> None:
    flows, per_flow = 6, 3000
    with bridged(2, offload=offload) as (a, b, _tun_a, _tun_b):
        result = send_sequenced_flows(
            a.name,
            b.name,
            ADDR_B,
            5300,
            flows=flows,
            per_flow=per_flow,
            # Loss is not the point; keep most datagrams so the check has teeth.
            pause_every=50,
            pause=0.002,
            receive_buffer=8 << 20,
            idle_timeout=1.0,
        )
    assert result.reordered == 0
    assert min(result.received_per_flow) > per_flow // 4, result.received_per_flow
