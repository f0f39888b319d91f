"""A relay that restarts (a flap) makes the gateway allocate on it again; meanwhile new clients are still accepted
(issue 13: a soak round after a relay flap was refused `no_relays`)."""

from __future__ import annotations

import pytest

from dataplane.node import NoRelays
from tests.sim.nat import PORT_RESTRICTED_CONE, SYMMETRIC
from tests.sim.world import GATEWAY_ID, Client, World, build_world

pytestmark = pytest.mark.timeout(120)


def test_relay_reallocating_after_a_restart_still_takes_new_clients() -> None:
    # One relay, so that only it can serve the new client.
    world = build_world(PORT_RESTRICTED_CONE, seed=13, relays=1)
    gateway = world.gateway.node
    assert gateway.relays[0].state == "allocated" and gateway.relays[0].rtt is not None
    client = world.add_client(PORT_RESTRICTED_CONE, seed=13)
    world.net.run_for(2.0)  # the client's allocation answers (its refresh falls after the gateway's)
    # The relay process restarts: every allocation forgotten. The gateway notices at its next REFRESH (437) and
    # allocates again; the relay answers all along.
    world.relays["relay-0"].restart()
    assert world.net.run_until_true(lambda: gateway.relays[0].state != "allocated", timeout=400.0)
    assert not world.gateway.events_of(NoRelays)
    # A client asks for a connection while the new allocation is still under way (not even BINDING answered).
    world.connect(client)
    assert not world.gateway.events_of(NoRelays), "a relay that is only re-allocating must not turn clients away"
    assert gateway.connection(client.client_id) is not None
    assert world.net.run_until_true(lambda: _established(world, client), timeout=30.0)
    assert gateway.relays[0].state == "allocated"


def test_relay_that_stops_answering_is_not_sampled_while_reallocating() -> None:
    # Firezone frees an allocation whose relay stopped answering; its RTT no longer says anything: a new client is
    # refused `no_relays` (and the portal answers with relays_presence) rather than offered a dead relay.
    world = build_world(PORT_RESTRICTED_CONE, seed=14, relays=1)
    gateway = world.gateway.node
    client = world.add_client(PORT_RESTRICTED_CONE, seed=14)
    world.net.run_for(2.0)
    world.relays["relay-0"].shut_down()
    assert world.net.run_until_true(lambda: gateway.relays[0].state != "allocated", timeout=120.0)
    assert gateway.relays[0].rtt is None
    world.connect(client)
    assert world.gateway.events_of(NoRelays)
    assert gateway.connection(client.client_id) is None


def _established(world: World, client: Client) -> bool:
    gw = world.gateway.node.connection(client.client_id)
    cl = client.peer.node.connection(GATEWAY_ID)
    return bool(gw and cl and gw.established and cl.established)


def test_relay_reallocating_after_our_nat_mapping_changed_still_takes_new_clients() -> None:
    # The gateway's NAT forgets its mappings: the relay's next BINDING answer shows a new mapped address, the old
    # allocation is keyed by the old 5-tuple, so the gateway allocates again; the relay answered, so it stays usable.
    world = build_world(SYMMETRIC, seed=15, relays=1)  # random ports: a reboot gives new mappings
    gateway = world.gateway.node
    client = world.add_client(PORT_RESTRICTED_CONE, seed=15)
    world.net.run_for(2.0)
    srflx_before = gateway.relays[0].srflx
    assert world.gateway_nat is not None
    world.gateway_nat.reset()
    assert world.net.run_until_true(lambda: gateway.relays[0].state != "allocated", timeout=60.0)
    assert gateway.relays[0].srflx != srflx_before
    world.connect(client)
    assert not world.gateway.events_of(NoRelays), "a relay that is only re-allocating must not turn clients away"
    assert world.net.run_until_true(lambda: _established(world, client), timeout=30.0)
