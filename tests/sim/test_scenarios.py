"""Node scenarios in the simulated network (issue 5 item 5): direct through cone NATs, relayed when a symmetric NAT faces
a port-restricted one, relay removed mid-connection, client roaming, consent lost."""

from __future__ import annotations

import pytest

from dataplane.node import (
    ConnectionEstablished,
    ConnectionFailed,
    ConnectionInfo,
    ConnectionPathChanged,
    NoRelays,
    Path,
)
from tests.sim.nat import FULL_CONE, PORT_RESTRICTED_CONE, RESTRICTED_CONE, SYMMETRIC
from tests.sim.world import GATEWAY_ID, Client, World, build_world, ipv4_udp

pytestmark = pytest.mark.timeout(120)

GATEWAY_TUNNEL_IP = "100.64.0.1"


def _connect(world: World, client: Client, timeout: float = 30.0) -> None:
    world.net.run_for(2.0)  # the client's allocations answer, so relays have an RTT
    world.connect(client)
    assert world.net.run_until_true(lambda: _is_established(world, client), timeout=timeout), (
        f"not established: {world.gateway.node.connection(client.client_id)} / {client.peer.node.connection(GATEWAY_ID)}"
    )


def _is_established(world: World, client: Client) -> bool:
    gw = world.gateway.node.connection(client.client_id)
    cl = client.peer.node.connection(GATEWAY_ID)
    return bool(gw and cl and gw.established and cl.established and gw.handshakes >= 1 and cl.handshakes >= 1)


def _ping(world: World, client: Client, tag: bytes, timeout: float = 5.0) -> None:
    """A packet each way; asserts it arrives exactly once, unmodified, on the right connection."""
    up = ipv4_udp(client.tunnel_ip, GATEWAY_TUNNEL_IP, b"up:" + tag)
    down = ipv4_udp(GATEWAY_TUNNEL_IP, client.tunnel_ip, b"down:" + tag)
    before_gw, before_cl = len(world.gateway.received), len(client.peer.received)
    client.peer.send_packet(GATEWAY_ID, up)
    assert world.net.run_until_true(lambda: len(world.gateway.received) > before_gw, timeout=timeout), "uplink lost"
    world.gateway.send_packet(client.client_id, down)
    assert world.net.run_until_true(lambda: len(client.peer.received) > before_cl, timeout=timeout), "downlink lost"
    assert world.gateway.received[before_gw:] == [(client.client_id, up)]
    assert client.peer.received[before_cl:] == [(GATEWAY_ID, down)]


def _gw(world: World, client: Client) -> ConnectionInfo:
    info = world.gateway.node.connection(client.client_id)
    assert info is not None
    return info


def _cl(client: Client) -> ConnectionInfo:
    info = client.peer.node.connection(GATEWAY_ID)
    assert info is not None
    return info


def _paths(world: World, client: Client) -> tuple[Path | None, Path | None]:
    gw = world.gateway.node.connection(client.client_id)
    cl = client.peer.node.connection(GATEWAY_ID)
    return (cl.path if cl else None, gw.path if gw else None)


@pytest.mark.parametrize(
    "client_nat,gateway_nat",
    [
        (FULL_CONE, FULL_CONE),
        (PORT_RESTRICTED_CONE, PORT_RESTRICTED_CONE),
        (RESTRICTED_CONE, SYMMETRIC),
        (None, PORT_RESTRICTED_CONE),
    ],
    ids=["full-cone", "port-restricted", "restricted-vs-symmetric", "public-client"],
)
def test_direct_path_through_cone_nats(client_nat, gateway_nat):
    world = build_world(gateway_nat, seed=1)
    client = world.add_client(client_nat, seed=1)
    _connect(world, client)
    # ICE may select a relayed pair first and move up once a direct pair is nominated.
    assert world.net.run_until_true(lambda: _paths(world, client) == (Path.DIRECT, Path.DIRECT), timeout=10.0)
    _ping(world, client, b"1")
    world.net.run_for(30.0)  # consent rounds must not move it away again
    assert _paths(world, client) == (Path.DIRECT, Path.DIRECT)
    _ping(world, client, b"2")
    assert len(client.peer.events_of(ConnectionEstablished)) == 1
    assert len(world.gateway.events_of(ConnectionEstablished)) == 1


@pytest.mark.parametrize(
    "client_nat,gateway_nat",
    [(SYMMETRIC, PORT_RESTRICTED_CONE), (PORT_RESTRICTED_CONE, SYMMETRIC), (SYMMETRIC, SYMMETRIC)],
    ids=["symmetric-client", "symmetric-gateway", "both-symmetric"],
)
def test_relayed_path_when_no_direct_path_exists(client_nat, gateway_nat):
    world = build_world(gateway_nat, seed=2)
    client = world.add_client(client_nat, seed=2)
    _connect(world, client)
    assert world.net.run_until_true(lambda: _paths(world, client) == (Path.RELAYED, Path.RELAYED), timeout=10.0)
    _ping(world, client, b"relayed")
    # Still relayed after a while: no direct pair appeared from nowhere.
    world.net.run_for(30.0)
    _ping(world, client, b"later")
    assert _paths(world, client) == (Path.RELAYED, Path.RELAYED)


def test_relay_removed_mid_connection_migrates_without_a_new_handshake():
    world = build_world(PORT_RESTRICTED_CONE, seed=3, relays=2)
    client = world.add_client(SYMMETRIC, seed=3)
    _connect(world, client)
    _ping(world, client, b"before")
    handshakes = (
        _gw(world, client).handshakes,
        _cl(client).handshakes,
    )
    carrying = _carrying_relay(world, client)
    assert carrying is not None
    # The relay carrying the connection vanishes, and the portal reports it gone to both sides.
    world.relays[carrying].shut_down()
    for peer in (world.gateway, client.peer):
        peer.remove_relays([carrying])
    assert world.net.run_until_true(
        lambda: (
            _paths(world, client) == (Path.RELAYED, Path.RELAYED)
            and _carrying_relay(world, client) not in (None, carrying)
        ),
        timeout=60.0,
    )
    _ping(world, client, b"after", timeout=30.0)
    assert world.net.run_until_true(lambda: True, timeout=0.0)
    after = (
        _gw(world, client).handshakes,
        _cl(client).handshakes,
    )
    assert after == handshakes, "the WireGuard session must survive the path change"
    assert client.peer.events_of(ConnectionPathChanged) or world.gateway.events_of(ConnectionPathChanged)
    assert not client.peer.events_of(ConnectionFailed) and not world.gateway.events_of(ConnectionFailed)


def _carrying_relay(world: World, client: Client) -> str | None:
    info = client.peer.node.connection(GATEWAY_ID)
    if info is None or info.local is None or info.remote is None:
        return None
    ends = {info.local[0], info.remote[0]}
    return next((rid for rid, relay in world.relays.items() if ends & set(relay.host.addresses)), None)


def test_losing_the_only_relay_reports_no_relays():
    world = build_world(PORT_RESTRICTED_CONE, seed=4, relays=1)
    client = world.add_client(PORT_RESTRICTED_CONE, seed=4)
    _connect(world, client)
    assert world.net.run_until_true(lambda: _paths(world, client) == (Path.DIRECT, Path.DIRECT), timeout=10.0)
    world.relays["relay-0"].shut_down()
    world.gateway.remove_relays(["relay-0"])
    assert world.gateway.events_of(NoRelays)
    # The direct path does not need the relay.
    _ping(world, client, b"still direct")


def test_new_connection_without_measured_relay_is_refused_with_no_relays():
    world = build_world(PORT_RESTRICTED_CONE, seed=5, relays=0)
    client = world.add_client(PORT_RESTRICTED_CONE, seed=5)
    world.net.run_for(1.0)
    world.connect(client)
    assert world.gateway.events_of(NoRelays)
    assert world.gateway.node.connection(client.client_id) is None


@pytest.mark.parametrize("new_nat", [PORT_RESTRICTED_CONE, SYMMETRIC], ids=["to-cone", "to-symmetric"])
def test_client_roams_and_the_connection_follows(new_nat):
    world = build_world(PORT_RESTRICTED_CONE, seed=6)
    client = world.add_client(FULL_CONE, seed=6)
    _connect(world, client)
    _ping(world, client, b"before")
    old_remote = _gw(world, client).remote
    handshakes = _gw(world, client).handshakes
    world.roam(client, new_nat, seed=6)
    expected = Path.DIRECT if world.direct_expected(client) else Path.RELAYED

    def moved() -> bool:
        gw = world.gateway.node.connection(client.client_id)
        cl = client.peer.node.connection(GATEWAY_ID)
        return (
            gw is not None
            and cl is not None
            and gw.remote != old_remote
            and cl.local is not None
            and cl.local in client.peer.node.local_addresses
            and _paths(world, client) == (expected, expected)
        )

    assert world.net.run_until_true(moved, timeout=30.0), _paths(world, client)
    _ping(world, client, b"after", timeout=30.0)
    assert not world.gateway.events_of(ConnectionFailed)
    assert _gw(world, client).handshakes == handshakes, "the session must survive"


@pytest.mark.parametrize("vanishing", ["client", "gateway"])
def test_consent_lost_fails_the_connection(vanishing):
    world = build_world(PORT_RESTRICTED_CONE, seed=7)
    client = world.add_client(PORT_RESTRICTED_CONE, seed=7)
    _connect(world, client)
    _ping(world, client, b"alive")
    start = world.net.now
    # One side vanishes without a word; the survivor must notice through consent freshness alone.
    gone, survivor, connection_id = (
        (client.host, world.gateway, client.client_id)
        if vanishing == "client"
        else (world.gateway.host, client.peer, GATEWAY_ID)
    )
    gone.online = False
    assert world.net.run_until_true(lambda: bool(survivor.events_of(ConnectionFailed)), timeout=1200.0)
    failed_after = world.net.now - start
    assert survivor.node.connection(connection_id) is None
    # RFC 7675: consent expires 30 s after the last response; then the re-checks run out. An idle connection uses the
    # idle ladder: 100 s for the client profile, 1000 s for the server (gateway) profile (docs/protocol.md §4.3).
    assert failed_after >= 30.0
    assert failed_after <= 30.0 + (100.0 if vanishing == "gateway" else 1000.0) + 10.0


def test_two_clients_never_get_each_others_packets():
    world = build_world(FULL_CONE, seed=8)
    a = world.add_client(PORT_RESTRICTED_CONE, seed=8)
    b = world.add_client(SYMMETRIC, seed=9)
    _connect(world, a)
    _connect(world, b)
    for i in range(3):
        _ping(world, a, b"a%d" % i)
        _ping(world, b, b"b%d" % i)
    assert {cid for cid, _ in world.gateway.received} == {a.client_id, b.client_id}
