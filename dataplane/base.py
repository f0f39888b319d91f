"""Small types shared by every sans-IO state machine.

The state machines never read the clock or draw randomness themselves (design.md §3): time comes in as ``now``
(monotonic seconds) and randomness through an injected :class:`Rng`, so tests can replay timelines exactly.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Protocol, TypeVar

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


class Rng(Protocol):
    """Randomness as the state machines need it. Production: ``dataplane.io.rng.SystemRng``; tests: ``SeededRng``."""

    def random_bytes(self, n: int) -> bytes: ...

    def random_u32(self) -> int: ...

    def random_u64(self) -> int: ...

    def uniform(self, low: float, high: float) -> float: ...


class WallClock(Protocol):
    """Wall-clock time (unix seconds) for the few rules that need it: TAI64N timestamps and portal expiries."""

    def __call__(self) -> float: ...


def evict_oldest(table: dict[_Key, _Value], count: int) -> None:
    """Deletes the ``count`` oldest entries of an insertion-ordered dict, in one pass.

    For a bounded cache under churn, evict in batches: ``del d[next(iter(d))]`` per insert rescans the deleted slots
    that earlier evictions left at the front of the dict until it is next rebuilt, about 9 µs per eviction at 4,096
    entries and 100 µs at 65,536; a batch pays that scan once per ``count`` inserts."""
    for key in list(itertools.islice(table, count)):
        del table[key]


class DropCounter:
    """Counts dropped input by reason; the hot path increments, ``/metrics`` and tests read."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def drop(self, reason: enum.Enum, count: int = 1) -> None:
        self.counts[reason.value if isinstance(reason.value, str) else reason.name.lower()] += count

    def __getitem__(self, reason: enum.Enum | str) -> int:
        if isinstance(reason, enum.Enum):
            key = reason.value if isinstance(reason.value, str) else reason.name.lower()
        else:
            key = reason
        return self.counts[key]

    def total(self) -> int:
        return sum(self.counts.values())


Address = tuple[str, int]
"""A UDP endpoint as (ip, port); IPv6 addresses without brackets or scope."""


@dataclass(frozen=True, slots=True)
class Transmit:
    """One datagram a state machine wants sent: from local ``src`` (None = any socket of that family) to ``dst``."""

    dst: Address
    payload: bytes
    src: Address | None = None
