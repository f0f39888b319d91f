"""WireGuard protocol constants (whitepaper §6; values as in wireguard-go device/constants.go, docs/protocol.md §F)."""

from __future__ import annotations

from typing import Final

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

MESSAGE_INITIATION: Final = 1
MESSAGE_RESPONSE: Final = 2
MESSAGE_COOKIE_REPLY: Final = 3
MESSAGE_TRANSPORT: Final = 4

MESSAGE_INITIATION_SIZE: Final = 148
MESSAGE_RESPONSE_SIZE: Final = 92
MESSAGE_COOKIE_REPLY_SIZE: Final = 64
MESSAGE_TRANSPORT_HEADER_SIZE: Final = 16
MESSAGE_TRANSPORT_MIN_SIZE: Final = 32  # header + Poly1305 tag: a keepalive

KEY_SIZE: Final = 32
MAC_SIZE: Final = 16
TAG_SIZE: Final = 16
TIMESTAMP_SIZE: Final = 12
COOKIE_NONCE_SIZE: Final = 24
PADDING_MULTIPLE: Final = 16

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REJECT_AFTER_MESSAGES_KERNEL: Final = (1 << 64) - 1 - 8128 - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
REKEY_TIMEOUT_JITTER_MAX: Final = 1.0 / 3.0  # wireguard-go: up to HZ/3 = 334 ms
KEEPALIVE_TIMEOUT: Final = 10.0
# The initiator rekeys on receive once its keys are this old, so a new session exists before Reject-After-Time.
REKEY_ON_RECEIVE_AGE: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
ZERO_KEYS_AFTER: Final = REJECT_AFTER_TIME * 3
HANDSHAKE_INITIATION_RATE: Final = 1.0 / 50.0  # at most one consumed initiation per peer every 20 ms

COOKIE_REFRESH_TIME: Final = 120.0  # COOKIE_SECRET_MAX_AGE
COOKIE_SECRET_LATENCY: Final = 5.0

RATELIMIT_PACKETS_PER_SECOND: Final = 20
RATELIMIT_BURST: Final = 5
RATELIMIT_GC_INTERVAL: Final = 1.0
# Sources tracked at once (each proved its address with a cookie within the last second); beyond, new ones wait.
RATELIMIT_MAX_SOURCES: Final = 65536

# Under load: more than this many handshake messages within one second, sticky for UNDER_LOAD_AFTER_TIME.
UNDER_LOAD_HANDSHAKES_PER_SECOND: Final = 512
UNDER_LOAD_AFTER_TIME: Final = 1.0
# A receive queue 1/8 full means the reader is falling behind (wireguard-go: its handshake queue 4096/8 = 512 full).
UNDER_LOAD_QUEUE_FRACTION: Final = 8

REPLAY_WINDOW_SIZE: Final = 8128
MAX_STAGED_PACKETS: Final = 128
MAX_PEERS: Final = 1 << 16

# wireguard-go's default interface MTU. Padding never grows a packet past the tunnel MTU, so the encrypted datagram
# stays within the underlay's MTU (1420 + 32 + 48 for IPv6/UDP = 1500).
DEFAULT_MTU = 1420
