"""``python -m lab.bench_node``: the Node's per-packet demultiplexing cost as the number of connections grows.

A gateway Node gets N connections (default 10, 100 and 1,000), each with 50 candidate pairs (one local host base ×
50 remote host candidates), then is fed datagrams that match no connection -- the cheapest thing for anyone on the
network to send:

* ``unmatched_wg``: a 4-byte WireGuard initiation header from an unknown source (looked up by (local, source) pair);
* ``stun_response``: a BINDING success response with an unknown transaction id (looked up by transaction id);
* ``stun_request``: a BINDING request whose USERNAME names no connection (looked up by ufrag pair);
* ``poll_timeout``: the next deadline over all connections, which a driver asks after every datagram.

Each figure is the wall time per datagram in microseconds (best of 5 runs); O(1) lookups keep them flat across N.
No sockets, no namespaces: the Node is sans-IO and is driven in-process with a fake clock.

    python -m lab.bench_node [--connections 10,100,1000] [--pairs 50] [--packets 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

from dataplane import stun
from dataplane.base import Address, Transmit
from dataplane.ice.candidate import Candidate
from dataplane.io.rng import SeededRng
from dataplane.node import IceCredentials, Node, NodeRole, RelayConfig

RELAY: Address = ("198.51.100.10", 3478)
LOCAL: Address = ("10.0.0.1", 52625)
STRANGER: Address = ("192.0.2.1", 9999)


def bench_key(name: str) -> bytes:
    """A clamped X25519 private key derived from ``name`` (benchmarks are reproducible)."""
    key = bytearray(hashlib.sha256(name.encode()).digest())
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def relay_binding_answer(transmit: Transmit) -> bytes | None:
    """The relay's answer to a BINDING request sent to :data:`RELAY`, else None: plays the relay just enough for the
    Node to measure an RTT (a connection needs a measured relay)."""
    if transmit.dst != RELAY or not stun.is_stun(transmit.payload):
        return None
    request = stun.decode(transmit.payload)
    if request.method != stun.Method.BINDING or not request.is_request:
        return None
    response = request.success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, ("203.0.113.1", 40000))
    return stun.encode(response, fingerprint=True)


def _answer_relay_bindings(node: Node, now: float) -> None:
    while (transmit := node.poll_transmit()) is not None:
        if (answer := relay_binding_answer(transmit)) is not None:
            node.handle_input(answer, RELAY, LOCAL, now)


def build_gateway(connections: int, pairs: int) -> Node:
    node = Node(NodeRole.GATEWAY, bench_key("bench-gateway"), rng=SeededRng(1), wall_clock=lambda: 1_800_000_000.0)
    node.update_relays([], [RelayConfig("relay", (RELAY,), "user", "pass")], 0.0)
    _answer_relay_bindings(node, 0.01)
    if node.relay_rtt("relay") is None:
        raise SystemExit("the relay's RTT was not measured; the benchmark cannot create connections")
    for index in range(connections):
        connection_id = f"client-{index}"
        created = node.upsert_connection(
            connection_id,
            remote_public_key=bench_key(connection_id),
            preshared_key=None,
            local_credentials=IceCredentials(f"g{index:05d}", "g" * 22),
            remote_credentials=IceCredentials(f"c{index:05d}", "c" * 22),
            now=0.02,
        )
        if not created:
            raise SystemExit("upsert_connection refused a connection")
        for port in range(pairs):
            remote = Candidate.host((f"10.{1 + index // 250}.{index % 250}.{1 + port // 200}", 20000 + port))
            node.add_remote_candidate(connection_id, remote, 0.02)
    while node.poll_transmit() is not None or node.poll_event() is not None:
        pass
    return node


def _per_packet_us(feed: Callable[[], object], packets: int, rounds: int = 5) -> float:
    """The best of ``rounds`` runs of ``packets`` datagrams: other load on the machine only ever adds time."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(packets):
            feed()
        best = min(best, time.perf_counter() - start)
    return best / packets * 1e6


def measure(connections: int, pairs: int, packets: int) -> dict[str, float]:
    node = build_gateway(connections, pairs)
    now = 1.0
    unmatched_wg = b"\x01\x00\x00\x00"
    response = stun.encode(
        stun.StunMessage.request(stun.Method.BINDING, bytes(12))
        .success_response()
        .add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, STRANGER),
        fingerprint=True,
    )
    request = stun.encode(
        stun.StunMessage.request(stun.Method.BINDING, bytes(range(12))).add_username("nobody:home"),
        fingerprint=True,
    )
    return {
        "unmatched_wg": _per_packet_us(lambda: node.handle_input(unmatched_wg, STRANGER, LOCAL, now), packets),
        "stun_response": _per_packet_us(lambda: node.handle_input(response, STRANGER, LOCAL, now), packets),
        "stun_request": _per_packet_us(lambda: node.handle_input(request, STRANGER, LOCAL, now), packets),
        "poll_timeout": _per_packet_us(node.poll_timeout, packets),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", default="10,100,1000", help="comma-separated connection counts")
    parser.add_argument("--pairs", type=int, default=50, help="candidate pairs per connection")
    parser.add_argument("--packets", type=int, default=2000, help="datagrams fed per measurement")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.connections.split(",") if part]
    print(
        f"{'connections':>11} {'unmatched_wg µs':>16} {'stun_response µs':>17} {'stun_request µs':>16} "
        f"{'poll_timeout µs':>16}"
    )
    for count in counts:
        figures = measure(count, args.pairs, args.packets)
        print(
            f"{count:>11} {figures['unmatched_wg']:>16.1f} {figures['stun_response']:>17.1f} "
            f"{figures['stun_request']:>16.1f} {figures['poll_timeout']:>16.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
