"""agent/backoff.py: the §1.7 ladders, jitter bounds, budget exhaustion, Retry-After override."""

from __future__ import annotations

import pytest

from agent.backoff import MAX_RETRY_AFTER, Backoff, BackoffPolicy, initial_connect_policy, reconnect_policy
from dataplane.io.rng import SeededRng


class FixedRng:
    """Every uniform() draw returns the same fraction of the range, to pin jitter to its bounds."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def random_bytes(self, n: int) -> bytes:
        return bytes(n)

    def random_u32(self) -> int:
        return 0

    def random_u64(self) -> int:
        return 0

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.fraction


def drain(backoff: Backoff, limit: int = 100_000) -> list[float]:
    delays: list[float] = []
    while (delay := backoff.next_delay()) is not None and len(delays) < limit:
        delays.append(delay)
    return delays


def test_initial_connect_is_fifteen_one_second_waits_then_exhausted() -> None:
    backoff = Backoff(initial_connect_policy(), SeededRng(0))
    assert drain(backoff) == [1.0] * 15
    assert backoff.next_delay() is None
    assert backoff.elapsed == 15.0


def test_reconnect_ladder_without_jitter_share() -> None:
    backoff = Backoff(reconnect_policy(), FixedRng(0.0))
    delays = [backoff.next_delay() for _ in range(14)]
    expected = [0.5 * 1.5**i for i in range(12)]  # 0.5, 0.75, 1.125, ... 43.25
    assert delays[:12] == pytest.approx(expected)
    assert expected[-1] < 60.0 < 0.5 * 1.5**12
    assert delays[12:] == [60.0, 60.0]


def test_reconnect_jitter_adds_up_to_one_interval() -> None:
    low = Backoff(reconnect_policy(), FixedRng(0.0))
    high = Backoff(reconnect_policy(), FixedRng(0.999999))
    for _ in range(20):
        lo, hi = low.next_delay(), high.next_delay()
        assert lo is not None and hi is not None
        assert lo <= hi < 2 * lo


def test_seeded_jitter_stays_within_bounds() -> None:
    backoff = Backoff(reconnect_policy(), SeededRng(7))
    interval = 0.5
    seen = set()
    for _ in range(40):
        delay = backoff.next_delay()
        assert delay is not None
        assert interval <= delay < 2 * interval
        seen.add(round(delay / interval, 3))
        interval = min(interval * 1.5, 60.0)
    assert len(seen) > 10  # actually random, not a constant factor


def test_reconnect_budget_is_the_max_partition_time() -> None:
    backoff = Backoff(reconnect_policy(max_partition_time=300.0), FixedRng(0.0))
    delays = drain(backoff)
    assert sum(delays) <= 300.0
    assert sum(delays) + 60.0 > 300.0
    assert backoff.next_delay() is None


def test_default_budget_is_24_hours() -> None:
    backoff = Backoff(reconnect_policy(), FixedRng(0.999))
    total = sum(drain(backoff))
    assert 24 * 3600 - 120 < total <= 24 * 3600


def test_reset_restarts_ladder_and_budget() -> None:
    backoff = Backoff(reconnect_policy(max_partition_time=10.0), FixedRng(0.0))
    drain(backoff)
    assert backoff.next_delay() is None
    backoff.reset()
    assert backoff.next_delay() == 0.5
    assert backoff.elapsed == 0.5


def test_retry_after_overrides_the_ladder_without_spending_the_budget() -> None:
    backoff = Backoff(initial_connect_policy(), SeededRng(0))
    assert backoff.next_delay(retry_after=2.0) == 2.0
    assert backoff.next_delay(retry_after=0.0) == 0.0
    assert backoff.next_delay(retry_after=-3.0) == 0.0
    assert backoff.elapsed == 0.0
    assert backoff.next_delay(retry_after=14.0) == 14.0
    assert backoff.next_delay() == 1.0
    assert backoff.elapsed == 1.0


def test_a_rate_limiting_portal_is_retried_for_as_long_as_it_sends_retry_after() -> None:
    # Issue 8: 15 rate-limited answers in a row used to exhaust the 15 s first-connect budget and stop the gateway.
    backoff = Backoff(initial_connect_policy(), SeededRng(0))
    assert all(backoff.next_delay(retry_after=10.0) == 10.0 for _ in range(1000))
    assert backoff.attempts == 0
    # The ladder is where it was: 15 plain failures still fit in the budget.
    assert [backoff.next_delay() for _ in range(16)] == [1.0] * 15 + [None]


def test_an_absurd_retry_after_is_clamped_to_a_day() -> None:
    backoff = Backoff(reconnect_policy(), SeededRng(0))
    assert backoff.next_delay(retry_after=1e300) == MAX_RETRY_AFTER == 86400.0


def test_invalid_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        Backoff(BackoffPolicy(0.0, 1.5, 60.0, 10.0, True), SeededRng(0))
