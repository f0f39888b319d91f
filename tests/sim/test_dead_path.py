"""Dead paths nobody announces (issue 13): a relay that dies silently, a client whose NAT forgets its mappings.

Traffic flows both ways at 20 Hz (like a ping) when the fault strikes; the controlling side (the client) must notice
that its selected pair went silent and move the connection to a pair that still answers within 5 s -- long before
RFC 7675's 30 s consent timeout -- keeping the WireGuard session (no new handshake)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dataplane.node import ConnectionFailed, ConnectionInfo, Path
from tests.sim.nat import SYMMETRIC
from tests.sim.test_scenarios import _cl, _gw
from tests.sim.world import GATEWAY_ID, Client, World, build_world, ipv4_udp

pytestmark = pytest.mark.timeout(120)

GATEWAY_TUNNEL_IP = "100.64.0.1"
TICK = 0.05
GAP_BUDGET = 5.0


class Flow:
    """A packet each way every ``TICK``; remembers the ticks at which either side had received more (so a gap is
    measured to within one tick)."""

    def __init__(self, world: World, client: Client) -> None:
        self.world = world
        self.client = client
        self.down_times: list[float] = []  # when the client received a packet
        self.up_times: list[float] = []  # when the gateway received a packet
        self.sequence = 0
        self._seen_up = self._seen_down = 0
        self.running = True
        world.net.schedule(world.net.now, self._tick)

    def _tick(self) -> None:
        if not self.running:
            return
        world, client, now = self.world, self.client, self.world.net.now
        got_up, got_down = len(world.gateway.received), len(client.peer.received)
        if got_up > self._seen_up:
            self.up_times.append(now)
        if got_down > self._seen_down:
            self.down_times.append(now)
        self._seen_up, self._seen_down = got_up, got_down
        self.sequence += 1
        tag = b"%d" % self.sequence
        client.peer.send_packet(GATEWAY_ID, ipv4_udp(client.tunnel_ip, GATEWAY_TUNNEL_IP, b"up:" + tag))
        world.gateway.send_packet(client.client_id, ipv4_udp(GATEWAY_TUNNEL_IP, client.tunnel_ip, b"down:" + tag))
        world.net.schedule(now + TICK, self._tick)

    def largest_gap(self, after: float) -> float:
        """The longest stretch after ``after`` in which either side received nothing (to the end if it never did)."""
        worst = 0.0
        for times in (self.up_times, self.down_times):
            previous = after
            for at in [t for t in times if t > after] + [self.world.net.now]:
                worst = max(worst, at - previous)
                previous = at
        return worst


def _connect(world: World, client: Client) -> None:
    world.net.run_for(2.0)
    world.connect(client)

    def established() -> bool:
        gw = world.gateway.node.connection(client.client_id)
        cl = client.peer.node.connection(GATEWAY_ID)
        return bool(gw and cl and gw.established and cl.established and gw.handshakes >= 1 and cl.handshakes >= 1)

    assert world.net.run_until_true(established, timeout=30.0)


def _assert_recovered(
    world: World,
    client: Client,
    flow: Flow,
    recovered: Callable[[], bool],
    *,
    fault_at: float,
    handshakes: tuple[int, int],
) -> None:
    """Within the gap budget ``recovered()`` holds, traffic has flowed again, the WireGuard session is the same one
    (no new handshake on either side) and no connection failed."""
    assert world.net.run_until_true(recovered, timeout=GAP_BUDGET), (_cl(client), _gw(world, client))
    world.net.run_for(3.0)
    flow.running = False
    gap = flow.largest_gap(after=fault_at)
    assert gap <= GAP_BUDGET, f"traffic stopped for {gap:.2f} s"
    assert (_gw(world, client).handshakes, _cl(client).handshakes) == handshakes, "the session must survive"
    assert not world.gateway.events_of(ConnectionFailed) and not client.peer.events_of(ConnectionFailed)


def _relay_on_path(world: World, info: ConnectionInfo) -> str | None:
    ends = {address[0] for address in (info.local, info.remote) if address is not None}
    return next((rid for rid, relay in world.relays.items() if ends & set(relay.host.addresses)), None)


def _relayed_world(seed: int) -> tuple[World, Client]:
    """Symmetric NATs both sides (relays only), the two sides' connections on different relays."""
    world = build_world(SYMMETRIC, seed=seed, relays=2)
    client = world.add_client(SYMMETRIC, seed=seed)
    _connect(world, client)
    assert world.net.run_until_true(
        lambda: _cl(client).path is Path.RELAYED and _gw(world, client).path is Path.RELAYED, timeout=10.0
    )
    return world, client


@pytest.mark.parametrize("seed", [11, 13], ids=["same-relay", "different-relays"])
def test_a_relay_dying_silently_moves_the_connection_within_seconds(seed: int) -> None:
    world, client = _relayed_world(seed)
    # Same relay: no pair survives its death, so the client must offer another relay's candidates; different
    # relays: the pair through the surviving one takes over.
    same_relay = _cl(client).relay_id == _gw(world, client).relay_id
    assert same_relay is (seed == 11), "the seeds are chosen to give both cases"
    flow = Flow(world, client)
    world.net.run_for(10.0)  # traffic flows; consent rounds have run on every pair
    handshakes = (_gw(world, client).handshakes, _cl(client).handshakes)
    dead = _relay_on_path(world, _cl(client))
    assert dead is not None
    died_at = world.net.now
    world.relays[dead].shut_down()  # nobody tells the peers

    def moved() -> bool:
        return _relay_on_path(world, _cl(client)) not in (None, dead) and _relay_on_path(
            world, _gw(world, client)
        ) not in (None, dead)

    _assert_recovered(world, client, flow, moved, fault_at=died_at, handshakes=handshakes)


def test_a_client_whose_nat_forgets_its_mappings_is_followed_within_seconds() -> None:
    """The client's NAT reboots into a symmetric one (every flow gets a new random port), as the lab's rebinding
    does; the client is not told. The direct path dies (the gateway's port-restricted NAT filters the new port),
    the client's own allocation is lost (the relay knows the old 5-tuple), and the pair from the client's socket to
    the gateway's relayed candidate is the one left: the gateway sees it from a new, peer-reflexive address."""
    from tests.sim.nat import PORT_RESTRICTED_CONE

    world = build_world(PORT_RESTRICTED_CONE, seed=13, relays=2)
    client = world.add_client(PORT_RESTRICTED_CONE, seed=13)
    _connect(world, client)
    assert world.net.run_until_true(
        lambda: _cl(client).path is Path.DIRECT and _gw(world, client).path is Path.DIRECT, timeout=10.0
    )
    flow = Flow(world, client)
    world.net.run_for(10.0)
    handshakes = (_gw(world, client).handshakes, _cl(client).handshakes)
    old_remote = _gw(world, client).remote
    assert client.nat is not None
    roamed_at = world.net.now
    client.nat.behaviour = SYMMETRIC
    client.nat.reset()

    def followed() -> bool:
        gw = _gw(world, client)
        return gw.remote != old_remote and gw.path is not None and _cl(client).path is gw.path

    _assert_recovered(world, client, flow, followed, fault_at=roamed_at, handshakes=handshakes)
