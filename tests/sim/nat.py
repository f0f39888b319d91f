"""NAT boxes with the RFC 4787 behaviours, and the oracle that says when two of them allow a direct path.

Mapping (RFC 4787 §4.1): endpoint-independent (one public port per internal endpoint), address-dependent (per
destination IP) or address-and-port-dependent (per destination endpoint, the "symmetric" NAT). Filtering (§5):
endpoint-independent (anyone may send to a mapping), address-dependent (only IPs the mapping sent to) or
address-and-port-dependent (only endpoints it sent to). Port assignment (§4.2.1): preserving (the internal port if free)
or random. Mappings expire after ``mapping_timeout`` seconds without outbound traffic (§4.3: ≥ 120 s recommended).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from dataplane.base import Address, DropCounter
from tests.sim.net import Realm, SimDropReason


class Mapping(enum.Enum):
    ENDPOINT_INDEPENDENT = "eim"
    ADDRESS_DEPENDENT = "adm"
    ADDRESS_AND_PORT_DEPENDENT = "apdm"


class Filtering(enum.Enum):
    ENDPOINT_INDEPENDENT = "eif"
    ADDRESS_DEPENDENT = "adf"
    ADDRESS_AND_PORT_DEPENDENT = "apdf"


class PortAssignment(enum.Enum):
    PRESERVING = "preserving"
    RANDOM = "random"


@dataclass(frozen=True)
class NatBehaviour:
    mapping: Mapping
    filtering: Filtering
    ports: PortAssignment = PortAssignment.PRESERVING

    @property
    def label(self) -> str:
        return f"{self.mapping.value}/{self.filtering.value}/{self.ports.value}"


FULL_CONE = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT)
RESTRICTED_CONE = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_DEPENDENT)
PORT_RESTRICTED_CONE = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT)
SYMMETRIC = NatBehaviour(
    Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT, PortAssignment.RANDOM
)


@dataclass
class _Binding:
    internal: Address
    public_port: int
    key: tuple[object, ...]
    last_outbound: float
    contacted: set[Address] = field(default_factory=set)


class NatBox:
    """One NAT router; the network calls :meth:`outbound` and :meth:`inbound` for datagrams crossing it."""

    FIRST_PORT = 1024
    LAST_PORT = 65535

    def __init__(
        self,
        name: str,
        public_ip: str,
        behaviour: NatBehaviour,
        *,
        seed: int = 0,
        latency: float = 0.001,
        mapping_timeout: float = 120.0,
    ) -> None:
        self.name = name
        self.public_ip = public_ip
        self.behaviour = behaviour
        self.latency = latency
        self.mapping_timeout = mapping_timeout
        self.drops = DropCounter()
        self.outside: Realm | None = None
        self.inside: Realm = Realm(f"inside-{name}")
        self._random = random.Random(seed)
        self._by_key: dict[tuple[object, ...], _Binding] = {}
        self._by_port: dict[int, _Binding] = {}

    def attach(self, outside: Realm, inside: Realm) -> None:
        self.outside = outside
        self.inside = inside

    def is_public_address(self, address: Address) -> bool:
        return address[0] == self.public_ip

    @property
    def mappings(self) -> int:
        return len(self._by_key)

    def reset(self) -> None:
        """The box reboots: every mapping is forgotten."""
        self._by_key.clear()
        self._by_port.clear()

    def _key(self, internal: Address, remote: Address) -> tuple[object, ...]:
        mapping = self.behaviour.mapping
        if mapping is Mapping.ENDPOINT_INDEPENDENT:
            return (internal,)
        if mapping is Mapping.ADDRESS_DEPENDENT:
            return (internal, remote[0])
        return (internal, remote)

    def _expire(self, now: float) -> None:
        stale = [b for b in self._by_key.values() if now - b.last_outbound >= self.mapping_timeout]
        for binding in stale:
            del self._by_key[binding.key]
            del self._by_port[binding.public_port]

    def _allocate_port(self, internal: Address) -> int:
        if self.behaviour.ports is PortAssignment.PRESERVING and internal[1] not in self._by_port:
            return internal[1]
        while True:
            port = self._random.randint(self.FIRST_PORT, self.LAST_PORT)
            if port not in self._by_port:
                return port

    def outbound(self, src: Address, dst: Address, now: float) -> Address | None:
        """Translates an inside source to the public one, creating or refreshing a mapping."""
        self._expire(now)
        key = self._key(src, dst)
        binding = self._by_key.get(key)
        if binding is None:
            binding = _Binding(src, self._allocate_port(src), key, now)
            self._by_key[key] = binding
            self._by_port[binding.public_port] = binding
        binding.last_outbound = now
        binding.contacted.add(dst)
        return (self.public_ip, binding.public_port)

    def inbound(self, src: Address, dst: Address, now: float) -> Address | None:
        """Translates a datagram to the public address back inside, if a mapping exists and the filter lets it in."""
        self._expire(now)
        binding = self._by_port.get(dst[1])
        if binding is None:
            self.drops.drop(SimDropReason.NAT_NO_MAPPING)
            return None
        filtering = self.behaviour.filtering
        if filtering is Filtering.ADDRESS_DEPENDENT and all(c[0] != src[0] for c in binding.contacted):
            self.drops.drop(SimDropReason.NAT_FILTERED)
            return None
        if filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT and src not in binding.contacted:
            self.drops.drop(SimDropReason.NAT_FILTERED)
            return None
        return binding.internal


def direct_path_possible(a: NatBehaviour | None, b: NatBehaviour | None) -> bool:
    """The oracle: can ICE find a direct path between hosts behind ``a`` and ``b`` (None = public address)?

    Candidates are host, server-reflexive (learned from the relay, a third party) and peer-reflexive ones. An
    endpoint-independent mapping makes the srflx candidate valid towards the peer, so two such NATs always punch
    through (each side's checks open its own filter for the other). Behind a destination-dependent mapping the
    side's srflx is useless; the peer can still be reached from a fresh mapping if the peer's NAT keeps one public
    port (endpoint-independent mapping) and its filter only checks the IP that its own checks already contacted
    (endpoint-independent or address-dependent filtering). Two destination-dependent mappings never meet.
    """
    if a is None and b is None:
        return True
    if a is None or b is None:
        nat = a or b
        assert nat is not None
        # The public side can be reached directly; the NAT side's replies go out through its own mapping.
        return True
    a_cone = a.mapping is Mapping.ENDPOINT_INDEPENDENT
    b_cone = b.mapping is Mapping.ENDPOINT_INDEPENDENT
    if a_cone and b_cone:
        return True
    if not a_cone and not b_cone:
        return False
    cone = a if a_cone else b
    return cone.filtering is not Filtering.ADDRESS_AND_PORT_DEPENDENT
