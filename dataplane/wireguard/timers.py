"""Per-peer WireGuard timers as deadlines (monotonic seconds), named after wireguard-go's timer hooks.

The hooks only move deadlines; :class:`dataplane.wireguard.tunn.Tunn` acts when a deadline passes.
"""

from __future__ import annotations

from dataplane.base import Rng

from .constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX, ZERO_KEYS_AFTER


class PeerTimers:
    __slots__ = (
        "handshake_started",
        "need_another_keepalive",
        "new_handshake",
        "persistent_keepalive",
        "persistent_keepalive_interval",
        "retransmit_handshake",
        "rng",
        "send_keepalive",
        "zero_key_material",
    )

    def __init__(self, rng: Rng) -> None:
        self.rng = rng
        self.retransmit_handshake: float | None = None
        self.send_keepalive: float | None = None
        self.new_handshake: float | None = None
        self.zero_key_material: float | None = None
        self.persistent_keepalive: float | None = None
        self.persistent_keepalive_interval = 0
        self.need_another_keepalive = False
        # When the current run of initiations began; Rekey-Attempt-Time counts from here.
        self.handshake_started: float | None = None

    def jitter(self) -> float:
        return self.rng.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (
                self.retransmit_handshake,
                self.send_keepalive,
                self.new_handshake,
                self.zero_key_material,
                self.persistent_keepalive,
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def stop_all(self) -> None:
        self.retransmit_handshake = None
        self.send_keepalive = None
        self.new_handshake = None
        self.zero_key_material = None
        self.persistent_keepalive = None
        self.need_another_keepalive = False
        self.handshake_started = None

    # --- hooks (wireguard-go device/timers.go) ---

    def data_sent(self, now: float) -> None:
        """Expect an authenticated reply within Keepalive-Timeout + Rekey-Timeout, else start a new handshake."""
        if self.new_handshake is None:
            self.new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self.jitter()

    def data_received(self, now: float) -> None:
        if self.send_keepalive is None:
            self.send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self, now: float) -> None:
        self.send_keepalive = None

    def any_authenticated_packet_received(self, now: float) -> None:
        self.new_handshake = None

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive = now + self.persistent_keepalive_interval

    def handshake_initiated(self, now: float) -> None:
        if self.handshake_started is None:
            self.handshake_started = now
        self.retransmit_handshake = now + REKEY_TIMEOUT + self.jitter()

    def handshake_complete(self, now: float) -> None:
        self.retransmit_handshake = None
        self.handshake_started = None

    def session_derived(self, now: float) -> None:
        self.zero_key_material = now + ZERO_KEYS_AFTER
