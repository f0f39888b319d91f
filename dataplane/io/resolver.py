"""Resolution of DNS-resource domains with the system's configuration (docs/protocol.md §3.4).

The gateway resolves a domain a client assigned proxy IPs for with its own resolver, as the reference does: the
nameservers and search options of ``/etc/resolv.conf``, names in ``/etc/hosts`` first, A and AAAA asked separately
(a lookup that fails counts as no records of that type, as in the reference), a 10 s timeout on the whole resolution
(the only outcome reported as a failure), at most 1000 lookups at a time and a cache of 512 answers that honours the
records' TTLs (so a client re-sending ``assigned_ips`` after a TTL gets fresh records). Messages are built and parsed
by dnspython's asynchronous resolver.

Both files are re-read when they change (a lab namespace bind-mounts its own ``resolv.conf``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

logger = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

RESOLVE_TIMEOUT = 10.0
MAX_CONCURRENT_LOOKUPS = 1000
CACHE_SIZE = 512
MAX_HOSTS_FILE_SIZE = 1 << 20  # a larger /etc/hosts is ignored rather than read into memory
RESOLV_CONF = "/etc/resolv.conf"
HOSTS = "/etc/hosts"


@dataclass(frozen=True, slots=True)
class _FileStamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: str) -> _FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


def parse_hosts(text: str) -> dict[str, list[IpAddress]]:
    """``/etc/hosts`` as name (lower case, no trailing dot) → addresses in file order."""
    table: dict[str, list[IpAddress]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0].split("%", 1)[0])
        except ValueError:
            continue
        for name in fields[1:]:
            addresses = table.setdefault(name.lower().rstrip("."), [])
            if address not in addresses:
                addresses.append(address)
    return table


class DomainResolver:
    """Resolves domains to their A and AAAA records (see the module docstring)."""

    def __init__(
        self,
        *,
        resolv_conf: str = RESOLV_CONF,
        hosts: str = HOSTS,
        timeout: float = RESOLVE_TIMEOUT,
        max_concurrent: int = MAX_CONCURRENT_LOOKUPS,
        cache_size: int = CACHE_SIZE,
        port: int = 53,
    ) -> None:
        self._resolv_conf = resolv_conf
        self._hosts_path = hosts
        self._timeout = timeout
        self._cache_size = cache_size
        self._port = port  # nameserver port (53; tests point it at an unprivileged one)
        self._limit = asyncio.Semaphore(max_concurrent)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._resolver_stamp: _FileStamp | None = None
        self._hosts: dict[str, list[IpAddress]] = {}
        self._hosts_stamp: _FileStamp | None = None
        self.lookups = 0
        self.failures = 0

    def _current_resolver(self) -> dns.asyncresolver.Resolver:
        stamp = _stamp(self._resolv_conf)
        if self._resolver is None or stamp != self._resolver_stamp:
            resolver = dns.asyncresolver.Resolver(configure=False)
            try:
                resolver.read_resolv_conf(self._resolv_conf)
            except (OSError, dns.resolver.NoResolverConfiguration) as exc:
                logger.warning("no usable %s (%s): resolving through 127.0.0.1", self._resolv_conf, exc)
                resolver.nameservers = ["127.0.0.1"]
            resolver.port = self._port
            resolver.lifetime = self._timeout + 1.0  # the whole resolution's timeout fires first
            resolver.timeout = min(resolver.timeout, self._timeout)
            resolver.cache = dns.resolver.LRUCache(self._cache_size)
            self._resolver, self._resolver_stamp = resolver, stamp
        return self._resolver

    def _current_hosts(self) -> dict[str, list[IpAddress]]:
        stamp = _stamp(self._hosts_path)
        if stamp != self._hosts_stamp:
            self._hosts_stamp = stamp
            self._hosts = {}
            if stamp is not None and stamp.size <= MAX_HOSTS_FILE_SIZE:
                try:
                    with open(self._hosts_path, encoding="utf-8", errors="replace") as file:
                        self._hosts = parse_hosts(file.read())
                except OSError as exc:
                    logger.warning("could not read %s: %s", self._hosts_path, exc)
        return self._hosts

    async def resolve(self, domain: str) -> list[IpAddress] | None:
        """The addresses of ``domain`` (possibly none: NXDOMAIN, no records, or lookups that failed), or None when the
        resolution did not finish within the timeout."""
        self.lookups += 1
        name = domain.lower().rstrip(".")
        listed = self._current_hosts().get(name)
        if listed:
            return list(listed)
        async with self._limit:
            resolver = self._current_resolver()
            try:
                answers = await asyncio.wait_for(
                    asyncio.gather(
                        self._query(resolver, name, dns.rdatatype.A), self._query(resolver, name, dns.rdatatype.AAAA)
                    ),
                    self._timeout,
                )
            except TimeoutError:
                self.failures += 1
                logger.info("resolving %s timed out after %.0f s", name, self._timeout)
                return None
        return [address for answer in answers for address in answer]

    async def _query(
        self, resolver: dns.asyncresolver.Resolver, name: str, rdtype: dns.rdatatype.RdataType
    ) -> list[IpAddress]:
        try:
            answer = await resolver.resolve(dns.name.from_text(name), rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            logger.info("resolving %s %s failed: %s", name, dns.rdatatype.to_text(rdtype), exc)
            return []
        addresses: list[IpAddress] = []
        for record in answer:
            try:
                addresses.append(ipaddress.ip_address(record.to_text()))
            except ValueError:
                continue
        return addresses
