"""Our ICE agent (controlled, like the gateway) against aioice 0.13 (controlling) on loopback.

The agent is driven by a small asyncio UDP driver written here: one socket, STUN to the agent, relay traffic through a
``dataplane.turn.Allocation`` when the agent has a relayed candidate, anything else recorded as application data.
The relayed variant uses a real coturn (``lab.relay``) for both sides: aioice allocates with ``turn_server`` and gathers
only relayed candidates, we allocate with our TURN client and announce only our relayed candidate, so every packet
crosses the relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import cast

import aioice
import aioice.ice
import pytest

from dataplane import stun
from dataplane.base import Address, Transmit
from dataplane.ice import Candidate, CandidateKind, IceAgent, IceConnected, IceEvent, SelectedPairChanged
from dataplane.io.rng import SystemRng
from dataplane.turn import Allocation, AllocationSucceeded, Decapsulated, TurnEvent
from lab.relay import Coturn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LOCAL_UFRAG = "gw01"
LOCAL_PWD = "gatewaypassword0123456"


class IceUdpDriver(asyncio.DatagramProtocol):
    """Runs an IceAgent (and optionally one TURN allocation) on one asyncio UDP socket."""

    def __init__(self, agent: IceAgent) -> None:
        self.agent = agent
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Address = ("0.0.0.0", 0)
        self.allocation: Allocation | None = None
        self.relay_address: Address | None = None
        self.events: list[IceEvent] = []
        self.turn_events: list[TurnEvent] = []
        self.data: list[tuple[bytes, Address, Address]] = []
        self.changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.DatagramProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        host, port = transport.get_extra_info("sockname")[:2]
        self.local = (host, port)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        now = self.loop.time()
        src = (str(addr[0]), int(addr[1]))
        if self.allocation is not None and self.allocation.owns(src):
            result = self.allocation.handle_input(data, src, now)
            if isinstance(result, Decapsulated):
                assert self.relay_address is not None
                self._from_peer(result.payload, result.peer, self.relay_address, now)
        else:
            self._from_peer(data, src, self.local, now)
        self.pump()

    # driving

    def start_allocation(self, server: Address, username: str, password: str) -> None:
        self.allocation = Allocation(
            server, username, password, rng=SystemRng(), request_ipv6=False, local=self.local, now=self.loop.time()
        )
        self.pump()

    def send_data(self, payload: bytes) -> None:
        selected = self.agent.selected_pair
        assert selected is not None
        local, remote = selected
        self._send(Transmit(remote.address, payload, local.address), self.loop.time())
        self.pump()

    def _from_peer(self, data: bytes, src: Address, local: Address, now: float) -> None:
        if stun.is_stun(data) and self.agent.handle_stun(data, src, local, now):
            return
        self.data.append((data, src, local))

    def _send(self, transmit: Transmit, now: float) -> None:
        assert self.transport is not None
        if transmit.src in (None, self.local):
            self.transport.sendto(transmit.payload, transmit.dst)
        elif self.allocation is not None and transmit.src == self.relay_address:
            # No channel yet: encapsulate starts binding one and this datagram is lost (the check retransmits).
            wrapped = self.allocation.encapsulate(transmit.dst, transmit.payload, now)
            if wrapped is not None:
                self.transport.sendto(wrapped.payload, wrapped.dst)
        else:
            raise AssertionError(f"transmit from unknown local address {transmit.src}")

    def pump(self) -> None:
        assert self.transport is not None
        now = self.loop.time()
        busy = True
        while busy:
            busy = False
            while (transmit := self.agent.poll_transmit()) is not None:
                busy = True
                self._send(transmit, now)
            if self.allocation is not None:
                while (turn_out := self.allocation.poll_transmit()) is not None:
                    busy = True
                    self.transport.sendto(turn_out.payload, turn_out.dst)
                while (turn_event := self.allocation.poll_event()) is not None:
                    busy = True
                    self.turn_events.append(turn_event)
                    if isinstance(turn_event, AllocationSucceeded) and self.relay_address is None:
                        self.relay_address = turn_event.relay_addresses[0]
        while (event := self.agent.poll_event()) is not None:
            self.events.append(event)
        self.changed.set()
        self._rearm(now)

    def _rearm(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadlines = []
        timeout = self.agent.poll_timeout()
        if timeout is not None:
            deadlines.append(timeout[0])
        if self.allocation is not None and (turn_deadline := self.allocation.poll_timeout()) is not None:
            deadlines.append(turn_deadline)
        if deadlines:
            self._timer = self.loop.call_at(max(min(deadlines), now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        self.agent.handle_timeout(now)
        if self.allocation is not None:
            self.allocation.handle_timeout(now)
        self.pump()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while not predicate():
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError("condition not reached")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue

    async def shutdown(self) -> None:
        if self.allocation is not None and self.allocation.is_allocated:
            self.allocation.shutdown(self.loop.time())
            self.pump()
            await asyncio.sleep(0.1)  # let the LIFETIME 0 refresh go out and (usually) be answered
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice gathers on every interface except 127.0.0.1; keep this test on loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
async def driver() -> AsyncIterator[IceUdpDriver]:
    agent = IceAgent(False, LOCAL_UFRAG, LOCAL_PWD, "placeholder", "placeholder-password00", SystemRng())
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(lambda: IceUdpDriver(agent), local_addr=("127.0.0.1", 0))
    try:
        yield protocol
    finally:
        await protocol.shutdown()


def _exchange_credentials(driver: IceUdpDriver, peer: aioice.Connection, *, controlling: bool = False) -> None:
    # The portal hands both sides each other's credentials; the agent is rebuilt with aioice's.
    old = driver.agent
    driver.agent = IceAgent(controlling, LOCAL_UFRAG, LOCAL_PWD, peer.local_username, peer.local_password, SystemRng())
    assert old.poll_transmit() is None
    peer.remote_username = LOCAL_UFRAG
    peer.remote_password = LOCAL_PWD


async def _connect(driver: IceUdpDriver, peer: aioice.Connection, our_candidates: list[Candidate]) -> None:
    now = driver.loop.time()
    for candidate in our_candidates:
        driver.agent.add_local_candidate(candidate, driver.local, now)
        await peer.add_remote_candidate(aioice.Candidate.from_sdp(candidate.to_sdp().removeprefix("candidate:")))
    await peer.add_remote_candidate(None)
    for theirs in peer.local_candidates:
        driver.agent.add_remote_candidate(Candidate.from_sdp("candidate:" + theirs.to_sdp()), now)
    driver.pump()
    await asyncio.wait_for(peer.connect(), 15)
    await driver.wait_for(lambda: any(isinstance(e, IceConnected) for e in driver.events), 10)


async def _exchange_data(driver: IceUdpDriver, peer: aioice.Connection) -> None:
    await peer.send(b"hello from aioice")
    await driver.wait_for(lambda: any(d[0] == b"hello from aioice" for d in driver.data), 5)
    driver.send_data(b"hello from the gateway")
    assert await asyncio.wait_for(peer.recv(), 5) == b"hello from the gateway"


@pytest.mark.usefixtures("loopback_only")
@pytest.mark.parametrize("we_control", [False, True], ids=["aioice-controlling", "we-control"])
async def test_host_candidates_connect_and_nominate(driver: IceUdpDriver, we_control: bool) -> None:
    # The gateway is always controlled; the controlling variant is how the lab client talks to aioice.
    peer = aioice.Connection(ice_controlling=not we_control, components=1, use_ipv4=True, use_ipv6=False)
    try:
        await peer.gather_candidates()
        _exchange_credentials(driver, peer, controlling=we_control)
        await _connect(driver, peer, [Candidate.host(driver.local)])

        assert driver.agent.controlling is we_control
        selected = driver.agent.selected_pair
        assert selected is not None
        local, remote = selected
        assert local.address == driver.local
        nominated = peer._nominated[1]  # aioice exposes no public accessor for its selected pair
        assert nominated.remote_addr == driver.local
        assert remote.address == nominated.local_addr
        assert driver.agent.pairs[0].nominated
        await _exchange_data(driver, peer)
    finally:
        await peer.close()


@pytest.mark.usefixtures("loopback_only")
async def test_relayed_candidates_through_coturn(driver: IceUdpDriver) -> None:
    coturn = Coturn()
    await asyncio.get_running_loop().run_in_executor(None, coturn.start)
    peer: aioice.Connection | None = None
    try:
        username, password = coturn.credentials()
        driver.start_allocation(coturn.address, username, password)
        await driver.wait_for(lambda: driver.relay_address is not None, 10)
        assert driver.relay_address is not None
        peer = aioice.Connection(
            ice_controlling=True,
            components=1,
            use_ipv4=True,
            use_ipv6=False,
            turn_server=coturn.address,
            turn_username=username,
            turn_password=password,
            transport_policy=aioice.TransportPolicy.RELAY,
        )
        await peer.gather_candidates()
        assert [c.type for c in peer.local_candidates] == ["relay"]
        _exchange_credentials(driver, peer)
        ours = Candidate.relayed(driver.relay_address, driver.local, server_ip=coturn.address[0])
        await _connect(driver, peer, [ours])

        selected = driver.agent.selected_pair
        assert selected is not None
        local, remote = selected
        assert local.kind is CandidateKind.RELAYED and local.address == driver.relay_address
        assert remote.kind is CandidateKind.RELAYED
        assert peer._nominated[1].remote_addr == driver.relay_address
        assert any(isinstance(e, SelectedPairChanged) for e in driver.events)
        await _exchange_data(driver, peer)
        # Everything came through the relay: aioice's data arrived decapsulated on our relayed address.
        assert all(local_address == driver.relay_address for _, _, local_address in driver.data)
    finally:
        if peer is not None:
            await peer.close()
        await driver.shutdown()
        coturn.stop()
