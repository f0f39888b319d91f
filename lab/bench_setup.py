"""``python -m lab.bench_setup``: the gateway's CPU time per client setup, N clients arriving at once, in-process.

The real :class:`~dataplane.gateway.GatewayState` (on the simulated network of ``tests/sim``: fake clock, in-memory
datagrams, a TURN relay written independently of ``dataplane/turn.py``) gets ``init`` with one relay, then N client
Nodes -- each with its own keys and its own relay allocation, behind its own NAT (``--client-nat``) so that it offers
host, server-reflexive and relayed candidates as the lab's load generator does -- are authorized at the same instant
with ``create_authorization``. Candidates travel both ways through the portal stub (``ice_candidates`` /
``broadcast_ice_candidates``), the clients run their ICE checks, the WireGuard handshake, and send one ICMP echo
request to a resource behind the gateway, which the "resource" answers at once. The run ends when every client has
its echo reply.

Only the gateway's work is timed (thread CPU time): portal messages, datagrams in (with the transmits, events and
portal messages they cause), the resource's answer read from the TUN, timers, and the ``poll_timeout`` a driver asks
after each of those. The figures: gateway CPU µs per client setup, split by what the gateway was handling, and the
simulated setup times (authorization → echo reply; the clock is fake, so they show protocol round trips and timers,
not CPU queueing). ``--profile N`` prints the N hottest functions of the gateway's work (cProfile, by own time and by
cumulative time).

Runs from a checkout (it imports the simulation in ``tests/sim``).

``--spread S`` authorizes the clients evenly over S seconds instead of in one instant (then the setup window holds the
earlier clients' ongoing checks too).

The gateway is a single server on the fake clock (``--cpu-queue``, the default): each call's measured CPU time keeps it
busy for that long in simulated time, datagrams that arrive meanwhile wait in a FIFO queue (its depth is the receive
queue the real driver reports to the handshake-load rule, at 832 bytes of kernel truesize per small datagram), and
what a call sends leaves when the call ends. The simulated setup times then include the gateway's own CPU queueing,
as if it had one core of this machine to itself and the clients, relay and portal were infinitely fast: the part of a
setup the gateway is responsible for. ``--no-cpu-queue`` gives the gateway no duration (protocol round trips and
timers only), and no queue to see, so a burst of more than 100 handshakes in a second puts it "under load"
(Firezone's rule) and most clients wait WireGuard's 5 s retransmit for their cookie.

    python -m lab.bench_setup [--clients 100,1000] [--client-nat cone|none] [--tail 5] [--spread 0] [--rounds 1]
        [--no-cpu-queue] [--profile 25 [--profile-out PATH]] [--log-level info]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import heapq
import io
import ipaddress
import logging
import os
import pstats
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agent.config import parse_log_directives
from agent.logs import configure_logging
from dataplane.base import Address
from dataplane.io.udp import RECV_BUFFER
from dataplane.node import ConnectionEstablished, DropReason, NodeEvent, NodeRole
from dataplane.packet import internet_checksum
from lab.loadgen import echo_request, parse_echo_reply, percentile
from tests.sim.gateway import (
    GATEWAY_ID,
    GatewayPortal,
    SimClient,
    SimGateway,
)
from tests.sim.harness import NODE_PORT, SimPeer
from tests.sim.nat import PORT_RESTRICTED_CONE, NatBox
from tests.sim.net import Participant, SimNetwork
from tests.sim.relay import RELAY_PORT, SimRelay

RESOURCE_NETWORK = "172.20.0.0/24"
RESOURCE_IP = ipaddress.IPv4Address("172.20.0.10")
RELAY_IP = "198.51.100.10"
GATEWAY_IP = "198.51.100.50"
CLIENT_NATS = ("cone", "none")
"""``cone``: each client behind its own endpoint-independent mapping, port-restricted filtering NAT (what Linux
masquerading does); ``none``: clients on public addresses (host and relayed candidates only)."""
PORTAL_DELAY = 0.05
DATAGRAM_TRUESIZE = 832  # kernel accounting of a small UDP datagram waiting in a socket (measured on loopback)
RECEIVE_BUFFER_CAPACITY = 2 * RECV_BUFFER  # the kernel doubles SO_RCVBUF
DRIVER_BATCH = 64  # the gateway's driver reads this many datagrams at a time (agent.datapath.UDP_BATCH)
SETTLE_TIMEOUT = 120.0


class BenchNetwork(SimNetwork):
    """The sim network with each participant's next wakeup cached (refreshed when it was touched), so a step costs
    O(log N) and not N ``poll_timeout`` calls: the plain :class:`SimNetwork` asks every participant at every step.
    It keeps SimNetwork's step and overrides the two hooks that find and wake the due participants."""

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self._wakeups: list[tuple[float, int, Participant]] = []
        self._wakeup_of: dict[int, float | None] = {}
        self._dirty: dict[int, Participant] = {}

    def add_participant(self, participant: Participant) -> None:
        super().add_participant(participant)
        self.touch(participant)

    def touch(self, participant: Participant) -> None:
        """The participant took input: its deadline may have moved."""
        self._dirty[id(participant)] = participant

    def _refresh(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for key, participant in dirty.items():
            wakeup = participant.next_wakeup()
            self._wakeup_of[key] = wakeup
            if wakeup is not None:
                self._sequence += 1
                heapq.heappush(self._wakeups, (wakeup, self._sequence, participant))

    def _earliest_wakeup(self) -> float | None:
        self._refresh()
        while self._wakeups:
            at, _, participant = self._wakeups[0]
            if self._wakeup_of.get(id(participant)) == at:
                return at
            heapq.heappop(self._wakeups)  # stale: the participant's deadline moved since
        return None

    def _wake_due(self) -> None:
        self._refresh()
        while self._wakeups and self._wakeups[0][0] <= self.now:
            at, _, participant = heapq.heappop(self._wakeups)
            if self._wakeup_of.get(id(participant)) == at:
                self._wakeup_of[id(participant)] = None
                participant.wake(self.now)
                self.touch(participant)


@dataclass
class GatewayMeter:
    """Thread CPU time spent in the gateway, by what it was handling; optionally profiled."""

    profiler: cProfile.Profile | None = None
    after: Callable[[], None] | None = None  # runs after each measured call, outside the measurement
    nanoseconds: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    last_ns: int = 0  # the latest measured call's
    _depth: int = 0

    @contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        if self._depth:
            yield  # already inside a measured call: counted there
            return
        self._depth += 1
        if self.profiler is not None:
            self.profiler.enable()
        start = time.thread_time_ns()
        try:
            yield
        finally:
            self.last_ns = time.thread_time_ns() - start
            self.nanoseconds[kind] += self.last_ns
            self.calls[kind] += 1
            if self.profiler is not None:
                self.profiler.disable()
            self._depth -= 1
            if self.after is not None:
                self.after()

    @property
    def total_ns(self) -> int:
        return sum(self.nanoseconds.values())


def datagram_kind(data: bytes, src: Address) -> str:
    if src[1] == RELAY_PORT:
        return "datagram from relay"
    if data and data[0] < 4 and len(data) >= 20 and data[4:8] == b"\x21\x12\xa4\x42":
        return "stun (direct)"
    return {1: "wg handshake init", 2: "wg handshake response", 3: "wg cookie", 4: "wg data"}.get(
        data[0] if data else -1, "other datagram"
    )


def echo_reply(request: bytes) -> bytes | None:
    """The resource's answer to an IPv4 ICMP echo request: addresses swapped, type 0, checksums redone."""
    if len(request) < 28 or request[0] != 0x45 or request[9] != 1 or request[20] != 8:
        return None
    header = bytearray(request[:20])
    header[12:16], header[16:20] = request[16:20], request[12:16]
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", internet_checksum(header))
    icmp = bytearray(request[20:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", internet_checksum(icmp))
    return bytes(header + icmp)


def _resource() -> dict[str, Any]:
    return {"id": "resource-0", "type": "cidr", "name": "bench", "address": RESOURCE_NETWORK, "filters": []}


@dataclass
class SetupBench:
    clients: int
    client_nat: str
    meter: GatewayMeter
    tail: float = 0.0
    spread: float = 0.0
    cpu_queue: bool = True
    setup_ns: int = 0
    busy_until: float = 0.0  # simulated time at which the gateway finishes what it started (cpu_queue)
    longest_queue: int = 0
    requested_at: dict[str, float] = field(default_factory=dict)
    net: BenchNetwork = field(init=False)
    gateway: SimGateway = field(init=False)
    portal: GatewayPortal = field(init=False)
    relay: SimRelay = field(init=False)
    sim_clients: list[SimClient] = field(default_factory=list)
    authorized_at: float = 0.0
    answered_at: dict[str, float] = field(default_factory=dict)
    established_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.net = BenchNetwork(seed=1)
        relay_host = self.net.add_host("relay", [RELAY_IP], latency=0.005)
        self.relay = SimRelay(self.net, relay_host)
        gateway_host = self.net.add_host("gateway", [GATEWAY_IP])
        self.gateway = SimGateway(self.net, gateway_host, seed=1)
        self.portal = GatewayPortal(self.net, self.gateway, {"relay-0": self.relay}, delay=PORTAL_DELAY)
        self._instrument_gateway(gateway_host)

    # -- the gateway, timed ---------------------------------------------------------------------------------------

    def _instrument_gateway(self, host: Any) -> None:
        gateway, meter, net = self.gateway, self.meter, self.net
        on_datagram, wake, push, next_wakeup = gateway._on_datagram, gateway.wake, self.portal.push, gateway.next_wakeup

        # What the gateway sends is routed by the simulation after the measured call: routing is not the gateway's.
        # With the CPU queue it leaves when the call's CPU time has passed on the fake clock.
        send = host.send
        unsent: list[tuple[Address, Address, bytes]] = []
        waiting: deque[tuple[bytes, Address, Address]] = deque()
        drain_scheduled = False
        load = gateway.state.node.handshake_load
        load.needs_backlog = self.cpu_queue

        def send_later(src: Address, dst: Address, payload: bytes) -> None:
            unsent.append((src, dst, payload))

        def send_batch(batch: list[tuple[Address, Address, bytes]]) -> None:
            for src, dst, payload in batch:
                send(src, dst, payload)

        def after_call() -> None:
            cost = meter.last_ns / 1e9
            batch = unsent[:]
            unsent.clear()
            if not self.cpu_queue:
                send_batch(batch)
                return
            self.busy_until = max(self.busy_until, net.now) + cost
            if batch:
                net.schedule(self.busy_until, functools.partial(send_batch, batch))

        meter.after = after_call
        host.send = send_later

        def handle(data: bytes, src: Address, local: Address, now: float) -> None:
            with meter.measure(datagram_kind(data, src)):
                before = len(gateway.to_tun)
                on_datagram(data, src, local, now)
                for _, packet in gateway.to_tun[before:]:
                    if (reply := echo_reply(packet)) is not None:
                        gateway.from_resource(reply)  # the resource answers at once (a TUN read)
                del gateway.to_tun[before:]
            net.touch(gateway)

        def drain() -> None:
            nonlocal drain_scheduled
            drain_scheduled = False
            if len(waiting) >= DRIVER_BATCH:  # what the driver would see after a full batch
                load.note_backlog(len(waiting) * DATAGRAM_TRUESIZE, RECEIVE_BUFFER_CAPACITY, net.now)
            handle(*waiting.popleft(), net.now)
            schedule_drain()

        def schedule_drain() -> None:
            nonlocal drain_scheduled
            if waiting and not drain_scheduled:
                drain_scheduled = True
                net.schedule(self.busy_until, drain)

        def datagram(data: bytes, src: Address, local: Address, now: float) -> None:
            if not self.cpu_queue:
                handle(data, src, local, now)
                return
            waiting.append((data, src, local))
            self.longest_queue = max(self.longest_queue, len(waiting))
            schedule_drain()

        def timer(now: float) -> None:
            with meter.measure("timer"):
                wake(now)

        def portal_message(event: str, payload: Any) -> Any:
            with meter.measure(f"portal {event}"):
                result = push(event, payload)
            net.touch(gateway)
            return result

        def poll_timeout() -> float | None:
            with meter.measure("poll_timeout"):
                return next_wakeup()

        def flush(now: float) -> None:
            # SimGateway.flush without its per-transmit ``ipaddress`` parse (a driver's work, not the state's).
            state = gateway.state
            while (transmit := state.poll_transmit()) is not None:
                src = transmit.src or (GATEWAY_IP, NODE_PORT)
                if ":" not in transmit.dst[0]:
                    send_later(src, transmit.dst, transmit.payload)
            while (message := state.poll_outbound()) is not None:
                self.portal.from_gateway(message)
            while state.poll_event() is not None:
                pass

        host.bind(NODE_PORT, datagram)
        gateway.flush = flush  # type: ignore[method-assign]
        gateway.wake = timer  # type: ignore[method-assign]
        gateway.next_wakeup = poll_timeout  # type: ignore[method-assign]
        self.portal.push = portal_message  # type: ignore[method-assign]

    # -- the clients, not timed -----------------------------------------------------------------------------------

    def add_client(self, index: int) -> SimClient:
        client_id = f"{index:08x}-0000-4000-8000-{index:012x}"
        public_ip = str(ipaddress.IPv4Address("100.100.0.0") + index + 1)  # room for 65,534 clients
        if self.client_nat == "cone":
            nat = NatBox(f"nat-{index}", public_ip, PORT_RESTRICTED_CONE, seed=index)
            host = self.net.add_host(f"client-{index}", ["10.0.0.2"], realm=self.net.add_nat(nat))
        else:
            nat, host = None, self.net.add_host(f"client-{index}", [public_ip])
        peer = SimPeer(self.net, host, NodeRole.CLIENT, client_id, seed=1000 + index)
        tunnel_ipv4 = ipaddress.IPv4Address("100.64.0.0") + 256 + index
        client = SimClient.derived(
            peer,
            client_id,
            str(tunnel_ipv4),
            f"fd00:2021:1111::1:{index:x}",
            secret=f"{client_id}:{GATEWAY_ID}",
            nat=nat,
        )
        self.portal.clients[client_id] = client
        peer.on_event = lambda event: self._on_client_event(client, event)
        self._watch_client(client)
        peer.add_relays([("relay-0", self.relay)])
        return client

    def _watch_client(self, client: SimClient) -> None:
        peer, net = client.peer, self.net
        flush = peer.flush
        handler = peer.host.handler_for(("0.0.0.0", NODE_PORT))
        assert handler is not None

        def flushed(now: float) -> None:
            flush(now)
            net.touch(peer)

        def datagram(data: bytes, src: Address, local: Address, now: float) -> None:
            before = len(peer.received)
            handler(data, src, local, now)
            for _, packet in peer.received[before:]:
                if parse_echo_reply(packet) is not None and client.client_id not in self.answered_at:
                    self.answered_at[client.client_id] = now
            del peer.received[before:]
            net.touch(peer)

        peer.flush = flushed  # type: ignore[method-assign]
        peer.host.bind(NODE_PORT, datagram)

    def _on_client_event(self, client: SimClient, event: NodeEvent) -> None:
        self.portal.from_client(client, event)
        if isinstance(event, ConnectionEstablished) and client.client_id not in self.established_at:
            self.established_at[client.client_id] = self.net.now

            def ping() -> None:
                packet = echo_request(
                    ipaddress.IPv4Address(client.ipv4).packed, RESOURCE_IP.packed, len(self.established_at), 1
                )
                client.peer.send_packet(GATEWAY_ID, packet)
                self.net.touch(client.peer)

            self.net.schedule(self.net.now, ping)

    def _authorize_now(self, client: SimClient) -> None:
        self.requested_at[client.client_id] = self.net.now
        self.portal.authorize(client, _resource())  # the client's Node gets its side of the connection too

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> None:
        self.portal.set_connected(True)
        self.portal.init()
        for index in range(self.clients):
            self.sim_clients.append(self.add_client(index))
        self.net.run_for(2.0)  # relays allocated and measured on every side: upsert_connection needs that
        self.meter.nanoseconds.clear()
        self.meter.calls.clear()
        self.busy_until = self.net.now
        self.longest_queue = 0
        if self.meter.profiler is not None:
            self.meter.profiler.clear()
        self.authorized_at = self.net.now
        for index, client in enumerate(self.sim_clients):
            if self.spread:
                at = self.authorized_at + self.spread * index / self.clients
                self.net.schedule(at, functools.partial(self._authorize_now, client))
            else:
                self._authorize_now(client)
        settled = self.net.run_until_true(
            lambda: len(self.answered_at) == self.clients, timeout=SETTLE_TIMEOUT, max_steps=10_000_000
        )
        if not settled:
            raise SystemExit(
                f"only {len(self.answered_at)} of {self.clients} clients got their echo reply within "
                f"{SETTLE_TIMEOUT:.0f} simulated seconds"
            )
        self.setup_ns = self.meter.total_ns
        if self.tail:
            self.net.run_for(self.tail)  # the checks, bindings and keepalives that go on after the echo reply


def _profile_text(profiler: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def run_one(
    clients: int,
    client_nat: str,
    *,
    tail: float = 0.0,
    spread: float = 0.0,
    cpu_queue: bool = True,
    profile: int = 0,
    profile_out: str | None = None,
) -> dict[str, Any]:
    meter = GatewayMeter(cProfile.Profile() if profile else None)
    bench = SetupBench(clients, client_nat, meter, tail, spread, cpu_queue)
    wall = time.perf_counter()
    bench.run()
    wall = time.perf_counter() - wall
    setups = [at - bench.requested_at[client_id] for client_id, at in bench.answered_at.items()]
    result: dict[str, Any] = {
        "clients": clients,
        "gateway_us_per_client": bench.setup_ns / 1e3 / clients,
        "with_tail_us_per_client": meter.total_ns / 1e3 / clients,
        "breakdown_us_per_client": {k: v / 1e3 / clients for k, v in meter.nanoseconds.most_common()},
        "calls": dict(meter.calls),
        "sim_setup_p50_s": percentile(setups, 0.5),
        "sim_setup_p99_s": percentile(setups, 0.99),
        "bench_wall_s": wall,
        "longest_queue": bench.longest_queue,
        "cookie_replies": bench.gateway.state.node.drops[DropReason.COOKIE_REQUIRED],
    }
    if meter.profiler is not None:
        result["profile"] = _profile_text(meter.profiler, profile)
        if profile_out:
            meter.profiler.dump_stats(f"{profile_out}.{clients}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="100,1000", help="comma-separated client counts, one run each")
    parser.add_argument("--client-nat", choices=CLIENT_NATS, default="cone")
    parser.add_argument(
        "--tail", type=float, default=5.0, help="simulated seconds measured on after the last echo reply"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="authorize the clients evenly over this many seconds instead of all in one instant",
    )
    parser.add_argument(
        "--cpu-queue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the gateway is busy for its measured CPU time on the fake clock; datagrams queue meanwhile",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per client count; the best one is shown")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N hottest gateway functions")
    parser.add_argument("--profile-out", metavar="PATH", help="with --profile: also dump the stats to PATH.<clients>")
    parser.add_argument(
        "--log-level", default="info", help="the gateway's log directives (as RUST_LOG), logged as JSON to /dev/null"
    )
    args = parser.parse_args(argv)
    sink = open(os.devnull, "w", encoding="utf-8")  # lives as long as the process
    configure_logging("json", parse_log_directives(args.log_level), stream=sink)
    logging.getLogger("tests").setLevel(logging.WARNING)
    for count in (int(part) for part in args.clients.split(",") if part):
        # The best of --rounds runs: other load on the machine only ever adds time (caches, migrations).
        figures = min(
            (
                run_one(
                    count,
                    args.client_nat,
                    tail=args.tail,
                    spread=args.spread,
                    cpu_queue=args.cpu_queue,
                    profile=args.profile,
                    profile_out=args.profile_out,
                )
                for _ in range(args.rounds)
            ),
            key=lambda run: float(run["with_tail_us_per_client"]),
        )
        print(
            f"{count} clients ({args.client_nat} NAT): gateway {figures['gateway_us_per_client']:.0f} µs CPU per client "
            f"setup; simulated setup p50 {figures['sim_setup_p50_s']:.2f} s p99 {figures['sim_setup_p99_s']:.2f} s; "
            f"longest queue {figures['longest_queue']}, cookie replies {figures['cookie_replies']}; "
            f"bench wall {figures['bench_wall_s']:.1f} s; with the next {args.tail:g} s: "
            f"{figures['with_tail_us_per_client']:.0f} µs per client (breakdown below)",
            flush=True,
        )
        for kind, micros in figures["breakdown_us_per_client"].items():
            print(f"  {kind:>28}: {micros:8.0f} µs/client  ({figures['calls'][kind] / count:6.1f} calls/client)")
        if "profile" in figures:
            print(figures["profile"], flush=True)


if __name__ == "__main__":
    main()
