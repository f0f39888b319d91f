"""``python -m lab.bench_threads``: does the per-packet batch work run in parallel across threads?

Each thread seals batches of 64 packets of 1,400 bytes with its own key (``seal_batch``, as a TUN queue's reader thread
does), then opens batches of 64 sealed messages (``open_batch``, as the event loop does) for ``--seconds``; the figure
is packets per second over all threads, with 1 thread and with ``--threads`` threads (default: one per CPU), in
alternating rounds. The C extension releases the GIL for a whole batch, so its ratio approaches the thread count on
an otherwise idle machine; the pure-Python twin holds the GIL and stays near 1×. In-process, no devices.

This separates the extension from the machine: when 2 TUN queues carry no more than 1 in ``make bench``, a ratio near
2× here says the GIL is not what limits them.

    python -m lab.bench_threads [--seconds 2] [--rounds 3] [--threads N] [--pure]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from types import ModuleType

from dataplane import native, native_fallback

BATCH = 64
PACKET_SIZE = 1400
MTU = 1420
RECEIVER_INDEX = 1


def _sealer(implementation: ModuleType) -> Callable[[bytes, int], int]:
    packets = [bytes(PACKET_SIZE)] * BATCH

    def seal(key: bytes, counter: int) -> int:
        implementation.seal_batch(key, RECEIVER_INDEX, counter, packets, MTU)
        return BATCH

    return seal


def _opener(implementation: ModuleType) -> Callable[[bytes, int], int]:
    sealed_by_key: dict[bytes, list[bytes]] = {}  # each thread's key: the batch it opens again and again

    def open_(key: bytes, counter: int) -> int:
        messages = sealed_by_key.get(key)
        if messages is None:
            packets = [bytes(PACKET_SIZE)] * BATCH
            messages = sealed_by_key[key] = implementation.seal_batch(key, RECEIVER_INDEX, 0, packets, MTU)
        opened = implementation.open_batch(key, messages)
        if opened[0] is None:
            raise SystemExit("open_batch failed to authenticate its own messages")
        return BATCH

    return open_


def packets_per_second(work: Callable[[bytes, int], int], threads: int, seconds: float) -> float:
    """Packets per second of ``work`` run back to back in ``threads`` threads, each with its own key."""
    stop = threading.Event()
    counts = [0] * threads
    start_together = threading.Barrier(threads + 1)

    def run(slot: int) -> None:
        key = os.urandom(32)
        counter = 0
        start_together.wait()
        while not stop.is_set():
            counter += work(key, counter)
        counts[slot] = counter

    workers = [threading.Thread(target=run, args=(slot,), name=f"bench-{slot}") for slot in range(threads)]
    for worker in workers:
        worker.start()
    start_together.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--pure", action="store_true", help="also measure the pure-Python twin")
    args = parser.parse_args(argv)
    if args.threads < 2 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--threads must be at least 2, --rounds at least 1 and --seconds positive")
    implementations: list[tuple[str, ModuleType]] = []
    if native.NATIVE:
        implementations.append(("C", native.implementation))
    if args.pure or not native.NATIVE:
        implementations.append(("pure Python", native_fallback))
    for label, implementation in implementations:
        for name, work in (("seal_batch", _sealer(implementation)), ("open_batch", _opener(implementation))):
            ratios = []
            for _ in range(args.rounds):
                one = packets_per_second(work, 1, args.seconds)
                many = packets_per_second(work, args.threads, args.seconds)
                ratios.append(many / one)
                print(
                    f"{label} {name}: 1 thread {one / 1000:.0f} kpps, {args.threads} threads {many / 1000:.0f} kpps: "
                    f"{many / one:.2f}×",
                    flush=True,
                )
            print(f"{label} {name}: median {statistics.median(ratios):.2f}× with {args.threads} threads", flush=True)


if __name__ == "__main__":
    main()
