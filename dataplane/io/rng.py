"""Implementations of :class:`dataplane.base.Rng`."""

from __future__ import annotations

import random
import secrets


class SystemRng:
    """Randomness for production: cryptographically strong for keys, indices and transaction ids; ``uniform`` (timer,
    consent and backoff jitter) from a PRNG seeded from the system once.

    Jitter needs no secrecy (wireguard-go draws it from ``fastrandn``), and the WireGuard timers draw it on every send
    batch: a getrandom(2) syscall each time showed up in profiles under load and in every lone packet's path.
    """

    def __init__(self) -> None:
        self._jitter = random.Random(secrets.randbits(64))

    def random_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)

    def random_u32(self) -> int:
        return secrets.randbits(32)

    def random_u64(self) -> int:
        return secrets.randbits(64)

    def uniform(self, low: float, high: float) -> float:
        return self._jitter.uniform(low, high)


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
