"""Reconnect backoff of the portal link, exactly as docs/protocol.md §1.7 (the reference wraps ``backon``).

Pure: no clock, no sleeping. ``next_delay()`` returns how long to wait before the next attempt, or ``None`` once the
total-delay budget would be exceeded (the caller then fails fatally). Jitter, when on, adds a uniform random share of
up to one more interval (``backon``: ``delay + delay * U[0, 1)``).

A portal ``Retry-After`` is obeyed as given and neither spends the budget nor climbs the ladder: Firezone's
phoenix-channel only consults its backoff when the refusal carries no ``Retry-After``, so a rate-limiting portal is
retried for as long as it keeps asking us to wait.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.base import Rng

INITIAL_CONNECT_INTERVAL = 1.0
INITIAL_CONNECT_MAX_ELAPSED = 15.0
RECONNECT_INITIAL_INTERVAL = 0.5
RECONNECT_MULTIPLIER = 1.5
RECONNECT_MAX_INTERVAL = 60.0
DEFAULT_MAX_PARTITION_TIME = 24 * 3600.0
# A Retry-After longer than a day is treated as a day: the value comes from the network and must stay a sane float.
MAX_RETRY_AFTER = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial_interval: float
    multiplier: float
    max_interval: float
    max_elapsed: float
    jitter: bool


def initial_connect_policy() -> BackoffPolicy:
    return BackoffPolicy(
        initial_interval=INITIAL_CONNECT_INTERVAL,
        multiplier=1.0,
        max_interval=INITIAL_CONNECT_INTERVAL,
        max_elapsed=INITIAL_CONNECT_MAX_ELAPSED,
        jitter=False,
    )


def reconnect_policy(max_partition_time: float = DEFAULT_MAX_PARTITION_TIME) -> BackoffPolicy:
    return BackoffPolicy(
        initial_interval=RECONNECT_INITIAL_INTERVAL,
        multiplier=RECONNECT_MULTIPLIER,
        max_interval=RECONNECT_MAX_INTERVAL,
        max_elapsed=max_partition_time,
        jitter=True,
    )


class Backoff:
    """One run of delays under a policy; ``reset()`` starts the ladder and the budget again."""

    def __init__(self, policy: BackoffPolicy, rng: Rng) -> None:
        if policy.initial_interval <= 0 or policy.multiplier < 1.0 or policy.max_elapsed < 0:
            raise ValueError(f"invalid backoff policy: {policy}")
        self.policy = policy
        self._rng = rng
        self._interval = policy.initial_interval
        self.elapsed = 0.0
        self.attempts = 0

    def reset(self) -> None:
        self._interval = self.policy.initial_interval
        self.elapsed = 0.0
        self.attempts = 0

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """The wait before the next attempt, or None when the budget is spent.

        ``retry_after`` (the portal's own wait) is returned as is, clamped to [0, MAX_RETRY_AFTER], and leaves the
        ladder and the budget untouched."""
        if retry_after is not None:
            return min(max(0.0, retry_after), MAX_RETRY_AFTER)
        base = min(self._interval, self.policy.max_interval)
        delay = base + base * self._rng.uniform(0.0, 1.0) if self.policy.jitter else base
        if self.elapsed + delay > self.policy.max_elapsed:
            return None
        self.elapsed += delay
        self.attempts += 1
        self._interval = min(self._interval * self.policy.multiplier, self.policy.max_interval)
        return delay
