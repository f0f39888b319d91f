"""One client's access policy on the gateway (docs/protocol.md §3.3): what it may send, what may reach it.

:class:`ClientPolicy` holds the client's tunnel addresses, the gateway's own, and the resources the portal granted the
client, each with its own expiry. Two per-packet questions are answered from that state:

* :meth:`ClientPolicy.from_client`: may this packet, decrypted from the client's tunnel, be written to the TUN? A
  refused packet usually earns an ICMP "destination unreachable" to encrypt back to the client, which the client takes
  as its cue to ask the portal for a fresh authorization.
* :meth:`ClientPolicy.to_client`: may this packet, read from the TUN, be encrypted to the client?

Both are sans-IO, never raise on bad bytes, count refusals in a :class:`~dataplane.base.DropCounter` and answer with a
:class:`Decision`. Packets are parsed with integer operations only; destination classification goes through a small
cache that every change of state empties.

Facts taken from Firezone's gateway (``ClientOnGateway``, its routing table and filter engine), so behaviour matches:

* Routing-table order when several granted networks cover an address: an entry whose filter permits the packet beats
  one that does not, then the longer prefix wins, then the greater resource id (Firezone's current tie-break; it only
  decides which resource the packet is attributed to, never whether it passes).
* A client holding the Internet resource reaches every address except the excluded ranges (those answer "network
  unreachable"); the filters of its other resources no longer matter there. DNS proxy addresses still go through the
  routing table.
* ICMP errors: from the client, always dropped; towards the client, passed without consulting filters as long as they
  quote a packet of a known flow (TCP, UDP or an echo request).
* A packet with a forged source is refused like any unauthorized packet (with an ICMP reply to that source, through
  this client's own tunnel, so it reaches nobody else).

Expiry is exact: a grant whose ``expires_at`` is at or before the packet's ``wall_now`` permits nothing, even before
:meth:`ClientPolicy.expire` removes it.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dataplane.base import DropCounter, evict_oldest
from dataplane.icmp import UnreachableKind, destination_unreachable
from dataplane.packet import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from protocol.messages import CidrResource, DnsResource, IcmpFilter, InternetResource, PortFilter

logger = logging.getLogger(__name__)

GrantableResource = CidrResource | DnsResource | InternetResource

# Bounds on what the portal can make us store per client.
MAX_GRANTS_PER_CLIENT = 4096
# DNS proxy addresses routed per client (docs/protocol.md §3.4; the DNS NAT bounds its translations the same).
MAX_PROXY_ROUTES_PER_CLIENT = 4096
# Distinct (address, protocol, port) classifications remembered between state changes (Firezone keeps 1024 too).
CLASSIFICATION_CACHE_SIZE = 1024
# Allowed flows remembered per direction and protocol between state changes (a flow is bytes 12-24 of its packets).
FLOW_TABLE_SIZE = 4096
# A full cache or flow table drops its oldest eighth at once (see evict_oldest): a decision evicted early is only
# computed again.


class PolicyDropReason(enum.Enum):
    # Client → resource (decrypted from the tunnel).
    MALFORMED_PACKET = "malformed_packet"
    MULTICAST_DESTINATION = "multicast_destination"
    ICMP_ERROR_FROM_CLIENT = "icmp_error_from_client"
    SPOOFED_SOURCE = "spoofed_source"
    CLIENT_TO_CLIENT = "client_to_client"
    NOT_AUTHORIZED = "not_authorized"  # no granted network covers the destination
    FILTERED = "filtered"  # covered, but no covering grant's filter permits the protocol/port
    INTERNET_EXCLUDED = "internet_excluded"
    DNS_PROXY_UNTRANSLATED = "dns_proxy_untranslated"
    # Resource → client (read from the TUN).
    WRONG_DESTINATION = "wrong_destination"
    SOURCE_IN_TUNNEL_RANGE = "source_in_tunnel_range"
    SOURCE_NOT_AUTHORIZED = "source_not_authorized"
    SOURCE_FILTERED = "source_filtered"
    SOURCE_INTERNET_EXCLUDED = "source_internet_excluded"


# Which refusals from the client are answered, and how (docs/protocol.md §3.3 step 6, §3.4).
_REPLY_KIND: dict[PolicyDropReason, UnreachableKind] = {
    PolicyDropReason.SPOOFED_SOURCE: UnreachableKind.PROHIBITED,
    PolicyDropReason.CLIENT_TO_CLIENT: UnreachableKind.PROHIBITED,
    PolicyDropReason.NOT_AUTHORIZED: UnreachableKind.PROHIBITED,
    PolicyDropReason.FILTERED: UnreachableKind.PROHIBITED,
    PolicyDropReason.INTERNET_EXCLUDED: UnreachableKind.NETWORK,
    PolicyDropReason.DNS_PROXY_UNTRANSLATED: UnreachableKind.NETWORK,
}

# A source classification refused towards the client, renamed for that direction.
_SOURCE_REASON = {
    PolicyDropReason.NOT_AUTHORIZED: PolicyDropReason.SOURCE_NOT_AUTHORIZED,
    PolicyDropReason.FILTERED: PolicyDropReason.SOURCE_FILTERED,
    PolicyDropReason.INTERNET_EXCLUDED: PolicyDropReason.SOURCE_INTERNET_EXCLUDED,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one packet. ``icmp_reply`` (only from :meth:`ClientPolicy.from_client`) is an IP packet to
    encrypt back to the client; ``resource_id`` names the grant that let the packet through (None for traffic to or
    from the gateway's own tunnel address, and for ICMP errors towards the client)."""

    allowed: bool
    reason: PolicyDropReason | None = None
    icmp_reply: bytes | None = None
    resource_id: str | None = None


ALLOWED_UNATTRIBUTED = Decision(True)

# --- address ranges as (prefix, shift): an address `a` is inside when `a >> shift == prefix` --------------------------


def _range(network: str) -> tuple[int, int]:
    net = ipaddress.ip_network(network)
    shift = net.max_prefixlen - net.prefixlen
    return int(net.network_address) >> shift, shift


# Device tunnel addresses (docs/protocol.md §4.1); both ranges leave 21 host bits.
_TUNNEL_V4 = _range("100.64.0.0/11")
_TUNNEL_V6 = _range("fd00:2021:1111::/107")
# Client-side DNS-resource proxy addresses (§3.4).
_DNS_PROXY_V4 = _range("100.96.0.0/11")
_DNS_PROXY_V6 = _range("fd00:2021:1111:8000::/107")
# What the Internet resource refuses to reach (§3.3 step 5; Rust's Ipv4Addr/Ipv6Addr predicates as Firezone uses them).
_INTERNET_EXCLUDED_V4 = tuple(
    _range(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
_INTERNET_EXCLUDED_V6 = tuple(_range(n) for n in ("::1/128", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8"))


def _within(address: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    for prefix, shift in ranges:
        if address >> shift == prefix:
            return True
    return False


def is_internet_excluded(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address the Internet resource does not reach (it answers "network unreachable")."""
    ranges = _INTERNET_EXCLUDED_V4 if address.version == 4 else _INTERNET_EXCLUDED_V6
    return _within(int(address), ranges)


# --- packet parsing ---------------------------------------------------------------------------------------------------

# Transport kinds the filters tell apart. ICMP means ICMPv4 in IPv4 and ICMPv6 in IPv6; anything else is OTHER.
_OTHER = 0
_TCP = 1
_UDP = 2
_ICMP = 3

_ICMPV4_ERRORS = frozenset((3, 11))  # destination unreachable, time exceeded
_ICMPV6_ERRORS = frozenset((1, 2, 3))  # destination unreachable, packet too big, time exceeded
_ICMPV4_ECHO_REQUEST = 8
_ICMPV6_ECHO_REQUEST = 128

_V4_ADDRESSES = struct.Struct("!II")
_PORTS = struct.Struct("!HH")


# (version, src, dst, kind, src_port, dst_port, icmp_type, l4_offset, end); ports and ICMP type 0 when absent.
_Parsed = tuple[int, int, int, int, int, int, int, int, int]


def _parse(packet: bytes | bytearray | memoryview) -> _Parsed | None:
    """The fields the policy needs, or None when the IP header or a transport header it carries is malformed."""
    length = len(packet)
    if length < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        header_len = (packet[0] & 0x0F) * 4
        end = (packet[2] << 8) | packet[3]
        if header_len < 20 or end < header_len or end > length:
            return None
        src, dst = _V4_ADDRESSES.unpack_from(packet, 12)
        protocol = packet[9]
        if ((packet[6] & 0x1F) << 8) | packet[7]:
            # A non-initial fragment has no transport header to filter on.
            return (4, src, dst, _OTHER, 0, 0, 0, header_len, end)
        icmp_protocol = IPPROTO_ICMP
    elif version == 6:
        if length < 40:
            return None
        header_len = 40
        end = 40 + ((packet[4] << 8) | packet[5])
        if end > length:
            return None
        src = int.from_bytes(packet[8:24], "big")
        dst = int.from_bytes(packet[24:40], "big")
        # Extension headers are not walked: behind one, the packet is OTHER (only "permit all" grants pass it).
        protocol = packet[6]
        icmp_protocol = IPPROTO_ICMPV6
    else:
        return None
    available = end - header_len
    if protocol == IPPROTO_TCP:
        if available < 20:
            return None
        sport, dport = _PORTS.unpack_from(packet, header_len)
        return (version, src, dst, _TCP, sport, dport, 0, header_len, end)
    if protocol == IPPROTO_UDP:
        if available < 8:
            return None
        sport, dport = _PORTS.unpack_from(packet, header_len)
        return (version, src, dst, _UDP, sport, dport, 0, header_len, end)
    if protocol == icmp_protocol:
        if available < 8:
            return None
        return (version, src, dst, _ICMP, 0, 0, packet[header_len], header_len, end)
    return (version, src, dst, _OTHER, 0, 0, 0, header_len, end)


def _quotes_known_flow(packet: bytes | bytearray | memoryview, version: int, start: int, end: int) -> bool:
    """True when ``packet[start:end]`` (an ICMP error's quote) begins with an IP header of ``version`` followed by the
    start of a TCP/UDP header or of an echo request: the errors Firezone relates to a flow and lets through."""
    available = end - start
    if version == 4:
        if available < 20 or packet[start] >> 4 != 4:
            return False
        header_len = (packet[start] & 0x0F) * 4
        protocol = packet[start + 9]
        icmp_protocol, echo_request = IPPROTO_ICMP, _ICMPV4_ECHO_REQUEST
    else:
        if available < 40 or packet[start] >> 4 != 6:
            return False
        header_len = 40
        protocol = packet[start + 6]
        icmp_protocol, echo_request = IPPROTO_ICMPV6, _ICMPV6_ECHO_REQUEST
    if header_len < 20 or available < header_len:
        return False
    rest = available - header_len
    if protocol == IPPROTO_TCP or protocol == IPPROTO_UDP:
        return rest >= 4
    if protocol == icmp_protocol:
        return rest >= 8 and packet[start + header_len] == echo_request
    return False


def _flow_table(
    packet: bytes | bytearray | memoryview, tables: tuple[dict[bytes, Decision], dict[bytes, Decision]]
) -> dict[bytes, Decision] | None:
    """The flow table for a plain IPv4 TCP or UDP packet (no options, not a fragment, lengths consistent), or None.

    For such a packet :func:`_parse` cannot fail and every decision depends only on the protocol and bytes 12-24
    (source and destination address, source and destination port), so an allowed decision can be remembered under
    those bytes until the policy's state changes. Anything else (IPv6, ICMP, options, fragments, short or padded
    lengths that :func:`_parse` would judge) takes the full path."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[6] & 0x3F or packet[7]:
        return None
    end = (packet[2] << 8) | packet[3]
    if end > len(packet):
        return None
    protocol = packet[9]
    if protocol == IPPROTO_TCP:
        return tables[0] if end >= 40 else None
    if protocol == IPPROTO_UDP:
        return tables[1] if end >= 28 else None
    return None


def _through_flow_table(
    packet: bytes | bytearray | memoryview,
    tables: tuple[dict[bytes, Decision], dict[bytes, Decision]],
    decide: Callable[[bytes | bytearray | memoryview], Decision],
) -> Decision:
    """``decide(packet)``, answered from the flow table when the packet's flow was allowed before; allowed decisions
    are remembered (the oldest flow goes when the table is full)."""
    table = _flow_table(packet, tables)
    if table is None:
        return decide(packet)
    key = bytes(packet[12:24])
    decision = table.get(key)
    if decision is None:
        decision = decide(packet)
        if decision.allowed:
            if len(table) >= FLOW_TABLE_SIZE:
                evict_oldest(table, FLOW_TABLE_SIZE // 8)
            table[key] = decision
    return decision


# --- filters and routes -----------------------------------------------------------------------------------------------


class _Filter:
    """A resource's filter list compiled (docs/protocol.md §3.2): empty permits everything; otherwise the union of
    TCP ranges, the union of UDP ranges and an ICMP flag, and every other protocol is refused."""

    __slots__ = ("icmp", "permit_all", "tcp", "udp")

    def __init__(self, filters: Iterable[PortFilter | IcmpFilter]) -> None:
        tcp: list[tuple[int, int]] = []
        udp: list[tuple[int, int]] = []
        self.icmp = False
        self.permit_all = True
        for entry in filters:
            self.permit_all = False
            if isinstance(entry, IcmpFilter):
                self.icmp = True
            elif entry.port_range_start <= entry.port_range_end:  # an inverted range permits nothing
                (tcp if entry.protocol == "tcp" else udp).append((entry.port_range_start, entry.port_range_end))
        self.tcp = _merge(tcp)
        self.udp = _merge(udp)

    def permits(self, kind: int, port: int) -> bool:
        if self.permit_all:
            return True
        if kind == _TCP:
            ranges = self.tcp
        elif kind == _UDP:
            ranges = self.udp
        else:
            return self.icmp and kind == _ICMP
        for low, high in ranges:
            if low <= port <= high:
                return True
        return False


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


@dataclass(slots=True)
class _Grant:
    resource: GrantableResource
    expires_at: float | None
    filter: _Filter
    # The networks this grant routes. A CIDR resource: its address. A DNS resource: the proxy addresses the client
    # assigned to its domains, as host routes (docs/protocol.md §3.4). The Internet resource is not routed through
    # the table.
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]


# (prefix, shift, resource_id, filter), ordered best first: longer prefix, then greater resource id.
_Route = tuple[int, int, str, _Filter]


class ClientPolicy:
    """The gateway's view of one client (Firezone's ``ClientOnGateway`` without the connection).

    Addresses are given as ``ipaddress`` objects; the gateway's are None until the portal's ``init`` names them.
    ``drops`` is the counter refusals are counted in (the gateway's shared one, or a private one when omitted).
    """

    def __init__(
        self,
        client_ipv4: ipaddress.IPv4Address,
        client_ipv6: ipaddress.IPv6Address,
        gateway_ipv4: ipaddress.IPv4Address | None = None,
        gateway_ipv6: ipaddress.IPv6Address | None = None,
        drops: DropCounter | None = None,
    ) -> None:
        self.drops = drops if drops is not None else DropCounter()
        self._grants: dict[str, _Grant] = {}
        self._client_v4 = self._client_v6 = 0
        self._gateway_v4 = self._gateway_v6 = -1  # -1 never equals an address
        # Allowed decisions by flow (the addresses and ports of a plain IPv4 TCP/UDP packet), per protocol and
        # direction: a packet of a flow seen before is decided with one lookup (see _flow_table). Emptied by every
        # change of state, the tunnel addresses included.
        self._flows_from: tuple[dict[bytes, Decision], dict[bytes, Decision]] = ({}, {})
        self._flows_to: tuple[dict[bytes, Decision], dict[bytes, Decision]] = ({}, {})
        self.set_client_addresses(client_ipv4, client_ipv6)
        self.set_gateway_addresses(gateway_ipv4, gateway_ipv6)
        # The derived lookup state, exact for wall-clock times in [_valid_from, _valid_until); rebuilt lazily.
        self._routes_v4: tuple[_Route, ...] = ()
        self._routes_v6: tuple[_Route, ...] = ()
        self._internet_decision: Decision | None = None
        self._proxy_v4: frozenset[int] = frozenset()  # DNS proxy addresses routed by a live DNS grant
        self._proxy_v6: frozenset[int] = frozenset()
        self._allowed: dict[str, Decision] = {}
        self._cache: dict[tuple[int, int, int, int], Decision | PolicyDropReason] = {}
        self._valid_from = math.inf
        self._valid_until = -math.inf

    # --- state changes ------------------------------------------------------------------------------------------------

    @property
    def client_ipv4(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self._client_v4)

    @property
    def client_ipv6(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self._client_v6)

    def set_client_addresses(self, ipv4: ipaddress.IPv4Address, ipv6: ipaddress.IPv6Address) -> None:
        self._client_v4 = int(ipv4)
        self._client_v6 = int(ipv6)
        self._forget_flows()

    def set_gateway_addresses(self, ipv4: ipaddress.IPv4Address | None, ipv6: ipaddress.IPv6Address | None) -> None:
        """The gateway's own tunnel addresses (from ``init``, which may change them); traffic to them is allowed."""
        self._gateway_v4 = -1 if ipv4 is None else int(ipv4)
        self._gateway_v6 = -1 if ipv6 is None else int(ipv6)
        self._forget_flows()

    def grant(self, resource: GrantableResource, expires_at: float | None) -> bool:
        """Grants ``resource`` until ``expires_at`` (unix seconds; None = never).

        Granting a resource the client already holds refreshes its expiry and filters, nothing else: an address change
        comes as ``reject_access`` first (docs/protocol.md §2.1). Refused (False) when the resource changes type (the
        expiry is still refreshed) or the client already holds :data:`MAX_GRANTS_PER_CLIENT` resources.
        """
        existing = self._grants.get(resource.id)
        if existing is not None:
            existing.expires_at = expires_at
            self._invalidate()
            return self._refilter(existing, resource)
        if len(self._grants) >= MAX_GRANTS_PER_CLIENT:
            logger.warning("client holds %d resources already; refusing %s", len(self._grants), resource.id)
            return False
        if isinstance(resource, CidrResource):
            networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [resource.address]
            compiled = _Filter(resource.filters)
        elif isinstance(resource, DnsResource):
            networks = []
            compiled = _Filter(resource.filters)
        else:
            networks = []
            compiled = _Filter(())
        self._grants[resource.id] = _Grant(resource, expires_at, compiled, networks)
        self._invalidate()
        return True

    def update_filters(self, resource: GrantableResource) -> bool:
        """Applies a ``resource_updated``: new filters for a held resource, effective from the next packet. False when
        the client does not hold it or its type differs (a type change is refused)."""
        existing = self._grants.get(resource.id)
        if existing is None:
            return False
        return self._refilter(existing, resource)

    def _refilter(self, grant: _Grant, resource: GrantableResource) -> bool:
        if type(resource) is not type(grant.resource):
            logger.warning(
                "resource %s cannot change type from %s to %s", resource.id, grant.resource.type, resource.type
            )
            return False
        if isinstance(resource, CidrResource | DnsResource):
            grant.filter = _Filter(resource.filters)
            self._invalidate()
        return True

    def set_expiry(self, resource_id: str, expires_at: float | None) -> bool:
        """A new expiry for a held resource (``init.authorizations`` refreshes them); False if not held."""
        grant = self._grants.get(resource_id)
        if grant is None:
            return False
        grant.expires_at = expires_at
        self._invalidate()
        return True

    def route_proxy_addresses(
        self, resource_id: str, addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]
    ) -> bool:
        """Routes DNS proxy addresses the client assigned for a held DNS resource to it, with the resource's filters
        (docs/protocol.md §3.4 ``setup_nat``). False when the client holds no such DNS resource or the addresses
        would exceed :data:`MAX_PROXY_ROUTES_PER_CLIENT`."""
        grant = self._grants.get(resource_id)
        if grant is None or not isinstance(grant.resource, DnsResource):
            return False
        known = set(grant.networks)
        added = [ipaddress.ip_network(a) for a in addresses]
        added = [n for n in dict.fromkeys(added) if n not in known]
        routed = sum(len(g.networks) for g in self._grants.values() if isinstance(g.resource, DnsResource))
        if routed + len(added) > MAX_PROXY_ROUTES_PER_CLIENT:
            logger.warning("client has %d proxy addresses routed already; refusing more", routed)
            return False
        if added:
            grant.networks.extend(added)
            self._invalidate()
        return True

    def clear_proxy_addresses(self) -> None:
        """Forgets every routed DNS proxy address (the client re-numbered its proxy IPs)."""
        for grant in self._grants.values():
            if isinstance(grant.resource, DnsResource) and grant.networks:
                grant.networks.clear()
        self._invalidate()

    def revoke(self, resource_id: str) -> bool:
        """Removes one grant (``reject_access``); False if the client did not hold it."""
        if self._grants.pop(resource_id, None) is None:
            return False
        self._invalidate()
        return True

    def retain(self, resource_ids: Iterable[str]) -> list[str]:
        """Removes every grant not in ``resource_ids`` (``init`` re-sync); returns the removed ids."""
        keep = set(resource_ids)
        removed = [rid for rid in self._grants if rid not in keep]
        for rid in removed:
            del self._grants[rid]
        if removed:
            self._invalidate()
        return removed

    def expire(self, wall_now: float) -> list[str]:
        """Removes the grants whose expiry is at or before ``wall_now``; returns their ids."""
        expired = [
            rid for rid, grant in self._grants.items() if grant.expires_at is not None and grant.expires_at <= wall_now
        ]
        for rid in expired:
            del self._grants[rid]
        if expired:
            self._invalidate()
        return expired

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` among the grants (unix seconds), or None when nothing expires."""
        deadlines = [grant.expires_at for grant in self._grants.values() if grant.expires_at is not None]
        return min(deadlines) if deadlines else None

    @property
    def resource_ids(self) -> frozenset[str]:
        return frozenset(self._grants)

    @property
    def is_empty(self) -> bool:
        return not self._grants

    def _forget_flows(self) -> None:
        for table in (*self._flows_from, *self._flows_to):
            table.clear()

    def _invalidate(self) -> None:
        self._valid_from = math.inf
        self._valid_until = -math.inf

    def _rebuild(self, wall_now: float) -> None:
        """Derives the routes from the grants live at ``wall_now`` and the interval over which they stay live."""
        valid_from = -math.inf
        valid_until = math.inf
        routes_v4: list[tuple[int, str, _Route]] = []
        routes_v6: list[tuple[int, str, _Route]] = []
        internet_id: str | None = None
        allowed: dict[str, Decision] = {}
        for rid, grant in self._grants.items():
            expires_at = grant.expires_at
            if expires_at is not None:
                if expires_at <= wall_now:
                    valid_from = max(valid_from, expires_at)
                    continue
                valid_until = min(valid_until, expires_at)
            allowed[rid] = Decision(True, resource_id=rid)
            if isinstance(grant.resource, InternetResource):
                internet_id = rid if internet_id is None else max(internet_id, rid)
            for network in grant.networks:
                shift = network.max_prefixlen - network.prefixlen
                route: _Route = (int(network.network_address) >> shift, shift, rid, grant.filter)
                (routes_v4 if network.version == 4 else routes_v6).append((network.prefixlen, rid, route))
        proxies = [
            n
            for rid in allowed
            if isinstance((grant := self._grants[rid]).resource, DnsResource)
            for n in grant.networks
        ]
        self._proxy_v4 = frozenset(int(n.network_address) for n in proxies if n.version == 4)
        self._proxy_v6 = frozenset(int(n.network_address) for n in proxies if n.version == 6)
        routes_v4.sort(key=lambda item: (item[0], item[1]), reverse=True)
        routes_v6.sort(key=lambda item: (item[0], item[1]), reverse=True)
        self._routes_v4 = tuple(route for _, _, route in routes_v4)
        self._routes_v6 = tuple(route for _, _, route in routes_v6)
        self._internet_decision = None if internet_id is None else allowed[internet_id]
        self._allowed = allowed
        self._cache.clear()
        self._forget_flows()
        self._valid_from = valid_from
        self._valid_until = valid_until

    # --- per packet ---------------------------------------------------------------------------------------------------

    def from_client(self, packet: bytes | bytearray | memoryview, wall_now: float) -> Decision:
        """Decides on a packet decrypted from the client's tunnel: write it to the TUN (allowed), or drop it, maybe
        answering with ``icmp_reply``."""
        if not self._valid_from <= wall_now < self._valid_until:
            self._rebuild(wall_now)
        return _through_flow_table(packet, self._flows_from, self._decide_from_client)

    def _decide_from_client(self, packet: bytes | bytearray | memoryview) -> Decision:
        """:meth:`from_client` without the flow table (the reference the flow table must agree with)."""
        parsed = _parse(packet)
        if parsed is None:
            return self._refuse(PolicyDropReason.MALFORMED_PACKET, packet)
        version, src, dst, kind, _, dport, icmp_type, _, _ = parsed
        if version == 4:
            if dst >> 28 == 0xE:
                return self._refuse(PolicyDropReason.MULTICAST_DESTINATION, packet)
            if kind == _ICMP and icmp_type in _ICMPV4_ERRORS:
                return self._refuse(PolicyDropReason.ICMP_ERROR_FROM_CLIENT, packet)
            if src != self._client_v4:
                return self._refuse(PolicyDropReason.SPOOFED_SOURCE, packet)
            if dst == self._gateway_v4:
                return ALLOWED_UNATTRIBUTED
            if dst >> _TUNNEL_V4[1] == _TUNNEL_V4[0]:
                return self._refuse(PolicyDropReason.CLIENT_TO_CLIENT, packet)
            dns_proxy = dst >> _DNS_PROXY_V4[1] == _DNS_PROXY_V4[0]
        else:
            if dst >> 120 == 0xFF:
                return self._refuse(PolicyDropReason.MULTICAST_DESTINATION, packet)
            if kind == _ICMP and icmp_type in _ICMPV6_ERRORS:
                return self._refuse(PolicyDropReason.ICMP_ERROR_FROM_CLIENT, packet)
            if src != self._client_v6:
                return self._refuse(PolicyDropReason.SPOOFED_SOURCE, packet)
            if dst == self._gateway_v6:
                return ALLOWED_UNATTRIBUTED
            if dst >> _TUNNEL_V6[1] == _TUNNEL_V6[0]:
                return self._refuse(PolicyDropReason.CLIENT_TO_CLIENT, packet)
            dns_proxy = dst >> _DNS_PROXY_V6[1] == _DNS_PROXY_V6[0]
        outcome = self._classify(version, dst, kind, dport, dns_proxy)
        if isinstance(outcome, PolicyDropReason):
            return self._refuse(outcome, packet)
        if dns_proxy and dst not in (self._proxy_v4 if version == 4 else self._proxy_v6):
            # Authorized (e.g. by a CIDR resource covering the proxy range) but the client never assigned this proxy
            # address for a DNS resource: no translation exists, answered as Firezone does.
            return self._refuse(PolicyDropReason.DNS_PROXY_UNTRANSLATED, packet)
        return outcome

    def to_client(self, packet: bytes | bytearray | memoryview, wall_now: float) -> Decision:
        """Decides on a packet read from the TUN for this client: encrypt it to the client (allowed) or drop it."""
        if not self._valid_from <= wall_now < self._valid_until:
            self._rebuild(wall_now)
        return _through_flow_table(packet, self._flows_to, self._decide_to_client)

    def _decide_to_client(self, packet: bytes | bytearray | memoryview) -> Decision:
        """:meth:`to_client` without the flow table (the reference the flow table must agree with)."""
        parsed = _parse(packet)
        if parsed is None:
            return self._refuse(PolicyDropReason.MALFORMED_PACKET, None)
        version, src, dst, kind, sport, _, icmp_type, l4_offset, end = parsed
        if version == 4:
            if src == self._gateway_v4:
                return ALLOWED_UNATTRIBUTED
            if dst != self._client_v4:
                return self._refuse(PolicyDropReason.WRONG_DESTINATION, None)
            if src >> _TUNNEL_V4[1] == _TUNNEL_V4[0]:
                return self._refuse(PolicyDropReason.SOURCE_IN_TUNNEL_RANGE, None)
            is_error = kind == _ICMP and icmp_type in _ICMPV4_ERRORS
            dns_proxy = src >> _DNS_PROXY_V4[1] == _DNS_PROXY_V4[0]
        else:
            if src == self._gateway_v6:
                return ALLOWED_UNATTRIBUTED
            if dst != self._client_v6:
                return self._refuse(PolicyDropReason.WRONG_DESTINATION, None)
            if src >> _TUNNEL_V6[1] == _TUNNEL_V6[0]:
                return self._refuse(PolicyDropReason.SOURCE_IN_TUNNEL_RANGE, None)
            is_error = kind == _ICMP and icmp_type in _ICMPV6_ERRORS
            dns_proxy = src >> _DNS_PROXY_V6[1] == _DNS_PROXY_V6[0]
        if is_error and _quotes_known_flow(packet, version, l4_offset + 8, end):
            return ALLOWED_UNATTRIBUTED
        outcome = self._classify(version, src, kind, sport, dns_proxy)
        if isinstance(outcome, PolicyDropReason):
            return self._refuse(_SOURCE_REASON[outcome], None)
        return outcome

    def _classify(
        self, version: int, address: int, kind: int, port: int, dns_proxy: bool
    ) -> Decision | PolicyDropReason:
        """Which grant covers traffic with a resource at ``address`` (destination from the client, source towards it)."""
        key = (version, address, kind, port)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        outcome: Decision | PolicyDropReason
        internet = self._internet_decision
        if internet is not None and not dns_proxy:
            excluded = _INTERNET_EXCLUDED_V4 if version == 4 else _INTERNET_EXCLUDED_V6
            outcome = PolicyDropReason.INTERNET_EXCLUDED if _within(address, excluded) else internet
        else:
            outcome = PolicyDropReason.NOT_AUTHORIZED
            for prefix, shift, rid, compiled in self._routes_v4 if version == 4 else self._routes_v6:
                if address >> shift == prefix:
                    if compiled.permits(kind, port):
                        outcome = self._allowed[rid]
                        break
                    outcome = PolicyDropReason.FILTERED
        if len(self._cache) >= CLASSIFICATION_CACHE_SIZE:
            evict_oldest(self._cache, CLASSIFICATION_CACHE_SIZE // 8)
        self._cache[key] = outcome
        return outcome

    def _refuse(self, reason: PolicyDropReason, packet: bytes | bytearray | memoryview | None) -> Decision:
        self.drops.drop(reason)
        reply = None
        if packet is not None:
            kind = _REPLY_KIND.get(reason)
            if kind is not None:
                reply = destination_unreachable(packet, kind)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("policy drop: %s (reply %s)", reason.value, "yes" if reply is not None else "no")
        return Decision(False, reason, reply)
