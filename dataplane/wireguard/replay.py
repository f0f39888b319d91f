"""Anti-replay sliding window (RFC 6479 bitmap of 64-bit blocks; window (128 - 1) * 64 = 8128, as wireguard-go)."""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES

BLOCK_BIT_LOG = 6  # a counter's block is ``counter >> BLOCK_BIT_LOG``; the transport fast path in tunn.py inlines it
_BLOCK_BIT_LOG = BLOCK_BIT_LOG
_BLOCK_BITS = 1 << _BLOCK_BIT_LOG
RING_BLOCKS = 1 << 7
_RING_BLOCKS = RING_BLOCKS
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS


class ReplayFilter:
    """Accepts each counter at most once, and none more than ``WINDOW_SIZE`` behind the highest seen.

    ``limit``: counters ``>= limit`` are always rejected (wireguard-go and the kernel use different limits).

    ``last``, ``limit`` and ``ring`` are public for the receive fast path in tunn.py, which handles the common case
    (a counter above ``last`` in ``last``'s block) inline: set the counter's bit in ``ring`` and store it in ``last``.
    Everything else goes through :meth:`validate`.
    """

    __slots__ = ("last", "limit", "ring")

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        self.limit = limit
        self.last = 0
        self.ring = [0] * _RING_BLOCKS

    def reset(self) -> None:
        self.last = 0
        self.ring[:] = [0] * _RING_BLOCKS

    def validate(self, counter: int) -> bool:
        """Check ``counter`` and mark it seen; False for replays, too-old and over-limit counters."""
        if counter >= self.limit:
            return False
        ring = self.ring
        last = self.last
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
            self.last = counter
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
