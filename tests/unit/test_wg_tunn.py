"""Tunn on its own (as dataplane/node.py uses it): two Tunns wired in memory, replay and flood rules."""

from __future__ import annotations

from dataplane.base import DropCounter
from dataplane.io.rng import SeededRng
from dataplane.wireguard.constants import DEFAULT_MTU, MESSAGE_INITIATION, REJECT_AFTER_MESSAGES
from dataplane.wireguard.crypto import public_key
from dataplane.wireguard.tunn import DropReason, HandshakeCompleted, HandshakeGaveUp, IndexTable, Tunn

from .test_wg_device import TUNNEL_A, TUNNEL_B, Pair, WallClock, ipv4_packet


class TunnPair:
    def __init__(self, rekey_attempt_time: float = 20.0) -> None:
        keys = SeededRng(7)
        self.key_a, self.key_b = keys.random_bytes(32), keys.random_bytes(32)
        self.wall = WallClock()
        rng_a, rng_b = SeededRng(8), SeededRng(9)
        self.a = Tunn(
            self.key_a,
            public_key(self.key_b),
            None,
            IndexTable(rng_a),
            rng_a,
            self.wall,
            rekey_attempt_time=rekey_attempt_time,
        )
        self.b = Tunn(
            self.key_b,
            public_key(self.key_a),
            None,
            IndexTable(rng_b),
            rng_b,
            self.wall,
            rekey_attempt_time=rekey_attempt_time,
        )
        self.delivered: dict[str, list[bytes]] = {"a": [], "b": []}
        self.wire: list[tuple[str, bytes]] = []

    def pump(self, now: float) -> None:
        for _ in range(10):
            moved = False
            for source, target, name in ((self.a, self.b, "b"), (self.b, self.a, "a")):
                for datagram in source.drain_transmits():
                    moved = True
                    self.wire.append((name, datagram))
                    packet = target.decapsulate(datagram, now)
                    if packet is not None:
                        self.delivered[name].append(packet)
            if not moved:
                return


def test_two_tunns_handshake_and_exchange() -> None:
    pair = TunnPair()
    packet = ipv4_packet(TUNNEL_A, TUNNEL_B)
    pair.a.encapsulate(packet, 0.0)
    pair.pump(0.0)
    assert pair.delivered["b"] == [packet]
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 0.1)
    pair.pump(0.1)
    assert pair.delivered["a"] == [ipv4_packet(TUNNEL_B, TUNNEL_A)]
    assert pair.a.poll_event() == HandshakeCompleted(public_key(pair.key_b), True)
    assert pair.b.poll_event() == HandshakeCompleted(public_key(pair.key_a), False)
    assert pair.a.poll_event() is None


def test_replayed_initiation_is_rejected_by_timestamp() -> None:
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    initiation = pair.a.drain_transmits()[0]
    assert initiation[0] == MESSAGE_INITIATION
    assert pair.b.decapsulate(initiation, 0.0) is None
    assert len(pair.b.drain_transmits()) == 1
    assert pair.b.decapsulate(initiation, 10.0) is None
    assert pair.b.drain_transmits() == []
    assert pair.b.drops[DropReason.STALE_TIMESTAMP] == 1


def test_initiations_faster_than_50_per_second_are_rejected() -> None:
    pair = TunnPair()
    first = pair.a
    first.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    one = first.drain_transmits()[0]
    pair.wall.now += 1.0  # a newer timestamp
    first._last_sent_handshake = None  # bypass the sender's own 5 s spacing to build a second initiation
    first._timers.retransmit_handshake = None
    first._send_handshake_initiation(False, 0.0)
    two = first.drain_transmits()[0]
    assert pair.b.decapsulate(one, 100.0) is None
    assert pair.b.decapsulate(two, 100.01) is None
    assert pair.b.drops[DropReason.INITIATION_FLOOD] == 1
    assert len(pair.b.drain_transmits()) == 1


def test_initiation_for_a_different_peer_is_refused() -> None:
    pair = TunnPair()
    stranger_key = SeededRng(50).random_bytes(32)
    rng = SeededRng(51)
    stranger = Tunn(stranger_key, public_key(pair.key_b), None, IndexTable(rng), rng, pair.wall)
    stranger.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    assert pair.b.decapsulate(stranger.drain_transmits()[0], 0.0) is None
    assert pair.b.drops[DropReason.UNKNOWN_PEER] == 1


def test_reject_after_messages_forces_a_new_handshake() -> None:
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    pair.pump(0.0)
    keypair = pair.a._current
    assert keypair is not None
    keypair.send_counter = REJECT_AFTER_MESSAGES - 1
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B, b"last"), 10.0)
    out = pair.a.drain_transmits()
    assert [m[0] for m in out] == [MESSAGE_INITIATION]


def test_shared_drop_counter_and_bad_input() -> None:
    drops = DropCounter()
    rng = SeededRng(1)
    tunn = Tunn(
        rng.random_bytes(32), public_key(rng.random_bytes(32)), None, IndexTable(rng), rng, lambda: 0.0, drops=drops
    )
    for datagram in (b"", b"\x09\x00\x00\x00", b"\x01" + bytes(10), b"\x04" + bytes(40), b"\x03" + bytes(63)):
        assert tunn.decapsulate(datagram, 0.0) is None
    assert drops[DropReason.BAD_LENGTH] == 2
    assert drops[DropReason.BAD_TYPE] == 1
    assert drops[DropReason.UNKNOWN_INDEX] == 2
    assert drops.total() == 5


def test_give_up_event_and_restart_with_new_traffic() -> None:
    pair = TunnPair(rekey_attempt_time=20.0)
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    pair.a.drain_transmits()
    now = 0.0
    while (deadline := pair.a.poll_timeout()) is not None and deadline < 100:
        now = deadline
        pair.a.handle_timeout(now)
        pair.a.drain_transmits()
        if isinstance(pair.a.poll_event(), HandshakeGaveUp):
            break
    assert 20.0 <= now < 26.0
    # traffic afterwards starts a fresh run that can succeed
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B, b"again"), now + 1)
    pair.pump(now + 1)
    assert pair.delivered["b"] == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"again")]


def test_a_responder_only_tunn_never_initiates_and_never_buffers() -> None:
    pair = TunnPair()
    pair.b.responder_only = True
    reply = ipv4_packet(TUNNEL_B, TUNNEL_A)
    # Traffic for a peer without a session is dropped and counted: no initiation, nothing staged.
    pair.b.encapsulate(reply, 0.0)
    assert pair.b.drain_transmits() == []
    assert pair.b.drops[DropReason.NO_SESSION] == 1
    pair.b.handle_timeout(30.0)
    assert pair.b.drain_transmits() == []
    # The peer initiates; the responder answers and can then send.
    request = ipv4_packet(TUNNEL_A, TUNNEL_B)
    pair.a.encapsulate(request, 40.0)
    pair.pump(40.0)
    assert pair.delivered["b"] == [request]
    pair.b.encapsulate(reply, 41.0)
    pair.pump(41.0)
    assert pair.delivered["a"] == [reply]
    # Sending with no reply, then the session aging out: a normal responder would start handshakes; this one never does.
    sent_by_b: list[int] = []
    now = 41.0
    while now < 41.0 + 600.0:
        now += 1.0
        pair.b.encapsulate(reply, now)
        pair.b.handle_timeout(now)
        sent_by_b.extend(datagram[0] for datagram in pair.b.drain_transmits())
        pair.a.drain_transmits()
    assert MESSAGE_INITIATION not in sent_by_b
    assert pair.b.drops[DropReason.NO_SESSION] > 1


def _short_plaintexts_from(sender: Tunn, now: float) -> list[bytes]:
    """Transport messages whose plaintext is 1, 2 and 3 bytes (an IPv4/IPv6 version nibble, then nothing)."""
    sender.mtu = 0  # padding never grows a packet past the MTU: with 0, no padding at all
    for plaintext in (b"\x45", b"\x45\x00", b"\x60\x00\x00"):
        sender.encapsulate(plaintext, now)
    sender.mtu = DEFAULT_MTU
    return sender.drain_transmits()


def test_transport_plaintext_of_one_to_three_bytes_is_dropped_and_counted() -> None:
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    pair.pump(0.0)
    messages = _short_plaintexts_from(pair.a, 0.1)
    assert len(messages) == 3
    before = pair.b.drops[DropReason.INVALID_INNER_PACKET]
    for message in messages:
        assert pair.b.decapsulate(message, 0.1) is None
    assert pair.b.drops[DropReason.INVALID_INNER_PACKET] == before + 3
    # The session is unharmed: a real packet still gets through afterwards.
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B, b"after"), 0.2)
    pair.pump(0.2)
    assert pair.delivered["b"][-1] == ipv4_packet(TUNNEL_A, TUNNEL_B, b"after")


def test_a_device_batch_with_short_plaintexts_keeps_the_rest_of_the_batch() -> None:
    devices = Pair()
    assert devices.a_to_b(b"hello")
    messages = _short_plaintexts_from(devices.peer_b.tunn, devices.now)
    devices.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"tail")], devices.now)
    tail = [t.payload for t in devices.a.drain_transmits()]
    batch = [(message, devices.address_a) for message in [*messages, *tail]]
    devices.b.receive_datagrams(batch, devices.now)
    assert devices.b.drain_packets() == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"tail")]
    assert devices.b.drops[DropReason.INVALID_INNER_PACKET] == 3


def test_a_run_of_data_messages_moves_the_keepalive_timers_as_one_by_one_does() -> None:
    """receive_transport_run must leave the passive-keepalive timers as the same messages fed one at a time would:
    the first data message arms the keepalive, a second one asks for another (a run of several used to forget that)."""
    results = []
    for batched in (False, True):
        pair = TunnPair()
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
        pair.pump(0.0)
        pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 0.1)  # b answers: its keepalive timer is idle again
        pair.pump(0.1)
        for _ in range(3):
            pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 1.0)
        messages = pair.a.drain_transmits()
        assert len(messages) == 3 and pair.b._timers.send_keepalive is None
        if batched:
            index = int.from_bytes(messages[0][4:8], "little")
            out: list[bytes] = []
            assert pair.b.receive_transport_run(index, messages, 2.0, out) == 3
        else:
            for message in messages:
                assert pair.b.decapsulate(message, 2.0)
        timers = pair.b._timers
        results.append((timers.send_keepalive, timers.need_another_keepalive))
    assert results[0] == results[1] and results[0][1] is True
