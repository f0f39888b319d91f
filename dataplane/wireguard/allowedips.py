"""Cryptokey routing table: longest-prefix match from an IP address to a value (a peer), IPv4 and IPv6.

One dict per prefix length, keyed by the address shifted right to the prefix; lookups try the lengths in use, longest
first. A prefix belongs to at most one value: inserting it again moves it.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Family(Generic[T]):
    __slots__ = ("bits", "lengths", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: list[int] = []  # in use, longest first

    def insert(self, key: int, length: int, value: T) -> None:
        table = self.tables.get(length)
        if table is None:
            table = self.tables[length] = {}
            self.lengths = sorted(self.tables, reverse=True)
        table[key] = value

    def remove(self, key: int, length: int) -> None:
        table = self.tables.get(length)
        if table is None or table.pop(key, None) is None:
            return
        if not table:
            del self.tables[length]
            self.lengths = sorted(self.tables, reverse=True)

    def lookup(self, address: int) -> T | None:
        bits = self.bits
        tables = self.tables
        for length in self.lengths:
            value = tables[length].get(address >> (bits - length))
            if value is not None:
                return value
        return None


class AllowedIps(Generic[T]):
    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def _locate(self, network: Network) -> tuple[_Family[T], int, int]:
        """(family, key, prefix length) of ``network`` in this table."""
        family = self._v4 if network.version == 4 else self._v6
        length = network.prefixlen
        return family, int(network.network_address) >> (family.bits - length), length

    def insert(self, network: Network, value: T) -> None:
        family, key, length = self._locate(network)
        family.insert(key, length, value)

    def remove(self, network: Network) -> None:
        family, key, length = self._locate(network)
        family.remove(key, length)

    def get_exact(self, network: Network) -> T | None:
        family, key, length = self._locate(network)
        table = family.tables.get(length)
        return None if table is None else table.get(key)

    def lookup(self, address: bytes) -> T | None:
        """Longest match for a packed address (4 or 16 bytes); None when nothing matches."""
        if len(address) == 4:
            return self._v4.lookup(int.from_bytes(address, "big"))
        if len(address) == 16:
            return self._v6.lookup(int.from_bytes(address, "big"))
        return None

    def lookup_ip(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> T | None:
        return self.lookup(address.packed)
