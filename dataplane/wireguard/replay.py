"""Anti-replay sliding window (RFC 6479 bitmap of 64-bit blocks; window (128 - 1) * 64 = 8128, as wireguard-go)."""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES

_BLOCK_BIT_LOG = 6
_BLOCK_BITS = 1 << _BLOCK_BIT_LOG
_RING_BLOCKS = 1 << 7
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS


class ReplayFilter:
    """Accepts each counter at most once, and none more than ``WINDOW_SIZE`` behind the highest seen.

    ``limit``: counters ``>= limit`` are always rejected (wireguard-go and the kernel use different limits).
    """

    __slots__ = ("_last", "_limit", "_ring")

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        self._limit = limit
        self._last = 0
        self._ring = [0] * _RING_BLOCKS

    def reset(self) -> None:
        self._last = 0
        self._ring = [0] * _RING_BLOCKS

    def validate(self, counter: int) -> bool:
        """Check ``counter`` and mark it seen; False for replays, too-old and over-limit counters."""
        if counter >= self._limit:
            return False
        ring = self._ring
        last = self._last
        if counter > last:
            # Moving forward: blocks entered now are cleared, and no bit above ``last`` was ever set in the block
            # ``last`` is in, so the counter's bit is free.
            block = counter >> _BLOCK_BIT_LOG
            current = last >> _BLOCK_BIT_LOG
            if block != current:
                diff = block - current
                if diff > _RING_BLOCKS:
                    diff = _RING_BLOCKS
                for i in range(current + 1, current + diff + 1):
                    ring[i & _BLOCK_MASK] = 0
            self._last = counter
            ring[block & _BLOCK_MASK] |= 1 << (counter & _BIT_MASK)
            return True
        if last - counter > WINDOW_SIZE:
            return False
        block = (counter >> _BLOCK_BIT_LOG) & _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[block]
        if old & bit:
            return False
        ring[block] = old | bit
        return True
