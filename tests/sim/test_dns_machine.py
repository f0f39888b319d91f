"""A hypothesis state machine over DNS resources on the gateway (GatewayState in the simulated network), checked
against a naive model written from docs/protocol.md §3.4.

One client holds a CIDR resource for the resource LAN (so it never loses its last resource) and, at times, a DNS
resource ``*.corp.example``. Transitions: the names' records change (or their resolution fails), the client assigns a
slot of 8 proxy IPs to a name (a slot re-used for another name is the client re-numbering), the portal revokes and
re-grants the DNS resource, the client sends UDP to proxy IPs, resources answer translated sessions (and sessions that
ended, and from addresses no session knows), and time passes across the NAT lifetimes.

The model keeps the translations (proxy IP → name, real address), the routes (only while the resource is held), and
the UDP sessions with their outside port (the client's port when free for that real address, else the next one) and
their lifetimes (60 s unanswered, 120 s since the last packet); ended sessions' outside keys are remembered. Time is
advanced past every session end that falls near a packet, so the 1 Hz tick never has to be guessed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

from dataplane import p2p_control
from dataplane.dns_nat import IpAddress
from dataplane.gateway import AuthorizationOutcome, ResolveDomain
from tests.sim.gateway import GATEWAY_ID, GATEWAY_IPV4, LAN, GatewayWorld, SimClient, build_gateway_world
from tests.sim.test_gateway_state import connected_client, send
from tests.sim.world import ipv4_udp

DNS_ID = "res-dns"
DNS = {"id": DNS_ID, "type": "dns", "name": "corp", "address": "*.corp.example", "filters": []}
DOMAINS = ("a.corp.example", "b.corp.example", "other.example")  # the last is outside the pattern
REALS_V4 = ("172.20.0.10", "172.20.0.11")
REALS_V6 = ("fd99::10",)
SLOTS = 3
SPORTS = (1000, 1001, 2000)
DPORT = 53
UNANSWERED = 60.0
UDP_LIFETIME = 120.0
MARGIN = 1.6  # the gateway's tick is 1 Hz and a packet takes up to 0.5 s to arrive


def slot_proxies(slot: int) -> list[IpAddress]:
    v4: list[IpAddress] = [ipaddress.IPv4Address(f"100.96.{slot}.{i}") for i in range(1, 5)]
    v6: list[IpAddress] = [ipaddress.IPv6Address(f"fd00:2021:1111:8000::{slot}:{i}") for i in range(1, 5)]
    return v4 + v6


@dataclass
class Session:
    out_port: int
    real: str
    last_out: float
    last_in: float | None = None

    def ends_at(self) -> float:
        if self.last_in is None:
            return self.last_out + UNANSWERED
        return max(self.last_out, self.last_in) + UDP_LIFETIME


class DnsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world: GatewayWorld
        self.client: SimClient
        self.records: dict[str, list[str] | None] = {d: [REALS_V4[0]] for d in DOMAINS}
        self.authorized = True
        self.translations: dict[str, tuple[str, str | None]] = {}  # proxy → (domain, real)
        self.sessions: dict[tuple[int, str], Session] = {}  # (client port, proxy) → session
        self.expired: set[tuple[int, str]] = set()  # (outside port, real)

    @initialize()
    def build(self) -> None:
        self.world = build_gateway_world()
        self.world.gateway.resolver = self._resolve
        self.client = connected_client(self.world, LAN, DNS)
        self.assign(DOMAINS[0], 0)  # most paths worth exploring start from a working translation

    def _resolve(self, request: ResolveDomain) -> list[IpAddress] | None:
        found = self.records[request.domain]
        return None if found is None else [ipaddress.ip_address(a) for a in found]

    # -- time -----------------------------------------------------------------------------------------------------

    def _expire(self) -> None:
        now = self.world.net.now
        for key, session in list(self.sessions.items()):
            if session.ends_at() <= now:
                del self.sessions[key]
                self.expired.add((session.out_port, session.real))

    def _ensure_tunnel(self) -> None:
        """After a long idle time the WireGuard session has expired and the gateway never buffers: a packet from the
        client brings the tunnel up again before the packet under test."""
        hello = ipv4_udp(self.client.ipv4, GATEWAY_IPV4, b"hello")
        self.client.peer.send_packet(GATEWAY_ID, hello)
        assert self.world.net.run_until_true(lambda: any(p == hello for _, p in self.world.gateway.to_tun), timeout=30)
        self.world.gateway.to_tun.clear()

    def _settle(self) -> None:
        """Moves time on until no session ends within MARGIN of now, then applies the ends that passed."""
        while any(abs(s.ends_at() - self.world.net.now) < MARGIN for s in self.sessions.values()):
            self.world.net.run_for(MARGIN)
        self._expire()

    @rule(seconds=st.sampled_from([5.0, 30.0, 45.0, 55.0, 61.0, 100.0, 125.0]))
    def time_passes(self, seconds: float) -> None:
        self.world.net.run_for(seconds)
        self._settle()

    # -- DNS and the portal ---------------------------------------------------------------------------------------

    @rule(
        domain=st.sampled_from(DOMAINS),
        v4=st.lists(st.sampled_from(REALS_V4), unique=True, max_size=2),
        v6=st.lists(st.sampled_from(REALS_V6), unique=True, max_size=1),
        fails=st.booleans(),
    )
    def records_change(self, domain: str, v4: list[str], v6: list[str], fails: bool) -> None:
        self.records[domain] = None if fails else v4 + v6

    @rule()
    def revoke(self) -> None:
        self.world.portal.push("reject_access", {"client_id": self.client.client_id, "resource_id": DNS_ID})
        self.world.net.run_for(0.1)
        self.authorized = False

    @rule()
    def grant(self) -> None:
        assert self.world.portal.authorize(self.client, DNS) is AuthorizationOutcome.ACCEPTED
        self.world.net.run_for(0.1)
        self.authorized = True

    @rule(domain=st.sampled_from(DOMAINS), slot=st.integers(0, SLOTS - 1))
    def assign(self, domain: str, slot: int) -> None:
        self._ensure_tunnel()
        self._settle()
        self.client.peer.received.clear()
        proxies = slot_proxies(slot)
        send(self.world, self.client, p2p_control.assigned_ips(DNS_ID, domain, proxies))
        records = self.records[domain]
        active = self.authorized and domain.endswith(".corp.example") and records is not None
        if active:
            assert records is not None
            if any(self.translations.get(str(p), (domain,))[0] != domain for p in proxies):
                self.translations.clear()
                self.sessions.clear()
                self.expired.clear()
            for version in (4, 6):
                reals = sorted(ipaddress.ip_address(a) for a in records if ipaddress.ip_address(a).version == version)
                family = sorted(p for p in proxies if p.version == version)
                for index, proxy in enumerate(family):
                    real = str(reals[index % len(reals)]) if reals else None
                    self.translations[str(proxy)] = (domain, real)
        statuses = [
            p2p_control.parse_domain_status(message.body)
            for _, packet in self.client.peer.received
            if (message := p2p_control.parse(packet)) is not None
        ]
        assert statuses == [p2p_control.DomainStatus(DNS_ID, domain, active)]

    # -- packets ----------------------------------------------------------------------------------------------------

    @rule(slot=st.integers(0, SLOTS - 1), index=st.integers(0, 7), sport=st.sampled_from(SPORTS))
    def client_sends(self, slot: int, index: int, sport: int) -> None:
        self._ensure_tunnel()
        self._settle()
        proxy = slot_proxies(slot)[index]
        if proxy.version == 4:
            packet = bytes(IP(src=self.client.ipv4, dst=str(proxy)) / UDP(sport=sport, dport=DPORT) / b"q")
        else:
            packet = bytes(IPv6(src=self.client.ipv6, dst=str(proxy)) / UDP(sport=sport, dport=DPORT) / b"q")
        self.world.gateway.to_tun.clear()
        self.client.peer.received.clear()
        send(self.world, self.client, packet)
        tun = [p for _, p in self.world.gateway.to_tun]
        replies = [p for _, p in self.client.peer.received]
        translation = self.translations.get(str(proxy))
        if not self.authorized or translation is None:
            assert tun == [] and [icmp_kind(r) for r in replies] == ["prohibited"]
            return
        real = translation[1]
        if real is None:
            assert tun == [] and [icmp_kind(r) for r in replies] == ["network"]
            return
        # An inside key keeps its session (and the real address it was opened to) until the session ends.
        session = self.sessions.get((sport, str(proxy)))
        if session is None:
            used = {(s.out_port, s.real) for s in self.sessions.values()}
            out_port = sport
            while (out_port, real) in used:
                out_port += 1
            session = self.sessions[(sport, str(proxy))] = Session(out_port, real, self.world.net.now)
            self.expired.discard((out_port, real))
        session.last_out = self.world.net.now
        assert replies == [] and len(tun) == 1
        parsed = IP(tun[0]) if proxy.version == 4 else IPv6(tun[0])
        assert (parsed.dst, parsed[UDP].sport, parsed[UDP].dport) == (session.real, session.out_port, DPORT)

    @rule(data=st.data())
    def resource_answers(self, data: st.DataObject) -> None:
        self._ensure_tunnel()
        self._settle()
        known = [(s.out_port, s.real) for s in self.sessions.values()]
        choices = sorted({*known, *self.expired, (3000, REALS_V4[0]), (3000, REALS_V6[0])})
        out_port, real = data.draw(st.sampled_from(choices))
        address = ipaddress.ip_address(real)
        client_address = self.client.ipv4 if address.version == 4 else self.client.ipv6
        layer = IP if address.version == 4 else IPv6
        self.client.peer.received.clear()
        self.world.gateway.from_resource(bytes(layer(src=real, dst=client_address) / UDP(sport=DPORT, dport=out_port)))
        self.world.net.run_for(0.5)
        received = [p for _, p in self.client.peer.received]
        inside = next(((k, s) for k, s in self.sessions.items() if (s.out_port, s.real) == (out_port, real)), None)
        if inside is not None:
            (sport, proxy), session = inside
            session.last_in = self.world.net.now
            if not self.authorized:
                assert received == []  # translated, but the proxy IP is not routed any more
                return
            assert len(received) == 1
            parsed = layer(received[0])
            assert (parsed.src, parsed[UDP].sport, parsed[UDP].dport) == (proxy, DPORT, sport)
        elif (out_port, real) in self.expired:
            assert received == []  # a late reply to a session that ended
        else:
            # No session: CIDR traffic, judged by the policy as is (the LAN covers the IPv4 addresses only).
            expected = 1 if address in ipaddress.ip_network(LAN["address"]) else 0
            assert len(received) == expected
            if expected:
                assert (layer(received[0]).src, layer(received[0])[UDP].dport) == (real, out_port)

    @invariant()
    def client_keeps_its_peer(self) -> None:
        assert self.world.gateway.state.peer(self.client.client_id) is not None

    @invariant()
    def sessions_match_the_model(self) -> None:
        """As many NAT sessions live in the gateway as in the model (checked when no session end is near)."""
        if not hasattr(self, "world"):
            return
        if any(abs(s.ends_at() - self.world.net.now) < MARGIN for s in self.sessions.values()):
            return
        self._expire()
        nat = self.world.gateway.state._peers[self.client.client_id].nat  # white box: the count is not exported
        assert nat.session_count == len(self.sessions)


def icmp_kind(packet: bytes) -> str:
    if packet[0] >> 4 == 4:
        icmp = IP(packet)[ICMP]
        return {(3, 13): "prohibited", (3, 0): "network"}.get((icmp.type, icmp.code), "other")
    icmp6 = IPv6(packet)[ICMPv6DestUnreach]
    return {1: "prohibited", 3: "network"}.get(icmp6.code, "other")


DnsMachine.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_dns_machine = pytest.mark.timeout(600)(DnsMachine.TestCase)
