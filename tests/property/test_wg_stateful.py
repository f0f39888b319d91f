"""Two devices over a hostile link (loss, duplication, reordering, roaming, time jumps): nothing raises, every
datagram is used or counted, and once the link heals traffic flows again in both directions."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dataplane.base import Address

from ..unit.test_wg_device import TUNNEL_A, TUNNEL_B, Pair, ipv4_packet


class HostileLink(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(seed=5)
        self.in_flight: list[tuple[str, bytes]] = []
        self.sequence = 0
        self.datagrams_in = {"a": 0, "b": 0}

    def _collect(self) -> None:
        for transmit in self.pair.a.drain_transmits():
            self.in_flight.append(("a->b", transmit.payload))
        for transmit in self.pair.b.drain_transmits():
            self.in_flight.append(("b->a", transmit.payload))

    def _deliver(self, direction: str, payload: bytes) -> None:
        source: Address = self.pair.address_a if direction == "a->b" else self.pair.address_b
        device = self.pair.b if direction == "a->b" else self.pair.a
        device.receive_datagrams([(payload, source)], self.pair.now)
        device.drain_packets()

    @rule(direction=st.sampled_from(["a->b", "b->a"]), count=st.integers(1, 5))
    def send(self, direction: str, count: int) -> None:
        device, source, destination = (
            (self.pair.a, TUNNEL_A, TUNNEL_B) if direction == "a->b" else (self.pair.b, TUNNEL_B, TUNNEL_A)
        )
        packets = []
        for _ in range(count):
            self.sequence += 1
            packets.append(ipv4_packet(source, destination, self.sequence.to_bytes(4, "big")))
        device.send_packets(packets, self.pair.now)
        self._collect()

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 1000), duplicate=st.booleans())
    def deliver_one(self, index: int, duplicate: bool) -> None:
        direction, payload = self.in_flight[index % len(self.in_flight)]
        if not duplicate:
            del self.in_flight[index % len(self.in_flight)]
        self._deliver(direction, payload)
        self._collect()

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 1000))
    def lose_one(self, index: int) -> None:
        del self.in_flight[index % len(self.in_flight)]

    @rule(seconds=st.sampled_from([0.01, 1.0, 5.0, 10.0, 30.0, 130.0, 200.0, 600.0]))
    def advance(self, seconds: float) -> None:
        self.pair.advance(seconds)
        self.pair.a.handle_timeout(self.pair.now)
        self.pair.b.handle_timeout(self.pair.now)
        self._collect()

    @rule(keepalive=st.sampled_from([0, 1, 25]))
    def churn_a_third_peer(self, keepalive: int) -> None:
        key = b"\x42" * 32
        if key in self.pair.a.peers:
            self.pair.a.remove_peer(key, self.pair.now)
        else:
            self.pair.a.upsert_peer(key, self.pair.now, endpoint=("192.0.2.99", 9), persistent_keepalive=keepalive)
        self._collect()

    @rule(port=st.integers(1024, 65535))
    def a_roams(self, port: int) -> None:
        self.pair.address_a = ("198.51.100.1", port)

    @rule(data=st.binary(max_size=64), direction=st.sampled_from(["a->b", "b->a"]))
    def garbage(self, data: bytes, direction: str) -> None:
        device = self.pair.b if direction == "a->b" else self.pair.a
        before = device.drops.total()
        device.receive_datagrams([(data, ("203.0.113.9", 9))], self.pair.now)
        assert device.drops.total() == before + 1
        self._collect()

    @invariant()
    def receiver_indices_do_not_leak(self) -> None:
        # per peer at most: current, previous and next keypairs plus one handshake in flight
        for device in (self.pair.a, self.pair.b):
            assert len(device._indices) <= 4 * len(device.peers)

    @invariant()
    def device_deadline_is_the_earliest_peer_deadline(self) -> None:
        for device in (self.pair.a, self.pair.b):
            deadlines = [d for peer in device.peers.values() if (d := peer.tunn.poll_timeout()) is not None]
            assert device.poll_timeout() == (min(deadlines) if deadlines else None)

    def teardown(self) -> None:
        # Heal: a perfect link, B learns where A is now, and both directions must work within a minute.
        pair = self.pair
        self.in_flight.clear()
        pair.a.drain_transmits()
        pair.b.drain_transmits()
        pair.b.upsert_peer(pair.a.public_key or b"", pair.now, endpoint=pair.address_a)
        start = pair.now
        delivered_to_b: list[bytes] = []
        delivered_to_a: list[bytes] = []
        probe_b = ipv4_packet(TUNNEL_A, TUNNEL_B, b"heal-a")
        probe_a = ipv4_packet(TUNNEL_B, TUNNEL_A, b"heal-b")
        while pair.now - start < 60.0 and (probe_b not in delivered_to_b or probe_a not in delivered_to_a):
            pair.a.send_packets([probe_b], pair.now)
            pair.b.send_packets([probe_a], pair.now)
            pair.pump()
            delivered_to_b += pair.b.drain_packets()
            delivered_to_a += pair.a.drain_packets()
            pair.run_until(pair.now + 2.0)
            delivered_to_b += pair.b.drain_packets()
            delivered_to_a += pair.a.drain_packets()
        assert probe_b in delivered_to_b and probe_a in delivered_to_a


HostileLink.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestHostileLink = HostileLink.TestCase
