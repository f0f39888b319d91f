"""``python -m lab.bench_coldpath``: what one tunnel hop costs a lone packet, warm and after the process sat idle.

Two in-memory :class:`~dataplane.wireguard.device.Device` peers complete a handshake; then, many times over, one
ICMP echo request (:func:`lab.loadgen.echo_request`) is sealed by A and the receiving Device B opens it and hands it
out (``receive_datagrams`` + ``drain_packets``: the work firezone-wg's event loop does between ``recvmsg`` and the
TUN ``write``). Each sample is the wall time of that receive, taken right after one of:

* nothing (back to back: the interpreter, the keys and the tables are in the CPU caches);
* ``time.sleep(S)`` for each ``--idle`` S (the thread sleeps, as between two pings);
* writing over a buffer of ``--evict-mib`` MiB without sleeping (caches evicted, the CPU never idle).

On this project's 2-core VM the warm receive takes 5-10 µs, the same receive after 10-200 ms idle about 140 µs, and
110-130 µs after the eviction alone (2026-12-04, with per-thread AEAD contexts; 11-22 µs and 195-240 µs before): a
lone ping pays for cache misses, not for the protocol. That is most of the idle ping gap to wireguard-go in
``make bench`` (four such hops and two seals per round trip).

    python -m lab.bench_coldpath [--samples 30] [--idle 0.0005,0.002,0.01,0.2] [--evict-mib 8]
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time
from collections.abc import Callable

from dataplane.base import Address
from dataplane.io.rng import SeededRng
from dataplane.wireguard.device import Device
from lab.loadgen import echo_request

_TUNNEL_A = "10.77.0.1"
_TUNNEL_B = "10.77.0.2"
_SOURCE = ipaddress.IPv4Address(_TUNNEL_A).packed
_DESTINATION = ipaddress.IPv4Address(_TUNNEL_B).packed
_ENDPOINT_A: Address = ("192.0.2.1", 51820)
_ENDPOINT_B: Address = ("192.0.2.2", 51820)


class Hop:
    """Device A seals, Device B opens: one direction of a tunnel, in memory, with a fixed clock."""

    def __init__(self) -> None:
        keys = SeededRng(7)
        wall = lambda: 1_800_000_000.0  # noqa: E731 - a fixed wall clock: no timers fire
        self.a = Device(rng=SeededRng(1), wall_clock=wall, private_key=keys.random_bytes(32))
        self.b = Device(rng=SeededRng(2), wall_clock=wall, private_key=keys.random_bytes(32))
        assert self.a.public_key is not None and self.b.public_key is not None
        self.a.upsert_peer(
            self.b.public_key, 0.0, endpoint=_ENDPOINT_B, allowed_ips=[ipaddress.ip_network(f"{_TUNNEL_B}/32")]
        )
        self.b.upsert_peer(self.a.public_key, 0.0, allowed_ips=[ipaddress.ip_network(f"{_TUNNEL_A}/32")])
        self.sequence = 0
        self.a.send_packets([self._echo_request(0)], 0.0)  # staged; the handshake goes first
        for _ in range(10):
            moved = False
            for source, target, address in ((self.a, self.b, _ENDPOINT_A), (self.b, self.a, _ENDPOINT_B)):
                datagrams = [(t.payload, address) for t in source.drain_transmits()]
                if datagrams:
                    target.receive_datagrams(datagrams, 0.0)
                    moved = True
            if not moved:
                break
        if len(self.b.drain_packets()) != 1:
            raise SystemExit("the in-memory handshake did not complete")

    @staticmethod
    def _echo_request(sequence: int) -> bytes:
        return echo_request(_SOURCE, _DESTINATION, 1, sequence)

    def sealed(self) -> list[tuple[bytes, Address]]:
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.a.send_packets([self._echo_request(self.sequence)], 0.0)
        return [(t.payload, _ENDPOINT_A) for t in self.a.drain_transmits()]

    def receive_microseconds(self, before: Callable[[], None]) -> float:
        datagrams = self.sealed()
        before()
        start = time.perf_counter_ns()
        self.b.receive_datagrams(datagrams, 0.0)
        delivered = self.b.drain_packets()
        elapsed = time.perf_counter_ns() - start
        if len(delivered) != 1:
            raise SystemExit("a packet was not delivered")
        return elapsed / 1000


def _evict(mebibytes: int) -> Callable[[], None]:
    buffer = bytearray(mebibytes * 1024 * 1024)

    def touch() -> None:
        for offset in range(0, len(buffer), 64):
            buffer[offset] = 1

    return touch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--idle", default="0.0005,0.002,0.01,0.2", help="comma-separated idle times in seconds")
    parser.add_argument("--evict-mib", type=int, default=8)
    args = parser.parse_args(argv)
    hop = Hop()
    cases: list[tuple[str, Callable[[], None]]] = [("back to back", lambda: None)]
    for idle in (float(part) for part in args.idle.split(",") if part):
        cases.append((f"after {idle * 1000:g} ms idle", lambda idle=idle: time.sleep(idle)))  # type: ignore[misc]
    cases.append((f"after evicting {args.evict_mib} MiB (no idle)", _evict(args.evict_mib)))
    for _ in range(50):
        hop.receive_microseconds(lambda: None)  # warm up
    for label, before in cases:
        samples = [hop.receive_microseconds(before) for _ in range(args.samples)]
        print(
            f"{label:>34}: receive of one packet median {statistics.median(samples):7.1f} µs, "
            f"p90 {statistics.quantiles(samples, n=10)[-1]:7.1f} µs",
            flush=True,
        )


if __name__ == "__main__":
    main()
