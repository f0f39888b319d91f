"""ClientPolicy against a naive reference model (docs/protocol.md §3.3), over random histories of grants, filter
updates, revocations, expiries and packets in both directions, IPv4 and IPv6.

The model is written for clarity, not speed: ``ipaddress`` objects, the pydantic resources as given, every live grant
scanned for every packet. Packets are described as :class:`Spec` and built with scapy, so neither side's parser is
trusted by the other; replies are checked with scapy too.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Packet, Raw

from dataplane.base import DropCounter
from dataplane.policy import ClientPolicy, Decision, PolicyDropReason
from protocol.messages import CidrResource, DnsResource, IcmpFilter, InternetResource, PortFilter

R = PolicyDropReason
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resource = CidrResource | DnsResource | InternetResource
Filter = PortFilter | IcmpFilter

CLIENT4, CLIENT6 = ipaddress.IPv4Address("100.64.0.7"), ipaddress.IPv6Address("fd00:2021:1111::7")
GATEWAY4, GATEWAY6 = ipaddress.IPv4Address("100.64.0.1"), ipaddress.IPv6Address("fd00:2021:1111::1")
CLIENT: dict[int, IpAddress] = {4: CLIENT4, 6: CLIENT6}
GATEWAY: dict[int, IpAddress] = {4: GATEWAY4, 6: GATEWAY6}
TUNNEL = {4: ipaddress.ip_network("100.64.0.0/11"), 6: ipaddress.ip_network("fd00:2021:1111::/107")}
DNS_PROXY = {4: ipaddress.ip_network("100.96.0.0/11"), 6: ipaddress.ip_network("fd00:2021:1111:8000::/107")}
INTERNET_EXCLUDED = {
    4: [
        ipaddress.ip_network(n)
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
    ],
    6: [ipaddress.ip_network(n) for n in ("::1/128", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8")],
}
ADDRESSES = {
    4: [
        "10.0.0.1",
        "10.1.2.3",
        "10.200.0.1",
        "192.168.1.1",
        "172.16.5.4",
        "8.8.8.8",
        "1.1.1.1",
        "100.96.0.5",
        "100.64.0.9",
        "100.64.0.7",
        "100.64.0.1",
        "224.0.0.5",
        "255.255.255.255",
        "240.0.0.1",
        "127.0.0.1",
        "0.0.0.0",
    ],
    6: [
        "2001:db8::1",
        "2001:db8:1::1",
        "2606:4700::1111",
        "fd00:2021:1111:8000::5",
        "fd00:2021:1111::9",
        "fd00:2021:1111::7",
        "fd00:2021:1111::1",
        "ff02::1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "::ffff:8.8.8.8",
    ],
}
PORTS = [0, 1, 22, 53, 79, 80, 81, 443, 8080, 65534, 65535]
RESOURCE_IDS = ["a", "b", "c", "d", "e"]
T = 1_000_000.0
EXPIRIES: list[float | None] = [None, None, T - 1, T, T + 1, T + 5]
TIMES = [T - 2, T - 1, T, T + 0.5, T + 1, T + 3, T + 5, T + 10]

ProtoKind = Literal[
    "tcp", "udp", "echo_request", "echo_reply", "icmp_other", "icmp_error", "param_problem", "gre", "fragment", "hbh"
]
PROTO_KINDS: list[ProtoKind] = [
    "tcp",
    "udp",
    "echo_request",
    "echo_reply",
    "icmp_other",
    "icmp_error",
    "param_problem",
    "gre",
    "fragment",
    "hbh",
]
Direction = Literal["from", "to"]
DIRECTIONS: list[Direction] = ["from", "to"]
QuoteKind = Literal["udp", "tcp", "echo_request", "echo_reply", "gre", "garbage"]
ICMP_ERROR_QUOTES: list[QuoteKind] = ["udp", "tcp", "echo_request", "echo_reply", "gre", "garbage"]


@dataclass(frozen=True)
class Spec:
    """A packet as both sides should understand it."""

    direction: Literal["from", "to"]
    version: int
    src: IpAddress
    dst: IpAddress
    proto: ProtoKind
    sport: int
    dport: int
    quote: QuoteKind
    now: float

    def build(self) -> bytes:
        v4 = self.version == 4
        ip: Packet = IP(src=str(self.src), dst=str(self.dst)) if v4 else IPv6(src=str(self.src), dst=str(self.dst))
        if self.proto == "tcp":
            return bytes(ip / TCP(sport=self.sport, dport=self.dport))
        if self.proto == "udp":
            return bytes(ip / UDP(sport=self.sport, dport=self.dport) / Raw(b"payload"))
        if self.proto == "echo_request":
            return bytes(ip / (ICMP(type=8, id=self.sport) if v4 else ICMPv6EchoRequest(id=self.sport)))
        if self.proto == "echo_reply":
            return bytes(ip / (ICMP(type=0, id=self.sport) if v4 else ICMPv6EchoReply(id=self.sport)))
        if self.proto == "icmp_other":  # timestamp request / an unassigned informational type
            return bytes(ip / (ICMP(type=13) if v4 else ICMPv6EchoRequest(type=200)))
        if self.proto == "icmp_error":
            error: Packet = ICMP(type=3, code=1) if v4 else ICMPv6DestUnreach(code=1)
            if self.sport % 2:
                error = ICMP(type=11) if v4 else ICMPv6TimeExceeded()
            return bytes(ip / error / self._quote())
        if self.proto == "param_problem":
            return bytes(ip / (ICMP(type=12) if v4 else ICMPv6ParamProblem()) / self._quote())
        if self.proto == "gre":
            return bytes(
                (
                    IP(src=str(self.src), dst=str(self.dst), proto=47)
                    if v4
                    else IPv6(src=str(self.src), dst=str(self.dst), nh=47)
                )
                / Raw(b"gre-payload")
            )
        if self.proto == "fragment":
            if v4:
                return bytes(IP(src=str(self.src), dst=str(self.dst), proto=17, frag=64) / Raw(b"x" * 24))
            return bytes(ip / IPv6ExtHdrFragment(offset=64, nh=17) / Raw(b"x" * 24))
        # An IPv6 hop-by-hop header before UDP (IPv4 has no such thing: a plain UDP packet stands in).
        if v4:
            return bytes(ip / UDP(sport=self.sport, dport=self.dport))
        return bytes(ip / IPv6ExtHdrHopByHop() / UDP(sport=self.sport, dport=self.dport))

    def _quote(self) -> Packet:
        v4 = self.version == 4
        inner: Packet = IP(src=str(self.dst), dst=str(self.src)) if v4 else IPv6(src=str(self.dst), dst=str(self.src))
        if self.quote == "udp":
            return inner / UDP(sport=self.dport, dport=self.sport)
        if self.quote == "tcp":
            return inner / TCP(sport=self.dport, dport=self.sport)
        if self.quote == "echo_request":
            return inner / (ICMP(type=8) if v4 else ICMPv6EchoRequest())
        if self.quote == "echo_reply":
            return inner / (ICMP(type=0) if v4 else ICMPv6EchoReply())
        if self.quote == "gre":
            return (
                IP(src=str(self.dst), dst=str(self.src), proto=47)
                if v4
                else IPv6(src=str(self.dst), dst=str(self.src), nh=47)
            ) / Raw(b"gre!")
        return Raw(b"garbage, not an IP header")


# --- the reference model ----------------------------------------------------------------------------------------------


@dataclass
class ModelGrant:
    resource: Resource
    expires_at: float | None
    filters: list[Filter] = field(default_factory=list)


@dataclass(frozen=True)
class Expected:
    allowed: bool
    reason: PolicyDropReason | None
    resource_id: str | None
    reply: tuple[int, int] | None  # (type, code) of the expected ICMP reply


ICMP_PROHIBITED = {4: (3, 13), 6: (1, 1)}
ICMP_NETWORK = {4: (3, 0), 6: (1, 3)}


class Model:
    def __init__(self) -> None:
        self.grants: dict[str, ModelGrant] = {}

    # state changes, as docs/protocol.md §2.1 and §3.3 describe them
    def grant(self, resource: Resource, expires_at: float | None) -> bool:
        held = self.grants.get(resource.id)
        if held is None:
            filters = [] if isinstance(resource, InternetResource) else list(resource.filters)
            self.grants[resource.id] = ModelGrant(resource, expires_at, filters)
            return True
        held.expires_at = expires_at
        return self.update(resource)

    def update(self, resource: Resource) -> bool:
        held = self.grants.get(resource.id)
        if held is None or held.resource.type != resource.type:
            return False
        if not isinstance(resource, InternetResource):
            held.filters = list(resource.filters)
        return True

    def revoke(self, rid: str) -> bool:
        return self.grants.pop(rid, None) is not None

    def expire(self, now: float) -> set[str]:
        gone = {rid for rid, g in self.grants.items() if g.expires_at is not None and g.expires_at <= now}
        for rid in gone:
            del self.grants[rid]
        return gone

    def next_expiry(self) -> float | None:
        times = [g.expires_at for g in self.grants.values() if g.expires_at is not None]
        return min(times) if times else None

    # decisions
    def live(self, now: float) -> dict[str, ModelGrant]:
        return {rid: g for rid, g in self.grants.items() if g.expires_at is None or g.expires_at > now}

    @staticmethod
    def protocol_of(spec: Spec) -> str:
        if spec.proto in ("fragment", "gre") or (spec.proto == "hbh" and spec.version == 6):
            return "other"
        if spec.proto == "hbh":
            return "udp"
        if spec.proto in ("tcp", "udp"):
            return spec.proto
        return "icmp"

    @staticmethod
    def filter_permits(filters: list[Filter], protocol: str, port: int) -> bool:
        if not filters:
            return True
        for f in filters:
            if isinstance(f, IcmpFilter):
                if protocol == "icmp":
                    return True
            elif f.protocol == protocol and f.port_range_start <= port <= f.port_range_end:
                return True
        return False

    def classify(self, now: float, address: IpAddress, protocol: str, port: int) -> tuple[str | None, R | None]:
        live = self.live(now)
        internet = sorted(rid for rid, g in live.items() if isinstance(g.resource, InternetResource))
        if internet and address not in DNS_PROXY[address.version]:
            if any(address in net for net in INTERNET_EXCLUDED[address.version]):
                return None, R.INTERNET_EXCLUDED
            return internet[-1], None
        covering = [
            (g.resource.address.prefixlen, rid, g.filters)
            for rid, g in live.items()
            if isinstance(g.resource, CidrResource) and address in g.resource.address
        ]
        if not covering:
            return None, R.NOT_AUTHORIZED
        permitting = [(plen, rid) for plen, rid, filters in covering if self.filter_permits(filters, protocol, port)]
        if not permitting:
            return None, R.FILTERED
        return max(permitting)[1], None

    def from_client(self, spec: Spec) -> Expected:
        v = spec.version
        if spec.dst.is_multicast:
            return Expected(False, R.MULTICAST_DESTINATION, None, None)
        if spec.proto == "icmp_error":
            return Expected(False, R.ICMP_ERROR_FROM_CLIENT, None, None)
        if spec.src != CLIENT[v]:
            return self.refusal(spec, R.SPOOFED_SOURCE)
        if spec.dst == GATEWAY[v]:
            return Expected(True, None, None, None)
        if spec.dst in TUNNEL[v]:
            return self.refusal(spec, R.CLIENT_TO_CLIENT)
        rid, reason = self.classify(spec.now, spec.dst, self.protocol_of(spec), spec.dport)
        if reason is not None:
            return self.refusal(spec, reason)
        if spec.dst in DNS_PROXY[v]:
            return self.refusal(spec, R.DNS_PROXY_UNTRANSLATED)
        return Expected(True, None, rid, None)

    def to_client(self, spec: Spec) -> Expected:
        v = spec.version
        if spec.src == GATEWAY[v]:
            return Expected(True, None, None, None)
        if spec.dst != CLIENT[v]:
            return Expected(False, R.WRONG_DESTINATION, None, None)
        if spec.src in TUNNEL[v]:
            return Expected(False, R.SOURCE_IN_TUNNEL_RANGE, None, None)
        if spec.proto == "icmp_error" and spec.quote in ("udp", "tcp", "echo_request"):
            return Expected(True, None, None, None)
        rid, reason = self.classify(spec.now, spec.src, self.protocol_of(spec), spec.sport)
        renamed = {
            R.NOT_AUTHORIZED: R.SOURCE_NOT_AUTHORIZED,
            R.FILTERED: R.SOURCE_FILTERED,
            R.INTERNET_EXCLUDED: R.SOURCE_INTERNET_EXCLUDED,
        }
        if reason is not None:
            return Expected(False, renamed[reason], None, None)
        return Expected(True, None, rid, None)

    @staticmethod
    def refusal(spec: Spec, reason: R) -> Expected:
        kind = ICMP_NETWORK if reason in (R.INTERNET_EXCLUDED, R.DNS_PROXY_UNTRANSLATED) else ICMP_PROHIBITED
        # RFC 1812 / RFC 4443: no error about a non-initial fragment, an ICMP error, a broadcast or multicast
        # destination, or to a source that names no single host.
        if spec.version == 4:
            answerable = (
                spec.src.packed[0] not in (0, 127)
                and not spec.src.is_multicast
                and spec.src.packed[0] < 240
                and str(spec.dst) != "255.255.255.255"
            )
        else:
            answerable = not spec.src.is_unspecified and not spec.src.is_multicast
        answerable = answerable and spec.proto not in ("fragment", "param_problem")
        return Expected(False, reason, None, kind[spec.version] if answerable else None)


# --- strategies -------------------------------------------------------------------------------------------------------


@st.composite
def filters(draw: st.DrawFn) -> list[Filter]:
    result: list[Filter] = []
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        if draw(st.integers(0, 4)) == 0:
            result.append(IcmpFilter(protocol="icmp"))
        else:
            start, end = sorted((draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))))
            if draw(st.integers(0, 5)) == 0:
                start, end = end, start  # inverted: permits nothing
            result.append(
                PortFilter(protocol=draw(st.sampled_from(["tcp", "udp"])), port_range_start=start, port_range_end=end)
            )
    return result


@st.composite
def resources(draw: st.DrawFn) -> Resource:
    rid = draw(st.sampled_from(RESOURCE_IDS))
    kind = draw(st.sampled_from(["cidr", "cidr", "cidr", "dns", "internet"]))
    if kind == "internet":
        return InternetResource(id=rid, type="internet")
    if kind == "dns":
        return DnsResource(id=rid, type="dns", address="*.corp.example", filters=draw(filters()))
    version = draw(st.sampled_from([4, 6]))
    base = draw(st.sampled_from(ADDRESSES[version]))
    # Short prefixes often, so that grants overlap each other and cover the packets' addresses.
    prefix = draw(st.sampled_from([0, 1, 8, 11, 12, 16, 24, 32] if version == 4 else [0, 1, 16, 32, 48, 64, 107, 128]))
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    return CidrResource(id=rid, type="cidr", address=network, filters=draw(filters()))


@st.composite
def specs(draw: st.DrawFn, granted: list[IpNetwork]) -> Spec:
    """A packet; its resource-side address is often inside (or at the edge of) a granted network."""
    direction = draw(st.sampled_from(DIRECTIONS))
    target: IpAddress | None = None
    near = draw(st.integers(0, 3)) > 0
    if granted and near:
        network = draw(st.sampled_from(granted))
        offset = draw(st.sampled_from([0, network.num_addresses - 1, draw(st.integers(0, network.num_addresses - 1))]))
        target = network.network_address + offset
    version = target.version if target is not None else draw(st.sampled_from([4, 6]))
    pool = [ipaddress.ip_address(a) for a in ADDRESSES[version]]
    client = CLIENT[version]
    # Mostly the client's own address on its side, so that traffic gets past the address checks.
    own = draw(st.sampled_from([client, client, client, draw(st.sampled_from(pool))]))
    other = target if target is not None else draw(st.sampled_from(pool))
    src, dst = (own, other) if direction == "from" else (other, own)
    return Spec(
        direction=direction,
        version=version,
        src=src,
        dst=dst,
        proto=draw(st.sampled_from(PROTO_KINDS)),
        sport=draw(st.sampled_from(PORTS)),
        dport=draw(st.sampled_from(PORTS)),
        quote=draw(st.sampled_from(ICMP_ERROR_QUOTES)),
        now=draw(st.sampled_from(TIMES)),
    )


Step = (
    tuple[Literal["grant"], Resource, float | None]
    | tuple[Literal["update"], Resource]
    | tuple[Literal["revoke"], str]
    | tuple[Literal["expire"], float]
    | tuple[Literal["packet"], None]
    | tuple[Literal["twin"], None]
)

grants = st.tuples(st.just("grant"), resources(), st.sampled_from(EXPIRIES))
steps = st.one_of(
    grants,
    st.tuples(st.just("update"), resources()),
    st.tuples(st.just("revoke"), st.sampled_from(RESOURCE_IDS)),
    st.tuples(st.just("expire"), st.sampled_from(TIMES)),
    # Drawn when their turn comes, knowing the grants of that moment: packets, and grants of a network some other
    # resource already covers (ties in the routing order).
    st.just(("twin", None)),
    st.just(("packet", None)),
    st.just(("packet", None)),
    st.just(("packet", None)),
)


def check_decision(spec: Spec, packet: bytes, got: Decision, want: Expected) -> None:
    assert (got.allowed, got.reason, got.resource_id) == (want.allowed, want.reason, want.resource_id), spec
    if want.reply is None:
        assert got.icmp_reply is None, spec
        return
    reply = got.icmp_reply
    assert reply is not None, spec
    parsed: Packet
    if spec.version == 4:
        parsed = IP(reply)
        assert (parsed[ICMP].type, parsed[ICMP].code) == want.reply
        assert reply[28:] == packet[: len(reply) - 28]
    else:
        parsed = IPv6(reply)
        assert (parsed[ICMPv6DestUnreach].type, parsed[ICMPv6DestUnreach].code) == want.reply
        assert reply[48:] == packet[: len(reply) - 48]
    assert ipaddress.ip_address(parsed.src) == spec.dst and ipaddress.ip_address(parsed.dst) == spec.src


@settings(max_examples=300)
@given(st.lists(grants, min_size=1, max_size=6), st.lists(steps, min_size=5, max_size=40), st.data())
def test_policy_agrees_with_the_reference_model(setup: list[Step], more: list[Step], data: st.DataObject) -> None:
    drops = DropCounter()
    policy = ClientPolicy(CLIENT4, CLIENT6, GATEWAY4, GATEWAY6, drops=drops)
    model = Model()
    refusals = 0
    for step in setup + more:
        if step[0] == "grant":
            assert policy.grant(step[1], step[2]) == model.grant(step[1], step[2])
        elif step[0] == "update":
            assert policy.update_filters(step[1]) == model.update(step[1])
        elif step[0] == "revoke":
            assert policy.revoke(step[1]) == model.revoke(step[1])
        elif step[0] == "expire":
            assert set(policy.expire(step[1])) == model.expire(step[1])
        elif step[0] == "twin":
            granted = [g.resource.address for g in model.grants.values() if isinstance(g.resource, CidrResource)]
            if granted:
                twin = CidrResource(
                    id=data.draw(st.sampled_from(RESOURCE_IDS)),
                    type="cidr",
                    address=data.draw(st.sampled_from(granted)),
                    filters=data.draw(filters()),
                )
                expires_at = data.draw(st.sampled_from(EXPIRIES))
                assert policy.grant(twin, expires_at) == model.grant(twin, expires_at)
        else:
            granted = [g.resource.address for g in model.grants.values() if isinstance(g.resource, CidrResource)]
            spec = data.draw(specs(granted))
            packet = spec.build()
            if spec.direction == "from":
                got, want = policy.from_client(packet, spec.now), model.from_client(spec)
            else:
                got, want = policy.to_client(packet, spec.now), model.to_client(spec)
            check_decision(spec, packet, got, want)
            refusals += not want.allowed
        assert policy.resource_ids == frozenset(model.grants)
        assert policy.next_expiry() == model.next_expiry()
        assert policy.is_empty == (not model.grants)
    assert drops.total() == refusals


@given(st.binary(max_size=80), st.sampled_from(TIMES), st.booleans())
def test_garbage_never_raises(data: bytes, now: float, towards_client: bool) -> None:
    policy = ClientPolicy(CLIENT4, CLIENT6, GATEWAY4, GATEWAY6)
    policy.grant(CidrResource(id="a", type="cidr", address=ipaddress.ip_network("0.0.0.0/0")), None)
    policy.grant(InternetResource(id="i", type="internet"), None)
    decision = policy.to_client(data, now) if towards_client else policy.from_client(data, now)
    assert decision.allowed or decision.reason is not None


def _reference_decision(policy: ClientPolicy, packet: bytes, now: float, towards_client: bool) -> Decision:
    """The policy's full path, without its flow table."""
    if not policy._valid_from <= now < policy._valid_until:
        policy._rebuild(now)
    return policy._decide_to_client(packet) if towards_client else policy._decide_from_client(packet)


FLOW_RESOURCE_V4 = [ipaddress.IPv4Address(a) for a in ("172.20.0.10", "172.20.0.10", "172.20.1.1", "8.8.8.8")]
FLOW_OTHERS_V4 = [ipaddress.IPv4Address(a) for a in ("100.64.0.9", "100.96.0.3", "224.0.0.1", "10.0.0.1")]
FLOW_PORTS = [53, 80, 5201]
OTHER_CLIENT4 = ipaddress.IPv4Address("100.64.0.8")


FLOW_FILTERS: list[list[Filter]] = [
    [],
    [PortFilter(protocol="tcp", port_range_start=80, port_range_end=80)],
    [PortFilter(protocol="udp", port_range_start=53, port_range_end=80)],
    [PortFilter(protocol="tcp", port_range_start=5000, port_range_end=6000), IcmpFilter(protocol="icmp")],
]


@st.composite
def flow_grants(draw: st.DrawFn) -> tuple[Literal["grant"], Resource, float | None]:
    """A CIDR grant covering some of the flows' resource addresses, with filters that tell their ports apart."""
    network = draw(st.sampled_from(["172.20.0.0/24", "172.20.0.0/16", "172.20.0.10/32", "0.0.0.0/0", "100.96.0.0/11"]))
    resource = CidrResource(
        id=draw(st.sampled_from(RESOURCE_IDS)),
        type="cidr",
        address=ipaddress.ip_network(network),
        filters=draw(st.sampled_from(FLOW_FILTERS)),
    )
    return ("grant", resource, draw(st.sampled_from(EXPIRIES)))


@st.composite
def flows(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(towards the client, a raw IPv4 TCP/UDP packet) between the client (or the gateway) and a resource address;
    few addresses and ports, so that flows share addresses and differ in a port."""
    towards_client = draw(st.booleans())
    own = draw(st.sampled_from([CLIENT4, CLIENT4, CLIENT4, OTHER_CLIENT4, GATEWAY4]))
    other = draw(st.sampled_from(FLOW_RESOURCE_V4 * 3 + FLOW_OTHERS_V4))
    protocol = draw(st.sampled_from([6, 17]))
    own_port, other_port = draw(st.sampled_from([40000, 80])), draw(st.sampled_from(FLOW_PORTS))
    src, dst, sport, dport = (
        (other, own, other_port, own_port) if towards_client else (own, other, own_port, other_port)
    )
    l4 = (
        struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x10, 1000, 0, 0)
        if protocol == 6
        else struct.pack("!HHHH", sport, dport, 8 + 4, 0)
    ) + b"data"
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, protocol, 0, src.packed, dst.packed)
    return towards_client, header + l4


@st.composite
def variants(draw: st.DrawFn, packet: bytes) -> bytes:
    """The packet, often with one header field the flow table relies on changed, sometimes cut short."""
    changed = bytearray(packet)
    field = draw(st.sampled_from(["none", "none", "version", "length", "fragment", "protocol", "address", "port"]))
    if field == "version":
        changed[0] = draw(st.sampled_from([0x44, 0x46, 0x65, 0x05]))
    elif field == "length":  # the total length: below the transport header, just right, beyond the packet
        total = draw(st.sampled_from([0, 20, 27, 28, 39, 40, len(packet) - 1, len(packet) + 1, 0x1FF]))
        changed[2:4] = total.to_bytes(2, "big")
    elif field == "fragment":  # more-fragments, an offset, the reserved bit, DF cleared
        changed[6:8] = draw(st.sampled_from([b"\x20\x00", b"\x00\x01", b"\x1f\xff", b"\x80\x00", b"\x00\x00"]))
    elif field == "protocol":
        changed[9] = draw(st.sampled_from([1, 6, 17, 47]))
    elif field == "address":
        changed[draw(st.integers(12, 19))] ^= draw(st.sampled_from([1, 0x80]))
    elif field == "port":
        at = draw(st.integers(20, 23))
        changed[at] = draw(st.sampled_from([0, 0x14, 0x35, 0x50, 0xFF]))  # 0x14 0x51 = 5201, 0x35 = 53, 0x50 = 80
    if draw(st.integers(0, 7)) == 0:
        changed = changed[: draw(st.integers(0, len(changed)))]
    return bytes(changed)


FlowStep = (
    tuple[Literal["grant"], Resource, float | None]
    | tuple[Literal["revoke"], str]
    | tuple[Literal["expire"], float]
    | tuple[Literal["clock"], float]
    | tuple[Literal["renumber"], bool]
    | tuple[Literal["packet"], int]
)


@st.composite
def flow_steps(draw: st.DrawFn) -> FlowStep:
    """Mostly packets: runs of them between changes let the flow table answer."""
    kind = draw(st.sampled_from(["packet"] * 12 + ["grant", "revoke", "expire", "clock", "renumber"]))
    if kind == "grant":
        return draw(flow_grants())
    if kind == "revoke":
        return ("revoke", draw(st.sampled_from(RESOURCE_IDS)))
    if kind == "expire":
        return ("expire", draw(st.sampled_from(TIMES)))
    if kind == "clock":
        return ("clock", draw(st.sampled_from(TIMES)))
    if kind == "renumber":  # the client's or the gateway's tunnel addresses swap with another's
        return ("renumber", draw(st.booleans()))
    return ("packet", draw(st.integers(0, 3)))


@settings(max_examples=300)
@given(
    st.lists(flow_grants(), min_size=1, max_size=4),
    st.lists(flows(), min_size=1, max_size=4),
    st.sampled_from(TIMES),
    st.lists(flow_steps(), min_size=10, max_size=60),
    st.data(),
)
def test_the_flow_table_gives_what_the_full_path_gives(
    setup: list[FlowStep], packets: list[tuple[bool, bytes]], now: float, more: list[FlowStep], data: st.DataObject
) -> None:
    """Packets of a few flows (each seen several times, so the flow table answers), some with a header byte changed
    or cut short, between grants, revocations, expiries, clock changes and new tunnel addresses: the policy decides
    as its full path does for a twin that went through the same changes, and counts the same drops. (New tunnel
    addresses are also pinned by tests/unit/test_policy.py's renumbering tests.)"""
    fast_drops, reference_drops = DropCounter(), DropCounter()
    fast = ClientPolicy(CLIENT4, CLIENT6, GATEWAY4, GATEWAY6, drops=fast_drops)
    reference = ClientPolicy(CLIENT4, CLIENT6, GATEWAY4, GATEWAY6, drops=reference_drops)
    for step in [*setup, *more]:
        if step[0] == "packet":
            towards_client, original = packets[step[1] % len(packets)]
            packet = data.draw(variants(original))
            got = fast.to_client(packet, now) if towards_client else fast.from_client(packet, now)
            assert got == _reference_decision(reference, packet, now, towards_client), packet.hex()
        elif step[0] == "clock":
            now = step[1]  # the same grants may be live or expired at the new time
        elif step[0] == "renumber":
            for policy in (fast, reference):
                if step[1]:
                    client = policy.client_ipv4
                    policy.set_client_addresses(OTHER_CLIENT4 if client == CLIENT4 else CLIENT4, CLIENT6)
                else:
                    gateway = None if policy._gateway_v4 == int(GATEWAY4) else GATEWAY4
                    policy.set_gateway_addresses(gateway, GATEWAY6)
        else:
            for policy in (fast, reference):
                if step[0] == "grant":
                    policy.grant(step[1], step[2])
                elif step[0] == "revoke":
                    policy.revoke(step[1])
                elif step[0] == "expire":
                    policy.expire(step[1])
    assert fast_drops.counts == reference_drops.counts
