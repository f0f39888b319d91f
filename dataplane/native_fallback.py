"""The pure-Python twin of ``dataplane._native``: the same functions, byte-identical results (the reference).

Used when the extension is not built or ``FIREZONE_NATIVE=0``; ``dataplane.native`` picks one of the two. See
``dataplane/_native.c`` for the message layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

Buffer = bytes | bytearray | memoryview

KEY_SIZE = 32
_HEADER_SIZE = 16
_TAG_SIZE = 16
_PADDING_MULTIPLE = 16
_PADDINGS = tuple(bytes(size) for size in range(_PADDING_MULTIPLE))
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_FOLD = 0xFFFF
_MAX_INITIAL = 1 << 62


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
