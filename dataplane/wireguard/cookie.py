"""mac1/mac2 and cookie replies (whitepaper §5.4.4, §5.4.7).

:class:`CookieChecker` is the responder side (one per device static key); :class:`CookieGenerator` is the initiator
side (one per peer): it adds the MACs to our handshake messages and keeps the cookie a peer sent us.
"""

from __future__ import annotations

import hmac
import ipaddress

from dataplane.base import Address, Rng

from .constants import (
    COOKIE_NONCE_SIZE,
    COOKIE_REFRESH_TIME,
    KEY_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
)
from .crypto import blake2s_hash, mac, xaead_decrypt, xaead_encrypt

_ZERO_MAC = bytes(MAC_SIZE)


def mac1_key(static_public: bytes) -> bytes:
    return blake2s_hash(LABEL_MAC1, static_public)


def cookie_key(static_public: bytes) -> bytes:
    return blake2s_hash(LABEL_COOKIE, static_public)


def source_bytes(source: Address) -> bytes:
    """What a cookie binds to: the source IP and port (IPv4 parsed without ``ipaddress``: this runs per datagram
    under load)."""
    host = source[0]
    packed: bytes | None = None
    if ":" not in host:
        try:
            packed = bytes(int(part) for part in host.split("."))
        except ValueError:
            packed = None
        if packed is not None and len(packed) != 4:
            packed = None
    if packed is None:
        try:
            packed = ipaddress.ip_address(host).packed
        except ValueError:
            packed = host.encode()
    return packed + (source[1] & 0xFFFF).to_bytes(2, "big")


class CookieChecker:
    """Verifies mac1 (always) and mac2 (under load) of messages to us, and creates cookie replies."""

    def __init__(self, static_public: bytes, rng: Rng) -> None:
        self._mac1_key = mac1_key(static_public)
        self._cookie_key = cookie_key(static_public)
        self._rng = rng
        # The secret and when it was drawn: drawn at first use, again once it is Cookie-Refresh-Time old.
        self._secret: tuple[bytes, float] | None = None
        # check_mac2 and then create_reply ask for the same source's cookie: the last (source, cookie) is kept.
        self._last: tuple[Address, bytes] | None = None

    def check_mac1(self, message: bytes) -> bool:
        """``message`` is a full initiation or response; mac1 covers everything before it."""
        end = len(message) - 2 * MAC_SIZE
        return hmac.compare_digest(mac(self._mac1_key, message[:end]), message[end : end + MAC_SIZE])

    def _cookie(self, source: Address, now: float) -> bytes:
        secret = self._secret
        if secret is None or now - secret[1] >= COOKIE_REFRESH_TIME:
            secret = (self._rng.random_bytes(KEY_SIZE), now)
            self._secret = secret
            self._last = None
        last = self._last
        if last is not None and last[0] == source:
            return last[1]
        cookie = mac(secret[0], source_bytes(source))
        self._last = (source, cookie)
        return cookie

    def check_mac2(self, message: bytes, source: Address, now: float) -> bool:
        end = len(message) - MAC_SIZE
        expected = mac(self._cookie(source, now), message[:end])
        return hmac.compare_digest(expected, message[end:])

    def create_reply(self, message: bytes, source: Address, now: float) -> bytes:
        """A cookie reply (type 3) to ``message``, addressed to its sender index."""
        end = len(message) - 2 * MAC_SIZE
        received_mac1 = message[end : end + MAC_SIZE]
        nonce = self._rng.random_bytes(COOKIE_NONCE_SIZE)
        encrypted = xaead_encrypt(self._cookie_key, nonce, self._cookie(source, now), received_mac1)
        return MESSAGE_COOKIE_REPLY.to_bytes(4, "little") + message[4:8] + nonce + encrypted


class CookieGenerator:
    """Adds mac1/mac2 to the handshake messages we send to one peer; stores the cookies that peer replies with."""

    def __init__(self, peer_public: bytes) -> None:
        self._mac1_key = mac1_key(peer_public)
        self._cookie_key = cookie_key(peer_public)
        # The cookie the peer last sent and when it arrived; mac2 uses it for Cookie-Refresh-Time.
        self._cookie: tuple[bytes, float] | None = None
        self._last_mac1: bytes | None = None

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None

    def add_macs(self, body: bytes, now: float) -> bytes:
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        message = body + mac1
        cookie = self._cookie
        if cookie is not None and now - cookie[1] < COOKIE_REFRESH_TIME:
            return message + mac(cookie[0], message)
        return message + _ZERO_MAC

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Accept a cookie reply to the last message we sent; False when it does not authenticate."""
        if self._last_mac1 is None or len(reply) != MESSAGE_COOKIE_REPLY_SIZE:
            return False
        # type and receiver index (8 bytes), nonce, encrypted cookie
        nonce_end = 8 + COOKIE_NONCE_SIZE
        cookie = xaead_decrypt(self._cookie_key, reply[8:nonce_end], reply[nonce_end:], self._last_mac1)
        if cookie is None:
            return False
        self._cookie = (cookie, now)
        self._last_mac1 = None
        return True
