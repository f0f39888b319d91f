"""``python -m lab.bench_packet``: the per-frame cost of the TUN offload transforms, C (``dataplane._native``) vs the
pure-Python reference (``dataplane.packet``).

* ``split_gso``: one 64 KiB IPv4 TSO frame (gso_size 1448, 46 segments) split into checksummed packets;
* ``coalesce``: 44 consecutive 1448-byte IPv4 TCP segments merged into one write frame;
* ``flow_hash``: one IPv4 TCP packet's queue hash.

Each figure is the wall time per call in microseconds (best of 5 runs of ``--calls`` calls); the ratio is pure / C.
In-process, no devices. Without the extension only the pure column is printed.

    python -m lab.bench_packet [--calls 2000]
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable

from dataplane import native, packet

_SRC = b"\x0a\x00\x00\x01"
_DST = b"\x0a\x00\x00\x02"


def _tso_frame() -> tuple[packet.VirtioNetHdr, bytes]:
    payload = bytes(i * 7 % 256 for i in range(65535 - 40))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 1, 0x4000, 64, 6, 0, _SRC, _DST)
    tcp = struct.pack("!HHIIBBHHH", 443, 50000, 1, 1, 0x50, 0x18, 512, 0, 0)
    return packet.VirtioNetHdr(1, packet.VIRTIO_NET_HDR_GSO_TCPV4, 40, 1448, 20, 16), ip + tcp + payload


def _segments(count: int = 44, size: int = 1448) -> list[bytes]:
    out = []
    for index in range(count):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + size, 0, 0x4000, 64, 6, 0, _SRC, _DST)
        tcp = struct.pack("!HHIIBBHHH", 443, 50000, 1 + index * size, 1, 0x50, 0x10, 512, 0, 0)
        out.append(ip + tcp + bytes((index + i) % 256 for i in range(size)))
    return out


def _best_us(function: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    calls = parser.parse_args().calls
    hdr, frame = _tso_frame()
    segments = _segments()
    one = segments[0]
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("split_gso 64 KiB TSO", lambda: packet.split_gso(hdr, frame), lambda: native.split_gso(hdr, frame)),
        ("coalesce 44 segments", lambda: packet.coalesce(segments), lambda: native.coalesce(segments)),
        ("flow_hash", lambda: packet.flow_hash(one), lambda: native.flow_hash(one)),
    ]
    print(f"C extension in use: {native.NATIVE} ({native.description})")
    print(f"{'transform':<24} {'pure µs':>10} {'C µs':>10} {'pure/C':>8}")
    for name, pure, dispatched in cases:
        if native.NATIVE:
            assert pure() == dispatched(), name
        pure_us = _best_us(pure, calls)
        if native.NATIVE:
            c_us = _best_us(dispatched, calls)
            print(f"{name:<24} {pure_us:>10.2f} {c_us:>10.2f} {pure_us / c_us:>8.1f}")
        else:
            print(f"{name:<24} {pure_us:>10.2f} {'-':>10} {'-':>8}")


if __name__ == "__main__":
    main()
