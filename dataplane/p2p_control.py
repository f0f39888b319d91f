"""Firezone's peer-to-peer control protocol: events between client and gateway inside the tunnel (docs/protocol.md §3.4).

A control message is an IPv6 packet that no real traffic can look like: source and destination are both the
unspecified address ``::``, next header 0xFF (reserved), hop limit 0. Its payload is an 8-byte header (byte 0 the event
type, bytes 1-7 zero) followed by the event's JSON body. The whole packet fits in the tunnel MTU of 1280 bytes.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Sequence
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


# --- DNS-resource NAT events (docs/protocol.md §3.4) ----------------------------------------------------------------

PROXY_IP_COUNTS = (4, 8)  # a client assigns 4 (IPv4 only) or 8 (4 + 4 IPv6) proxy IPs per domain
MAX_DOMAIN_LENGTH = 253
MAX_RESOURCE_ID_LENGTH = 64


@dataclass(frozen=True, slots=True)
class AssignedIps:
    resource: str
    domain: str
    proxy_ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]


@dataclass(frozen=True, slots=True)
class DomainStatus:
    resource: str
    domain: str
    active: bool


def assigned_ips(
    resource: str, domain: str, proxy_ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> bytes:
    """The client's ``assigned_ips`` packet; refuses a proxy IP count other than 4 or 8, as the reference does."""
    if len(proxy_ips) not in PROXY_IP_COUNTS:
        raise ValueError("assigned_ips carries exactly 4 or 8 proxy IPs")
    body = {"resource": resource, "domain": domain, "proxy_ips": [str(ip) for ip in proxy_ips]}
    return build(ASSIGNED_IPS_EVENT, json.dumps(body, separators=(",", ":")).encode())


def parse_assigned_ips(body: bytes) -> AssignedIps | None:
    """The body of an ``assigned_ips`` event, or None when it is not one (bad JSON, missing fields, not 4 or 8 valid
    addresses, over-long names)."""
    try:
        decoded = json.loads(body)
        resource, domain, raw_ips = decoded["resource"], decoded["domain"], decoded["proxy_ips"]
        if not isinstance(resource, str) or not isinstance(domain, str) or not isinstance(raw_ips, list):
            return None
        if len(raw_ips) not in PROXY_IP_COUNTS or not all(isinstance(ip, str) for ip in raw_ips):
            return None
        proxy_ips = tuple(ipaddress.ip_address(ip) for ip in raw_ips)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if not domain or len(domain) > MAX_DOMAIN_LENGTH or not resource or len(resource) > MAX_RESOURCE_ID_LENGTH:
        return None
    return AssignedIps(resource, domain, proxy_ips)


def domain_status(resource: str, domain: str, active: bool) -> bytes:
    body = {"resource": resource, "domain": domain, "status": "Active" if active else "Inactive"}
    return build(DOMAIN_STATUS_EVENT, json.dumps(body, separators=(",", ":")).encode())


def parse_domain_status(body: bytes) -> DomainStatus | None:
    """The body of a ``domain_status`` event; a status other than ``Active`` reads as inactive (forward compatible)."""
    try:
        decoded = json.loads(body)
        resource, domain, status = decoded["resource"], decoded["domain"], decoded["status"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(resource, str) or not isinstance(domain, str):
        return None
    return DomainStatus(resource, domain, status == "Active")
