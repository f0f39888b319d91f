"""Implementations of :class:`dataplane.base.Rng`."""

from __future__ import annotations

import random
import secrets


class SystemRng:
    """Cryptographically strong randomness for production."""

    def random_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)

    def random_u32(self) -> int:
        return secrets.randbits(32)

    def random_u64(self) -> int:
        return secrets.randbits(64)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * (secrets.randbits(53) / (1 << 53))


class SeededRng:
    """Deterministic randomness for tests and simulations. Never use it for keys in production."""

    def __init__(self, seed: int = 0) -> None:
        self._random = random.Random(seed)

    def random_bytes(self, n: int) -> bytes:
        return self._random.randbytes(n)

    def random_u32(self) -> int:
        return self._random.getrandbits(32)

    def random_u64(self) -> int:
        return self._random.getrandbits(64)

    def uniform(self, low: float, high: float) -> float:
        return self._random.uniform(low, high)
