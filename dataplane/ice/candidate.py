"""ICE candidates as values: SDP ``candidate:`` strings both ways, RFC 8445 priorities and foundations.

Firezone exchanges candidates through the portal as bare SDP attribute values
(``candidate:<foundation> 1 udp <priority> <ip> <port> typ <type> [raddr <ip> rport <port>]``, docs/protocol.md §4.3).
Only UDP, component 1 is used, but the parser accepts any component number so that a peer's choice survives a round trip.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from dataclasses import dataclass

from dataplane.base import Address


class CandidateParseError(ValueError):
    """A candidate string that is not a well-formed UDP ICE candidate."""


class CandidateKind(enum.Enum):
    HOST = "host"
    SERVER_REFLEXIVE = "srflx"
    PEER_REFLEXIVE = "prflx"
    RELAYED = "relay"


# RFC 8445 §5.1.2.2 recommended type preferences.
TYPE_PREFERENCE: dict[CandidateKind, int] = {
    CandidateKind.HOST: 126,
    CandidateKind.PEER_REFLEXIVE: 110,
    CandidateKind.SERVER_REFLEXIVE: 100,
    CandidateKind.RELAYED: 0,
}

MAX_LOCAL_PREFERENCE = 65535
COMPONENT_RTP = 1
TRANSPORT_UDP = "udp"
_MAX_FOUNDATION_LENGTH = 32
_ICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")


def compute_priority(kind: CandidateKind, local_preference: int = MAX_LOCAL_PREFERENCE, component: int = 1) -> int:
    """RFC 8445 §5.1.2.1: ``2^24 * type preference + 2^8 * local preference + (256 - component)``."""
    if not 0 <= local_preference <= MAX_LOCAL_PREFERENCE:
        raise ValueError(f"local preference {local_preference} outside 0..65535")
    if not 1 <= component <= 256:
        raise ValueError(f"component {component} outside 1..256")
    return (TYPE_PREFERENCE[kind] << 24) + (local_preference << 8) + (256 - component)


def default_local_preference(ip: str) -> int:
    """IPv6 above IPv4 (RFC 8421 spirit): 65535 for IPv6, 65534 for IPv4.

    This is what makes the spec's srflx example carry priority 1694498559 (= 100<<24 | 65534<<8 | 255).
    """
    return MAX_LOCAL_PREFERENCE if ":" in ip else MAX_LOCAL_PREFERENCE - 1


def compute_foundation(
    kind: CandidateKind, base_ip: str, server_ip: str | None = None, transport: str = TRANSPORT_UDP
) -> str:
    """RFC 8445 §5.1.1.3: equal for candidates sharing type, base IP, STUN/TURN server IP and transport.

    Rendered as a decimal 64-bit number, the shape Firezone's candidates carry.
    """
    material = "|".join((kind.value, _normalize_ip(base_ip), server_ip or "", transport.lower()))
    return str(int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big"))


def _is_canonical_ipv4(text: str) -> bool:
    """Dotted-quad IPv4 exactly as ``str(ipaddress.ip_address(text))`` renders it (ASCII digits, no leading zeros)."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        0 < len(part) <= 3 and part.isascii() and part.isdigit() and (part[0] != "0" or part == "0") and int(part) < 256
        for part in parts
    )


def _normalize_ip(text: str) -> str:
    if _is_canonical_ipv4(text):
        return text  # what the parse below would return, at a fraction of its cost (every candidate has one or two)
    try:
        normalized = str(ipaddress.ip_address(text))
    except ValueError:
        raise CandidateParseError(f"not an IP address: {text!r}") from None
    if "%" in normalized:
        raise CandidateParseError("scoped IPv6 addresses are not usable candidates")
    return normalized


def _parse_port(text: str, *, allow_zero: bool) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise CandidateParseError(f"not a port: {text!r}")
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        raise CandidateParseError(f"port out of range: {text!r}")
    return port


def _parse_uint(text: str, what: str, maximum: int) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise CandidateParseError(f"{what} is not a number: {text!r}")
    value = int(text)
    if value > maximum:
        raise CandidateParseError(f"{what} out of range: {text!r}")
    return value


def is_ipv4(address: Address) -> bool:
    return ":" not in address[0]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ICE candidate. ``address`` holds a normalized IP string (IPv6 compressed, no brackets or scope)."""

    foundation: str
    component: int
    transport: str
    priority: int
    address: Address
    kind: CandidateKind
    related: Address | None = None

    # ---- constructors ------------------------------------------------------------------------------------------

    @classmethod
    def host(cls, address: Address, *, local_preference: int | None = None) -> Candidate:
        ip = _normalize_ip(address[0])
        if local_preference is None:
            local_preference = default_local_preference(ip)
        return cls(
            foundation=compute_foundation(CandidateKind.HOST, ip),
            component=COMPONENT_RTP,
            transport=TRANSPORT_UDP,
            priority=compute_priority(CandidateKind.HOST, local_preference),
            address=(ip, address[1]),
            kind=CandidateKind.HOST,
        )

    @classmethod
    def server_reflexive(
        cls,
        address: Address,
        base: Address,
        *,
        server_ip: str | None = None,
        local_preference: int | None = None,
    ) -> Candidate:
        return cls._derived(CandidateKind.SERVER_REFLEXIVE, address, base, server_ip, local_preference)

    @classmethod
    def peer_reflexive(cls, address: Address, base: Address, *, priority: int | None = None) -> Candidate:
        candidate = cls._derived(CandidateKind.PEER_REFLEXIVE, address, base, None, None)
        if priority is None:
            return candidate
        return cls(
            candidate.foundation,
            candidate.component,
            candidate.transport,
            priority,
            candidate.address,
            candidate.kind,
            candidate.related,
        )

    @classmethod
    def relayed(
        cls,
        address: Address,
        base: Address,
        *,
        server_ip: str | None = None,
        local_preference: int | None = None,
    ) -> Candidate:
        """A relay candidate. ``base`` is the local socket address the allocation lives on (SDP ``raddr``)."""
        return cls._derived(CandidateKind.RELAYED, address, base, server_ip, local_preference)

    @classmethod
    def _derived(
        cls, kind: CandidateKind, address: Address, base: Address, server_ip: str | None, local_preference: int | None
    ) -> Candidate:
        ip = _normalize_ip(address[0])
        if local_preference is None:
            local_preference = default_local_preference(ip)
        base_ip = _normalize_ip(base[0])
        return cls(
            foundation=compute_foundation(kind, base_ip, server_ip),
            component=COMPONENT_RTP,
            transport=TRANSPORT_UDP,
            priority=compute_priority(kind, local_preference),
            address=(ip, address[1]),
            kind=kind,
            related=(base_ip, base[1]),
        )

    # ---- SDP ----------------------------------------------------------------------------------------------------

    def to_sdp(self) -> str:
        ip, port = self.address
        text = f"candidate:{self.foundation} {self.component} {self.transport} {self.priority} {ip} {port} typ {self.kind.value}"
        if self.related is not None:
            text += f" raddr {self.related[0]} rport {self.related[1]}"
        return text

    @classmethod
    def from_sdp(cls, text: str) -> Candidate:
        """Parse ``[a=]candidate:...``; unknown trailing ``key value`` pairs (``generation 0``, ...) are ignored."""
        if not isinstance(text, str):
            raise CandidateParseError("candidate must be a string")
        stripped = text.strip()
        if stripped.startswith("a="):
            stripped = stripped[2:]
        if not stripped.startswith("candidate:"):
            raise CandidateParseError("missing 'candidate:' prefix")
        fields = stripped[len("candidate:") :].split()
        if len(fields) < 8:
            raise CandidateParseError(f"expected at least 8 fields, got {len(fields)}")
        foundation, component_text, transport, priority_text, ip_text, port_text, typ, kind_text = fields[:8]
        if not 1 <= len(foundation) <= _MAX_FOUNDATION_LENGTH or not set(foundation) <= _ICE_CHARS:
            raise CandidateParseError(f"bad foundation: {foundation!r}")
        component = _parse_uint(component_text, "component", 256)
        if component < 1:
            raise CandidateParseError("component must be >= 1")
        if transport.lower() != TRANSPORT_UDP:
            raise CandidateParseError(f"unsupported transport: {transport!r}")
        priority = _parse_uint(priority_text, "priority", 0xFFFFFFFF)
        ip = _normalize_ip(ip_text)
        port = _parse_port(port_text, allow_zero=False)
        if typ != "typ":
            raise CandidateParseError(f"expected 'typ', got {typ!r}")
        try:
            kind = CandidateKind(kind_text.lower())
        except ValueError:
            raise CandidateParseError(f"unknown candidate type: {kind_text!r}") from None

        related_ip: str | None = None
        related_port: int | None = None
        extras = fields[8:]
        for index in range(0, len(extras) - 1, 2):
            key, value = extras[index], extras[index + 1]
            if key == "raddr":
                related_ip = _normalize_ip(value)
            elif key == "rport":
                related_port = _parse_port(value, allow_zero=True)
        if len(extras) % 2 == 1 and extras[-1] in ("raddr", "rport"):
            raise CandidateParseError(f"{extras[-1]} without a value")
        if (related_ip is None) != (related_port is None):
            raise CandidateParseError("raddr and rport must come together")
        related = (related_ip, related_port) if related_ip is not None and related_port is not None else None
        return cls(foundation, component, TRANSPORT_UDP, priority, (ip, port), kind, related)

    def __str__(self) -> str:
        return self.to_sdp()
