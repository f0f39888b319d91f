"""agent/datapath.py without a kernel: how the driver reacts to what its devices report."""

from __future__ import annotations

import socket
from typing import Any

from agent.datapath import DataPlane, DataPlaneOptions
from dataplane.gateway import GatewayState
from dataplane.io.rng import SeededRng
from dataplane.io.tun import TunStats
from dataplane.io.tun_direct import DirectTunWriter
from tests.sim.harness import private_key_for


class DeadQueueTun:
    failure = "thread tun-x-tx0 died: RuntimeError: planted"

    def poll_recv_many(self, max: int) -> list[bytes]:
        return []


def test_a_failed_tun_thread_stops_the_gateway() -> None:
    failures: list[str] = []
    state = GatewayState(private_key_for("gw"), rng=SeededRng(1), wall_clock=lambda: 1_800_000_000.0)
    plane = DataPlane(state, DataPlaneOptions(tun_name="tun-x"), on_fatal=failures.append)
    fake: Any = DeadQueueTun()
    plane.tun = fake
    plane._on_tun_readable()
    plane._on_tun_readable()  # reported once
    assert plane.failure is not None and "planted" in plane.failure
    assert failures == [plane.failure]


class CountingTun:
    """The device's own writer threads wrote 3 frames; its queue 0 descriptor is a socket the test reads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def stats(self) -> TunStats:
        return TunStats(rx_frames=0, rx_packets=0, rx_direct_frames=0, tx_frames=3, tx_packets=3)


def test_tun_tx_frames_counts_the_loops_direct_writes_and_the_writer_threads() -> None:
    state = GatewayState(private_key_for("gw"), rng=SeededRng(1), wall_clock=lambda: 1_800_000_000.0)
    plane = DataPlane(state, DataPlaneOptions(tun_name="tun-x"), on_fatal=lambda _reason: None)
    assert plane.tun_tx_frames() == 0
    device, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with device, reader:
        fake: Any = CountingTun(device.fileno())
        plane.tun = fake
        plane._tun_writer = DirectTunWriter(device.fileno(), offload_flags=0)
        plane._tun_writer.write([b"\x45" + bytes(19), b"\x45" + bytes(19)])
        assert plane.tun_tx_frames() == 2 + 3
