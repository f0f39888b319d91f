"""Two in-memory WireGuard devices: handshake, transport both ways, PSK, wrong key, routing, roaming."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest

from dataplane.base import Address
from dataplane.io.rng import SeededRng
from dataplane.wireguard.constants import MAX_STAGED_PACKETS
from dataplane.wireguard.device import Device, DropReason
from dataplane.wireguard.tunn import HandshakeCompleted, TunnEvent

ADDRESS_A: Address = ("192.0.2.1", 51820)
ADDRESS_B: Address = ("192.0.2.2", 51821)
TUNNEL_A = "10.9.0.1"
TUNNEL_B = "10.9.0.2"
TUNNEL6_A = "fd00::1"
TUNNEL6_B = "fd00::2"


def ipv4_packet(source: str, destination: str, payload: bytes = b"ping") -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(source).packed,
        ipaddress.IPv4Address(destination).packed,
    )
    return header + payload


def ipv6_packet(source: str, destination: str, payload: bytes = b"ping6") -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        17,
        64,
        ipaddress.IPv6Address(source).packed,
        ipaddress.IPv6Address(destination).packed,
    )
    return header + payload


class WallClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Pair:
    """Device A and device B joined by a perfect in-memory network; ``link`` can drop or rewrite datagrams."""

    def __init__(
        self,
        *,
        psk_a: bytes | None = None,
        psk_b: bytes | None = None,
        seed: int = 1,
        rekey_attempt_time: float = 90.0,
    ) -> None:
        keys = SeededRng(seed)
        self.wall = WallClock()
        self.now = 0.0
        self.a = Device(
            rng=SeededRng(seed + 100),
            wall_clock=self.wall,
            private_key=keys.random_bytes(32),
            rekey_attempt_time=rekey_attempt_time,
        )
        self.b = Device(
            rng=SeededRng(seed + 200),
            wall_clock=self.wall,
            private_key=keys.random_bytes(32),
            rekey_attempt_time=rekey_attempt_time,
        )
        assert self.a.public_key is not None and self.b.public_key is not None
        self.address_a = ADDRESS_A
        self.address_b = ADDRESS_B
        self.peer_b = self.a.upsert_peer(
            self.b.public_key,
            0.0,
            endpoint=ADDRESS_B,
            preshared_key=psk_a,
            allowed_ips=[ipaddress.ip_network(f"{TUNNEL_B}/32"), ipaddress.ip_network(f"{TUNNEL6_B}/128")],
        )
        self.peer_a = self.b.upsert_peer(
            self.a.public_key,
            0.0,
            preshared_key=psk_b,
            allowed_ips=[ipaddress.ip_network(f"{TUNNEL_A}/32"), ipaddress.ip_network(f"{TUNNEL6_A}/128")],
        )
        self.link: Callable[[str, bytes], bool] = lambda direction, data: True
        self.sent: dict[str, list[bytes]] = {"a->b": [], "b->a": []}

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall.now += seconds

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            from_a = [t for t in self.a.drain_transmits()]
            from_b = [t for t in self.b.drain_transmits()]
            if not from_a and not from_b:
                return
            for t in from_a:
                self.sent["a->b"].append(t.payload)
            for t in from_b:
                self.sent["b->a"].append(t.payload)
            to_b = [
                (t.payload, self.address_a) for t in from_a if t.dst == self.address_b and self.link("a->b", t.payload)
            ]
            to_a = [
                (t.payload, self.address_b) for t in from_b if t.dst == self.address_a and self.link("b->a", t.payload)
            ]
            if to_b:
                self.b.receive_datagrams(to_b, self.now)
            if to_a:
                self.a.receive_datagrams(to_a, self.now)

    def run_until(self, end: float, step: float = 0.5) -> None:
        """Advance the fake clock to ``end``, firing both devices' timers in order."""
        while True:
            deadlines = [d for d in (self.a.poll_timeout(), self.b.poll_timeout()) if d is not None]
            next_time = min([end, *deadlines]) if deadlines else end
            next_time = max(next_time, self.now)
            self.advance(next_time - self.now)
            self.a.handle_timeout(self.now)
            self.b.handle_timeout(self.now)
            self.pump()
            if self.now >= end:
                return

    def a_to_b(self, payload: bytes = b"ping") -> list[bytes]:
        self.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, payload)], self.now)
        self.pump()
        return self.b.drain_packets()

    def b_to_a(self, payload: bytes = b"pong") -> list[bytes]:
        self.b.send_packets([ipv4_packet(TUNNEL_B, TUNNEL_A, payload)], self.now)
        self.pump()
        return self.a.drain_packets()


def events(device: Device) -> list[TunnEvent]:
    out: list[TunnEvent] = []
    while (item := device.poll_event()) is not None:
        out.append(item[1])
    return out


def test_handshake_and_transport_both_directions() -> None:
    pair = Pair()
    packet = ipv4_packet(TUNNEL_A, TUNNEL_B, b"hello over wireguard")
    pair.a.send_packets([packet], 0.0)
    pair.pump()
    assert pair.b.drain_packets() == [packet]
    assert pair.b_to_a(b"and back") == [ipv4_packet(TUNNEL_B, TUNNEL_A, b"and back")]
    assert events(pair.a) == [HandshakeCompleted(pair.b.public_key or b"", True)]
    assert events(pair.b) == [HandshakeCompleted(pair.a.public_key or b"", False)]
    assert pair.peer_b.last_handshake_wall == pair.wall.now
    assert pair.peer_a.last_handshake_wall == pair.wall.now
    assert pair.peer_b.tx_bytes > 148 and pair.peer_b.rx_bytes > 92
    assert pair.peer_a.rx_bytes == pair.peer_b.tx_bytes
    assert pair.peer_b.rx_bytes == pair.peer_a.tx_bytes
    assert pair.a.drops.total() == 0 and pair.b.drops.total() == 0


def test_ipv6_and_padding_removed() -> None:
    pair = Pair()
    packet = ipv6_packet(TUNNEL6_A, TUNNEL6_B, b"x" * 7)
    pair.a.send_packets([packet], 0.0)
    pair.pump()
    assert pair.b.drain_packets() == [packet]
    # ciphertext of a 47-byte packet is padded to 48 before the 16-byte tag and 16-byte header
    assert len(pair.sent["a->b"][-1]) == 16 + 48 + 16


def test_with_preshared_key() -> None:
    psk = bytes(range(32))
    pair = Pair(psk_a=psk, psk_b=psk)
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    assert pair.peer_b.preshared_key == psk


def test_mismatched_preshared_key_never_completes() -> None:
    pair = Pair(psk_a=bytes(range(32)), psk_b=None)
    assert pair.a_to_b() == []
    pair.run_until(30.0)
    assert pair.peer_b.last_handshake_wall is None and pair.peer_a.last_handshake_wall is None
    assert pair.a.drops[DropReason.HANDSHAKE_FAILED] >= 1


def test_wrong_public_key_never_completes() -> None:
    pair = Pair()
    assert pair.b.public_key is not None
    # A knows B under a wrong key: B cannot decrypt A's initiations (mac1 is keyed by the wrong key).
    wrong = bytes(32 * [7])
    pair.a.remove_peer(pair.b.public_key, 0.0)
    pair.a.upsert_peer(wrong, 0.0, endpoint=ADDRESS_B, allowed_ips=[ipaddress.ip_network(f"{TUNNEL_B}/32")])
    assert pair.a_to_b() == []
    pair.run_until(60.0)
    assert pair.b.drops[DropReason.BAD_MAC1] >= 2
    assert pair.a.peers[wrong].last_handshake_wall is None
    assert pair.peer_a.last_handshake_wall is None


def test_unknown_initiator_is_dropped() -> None:
    pair = Pair()
    assert pair.a.public_key is not None
    pair.b.remove_peer(pair.a.public_key, 0.0)
    assert pair.a_to_b() == []
    assert pair.b.drops[DropReason.UNKNOWN_PEER] == 1
    assert pair.b.drain_transmits() == []


def test_source_address_outside_allowed_ips_is_dropped() -> None:
    pair = Pair()
    pair.a_to_b()
    pair.a.send_packets([ipv4_packet("10.9.0.99", TUNNEL_B)], pair.now)
    pair.pump()
    assert pair.b.drain_packets() == []
    assert pair.b.drops[DropReason.ALLOWED_IPS_MISMATCH] == 1


def test_no_route_is_counted() -> None:
    pair = Pair()
    pair.a.send_packets([ipv4_packet(TUNNEL_A, "10.200.0.1"), b"\x00garbage"], 0.0)
    assert pair.a.drain_transmits() == []
    assert pair.a.drops[DropReason.NO_ROUTE] == 1
    assert pair.a.drops[DropReason.INVALID_INNER_PACKET] == 1


def test_routing_between_several_peers_longest_prefix() -> None:
    pair = Pair()
    other = Device(rng=SeededRng(9), wall_clock=pair.wall, private_key=SeededRng(10).random_bytes(32))
    assert other.public_key is not None and pair.a.public_key is not None
    pair.a.upsert_peer(
        other.public_key, 0.0, endpoint=("192.0.2.3", 1), allowed_ips=[ipaddress.ip_network("10.0.0.0/8")]
    )
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B), ipv4_packet(TUNNEL_A, "10.1.2.3")], 0.0)
    destinations = sorted(t.dst for t in pair.a.drain_transmits())
    assert destinations == [("192.0.2.2", 51821), ("192.0.2.3", 1)]


def test_allowed_ip_moves_between_peers_and_replace() -> None:
    pair = Pair()
    other_key = SeededRng(11).random_bytes(32)
    network = ipaddress.ip_network(f"{TUNNEL_B}/32")
    other = pair.a.upsert_peer(other_key, 0.0, allowed_ips=[network])
    assert network in other.allowed_ips and network not in pair.peer_b.allowed_ips
    pair.a.upsert_peer(other_key, 0.0, allowed_ips=[ipaddress.ip_network("10.50.0.0/16")], replace_allowed_ips=True)
    assert other.allowed_ips == [ipaddress.ip_network("10.50.0.0/16")]
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    assert pair.a.drops[DropReason.NO_ROUTE] == 1


def test_endpoint_roams_to_last_authenticated_source() -> None:
    pair = Pair()
    pair.a_to_b()
    assert pair.peer_a.endpoint == ADDRESS_A
    pair.address_a = ("198.51.100.7", 40000)
    pair.a.upsert_peer(pair.b.public_key or b"", pair.now)  # no change, just proves upsert keeps state
    assert pair.a_to_b(b"after roaming") == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"after roaming")]
    assert pair.peer_a.endpoint == ("198.51.100.7", 40000)
    # B's replies now go to the new address
    assert pair.b_to_a() == [ipv4_packet(TUNNEL_B, TUNNEL_A, b"pong")]


def test_forged_packets_do_not_move_the_endpoint() -> None:
    pair = Pair()
    pair.a_to_b()
    forged = bytearray(pair.sent["a->b"][-1])
    forged[-1] ^= 0xFF
    pair.b.receive_datagrams([(bytes(forged), ("203.0.113.66", 6666))], pair.now)
    assert pair.peer_a.endpoint == ADDRESS_A
    assert pair.b.drops[DropReason.DECRYPTION_FAILED] == 1


def test_replayed_transport_is_dropped() -> None:
    pair = Pair()
    pair.a_to_b()
    last = pair.sent["a->b"][-1]
    pair.b.receive_datagrams([(last, ADDRESS_A)], pair.now)
    assert pair.b.drain_packets() == []
    assert pair.b.drops[DropReason.REPLAY] == 1


def test_staged_packets_are_bounded_and_sent_in_order_after_handshake() -> None:
    pair = Pair()
    packets = [ipv4_packet(TUNNEL_A, TUNNEL_B, i.to_bytes(2, "big")) for i in range(MAX_STAGED_PACKETS + 10)]
    pair.a.send_packets(packets, 0.0)
    pair.pump()
    assert pair.b.drain_packets() == packets[10:]
    assert pair.a.drops[DropReason.STAGED_OVERFLOW] == 10


def test_missing_endpoint_counts_transmits() -> None:
    pair = Pair()
    # B does not know A's endpoint before A contacts it.
    pair.b.send_packets([ipv4_packet(TUNNEL_B, TUNNEL_A)], 0.0)
    assert pair.b.drain_transmits() == []
    assert pair.b.drops[DropReason.NO_ENDPOINT] == 1


def test_simultaneous_initiation_converges() -> None:
    pair = Pair()
    pair.b.upsert_peer(pair.a.public_key or b"", 0.0, endpoint=ADDRESS_A)
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"1")], 0.0)
    pair.b.send_packets([ipv4_packet(TUNNEL_B, TUNNEL_A, b"2")], 0.0)
    pair.pump()
    pair.run_until(20.0)
    assert pair.a_to_b(b"3")[-1] == ipv4_packet(TUNNEL_A, TUNNEL_B, b"3")
    assert pair.b_to_a(b"4")[-1] == ipv4_packet(TUNNEL_B, TUNNEL_A, b"4")


def test_remove_peer_releases_indices() -> None:
    pair = Pair()
    pair.a_to_b()
    assert len(pair.a._indices) > 0
    pair.a.remove_all_peers(pair.now)
    assert len(pair.a._indices) == 0 and not pair.a.peers


def test_private_key_change_resets_sessions() -> None:
    pair = Pair()
    pair.a_to_b()
    new_key = SeededRng(77).random_bytes(32)
    pair.a.set_private_key(new_key, pair.now)
    assert not pair.peer_b.tunn.has_session
    # B still knows A's old public key: the new handshake cannot authenticate
    assert pair.a_to_b(b"after") == []


def test_own_public_key_as_peer_is_rejected() -> None:
    pair = Pair()
    with pytest.raises(ValueError):
        pair.a.upsert_peer(pair.a.public_key or b"", 0.0)
    with pytest.raises(ValueError):
        pair.a.upsert_peer(b"short", 0.0)


def test_persistent_keepalive_connects_at_once() -> None:
    pair = Pair()
    pair.a.upsert_peer(pair.b.public_key or b"", 0.0, persistent_keepalive=25)
    pair.pump()
    assert pair.peer_b.last_handshake_wall is not None
    assert pair.peer_b.persistent_keepalive == 25


def test_padding_never_exceeds_the_mtu() -> None:
    pair = Pair()
    pair.a_to_b()
    pair.a.mtu = 1420
    full = ipv4_packet(TUNNEL_A, TUNNEL_B, bytes(1400))
    small = ipv4_packet(TUNNEL_A, TUNNEL_B, bytes(1395))
    pair.a.send_packets([full, small], pair.now)
    pair.pump()
    assert pair.b.drain_packets() == [full, small]
    assert [len(m) - 32 for m in pair.sent["a->b"][-2:]] == [1420, 1420]


def test_ipv6_endpoints_and_roaming_between_families() -> None:
    pair = Pair()
    pair.address_a = ("2001:db8::a", 51820)
    pair.address_b = ("2001:db8::b", 51821)
    pair.a.upsert_peer(pair.b.public_key or b"", 0.0, endpoint=pair.address_b)
    assert pair.a_to_b(b"v6 underlay") == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"v6 underlay")]
    assert pair.peer_a.endpoint == ("2001:db8::a", 51820)
    pair.address_a = ("192.0.2.77", 4444)
    assert pair.a_to_b(b"back to v4") == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"back to v4")]
    assert pair.peer_a.endpoint == ("192.0.2.77", 4444)
    assert pair.b_to_a(b"reply") == [ipv4_packet(TUNNEL_B, TUNNEL_A, b"reply")]


def test_batches_mixing_peers_keep_per_peer_order() -> None:
    pair = Pair()
    third_key = SeededRng(31).random_bytes(32)
    third = Device(rng=SeededRng(32), wall_clock=pair.wall, private_key=third_key)
    assert third.public_key is not None and pair.b.public_key is not None
    pair.b.upsert_peer(third.public_key, 0.0, allowed_ips=[ipaddress.ip_network("10.9.0.3/32")])
    third.upsert_peer(pair.b.public_key, 0.0, endpoint=ADDRESS_B, allowed_ips=[ipaddress.ip_network("10.9.0.0/24")])
    pair.a_to_b()
    third.send_packets([ipv4_packet("10.9.0.3", TUNNEL_B, b"hello")], 0.0)
    for _ in range(3):
        pair.b.receive_datagrams([(t.payload, ("192.0.2.3", 3)) for t in third.drain_transmits()], 0.0)
        third.receive_datagrams([(t.payload, ADDRESS_B) for t in pair.b.drain_transmits()], 0.0)
    pair.b.drain_packets()
    from_a = [ipv4_packet(TUNNEL_A, TUNNEL_B, bytes([i])) for i in range(5)]
    from_third = [ipv4_packet("10.9.0.3", TUNNEL_B, bytes([i])) for i in range(5)]
    pair.a.send_packets(from_a, 0.0)
    third.send_packets(from_third, 0.0)
    wire_a = [(t.payload, ADDRESS_A) for t in pair.a.drain_transmits()]
    wire_third = [(t.payload, ("192.0.2.3", 3)) for t in third.drain_transmits()]
    interleaved = [d for pair_of in zip(wire_a, wire_third, strict=True) for d in pair_of]
    pair.b.receive_datagrams(interleaved, 0.0)
    received = pair.b.drain_packets()
    assert [p for p in received if p[12:16] == bytes([10, 9, 0, 1])] == from_a
    assert [p for p in received if p[12:16] == bytes([10, 9, 0, 3])] == from_third


def test_drain_datagrams_is_the_transmit_fast_path() -> None:
    pair = Pair()
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    datagrams = pair.a.drain_datagrams()
    assert [destination for destination, _ in datagrams] == [ADDRESS_B]
    assert datagrams[0][1][0] == 1 and len(datagrams[0][1]) == 148
    assert pair.a.drain_transmits() == [] and pair.a.drain_datagrams() == []
