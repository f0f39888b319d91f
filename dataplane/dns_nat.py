"""One client's DNS-resource NAT (docs/protocol.md §3.4), sans-IO.

A client reaches a DNS resource through *proxy IPs* it picked itself and announced with ``assigned_ips``. The gateway
resolves the domain and keeps, per proxy IP, a *translation*: the domain, the resources it was assigned for and the
real address it maps to (proxy IPv4s round-robin onto the resolved IPv4s, IPv6s onto IPv6s; None when that family has
no records). Packets then go through a symmetric NAT keyed on the L4 "source protocol" (TCP or UDP source port, ICMP
echo identifier):

* outbound (client → resource): ``(protocol, client port, proxy IP)`` → ``(protocol, port, real IP)``; the port is the
  client's own when free for that real address, else the next free one. The destination address and the source port
  are rewritten, the client's source address is kept (the kernel masquerades it).
* inbound (resource → client): the reverse; ICMP errors quoting a translated packet are rebuilt as errors from the
  proxy IP quoting the packet as the client sent it.

Session lifetimes (since the last packet either way): TCP 2 h 4 min, UDP and ICMP 2 min; a session never answered
lives 60 s; once FIN was seen both ways, 5 s more; after a RST it ends at once. Expiry happens in
:meth:`DnsNat.handle_timeout`; an expired session's outside key is remembered (bounded) so that late replies are
dropped rather than taken for CIDR or Internet traffic.

Every table is bounded: translations, sessions and the expired-key memory.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dataplane.base import DropCounter, evict_oldest
from dataplane.icmp import UnreachableKind, destination_unreachable
from dataplane.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_FIN,
    TCP_RST,
    internet_checksum,
    ones_complement_sum,
    pseudo_header_sum,
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TCP_TTL = 2 * 3600 + 4 * 60  # RFC 5382 REQ-5: 2 h 4 min for an established TCP mapping
UDP_TTL = 120.0
ICMP_TTL = 120.0
UNCONFIRMED_TTL = 60.0  # a session nothing ever answered
FIN_LINGER = 5.0  # after FIN both ways

MAX_TRANSLATIONS = 4096  # proxy IPs per client (a client hands out 8 per domain: 512 domains)
MAX_SESSIONS = 16_384  # NAT sessions per client
MAX_EXPIRED = 16_384  # remembered outside keys of expired sessions per client (the oldest eighth forgotten when full)
ICMP_ERROR_HOP_LIMIT = 20

# L4 "source protocol" kinds. ICMP echo is one kind in both families: the address length tells them apart.
_TCP = IPPROTO_TCP
_UDP = IPPROTO_UDP
_ECHO = IPPROTO_ICMP

_ICMPV4_ECHO_REQUEST, _ICMPV4_ECHO_REPLY = 8, 0
_ICMPV6_ECHO_REQUEST, _ICMPV6_ECHO_REPLY = 128, 129
_ICMPV4_ERRORS = frozenset((3, 11, 12))
_ICMPV6_ERRORS = frozenset((1, 2, 3, 4))

# (kind, port or echo id, packed address)
_Key = tuple[int, int, bytes]


class NatDropReason(enum.Enum):
    NO_TRANSLATION = "dns_nat_no_translation"  # proxy IP the client never assigned (answered: network unreachable)
    NO_RECORDS = "dns_nat_no_records"  # the domain has no address of that family (network unreachable)
    UNSUPPORTED_PROTOCOL = "dns_nat_unsupported_protocol"  # not TCP, UDP or ICMP echo; or a fragment
    MALFORMED = "dns_nat_malformed"
    TABLE_FULL = "dns_nat_table_full"
    EXPIRED_SESSION = "dns_nat_expired_session"  # a late reply for a session that ended


@dataclass(slots=True)
class Translation:
    """What one proxy IP stands for."""

    domain: str
    resource_ids: set[str]
    real: IpAddress | None


@dataclass(slots=True)
class _Session:
    inside: _Key
    outside: _Key
    last_outgoing: float
    last_incoming: float | None = None
    fin_out: bool = False
    fin_in: bool = False
    rst: bool = False

    def remove_at(self) -> float:
        last = self.last_outgoing if self.last_incoming is None else max(self.last_outgoing, self.last_incoming)
        kind = self.inside[0]
        deadline = last + (TCP_TTL if kind == _TCP else UDP_TTL if kind == _UDP else ICMP_TTL)
        if self.last_incoming is None:
            deadline = min(deadline, self.last_outgoing + UNCONFIRMED_TTL)
        if self.fin_out and self.fin_in:
            deadline = min(deadline, last + FIN_LINGER)
        if self.rst:
            deadline = min(deadline, last)
        return deadline


class InboundVerdict(enum.Enum):
    NOT_TRANSLATED = "not_translated"  # no session: CIDR or Internet traffic, judged by the policy as is
    TRANSLATED = "translated"  # ``packet`` is the rewritten one
    EXPIRED = "expired"  # drop


@dataclass(frozen=True, slots=True)
class OutboundResult:
    """``packet`` (rewritten) to write to the TUN, or None; then ``icmp_reply`` may hold an error for the client."""

    packet: bytes | None
    icmp_reply: bytes | None = None


@dataclass(frozen=True, slots=True)
class InboundResult:
    verdict: InboundVerdict
    packet: bytes | None = None


@dataclass(slots=True)
class _Parsed:
    version: int
    header_len: int
    end: int
    kind: int  # _TCP, _UDP, _ECHO
    src: bytes
    dst: bytes


def is_proxy_address(packet: bytes | bytearray | memoryview, *, source: bool = False) -> bool:
    """Whether the packet's destination (or source) lies in the DNS proxy ranges 100.96.0.0/11,
    fd00:2021:1111:8000::/107."""
    if not packet:
        return False
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        offset = 12 if source else 16
        return packet[offset] == 100 and packet[offset + 1] & 0xE0 == 96
    if version == 6 and len(packet) >= 40:
        offset = 8 if source else 24
        return (
            packet[offset : offset + 8] == b"\xfd\x00\x20\x21\x11\x11\x80\x00"
            and packet[offset + 8 : offset + 13] == bytes(5)
            and packet[offset + 13] & 0xE0 == 0
        )
    return False


_PROXY_V4 = ipaddress.IPv4Network("100.96.0.0/11")
_PROXY_V6 = ipaddress.IPv6Network("fd00:2021:1111:8000::/107")


def is_proxy_ip(address: IpAddress) -> bool:
    """Whether ``address`` lies in the range clients pick DNS proxy IPs from."""
    return address in (_PROXY_V4 if address.version == 4 else _PROXY_V6)


class DnsNat:
    """The translations and NAT sessions of one client (see the module docstring)."""

    def __init__(self, drops: DropCounter | None = None) -> None:
        self.drops = drops if drops is not None else DropCounter()
        self._translations: dict[bytes, Translation] = {}
        self._by_inside: dict[_Key, _Session] = {}
        self._by_outside: dict[_Key, _Session] = {}
        self._expired: dict[_Key, None] = {}  # insertion-ordered, oldest evicted first

    # --- translations -------------------------------------------------------------------------------------------------

    def setup(
        self, domain: str, resource_id: str, proxy_ips: Sequence[IpAddress], resolved: Iterable[IpAddress]
    ) -> tuple[bool, bool]:
        """Installs the translations for ``domain``'s proxy IPs. Returns (installed, reset): not installed when the
        client would exceed :data:`MAX_TRANSLATIONS`; reset when a proxy IP was bound to another domain before, in
        which case every translation and session of this client was dropped first (the client re-numbered)."""
        domain = domain.lower().rstrip(".")
        reset = any(
            (existing := self._translations.get(ip.packed)) is not None and existing.domain != domain
            for ip in proxy_ips
        )
        if reset:
            self.reset()
        new = sum(1 for ip in set(proxy_ips) if ip.packed not in self._translations)
        if len(self._translations) + new > MAX_TRANSLATIONS:
            return False, reset
        addresses = sorted(set(resolved), key=lambda a: (a.version, a.packed))
        v4 = [a for a in addresses if a.version == 4]
        v6 = [a for a in addresses if a.version == 6]
        next_v4 = next_v6 = 0
        for proxy in sorted(set(proxy_ips), key=lambda a: (a.version, a.packed)):
            real: IpAddress | None
            if proxy.version == 4:
                real = v4[next_v4 % len(v4)] if v4 else None
                next_v4 += 1
            else:
                real = v6[next_v6 % len(v6)] if v6 else None
                next_v6 += 1
            translation = self._translations.get(proxy.packed)
            if translation is None:
                translation = self._translations[proxy.packed] = Translation(domain, set(), real)
            translation.resource_ids.add(resource_id)
            translation.real = real
        return True, reset

    def translation(self, proxy_ip: IpAddress) -> Translation | None:
        return self._translations.get(proxy_ip.packed)

    def proxy_ips(self, resource_id: str) -> list[IpAddress]:
        """The proxy IPs assigned for ``resource_id`` (to route them through the policy)."""
        return [
            ipaddress.ip_address(packed) for packed, t in self._translations.items() if resource_id in t.resource_ids
        ]

    def reset(self) -> None:
        self._translations.clear()
        self._by_inside.clear()
        self._by_outside.clear()
        self._expired.clear()

    @property
    def active(self) -> bool:
        """Whether packets from resources may need translating (a session exists or is remembered as expired)."""
        return bool(self._by_outside or self._expired)

    @property
    def session_count(self) -> int:
        return len(self._by_inside)

    # --- time ---------------------------------------------------------------------------------------------------------

    def poll_timeout(self) -> float | None:
        """The earliest moment a session ends (the gateway's 1 Hz tick is fine-grained enough to call at)."""
        return min((s.remove_at() for s in self._by_inside.values()), default=None)

    def handle_timeout(self, now: float) -> int:
        """Ends the sessions whose lifetime is over; returns how many."""
        ended = [s for s in self._by_inside.values() if now >= s.remove_at()]
        for session in ended:
            del self._by_inside[session.inside]
            del self._by_outside[session.outside]
            self._remember_expired(session.outside)
        return len(ended)

    def _remember_expired(self, outside: _Key) -> None:
        self._expired.pop(outside, None)
        self._expired[outside] = None
        if len(self._expired) > MAX_EXPIRED:
            evict_oldest(self._expired, len(self._expired) - MAX_EXPIRED + MAX_EXPIRED // 8)

    # --- per packet ---------------------------------------------------------------------------------------------------

    def translate_outbound(self, packet: bytes | bytearray | memoryview, now: float) -> OutboundResult:
        """A packet from the client to a proxy IP (the policy allowed it): rewritten towards the real address, or
        refused (no translation, no record of that family: ICMP network unreachable; anything else: dropped)."""
        parsed = _parse(packet)
        if parsed is None:
            return self._refuse(NatDropReason.MALFORMED)
        translation = self._translations.get(parsed.dst)
        if translation is None:
            return self._refuse(NatDropReason.NO_TRANSLATION, packet)
        real = translation.real
        if real is None or len(real.packed) != len(parsed.dst):
            return self._refuse(NatDropReason.NO_RECORDS, packet)
        kind = parsed.kind
        if kind == _ECHO:
            echo = _ICMPV4_ECHO_REQUEST if parsed.version == 4 else _ICMPV6_ECHO_REQUEST
            if packet[parsed.header_len] != echo:
                return self._refuse(NatDropReason.UNSUPPORTED_PROTOCOL)
            port = (packet[parsed.header_len + 4] << 8) | packet[parsed.header_len + 5]
        elif kind:
            port = (packet[parsed.header_len] << 8) | packet[parsed.header_len + 1]
        else:
            return self._refuse(NatDropReason.UNSUPPORTED_PROTOCOL)
        inside = (kind, port, parsed.dst)
        session = self._by_inside.get(inside)
        if session is None:
            if len(self._by_inside) >= MAX_SESSIONS:
                return self._refuse(NatDropReason.TABLE_FULL)
            outside = self._free_outside(kind, port, real.packed)
            session = _Session(inside, outside, now)
            self._by_inside[inside] = session
            self._by_outside[outside] = session
            self._expired.pop(outside, None)
        session.last_outgoing = now
        if kind == _TCP:
            flags = packet[parsed.header_len + 13]
            if flags & TCP_FIN:
                session.fin_out = True
            if flags & TCP_RST:
                session.rst = True
        out = bytearray(packet[: parsed.end])
        _rewrite(
            out,
            parsed,
            address_offset=16 if parsed.version == 4 else 24,
            new_address=session.outside[2],
            port_offset=_port_offset(parsed, source=True),
            new_port=session.outside[1],
        )
        return OutboundResult(bytes(out))

    def _free_outside(self, kind: int, port: int, real: bytes) -> _Key:
        """The client's port if free for this real address and protocol, else the next free one (wrapping; the table
        bound guarantees one exists)."""
        candidate = port
        while (kind, candidate, real) in self._by_outside:
            candidate = candidate + 1 if candidate < 0xFFFF else 1
        return (kind, candidate, real)

    def translate_inbound(self, packet: bytes | bytearray | memoryview, now: float) -> InboundResult:
        """A packet read from the TUN for this client: translated back when it belongs to a NAT session."""
        if not self._by_outside and not self._expired:
            return _NOT_TRANSLATED
        parsed = _parse(packet)
        if parsed is None:
            return _NOT_TRANSLATED  # the policy judges (and counts) what is malformed
        if parsed.kind == _ECHO:
            error_types = _ICMPV4_ERRORS if parsed.version == 4 else _ICMPV6_ERRORS
            icmp_type = packet[parsed.header_len]
            if icmp_type in error_types:
                return self._translate_icmp_error(packet, parsed, now)
            if icmp_type != (_ICMPV4_ECHO_REPLY if parsed.version == 4 else _ICMPV6_ECHO_REPLY):
                return _NOT_TRANSLATED
            port = (packet[parsed.header_len + 4] << 8) | packet[parsed.header_len + 5]
        elif parsed.kind:
            port = (packet[parsed.header_len + 2] << 8) | packet[parsed.header_len + 3]
        else:
            return _NOT_TRANSLATED
        outside = (parsed.kind, port, parsed.src)
        session = self._by_outside.get(outside)
        if session is None:
            if outside in self._expired:
                self.drops.drop(NatDropReason.EXPIRED_SESSION)
                return _EXPIRED
            return _NOT_TRANSLATED
        session.last_incoming = now
        if parsed.kind == _TCP:
            flags = packet[parsed.header_len + 13]
            if flags & TCP_FIN:
                session.fin_in = True
            if flags & TCP_RST:
                session.rst = True
        out = bytearray(packet[: parsed.end])
        _rewrite(
            out,
            parsed,
            address_offset=12 if parsed.version == 4 else 8,
            new_address=session.inside[2],
            port_offset=_port_offset(parsed, source=False),
            new_port=session.inside[1],
        )
        return InboundResult(InboundVerdict.TRANSLATED, bytes(out))

    def _translate_icmp_error(
        self, packet: bytes | bytearray | memoryview, outer: _Parsed, now: float
    ) -> InboundResult:
        quote_start = outer.header_len + 8
        quoted = _parse(packet[quote_start : outer.end], truncated=True)
        if quoted is None or quoted.version != outer.version or not quoted.kind:
            return _NOT_TRANSLATED
        if quoted.kind == _ECHO:
            port_at = quoted.header_len + 4
        else:
            port_at = quoted.header_len
        base = quote_start + port_at
        port = (packet[base] << 8) | packet[base + 1]
        outside = (quoted.kind, port, quoted.dst)
        session = self._by_outside.get(outside)
        if session is None:
            if outside in self._expired:
                self.drops.drop(NatDropReason.EXPIRED_SESSION)
                return _EXPIRED
            return _NOT_TRANSLATED
        session.last_incoming = now
        original = bytearray(packet[quote_start : outer.end])
        _rewrite(
            original,
            quoted,
            address_offset=16 if quoted.version == 4 else 24,
            new_address=session.inside[2],
            port_offset=port_at,
            new_port=session.inside[1],
        )
        icmp_type, code = packet[outer.header_len], packet[outer.header_len + 1]
        rest = bytes(packet[outer.header_len + 4 : outer.header_len + 8])
        client = outer.dst
        return InboundResult(
            InboundVerdict.TRANSLATED,
            _icmp_error(session.inside[2], client, icmp_type, code, rest, bytes(original)),
        )

    def _refuse(self, reason: NatDropReason, packet: bytes | bytearray | memoryview | None = None) -> OutboundResult:
        self.drops.drop(reason)
        reply = destination_unreachable(packet, UnreachableKind.NETWORK) if packet is not None else None
        return OutboundResult(None, reply)


_NOT_TRANSLATED = InboundResult(InboundVerdict.NOT_TRANSLATED)
_EXPIRED = InboundResult(InboundVerdict.EXPIRED)


def _parse(packet: bytes | bytearray | memoryview, *, truncated: bool = False) -> _Parsed | None:
    """Addresses and transport kind; None when malformed. ``truncated`` accepts a packet cut short (an ICMP error's
    quote) as long as the first 8 transport bytes are there. ``kind`` is 0 for other protocols and fragments."""
    length = len(packet)
    if length < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        header_len = (packet[0] & 0x0F) * 4
        end = (packet[2] << 8) | packet[3]
        if header_len < 20 or end < header_len:
            return None
        if end > length:
            if not truncated:
                return None
            end = length
        src, dst = bytes(packet[12:16]), bytes(packet[16:20])
        protocol = packet[9]
        fragmented = ((packet[6] & 0x1F) << 8) | packet[7] or (not truncated and packet[6] & 0x20)
        icmp = IPPROTO_ICMP
    elif version == 6:
        if length < 40:
            return None
        header_len = 40
        end = 40 + ((packet[4] << 8) | packet[5])
        if end > length:
            if not truncated:
                return None
            end = length
        src, dst = bytes(packet[8:24]), bytes(packet[24:40])
        protocol = packet[6]
        fragmented = False
        icmp = IPPROTO_ICMPV6
    else:
        return None
    available = end - header_len
    kind = 0
    if not fragmented:
        if protocol == IPPROTO_TCP and (available >= 20 or (truncated and available >= 8)):
            kind = _TCP
        elif protocol == IPPROTO_UDP and available >= 8:
            kind = _UDP
        elif protocol == icmp and available >= 8:
            kind = _ECHO
    return _Parsed(version, header_len, end, kind, src, dst)


def _port_offset(parsed: _Parsed, *, source: bool) -> int:
    if parsed.kind == _ECHO:
        return parsed.header_len + 4
    return parsed.header_len + (0 if source else 2)


_CHECKSUM_AT = {_TCP: 16, _UDP: 6, _ECHO: 2}


def _rewrite(
    packet: bytearray, parsed: _Parsed, *, address_offset: int, new_address: bytes, port_offset: int, new_port: int
) -> None:
    """Replaces one address and one port (or echo id) and patches the checksums incrementally (RFC 1624), so a packet
    whose transport checksum is only partly present (an ICMP error's quote) is still handled."""
    size = len(new_address)
    old_address = bytes(packet[address_offset : address_offset + size])
    old_port = bytes(packet[port_offset : port_offset + 2])
    new_port_bytes = struct.pack("!H", new_port)
    packet[address_offset : address_offset + size] = new_address
    packet[port_offset : port_offset + 2] = new_port_bytes
    if parsed.version == 4:
        _patch(packet, 10, old_address, new_address)
    at = parsed.header_len + _CHECKSUM_AT[parsed.kind]
    if at + 2 > len(packet):
        return  # the quote ends before the transport checksum
    old_checksum = (packet[at] << 8) | packet[at + 1]
    if parsed.kind == _UDP and parsed.version == 4 and old_checksum == 0:
        return  # no checksum: stays none
    covers_address = parsed.kind != _ECHO or parsed.version == 6  # ICMPv4 has no pseudo-header
    old = (old_address + old_port) if covers_address else old_port
    new = (new_address + new_port_bytes) if covers_address else new_port_bytes
    _patch(packet, at, old, new, udp=parsed.kind == _UDP)


def _patch(packet: bytearray, at: int, old: bytes, new: bytes, *, udp: bool = False) -> None:
    checksum = (packet[at] << 8) | packet[at + 1]
    total = (~checksum & 0xFFFF) + (~ones_complement_sum(old) & 0xFFFF) + ones_complement_sum(new)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    result = ~total & 0xFFFF
    if udp and result == 0:
        result = 0xFFFF
    packet[at] = result >> 8
    packet[at + 1] = result & 0xFF


def _icmp_error(src: bytes, dst: bytes, icmp_type: int, code: int, rest: bytes, quoted: bytes) -> bytes:
    """An ICMP(v6) error from ``src`` to ``dst`` quoting ``quoted``, as the reference builds them (hop limit 20)."""
    icmp = bytearray(struct.pack("!BBH", icmp_type, code, 0) + rest + quoted)
    if len(src) == 4:
        struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
        total = 20 + len(icmp)
        header = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, ICMP_ERROR_HOP_LIMIT, IPPROTO_ICMP, 0, src, dst)
        )
        struct.pack_into("!H", header, 10, internet_checksum(header))
        return bytes(header + icmp)
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp, pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(icmp))))
    return struct.pack("!IHBB16s16s", 6 << 28, len(icmp), IPPROTO_ICMPV6, ICMP_ERROR_HOP_LIMIT, src, dst) + bytes(icmp)
