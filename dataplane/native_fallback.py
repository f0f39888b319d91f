"""The pure-Python twin of ``dataplane._native``: the same functions, byte-identical results (the reference).

Used when the extension is not built or ``FIREZONE_NATIVE=0``; ``dataplane.native`` picks one of the two. See
``dataplane/_native.c`` for the message layout.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import MutableSequence, Sequence
from functools import lru_cache
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .wireguard.replay import BLOCK_BIT_LOG as _REPLAY_BLOCK_BIT_LOG
from .wireguard.replay import RING_BLOCKS as REPLAY_RING_BLOCKS
from .wireguard.replay import replay_accept

Buffer = bytes | bytearray | memoryview
_T = TypeVar("_T")

KEY_SIZE = 32
_HEADER_SIZE = 16
_TAG_SIZE = 16
_PADDING_MULTIPLE = 16
_PADDINGS = tuple(bytes(size) for size in range(_PADDING_MULTIPLE))
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_FOLD = 0xFFFF
_MAX_INITIAL = 1 << 62
_U64_MAX = (1 << 64) - 1
_SSIZE_MAX = (1 << 63) - 1  # the C twin's integer limits (64-bit Linux)
_SSIZE_MIN = -(1 << 63)
_unpack_counter = struct.Struct("<8xQ").unpack_from
_REPLAY_BLOCK_MASK = REPLAY_RING_BLOCKS - 1
_REPLAY_BIT_MASK = (1 << _REPLAY_BLOCK_BIT_LOG) - 1


@lru_cache(maxsize=4096)
def _aead(key: bytes) -> ChaCha20Poly1305:
    # A keypair's key is the same bytes object batch after batch, so the lookup hashes it once; building the AEAD
    # object costs more than a small packet's encryption. Sized for two directions of a gateway's many clients.
    return ChaCha20Poly1305(key)


def _key(key: Buffer) -> ChaCha20Poly1305:
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise ValueError("ChaCha20Poly1305 key must be 32 bytes")
    return _aead(key)


def seal_batch(
    key: Buffer, receiver_index: int, first_counter: int, packets: Sequence[Buffer], mtu: int | None
) -> list[bytes]:
    """Complete WireGuard transport messages for ``packets``, the i-th with counter ``first_counter + i``.

    A non-empty packet is zero-padded to a multiple of 16 bytes, but never past ``mtu`` (None: no limit).
    """
    if not 0 <= receiver_index <= 0xFFFFFFFF:
        raise OverflowError("receiver index must fit in 32 bits")
    if first_counter < 0 or (packets and first_counter + len(packets) - 1 > 0xFFFFFFFFFFFFFFFF):
        raise OverflowError("counter does not fit in 64 bits")
    encrypt = _key(key).encrypt
    header = b"\x04\x00\x00\x00" + receiver_index.to_bytes(4, "little")
    paddings = _PADDINGS
    out: list[bytes] = []
    counter = first_counter
    for packet in packets:
        size = len(packet)
        plaintext = packet
        if size:
            padding = -size % _PADDING_MULTIPLE
            if padding:
                if mtu is not None and size + padding > mtu:
                    padding = max(mtu - size, 0)
                plaintext = bytes(packet) + paddings[padding]
        counter_bytes = counter.to_bytes(8, "little")
        counter += 1
        out.append(header + counter_bytes + encrypt(_NONCE_PREFIX + counter_bytes, plaintext, None))
    return out


def open_batch(key: Buffer, messages: Sequence[Buffer]) -> list[bytes | None]:
    """The padded plaintext of each transport message, or None where it does not authenticate.

    Header fields other than the counter are not checked; a message shorter than 32 bytes never authenticates.
    Replay is not checked: the caller reads the counters (bytes 8..16) and keeps that authority.
    """
    decrypt = _key(key).decrypt
    out: list[bytes | None] = []
    for message in messages:
        if len(message) < _HEADER_SIZE + _TAG_SIZE:
            out.append(None)
            continue
        view = memoryview(message)
        try:
            out.append(decrypt(_NONCE_PREFIX + bytes(view[8:16]), view[_HEADER_SIZE:], None))
        except InvalidTag:
            out.append(None)
    return out


def ones_complement_sum(data: Buffer, initial: int = 0) -> int:
    """The folded 16-bit one's-complement sum of ``data`` (odd length padded with a zero byte) plus ``initial``.

    0 only when both are zero, else in 1..0xFFFF. ``initial`` must be in 0..2**62. Not complemented: this is the
    "partial" value that goes into a NEEDS_CSUM checksum field.
    """
    if not 0 <= initial <= _MAX_INITIAL:
        raise ValueError("initial must be in 0..2**62")
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    value += initial
    if value == 0:
        return 0
    folded = value % _FOLD
    return folded if folded else _FOLD


def plain_flow_end(packets: list[bytes], start: int, key: bytes, protocol: int, least: int, /) -> int:
    """The end of the run of packets from ``packets[start]`` that are plain IPv4 packets of one flow: bytes objects
    starting 0x45, not fragments, of ``protocol``, bytes 12-24 equal to ``key``, total length within [least, len]."""
    if type(packets) is not list or not isinstance(key, bytes):
        raise TypeError("plain_flow_end: packets must be a list and key bytes")
    if start < 0:
        raise ValueError("plain_flow_end: start must not be negative")
    end = start
    if len(key) != 12:
        return end
    count = len(packets)
    while end < count:
        packet = packets[end]
        if not isinstance(packet, bytes) or len(packet) < 24 or packet[12:24] != key:
            break
        if packet[0] != 0x45 or packet[9] != protocol or packet[6] & 0x3F or packet[7]:
            break
        total = (packet[2] << 8) | packet[3]
        if total < least or total > len(packet):
            break
        end += 1
    return end


def sealed_size(packets: Sequence[Buffer], mtu: int | None, /) -> int:
    """Bytes of the transport messages ``seal_batch`` makes of ``packets`` (header, padding to 16 but never past
    ``mtu``, tag), without sealing them."""
    if mtu is not None and not _SSIZE_MIN <= mtu <= _SSIZE_MAX:
        raise OverflowError("sealed_size: mtu must fit in a C long long")
    total = 0
    for packet in packets:
        size = len(packet)
        padded = size + (-size % _PADDING_MULTIPLE)
        if mtu is not None and padded > mtu:
            padded = max(mtu, size)
        total += padded
    return total + (_HEADER_SIZE + _TAG_SIZE) * len(packets)


def gso_run_ends(payloads: Sequence[Buffer], max_segments: int, max_bytes: int, /) -> list[int]:
    """``payloads`` cut into runs one UDP GSO send can carry, as the index after each run's last payload: equal
    sizes except that the last may be shorter, non-empty, at most ``max_segments`` payloads and ``max_bytes`` bytes
    (a lone payload is a run of its own whatever its size)."""
    if not _SSIZE_MIN <= max_segments <= _SSIZE_MAX or not _SSIZE_MIN <= max_bytes <= _SSIZE_MAX:
        raise OverflowError("gso_run_ends: limits must fit in a C ssize_t")
    ends: list[int] = []
    i = 0
    count = len(payloads)
    while i < count:
        size = len(payloads[i])
        j = i + 1
        if size:
            total = size
            while j < count and j - i < max_segments:
                length = len(payloads[j])
                if length > size or length == 0 or total + length > max_bytes:
                    break
                total += length
                j += 1
                if length < size:
                    break  # only the last segment may be short
        ends.append(j)
        i = j
    return ends


def split_datagrams(buffer: Buffer, size: int, segment_size: int, source: _T, /) -> list[tuple[bytes, _T]]:
    """The first ``size`` bytes of ``buffer`` (one UDP GRO read) cut into datagrams of ``segment_size`` bytes (the
    last may be shorter), each paired with ``source``."""
    if not _SSIZE_MIN <= size <= _SSIZE_MAX or not _SSIZE_MIN <= segment_size <= _SSIZE_MAX:
        raise OverflowError("split_datagrams: sizes must fit in a C ssize_t")
    with memoryview(buffer) as view:
        if not 0 <= size <= view.nbytes:
            raise ValueError("split_datagrams: size must be within the buffer")
        if segment_size <= 0:
            raise ValueError("split_datagrams: segment_size must be positive")
        flat = view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")
        # One copy out of the buffer, then bytes slices: cheaper than a memoryview slice and a bytes() per segment.
        blob = bytes(flat[:size])
    return [(blob[start : start + segment_size], source) for start in range(0, size, segment_size)]


def destination_runs(packets: Sequence[Buffer], /) -> list[tuple[int, bytes | None]]:
    """``packets`` cut into runs of one destination address (4 bytes for IPv4, 16 for IPv6), as (index after the
    run, address); address None for a run of packets too short for their IP version or of no version 4 or 6."""
    runs: list[tuple[int, bytes | None]] = []
    current: bytes | None = None
    for index, packet in enumerate(packets):
        size = len(packet)
        if size >= 20 and packet[0] >> 4 == 4:
            destination: bytes | None = packet[16:20]  # type: ignore[assignment]
        elif size >= 40 and packet[0] >> 4 == 6:
            destination = packet[24:40]  # type: ignore[assignment]
        else:
            if not isinstance(packet, bytes | bytearray | memoryview):
                raise TypeError("destination_runs: a packet must be a bytes-like object")
            destination = None
        if destination is not None and type(destination) is not bytes:
            destination = bytes(destination)
        if not index:
            current = destination
        elif destination != current:
            runs.append((index, current))
            current = destination
    if packets:
        runs.append((len(packets), current))
    return runs


#: accept_transport_run's result: (packets, source runs, last, decryption failed, replayed, rejected bytes,
#: invalid inner packets, keepalives).
AcceptedRun = tuple[list[bytes], list[tuple[int, bytes]], int, int, int, int, int, int]


def accept_transport_run(
    messages: Sequence[Buffer],
    plaintexts: Sequence[bytes | None],
    ring: MutableSequence[int],
    last: int,
    limit: int,
    /,
) -> AcceptedRun:
    """What a run of transport messages delivers once ``open_batch`` gave their ``plaintexts``: the replay check
    (``ring``, ``last`` and ``limit`` of a ``ReplayFilter``; ``ring`` is updated, the new ``last`` returned) and the
    inner packet's header checks.

    Returns the IP packets (each cut to its IP total length), the runs of their source addresses as (index after the
    run in the packets, address) for the caller's cryptokey routing, the new ``last``, and how many messages failed
    authentication, were replays (with the bytes of both), carried no valid IP packet, or were keepalives.
    """
    if not 0 <= last <= _U64_MAX or not 0 <= limit <= _U64_MAX:
        raise OverflowError("accept_transport_run: last and limit must fit in 64 bits")
    if (
        not isinstance(ring, array)
        or ring.typecode not in "QL"
        or ring.itemsize != 8
        or len(ring) != REPLAY_RING_BLOCKS
    ):
        raise TypeError(f"accept_transport_run: ring must be an array of {REPLAY_RING_BLOCKS} 64-bit blocks")
    if len(messages) != len(plaintexts):
        raise ValueError("accept_transport_run: messages and plaintexts differ in length")
    packets: list[bytes] = []
    sources: list[tuple[int, bytes]] = []
    failed = replayed = rejected_bytes = invalid = keepalives = 0
    run_source = b""
    for message, plaintext in zip(messages, plaintexts, strict=True):
        if plaintext is None:
            failed += 1
            rejected_bytes += len(message)
            continue
        if not isinstance(plaintext, bytes):
            raise TypeError("accept_transport_run: a plaintext must be bytes or None")
        if len(message) < _HEADER_SIZE:
            # open_batch never authenticates these; a counter cannot be read from fewer than 8 bytes.
            raise ValueError("accept_transport_run: an opened message is shorter than its header")
        counter = _unpack_counter(message)[0]
        if last < counter < limit and not (counter ^ last) >> _REPLAY_BLOCK_BIT_LOG:
            # The common case of replay_accept inline: a new counter in the block of the highest one.
            ring[counter >> _REPLAY_BLOCK_BIT_LOG & _REPLAY_BLOCK_MASK] |= 1 << (counter & _REPLAY_BIT_MASK)
            last = counter
        else:
            accepted = replay_accept(ring, last, limit, counter)
            if accepted < 0:
                replayed += 1
                rejected_bytes += len(message)
                continue
            last = accepted
        size = len(plaintext)
        if not size:
            keepalives += 1
            continue
        version = plaintext[0] >> 4
        if version == 4 and size >= 20:
            length = (plaintext[2] << 8) | plaintext[3]
            if length < 20 or length > size:
                invalid += 1
                continue
            source = plaintext[12:16]
        elif version == 6 and size >= 40:
            length = 40 + ((plaintext[4] << 8) | plaintext[5])
            if length > size:
                invalid += 1
                continue
            source = plaintext[8:24]
        else:
            invalid += 1
            continue
        if source != run_source:
            if packets:
                sources.append((len(packets), run_source))
            run_source = source
        packets.append(plaintext[:length] if length < size else plaintext)
    if packets:
        sources.append((len(packets), run_source))
    return packets, sources, last, failed, replayed, rejected_bytes, invalid, keepalives
