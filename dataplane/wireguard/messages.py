"""Wire formats of WireGuard messages 1-4 (little-endian indices and counter, whitepaper §5.4)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    COOKIE_NONCE_SIZE,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_HEADER_SIZE,
    MESSAGE_TRANSPORT_MIN_SIZE,
)


class MessageParseError(ValueError):
    """The datagram is not a well-formed WireGuard message."""


# Offsets of the MACs: everything before mac1 is covered by mac1, everything before mac2 by mac2.
INITIATION_MAC1_OFFSET = 116
INITIATION_MAC2_OFFSET = 132
RESPONSE_MAC1_OFFSET = 60
RESPONSE_MAC2_OFFSET = 76

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
_TRANSPORT_HEADER = struct.Struct("<IIQ")


@dataclass(frozen=True, slots=True)
class Initiation:
    sender_index: int
    ephemeral: bytes  # 32
    encrypted_static: bytes  # 32 + 16
    encrypted_timestamp: bytes  # 12 + 16
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)

    def to_bytes(self) -> bytes:
        return _INITIATION.pack(
            MESSAGE_INITIATION,
            self.sender_index,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class Response:
    sender_index: int
    receiver_index: int
    ephemeral: bytes  # 32
    encrypted_nothing: bytes  # 16
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)

    def to_bytes(self) -> bytes:
        return _RESPONSE.pack(
            MESSAGE_RESPONSE,
            self.sender_index,
            self.receiver_index,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver_index: int
    nonce: bytes  # 24
    encrypted_cookie: bytes  # 16 + 16

    def to_bytes(self) -> bytes:
        return _COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, self.receiver_index, self.nonce, self.encrypted_cookie)


@dataclass(frozen=True, slots=True)
class Transport:
    receiver_index: int
    counter: int
    encrypted_packet: bytes

    def to_bytes(self) -> bytes:
        return _TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, self.receiver_index, self.counter) + self.encrypted_packet


Message = Initiation | Response | CookieReply | Transport


def message_type(data: bytes) -> int:
    """The 32-bit little-endian type field (the three reserved bytes make any non-zero value an unknown type)."""
    if len(data) < 4:
        raise MessageParseError("shorter than a message type")
    return int.from_bytes(data[:4], "little")


def parse(data: bytes) -> Message:
    """Parse one datagram; raises only :class:`MessageParseError`."""
    kind = message_type(data)
    size = len(data)
    if kind == MESSAGE_INITIATION:
        if size != MESSAGE_INITIATION_SIZE:
            raise MessageParseError(f"initiation of {size} bytes")
        _, sender, ephemeral, static, timestamp, mac1, mac2 = _INITIATION.unpack(data)
        return Initiation(sender, ephemeral, static, timestamp, mac1, mac2)
    if kind == MESSAGE_RESPONSE:
        if size != MESSAGE_RESPONSE_SIZE:
            raise MessageParseError(f"response of {size} bytes")
        _, sender, receiver, ephemeral, nothing, mac1, mac2 = _RESPONSE.unpack(data)
        return Response(sender, receiver, ephemeral, nothing, mac1, mac2)
    if kind == MESSAGE_COOKIE_REPLY:
        if size != MESSAGE_COOKIE_REPLY_SIZE:
            raise MessageParseError(f"cookie reply of {size} bytes")
        _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
        return CookieReply(receiver, nonce, cookie)
    if kind == MESSAGE_TRANSPORT:
        if size < MESSAGE_TRANSPORT_MIN_SIZE:
            raise MessageParseError(f"transport message of {size} bytes")
        _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
        return Transport(receiver, counter, bytes(data[MESSAGE_TRANSPORT_HEADER_SIZE:]))
    raise MessageParseError(f"unknown message type {kind:#x}")


assert _INITIATION.size == MESSAGE_INITIATION_SIZE
assert _RESPONSE.size == MESSAGE_RESPONSE_SIZE
assert _COOKIE_REPLY.size == MESSAGE_COOKIE_REPLY_SIZE
assert COOKIE_NONCE_SIZE == 24
