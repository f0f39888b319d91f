"""Per-source token bucket for handshake messages under load (wireguard-go ratelimiter: 20/s, burst 5).

IPv4 sources are limited per address, IPv6 per /64; with a ``port``, per endpoint (the gateway's Node: a proven mac2
answers for an address and port, and a thousand clients behind one office NAT share an address). Unlike wireguard-go,
a full bucket admits ``burst`` messages at the same instant (``>=`` rather than ``>``), since a fake clock has no
nanoseconds passing between calls, and the table is bounded: sources idle for a second are forgotten (as in
wireguard-go), and while ``max_sources`` are being tracked a new one is refused.
"""

from __future__ import annotations

import ipaddress

from .constants import RATELIMIT_BURST, RATELIMIT_GC_INTERVAL, RATELIMIT_MAX_SOURCES, RATELIMIT_PACKETS_PER_SECOND

_NS = 1_000_000_000


class RateLimiter:
    def __init__(
        self,
        packets_per_second: int = RATELIMIT_PACKETS_PER_SECOND,
        burst: int = RATELIMIT_BURST,
        max_sources: int = RATELIMIT_MAX_SOURCES,
    ) -> None:
        self._cost = _NS // packets_per_second
        self._max_sources = max_sources
        self._max_tokens = self._cost * burst
        # key -> [tokens (ns), last update (ns)]
        self._entries: dict[bytes | str | tuple[bytes | str, int], list[int]] = {}
        self._last_gc = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(ip: str) -> bytes | str:
        if ":" not in ip:
            return ip
        try:
            return ipaddress.IPv6Address(ip.split("%", 1)[0]).packed[:8]
        except ValueError:
            return ip

    def allow(self, ip: str, now: float, port: int | None = None) -> bool:
        now_ns = int(now * _NS)
        if now_ns - self._last_gc >= RATELIMIT_GC_INTERVAL * _NS:
            self._collect(now_ns)
        key = self._key(ip) if port is None else (self._key(ip), port)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._max_sources:
                return False
            self._entries[key] = [self._max_tokens - self._cost, now_ns]
            return True
        tokens = min(entry[0] + max(now_ns - entry[1], 0), self._max_tokens)
        entry[1] = now_ns
        if tokens >= self._cost:
            entry[0] = tokens - self._cost
            return True
        entry[0] = tokens
        return False

    def _collect(self, now_ns: int) -> None:
        self._last_gc = now_ns
        horizon = now_ns - int(RATELIMIT_GC_INTERVAL * _NS)
        stale = [key for key, (_, last) in self._entries.items() if last < horizon]
        for key in stale:
            del self._entries[key]
