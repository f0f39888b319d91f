"""The TURN client against a real coturn (Debian 4.6.1) on loopback with TURN REST shared-secret credentials."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from dataplane import stun
from dataplane.io.rng import SystemRng
from dataplane.stun import Method
from dataplane.turn import (
    Allocation,
    AllocationDeleted,
    AllocationFailed,
    AllocationRefreshed,
    AllocationState,
    AllocationSucceeded,
    BindingSucceeded,
    ChannelBound,
    Decapsulated,
    TurnEvent,
)
from lab.netns import Topology
from lab.relay import Coturn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class Driver:
    """The smallest possible I/O loop around one Allocation: one UDP socket on loopback, a monotonic clock."""

    def __init__(self, relay: Coturn, password: str | None = None, local_ip: str = "127.0.0.1") -> None:
        username, real_password = relay.credentials()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((local_ip, 0))
        self.sent: list[stun.StunMessage] = []
        self.events: list[TurnEvent] = []
        self.received: list[Decapsulated] = []
        self.alloc = Allocation(
            relay.address, username, password or real_password, rng=SystemRng(), now=time.monotonic()
        )

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        while (transmit := self.alloc.poll_transmit()) is not None:
            if stun.is_stun(transmit.payload):
                self.sent.append(stun.decode(transmit.payload))
            self.sock.sendto(transmit.payload, transmit.dst)
        while (event := self.alloc.poll_event()) is not None:
            self.events.append(event)

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self.alloc.handle_timeout(now)
            self.flush()
            if done():
                return
            assert now < end, f"timed out; events so far: {self.events}"
            deadline = self.alloc.poll_timeout()
            wait = 0.1 if deadline is None else min(0.1, max(0.001, deadline - now))
            self.sock.settimeout(wait)
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            result = self.alloc.handle_input(data, (src[0], src[1]), time.monotonic())
            if isinstance(result, Decapsulated):
                self.received.append(result)

    def wait_for(self, kind: type, timeout: float = 10.0) -> TurnEvent:
        self.run_until(lambda: any(isinstance(e, kind) for e in self.events), timeout)
        return next(e for e in self.events if isinstance(e, kind))


@pytest.fixture(scope="module")
def relay() -> Iterator[Coturn]:
    with Coturn() as server:
        yield server


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3.0)
    yield sock
    sock.close()


@pytest.fixture
def driver(relay: Coturn) -> Iterator[Driver]:
    d = Driver(relay)
    yield d
    d.close()


def test_allocate_refresh_channel_bind_and_channel_data_both_ways(
    relay: Coturn, driver: Driver, peer: socket.socket
) -> None:
    allocated = driver.wait_for(AllocationSucceeded)
    assert isinstance(allocated, AllocationSucceeded)
    local_port = driver.sock.getsockname()[1]
    assert allocated.srflx == ("127.0.0.1", local_port)
    (relay_address,) = allocated.relay_addresses  # this coturn is IPv4-only: ADDITIONAL-ADDRESS-FAMILY not granted
    assert relay_address[0] == "127.0.0.1"
    assert BindingSucceeded(relay.address, ("127.0.0.1", local_port), driver.events[0].rtt) in driver.events  # type: ignore[union-attr]
    allocates = [m for m in driver.sent if m.method == Method.ALLOCATE]
    assert len(allocates) == 2 and allocates[0].nonce() is None and allocates[1].nonce() is not None

    driver.alloc.refresh(time.monotonic())
    refreshed = driver.wait_for(AllocationRefreshed)
    assert isinstance(refreshed, AllocationRefreshed) and refreshed.lifetime == 600

    peer_address = peer.getsockname()
    number = driver.alloc.bind_channel(peer_address, time.monotonic())
    assert number == 0x4000
    assert driver.wait_for(ChannelBound) == ChannelBound(peer_address, 0x4000)

    for i in range(3):
        transmit = driver.alloc.encapsulate(peer_address, f"to-peer-{i}".encode(), time.monotonic())
        assert transmit is not None and transmit.payload[:2] == b"\x40\x00"
        driver.sock.sendto(transmit.payload, transmit.dst)
        data, src = peer.recvfrom(2048)
        assert data == f"to-peer-{i}".encode()
        assert src == relay_address  # the peer sees the relayed address, not ours

    peer.sendto(b"from-peer", relay_address)
    driver.run_until(lambda: bool(driver.received))
    assert driver.received == [Decapsulated(peer_address, b"from-peer")]
    assert driver.alloc.drops.total() == 0

    driver.alloc.shutdown(time.monotonic())
    driver.wait_for(AllocationDeleted)
    assert driver.alloc.state is AllocationState.DELETED
    assert driver.alloc.encapsulate(peer_address, b"after-delete", time.monotonic()) is None


def test_wrong_password_is_a_clean_failure_event(relay: Coturn) -> None:
    # Its own loopback address: a 5-tuple coturn has never seen (it keeps deleted allocations around briefly).
    driver = Driver(relay, password="not-the-password", local_ip="127.0.0.3")
    try:
        failed = driver.wait_for(AllocationFailed)
    finally:
        driver.close()
    assert isinstance(failed, AllocationFailed)
    assert failed.error_code == 401, f"{failed}; events {driver.events}; sent {driver.sent}"
    assert driver.alloc.state is AllocationState.FAILED
    assert driver.alloc.poll_timeout() is None
    assert not any(isinstance(e, AllocationSucceeded) for e in driver.events)


def test_stale_nonce_recovery() -> None:
    with Coturn(stale_nonce=1) as relay:
        driver = Driver(relay)
        try:
            driver.wait_for(AllocationSucceeded)
            first_nonce = driver.alloc.nonce
            time.sleep(2.2)  # let coturn's nonce go stale
            driver.alloc.refresh(time.monotonic())
            refreshed = driver.wait_for(AllocationRefreshed)
        finally:
            driver.close()
    assert isinstance(refreshed, AllocationRefreshed)
    refreshes = [m for m in driver.sent if m.method == Method.REFRESH]
    assert len(refreshes) == 2, "the first REFRESH must get 438 and be retried"
    assert refreshes[0].nonce() == first_nonce
    assert refreshes[1].nonce() == driver.alloc.nonce != first_nonce
    assert not any(isinstance(e, AllocationFailed) for e in driver.events)


def test_launcher_runs_coturn_inside_a_namespace_and_cleans_up() -> None:
    with Topology("turn") as topo:
        ns = topo.add_ns("relay")
        relay = Coturn(listen_ip="127.0.0.1", netns=ns)
        with relay:
            process = relay.process
            assert process is not None and process.poll() is None
            assert relay.answers_binding()
            assert list(process.args)[:4] == ["ip", "netns", "exec", ns.name]  # type: ignore[arg-type]
        assert relay.process is None
        assert process.poll() is not None
        assert relay.workdir is None


def test_allocation_mismatch_after_forgetting_an_allocation_is_recovered(relay: Coturn, driver: Driver) -> None:
    """We gave up on an allocation coturn still holds (same 5-tuple): the fresh ALLOCATE gets 437, so the client
    deletes the stale allocation with LIFETIME 0 and allocates again."""
    first = driver.wait_for(AllocationSucceeded)
    assert isinstance(first, AllocationSucceeded)
    old = driver.alloc
    driver.alloc = Allocation(relay.address, old.username, old.password, rng=SystemRng(), now=time.monotonic())
    driver.events.clear()
    driver.sent.clear()
    driver.wait_for(AllocationSucceeded)
    assert not any(isinstance(e, AllocationFailed) for e in driver.events)
    # coturn answers 437 before authenticating: the deletion itself goes through the 401 dance.
    deletions = [m for m in driver.sent if m.method == Method.REFRESH and m.lifetime() == 0]
    assert [m.nonce() is not None for m in deletions] == [False, True]
    allocates = [m for m in driver.sent if m.method == Method.ALLOCATE]
    assert allocates[0].nonce() is None and allocates[-1].nonce() is not None  # then 440 etc. as usual
    driver.alloc.shutdown(time.monotonic())
    driver.wait_for(AllocationDeleted)
