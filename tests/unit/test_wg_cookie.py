"""Cookies, mac2, the under-load rule, the per-source rate limiter and a handshake flood (in memory)."""

from __future__ import annotations

import pytest

from dataplane.io.rng import SeededRng
from dataplane.wireguard.constants import MESSAGE_COOKIE_REPLY, MESSAGE_INITIATION
from dataplane.wireguard.cookie import CookieChecker, CookieGenerator, source_bytes
from dataplane.wireguard.crypto import mac, public_key
from dataplane.wireguard.device import Device, DropReason
from dataplane.wireguard.ratelimit import RateLimiter
from dataplane.wireguard.tunn import HandshakeCompleted

from .test_wg_device import ADDRESS_A, TUNNEL_A, TUNNEL_B, Pair, events, ipv4_packet


def test_under_load_initiation_without_mac2_gets_cookie_and_retry_with_mac2_succeeds() -> None:
    pair = Pair()
    pair.b.force_under_load = True
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    pair.pump()
    assert pair.b.drain_packets() == []
    assert pair.b.drops[DropReason.COOKIE_REQUIRED] == 1
    replies = [m for m in pair.sent["b->a"] if m[0] == MESSAGE_COOKIE_REPLY]
    assert len(replies) == 1 and len(replies[0]) == 64
    assert pair.peer_b.tunn._cookies.has_cookie
    # the retry (after Rekey-Timeout) carries mac2 and completes the handshake although B is still under load
    pair.run_until(6.0)
    assert pair.b.drain_packets() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    assert pair.b.drops[DropReason.COOKIE_REQUIRED] == 1
    initiations = [m for m in pair.sent["a->b"] if m[0] == MESSAGE_INITIATION]
    assert initiations[0][-16:] == bytes(16) and initiations[1][-16:] != bytes(16)


def test_mac2_is_bound_to_the_source_address() -> None:
    responder_public = public_key(SeededRng(5).random_bytes(32))
    checker = CookieChecker(responder_public, SeededRng(6))
    generator = CookieGenerator(responder_public)
    message = generator.add_macs(bytes(116), 0.0)
    reply = checker.create_reply(message, ("192.0.2.9", 1000), 0.0)
    assert reply[:4] == b"\x03\x00\x00\x00" and len(reply) == 64
    assert generator.consume_reply(reply, 1.0)
    assert not generator.consume_reply(reply, 1.0)  # only one reply per message sent
    signed = generator.add_macs(bytes(116), 2.0)
    assert checker.check_mac2(signed, ("192.0.2.9", 1000), 2.0)
    assert not checker.check_mac2(signed, ("192.0.2.9", 1001), 2.0)
    assert not checker.check_mac2(signed, ("192.0.2.10", 1000), 2.0)


def test_cookie_reply_must_answer_our_last_message() -> None:
    responder_public = public_key(SeededRng(5).random_bytes(32))
    checker = CookieChecker(responder_public, SeededRng(6))
    generator = CookieGenerator(responder_public)
    first = generator.add_macs(bytes(116), 0.0)
    generator.add_macs(b"\x01" * 116, 0.0)
    assert not generator.consume_reply(checker.create_reply(first, ("192.0.2.9", 1), 0.0), 0.0)


def test_cookie_secret_rotates_every_120_seconds() -> None:
    responder_public = public_key(SeededRng(5).random_bytes(32))
    checker = CookieChecker(responder_public, SeededRng(6))
    source = ("2001:db8::1", 51820)
    at_start = checker._cookie(source, 0.0)
    assert checker._cookie(source, 119.9) == at_start
    rotated = checker._cookie(source, 120.0)
    assert rotated != at_start
    assert checker._cookie(source, 239.9) == rotated
    # a mac2 computed with the old cookie no longer passes
    message = bytes(132)
    assert not checker.check_mac2(message + mac(at_start, message), source, 120.0)
    assert checker.check_mac2(message + mac(rotated, message), source, 120.0)


def test_cookie_expires_for_the_initiator_after_120_seconds() -> None:
    responder_public = public_key(SeededRng(5).random_bytes(32))
    checker = CookieChecker(responder_public, SeededRng(6))
    generator = CookieGenerator(responder_public)
    message = generator.add_macs(bytes(116), 0.0)
    assert generator.consume_reply(checker.create_reply(message, ("192.0.2.1", 1), 0.0), 0.0)
    assert generator.add_macs(bytes(116), 119.0)[-16:] != bytes(16)
    assert generator.add_macs(bytes(116), 120.0)[-16:] == bytes(16)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (time, source) -> allowed; 20/s, burst 5
        ([(0.0, "a")] * 6, [True] * 5 + [False]),
        ([(0.0, "a")] * 5 + [(0.049, "a"), (0.05, "a"), (0.05, "a")], [True] * 5 + [False, True, False]),
        ([(0.0, "a")] * 5 + [(0.0, "b")] * 5, [True] * 10),
        ([(0.0, "a")] * 5 + [(10.0, "a")] * 6, [True] * 5 + [True] * 5 + [False]),
        ([(0.0, "2001:db8::1")] * 5 + [(0.0, "2001:db8::2"), (0.0, "2001:db8:0:1::1")], [True] * 5 + [False, True]),
    ],
)
def test_rate_limiter_table(steps: list[tuple[float, str]], expected: list[bool]) -> None:
    limiter = RateLimiter()
    assert [limiter.allow(source, now) for now, source in steps] == expected


def test_rate_limiter_with_ports_keeps_one_bucket_per_endpoint() -> None:
    limiter = RateLimiter()
    ports = range(40000, 40010)
    assert all(limiter.allow("198.51.100.7", 0.0, port) for port in ports for _ in range(5))  # ten NATed clients
    assert not any(limiter.allow("198.51.100.7", 0.0, port) for port in ports)  # each one's burst is spent
    assert limiter.allow("198.51.100.7", 0.0)  # the address alone is a bucket of its own
    v6 = [limiter.allow("2001:db8::1", 0.0, 5000) for _ in range(6)] + [limiter.allow("2001:db8::2", 0.0, 5000)]
    assert v6 == [True] * 5 + [False, False]  # IPv6 still per /64, then per port


def test_rate_limiter_refuses_new_sources_while_its_table_is_full() -> None:
    limiter = RateLimiter(max_sources=3)
    assert all(limiter.allow("198.51.100.7", 0.0, port) for port in (1, 2, 3))
    assert not limiter.allow("198.51.100.7", 0.0, 4)  # a fourth source waits
    assert limiter.allow("198.51.100.7", 0.0, 1)  # known ones keep their buckets
    assert len(limiter) == 3
    assert limiter.allow("198.51.100.7", 2.5, 4)  # a second later the idle ones are forgotten


def test_rate_limiter_forgets_idle_sources() -> None:
    limiter = RateLimiter()
    for i in range(100):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
    limiter.allow("10.1.0.1", 2.5)
    assert len(limiter) == 1


def test_under_load_follows_handshake_rate_with_one_second_hysteresis() -> None:
    device = Device(
        rng=SeededRng(1), wall_clock=lambda: 0.0, private_key=SeededRng(2).random_bytes(32), under_load_threshold=10
    )
    assert device.public_key is not None
    generator = CookieGenerator(device.public_key)
    # all-zero ephemeral keys: valid mac1, but the handshake cannot authenticate
    garbage = [(generator.add_macs(b"\x01\x00\x00\x00" + bytes(112), 0.0), ("192.0.2.1", 1)) for i in range(11)]
    device.receive_datagrams(garbage[:10], 0.0)
    assert not device.is_under_load(0.0)
    assert device.drops[DropReason.HANDSHAKE_FAILED] == 10
    device.receive_datagrams(garbage[10:], 0.5)
    assert device.is_under_load(0.5) and device.is_under_load(1.49)
    assert not device.is_under_load(1.5)
    assert device.drops[DropReason.COOKIE_REQUIRED] == 1


@pytest.mark.timeout(120)
def test_flood_of_initiations_switches_to_cookies_and_a_legitimate_peer_still_connects() -> None:
    pair = Pair()
    responder = pair.b
    assert responder.public_key is not None
    generator = CookieGenerator(responder.public_key)
    junk = SeededRng(99)
    flood_total = 20_000
    per_tick = 50
    tick = 0.02  # 2,500 initiations per second for 8 s
    sent = 0
    cookie_replies = 0
    legit_started = False
    while sent < flood_total:
        batch = []
        for _ in range(per_tick):
            body = b"\x01\x00\x00\x00" + junk.random_bytes(112)
            source = (f"10.{(sent >> 16) & 255}.{(sent >> 8) & 255}.{sent & 255}", 1024 + sent % 50000)
            batch.append((generator.add_macs(body, pair.now), source))
            sent += 1
        responder.receive_datagrams(batch, pair.now)
        cookie_replies += sum(1 for t in responder.drain_transmits() if t.payload[0] == MESSAGE_COOKIE_REPLY)
        if not legit_started and pair.now >= 1.0:
            legit_started = True
            pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"during the flood")], pair.now)
        pair.a.handle_timeout(pair.now)
        pair.pump()
        pair.advance(tick)
    assert responder.is_under_load(pair.now - tick)
    assert cookie_replies > flood_total * 0.7
    assert responder.drops[DropReason.COOKIE_REQUIRED] >= cookie_replies
    assert HandshakeCompleted(pair.a.public_key or b"", False) in events(responder)
    assert responder.drain_packets() == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"during the flood")]
    assert pair.peer_a.endpoint == ADDRESS_A


def test_under_load_valid_mac2_still_passes_the_per_source_rate_limiter() -> None:
    pair = Pair()
    pair.b.force_under_load = True
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    pair.pump()  # initiation -> cookie reply; A now holds a cookie
    tunn = pair.peer_b.tunn
    initiations = []
    for _ in range(7):
        pair.wall.now += 0.1  # newer TAI64N timestamps, so only the rate rules can reject them
        tunn._last_sent_handshake = None
        tunn._timers.retransmit_handshake = None
        tunn._send_handshake_initiation(False, 1.0)
        initiations.extend(tunn.drain_transmits())
    assert all(m[-16:] != bytes(16) for m in initiations)
    pair.b.receive_datagrams([(m, ADDRESS_A) for m in initiations], 1.0)
    assert pair.b.drops[DropReason.RATE_LIMITED] == 2
    assert pair.b.drops[DropReason.COOKIE_REQUIRED] == 1
    # the first passed and was answered; the next four passed the limiter but came within 20 ms of it
    assert pair.b.drops[DropReason.INITIATION_FLOOD] == 4
    assert len(pair.b.drain_transmits()) == 1


@pytest.mark.parametrize("host", ["192.0.2.1", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::ffff:192.0.2.1"])
def test_cookie_source_bytes_are_the_packed_address_and_port(host: str) -> None:
    import ipaddress

    assert source_bytes((host, 51820)) == ipaddress.ip_address(host).packed + (51820).to_bytes(2, "big")


def test_cookie_source_bytes_never_raise_on_odd_hosts() -> None:
    assert source_bytes(("1.2.3.999", 1)) != source_bytes(("1.2.3.99", 1))
    assert source_bytes(("not-an-ip", 1)) == b"not-an-ip\x00\x01"
