"""Firezone's peer-to-peer control protocol: events between client and gateway inside the tunnel (portal-protocol.md §3.4).

A control message is an IPv6 packet that no real traffic can look like: source and destination are both the
unspecified address ``::``, next header 0xFF (reserved), hop limit 0. Its payload is an 8-byte header (byte 0 the event
type, bytes 1-7 zero) followed by the event's JSON body. The whole packet fits in the tunnel MTU of 1280 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ASSIGNED_IPS_EVENT = 0  # client → gateway: proxy IPs chosen for a DNS resource
DOMAIN_STATUS_EVENT = 1  # gateway → client: the NAT for a domain is (in)active
GOODBYE_EVENT = 2  # either way: the sender is closing the connection

NEXT_HEADER = 0xFF
HEADER_LENGTH = 8
IPV6_HEADER_LENGTH = 40
MAX_PACKET_SIZE = 1280
_UNSPECIFIED = bytes(16)
_IPV6_PREFIX = struct.Struct("!IHBB")  # version/class/flow, payload length, next header, hop limit


class ControlMessageTooLarge(ValueError):
    """The message would not fit in one tunnel packet."""


@dataclass(frozen=True, slots=True)
class ControlMessage:
    event: int
    body: bytes


def build(event: int, body: bytes = b"") -> bytes:
    """One control packet carrying ``event`` and its body."""
    if not 0 <= event <= 0xFF:
        raise ValueError("an event type is one byte")
    payload_length = HEADER_LENGTH + len(body)
    if IPV6_HEADER_LENGTH + payload_length > MAX_PACKET_SIZE:
        raise ControlMessageTooLarge(f"control message of {payload_length} bytes does not fit the tunnel MTU")
    header = _IPV6_PREFIX.pack(6 << 28, payload_length, NEXT_HEADER, 0)
    return header + _UNSPECIFIED + _UNSPECIFIED + bytes((event, 0, 0, 0, 0, 0, 0, 0)) + body


def goodbye() -> bytes:
    return build(GOODBYE_EVENT)


def is_control_packet(packet: bytes | bytearray | memoryview) -> bool:
    """Whether ``packet`` is shaped as a control message (cheap: checked on every decrypted packet)."""
    return (
        len(packet) >= IPV6_HEADER_LENGTH
        and packet[0] >> 4 == 6
        and packet[6] == NEXT_HEADER
        and packet[8:40] == _UNSPECIFIED + _UNSPECIFIED
    )


def parse(packet: bytes | bytearray | memoryview) -> ControlMessage | None:
    """The message in a control packet, or None when the packet is not one or is cut short."""
    if not is_control_packet(packet):
        return None
    payload_length = (packet[4] << 8) | packet[5]
    end = IPV6_HEADER_LENGTH + payload_length
    if payload_length < HEADER_LENGTH or end > len(packet):
        return None
    start = IPV6_HEADER_LENGTH
    return ControlMessage(packet[start], bytes(packet[start + HEADER_LENGTH : end]))
