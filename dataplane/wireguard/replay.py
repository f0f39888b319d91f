"""Anti-replay sliding window (RFC 6479 bitmap of 64-bit blocks; window (128 - 1) * 64 = 8128, as wireguard-go)."""

from __future__ import annotations

from array import array
from collections.abc import MutableSequence

from .constants import REJECT_AFTER_MESSAGES

BLOCK_BIT_LOG = 6  # a counter's block is ``counter >> BLOCK_BIT_LOG``; accept_transport_run's pure twin inlines it
_BLOCK_BIT_LOG = BLOCK_BIT_LOG
_BLOCK_BITS = 1 << _BLOCK_BIT_LOG
RING_BLOCKS = 1 << 7
_RING_BLOCKS = RING_BLOCKS
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS


def new_ring() -> array[int]:
    """An empty bitmap: ``RING_BLOCKS`` 64-bit blocks (an array, so that the C receive path can update it in place)."""
    return array("Q", bytes(8 * _RING_BLOCKS))


def replay_accept(ring: MutableSequence[int], last: int, limit: int, counter: int) -> int:
    """Checks ``counter`` against the bitmap ``ring`` whose highest counter is ``last`` and marks it seen: the new
    highest counter, or -1 for a replay, a counter too old, or one at or over ``limit`` (``ring`` then unchanged)."""
    if counter >= limit:
        return -1
    if counter > last:
        # Moving forward: blocks entered now are cleared, and no bit above ``last`` was ever set in the block ``last``
        # is in, so the counter's bit is free.
        block = counter >> _BLOCK_BIT_LOG
        current = last >> _BLOCK_BIT_LOG
        if block != current:
            diff = block - current
            if diff > _RING_BLOCKS:
                diff = _RING_BLOCKS
            for i in range(current + 1, current + diff + 1):
                ring[i & _BLOCK_MASK] = 0
        ring[block & _BLOCK_MASK] |= 1 << (counter & _BIT_MASK)
        return counter
    if last - counter > WINDOW_SIZE:
        return -1
    block = (counter >> _BLOCK_BIT_LOG) & _BLOCK_MASK
    bit = 1 << (counter & _BIT_MASK)
    old = ring[block]
    if old & bit:
        return -1
    ring[block] = old | bit
    return last


class ReplayFilter:
    """Accepts each counter at most once, and none more than ``WINDOW_SIZE`` behind the highest seen.

    ``limit``: counters ``>= limit`` are always rejected (wireguard-go and the kernel use different limits).

    ``last``, ``limit`` and ``ring`` are public for the receive path in tunn.py, which checks a whole run of messages
    at once (``dataplane.native.accept_transport_run``) and stores the new ``last``.
    """

    __slots__ = ("last", "limit", "ring")

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        self.limit = limit
        self.last = 0
        self.ring = new_ring()

    def reset(self) -> None:
        self.last = 0
        self.ring[:] = new_ring()

    def validate(self, counter: int) -> bool:
        """Check ``counter`` and mark it seen; False for replays, too-old and over-limit counters."""
        last = replay_accept(self.ring, self.last, self.limit, counter)
        if last < 0:
            return False
        self.last = last
        return True
