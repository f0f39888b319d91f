"""agent/datapath.py without a kernel: how the driver reacts to what its devices report."""

from __future__ import annotations

from typing import Any

from agent.datapath import DataPlane, DataPlaneOptions
from dataplane.gateway import GatewayState
from dataplane.io.rng import SeededRng
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
