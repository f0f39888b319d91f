"""GRO batches split back into datagrams by both receive paths, including the local-address one the gateway uses."""

from __future__ import annotations

import time

import pytest

from dataplane.base import Address
from dataplane.io.udp import UdpSocket
from tests.integration.test_udp import numbered

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def drain_local(sock: UdpSocket, expected: int, timeout: float = 3.0) -> list[tuple[bytes, Address, Address]]:
    got: list[tuple[bytes, Address, Address]] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = sock.recv_many_local(64)
        if not batch:
            time.sleep(0.005)
        got += batch
    return got


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_recv_many_local_splits_gro_batches_with_a_short_last_segment(host: str) -> None:
    with UdpSocket.bind(host, 0, gro=True, local_addresses=True) as rx, UdpSocket.bind(host, 0) as tx:
        assert rx.gro_enabled and tx.gso_enabled
        transmits = numbered(100, 1200, rx.local_address, last_size=300)
        tx.send_many(transmits)
        got = drain_local(rx, 100)
    assert [payload for payload, _, _ in got] == [t.payload for t in transmits]
    assert {src for _, src, _ in got} == {tx.local_address}
    assert {local for _, _, local in got} == {rx.local_address}
