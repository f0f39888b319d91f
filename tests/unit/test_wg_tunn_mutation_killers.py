"""Tunn behaviours that the mutation run of dataplane/wireguard/tunn.py showed untested (``make mutate``).

Each test states a WireGuard rule (whitepaper §6 timers, wireguard-go's device/timers.go and noise-protocol.go) or a
documented Tunn contract (byte counters, drop reasons, receiver indices released on close, the replay window).
"""

from __future__ import annotations

import pytest

from dataplane.base import Rng
from dataplane.io.rng import SeededRng
from dataplane.wireguard.constants import (
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    MESSAGE_INITIATION,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    ZERO_KEYS_AFTER,
)
from dataplane.wireguard.cookie import CookieGenerator
from dataplane.wireguard.crypto import public_key
from dataplane.wireguard.replay import RING_BLOCKS
from dataplane.wireguard.tunn import DropReason, HandshakeCompleted, HandshakeGaveUp, IndexTable, Tunn

from .test_wg_device import TUNNEL_A, TUNNEL_B, ipv4_packet
from .test_wg_mutation_killers import FixedJitterRng, _ipv6_packet
from .test_wg_tunn import TunnPair

KEEPALIVE_SIZE = 32  # transport header + the tag of an empty plaintext


def _tunn(pair: TunnPair, side: str, rng: Rng, **options: object) -> Tunn:
    """A replacement for ``pair.a`` or ``pair.b`` with its own rng and constructor options."""
    own, peer = (pair.key_a, pair.key_b) if side == "a" else (pair.key_b, pair.key_a)
    return Tunn(own, public_key(peer), None, IndexTable(rng), rng, pair.wall, **options)  # type: ignore[arg-type]


def _established(pair: TunnPair, at: float = 0.0) -> None:
    """A initiates; both sides then have a confirmed session and no pending passive keepalive."""
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), at)
    pair.pump(at)
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), at)
    pair.pump(at)
    assert pair.a.has_session and pair.b.has_session


def _transport(tunn: Tunn, packet: bytes, now: float, counter: int | None = None) -> bytes:
    """One transport message ``tunn`` seals now (optionally at a chosen counter), taken off its wire."""
    keypair = tunn._current
    assert keypair is not None
    if counter is not None:
        keypair.send_counter = counter
    tunn.encapsulate(packet, now)
    (message,) = [m for m in tunn.drain_transmits() if m[0] == MESSAGE_TRANSPORT]
    return message


def _kinds(tunn: Tunn) -> list[int]:
    return [message[0] for message in tunn.drain_transmits()]


# --- configuration ---


def test_keys_of_the_wrong_length_are_refused_by_name() -> None:
    pair = TunnPair()
    rng = SeededRng(3)
    with pytest.raises(ValueError) as info:
        Tunn(pair.key_a, bytes(31), None, IndexTable(rng), rng, pair.wall)
    assert str(info.value) == "peer public key must be 32 bytes"
    with pytest.raises(ValueError) as info:
        Tunn(pair.key_a, public_key(pair.key_b), bytes(33), IndexTable(rng), rng, pair.wall)
    assert str(info.value) == "preshared key must be 32 bytes"
    with pytest.raises(ValueError) as info:
        pair.a.set_static_private(bytes(31))
    assert str(info.value) == "private key must be 32 bytes"


def test_the_preshared_key_given_at_construction_is_mixed_into_the_handshake() -> None:
    # Noise IKpsk2: both sides must hold the same preshared key, else the initiator cannot open the response
    for psk_a, psk_b, completes in ((bytes(range(32)), bytes(range(32)), True), (bytes(32), bytes(range(32)), False)):
        pair = TunnPair()
        rng_a, rng_b = SeededRng(8), SeededRng(9)
        pair.a = Tunn(pair.key_a, public_key(pair.key_b), psk_a, IndexTable(rng_a), rng_a, pair.wall)
        pair.b = Tunn(pair.key_b, public_key(pair.key_a), psk_b, IndexTable(rng_b), rng_b, pair.wall)
        assert pair.a.preshared_key == psk_a
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
        pair.pump(0.0)
        assert pair.a.has_session is completes
        assert pair.a.drops[DropReason.HANDSHAKE_FAILED] == (0 if completes else 1)


def test_a_tunn_built_responder_only_never_initiates() -> None:
    # docs/protocol.md §4.2: the gateway never initiates; its traffic without a session is dropped, not staged
    pair = TunnPair()
    pair.b = _tunn(pair, "b", SeededRng(9), responder_only=True)
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 0.0)
    assert pair.b.drain_transmits() == []
    assert pair.b.drops[DropReason.NO_SESSION] == 1


# --- receive path: drop reasons ---


def test_a_transport_message_shorter_than_its_header_and_tag_is_a_bad_length() -> None:
    pair = TunnPair()
    assert pair.a.decapsulate(MESSAGE_TRANSPORT.to_bytes(4, "little") + bytes(27), 0.0) is None
    assert pair.a.drops[DropReason.BAD_LENGTH] == 1
    assert pair.a.drops.total() == 1


def test_handshake_messages_for_a_tunn_without_a_private_key_are_dropped_as_such() -> None:
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    (initiation,) = pair.a.drain_transmits()
    assert pair.b.decapsulate(initiation, 0.0) is None
    (response,) = pair.b.drain_transmits()
    rng = SeededRng(4)
    keyless = Tunn(None, public_key(pair.key_a), None, IndexTable(rng), rng, pair.wall)
    assert keyless.decapsulate(initiation, 0.0) is None
    assert keyless.decapsulate(response, 0.0) is None
    assert keyless.drops[DropReason.NO_PRIVATE_KEY] == 2
    # A key removed later (UAPI private_key=0) leaves the tunn the same way.
    pair.a.set_static_private(None)
    assert pair.a.decapsulate(response, 0.0) is None
    pair.b.set_static_private(None)
    assert pair.b.decapsulate(initiation, 0.0) is None
    assert pair.a.drops[DropReason.NO_PRIVATE_KEY] == pair.b.drops[DropReason.NO_PRIVATE_KEY] == 1
    assert pair.a.drain_transmits() == pair.b.drain_transmits() == []


def test_an_initiation_with_a_valid_mac1_that_does_not_decrypt_is_a_failed_handshake() -> None:
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    (initiation,) = pair.a.drain_transmits()
    body = bytearray(initiation[:116])
    body[50] ^= 1  # inside the encrypted static key
    forged = CookieGenerator(public_key(pair.key_b)).add_macs(bytes(body), 0.0)
    assert pair.b.decapsulate(forged, 0.0) is None
    assert pair.b.drops[DropReason.HANDSHAKE_FAILED] == 1
    assert pair.b.drain_transmits() == []


def test_a_response_to_a_superseded_initiation_is_unexpected() -> None:
    # the response names the initiation it answers by its sender index; a retry replaced that initiation
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    (first,) = pair.a.drain_transmits()
    assert pair.b.decapsulate(first, 0.0) is None
    (stale_response,) = pair.b.drain_transmits()
    retry_at = pair.a.poll_timeout()
    assert retry_at is not None
    pair.a.handle_timeout(retry_at)
    assert _kinds(pair.a) == [MESSAGE_INITIATION]
    assert pair.a.decapsulate(stale_response, retry_at) is None
    assert pair.a.drops[DropReason.UNEXPECTED_RESPONSE] == 1
    assert pair.a.drops[DropReason.HANDSHAKE_FAILED] == 0
    assert not pair.a.has_session


def test_initiations_exactly_the_initiation_rate_apart_are_a_flood() -> None:
    # wireguard-go noise-protocol.go: flood when time since the last consumed initiation <= HandshakeInitationRate
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    (one,) = pair.a.drain_transmits()
    pair.wall.now += 1.0  # a newer timestamp
    pair.a._last_sent_handshake = None  # bypass the sender's own 5 s spacing to build a second initiation
    pair.a._timers.retransmit_handshake = None
    pair.a._send_handshake_initiation(False, 0.0)
    (two,) = pair.a.drain_transmits()
    assert pair.b.decapsulate(one, 0.0) is None
    assert pair.b.decapsulate(two, HANDSHAKE_INITIATION_RATE) is None
    assert pair.b.drops[DropReason.INITIATION_FLOOD] == 1
    assert len(pair.b.drain_transmits()) == 1


# --- receive path: transport runs ---


def test_a_run_with_forged_messages_keeps_the_authentic_ones_and_counts_only_their_bytes() -> None:
    pair = TunnPair()
    _established(pair)
    packets = [ipv4_packet(TUNNEL_A, TUNNEL_B, bytes([n]) * 20) for n in range(4)]
    messages = [_transport(pair.a, packet, 1.0) for packet in packets]
    forged = [m[:-1] + bytes([m[-1] ^ 1]) for m in messages]
    run = [forged[0], messages[1], forged[2], messages[3]]
    index = int.from_bytes(messages[0][4:8], "little")
    rx_before = pair.b.rx_bytes
    out: list[bytes] = []
    assert pair.b.receive_transport_run(index, run, 1.0, out) == 2
    assert out == [packets[1], packets[3]]
    assert pair.b.drops[DropReason.DECRYPTION_FAILED] == 2
    assert pair.b.rx_bytes - rx_before == len(messages[1]) + len(messages[3])


def test_every_inner_source_address_is_checked_against_the_peers_allowed_ips() -> None:
    # cryptokey routing (whitepaper §2): a packet whose source is not routed to the sending peer is dropped, whatever
    # that source is
    pair = TunnPair()
    _established(pair)
    owned = bytes([100, 64, 0, 1])

    def owner_of(source: bytes) -> object:
        return "peer-a" if source == owned else None

    for source in ("88.88.88.88", "0.0.0.0", "10.0.0.9"):
        message = _transport(pair.a, ipv4_packet(source, TUNNEL_B), 1.0)
        out: list[bytes] = []
        index = int.from_bytes(message[4:8], "little")
        assert pair.b.receive_transport_run(index, [message], 1.0, out, owner_of, "peer-a") == 1
        assert out == []
    assert pair.b.drops[DropReason.ALLOWED_IPS_MISMATCH] == 3
    good = ipv4_packet("100.64.0.1", TUNNEL_B)
    message = _transport(pair.a, good, 1.0)
    out = []
    assert pair.b.receive_transport_run(int.from_bytes(message[4:8], "little"), [message], 1.0, out, owner_of, "peer-a")
    assert out == [good]


def test_a_counter_one_behind_after_a_jump_of_a_whole_ring_is_accepted_once() -> None:
    # RFC 6479 window (wireguard-go replay.go): moving to a new block clears it, so a bit left from the counter one
    # ring of blocks earlier never marks a fresh counter as replayed
    pair = TunnPair()
    _established(pair)
    jump = 64 * RING_BLOCKS
    delivered = []
    for counter in (1, jump + 2, jump + 1):
        packet = ipv4_packet(TUNNEL_A, TUNNEL_B, counter.to_bytes(4, "big"))
        message = _transport(pair.a, packet, 1.0, counter)
        assert int.from_bytes(message[8:16], "little") == counter
        delivered.append(pair.b.decapsulate(message, 1.0) == packet)
        replayed = pair.b.decapsulate(message, 1.0)
        assert replayed is None
    assert delivered == [True, True, True]
    assert pair.b.drops[DropReason.REPLAY] == 3


def test_a_tunn_s_replay_limit_also_bounds_the_keypairs_it_initiates() -> None:
    pair = TunnPair()
    pair.a = _tunn(pair, "a", SeededRng(8), replay_limit=8)
    _established(pair)
    assert pair.a.decapsulate(_transport(pair.b, ipv4_packet(TUNNEL_B, TUNNEL_A), 1.0, 7), 1.0) is not None
    assert pair.a.decapsulate(_transport(pair.b, ipv4_packet(TUNNEL_B, TUNNEL_A), 1.0, 8), 1.0) is None
    assert pair.a.drops[DropReason.REPLAY] == 1


# --- keypairs: current, previous, next ---


def test_rekeys_keep_the_previous_keypair_for_late_messages_and_forget_the_one_before() -> None:
    # whitepaper §6.3: a peer holds at most the current, previous and next keypairs; older ones are dropped with
    # their receiver index, so a message sealed two rekeys ago is an unknown index
    pair = TunnPair()
    _established(pair)
    late_to_b = _transport(pair.a, ipv4_packet(TUNNEL_A, TUNNEL_B, b"first"), 1.0)
    late_to_a = _transport(pair.b, ipv4_packet(TUNNEL_B, TUNNEL_A, b"first"), 1.0)
    previous_to_b = b""
    for rekey_at in (130.0, 260.0):  # the initiator's keypair is older than Rekey-After-Time: it rekeys on send
        pair.wall.now += rekey_at  # a newer TAI64N timestamp
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), rekey_at)
        pair.pump(rekey_at)
        if not previous_to_b:
            previous_to_b = _transport(pair.a, ipv4_packet(TUNNEL_A, TUNNEL_B, b"second"), rekey_at + 1)
    assert pair.a.poll_event() is not None
    assert pair.b.decapsulate(previous_to_b, 261.0) == ipv4_packet(TUNNEL_A, TUNNEL_B, b"second")
    assert pair.b.decapsulate(late_to_b, 261.0) is None
    assert pair.a.decapsulate(late_to_a, 261.0) is None
    assert pair.a.drops[DropReason.UNKNOWN_INDEX] == pair.b.drops[DropReason.UNKNOWN_INDEX] == 1
    for tunn in (pair.a, pair.b):
        assert len(tunn._indices) == 2  # type: ignore[arg-type]
        tunn.close()  # releases every receiver index
        assert len(tunn._indices) == 0  # type: ignore[arg-type]


def test_crossing_rekeys_end_with_one_shared_session_and_bounded_indices() -> None:
    # both sides rekey at once: B answers A's initiation (an unconfirmed next keypair) and then completes its own
    pair = TunnPair()
    _established(pair)
    keypair_b = pair.b._current
    assert keypair_b is not None
    keypair_b.send_counter = REKEY_AFTER_MESSAGES + 1  # either side rekeys after Rekey-After-Messages
    pair.wall.now += 130.0
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 130.0)  # data + A's initiation
    for message in pair.a.drain_transmits():
        pair.b.decapsulate(message, 130.0)
    (response_to_a,) = pair.b.drain_transmits()
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 131.0)
    sent_by_b = pair.b.drain_transmits()
    assert [m[0] for m in sent_by_b] == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
    for message in sent_by_b:
        pair.a.decapsulate(message, 131.0)
    pair.pump(131.0)  # A's response to B, B's keepalive confirming it
    assert pair.a.decapsulate(response_to_a, 131.0) is None
    assert pair.a.drops[DropReason.UNEXPECTED_RESPONSE] == 1
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B, b"after"), 132.0)
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A, b"after"), 132.0)
    pair.pump(132.0)
    assert pair.delivered["b"][-1] == ipv4_packet(TUNNEL_A, TUNNEL_B, b"after")
    assert pair.delivered["a"][-1] == ipv4_packet(TUNNEL_B, TUNNEL_A, b"after")
    assert pair.a._current is not None and pair.b._current is not None
    assert pair.a._current.send_key == pair.b._current.receive_key
    for tunn in (pair.a, pair.b):
        assert len(tunn._indices) <= 3  # type: ignore[arg-type]
        tunn.close()
        assert len(tunn._indices) == 0  # type: ignore[arg-type]


class StrictIndices:
    """An :class:`IndexAllocator` that refuses to release an index it did not hand out (or already took back)."""

    def __init__(self, rng: Rng) -> None:
        self.table = IndexTable(rng)

    def allocate(self, owner: Tunn) -> int:
        return self.table.allocate(owner)

    def release(self, index: int) -> None:
        assert self.table.get(index) is not None, f"released {index!r}, which is not allocated"
        self.table.release(index)


def test_a_tunn_releases_only_the_indices_it_allocated_and_all_of_them_on_close() -> None:
    pair = TunnPair()
    indices = {"a": StrictIndices(SeededRng(8)), "b": StrictIndices(SeededRng(9))}
    for side, own, peer in (("a", pair.key_a, pair.key_b), ("b", pair.key_b, pair.key_a)):
        rng = SeededRng(10 if side == "a" else 11)
        tunn = Tunn(own, public_key(peer), None, indices[side], rng, pair.wall)
        setattr(pair, side, tunn)
    _established(pair)
    pair.wall.now += 130.0
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 130.0)  # a rekey
    pair.pump(130.0)
    pair.a.close()
    pair.b.close()
    assert len(indices["a"].table) == len(indices["b"].table) == 0


def test_releasing_an_index_twice_is_harmless() -> None:
    table = IndexTable(SeededRng(1))
    pair = TunnPair()
    index = table.allocate(pair.a)
    table.release(index)
    table.release(index)
    table.release(index + 1)
    assert len(table) == 0 and table.get(index) is None


# --- byte counters ---


def test_byte_counters_add_up_every_datagram_across_rekeys() -> None:
    # UAPI rx_bytes/tx_bytes: each side counts every datagram it sent or authenticated, handshakes included
    pair = TunnPair()
    _established(pair)
    for now in (130.0, 260.0):  # two rekeys, each after traffic was already counted
        pair.wall.now += now
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), now)
        pair.pump(now)
        pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), now)
        pair.pump(now)
    to_b = sum(len(datagram) for name, datagram in pair.wire if name == "b")
    to_a = sum(len(datagram) for name, datagram in pair.wire if name == "a")
    assert MESSAGE_INITIATION in [datagram[0] for name, datagram in pair.wire[2:] if name == "b"]
    assert pair.a.tx_bytes == pair.b.rx_bytes == to_b
    assert pair.b.tx_bytes == pair.a.rx_bytes == to_a


# --- timers ---


@pytest.mark.parametrize("batched", [False, True])
def test_passive_keepalives_answer_two_received_data_packets_twice_at_most(batched: bool) -> None:
    # wireguard-go timers.go: data received arms the keepalive (Keepalive-Timeout); data received while it is armed
    # asks for one more; the second expiry sends it and does not re-arm. A run of messages counts as one by one.
    pair = TunnPair()
    _established(pair, 0.0)
    for payload in (b"one", b"two"):
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B, payload), 1.0)
    messages = pair.a.drain_transmits()
    if batched:
        out: list[bytes] = []
        assert pair.b.receive_transport_run(int.from_bytes(messages[0][4:8], "little"), messages, 1.0, out) == 2
        assert len(out) == 2
    else:
        for message in messages:
            assert pair.b.decapsulate(message, 1.0) is not None
    first = 1.0 + KEEPALIVE_TIMEOUT
    assert pair.b.poll_timeout() == first
    pair.b.handle_timeout(first)
    assert [len(m) for m in pair.b.drain_transmits()] == [KEEPALIVE_SIZE]
    assert pair.b.poll_timeout() == first + KEEPALIVE_TIMEOUT
    pair.b.handle_timeout(first + KEEPALIVE_TIMEOUT)
    assert [len(m) for m in pair.b.drain_transmits()] == [KEEPALIVE_SIZE]
    pair.b.handle_timeout(first + 2 * KEEPALIVE_TIMEOUT)
    assert pair.b.drain_transmits() == []
    deadline = pair.b.poll_timeout()
    assert deadline is not None and deadline > first + 2 * KEEPALIVE_TIMEOUT


def test_a_gateway_whose_session_expired_sends_no_keepalive_and_waits_for_key_zeroing() -> None:
    pair = TunnPair()
    pair.b = _tunn(pair, "b", SeededRng(9), responder_only=True)
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    pair.pump(0.0)
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 0.0)
    pair.pump(0.0)
    late = REJECT_AFTER_TIME - 5.0  # data in the session's last seconds: the keepalive comes due after it expired
    message = _transport(pair.a, ipv4_packet(TUNNEL_A, TUNNEL_B), late)
    assert pair.b.decapsulate(message, late) is not None
    assert pair.b.poll_timeout() == late + KEEPALIVE_TIMEOUT
    pair.b.handle_timeout(late + KEEPALIVE_TIMEOUT)
    assert pair.b.drain_transmits() == []
    assert pair.b.drops[DropReason.NO_SESSION] == 0  # a keepalive is not the caller's packet
    assert pair.b.poll_timeout() == ZERO_KEYS_AFTER


def _zero_jitter_pair(**options: object) -> TunnPair:
    pair = TunnPair()
    pair.a = _tunn(pair, "a", FixedJitterRng(0.0), **options)
    return pair


def test_with_no_jitter_retries_leave_every_rekey_timeout_until_rekey_attempt_time() -> None:
    # whitepaper §6.4: an unanswered initiation is retried every Rekey-Timeout (+ jitter) until Rekey-Attempt-Time
    # has passed: with no jitter, 90 / 5 = 18 initiations, and the retry due at 90 s gives up instead
    pair = _zero_jitter_pair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    sent_at = [0.0] if _kinds(pair.a) == [MESSAGE_INITIATION] else []
    gave_up_at = None
    while gave_up_at is None and (deadline := pair.a.poll_timeout()) is not None and deadline <= 200.0:
        pair.a.handle_timeout(deadline)
        sent_at.extend(deadline for kind in _kinds(pair.a) if kind == MESSAGE_INITIATION)
        if isinstance(pair.a.poll_event(), HandshakeGaveUp):
            gave_up_at = deadline
    assert sent_at == [REKEY_TIMEOUT * n for n in range(int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT))]
    assert gave_up_at == REKEY_ATTEMPT_TIME


def _rekey_in_flight(at: float = 130.0) -> TunnPair:
    """A session A initiated at 0 s, then A's rekey initiation at ``at`` (its keypair is past Rekey-After-Time),
    unanswered; A's jitter is 0.3 s, so the retry is due at ``at`` + 5.3 s, and a reply to data A sent at ``at`` - 10.2 s
    (before Rekey-After-Time) is missed at ``at`` + 5.1 s."""
    pair = TunnPair()
    pair.a = _tunn(pair, "a", FixedJitterRng(0.9))
    _established(pair)
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), at - 10.2)  # expects a reply within 10 + 5 + 0.3 s
    pair.a.drain_transmits()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), at)
    assert _kinds(pair.a) == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
    assert pair.a.poll_timeout() == pytest.approx(at + 5.1)
    return pair


def test_traffic_on_an_aging_session_does_not_start_a_second_initiation_while_one_is_in_flight() -> None:
    # tunn.py: a run of attempts in flight is kept going by its retransmit timer, not restarted by new packets
    pair = _rekey_in_flight()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 135.05)
    assert _kinds(pair.a) == [MESSAGE_TRANSPORT]


def test_a_missing_reply_does_not_start_a_second_initiation_while_one_is_in_flight() -> None:
    pair = _rekey_in_flight()
    new_handshake_at = pair.a.poll_timeout()
    assert new_handshake_at is not None
    pair.a.handle_timeout(new_handshake_at)
    assert pair.a.drain_transmits() == []
    retry_at = pair.a.poll_timeout()
    assert retry_at is not None and retry_at == pytest.approx(135.3)
    pair.a.handle_timeout(retry_at)
    assert _kinds(pair.a) == [MESSAGE_INITIATION]


def test_data_received_on_an_aging_session_does_not_start_a_second_initiation_while_one_is_in_flight() -> None:
    # keep-key-fresh on receive (past Reject-After-Time - Keepalive-Timeout - Rekey-Timeout) with a rekey in flight
    pair = TunnPair()
    pair.a = _tunn(pair, "a", FixedJitterRng(0.9))  # retries 5.3 s apart
    _established(pair)
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 160.0)  # past Rekey-After-Time: rekeys on send
    assert _kinds(pair.a) == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
    late = 160.0 + REKEY_TIMEOUT + 0.05  # past the Rekey-Timeout spacing, before the retry is due
    assert late >= REKEY_ON_RECEIVE_AGE
    reply = ipv4_packet(TUNNEL_B, TUNNEL_A)
    assert pair.a.decapsulate(_transport(pair.b, reply, late), late) == reply
    assert pair.a.drain_transmits() == []


def test_the_initiator_rekeys_on_receive_once_per_session_from_rekey_on_receive_age() -> None:
    # whitepaper §6.2 / wireguard-go receive.go: an initiator receiving on a keypair Reject-After-Time - Keepalive-Timeout
    # - Rekey-Timeout old starts one handshake (sentLastMinuteHandshake), not one per message, even once it gave up
    pair = TunnPair()
    pair.a = _tunn(pair, "a", SeededRng(8), rekey_attempt_time=REKEY_TIMEOUT)
    created = 100.0
    _established(pair, created)
    reply = ipv4_packet(TUNNEL_B, TUNNEL_A)
    before = created + REKEY_ON_RECEIVE_AGE - 1.0
    assert pair.a.decapsulate(_transport(pair.b, reply, before), before) == reply
    assert pair.a.drain_transmits() == []
    due = created + REKEY_ON_RECEIVE_AGE
    assert pair.a.decapsulate(_transport(pair.b, reply, due), due) == reply
    assert _kinds(pair.a) == [MESSAGE_INITIATION]
    retry_at = pair.a.poll_timeout()
    assert retry_at is not None and retry_at < created + REJECT_AFTER_TIME
    pair.a.handle_timeout(retry_at)  # the attempt run is Rekey-Attempt-Time (here 5 s) old: give up
    assert pair.a.drain_transmits() == []
    assert isinstance(pair.a.poll_event(), HandshakeCompleted)
    assert isinstance(pair.a.poll_event(), HandshakeGaveUp)
    later = retry_at + 1.0
    assert later < created + REJECT_AFTER_TIME
    assert pair.a.decapsulate(_transport(pair.b, reply, later), later) == reply
    assert pair.a.drain_transmits() == []


def test_a_run_of_keepalives_does_not_arm_the_passive_keepalive() -> None:
    # wireguard-go: a keepalive is authenticated traffic but not data; only data asks for a keepalive in return
    pair = TunnPair()
    _established(pair)
    pair.a.send_keepalive(1.0)
    pair.a.send_keepalive(1.0)
    keepalives = pair.a.drain_transmits()
    assert [len(m) for m in keepalives] == [KEEPALIVE_SIZE, KEEPALIVE_SIZE]
    out: list[bytes] = []
    assert pair.b.receive_transport_run(int.from_bytes(keepalives[0][4:8], "little"), keepalives, 1.0, out) == 2
    assert out == []
    assert pair.b.poll_timeout() == ZERO_KEYS_AFTER  # no keepalive due at 1 + Keepalive-Timeout


@pytest.mark.parametrize("payload_length", [255, 256, 300, 1000])
def test_an_ipv6_packet_is_delivered_by_its_16_bit_payload_length(payload_length: int) -> None:
    pair = TunnPair()
    _established(pair)
    packet = _ipv6_packet("fd00::1", bytes(range(256)) * 4)[: 40 + payload_length]
    packet = _ipv6_packet("fd00::1", packet[40:])
    assert pair.b.decapsulate(_transport(pair.a, packet, 1.0), 1.0) == packet


def test_the_initiator_rekeys_on_send_once_its_keypair_is_rekey_after_time_old() -> None:
    # docs/protocol.md timers table: Rekey-After-Time (120 s) counts from the keypair's creation
    pair = TunnPair()
    created = 100.0
    _established(pair, created)
    for now in (created + 50.0, created + REKEY_AFTER_TIME - 1.0):
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), now)
        assert _kinds(pair.a) == [MESSAGE_TRANSPORT]
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), created + REKEY_AFTER_TIME + 0.5)
    assert _kinds(pair.a) == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]


def test_either_side_rekeys_on_send_after_rekey_after_messages_messages() -> None:
    # wireguard-go send.go keepKeyFreshSending: a new handshake once more than Rekey-After-Messages were sent
    pair = TunnPair()
    _established(pair)
    keypair = pair.b._current  # the responder's keypair: no rekey by age on its side
    assert keypair is not None
    keypair.send_counter = REKEY_AFTER_MESSAGES - 1
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 1.0)  # the 2^60th message
    assert _kinds(pair.b) == [MESSAGE_TRANSPORT]
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 1.0)
    assert _kinds(pair.b) == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
