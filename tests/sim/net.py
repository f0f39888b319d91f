"""A deterministic simulated UDP network: fake clock, hosts, per-link latency, NAT boxes, loss.

Time only moves when :meth:`SimNetwork.step` jumps it to the earliest thing that can happen: a datagram arriving or a
participant's ``poll_timeout``. Nothing reads the real clock, and every random choice comes from one seeded generator,
so a scenario replays exactly.

Topology model: every host and NAT box lives in a *realm*. The root realm is the public internet; every NAT box owns
one inside realm and has a public address in its parent realm. A datagram addressed to an IP of the sender's realm is
delivered there; otherwise it climbs through the realm's NAT (outbound translation) and is looked up again. A datagram
reaching a NAT's public address descends through inbound translation and filtering.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dataplane.base import Address, DropCounter

if TYPE_CHECKING:
    from tests.sim.nat import NatBox

DatagramHandler = Callable[[bytes, Address, Address, float], None]
"""Receives (payload, source, local address it arrived on, now)."""


class SimDropReason(enum.Enum):
    NO_ROUTE = "no_route"
    NO_LISTENER = "no_listener"
    LOST = "lost"
    HOST_OFFLINE = "host_offline"
    BLOCKED = "blocked"
    NAT_NO_MAPPING = "nat_no_mapping"
    NAT_FILTERED = "nat_filtered"
    NAT_HAIRPIN = "nat_hairpin"


class Participant(Protocol):
    """Anything with timers: the network wakes it at its deadline; it then sends what it has to send."""

    def next_wakeup(self) -> float | None: ...

    def wake(self, now: float) -> None: ...


@dataclass(eq=False)
class Realm:
    """One addressing domain: the internet, or the inside of one NAT box."""

    name: str
    nat: NatBox | None = None  # the box that leads out of this realm; None for the internet
    hosts: dict[str, SimHost] = field(default_factory=dict)  # by IP
    nats: dict[str, NatBox] = field(default_factory=dict)  # inner boxes, by their public IP in this realm


@dataclass(frozen=True, slots=True)
class Delivered:
    """One datagram as the network saw it arrive (kept for assertions)."""

    time: float
    host: str
    src: Address
    dst: Address
    payload: bytes


class SimHost:
    """An end host with one or more addresses; sockets are (ip, port) → handler."""

    def __init__(self, network: SimNetwork, name: str, realm: Realm, addresses: list[str], latency: float) -> None:
        self.network = network
        self.name = name
        self.realm = realm
        self.addresses = list(addresses)
        self.latency = latency
        self.loss = 0.0
        self.online = True
        self._sockets: dict[Address, DatagramHandler] = {}
        self._wildcard_ports: dict[int, DatagramHandler] = {}

    def bind(self, port: int, handler: DatagramHandler, ip: str | None = None) -> None:
        """Listens on ``port`` of one address, or of every address (also ones added later) when ``ip`` is None."""
        if ip is None:
            self._wildcard_ports[port] = handler
        else:
            if ip not in self.addresses:
                raise ValueError(f"{self.name} has no address {ip}")
            self._sockets[(ip, port)] = handler

    def unbind(self, port: int, ip: str | None = None) -> None:
        if ip is None:
            self._wildcard_ports.pop(port, None)
        else:
            self._sockets.pop((ip, port), None)

    def is_bound(self, port: int, ip: str) -> bool:
        return (ip, port) in self._sockets or port in self._wildcard_ports

    def send(self, src: Address, dst: Address, payload: bytes) -> None:
        if src[0] not in self.addresses:
            raise ValueError(f"{self.name} cannot send from {src}: not one of its addresses {self.addresses}")
        self.network.send_from(self, src, dst, payload)

    def handler_for(self, local: Address) -> DatagramHandler | None:
        return self._sockets.get(local) or self._wildcard_ports.get(local[1])

    def __repr__(self) -> str:
        return f"SimHost({self.name}, {self.addresses})"


class SimNetwork:
    """The world: realms, hosts, NAT boxes, datagrams in flight and the fake clock."""

    def __init__(self, *, seed: int = 0, start: float = 0.0, max_hops: int = 8) -> None:
        self.now = start
        self.random = random.Random(seed)
        self.internet = Realm("internet")
        self.drops = DropCounter()
        self.record_deliveries = False
        self.delivered: list[Delivered] = []
        self.blocked: set[tuple[str, str]] = set()  # (ip, ip) pairs that cannot talk, in either direction
        self._participants: list[Participant] = []
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = 0
        self._max_hops = max_hops

    # -- building the world ------------------------------------------------------------------------------------

    def add_host(
        self, name: str, addresses: list[str], *, realm: Realm | None = None, latency: float = 0.005
    ) -> SimHost:
        realm = realm or self.internet
        host = SimHost(self, name, realm, addresses, latency)
        for ip in addresses:
            self._claim(realm, ip)
            realm.hosts[ip] = host
        return host

    def add_nat(self, box: NatBox, *, realm: Realm | None = None) -> Realm:
        """Places ``box`` with its public IP in ``realm`` (default: the internet); returns its inside realm."""
        outer = realm or self.internet
        self._claim(outer, box.public_ip)
        outer.nats[box.public_ip] = box
        inside = Realm(f"inside-{box.name}", nat=box)
        box.attach(outer, inside)
        return inside

    def move_host(self, host: SimHost, addresses: list[str], realm: Realm | None = None) -> None:
        """Roaming: the host leaves its realm and appears with new addresses (sockets keep their ports)."""
        for ip in host.addresses:
            host.realm.hosts.pop(ip, None)
        host.realm = realm or host.realm
        host.addresses = list(addresses)
        for ip in addresses:
            self._claim(host.realm, ip)
            host.realm.hosts[ip] = host
        host._sockets = {}

    def remove_host(self, host: SimHost) -> None:
        for ip in host.addresses:
            host.realm.hosts.pop(ip, None)
        host.online = False

    def add_participant(self, participant: Participant) -> None:
        self._participants.append(participant)

    def remove_participant(self, participant: Participant) -> None:
        self._participants = [p for p in self._participants if p is not participant]

    def block(self, ip_a: str, ip_b: str) -> None:
        self.blocked.add((ip_a, ip_b))
        self.blocked.add((ip_b, ip_a))

    def unblock(self, ip_a: str, ip_b: str) -> None:
        self.blocked.discard((ip_a, ip_b))
        self.blocked.discard((ip_b, ip_a))

    def _claim(self, realm: Realm, ip: str) -> None:
        if ip in realm.hosts or ip in realm.nats:
            raise ValueError(f"{ip} is already used in {realm.name}")

    # -- time ---------------------------------------------------------------------------------------------------

    def schedule(self, at: float, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._queue, (max(at, self.now), self._sequence, action))

    def next_event_time(self) -> float | None:
        candidates = [t for t in (self._earliest_wakeup(), self._queue[0][0] if self._queue else None) if t is not None]
        return min(candidates) if candidates else None

    def _earliest_wakeup(self) -> float | None:
        """The earliest deadline a participant asks for, asking every participant. A subclass that caches deadlines
        (asking again only the participants that took input) overrides this and :meth:`_wake_due`."""
        return min((t for p in self._participants if (t := p.next_wakeup()) is not None), default=None)

    def step(self, limit: float | None = None) -> bool:
        """Advances to the next event (not beyond ``limit``) and runs everything due then; False if idle."""
        at = self.next_event_time()
        if at is None or (limit is not None and at > limit):
            if limit is not None:
                self.now = max(self.now, limit)
            return False
        self.now = max(self.now, at)
        while self._queue and self._queue[0][0] <= self.now:
            _, _, action = heapq.heappop(self._queue)
            action()
        self._wake_due()
        return True

    def _wake_due(self) -> None:
        """Wakes every participant whose deadline has come (a subclass caching deadlines overrides this too)."""
        for participant in list(self._participants):
            wakeup = participant.next_wakeup()
            if wakeup is not None and wakeup <= self.now:
                participant.wake(self.now)

    def run_for(self, duration: float) -> None:
        self.run_until(self.now + duration)

    def run_until(self, deadline: float, *, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.step(limit=deadline):
                return
        raise RuntimeError("simulation did not settle: too many steps (a participant's timer never advances?)")

    def run_until_true(self, condition: Callable[[], bool], *, timeout: float, max_steps: int = 1_000_000) -> bool:
        """Steps until ``condition()`` holds; False if ``timeout`` simulated seconds pass first."""
        deadline = self.now + timeout
        for _ in range(max_steps):
            if condition():
                return True
            if not self.step(limit=deadline):
                return condition()
        raise RuntimeError("simulation did not settle: too many steps")

    # -- routing ------------------------------------------------------------------------------------------------

    def send_from(self, host: SimHost, src: Address, dst: Address, payload: bytes) -> None:
        if not host.online:
            self.drops.drop(SimDropReason.HOST_OFFLINE)
            return
        if host.loss and self.random.random() < host.loss:
            self.drops.drop(SimDropReason.LOST)
            return
        self._route(host.realm, src, dst, bytes(payload), host.latency, hops=0, origin_ip=src[0])

    def _route(
        self, realm: Realm, src: Address, dst: Address, payload: bytes, delay: float, hops: int, origin_ip: str
    ) -> None:
        if hops > self._max_hops:
            self.drops.drop(SimDropReason.NO_ROUTE)
            return
        target = realm.hosts.get(dst[0])
        if target is not None:
            if (origin_ip, dst[0]) in self.blocked or (src[0], dst[0]) in self.blocked:
                self.drops.drop(SimDropReason.BLOCKED)
                return
            self._deliver_later(target, src, dst, payload, delay + target.latency)
            return
        inner = realm.nats.get(dst[0])
        if inner is not None:
            translated = inner.inbound(src, dst, self.now)
            if translated is None:
                return  # the box counted why
            self._route(inner.inside, src, translated, payload, delay + inner.latency, hops + 1, origin_ip)
            return
        if realm.nat is not None:
            box = realm.nat
            if box.is_public_address(dst):
                self.drops.drop(SimDropReason.NAT_HAIRPIN)
                return
            outside_src = box.outbound(src, dst, self.now)
            if outside_src is None:
                return
            assert box.outside is not None
            self._route(box.outside, outside_src, dst, payload, delay + box.latency, hops + 1, origin_ip)
            return
        self.drops.drop(SimDropReason.NO_ROUTE)

    def _deliver_later(self, host: SimHost, src: Address, dst: Address, payload: bytes, delay: float) -> None:
        def deliver() -> None:
            if not host.online or dst[0] not in host.addresses:
                self.drops.drop(SimDropReason.HOST_OFFLINE)
                return
            handler = host.handler_for(dst)
            if handler is None:
                self.drops.drop(SimDropReason.NO_LISTENER)
                return
            if self.record_deliveries:
                self.delivered.append(Delivered(self.now, host.name, src, dst, payload))
            handler(payload, src, dst, self.now)

        self.schedule(self.now + delay, deliver)
