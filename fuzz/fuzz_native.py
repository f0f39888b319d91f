"""Differential target for the C hot path: every function of ``dataplane._native`` against its pure-Python twin.

The twins are ``dataplane.native_fallback`` and, for the packet transforms the C code may decline (``coalesce``,
``split_gso``, ``split_gso_frame``, ``flow_hash``), the reference functions of ``dataplane.packet``. The input is
decoded by :class:`Reader` into a choice of function and its arguments (packets, messages, a replay ring, integers on
type and window boundaries); both sides are called and an AssertionError is raised when their results differ, when
one raises and the other does not, or when they raise different exception types. ``accept_transport_run`` updates
its ring in place: each side gets its own copy and the two copies must end equal. A C result of None for a packet
transform means "ask the reference" and is not compared.

Integer arguments stay within the C types the extension converts them to (``Py_ssize_t``, ``long``): beyond them the C
side of ``plain_flow_end`` raises OverflowError where the pure side computes on (``gso_run_ends`` and ``sealed_size``
now refuse such integers on both sides; the overflow this target found in C's ``gso_run_ends`` under a byte limit near
``PY_SSIZE_T_MIN`` is fixed, with the reproducers in tests/property/test_native_run_equivalence.py).
``seal_batch`` of an empty batch gets no counter past 64 bits (C refuses to convert it, the pure side returns []).
``last``/``limit`` of ``accept_transport_run`` range over the whole 64 bits and one past both ends (both sides raise
OverflowError there).

Does nothing when the extension is not built (pure-Python mode: there is nothing to compare).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from dataplane import native_fallback as pure
from dataplane import packet as pk
from dataplane.wireguard.constants import REJECT_AFTER_MESSAGES
from dataplane.wireguard.replay import RING_BLOCKS, WINDOW_SIZE
from fuzz.harness import fuzz_main, split_datagrams

c_native: ModuleType | None
try:
    from dataplane import _native as c_native
except ImportError:  # pragma: no cover - depends on the build
    c_native = None

MAX_INPUT_LENGTH = 1 << 14
MAX_ITEMS = 48
KEY = bytes(range(32))
U64_MAX = (1 << 64) - 1
# Kept inside C long / Py_ssize_t (see the module docstring).
BOUNDED = 1 << 62

Buffer = bytes | bytearray | memoryview

# Integers on the boundaries the functions care about: padding (16), the MTU, GSO limits, replay blocks (64) and
# window (8128), the message limit, and the 32/63/64-bit edges.
INTERESTING = (
    0,
    1,
    2,
    -1,
    -5,
    15,
    16,
    17,
    63,
    64,
    65,
    127,
    128,
    1280,
    1420,
    1452,
    1500,
    65535,
    65536,
    WINDOW_SIZE,
    WINDOW_SIZE + 1,
    WINDOW_SIZE + 64,
    2**31 - 1,
    2**32,
    2**62,
    2**63 - 1,
    2**63,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_MESSAGES - 1,
    U64_MAX - WINDOW_SIZE,
    U64_MAX,
    U64_MAX + 1,
)


class Reader:
    """Reads the fuzz bytes front to back; past the end every read yields zeros, so any input decodes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def byte(self) -> int:
        chunk = self.take(1)
        return chunk[0] if chunk else 0

    def number(self) -> int:
        """A tag byte: an interesting value, a 16-bit or 64-bit literal, or a small signed value."""
        tag = self.byte()
        kind, index = tag & 3, tag >> 2
        if kind == 0:
            return INTERESTING[index % len(INTERESTING)]
        if kind == 1:
            return int.from_bytes(self.take(2), "big")
        if kind == 2:
            return int.from_bytes(self.take(8), "big")
        return index - 32

    def bounded(self) -> int:
        return max(-BOUNDED, min(BOUNDED, self.number()))

    def blob(self) -> bytes:
        """A 2-byte length, then that many bytes (fewer at the end of the input)."""
        return self.take(int.from_bytes(self.take(2), "big"))

    def sized(self) -> bytes:
        """A blob, or (flag 0x80 on the length's first byte) that many zero bytes: long packets from short input."""
        head = self.take(2)
        length = int.from_bytes(head, "big")
        if length & 0x8000:
            return bytes(length & 0x7FFF)
        return self.take(length)

    def buffer(self, data: bytes) -> Buffer:
        kind = self.byte() % 8
        return bytearray(data) if kind == 6 else memoryview(data) if kind == 7 else data

    def count(self) -> int:
        return self.byte() % (MAX_ITEMS + 1)


class Writer:
    """Builds inputs :class:`Reader` decodes (for the seeds)."""

    def __init__(self, function: int) -> None:
        self.out = bytearray([function])

    def byte(self, value: int) -> Writer:
        self.out.append(value & 0xFF)
        return self

    def number(self, value: int) -> Writer:
        if value in INTERESTING:
            return self.byte(INTERESTING.index(value) << 2)
        if -32 <= value < 32:
            return self.byte((value + 32) << 2 | 3)
        if 0 <= value <= 0xFFFF:
            self.byte(1)
            self.out += value.to_bytes(2, "big")
            return self
        self.byte(2)
        self.out += (value & U64_MAX).to_bytes(8, "big")
        return self

    def blob(self, data: bytes) -> Writer:
        self.out += len(data).to_bytes(2, "big") + data
        return self

    def zeros(self, size: int) -> Writer:
        self.out += (0x8000 | size).to_bytes(2, "big")
        return self

    def done(self) -> bytes:
        return bytes(self.out)


# --- the two sides ------------------------------------------------------------------------------------------------


Outcome = tuple[str, Any]


def _outcome(call: Callable[[], Any]) -> Outcome:
    try:
        return "returned", call()
    except Exception as error:  # the exception type is what is compared
        return "raised", type(error)


def _same(name: str, c_call: Callable[[], Any], pure_call: Callable[[], Any]) -> Outcome:
    c_outcome, pure_outcome = _outcome(c_call), _outcome(pure_call)
    if c_outcome != pure_outcome:
        raise AssertionError(f"{name}: C gave {c_outcome!r}, the pure twin {pure_outcome!r}")
    return c_outcome


def _buffers(reader: Reader, sized: bool = False) -> list[Buffer]:
    return [reader.buffer(reader.sized() if sized else reader.blob()) for _ in range(reader.count())]


def _ring(reader: Reader) -> Any:
    """Mostly a valid ring (zeros, or some blocks set from the input); sometimes one of the wrong shape or type."""
    mode = reader.byte()
    if mode == 0xF0:
        return array("q", bytes(8 * RING_BLOCKS))
    if mode == 0xF1:
        return array("Q", bytes(8 * (RING_BLOCKS - 1)))
    if mode == 0xF2:
        return [0] * RING_BLOCKS
    if mode == 0xF3:
        return bytearray(8 * RING_BLOCKS)
    ring = array("L" if mode == 0xF4 else "Q", bytes(8 * RING_BLOCKS))
    for _ in range(mode % 16):
        ring[reader.byte() % RING_BLOCKS] = int.from_bytes(reader.take(8), "little")
    return ring


def _check_accept_transport_run(reader: Reader, c: ModuleType) -> None:
    last, limit = reader.number(), reader.number()
    ring = _ring(reader)
    messages: list[Buffer] = []
    plaintexts: list[bytes | None] = []
    counter = last if 0 <= last <= U64_MAX else 0
    for _ in range(reader.count()):
        shape = reader.byte()
        if shape & 1:
            # A well-formed header with a counter stepping from the previous one (or a fresh number).
            step = reader.number() if shape & 2 else (shape >> 2) - 32
            counter = min(max(counter + step, 0), U64_MAX)
            message = b"\x04\x00\x00\x00" + bytes(4) + counter.to_bytes(8, "little") + reader.blob()
        else:
            message = reader.blob()
        messages.append(reader.buffer(message))
        plain = reader.byte()
        plaintext: Any = None  # open_batch's "did not authenticate"
        if plain % 4:
            plaintext = reader.blob()
            if plain == 0xFF:
                plaintext = bytearray(plaintext)  # not what open_batch returns: both sides must refuse it
        plaintexts.append(plaintext)
    tail = reader.byte()
    if tail == 0xFF:
        plaintexts.append(None)  # lengths differ
    message_input: Sequence[Buffer] = tuple(messages) if tail == 0xFE else messages
    c_ring, pure_ring = (array(ring.typecode, ring) if isinstance(ring, array) else ring.copy() for _ in range(2))
    _same(
        "accept_transport_run",
        lambda: c.accept_transport_run(message_input, plaintexts, c_ring, last, limit),
        lambda: pure.accept_transport_run(message_input, plaintexts, pure_ring, last, limit),
    )
    if c_ring != pure_ring:
        changed = [i for i in range(min(len(c_ring), len(pure_ring))) if c_ring[i] != pure_ring[i]]
        raise AssertionError(f"accept_transport_run: the rings differ after the call in blocks {changed}")


def _check_destination_runs(reader: Reader, c: ModuleType) -> None:
    packets = _buffers(reader)
    _same("destination_runs", lambda: c.destination_runs(packets), lambda: pure.destination_runs(packets))


def _check_gso_run_ends(reader: Reader, c: ModuleType) -> None:
    max_segments, max_bytes = reader.bounded(), reader.bounded()
    payloads = _buffers(reader, sized=True)
    _same(
        "gso_run_ends",
        lambda: c.gso_run_ends(payloads, max_segments, max_bytes),
        lambda: pure.gso_run_ends(payloads, max_segments, max_bytes),
    )


def _check_sealed_size(reader: Reader, c: ModuleType) -> None:
    mtu = None if reader.byte() & 1 else reader.bounded()
    packets = _buffers(reader, sized=True)
    _same("sealed_size", lambda: c.sealed_size(packets, mtu), lambda: pure.sealed_size(packets, mtu))


def _check_plain_flow_end(reader: Reader, c: ModuleType) -> None:
    start, protocol, least = reader.bounded(), reader.bounded(), reader.bounded()
    packets: list[Any] = [reader.buffer(reader.blob()) for _ in range(reader.count())]
    key_source = reader.byte()
    # Usually the flow key of one of the packets, so that runs form; else bytes from the input (any length).
    if key_source & 1 and packets:
        key = bytes(packets[(key_source >> 1) % len(packets)][12:24])
    else:
        key = reader.blob()
    shape = reader.byte()
    # Rarely the wrong types: both sides must refuse a tuple of packets and a bytearray key alike.
    packet_list: Any = tuple(packets) if shape == 0xFE else packets
    key_object: Any = bytearray(key) if shape == 0xFF else key
    _same(
        "plain_flow_end",
        lambda: c.plain_flow_end(packet_list, start, key_object, protocol, least),
        lambda: pure.plain_flow_end(packet_list, start, key_object, protocol, least),
    )


def _check_open_batch(reader: Reader, c: ModuleType) -> None:
    receiver, counter, mtu = reader.number(), reader.number(), reader.bounded()
    packets = _buffers(reader, sized=True)
    mtu_or_none = None if reader.byte() & 1 else mtu
    if not packets:
        # An empty batch with a counter past 64 bits: C raises OverflowError converting it, the pure side returns [].
        counter = min(counter, U64_MAX)
    outcome = _same(
        "seal_batch",
        lambda: c.seal_batch(KEY, receiver, counter, packets, mtu_or_none),
        lambda: pure.seal_batch(KEY, receiver, counter, packets, mtu_or_none),
    )
    messages: list[Buffer] = list(outcome[1]) if outcome[0] == "returned" else []
    # Tamper: flip bytes anywhere (the counter is the nonce), cut, add garbage.
    for _ in range(reader.byte() % 8):
        if not messages:
            break
        index = reader.byte() % len(messages)
        action = reader.byte()
        tampered = bytearray(messages[index])
        if action & 1 and tampered:
            tampered[reader.number() % len(tampered)] ^= reader.byte() or 1
        elif action & 2:
            del tampered[reader.number() % (len(tampered) + 1) :]
        else:
            tampered += reader.blob()
        messages[index] = reader.buffer(bytes(tampered))
    messages += _buffers(reader)
    key: Buffer = KEY if reader.byte() != 0xFF else reader.blob()
    _same("open_batch", lambda: c.open_batch(key, messages), lambda: pure.open_batch(key, messages))


def _check_coalesce(reader: Reader, c: ModuleType) -> None:
    flags = reader.byte()
    tcp, udp = bool(flags & 1), bool(flags & 2)
    packets = [reader.blob() for _ in range(reader.count())]
    frames = c.coalesce(packets, tcp, udp)
    if frames is not None:
        _same("coalesce", lambda: frames, lambda: pk.coalesce(packets, tcp=tcp, udp=udp))


def _check_split_gso_frame(reader: Reader, c: ModuleType) -> None:
    frame = reader.buffer(reader.blob())
    segments = c.split_gso_frame(frame)
    if segments is not None:
        body = memoryview(frame)[pk.VIRTIO_NET_HDR_LEN :]
        _same("split_gso_frame", lambda: segments, lambda: pk.split_gso(pk.VirtioNetHdr.decode(frame), body))
    if len(frame) >= pk.VIRTIO_NET_HDR_LEN:
        header = pk.VirtioNetHdr.decode(frame)
        packet = memoryview(frame)[pk.VIRTIO_NET_HDR_LEN :]
        fields = (header.flags, header.gso_type, header.hdr_len, header.gso_size, header.csum_start, header.csum_offset)
        split = c.split_gso(*fields, packet)
        if split is not None:
            _same("split_gso", lambda: split, lambda: pk.split_gso(header, packet))
    _same("flow_hash", lambda: c.flow_hash(frame), lambda: pk.flow_hash(frame))


def _check_ones_complement_sum(reader: Reader, c: ModuleType) -> None:
    initial = reader.number()
    data = reader.buffer(reader.sized())
    _same(
        "ones_complement_sum",
        lambda: c.ones_complement_sum(data, initial),
        lambda: pure.ones_complement_sum(data, initial),
    )


def _check_split_datagrams(reader: Reader, c: ModuleType) -> None:
    size, segment_size = reader.bounded(), reader.bounded()
    data = reader.buffer(reader.sized())
    source = ("192.0.2.1", 51820)
    _same(
        "split_datagrams",
        lambda: c.split_datagrams(data, size, segment_size, source),
        lambda: pure.split_datagrams(data, size, segment_size, source),
    )


CHECKS: tuple[Callable[[Reader, ModuleType], None], ...] = (
    _check_accept_transport_run,
    _check_destination_runs,
    _check_gso_run_ends,
    _check_sealed_size,
    _check_plain_flow_end,
    _check_open_batch,
    _check_coalesce,
    _check_split_gso_frame,
    _check_ones_complement_sum,
    _check_split_datagrams,
)
ACCEPT, DESTINATIONS, GSO_RUNS, SEALED_SIZE, PLAIN_FLOW, OPEN, COALESCE, SPLIT, CHECKSUM, DATAGRAMS = range(len(CHECKS))


def TestOneInput(data: bytes) -> None:
    if c_native is None or not data:
        return
    reader = Reader(data)
    CHECKS[reader.byte() % len(CHECKS)](reader, c_native)


# --- seeds --------------------------------------------------------------------------------------------------------


def _ipv4(source: bytes, destination: bytes, body: bytes = b"", protocol: int = 17) -> bytes:
    total = 20 + len(body)
    return (
        bytes([0x45, 0])
        + total.to_bytes(2, "big")
        + bytes([0, 1, 0x40, 0, 64, protocol, 0, 0])
        + source
        + destination
        + body
    )


def _ipv6(source: bytes, destination: bytes, body: bytes = b"") -> bytes:
    return bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([17, 64]) + source + destination + body


def _ip_packet_seed_packets() -> list[bytes]:
    from fuzz import fuzz_ip_packet

    packets: list[bytes] = []
    for seed in fuzz_ip_packet.seeds():
        if len(seed) < 4096:
            packets += split_datagrams(seed, limit=16, width=fuzz_ip_packet.LENGTH_WIDTH)
    return packets


def seeds() -> list[bytes]:
    a4, b4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
    a6, b6 = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
    out: list[bytes] = []

    # accept_transport_run: in-order counters, a replay, a jump past the window, a failure, keepalive, bad lengths.
    writer = Writer(ACCEPT).number(0).number(REJECT_AFTER_MESSAGES).byte(0).byte(8)
    plain = [
        _ipv4(a4, b4, b"xyz") + bytes(9),
        _ipv4(a4, b4),
        None,
        _ipv4(b4, a4),
        b"",
        _ipv6(a6, b6, b"hello"),
        b"\x45",
    ]
    steps = [1, 1, 1, 0, 1, 65, 1]
    for step, plaintext in zip(steps, plain, strict=True):
        body = bytes(16 + len(plaintext or b""))
        if -32 <= step < 32:
            writer.byte((step + 32) << 2 | 1).blob(body).byte(0)
        else:
            writer.byte(3).number(step).blob(body).byte(0)
        if plaintext is None:
            writer.byte(0)
        else:
            writer.byte(1).blob(plaintext)
    out.append(writer.byte(0).done())
    # Near the top of the counter space with a ring already full of bits, and a jump of more than the whole ring.
    writer = Writer(ACCEPT).number(U64_MAX - WINDOW_SIZE).number(U64_MAX).byte(3)
    for block in (0, 5, 127):
        writer.byte(block)
        writer.out += U64_MAX.to_bytes(8, "little")
    writer.byte(4)
    for step in (-1, 1, -200):
        writer.byte(3).number(step).blob(bytes(20)).byte(0).byte(1).blob(_ipv4(a4, b4))
    writer.byte(3).number(WINDOW_SIZE + 64).blob(bytes(20)).byte(7).byte(1).blob(_ipv4(a4, b4))
    out.append(writer.byte(0).done())

    # destination_runs: v4/v6 runs, short and non-IP packets between them, buffer kinds mixed.
    packets = [_ipv4(a4, b4), _ipv4(a4, b4), _ipv6(a6, b6), b"\x45" + bytes(10), b"", _ipv6(a6, b6), _ipv4(b4, a4)]
    writer = Writer(DESTINATIONS).byte(len(packets))
    for index, packet in enumerate(packets):
        writer.blob(packet).byte(index)
    out.append(writer.done())

    # gso_run_ends: equal-size runs with a short tail, an empty payload, a limit hit by bytes and one by count.
    sizes = [1452, 1452, 1452, 100, 1452, 0, 60, 60, 1500, 1452]
    for max_segments, max_bytes in ((64, 65535), (2, 65535), (64, 3000), (0, -1)):
        writer = Writer(GSO_RUNS).number(max_segments).number(max_bytes).byte(len(sizes))
        for size in sizes:
            writer.zeros(size).byte(0)
        out.append(writer.done())

    # split_datagrams: a GRO read with a short last segment, one exactly divisible, a size past the buffer.
    for size, segment_size, length in ((4000, 1452, 4000), (2904, 1452, 3000), (100, 1452, 100), (5000, 100, 4000)):
        out.append(Writer(DATAGRAMS).number(size).number(segment_size).zeros(length).byte(6).done())

    # sealed_size: sizes around the padding rule and the MTU, no MTU.
    for mtu in (1420, None, -5):
        writer = Writer(SEALED_SIZE).byte(1 if mtu is None else 0)
        if mtu is not None:
            writer.number(mtu)
        sizes = [0, 1, 15, 16, 17, 1415, 1420, 1430]
        writer.byte(len(sizes))
        for size in sizes:
            writer.zeros(size).byte(0)
        out.append(writer.done())

    # plain_flow_end: a run of one TCP flow, then another flow; a fragment; a packet shorter than its length.
    flow = [_ipv4(a4, b4, bytes(20), 6) for _ in range(3)] + [_ipv4(b4, a4, bytes(20), 6)]
    fragment = bytearray(_ipv4(a4, b4, bytes(20), 6))
    fragment[6:8] = b"\x20\x00"
    for extra, least in ((bytes(fragment), 20), (_ipv4(a4, b4, bytes(20), 6)[:30], 0)):
        packets = [*flow[:2], extra, *flow[2:]]
        writer = Writer(PLAIN_FLOW).number(0).number(6).number(least).byte(len(packets))
        for packet in packets:
            writer.blob(packet).byte(0)
        out.append(writer.byte(1).done())

    # open_batch: sealed messages, one tampered, one cut, garbage after them.
    batch = [_ipv4(a4, b4, b"payload"), b"", bytes(1400), b"x" * 17]
    writer = Writer(OPEN).number(7).number(1000).number(1420).byte(len(batch))
    for packet in batch:
        writer.blob(packet).byte(0)
    writer.byte(0).byte(2)
    writer.byte(0).byte(1).number(9).byte(0x40).byte(0)
    writer.byte(2).byte(2).number(20).byte(0)
    out.append(writer.byte(2).blob(bytes(31)).byte(0).blob(bytes(48)).byte(7).byte(0).done())

    # coalesce and split_gso_frame: the IP-packet target's TCP/UDP packets and the GSO frames coalesce makes of them.
    ip_packets = _ip_packet_seed_packets()
    for flags in (1, 3):
        writer = Writer(COALESCE).byte(flags).byte(min(len(ip_packets), MAX_ITEMS))
        for packet in ip_packets[:MAX_ITEMS]:
            writer.blob(packet)
        out.append(writer.done())
    frames = [frame for frame in ip_packets if len(frame) >= pk.VIRTIO_NET_HDR_LEN]
    frames += pk.coalesce(ip_packets, tcp=True, udp=True)
    out += [Writer(SPLIT).blob(frame).byte(0).done() for frame in frames]

    out.append(Writer(CHECKSUM).number(0).blob(_ipv4(a4, b4, b"odd")).byte(0).done())
    out.append(Writer(CHECKSUM).number(2**62).zeros(1501).byte(7).done())
    return out


if __name__ == "__main__":
    fuzz_main("fuzz_native")
