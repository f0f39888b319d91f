"""Client churn through the real GatewayState + Node: per-client state goes when the client goes.

The soak (``make soak``) saw the gateway's RSS creep up while identities came and went. This replays that churn in the
simulated network, deterministically and in simulated time: rounds of ``LIVE`` clients (half of them only reachable
through a relay), each authorized, connected (ICE, WireGuard handshake), exchanging traffic with a resource (some
through a DNS resource's NAT) and leaving in one of the ways a client leaves a gateway (:class:`Departure`). After a
warm-up longer than every timer that legitimately keeps a departed client's traces (TURN channel bindings live
10 min after their last refresh and their numbers stay reserved 5 min more; finished ICE transactions are remembered
up to a count), the number of live clients is the same at every sample, so every table the gateway keeps and the
memory it holds must stop growing.

Besides the tables, two measures of memory, both exact and cheap: the bytes of every object reachable from the
GatewayState (its whole state, whatever table it sits in), and of everything reachable from the ``dataplane`` modules'
globals and class attributes (caches a module keeps for all its users). tracemalloc (3-4 times slower, and the
simulated clients and relays allocate through dataplane code too) only runs from ``python -m
tests.sim.test_churn_memory``, which prints every sample and the top growth by line of the allocations made while the
gateway handled something.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import gc
import logging
import statistics
import sys
import tracemalloc
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address

from dataplane import p2p_control, turn
from dataplane.dns_nat import IpAddress
from dataplane.gateway import AuthorizationOutcome, GatewayState, ResolveDomain
from dataplane.ice import agent as ice_agent
from dataplane.node import ConnectionEstablished, NodeRole
from tests.sim import relay as sim_relay
from tests.sim.gateway import DNS, GATEWAY_ID, LAN, PROXY4, GatewayWorld, SimClient, build_gateway_world
from tests.sim.harness import SimPeer
from tests.sim.nat import PORT_RESTRICTED_CONE, NatBox
from tests.sim.net import SimNetwork
from tests.sim.relay import SIM_EPOCH
from tests.sim.world import ipv4_udp

LIVE = 5  # clients per round, one per departure mode; in alternate rounds the odd or the even slots are relayed
ROUND = 30.0  # simulated seconds per round
EXCHANGES = 3  # packets each client sends (and gets answered) per round, EXCHANGE_INTERVAL apart
EXCHANGE_INTERVAL = 5.0
RESOURCE_IP = "172.20.0.10"  # in LAN


class Departure(enum.Enum):
    GOODBYE = "goodbye"  # the client says goodbye (p2p control), then goes
    REJECT_ACCESS = "reject_access"  # the portal takes its only resource away: the gateway says goodbye
    EXPIRY = "expiry"  # its authorization expires while it is connected: the gateway's tick evicts it
    SILENT_REUSED = "silent_reused"  # it vanishes; the same client id comes back next round with new keys (the soak)
    SILENT_EXPIRY = "silent_expiry"  # it vanishes; its authorization expires later (its connection failed meanwhile)


MODES = list(Departure)


@dataclass
class Member:
    client: SimClient
    departure: Departure
    relayed: bool
    dns: bool


@dataclass
class Sample:
    round: int
    tables: dict[str, int]
    state_bytes: int  # everything reachable from the GatewayState
    state_units: int  # the same, as objects plus container entries
    globals_bytes: int  # everything reachable from the dataplane modules' globals
    globals_units: int
    traced_bytes: int | None = None  # allocations made while the gateway handled input (exploration runs only)


@dataclass
class Churn:
    """Rounds of clients through one gateway world."""

    world: GatewayWorld
    members: list[Member] = field(default_factory=list)
    generation: int = 0
    serial: int = 0
    failures: list[str] = field(default_factory=list)
    paths: Counter[str] = field(default_factory=Counter)  # the clients' first paths, by kind

    @property
    def net(self) -> SimNetwork:
        return self.world.net

    def new_client(self, slot: int) -> Member:
        """A client on a host of its own behind a NAT of its own (new public address: new channel bindings); a
        relayed one cannot reach the gateway's address directly."""
        self.serial += 1
        n = self.serial
        departure = MODES[slot % len(MODES)]
        relayed = (slot + self.generation) % 2 == 1
        # SILENT_REUSED slots keep their client id from round to round (with new keys); all others are new clients.
        client_id = f"slot-{slot}" if departure is Departure.SILENT_REUSED else f"client-{n}"
        box = NatBox(f"nat-{n}", f"203.{n >> 8 & 255}.{n & 255}.1", PORT_RESTRICTED_CONE, seed=n)
        host = self.net.add_host(f"host-{n}", ["10.0.0.2"], realm=self.net.add_nat(box))
        if relayed:
            self.net.block(box.public_ip, self.world.gateway.host.addresses[0])
        peer = SimPeer(self.net, host, NodeRole.CLIENT, f"{client_id}/{n}", seed=1000 + n)
        peer.add_relays(sorted(self.world.relays.items()))
        tunnel = n % 60000 + 2
        client = SimClient.derived(
            peer,
            client_id,
            f"100.64.{tunnel >> 8}.{tunnel & 255}",
            f"fd00:2021:1111::1:{tunnel:x}",
            secret=f"{client_id}/{n}",
            nat=box,
        )
        self.world.portal.add_client(client)
        return Member(client, departure, relayed, dns=departure is Departure.GOODBYE)

    def remove_client(self, member: Member) -> None:
        client = member.client
        assert client.nat is not None
        self.net.remove_host(client.peer.host)
        self.net.remove_participant(client.peer)
        self.net.internet.nats.pop(client.nat.public_ip, None)
        self.net.unblock(client.nat.public_ip, self.world.gateway.host.addresses[0])
        if self.world.portal.clients.get(client.client_id) is client:
            del self.world.portal.clients[client.client_id]

    def run_round(self) -> None:
        start = self.net.now
        self.depart()
        self.members = [self.new_client(slot) for slot in range(LIVE)]
        self.net.run_for(2.0)  # the clients' relay allocations
        for member in self.members:
            expires_at = {Departure.EXPIRY: start + ROUND - 5.0, Departure.SILENT_EXPIRY: start + 1.5 * ROUND}.get(
                member.departure
            )
            wall_expiry = None if expires_at is None else SIM_EPOCH + expires_at
            for resource in (LAN, DNS) if member.dns else (LAN,):
                outcome = self.world.portal.authorize(member.client, resource, expires_at=wall_expiry)
                assert outcome is AuthorizationOutcome.ACCEPTED
        to_tun = self.world.gateway.to_tun
        hellos = {m.client.client_id: ipv4_udp(m.client.ipv4, RESOURCE_IP, b"hello") for m in self.members}
        for member in self.members:
            member.client.peer.send_packet(GATEWAY_ID, hellos[member.client.client_id])
        arrived: set[bytes] = set()

        def all_arrived() -> bool:
            arrived.update(p for _, p in to_tun)
            to_tun.clear()
            return all(h in arrived for h in hellos.values())

        if not self.net.run_until_true(all_arrived, timeout=30.0):
            self.failures.append(f"round {self.generation}: not every client came up")
        for member in self.members:
            if member.dns:
                member.client.peer.send_packet(
                    GATEWAY_ID, p2p_control.assigned_ips(DNS["id"], "app.corp.example", PROXY4)
                )
        self.net.run_for(1.0)
        for exchange in range(EXCHANGES):
            for member in self.members:
                client = member.client
                if member.departure is Departure.EXPIRY and self.net.now >= start + ROUND - 5.0:
                    continue
                sport = 4000 + exchange
                target = str(PROXY4[0]) if member.dns else RESOURCE_IP
                client.peer.send_packet(GATEWAY_ID, ipv4_udp(client.ipv4, target, b"ping", sport=sport, dport=53))
                answer = ipv4_udp(RESOURCE_IP, client.ipv4, b"pong", sport=53, dport=sport)
                self.world.gateway.from_resource(answer)
            self.net.run_for(EXCHANGE_INTERVAL)
            to_tun.clear()
        self.net.run_until(start + ROUND - 1.0)
        for member in self.members:
            for event in member.client.peer.events_of(ConnectionEstablished):
                self.paths[event.path.value] += 1
            member.client.peer.received.clear()
            member.client.peer.events.clear()
        self.world.gateway.outbound.clear()
        self.world.portal.refs.clear()
        self.generation += 1

    def depart(self) -> None:
        leaving, self.members = self.members, []
        for member in leaving:
            client = member.client
            if member.departure is Departure.GOODBYE:
                client.peer.send_packet(GATEWAY_ID, p2p_control.goodbye())
            elif member.departure is Departure.REJECT_ACCESS:
                self.world.portal.push("reject_access", {"client_id": client.client_id, "resource_id": LAN["id"]})
        self.net.run_for(1.0)  # goodbyes delivered before the hosts go
        for member in leaving:
            self.remove_client(member)


def build_churn(seed: int = 0) -> Churn:
    world = build_gateway_world(relays=2, seed=seed)

    def resolve(request: ResolveDomain) -> Sequence[IpAddress] | None:
        return [ip_address(RESOURCE_IP)]

    world.gateway.resolver = resolve
    return Churn(world)


# -- measuring ------------------------------------------------------------------------------------------------


def gateway_tables(state: GatewayState) -> dict[str, int]:
    """The size of every table the gateway keeps per client, per peer address or per transaction."""
    node = state.node
    tables: dict[str, int] = {
        "gateway.peers": len(state._peers),
        "gateway.peer_by_address": len(state._peer_by_address),
        "gateway.held": len(state._held),
        "gateway.pending_resolutions": len(state._pending_resolutions),
        "gateway.outbound": len(state._outbound),
        "gateway.events": len(state._events),
        "gateway.dns_nat_sessions": state.dns_nat_sessions,
        "node.connections": len(node._connections),
        "node.by_tunnel": len(node._by_tunnel),
        "node.by_agent": len(node._by_agent),
        "node.by_ufrags": len(node._by_ufrags),
        "node.by_selected": len(node._by_selected),
        "node.deadline_of": len(node._deadline_of),
        "node.timer_heap": len(node._timer_heap),
        "node.indices": len(node._indices),
        "node.agents.transactions": len(node._agents._transactions),
        "node.agents.pairs": len(node._agents._pairs),
        "node.agents.finished": len(node._agents._finished),
        "node.relays": len(node._relays),
        "node.relay_by_server": len(node._relay_by_server),
        "node.relay_by_relayed": len(node._relay_by_relayed),
        "node.retired": len(node._retired),
        "node.hosts": len(node._hosts),
        "node.transmits": len(node._transmits),
        "node.events": len(node._events),
        "node.rate_limiter": len(node._handshake_rate_limiter),
        "drop_reasons": len(node.drops.counts) + len(state.drops.counts),
    }
    # Summed over the relays: which relay a connection samples is random, the total is what the churn drives.
    allocations = [relay.allocation for relay in node._relays.values()]
    tables["turn.requests"] = sum(len(a._requests) for a in allocations)
    tables["turn.request_heap"] = sum(len(a._request_heap) for a in allocations)
    tables["turn.channels"] = sum(len(a._channels_by_number) for a in allocations)
    tables["turn.channels_by_peer"] = sum(len(a._channels_by_peer) for a in allocations)
    tables["turn.channel_heap"] = sum(len(a._channel_heap) for a in allocations)
    tables["turn.cooldown"] = sum(len(a._cooldown) for a in allocations)
    for conn in node._connections.values():
        agent = conn.agent
        for name, size in (
            ("ice.pairs", len(agent._pairs)),
            ("ice.outstanding", len(agent._outstanding)),
            ("ice.remote_candidates", len(agent._remote_candidates)),
            ("ice.local_candidates", len(agent._local_candidates)),
            ("ice.peer_reflexive", len(agent._peer_reflexive)),
            ("tunnel.keypairs", len(conn.tunnel._keypairs_by_index)),
        ):
            tables[f"max {name}"] = max(tables.get(f"max {name}", 0), size)
    return tables


# Shared by every gateway (types, modules, loggers, enum members, code): not the state's own memory.
_SHARED: tuple[type, ...] = (
    type,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.CodeType,
    logging.Logger,
    enum.Enum,
)


def _referents(obj: object) -> Iterable[object]:
    """What ``obj`` holds. A function holds its defaults and its closure's cells (not its module's globals: those are
    measured on their own), a bound method its instance."""
    if isinstance(obj, types.FunctionType):
        return [x for x in (obj.__defaults__, obj.__kwdefaults__, obj.__closure__) if x]
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    return gc.get_referents(obj)


def _external(obj: object) -> bool:
    """The simulation's own objects (what the wall clock's closure reaches: the whole simulated network)."""
    return type(obj).__module__.startswith("tests.")


@dataclass
class Reachable:
    """What a walk from some roots found: bytes (``sys.getsizeof``), and objects plus container entries (the
    content: unlike bytes it does not jump when a dict or list reallocates its table), by type name."""

    bytes: int = 0
    units: int = 0
    by_type: Counter[str] = field(default_factory=Counter)


_CONTAINERS = (dict, list, set, frozenset, tuple, collections.deque)


def reachable(roots: Iterable[object]) -> Reachable:
    """Every object reachable from ``roots``, shared and simulation objects excluded (roots themselves are walked
    into, not counted). A bounded ``functools.lru_cache`` counts as bounded and is not walked into."""
    seen: set[int] = set()
    stack: list[object] = []
    for root in roots:
        seen.add(id(root))
        stack.extend(_referents(root))
    found = Reachable()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _SHARED) or _external(obj):
            continue
        if isinstance(obj, functools._lru_cache_wrapper) and obj.cache_info().maxsize is not None:
            continue
        found.bytes += sys.getsizeof(obj)
        found.units += 1 + (len(obj) if isinstance(obj, _CONTAINERS) else 0)
        found.by_type[type(obj).__name__] += 1
        stack.extend(_referents(obj))
    return found


def dataplane_globals() -> list[object]:
    """The namespaces of every ``dataplane`` module and of the classes and functions defined in them (a cache, a
    mutable default or a class-level table lives there)."""
    roots: list[object] = []
    for name, module in sorted(sys.modules.items()):
        if name != "dataplane" and not name.startswith("dataplane."):
            continue
        roots.append(vars(module))
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == name:
                roots.append(value.__dict__)
            elif isinstance(value, types.FunctionType) and value.__module__ == name:
                roots.extend(x for x in (value.__defaults__, value.__kwdefaults__, value.__closure__) if x)
    return roots


def churn_sample(churn: Churn, number: int) -> tuple[Sample, Counter[str]]:
    gc.collect()
    state = churn.world.gateway.state
    owned = reachable([state])
    module_globals = reachable(dataplane_globals())
    sample = Sample(number, gateway_tables(state), owned.bytes, owned.units, module_globals.bytes, module_globals.units)
    return sample, owned.by_type


@dataclass
class ChurnRun:
    samples: list[Sample]
    failures: list[str]
    paths: Counter[str]
    types_growth: list[tuple[str, int]]  # objects reachable from the state, by type: last sample minus first
    growth_by_line: list[str]  # tracemalloc, when traced


# Allocations made while the gateway (SimGateway, or the portal stub calling GatewayState) was on the stack.
_GATEWAY_FRAMES = [tracemalloc.Filter(True, "*/tests/sim/gateway.py", all_frames=True)]
TRACE_FRAMES = 64


def run_churn(
    rounds: int, *, warm_up: int, seed: int = 0, trace: bool = False, on_sample: Callable[[Sample], None] | None = None
) -> ChurnRun:
    """``rounds`` rounds, sampled (at the same point of every round, all ``LIVE`` clients up) from round ``warm_up``
    on; with ``trace``, tracemalloc runs from then on too."""
    churn = build_churn(seed)
    samples: list[Sample] = []
    first_types: Counter[str] | None = None
    last_types: Counter[str] = Counter()
    snapshots: list[tracemalloc.Snapshot] = []
    tracing = False
    try:
        for number in range(rounds):
            if trace and number == warm_up:
                tracemalloc.start(TRACE_FRAMES)
                tracing = True
            churn.run_round()
            if number < warm_up:
                continue
            sample, by_type = churn_sample(churn, number)
            if tracing:
                snapshot = tracemalloc.take_snapshot().filter_traces(_GATEWAY_FRAMES)
                sample.traced_bytes = sum(trace.size for trace in snapshot.traces)
                snapshots.append(snapshot)
            first_types = by_type if first_types is None else first_types
            last_types = by_type
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
    finally:
        if tracing:
            tracemalloc.stop()
    types_growth = sorted(
        ((name, n - (first_types or Counter())[name]) for name, n in last_types.items()), key=lambda x: -x[1]
    )
    # The round tracing started in allocated what earlier rounds then freed: compare from the second snapshot.
    growth = [] if len(snapshots) < 3 else [str(s) for s in snapshots[-1].compare_to(snapshots[1], "lineno")[:12]]
    return ChurnRun(samples, churn.failures, churn.paths, types_growth[:10], growth)


@contextlib.contextmanager
def compressed_time(factor: float) -> Iterator[None]:
    """Shortens, by ``factor``, the timers that rightly keep a departed peer's traces for a while (TURN channel
    bindings and permissions, here and in the sim relay) and the count of finished ICE transactions remembered, so
    that a warm-up of a few simulated minutes outlasts them. Nothing else changes."""
    patched = [
        (turn, "CHANNEL_LIFETIME"),
        (turn, "CHANNEL_REFRESH_AFTER"),
        (turn, "CHANNEL_REBIND_TIMEOUT"),
        (sim_relay, "CHANNEL_LIFETIME"),
        (sim_relay, "CHANNEL_REBIND_TIMEOUT"),
        (sim_relay, "PERMISSION_LIFETIME"),
        (ice_agent, "FINISHED_TRANSACTIONS_KEPT"),
    ]
    saved = [(module, name, getattr(module, name)) for module, name in patched]
    try:
        for module, name, value in saved:
            setattr(module, name, type(value)(value / factor))
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


TIME_FACTOR = 10.0  # channels then live 60 s and stay reserved 30 s more: 3 rounds
WARM_UP = 4  # rounds before the first sample: past every compressed timer, the finished-transaction memory full
MEASURED = 8  # rounds sampled after it


def grew(values: Sequence[int], *, slack: float, margin: int = 0) -> bool:
    """Whether the median of the second half of ``values`` lies above the first half's by more than ``slack``
    (relative) plus ``margin``. Every sample is taken with the same clients up at the same point of a round, so at
    steady state both halves move within the same range (a TURN channel refreshed late, a relay's expiries landing
    just before a sample: single outliers the medians ignore), while a leak adds to every later sample."""
    half = len(values) // 2
    return statistics.median(values[half:]) > statistics.median(values[:half]) * (1 + slack) + margin


def test_churn_keeps_every_table_and_the_gateway_memory_flat() -> None:
    with compressed_time(TIME_FACTOR):
        result = run_churn(WARM_UP + MEASURED, warm_up=WARM_UP)
    assert result.failures == []
    rounds = WARM_UP + MEASURED
    assert result.paths["direct"] >= 2 * rounds and result.paths["relayed"] >= 2 * rounds, result.paths
    samples = result.samples
    assert len(samples) == MEASURED
    # The same clients are up at every sample: LIVE, minus the one whose authorization expired this round.
    assert {s.tables["node.connections"] for s in samples} == {LIVE - 1}
    assert {s.tables["gateway.peers"] for s in samples} == {LIVE - 1}
    growing = {
        name: series
        for name in samples[0].tables
        if grew(series := [s.tables[name] for s in samples], slack=0.1, margin=1)
    }
    assert growing == {}, f"tables still growing after the warm-up: {growing}"
    units = [s.state_units for s in samples]
    state_bytes = [s.state_bytes for s in samples]
    assert not grew(units, slack=0.005) and not grew(state_bytes, slack=0.05), (
        f"the gateway's state grew: {units} objects and entries, {state_bytes} bytes; "
        f"objects added, by type: {result.types_growth}"
    )
    module_units = [s.globals_units for s in samples]
    assert not grew(module_units, slack=0.0), f"the dataplane modules' globals grew: {module_units}"


if __name__ == "__main__":
    # Exploration: python -m tests.sim.test_churn_memory [ROUNDS [WARM_UP [FACTOR [TRACE]]]] (FACTOR 1: real timers;
    # TRACE 1: tracemalloc) prints every sample, then the growth by type and by line.
    import json
    import time

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else WARM_UP + MEASURED
    warm = int(sys.argv[2]) if len(sys.argv) > 2 else WARM_UP
    factor = float(sys.argv[3]) if len(sys.argv) > 3 else TIME_FACTOR
    traced = len(sys.argv) > 4 and sys.argv[4] == "1"
    began = time.process_time()

    def show(sample: Sample) -> None:
        numbers = {
            "state_bytes": sample.state_bytes,
            "state_units": sample.state_units,
            "globals_bytes": sample.globals_bytes,
            "globals_units": sample.globals_units,
            "traced_bytes": sample.traced_bytes,
        }
        print(json.dumps({"round": sample.round, **numbers, **sample.tables}), flush=True)

    with compressed_time(factor):
        outcome = run_churn(rounds, warm_up=warm, trace=traced, on_sample=show)
    print("cpu", round(time.process_time() - began, 1), "s; failures", outcome.failures, "; paths", outcome.paths)
    print("objects added, by type:", outcome.types_growth)
    print("\n".join(outcome.growth_by_line))
