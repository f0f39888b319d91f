"""Firezone's ICE timing profiles (docs/protocol.md §4.3), expressed as STUN retransmission ladders.

A ladder follows str0m's rule, which Firezone configures: after the k-th transmission of a check the agent waits
``min(initial_rto * 2^(k-1), max_rto)``, and a pair without any answer is given up ``timeout`` seconds after its first
transmission, where ``timeout = sum(delay(k) for k in 2..N) + delay(N)`` (N = ``max_retransmits``). That reproduces the
published figures: server 615.5 s, server idle 1000 s, client 16.5 s, client idle 100 s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dataplane.stun import RetransmitPolicy


@dataclass(frozen=True, slots=True)
class StunTiming:
    max_retransmits: int
    initial_rto: float
    max_rto: float

    def __post_init__(self) -> None:
        if self.max_retransmits < 1 or self.initial_rto <= 0 or self.max_rto < self.initial_rto:
            raise ValueError(f"inconsistent STUN timing {self}")

    def resend_delay(self, send_count: int) -> float:
        """How long to wait after the ``send_count``-th transmission (1-based) before the next one."""
        if send_count <= 0:
            return 0.0
        exponent = min(send_count - 1, self.max_retransmits, 62)
        return min(self.initial_rto * (1 << exponent), self.max_rto)

    @property
    def timeout(self) -> float:
        """Seconds from a pair's first unanswered check until the pair is given up."""
        return sum(self.resend_delay(k) for k in range(2, self.max_retransmits + 1)) + self.resend_delay(
            self.max_retransmits
        )

    @property
    def retransmit_policy(self) -> RetransmitPolicy:
        """The same ladder as the STUN module's policy, so checks reuse :class:`dataplane.stun.Transaction`."""
        return _retransmit_policy(self)


@functools.lru_cache(maxsize=16)
def _retransmit_policy(timing: StunTiming) -> RetransmitPolicy:
    # Built once per profile: every connectivity check asks for it, and ``timeout`` sums the whole ladder.
    return RetransmitPolicy(
        initial_rto=timing.initial_rto,
        max_rto=timing.max_rto,
        backoff=2.0,
        max_transmissions=timing.max_retransmits + 1,
        max_elapsed=timing.timeout,
    )


@dataclass(frozen=True, slots=True)
class IceTimingProfile:
    """Everything time-related the agent does, for one side of a connection."""

    active: StunTiming
    idle: StunTiming
    idle_after: float = 20.0  # seconds without activity (see IceAgent.note_activity) before switching to ``idle``
    pacing_interval: float = 0.05  # RFC 8445 Ta: one new check per Ta
    consent_interval: float = 5.0  # RFC 7675 §5.1, randomized by 0.8..1.2
    consent_timeout: float = 30.0  # RFC 7675 §5.1: consent lost this long after the last success
    # Dead-path detection (controlling side). RFC 7675's timeout is when a peer must *stop* sending; nothing stops
    # the controlling agent from moving to another working pair long before. Once the selected pair has stayed
    # silent for ``suspect_after`` seconds after something was sent on it (data, or a consent check), every succeeded
    # pair is probed with a fast ladder; if the selected pair does not answer within ``probe_timeout`` while another
    # pair does, that one is nominated. Rounds repeat while the selected pair stays silent, backing off from
    # ``suspect_after`` to ``consent_interval``.
    suspect_after: float = 1.0
    probe_rto: float = 0.15  # first retransmit of a probe; then 0.25 s apart
    probe_max_rto: float = 0.25
    probe_timeout: float = 1.0

    @property
    def probe_policy(self) -> RetransmitPolicy:
        """The probes' ladder: sends at 0, 0.15, 0.4, 0.65, 0.9 s, given up at 1 s (with the defaults)."""
        return RetransmitPolicy(
            initial_rto=self.probe_rto, max_rto=self.probe_max_rto, backoff=2.0, max_elapsed=self.probe_timeout
        )


SERVER_ACTIVE_TIMING = StunTiming(max_retransmits=45, initial_rto=0.25, max_rto=15.0)
SERVER_IDLE_TIMING = StunTiming(max_retransmits=40, initial_rto=25.0, max_rto=25.0)
CLIENT_ACTIVE_TIMING = StunTiming(max_retransmits=12, initial_rto=0.25, max_rto=1.5)
CLIENT_IDLE_TIMING = StunTiming(max_retransmits=4, initial_rto=25.0, max_rto=25.0)

SERVER_PROFILE = IceTimingProfile(active=SERVER_ACTIVE_TIMING, idle=SERVER_IDLE_TIMING)
"""The gateway's profile (ICE controlled)."""

CLIENT_PROFILE = IceTimingProfile(active=CLIENT_ACTIVE_TIMING, idle=CLIENT_IDLE_TIMING)
"""The client's profile (ICE controlling), used by the lab client."""
