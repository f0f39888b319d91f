"""The simulated network and NAT boxes on their own: delivery, latency, loss, RFC 4787 mapping and filtering."""

from __future__ import annotations

import itertools

import pytest

from tests.sim.nat import (
    FULL_CONE,
    PORT_RESTRICTED_CONE,
    RESTRICTED_CONE,
    SYMMETRIC,
    Filtering,
    Mapping,
    NatBehaviour,
    NatBox,
    PortAssignment,
    direct_path_possible,
)
from tests.sim.net import SimDropReason, SimNetwork


def _recorder(log: list[tuple[bytes, tuple[str, int], tuple[str, int], float]]):
    def handler(data, src, local, now):
        log.append((data, src, local, now))

    return handler


def test_datagram_arrives_after_both_link_latencies():
    net = SimNetwork()
    a = net.add_host("a", ["198.51.100.1"], latency=0.010)
    b = net.add_host("b", ["198.51.100.2"], latency=0.020)
    got: list[tuple[bytes, tuple[str, int], tuple[str, int], float]] = []
    b.bind(7, _recorder(got))
    a.send(("198.51.100.1", 1000), ("198.51.100.2", 7), b"hi")
    net.run_for(1.0)
    assert [g[:3] for g in got] == [(b"hi", ("198.51.100.1", 1000), ("198.51.100.2", 7))]
    assert got[0][3] == pytest.approx(0.030)


def test_unknown_destination_and_closed_port_are_counted():
    net = SimNetwork()
    a = net.add_host("a", ["198.51.100.1"])
    net.add_host("b", ["198.51.100.2"])
    a.send(("198.51.100.1", 1), ("203.0.113.9", 7), b"x")
    a.send(("198.51.100.1", 1), ("198.51.100.2", 7), b"x")
    net.run_for(1.0)
    assert net.drops[SimDropReason.NO_ROUTE] == 1
    assert net.drops[SimDropReason.NO_LISTENER] == 1


def test_loss_is_deterministic_for_a_seed():
    def run(seed: int) -> int:
        net = SimNetwork(seed=seed)
        a = net.add_host("a", ["198.51.100.1"])
        b = net.add_host("b", ["198.51.100.2"])
        got: list[tuple[bytes, tuple[str, int], tuple[str, int], float]] = []
        b.bind(7, _recorder(got))
        a.loss = 0.5
        for _ in range(200):
            a.send(("198.51.100.1", 1), ("198.51.100.2", 7), b"x")
        net.run_for(1.0)
        return len(got)

    assert run(1) == run(1)
    assert 50 < run(1) < 150


def _nat_pair(behaviour: NatBehaviour):
    net = SimNetwork()
    box = NatBox("n", "203.0.113.1", behaviour, seed=3)
    inside = net.add_nat(box)
    client = net.add_host("client", ["10.0.0.2"], realm=inside)
    servers = [net.add_host(f"s{i}", [f"198.51.100.{i}"]) for i in (1, 2)]
    return net, box, client, servers


@pytest.mark.parametrize("mapping", list(Mapping))
def test_mapping_behaviour_decides_when_the_public_port_changes(mapping):
    net, box, client, servers = _nat_pair(NatBehaviour(mapping, Filtering.ENDPOINT_INDEPENDENT))
    seen: list[tuple[bytes, tuple[str, int], tuple[str, int], float]] = []
    for server in servers:
        server.bind(3478, _recorder(seen))
        server.bind(3479, _recorder(seen))
    client.send(("10.0.0.2", 5000), ("198.51.100.1", 3478), b"a")
    client.send(("10.0.0.2", 5000), ("198.51.100.1", 3479), b"b")
    client.send(("10.0.0.2", 5000), ("198.51.100.2", 3478), b"c")
    net.run_for(1.0)
    ports = {data: src for data, src, _, _ in seen}
    assert all(src[0] == "203.0.113.1" for src in ports.values())
    same_ip_other_port = ports[b"a"] == ports[b"b"]
    other_ip = ports[b"a"] == ports[b"c"]
    assert same_ip_other_port == (mapping is not Mapping.ADDRESS_AND_PORT_DEPENDENT)
    assert other_ip == (mapping is Mapping.ENDPOINT_INDEPENDENT)


@pytest.mark.parametrize("filtering", list(Filtering))
def test_filtering_behaviour_decides_who_may_answer(filtering):
    net, box, client, servers = _nat_pair(NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, filtering))
    got: list[tuple[bytes, tuple[str, int], tuple[str, int], float]] = []
    client.bind(5000, _recorder(got))
    client.send(("10.0.0.2", 5000), ("198.51.100.1", 3478), b"open")
    net.run_for(1.0)
    public = ("203.0.113.1", 5000)  # preserving port assignment
    servers[0].send(("198.51.100.1", 3478), public, b"same endpoint")
    servers[0].send(("198.51.100.1", 9999), public, b"same ip")
    servers[1].send(("198.51.100.2", 3478), public, b"other ip")
    net.run_for(1.0)
    received = {data for data, *_ in got}
    expected = {
        Filtering.ENDPOINT_INDEPENDENT: {b"same endpoint", b"same ip", b"other ip"},
        Filtering.ADDRESS_DEPENDENT: {b"same endpoint", b"same ip"},
        Filtering.ADDRESS_AND_PORT_DEPENDENT: {b"same endpoint"},
    }[filtering]
    assert received == expected
    assert box.drops[SimDropReason.NAT_FILTERED] == 3 - len(expected)


def test_random_port_assignment_and_mapping_expiry():
    behaviour = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT, PortAssignment.RANDOM)
    net, box, client, servers = _nat_pair(behaviour)
    seen: list[tuple[bytes, tuple[str, int], tuple[str, int], float]] = []
    servers[0].bind(3478, _recorder(seen))
    client.send(("10.0.0.2", 5000), ("198.51.100.1", 3478), b"a")
    net.run_for(200.0)  # longer than the 120 s mapping timeout
    client.send(("10.0.0.2", 5000), ("198.51.100.1", 3478), b"b")
    net.run_for(1.0)
    first, second = seen[0][1], seen[1][1]
    assert first[1] != 5000 and second[1] != 5000
    assert first != second  # the expired mapping was replaced by a fresh random one
    servers[0].send(("198.51.100.1", 3478), first, b"late")
    net.run_for(1.0)
    assert box.drops[SimDropReason.NAT_NO_MAPPING] == 1


def test_hairpin_is_not_supported_and_counted():
    net, box, client, _ = _nat_pair(FULL_CONE)
    client.send(("10.0.0.2", 5000), ("203.0.113.1", 6000), b"x")
    net.run_for(1.0)
    assert net.drops[SimDropReason.NAT_HAIRPIN] == 1


BEHAVIOURS = [FULL_CONE, RESTRICTED_CONE, PORT_RESTRICTED_CONE, SYMMETRIC]


@pytest.mark.parametrize("a,b", list(itertools.product(BEHAVIOURS, BEHAVIOURS)), ids=lambda n: n.label)
def test_oracle_is_symmetric_and_matches_the_classic_table(a, b):
    assert direct_path_possible(a, b) == direct_path_possible(b, a)
    hard = {(SYMMETRIC, SYMMETRIC), (SYMMETRIC, PORT_RESTRICTED_CONE), (PORT_RESTRICTED_CONE, SYMMETRIC)}
    assert direct_path_possible(a, b) == ((a, b) not in hard)
    assert direct_path_possible(None, a)
