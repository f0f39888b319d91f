"""Spec checks for the WireGuard timers and cookies that the mutation run showed nothing else pinned down.

Timers: wireguard-go's timer hooks (docs/protocol.md §F): Keepalive-Timeout 10 s, Rekey-Timeout 5 s plus up to 1/3 s
of jitter, keys zeroed 3 x Reject-After-Time (540 s) after a session, persistent keepalive every interval after any
authenticated packet. Cookies (whitepaper §5.4.4, §5.4.7): mac1 = MAC(HASH("mac1----" || Spub), msg),
mac2 = MAC(cookie, msg), cookie = MAC(secret, source) with the secret renewed every 120 s, sent in a cookie reply as
XChaCha20-Poly1305 under HASH("cookie--" || Spub) with mac1 as associated data; the initiator uses it for 120 s.
Tunn: a session sends nothing at or past Reject-After-Time (180 s) or Reject-After-Messages, reserve_send and
encapsulate_batch agree on it, peer settings keep to their UAPI ranges, a forged cookie reply is dropped and counted.
Device: wireguard-go's SetPrivateKey (the same key changes nothing, a peer holding the new key goes), a bounded
peer table, open_datagrams decrypting each run, one-second handshake-load buckets.
Expected values are computed here from the spec with hashlib and an independent XChaCha20 (the HChaCha20 rounds of
test_wg_vectors), never with the module under test.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from dataplane.base import Address
from dataplane.io.rng import SeededRng
from dataplane.wireguard import device as device_module
from dataplane.wireguard import noise
from dataplane.wireguard.constants import (
    MAX_STAGED_PACKETS,
    MESSAGE_INITIATION,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    UNDER_LOAD_AFTER_TIME,
)
from dataplane.wireguard.cookie import CookieChecker, CookieGenerator, source_bytes
from dataplane.wireguard.crypto import hmac_blake2s, public_key, tai64n
from dataplane.wireguard.device import Device
from dataplane.wireguard.timers import PeerTimers
from dataplane.wireguard.tunn import DropReason as TunnDropReason
from dataplane.wireguard.tunn import HandshakeCompleted, HandshakeGaveUp, HandshakeLoad, IndexTable, KeysZeroed, Tunn

from .test_wg_device import ADDRESS_A, ADDRESS_B, TUNNEL6_A, TUNNEL6_B, TUNNEL_A, TUNNEL_B, Pair, WallClock, ipv4_packet
from .test_wg_tunn import TunnPair
from .test_wg_vectors import hchacha20_rounds


class FixedJitterRng(SeededRng):
    """Seeded bytes, but ``uniform`` always lands at the same fraction of its range."""

    def __init__(self, fraction: float) -> None:
        super().__init__(7)
        self.fraction = fraction

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.fraction


# --- timers ---


def test_fresh_timers_have_no_deadline_and_no_persistent_keepalive() -> None:
    timers = PeerTimers(FixedJitterRng(0.5))
    assert timers.next_deadline() is None
    assert timers.persistent_keepalive_interval == 0
    assert timers.need_another_keepalive is False
    # persistent keepalive is off until configured: authenticated traffic arms nothing
    timers.any_authenticated_packet_traversal(3.0)
    assert timers.persistent_keepalive is None
    assert timers.next_deadline() is None


def test_first_data_received_arms_the_passive_keepalive_and_later_ones_ask_for_another() -> None:
    timers = PeerTimers(FixedJitterRng(0.5))
    timers.data_received(3.0)
    assert timers.send_keepalive == 13.0  # Keepalive-Timeout after the first data packet
    assert not timers.need_another_keepalive
    assert timers.next_deadline() == 13.0
    timers.data_received(4.0)
    assert timers.send_keepalive == 13.0  # not pushed back
    assert timers.need_another_keepalive is True
    # sending anything authenticated answers the peer: no keepalive needed
    timers.any_authenticated_packet_sent(5.0)
    assert timers.send_keepalive is None and timers.next_deadline() is None


@pytest.mark.parametrize("interval", [1, 25, 65535])
def test_persistent_keepalive_follows_every_authenticated_packet(interval: int) -> None:
    timers = PeerTimers(FixedJitterRng(0.5))
    timers.persistent_keepalive_interval = interval
    timers.any_authenticated_packet_traversal(10.0)
    assert timers.persistent_keepalive == 10.0 + interval
    timers.any_authenticated_packet_traversal(12.5)
    assert timers.next_deadline() == 12.5 + interval


def test_next_deadline_is_the_earliest_armed_timer() -> None:
    timers = PeerTimers(FixedJitterRng(0.75))  # jitter 0.25 s of the allowed 1/3 s
    timers.persistent_keepalive_interval = 25
    timers.session_derived(0.0)  # keys zeroed at 540
    timers.data_sent(0.0)  # no reply expected after 10 + 5 + jitter
    timers.any_authenticated_packet_traversal(3.0)  # persistent keepalive at 28
    timers.data_received(1.0)  # passive keepalive at 11
    timers.handshake_initiated(2.0)  # retransmit at 2 + 5 + jitter
    assert timers.zero_key_material == 540.0
    assert timers.new_handshake == pytest.approx(15.25)
    assert timers.next_deadline() == pytest.approx(7.25)
    timers.handshake_complete(4.0)
    assert timers.next_deadline() == 11.0
    timers.any_authenticated_packet_sent(4.0)
    assert timers.next_deadline() == pytest.approx(15.25)
    timers.any_authenticated_packet_received(4.0)
    assert timers.next_deadline() == 28.0
    timers.persistent_keepalive = None
    assert timers.next_deadline() == 540.0


def test_retransmits_keep_the_start_of_the_attempt_run() -> None:
    timers = PeerTimers(FixedJitterRng(1.0))
    timers.handshake_initiated(0.0)
    assert timers.retransmit_handshake == pytest.approx(5.0 + 1 / 3)
    timers.handshake_initiated(5.5)
    assert timers.handshake_started == 0.0  # Rekey-Attempt-Time counts from the first initiation
    assert timers.retransmit_handshake == pytest.approx(10.5 + 1 / 3)
    timers.handshake_complete(6.0)
    assert timers.handshake_started is None and timers.retransmit_handshake is None


def test_stop_all_disarms_every_timer_and_a_later_run_starts_afresh() -> None:
    timers = PeerTimers(FixedJitterRng(0.5))
    timers.persistent_keepalive_interval = 25
    timers.session_derived(0.0)
    timers.data_sent(0.0)
    timers.data_received(0.0)
    timers.data_received(0.5)
    timers.any_authenticated_packet_traversal(0.5)
    timers.handshake_initiated(1.0)
    assert timers.next_deadline() is not None and timers.need_another_keepalive
    timers.stop_all()
    assert timers.next_deadline() is None
    armed = [
        timers.retransmit_handshake,
        timers.send_keepalive,
        timers.new_handshake,
        timers.zero_key_material,
        timers.persistent_keepalive,
        timers.handshake_started,
    ]
    assert armed == [None] * 6
    assert timers.need_another_keepalive is False
    timers.handshake_initiated(50.0)
    assert timers.handshake_started == 50.0


# --- cookies (spec computed independently of the module) ---


def blake2s(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def keyed_mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def xchacha_seal(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    subkey = hchacha20_rounds(key, nonce[:16])
    return ChaCha20Poly1305(subkey).encrypt(bytes(4) + nonce[16:], plaintext, associated_data)


def xchacha_open(key: bytes, nonce: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    subkey = hchacha20_rounds(key, nonce[:16])
    return ChaCha20Poly1305(subkey).decrypt(bytes(4) + nonce[16:], sealed, associated_data)


RESPONDER_PUBLIC = public_key(SeededRng(5).random_bytes(32))
COOKIE_KEY = blake2s(b"cookie--", RESPONDER_PUBLIC)
MAC1_KEY = blake2s(b"mac1----", RESPONDER_PUBLIC)
SOURCE: Address = ("192.0.2.9", 51820)


def initiation(sender_index: bytes = b"\x11\x22\x33\x44") -> bytes:
    """An initiation-sized message (148 bytes) with a correct mac1 and an empty mac2."""
    body = b"\x01\x00\x00\x00" + sender_index + bytes(range(108))
    return body + keyed_mac(MAC1_KEY, body) + bytes(16)


def test_cookie_reply_is_the_cookie_sealed_under_the_cookie_key_with_mac1_as_associated_data() -> None:
    checker = CookieChecker(RESPONDER_PUBLIC, SeededRng(6))
    message = initiation()
    assert checker.check_mac1(message)
    reply = checker.create_reply(message, SOURCE, 0.0)
    assert len(reply) == 64
    assert reply[:4] == b"\x03\x00\x00\x00" and reply[4:8] == b"\x11\x22\x33\x44"
    cookie = xchacha_open(COOKIE_KEY, reply[8:32], reply[32:], message[116:132])
    assert len(cookie) == 16
    # that cookie is what mac2 must be keyed with, for this source only
    signed = message[:132] + keyed_mac(cookie, message[:132])
    assert checker.check_mac2(signed, SOURCE, 1.0)
    assert not checker.check_mac2(signed, ("192.0.2.9", 51821), 1.0)


def test_initiator_opens_a_spec_cookie_reply_and_signs_mac2_with_it_for_120_seconds() -> None:
    generator = CookieGenerator(RESPONDER_PUBLIC)
    body = initiation()[:116]
    sent = generator.add_macs(body, 1000.0)
    assert sent[116:132] == keyed_mac(MAC1_KEY, body) and sent[132:] == bytes(16)
    cookie = bytes(range(100, 116))
    nonce = bytes(range(24))
    reply = b"\x03\x00\x00\x00" + body[4:8] + nonce + xchacha_seal(COOKIE_KEY, nonce, cookie, sent[116:132])
    assert generator.consume_reply(reply, 1000.0)
    assert generator.has_cookie
    for now in (1000.5, 1119.9):
        signed = generator.add_macs(body, now)
        assert signed[132:] == keyed_mac(cookie, signed[:132])
    assert generator.add_macs(body, 1120.0)[132:] == bytes(16)


def test_unsolicited_cookie_reply_is_rejected() -> None:
    generator = CookieGenerator(RESPONDER_PUBLIC)
    # the cookie key is public (derived from the responder's public key): anyone can seal a reply; without a
    # message of ours to answer, no associated data can be right
    nonce = bytes(24)
    for associated_data in (b"", bytes(16)):
        reply = b"\x03\x00\x00\x00" + bytes(4) + nonce + xchacha_seal(COOKIE_KEY, nonce, bytes(16), associated_data)
        assert not generator.consume_reply(reply, 0.0)
    assert not generator.has_cookie


def test_cookie_reply_of_the_wrong_size_is_rejected_without_raising() -> None:
    generator = CookieGenerator(RESPONDER_PUBLIC)
    sent = generator.add_macs(initiation()[:116], 0.0)
    mac1 = sent[116:132]
    nonce = bytes(range(24))
    header = b"\x03\x00\x00\x00" + sent[4:8]
    long_cookie = header + nonce + xchacha_seal(COOKIE_KEY, nonce, bytes(17), mac1)  # 65 bytes, authentic
    assert not generator.consume_reply(long_cookie, 0.0)
    assert not generator.consume_reply(header + nonce[:12], 0.0)
    assert not generator.consume_reply(b"", 0.0)
    assert not generator.has_cookie
    # the message is still answerable by a proper reply
    assert generator.consume_reply(header + nonce + xchacha_seal(COOKIE_KEY, nonce, bytes(16), mac1), 0.0)


@pytest.mark.parametrize("host", ["1.2.3", "1.2.3.4.5", "1.2", "7"])
def test_dotted_numbers_that_are_not_four_octets_bind_by_their_text(host: str) -> None:
    # not an IPv4 address: like any other non-address it binds by its text, never as a short or long packed form
    assert source_bytes((host, 0x0405)) == host.encode() + b"\x04\x05"


# --- crypto and noise ---


@pytest.mark.parametrize("key_size", [0, 32, 63, 64, 65, 128, 200])
def test_hmac_blake2s_is_rfc2104_hmac_for_every_key_length(key_size: int) -> None:
    # keys longer than BLAKE2s's 64-byte block are hashed first; a 64-byte key is used as it is
    key = bytes(range(key_size))
    for data in (b"", b"\x01", bytes(100)):
        assert hmac_blake2s(key, data) == hmac.new(key, data, hashlib.blake2s).digest()


@pytest.mark.parametrize(
    ("unix_seconds", "expected_nanoseconds"),
    [(0.01677721599, 0), (0.0167772165, 1 << 24), (1.999999999, 999_999_999 & ~0xFFFFFF)],
)
def test_tai64n_label_and_truncated_nanoseconds(unix_seconds: float, expected_nanoseconds: int) -> None:
    # TAI64N: 2^62 + 10 + unix seconds, big-endian, then nanoseconds with the low 24 bits cleared (never rounded up)
    seconds = int(unix_seconds)
    assert tai64n(unix_seconds) == ((1 << 62) + 10 + seconds).to_bytes(8, "big") + expected_nanoseconds.to_bytes(
        4, "big"
    )


LOW_ORDER_POINT = bytes(32)  # X25519 with it gives the all-zero shared secret WireGuard rejects


def handshake_parties() -> tuple[bytes, bytes, bytes]:
    rng = SeededRng(21)
    return rng.random_bytes(32), rng.random_bytes(32), rng.random_bytes(32)


def test_responder_refuses_low_order_points_in_the_initiation_it_answers() -> None:
    responder_private, initiator_private, ephemeral_private = handshake_parties()
    valid_public = public_key(initiator_private)
    for remote_static, remote_ephemeral in ((valid_public, LOW_ORDER_POINT), (LOW_ORDER_POINT, valid_public)):
        forged = noise.ConsumedInitiation(remote_static, bytes(12), bytes(32), bytes(32), remote_ephemeral, 7)
        created = noise.create_response(forged, ephemeral_private=ephemeral_private, sender_index=9, preshared_key=None)
        assert created is None


def test_handshake_roles_and_a_message_shorter_than_its_body_is_refused() -> None:
    responder_private, initiator_private, ephemeral_private = handshake_parties()
    responder_public = public_key(responder_private)
    created = noise.create_initiation(
        static_private=initiator_private,
        remote_static=responder_public,
        ephemeral_private=ephemeral_private,
        sender_index=7,
        timestamp=b"",  # authentic, but a 104-byte body instead of WireGuard's 116
    )
    assert created is not None
    body, state = created
    assert len(body) == 104
    consume = functools.partial(
        noise.consume_initiation, static_private=responder_private, static_public=responder_public
    )
    assert consume(message=body) is None  # shorter than an initiation body
    consumed = consume(message=body, body_size=104)
    assert consumed is not None and consumed.remote_static == public_key(initiator_private)
    response = noise.create_response(
        consumed, ephemeral_private=SeededRng(22).random_bytes(32), sender_index=9, preshared_key=None
    )
    assert response is not None
    response_body, responder_keys = response
    initiator_keys = noise.consume_response(
        state, static_private=initiator_private, preshared_key=None, message=response_body
    )
    assert initiator_keys is not None
    assert initiator_keys.is_initiator is True and responder_keys.is_initiator is False
    assert initiator_keys.send_key == responder_keys.receive_key != responder_keys.send_key


# --- Tunn: sending limits of a session, peer settings, cookie replies ---


def _established(at: float) -> TunnPair:
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), at)
    pair.pump(at)
    assert pair.delivered["b"] == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    return pair


def _reserve_agrees_with_encapsulate(at: float, send_counter: int | None = None) -> bool:
    """Whether ``reserve_send`` seals one packet at once; ``encapsulate_batch`` of a twin must decide the same
    (its docstring: both give the same bytes): a transport message goes out now, or the packet waits for a new session."""
    decisions = []
    for use_reserve in (True, False):
        pair = _established(1000.0)
        keypair = pair.a._current
        assert keypair is not None and keypair.created == 1000.0
        if send_counter is not None:
            keypair.send_counter = send_counter
        packet = ipv4_packet(TUNNEL_A, TUNNEL_B, b"late")
        if use_reserve:
            reservation = pair.a.reserve_send([packet], at)
            decisions.append(reservation is not None)
        else:
            pair.a.encapsulate_batch([packet], at)
            out = pair.a.drain_transmits()
            decisions.append(MESSAGE_TRANSPORT in [m[0] for m in out])
    assert decisions[0] == decisions[1]
    return decisions[0]


def test_a_session_sends_until_reject_after_time_and_not_at_it() -> None:
    # whitepaper §6.2 / docs/protocol.md §F: a keypair older than Reject-After-Time (180 s) sends nothing
    assert _reserve_agrees_with_encapsulate(1001.0)
    assert _reserve_agrees_with_encapsulate(1000.0 + REJECT_AFTER_TIME - 0.5)
    assert not _reserve_agrees_with_encapsulate(1000.0 + REJECT_AFTER_TIME)


def test_a_session_sends_until_reject_after_messages_and_not_at_it() -> None:
    assert _reserve_agrees_with_encapsulate(1001.0, REJECT_AFTER_MESSAGES - 2)
    assert not _reserve_agrees_with_encapsulate(1001.0, REJECT_AFTER_MESSAGES - 1)


def test_reserve_send_claims_the_counters_it_hands_out() -> None:
    pair = _established(1000.0)
    keypair = pair.a._current
    assert keypair is not None
    first = keypair.send_counter
    packets = [ipv4_packet(TUNNEL_A, TUNNEL_B, bytes([n])) for n in range(3)]
    reservation = pair.a.reserve_send(packets, 1001.0)
    assert reservation is not None and reservation.first_counter == first
    assert keypair.send_counter == first + 3
    for counter, message in enumerate(reservation.seal(), start=first):
        assert int.from_bytes(message[8:16], "little") == counter  # transport header: type, receiver, counter


def test_preshared_key_is_32_bytes_or_none() -> None:
    pair = TunnPair()
    pair.a.set_preshared_key(bytes(range(32)))
    assert pair.a.preshared_key == bytes(range(32))
    pair.a.set_preshared_key(None)  # no preshared key: the all-zero one of the Noise IKpsk2 pattern
    assert pair.a.preshared_key is None
    for wrong in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError) as info:
            pair.a.set_preshared_key(wrong)
        assert str(info.value) == "preshared key must be 32 bytes"
    assert pair.a.preshared_key is None


def test_persistent_keepalive_is_a_16_bit_number_of_seconds() -> None:
    # UAPI persistent_keepalive_interval: 0 (off) to 65535 seconds
    pair = _established(1000.0)
    pair.a.set_persistent_keepalive(65535, 1001.0)
    assert pair.a._timers.persistent_keepalive_interval == 65535
    for wrong in (-1, 65536):
        with pytest.raises(ValueError) as info:
            pair.a.set_persistent_keepalive(wrong, 1002.0)
        assert str(info.value) == "persistent keepalive must be 0..65535 seconds"
    assert pair.a._timers.persistent_keepalive_interval == 65535


def test_a_tunn_takes_an_authentic_cookie_reply_and_counts_a_forged_one() -> None:
    # whitepaper §5.4.7: the responder under load answers an initiation with a cookie reply; the initiator keeps the
    # cookie (mac2 of its next messages) and drops a reply that does not open
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    (initiation_sent,) = pair.a.drain_transmits()
    checker = CookieChecker(public_key(pair.key_b), SeededRng(6))
    reply = checker.create_reply(initiation_sent, ("192.0.2.9", 51820), 0.0)
    forged = reply[:-1] + bytes([reply[-1] ^ 1])
    assert pair.a.decapsulate(forged, 0.0) is None
    assert pair.a.drops[TunnDropReason.BAD_COOKIE_REPLY] == 1
    assert pair.a.receive_cookie_reply(forged, 0.0) is False
    assert pair.a.drops[TunnDropReason.BAD_COOKIE_REPLY] == 2
    assert pair.a.receive_cookie_reply(reply, 0.0) is True
    assert pair.a.drops[TunnDropReason.BAD_COOKIE_REPLY] == 2


def test_turning_persistent_keepalive_on_sends_one_at_once_and_off_disarms_it() -> None:
    # wireguard-go: setting an interval on an established peer sends a keepalive right away; 0 turns it off
    pair = _established(1000.0)
    pair.a.set_persistent_keepalive(1, 1001.0)
    assert [len(m) for m in pair.a.drain_transmits()] == [32]  # a keepalive: transport header + empty sealed body
    assert pair.a._timers.persistent_keepalive == 1002.0
    pair.a.set_persistent_keepalive(0, 1001.5)
    assert pair.a._timers.persistent_keepalive_interval == 0
    assert pair.a._timers.persistent_keepalive is None


def _gave_up(caplog: pytest.LogCaptureFixture) -> tuple[TunnPair, float]:
    caplog.set_level(logging.DEBUG, logger="dataplane.wireguard.tunn")
    pair = TunnPair(rekey_attempt_time=20.0)
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    pair.a.drain_transmits()  # the responder never answers
    while (deadline := pair.a.poll_timeout()) is not None:
        pair.a.handle_timeout(deadline)
        pair.a.drain_transmits()
        if isinstance(pair.a.poll_event(), HandshakeGaveUp):
            return pair, deadline
    raise AssertionError("the handshake never gave up")


def test_a_handshake_that_gives_up_zeroes_the_keys_three_reject_after_times_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # wireguard-go (timers.go, expiredRetransmitHandshake): after the last attempt, zero the key material in
    # 3 x Reject-After-Time unless that is already pending
    pair, gave_up_at = _gave_up(caplog)
    assert pair.a.poll_timeout() == gave_up_at + 3 * REJECT_AFTER_TIME
    pair.a.handle_timeout(gave_up_at + 3 * REJECT_AFTER_TIME)
    assert pair.a.poll_event() == KeysZeroed(public_key(pair.key_b))
    peer = public_key(pair.key_b).hex()[:16]
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.wireguard.tunn"]
    assert f"handshake with {peer} gave up after 20 s" in lines
    assert lines[-1] == f"keys for {peer} zeroed"


# --- Device: its peers ---


def test_a_device_iterates_over_its_peers_and_a_peer_shows_key_endpoint_and_allowed_ips() -> None:
    pair = Pair()
    assert list(pair.a) == [pair.peer_b]
    public = pair.peer_b.public_key
    assert repr(pair.peer_b) == (
        f"Peer({public.hex()[:16]}…, endpoint={ADDRESS_B}, "
        f"allowed_ips=[IPv4Network('{TUNNEL_B}/32'), IPv6Network('{TUNNEL6_B}/128')])"
    )
    other = pair.a.upsert_peer(SeededRng(77).random_bytes(32), 0.0)
    assert list(pair.a) == [pair.peer_b, other]
    pair.a.remove_peer(pair.peer_b.public_key, 0.0)
    assert list(pair.a) == [other]


# --- handshake load: one-second buckets ---


def test_handshake_load_counts_per_one_second_bucket_and_stays_on_for_under_load_after_time() -> None:
    load = HandshakeLoad(threshold=2)
    for now in (0.0, 0.5, 1.0, 1.5):  # two per bucket: never more than the threshold
        load.count(now)
        assert not load.under_load(now)
    load.count(1.9)  # a third message in the bucket that started at 1.0
    assert load.under_load(1.9)
    assert load.under_load(1.9 + UNDER_LOAD_AFTER_TIME - 0.01)
    assert not load.under_load(1.9 + UNDER_LOAD_AFTER_TIME)
    burst = HandshakeLoad(threshold=2)
    for _ in range(3):  # three at one instant are three in one bucket
        burst.count(7.0)
    assert burst.under_load(7.0)


def test_handshake_load_with_a_visible_queue_needs_a_burst_and_a_backlog_at_once() -> None:
    load = HandshakeLoad(threshold=2)
    load.needs_backlog = True
    for _ in range(5):
        load.count(10.0)
    assert not load.under_load(10.0)  # a burst the node keeps up with is not load
    capacity = 32 * 1024 * 1024  # the gateway's 16 MiB SO_RCVBUF, doubled by the kernel
    load.note_backlog(capacity // 8 - 1, capacity, 10.1)
    assert not load.under_load(10.1)
    load.note_backlog(capacity // 8, capacity, 10.2)
    assert load.under_load(10.2)
    assert load.under_load(10.0 + UNDER_LOAD_AFTER_TIME - 0.01)
    assert not load.under_load(10.0 + UNDER_LOAD_AFTER_TIME)  # the burst is over although the backlog is recent
    load.count(20.0)
    load.count(20.0)
    load.count(20.0)
    assert not load.under_load(20.0)  # the backlog seen at 10.2 is stale


def test_handshake_load_ignores_a_queue_of_unknown_capacity() -> None:
    load = HandshakeLoad(threshold=0)
    load.needs_backlog = True
    load.count(1.0)
    load.note_backlog(0, 0, 1.0)
    assert not load.under_load(1.0)
    load.needs_backlog = False  # without a queue to see, a burst alone is load (Firezone's rule)
    assert load.under_load(1.0)


def test_handshake_load_starts_a_new_bucket_when_the_clock_goes_back() -> None:
    load = HandshakeLoad(threshold=2)
    load.count(10.0)
    load.count(10.2)
    load.count(5.0)  # earlier than the bucket start: a fresh bucket, not a third message
    assert not load.under_load(5.0)
    assert load.force is False
    load.force = True  # pinned on by an operator or a test
    assert load.under_load(100.0)


def test_a_batch_larger_than_the_staging_queue_is_sent_whole_over_a_session() -> None:
    # the staging queue (MAX_STAGED_PACKETS) holds packets waiting for a handshake; with a session up, nothing waits
    pair = _established(1000.0)
    packets = [ipv4_packet(TUNNEL_A, TUNNEL_B, n.to_bytes(2, "big")) for n in range(MAX_STAGED_PACKETS + 5)]
    pair.a.encapsulate_batch(packets, 1001.0)
    pair.pump(1001.0)
    assert pair.delivered["b"][1:] == packets
    assert pair.a.drops.total() == 0


def test_a_dropped_datagram_is_counted_and_logged_with_its_source_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.wireguard.drops")
    pair = Pair()
    pair.a.receive_datagrams([(b"\x09" + bytes(40), ("192.0.2.77", 4242))], 0.0)  # no WireGuard message type 9
    assert pair.a.drops[TunnDropReason.BAD_TYPE] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.wireguard.drops"]
    assert lines == [f"dropped a datagram from ('192.0.2.77', 4242): {TunnDropReason.BAD_TYPE.value}"]


def test_a_device_hands_its_mtu_to_every_peer_and_refuses_bad_keys_by_name() -> None:
    rng = SeededRng(90)
    device = Device(rng=rng, wall_clock=WallClock(), private_key=rng.random_bytes(32), mtu=1280)
    peer = device.upsert_peer(rng.random_bytes(32), 0.0)
    assert peer.tunn.mtu == 1280  # padding never goes past the device's MTU
    with pytest.raises(ValueError) as info:
        device.upsert_peer(bytes(31), 0.0)
    assert str(info.value) == "public key must be 32 bytes"
    assert device.public_key is not None
    with pytest.raises(ValueError) as info:
        device.upsert_peer(device.public_key, 0.0)
    assert str(info.value) == "a peer cannot have the device's own public key"


def test_a_header_only_ipv6_packet_is_routed_to_its_peer() -> None:
    pair = Pair()
    header_only = bytes([0x60]) + bytes(7) + ipaddress.IPv6Address(TUNNEL6_A).packed
    header_only += ipaddress.IPv6Address(TUNNEL6_B).packed
    assert len(header_only) == 40
    routed = pair.a._route_packets([header_only])
    assert routed == {pair.peer_b: [header_only]}


# --- Device: its private key, its peer table, open_datagrams, handshake load ---


def test_a_private_key_is_refused_by_name_and_setting_the_same_key_again_keeps_the_sessions() -> None:
    pair = Pair()
    with pytest.raises(ValueError) as info:
        pair.a.set_private_key(bytes(31), 0.0)
    assert str(info.value) == "private key must be 32 bytes"
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    # wireguard-go (SetPrivateKey): the key it already has changes nothing, so the session stays up and the next
    # packet goes out as a transport message, not as a new initiation
    assert pair.a.private_key is not None
    pair.a.set_private_key(pair.a.private_key, 1.0)
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"same key")], 1.0)
    assert [int.from_bytes(t.payload[:4], "little") for t in pair.a.drain_transmits()] == [MESSAGE_TRANSPORT]


def test_taking_the_key_of_a_configured_peer_removes_that_peer() -> None:
    # wireguard-go (SetPrivateKey): a peer whose public key is now our own would be a loop, so it goes
    pair = Pair()
    assert pair.b.private_key is not None and pair.b.public_key is not None
    pair.a.set_private_key(pair.b.private_key, 1.0)
    assert pair.a.public_key == pair.b.public_key
    assert pair.b.public_key not in pair.a.peers
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 1.0)  # its allowed IPs went with it
    assert pair.a.drops[TunnDropReason.NO_ROUTE] == 1


def test_a_device_without_a_key_takes_peers_and_handshakes_once_a_key_is_set() -> None:
    pair = Pair()
    key_a = pair.a.private_key
    assert key_a is not None and pair.b.public_key is not None
    keyless = Device(rng=SeededRng(5), wall_clock=pair.wall)
    assert keyless.private_key is None and keyless.public_key is None
    # UAPI allows peers before the private key (wg set ... peer ... then private-key)
    pair.a = keyless
    pair.peer_b = keyless.upsert_peer(
        pair.b.public_key, 0.0, endpoint=ADDRESS_B, allowed_ips=[ipaddress.ip_network(f"{TUNNEL_B}/32")]
    )
    keyless.set_private_key(key_a, 0.0)  # the key device B knows this device by
    assert pair.a_to_b(b"keyed now") == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"keyed now")]


def test_the_peer_table_is_bounded_by_max_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    # remote input (the portal) grows the peer table: it holds at most MAX_PEERS peers (lowered here to 3)
    monkeypatch.setattr(device_module, "MAX_PEERS", 3)
    pair = Pair()
    rng = SeededRng(41)
    pair.a.upsert_peer(rng.random_bytes(32), 0.0)
    third = pair.a.upsert_peer(rng.random_bytes(32), 0.0)
    assert len(pair.a.peers) == 3
    with pytest.raises(ValueError) as info:
        pair.a.upsert_peer(rng.random_bytes(32), 0.0)
    assert str(info.value) == "too many peers"
    assert len(pair.a.peers) == 3
    assert pair.a.upsert_peer(third.public_key, 0.0, persistent_keepalive=25) is third  # updates still go through


def test_open_datagrams_decrypts_a_transport_run_with_the_keypair_its_index_names() -> None:
    pair = Pair()
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    packets = [ipv4_packet(TUNNEL_A, TUNNEL_B, b"first"), ipv4_packet(TUNNEL_A, TUNNEL_B, b"second!")]
    pair.a.send_packets(packets, 0.0)
    runs = pair.b.open_datagrams([(t.payload, ADDRESS_A) for t in pair.a.drain_transmits()])
    assert len(runs) == 1 and runs[0].keypair is not None
    plaintexts = runs[0].plaintexts
    assert plaintexts is not None and len(plaintexts) == 2
    for plaintext, packet in zip(plaintexts, packets, strict=True):
        # the padded plaintext: the packet, then zeros up to a multiple of 16 (whitepaper §5.4.6)
        assert plaintext is not None and len(plaintext) % 16 == 0
        assert plaintext[: len(packet)] == packet and not any(plaintext[len(packet) :])
    pair.b.receive_opened(runs, 0.0)
    assert pair.b.drain_packets() == packets


def test_device_handshake_load_buckets_start_at_the_first_message_after_the_previous_one_ended() -> None:
    # a bucket is the second from the first counted message on (not a wall-clock second), and a message a second or
    # more after a bucket began starts a new one
    pair = Pair()
    pair.b.under_load_threshold = 2
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    initiation = pair.a.drain_transmits()[0].payload
    assert initiation[0] == MESSAGE_INITIATION  # mac1 valid for B: every copy is counted
    for now in (1.5, 1.6):
        pair.b.receive_datagrams([(initiation, ADDRESS_A)], now)
        assert not pair.b.is_under_load(now)
    pair.b.receive_datagrams([(initiation, ADDRESS_A)], 2.2)  # the third in the bucket that began at 1.5
    assert pair.b.is_under_load(2.2)
    for now in (5.0, 6.5, 8.0, 9.5):  # one per bucket: never more than the threshold
        pair.b.receive_datagrams([(initiation, ADDRESS_A)], now)
        assert not pair.b.is_under_load(now)


# --- Device: every receive-path drop is counted by reason and logged with the datagram's source ---

STRANGER: Address = ("192.0.2.77", 4242)


def _mac1_for(responder_public: bytes, body: bytes) -> bytes:
    """``body`` (an initiation without its macs) with the mac1 ``responder_public`` checks and an empty mac2."""
    return body + keyed_mac(blake2s(b"mac1----", responder_public), body) + bytes(16)


def _bad_mac1(pair: Pair) -> tuple[bytes, Address, float]:
    return b"\x01\x00\x00\x00" + bytes(144), STRANGER, 0.0


def _cookie_reply_too_long(pair: Pair) -> tuple[bytes, Address, float]:
    return b"\x03\x00\x00\x00" + bytes(61), STRANGER, 0.0  # a cookie reply is 64 bytes


def _cookie_reply_for_no_handshake(pair: Pair) -> tuple[bytes, Address, float]:
    return b"\x03\x00\x00\x00" + b"\xde\xad\xbe\xef" + bytes(56), STRANGER, 0.0


def _initiation_that_does_not_decrypt(pair: Pair) -> tuple[bytes, Address, float]:
    assert pair.b.public_key is not None
    # mac1 is right, but the ephemeral key is the all-zero low-order point: the Noise handshake refuses it
    return _mac1_for(pair.b.public_key, b"\x01\x00\x00\x00" + b"\x01\x02\x03\x04" + bytes(108)), STRANGER, 0.0


def _initiation_from_an_unknown_peer(pair: Pair) -> tuple[bytes, Address, float]:
    assert pair.a.public_key is not None
    pair.b.remove_peer(pair.a.public_key, 0.0)  # A still knows B; B no longer knows A
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    return pair.a.drain_transmits()[0].payload, ADDRESS_A, 0.0


def _initiation_over_the_rate_limit(pair: Pair) -> tuple[bytes, Address, float]:
    # wireguard-go (ratelimiter.go, docs/protocol.md §F): under load only an initiation with a valid mac2 (keyed with B's cookie for A's address) goes
    # on, and then at most 20 a second per source with a burst of 5: the same one eight times at once overruns it
    pair.b.force_under_load = True
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    pair.b.receive_datagrams([(pair.a.drain_transmits()[0].payload, ADDRESS_A)], 0.0)
    (reply,) = pair.b.drain_transmits()
    assert reply.dst == ADDRESS_A and reply.payload[0] == 3  # a cookie reply
    pair.a.receive_datagrams([(reply.payload, ADDRESS_B)], 0.0)
    retransmit_at = pair.a.poll_timeout()
    assert retransmit_at is not None
    pair.a.handle_timeout(retransmit_at)
    with_mac2 = pair.a.drain_transmits()[0].payload
    for _ in range(7):
        pair.b.receive_datagrams([(with_mac2, ADDRESS_A)], retransmit_at)
    return with_mac2, ADDRESS_A, retransmit_at


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_bad_mac1, TunnDropReason.BAD_MAC1),
        (_cookie_reply_too_long, TunnDropReason.BAD_LENGTH),
        (_cookie_reply_for_no_handshake, TunnDropReason.UNKNOWN_INDEX),
        (_initiation_that_does_not_decrypt, TunnDropReason.HANDSHAKE_FAILED),
        (_initiation_from_an_unknown_peer, TunnDropReason.UNKNOWN_PEER),
        (_initiation_over_the_rate_limit, TunnDropReason.RATE_LIMITED),
    ],
)
def test_a_receive_path_drop_is_counted_and_logged_with_its_source(
    build: Callable[[Pair], tuple[bytes, Address, float]], reason: TunnDropReason, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.wireguard.drops")
    pair = Pair()
    datagram, source, now = build(pair)
    before = pair.b.drops[reason]
    pair.b.receive_datagrams([(datagram, source)], now)
    assert pair.b.drops[reason] == before + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.wireguard.drops"]
    assert lines[-1] == f"dropped a datagram from {source}: {reason.value}"


def test_a_deadline_moved_thousands_of_times_is_still_the_one_polled_and_fired() -> None:
    # every sent packet moves the persistent keepalive (docs/protocol.md §F): the timer heap drops the stale
    # deadlines it piles up (lazy deletion, compacted past 2 x peers + 1024 entries) and keeps the current one
    pair = Pair()
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    pair.a.upsert_peer(pair.peer_b.public_key, 0.0, persistent_keepalive=1)
    pair.a.drain_transmits()
    last = 0.0
    for n in range(1, 2100):
        last = n / 1000
        pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], last)
        pair.a.drain_transmits()
    assert len(pair.a._timer_heap) <= 2 * len(pair.a.peers) + 1024
    assert pair.a.poll_timeout() == last + 1
    pair.a.handle_timeout(last + 1)
    assert [len(t.payload) for t in pair.a.drain_transmits()] == [32]  # the keepalive: an empty transport message


# --- Tunn: the receive path (whitepaper §5.4.6, §6; wireguard-go receive.go) ---


def _ipv6_packet(source: str, payload: bytes = b"ping", declared: int | None = None) -> bytes:
    payload_length = len(payload) if declared is None else declared
    header = struct.pack(
        "!IHBB16s16s",
        0x6 << 28,
        payload_length,
        17,
        64,
        ipaddress.IPv6Address(source).packed,
        ipaddress.IPv6Address(TUNNEL6_B).packed,
    )
    return header + payload


def _ipv4_declaring(total_length: int) -> bytes:
    packet = bytearray(ipv4_packet(TUNNEL_A, TUNNEL_B, b"data"))
    packet[2:4] = total_length.to_bytes(2, "big")
    return bytes(packet)


def _sealed_by_a(pair: TunnPair, packets: list[bytes], now: float) -> list[bytes]:
    pair.a.encapsulate_batch(packets, now)
    messages = pair.a.drain_transmits()
    assert [m[0] for m in messages] == [MESSAGE_TRANSPORT] * len(packets)
    return messages


def test_inner_packets_are_checked_one_by_one_and_a_bad_one_costs_only_itself() -> None:
    # wireguard-go RoutineDecryption/RoutineSequentialReceiver: an inner packet shorter than its header or than its
    # own length field is dropped; header-only IPv4 (20 bytes) and IPv6 (40 bytes) packets are valid
    pair = _established(0.0)
    header_only4 = ipv4_packet(TUNNEL_A, TUNNEL_B, b"")
    header_only6 = _ipv6_packet(TUNNEL6_A, b"")
    good4 = ipv4_packet(TUNNEL_A, TUNNEL_B, b"x" * 5)
    good6 = _ipv6_packet(TUNNEL6_A, b"y" * 7)
    packets = [
        _ipv4_declaring(200),
        header_only4,
        _ipv6_packet(TUNNEL6_A, b"", declared=100),
        header_only6,
        _ipv4_declaring(19),
        good4,
        good6,
    ]
    messages = _sealed_by_a(pair, packets, 1.0)
    out: list[bytes] = []
    assert pair.b.receive_transport_batch(messages, 1.0, out) == len(packets)  # all authenticated
    assert out == [header_only4, header_only6, good4, good6]  # padding removed by each packet's length
    assert pair.b.drops[TunnDropReason.INVALID_INNER_PACKET] == 3
    assert pair.b.drops.total() == 3
    # a peer whose MTU leaves no room for padding sends header-only packets at their exact size
    for mtu, packet in ((20, header_only4), (40, header_only6)):
        pair.a.mtu = mtu
        (message,) = _sealed_by_a(pair, [packet], 2.0)
        assert len(message) == 32 + len(packet)
        assert pair.b.decapsulate(message, 2.0) == packet
    assert pair.b.drops.total() == 3


@pytest.mark.parametrize("family", [4, 6])
def test_cryptokey_routing_drops_only_the_packets_from_a_source_the_peer_does_not_own(family: int) -> None:
    # whitepaper §2: a decrypted packet is accepted only if its source address is in the sending peer's allowed IPs
    pair = _established(0.0)
    owner = object()
    if family == 4:
        mine = [ipv4_packet(TUNNEL_A, TUNNEL_B, bytes([n])) for n in range(3)]
        stranger = ipv4_packet("10.9.0.99", TUNNEL_B)
        allowed = {ipaddress.IPv4Address(TUNNEL_A).packed: owner}
    else:
        mine = [_ipv6_packet(TUNNEL6_A, bytes([n])) for n in range(3)]
        stranger = _ipv6_packet("fd00::99")
        allowed = {ipaddress.IPv6Address(TUNNEL6_A).packed: owner}
    messages = _sealed_by_a(pair, [mine[0], stranger, mine[1], stranger, mine[2]], 1.0)
    index = int.from_bytes(messages[0][4:8], "little")
    out: list[bytes] = []
    assert pair.b.receive_transport_run(index, messages, 1.0, out, allowed.get, owner) == 5
    assert out == mine
    assert pair.b.drops[TunnDropReason.ALLOWED_IPS_MISMATCH] == 2
    # without a router every authenticated packet is handed on
    out = []
    assert pair.b.receive_transport_run(index, _sealed_by_a(pair, [stranger], 2.0), 2.0, out) == 1
    assert out == [stranger]


def test_a_batch_is_split_into_runs_by_receiver_index_and_an_unknown_index_is_not_authenticated() -> None:
    pair = _established(0.0)
    packets = [ipv4_packet(TUNNEL_A, TUNNEL_B, bytes([n])) for n in range(3)]
    messages = _sealed_by_a(pair, packets, 1.0)
    index = int.from_bytes(messages[0][4:8], "little")
    unknown_index = (index + 1) & 0xFFFFFFFF
    assert pair.b.keypair_for_index(unknown_index) is None
    stray = bytearray(messages[0])
    stray[4:8] = unknown_index.to_bytes(4, "little")
    batch = [messages[0], bytes(stray), messages[1], messages[2], bytes(stray)]
    out: list[bytes] = []
    assert pair.b.receive_transport_batch(batch, 1.0, out) == 3
    assert out == packets
    assert pair.b.drops[TunnDropReason.UNKNOWN_INDEX] == 2
    assert pair.b.drops[TunnDropReason.DECRYPTION_FAILED] == 0
    # one message: None when it did not authenticate (not b"", which means authenticated but nothing to deliver)
    assert pair.b.receive_transport(bytes(stray), 1.0) is None
    assert pair.b.receive_transport_batch([bytes(stray)], 1.0, out) == 0


def test_the_responder_confirms_its_next_session_once_on_a_batch_of_several_messages() -> None:
    # whitepaper §5.4.6 / wireguard-go: the responder's new keypair becomes current on the first authenticated
    # transport message the initiator sends with it; later messages of the same batch keep it current
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B, b"0"), 0.0)
    (initiation,) = pair.a.drain_transmits()
    pair.b.decapsulate(initiation, 0.0)
    (response,) = pair.b.drain_transmits()
    pair.a.decapsulate(response, 0.0)
    pair.a.encapsulate_batch([ipv4_packet(TUNNEL_A, TUNNEL_B, b"1"), ipv4_packet(TUNNEL_A, TUNNEL_B, b"2")], 0.0)
    messages = pair.a.drain_transmits()
    assert len(messages) == 3
    assert not pair.b.has_session
    out: list[bytes] = []
    assert pair.b.receive_transport_batch(messages, 0.0, out) == 3
    assert pair.b.has_session
    assert pair.b.poll_event() == HandshakeCompleted(public_key(pair.key_a), False)
    assert pair.b.poll_event() is None
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 0.5)
    (reply,) = pair.b.drain_transmits()
    assert reply[0] == MESSAGE_TRANSPORT
    assert pair.a.decapsulate(reply, 0.5) == ipv4_packet(TUNNEL_B, TUNNEL_A)


@pytest.mark.parametrize(("age", "rekeys"), [(REKEY_ON_RECEIVE_AGE - 0.5, False), (REKEY_ON_RECEIVE_AGE, True)])
def test_the_initiator_rekeys_on_receive_from_reject_after_time_minus_keepalive_and_rekey_timeout(
    age: float, rekeys: bool
) -> None:
    # wireguard-go keepKeyFreshReceiving: the initiator receiving on a keypair at least
    # Reject-After-Time - Keepalive-Timeout - Rekey-Timeout (165 s) old starts a handshake
    pair = _established(0.0)
    pair.a.drain_transmits()
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), age)
    (message,) = pair.b.drain_transmits()
    assert pair.a.decapsulate(message, age) == ipv4_packet(TUNNEL_B, TUNNEL_A)
    kinds = [m[0] for m in pair.a.drain_transmits()]
    assert kinds == ([MESSAGE_INITIATION] if rekeys else [])


def test_initiation_and_response_are_consumed_once() -> None:
    pair = TunnPair()
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    (initiation,) = pair.a.drain_transmits()
    b_private = pair.b._static_private
    assert b_private is not None
    consumed = noise.consume_initiation(
        static_private=b_private, static_public=public_key(pair.key_b), message=initiation
    )
    assert consumed is not None
    assert pair.b.receive_initiation(consumed, len(initiation), 0.0) is True
    (response,) = pair.b.drain_transmits()
    # the same TAI64N timestamp again is a replay (whitepaper §5.1)
    assert pair.b.receive_initiation(consumed, len(initiation), 1.0) is False
    assert pair.b.drops[TunnDropReason.STALE_TIMESTAMP] == 1
    # a response for our handshake that does not decrypt (mac1 valid) fails and leaves the handshake in flight
    forged = bytearray(response[:60])
    forged[44] ^= 1  # the sealed empty payload
    assert pair.a.receive_response(_mac1_for(public_key(pair.key_a), bytes(forged)), 0.0) is False
    assert pair.a.drops[TunnDropReason.HANDSHAKE_FAILED] == 1
    assert pair.a.receive_response(response, 0.0) is True
    assert pair.a.receive_response(response, 0.1) is False  # no handshake of ours is in flight any more
    assert pair.a.drops[TunnDropReason.UNEXPECTED_RESPONSE] == 1


def test_a_responder_keypair_keeps_the_replay_limit_persistent_keepalive_and_byte_counts() -> None:
    pair = TunnPair()
    pair.b = Tunn(
        pair.key_b,
        public_key(pair.key_a),
        None,
        IndexTable(SeededRng(9)),
        SeededRng(9),
        pair.wall,
        persistent_keepalive=25,
        replay_limit=4,
    )
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    pair.pump(0.0)
    assert pair.delivered["b"] == [ipv4_packet(TUNNEL_A, TUNNEL_B)]  # counter 0
    # counters at or past the keypair's replay limit are refused (replay.py: wireguard-go and the kernel differ)
    packets = [ipv4_packet(TUNNEL_A, TUNNEL_B, bytes([n])) for n in range(1, 6)]
    out: list[bytes] = []
    assert pair.b.receive_transport_batch(_sealed_by_a(pair, packets, 1.0), 1.0, out) == 3
    assert out == packets[:3]
    assert pair.b.drops[TunnDropReason.REPLAY] == 2
    # a rekey: the byte counters add up every datagram either way, the response included
    pair.wall.now += REKEY_AFTER_TIME + 1.0  # a later TAI64N timestamp
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), REKEY_AFTER_TIME + 1.0)
    pair.pump(REKEY_AFTER_TIME + 1.0)
    assert pair.b.poll_event() == HandshakeCompleted(public_key(pair.key_a), False)
    assert pair.b.poll_event() == HandshakeCompleted(public_key(pair.key_a), False)
    assert pair.b.tx_bytes == sum(len(d) for target, d in pair.wire if target == "a")


def test_three_handshakes_rotate_current_previous_and_next() -> None:
    # whitepaper §6.x / wireguard-go: a new session moves current to previous and drops the old previous; a
    # message still in flight on the previous keypair is received
    pair = _established(0.0)
    for round_start in (REKEY_AFTER_TIME + 1.0, 2 * REKEY_AFTER_TIME + 2.0):
        pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A, b"late"), round_start)
        (in_flight,) = pair.b.drain_transmits()
        old_index = int.from_bytes(in_flight[4:8], "little")
        pair.wall.now += REKEY_AFTER_TIME + 1.0  # a later TAI64N timestamp
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), round_start)  # old enough: rekeys on send
        pair.pump(round_start)
        assert pair.b.has_session
        assert pair.a.decapsulate(in_flight, round_start) == ipv4_packet(TUNNEL_B, TUNNEL_A, b"late")
        assert pair.a.keypair_for_index(old_index) is not None
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 2 * REKEY_AFTER_TIME + 3.0)
    pair.pump(2 * REKEY_AFTER_TIME + 3.0)
    assert pair.delivered["a"][-1] == ipv4_packet(TUNNEL_B, TUNNEL_A)
    assert pair.b.drops.total() == 0 and pair.a.drops.total() == 0


def test_a_completed_handshake_is_logged_with_the_peer_and_our_role(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.wireguard.tunn")
    pair = _established(0.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.wireguard.tunn"]
    assert f"handshake with {public_key(pair.key_b).hex()[:16]} completed (initiator)" in lines
    assert f"handshake with {public_key(pair.key_a).hex()[:16]} completed (responder)" in lines


def test_an_initiation_that_cannot_be_answered_fails_without_a_response_or_session() -> None:
    # whitepaper §5.4.3 / wireguard-go CreateMessageResponse: a low-order ephemeral gives an all-zero DH: no response
    pair = TunnPair()
    forged = noise.ConsumedInitiation(public_key(pair.key_a), bytes(12), bytes(32), bytes(32), LOW_ORDER_POINT, 7)
    assert pair.b.receive_initiation(forged, 148, 0.0) is False
    assert pair.b.drops[TunnDropReason.HANDSHAKE_FAILED] == 1
    assert pair.b.drain_transmits() == []
    assert not pair.b.has_session


def test_a_response_while_our_own_answer_is_pending_keeps_that_keypair_as_previous_until_the_next_rotation() -> None:
    # wireguard-go BeginSymmetricSession (initiator): with a next keypair pending, next becomes previous and the
    # old previous goes; the rotation after that drops it, so the peer's index table never grows
    pair = TunnPair()
    pair.b.encapsulate(ipv4_packet(TUNNEL_B, TUNNEL_A), 0.0)
    (initiation_b,) = pair.b.drain_transmits()
    assert pair.a.decapsulate(initiation_b, 0.0) is None
    (lost_response,) = pair.a.drain_transmits()  # never reaches b
    pending_index = int.from_bytes(lost_response[4:8], "little")
    assert pair.a.keypair_for_index(pending_index) is not None
    pair.wall.now += 1.0
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 1.0)
    (initiation_a,) = pair.a.drain_transmits()
    assert initiation_a[0] == MESSAGE_INITIATION
    assert pair.b.decapsulate(initiation_a, 1.0) is None
    (response,) = pair.b.drain_transmits()
    assert pair.a.decapsulate(response, 1.0) is None
    assert pair.a.has_session
    assert pair.a.keypair_for_index(pending_index) is not None  # kept as previous
    pair.pump(1.0)
    assert pair.delivered["b"] == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    pair.wall.now += REKEY_AFTER_TIME + 1.0
    pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), REKEY_AFTER_TIME + 2.0)  # old enough: rekeys on send
    pair.pump(REKEY_AFTER_TIME + 2.0)
    assert pair.a.poll_event() == HandshakeCompleted(public_key(pair.key_b), True)
    assert pair.a.poll_event() == HandshakeCompleted(public_key(pair.key_b), True)
    assert pair.a.keypair_for_index(pending_index) is None


def test_packets_staged_during_an_attempt_run_leave_the_next_initiation_to_the_retransmit_timer() -> None:
    # timers.go: an initiation is retransmitted Rekey-Timeout plus jitter after the last; traffic staged meanwhile
    # (past Rekey-Timeout but before the jittered deadline) does not send another one (tunn.py keeps one run)
    rng = FixedJitterRng(0.5)
    table = IndexTable(rng)
    tunn = Tunn(SeededRng(4).random_bytes(32), public_key(SeededRng(5).random_bytes(32)), None, table, rng, WallClock())
    tunn.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
    assert [m[0] for m in tunn.drain_transmits()] == [MESSAGE_INITIATION]
    retransmit_at = tunn.poll_timeout()
    assert retransmit_at == pytest.approx(5.0 + 1 / 6)
    tunn.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B, b"more"), 5.1)
    assert tunn.drain_transmits() == []
    assert retransmit_at is not None
    tunn.handle_timeout(retransmit_at)
    assert [m[0] for m in tunn.drain_transmits()] == [MESSAGE_INITIATION]
    assert len(table) == 1  # the retry replaced the first attempt's index


def _initiation_from_a(pair: TunnPair, seed: int, now: float) -> tuple[bytes, noise.ConsumedInitiation]:
    """A fresh initiation from a's key (a later TAI64N timestamp), as b consumes it."""
    pair.wall.now += 1.0
    sender = Tunn(pair.key_a, public_key(pair.key_b), None, IndexTable(SeededRng(seed)), SeededRng(seed), pair.wall)
    sender.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), now)
    (initiation,) = sender.drain_transmits()
    b_private = pair.b._static_private
    assert b_private is not None
    consumed = noise.consume_initiation(
        static_private=b_private, static_public=public_key(pair.key_b), message=initiation
    )
    assert consumed is not None
    return initiation, consumed


def test_initiations_are_answered_at_most_every_twenty_milliseconds_with_mac2_once_a_cookie_is_held() -> None:
    # wireguard-go handshakeInitiationRate (50/s per peer), whitepaper §5.4.7 (mac2 = MAC(cookie, msg) for 120 s)
    pair = TunnPair()
    initiation, consumed = _initiation_from_a(pair, 30, 0.0)
    assert pair.b.receive_initiation(consumed, len(initiation), 0.0) is True
    (response,) = pair.b.drain_transmits()
    assert response[-16:] == bytes(16)  # no cookie yet: empty mac2
    # a under load answers the response with a cookie reply; b keeps the cookie
    checker = CookieChecker(public_key(pair.key_a), SeededRng(6))
    source = ("192.0.2.7", 51820)
    assert pair.b.decapsulate(checker.create_reply(response, source, 0.0), 0.0) is None
    assert pair.b.drops.total() == 0
    initiation, consumed = _initiation_from_a(pair, 31, 0.01)
    assert pair.b.receive_initiation(consumed, len(initiation), 0.01) is False
    assert pair.b.drops[TunnDropReason.INITIATION_FLOOD] == 1
    assert pair.b.drain_transmits() == []
    assert pair.b.receive_initiation(consumed, len(initiation), 0.03) is True
    (response,) = pair.b.drain_transmits()
    assert checker.check_mac2(response, source, 0.03)
