"""STUN (RFC 8489) message codec, credentials and retransmission ladders, sans-IO.

One attribute table (:data:`ATTRIBUTES`) says, for every attribute type we understand, its name and how its value is
encoded; :func:`decode` validates every known attribute against it so the typed getters on :class:`StunMessage` never
fail on a message that decoded. MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT are not kept in
``StunMessage.attributes``: they are computed by :func:`encode` and checked on the received bytes by
:func:`check_integrity` and :func:`decode` (the integrity check must cover the bytes as received, padding included).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import ipaddress
import stringprep
import struct
import unicodedata
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from dataplane.base import Address

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
FINGERPRINT_XOR = 0x5354554E
HEADER_LENGTH = 20
TRANSACTION_ID_LENGTH = 12
ATTRIBUTE_HEADER_LENGTH = 4
HMAC_SHA1_LENGTH = 20
HMAC_SHA256_LENGTH = 32
MIN_HMAC_SHA256_LENGTH = 16
FINGERPRINT_ATTRIBUTE_LENGTH = 8  # 4-byte header + CRC
# RFC 8489 §14.3/§14.9/§14.10/§14.14: limits on the text attributes (bytes of UTF-8 is the conservative reading).
MAX_USERNAME_BYTES = 512
MAX_TEXT_BYTES = 763
COMPREHENSION_OPTIONAL_START = 0x8000

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
TRANSPORT_UDP = 17


class StunParseError(ValueError):
    """The bytes are not a well-formed STUN message (the only exception :func:`decode` raises)."""


class Method(enum.IntEnum):
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class MessageClass(enum.IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Attr(enum.IntEnum):
    """Attribute types (RFC 8489, RFC 8656, RFC 8445, RFC 5780, RFC 8016)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    ICMP = 0x8004
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


class ErrorCode(enum.IntEnum):
    """Error codes of RFC 8489 §14.8, RFC 8656 §18 and RFC 8445 §7.3.1.1 that this project reacts to."""

    TRY_ALTERNATE = 300
    BAD_REQUEST = 400
    UNAUTHENTICATED = 401
    FORBIDDEN = 403
    UNKNOWN_ATTRIBUTE = 420
    ALLOCATION_MISMATCH = 437
    STALE_NONCE = 438
    ADDRESS_FAMILY_NOT_SUPPORTED = 440
    WRONG_CREDENTIALS = 441
    UNSUPPORTED_TRANSPORT_PROTOCOL = 442
    PEER_ADDRESS_FAMILY_MISMATCH = 443
    ALLOCATION_QUOTA_REACHED = 486
    ROLE_CONFLICT = 487
    SERVER_ERROR = 500
    INSUFFICIENT_CAPACITY = 508


class AttrCodec(enum.Enum):
    """How an attribute's value is laid out on the wire."""

    ADDRESS = "address"
    XOR_ADDRESS = "xor-address"
    TEXT = "text"
    U32 = "u32"
    U64 = "u64"
    EMPTY = "empty"
    ERROR_CODE = "error-code"
    ATTRIBUTE_LIST = "attribute-list"
    CHANNEL_NUMBER = "channel-number"
    TRANSPORT = "transport"
    ADDRESS_FAMILY = "address-family"
    HMAC_SHA1 = "hmac-sha1"
    HMAC_SHA256 = "hmac-sha256"
    CRC32 = "crc32"
    BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class AttrSpec:
    name: str
    codec: AttrCodec
    max_length: int | None = None
    fixed_length: int | None = None


ATTRIBUTES: dict[int, AttrSpec] = {
    Attr.MAPPED_ADDRESS: AttrSpec("MAPPED-ADDRESS", AttrCodec.ADDRESS),
    Attr.USERNAME: AttrSpec("USERNAME", AttrCodec.TEXT, max_length=MAX_USERNAME_BYTES),
    Attr.MESSAGE_INTEGRITY: AttrSpec("MESSAGE-INTEGRITY", AttrCodec.HMAC_SHA1, fixed_length=HMAC_SHA1_LENGTH),
    Attr.ERROR_CODE: AttrSpec("ERROR-CODE", AttrCodec.ERROR_CODE, max_length=4 + MAX_TEXT_BYTES),
    Attr.UNKNOWN_ATTRIBUTES: AttrSpec("UNKNOWN-ATTRIBUTES", AttrCodec.ATTRIBUTE_LIST),
    Attr.CHANNEL_NUMBER: AttrSpec("CHANNEL-NUMBER", AttrCodec.CHANNEL_NUMBER, fixed_length=4),
    Attr.LIFETIME: AttrSpec("LIFETIME", AttrCodec.U32, fixed_length=4),
    Attr.XOR_PEER_ADDRESS: AttrSpec("XOR-PEER-ADDRESS", AttrCodec.XOR_ADDRESS),
    Attr.DATA: AttrSpec("DATA", AttrCodec.BYTES),
    Attr.REALM: AttrSpec("REALM", AttrCodec.TEXT, max_length=MAX_TEXT_BYTES),
    Attr.NONCE: AttrSpec("NONCE", AttrCodec.TEXT, max_length=MAX_TEXT_BYTES),
    Attr.XOR_RELAYED_ADDRESS: AttrSpec("XOR-RELAYED-ADDRESS", AttrCodec.XOR_ADDRESS),
    Attr.REQUESTED_ADDRESS_FAMILY: AttrSpec("REQUESTED-ADDRESS-FAMILY", AttrCodec.ADDRESS_FAMILY, fixed_length=4),
    Attr.EVEN_PORT: AttrSpec("EVEN-PORT", AttrCodec.BYTES, fixed_length=1),
    Attr.REQUESTED_TRANSPORT: AttrSpec("REQUESTED-TRANSPORT", AttrCodec.TRANSPORT, fixed_length=4),
    Attr.DONT_FRAGMENT: AttrSpec("DONT-FRAGMENT", AttrCodec.EMPTY, fixed_length=0),
    Attr.MESSAGE_INTEGRITY_SHA256: AttrSpec("MESSAGE-INTEGRITY-SHA256", AttrCodec.HMAC_SHA256, max_length=32),
    Attr.PASSWORD_ALGORITHM: AttrSpec("PASSWORD-ALGORITHM", AttrCodec.BYTES),
    Attr.USERHASH: AttrSpec("USERHASH", AttrCodec.BYTES, fixed_length=32),
    Attr.XOR_MAPPED_ADDRESS: AttrSpec("XOR-MAPPED-ADDRESS", AttrCodec.XOR_ADDRESS),
    Attr.RESERVATION_TOKEN: AttrSpec("RESERVATION-TOKEN", AttrCodec.BYTES, fixed_length=8),
    Attr.PRIORITY: AttrSpec("PRIORITY", AttrCodec.U32, fixed_length=4),
    Attr.USE_CANDIDATE: AttrSpec("USE-CANDIDATE", AttrCodec.EMPTY, fixed_length=0),
    Attr.ADDITIONAL_ADDRESS_FAMILY: AttrSpec("ADDITIONAL-ADDRESS-FAMILY", AttrCodec.ADDRESS_FAMILY, fixed_length=4),
    Attr.ADDRESS_ERROR_CODE: AttrSpec("ADDRESS-ERROR-CODE", AttrCodec.BYTES, max_length=4 + MAX_TEXT_BYTES),
    Attr.PASSWORD_ALGORITHMS: AttrSpec("PASSWORD-ALGORITHMS", AttrCodec.BYTES),
    Attr.ALTERNATE_DOMAIN: AttrSpec("ALTERNATE-DOMAIN", AttrCodec.BYTES),
    Attr.ICMP: AttrSpec("ICMP", AttrCodec.BYTES, fixed_length=8),
    Attr.SOFTWARE: AttrSpec("SOFTWARE", AttrCodec.TEXT, max_length=MAX_TEXT_BYTES),
    Attr.ALTERNATE_SERVER: AttrSpec("ALTERNATE-SERVER", AttrCodec.ADDRESS),
    Attr.FINGERPRINT: AttrSpec("FINGERPRINT", AttrCodec.CRC32, fixed_length=4),
    Attr.ICE_CONTROLLED: AttrSpec("ICE-CONTROLLED", AttrCodec.U64, fixed_length=8),
    Attr.ICE_CONTROLLING: AttrSpec("ICE-CONTROLLING", AttrCodec.U64, fixed_length=8),
    Attr.RESPONSE_ORIGIN: AttrSpec("RESPONSE-ORIGIN", AttrCodec.ADDRESS),
    Attr.OTHER_ADDRESS: AttrSpec("OTHER-ADDRESS", AttrCodec.ADDRESS),
}

_TRAILER_ATTRIBUTES = frozenset({Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT})
# Members used by the accessors every connectivity check and answer goes through: reading a member off an Enum class
# goes through the metaclass's __getattr__ hook (Python 3.11), several times the cost of a global.
_REQUEST = MessageClass.REQUEST
_INDICATION = MessageClass.INDICATION
_RESPONSE_CLASSES = (MessageClass.SUCCESS, MessageClass.ERROR)
_USERNAME = Attr.USERNAME
_PRIORITY = Attr.PRIORITY
_USE_CANDIDATE = Attr.USE_CANDIDATE
_ICE_CONTROLLING = Attr.ICE_CONTROLLING
_ICE_CONTROLLED = Attr.ICE_CONTROLLED


def attribute_name(attr: int) -> str:
    spec = ATTRIBUTES.get(attr)
    return spec.name if spec is not None else f"0x{attr:04x}"


def is_comprehension_required(attr: int) -> bool:
    return attr < COMPREHENSION_OPTIONAL_START


# --- message type -------------------------------------------------------------------------------------------------


def encode_message_type(method: int, message_class: int) -> int:
    """Interleaves the 12 method bits with the 2 class bits (RFC 8489 §5, figure 3)."""
    if not 0 <= method <= 0xFFF or not 0 <= message_class <= 3:
        raise ValueError(f"method 0x{method:x} / class {message_class} out of range")
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0x1) << 4)
        | ((message_class & 0x2) << 7)
    )


def decode_message_type(message_type: int) -> tuple[int, int]:
    method = (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    message_class = ((message_type & 0x0010) >> 4) | ((message_type & 0x0100) >> 7)
    return method, message_class


# --- value codecs -------------------------------------------------------------------------------------------------


def _family_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6


def encode_address(address: Address) -> bytes:
    ip = ipaddress.ip_address(address[0])
    return struct.pack("!BBH", 0, _family_of(ip), address[1]) + ip.packed


def decode_address(value: bytes) -> Address:
    family, port = _check_address_layout(value)
    ip = ipaddress.ip_address(value[4:]) if family == FAMILY_IPV4 else ipaddress.IPv6Address(value[4:])
    return (str(ip), port)


@functools.lru_cache(maxsize=4096)
def _packed_ip(text: str) -> bytes:
    """The address's 4 or 16 bytes (cached: every check and its answer carry the same few addresses)."""
    return ipaddress.ip_address(text).packed


@functools.lru_cache(maxsize=4096)
def _ip_text(packed: bytes) -> str:
    """The text form of 4 or 16 address bytes (cached, like :func:`_packed_ip`)."""
    return str(ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed))


def _xor(data: bytes, mask: bytes) -> bytes:
    """``data`` XOR the first ``len(data)`` bytes of ``mask``."""
    size = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask[:size], "big")).to_bytes(size, "big")


def encode_xor_address(address: Address, transaction_id: bytes) -> bytes:
    packed = _packed_ip(address[0])
    port = address[1] ^ (MAGIC_COOKIE >> 16)
    xored = _xor(packed, MAGIC_COOKIE_BYTES + transaction_id)
    return struct.pack("!BBH", 0, FAMILY_IPV4 if len(packed) == 4 else FAMILY_IPV6, port) + xored


def decode_xor_address(value: bytes, transaction_id: bytes) -> Address:
    family, xport = _check_address_layout(value)
    raw = _xor(bytes(value[4:]), MAGIC_COOKIE_BYTES + transaction_id)
    return (_ip_text(raw), xport ^ (MAGIC_COOKIE >> 16))


def _check_address_layout(value: bytes) -> tuple[int, int]:
    if len(value) < 4:
        raise StunParseError("address attribute too short")
    _, family, port = struct.unpack_from("!BBH", value)
    expected = {FAMILY_IPV4: 8, FAMILY_IPV6: 20}.get(family)
    if expected is None:
        raise StunParseError(f"unknown address family {family}")
    if len(value) != expected:
        raise StunParseError(f"address attribute of family {family} has length {len(value)}")
    return family, port


def encode_error_code(code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise ValueError(f"error code {code} outside 300..699")
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunParseError("ERROR-CODE too short")
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunParseError(f"ERROR-CODE class {error_class} number {number} invalid")
    try:
        reason = value[4:].decode()
    except UnicodeDecodeError as exc:
        raise StunParseError("ERROR-CODE reason is not UTF-8") from exc
    return error_class * 100 + number, reason


_CONTENT_CHECKED_CODECS = (
    AttrCodec.ADDRESS,
    AttrCodec.XOR_ADDRESS,
    AttrCodec.TEXT,
    AttrCodec.ERROR_CODE,
    AttrCodec.ATTRIBUTE_LIST,
    AttrCodec.ADDRESS_FAMILY,
    AttrCodec.HMAC_SHA256,
)
_CONTENT_CHECKED_TYPES = frozenset(
    int(attr) for attr, spec in ATTRIBUTES.items() if any(spec.codec is codec for codec in _CONTENT_CHECKED_CODECS)
)
"""Attribute types whose value :func:`_validate_value` looks into; for the others only the length counts."""


def _validate_value(spec: AttrSpec, value: bytes) -> None:
    if spec.fixed_length is not None and len(value) != spec.fixed_length:
        raise StunParseError(f"{spec.name} has length {len(value)}, expected {spec.fixed_length}")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise StunParseError(f"{spec.name} longer than {spec.max_length}")
    codec = spec.codec
    if codec is AttrCodec.ADDRESS or codec is AttrCodec.XOR_ADDRESS:
        _check_address_layout(value)
    elif codec is AttrCodec.TEXT:
        try:
            value.decode()
        except UnicodeDecodeError as exc:
            raise StunParseError(f"{spec.name} is not UTF-8") from exc
    elif codec is AttrCodec.ERROR_CODE:
        decode_error_code(value)
    elif codec is AttrCodec.ATTRIBUTE_LIST:
        if len(value) % 2:
            raise StunParseError("UNKNOWN-ATTRIBUTES has odd length")
    elif codec is AttrCodec.ADDRESS_FAMILY:
        if value[0] not in (FAMILY_IPV4, FAMILY_IPV6):
            raise StunParseError(f"{spec.name} names unknown family {value[0]}")
    elif codec is AttrCodec.HMAC_SHA256:
        if len(value) < MIN_HMAC_SHA256_LENGTH or len(value) % 4:
            raise StunParseError("MESSAGE-INTEGRITY-SHA256 length invalid")


# --- the message --------------------------------------------------------------------------------------------------


@dataclass
class StunMessage:
    """A STUN message: header fields plus raw attributes in wire order (without MI, MI-SHA256 and FINGERPRINT)."""

    method: int
    message_class: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    # Set by decode(), which validated every known attribute: the typed getters then skip validating again (an ICE
    # agent reads five of them from every check it answers). add() clears it.
    _validated: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.transaction_id) != TRANSACTION_ID_LENGTH:
            raise ValueError("a STUN transaction id has 12 bytes")

    # constructors

    @classmethod
    def request(cls, method: int, transaction_id: bytes) -> StunMessage:
        return cls(method, MessageClass.REQUEST, transaction_id)

    @classmethod
    def indication(cls, method: int, transaction_id: bytes) -> StunMessage:
        return cls(method, MessageClass.INDICATION, transaction_id)

    def success_response(self) -> StunMessage:
        """A success response to this request (same method and transaction id, no attributes yet)."""
        return StunMessage(self.method, MessageClass.SUCCESS, self.transaction_id)

    def error_response(self, code: int, reason: str = "") -> StunMessage:
        """An error response to this request carrying ERROR-CODE."""
        return StunMessage(self.method, MessageClass.ERROR, self.transaction_id).add_error_code(code, reason)

    @property
    def is_request(self) -> bool:
        return self.message_class == _REQUEST

    @property
    def is_indication(self) -> bool:
        return self.message_class == _INDICATION

    @property
    def is_response(self) -> bool:
        return self.message_class in _RESPONSE_CLASSES

    # raw access

    def add(self, attr: int, value: bytes) -> StunMessage:
        if not 0 <= attr <= 0xFFFF:
            raise ValueError(f"attribute type 0x{attr:x} out of range")
        if attr in _TRAILER_ATTRIBUTES:
            raise ValueError(f"{attribute_name(attr)} is added by encode(), not by hand")
        if len(value) > 0xFFFF:
            raise ValueError("attribute value longer than 65535 bytes")
        self.attributes.append((attr, bytes(value)))
        self._validated = False
        return self

    def get(self, attr: int) -> bytes | None:
        """The first value of ``attr`` (RFC 8489 §14: later duplicates are ignored)."""
        for kind, value in self.attributes:
            if kind == attr:
                return value
        return None

    def get_all(self, attr: int) -> list[bytes]:
        return [value for kind, value in self.attributes if kind == attr]

    def has(self, attr: int) -> bool:
        return any(kind == attr for kind, _ in self.attributes)

    # typed adders

    def add_address(self, attr: int, address: Address) -> StunMessage:
        return self.add(attr, encode_address(address))

    def add_xor_address(self, attr: int, address: Address) -> StunMessage:
        return self.add(attr, encode_xor_address(address, self.transaction_id))

    def add_text(self, attr: int, text: str) -> StunMessage:
        return self.add(attr, text.encode())

    def add_username(self, username: str) -> StunMessage:
        return self.add_text(_USERNAME, username)

    def add_realm(self, realm: str) -> StunMessage:
        return self.add_text(Attr.REALM, realm)

    def add_nonce(self, nonce: str) -> StunMessage:
        return self.add_text(Attr.NONCE, nonce)

    def add_software(self, software: str) -> StunMessage:
        return self.add_text(Attr.SOFTWARE, software)

    def add_u32(self, attr: int, value: int) -> StunMessage:
        return self.add(attr, struct.pack("!I", value))

    def add_u64(self, attr: int, value: int) -> StunMessage:
        return self.add(attr, struct.pack("!Q", value))

    def add_priority(self, priority: int) -> StunMessage:
        return self.add_u32(_PRIORITY, priority)

    def add_use_candidate(self) -> StunMessage:
        return self.add(_USE_CANDIDATE, b"")

    def add_ice_controlling(self, tie_breaker: int) -> StunMessage:
        return self.add_u64(_ICE_CONTROLLING, tie_breaker)

    def add_ice_controlled(self, tie_breaker: int) -> StunMessage:
        return self.add_u64(_ICE_CONTROLLED, tie_breaker)

    def add_error_code(self, code: int, reason: str = "") -> StunMessage:
        return self.add(Attr.ERROR_CODE, encode_error_code(code, reason))

    def add_unknown_attributes(self, attrs: Collection[int]) -> StunMessage:
        return self.add(Attr.UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", a) for a in attrs))

    def add_lifetime(self, seconds: int) -> StunMessage:
        return self.add_u32(Attr.LIFETIME, seconds)

    def add_requested_transport(self, protocol: int = TRANSPORT_UDP) -> StunMessage:
        return self.add(Attr.REQUESTED_TRANSPORT, bytes((protocol, 0, 0, 0)))

    def add_additional_address_family(self, family: int = FAMILY_IPV6) -> StunMessage:
        return self.add(Attr.ADDITIONAL_ADDRESS_FAMILY, bytes((family, 0, 0, 0)))

    def add_requested_address_family(self, family: int) -> StunMessage:
        return self.add(Attr.REQUESTED_ADDRESS_FAMILY, bytes((family, 0, 0, 0)))

    def add_channel_number(self, number: int) -> StunMessage:
        return self.add(Attr.CHANNEL_NUMBER, struct.pack("!HH", number, 0))

    def add_data(self, data: bytes) -> StunMessage:
        return self.add(Attr.DATA, data)

    def add_dont_fragment(self) -> StunMessage:
        return self.add(Attr.DONT_FRAGMENT, b"")

    # typed getters (values were validated by decode(); hand-built messages are validated here too)

    def _checked(self, attr: int) -> bytes | None:
        value = self.get(attr)
        if value is not None and not self._validated and attr in ATTRIBUTES:
            _validate_value(ATTRIBUTES[attr], value)
        return value

    def address(self, attr: int) -> Address | None:
        value = self._checked(attr)
        return None if value is None else decode_address(value)

    def xor_address(self, attr: int) -> Address | None:
        value = self._checked(attr)
        return None if value is None else decode_xor_address(value, self.transaction_id)

    def xor_addresses(self, attr: int) -> list[Address]:
        """Every value of ``attr``: an ALLOCATE success carries one XOR-RELAYED-ADDRESS per granted family."""
        out = []
        for value in self.get_all(attr):
            _check_address_layout(value)
            out.append(decode_xor_address(value, self.transaction_id))
        return out

    def text(self, attr: int) -> str | None:
        value = self._checked(attr)
        return None if value is None else value.decode()

    def username(self) -> str | None:
        return self.text(_USERNAME)

    def realm(self) -> str | None:
        return self.text(Attr.REALM)

    def nonce(self) -> str | None:
        return self.text(Attr.NONCE)

    def software(self) -> str | None:
        return self.text(Attr.SOFTWARE)

    def u32(self, attr: int) -> int | None:
        value = self._checked(attr)
        return None if value is None or len(value) != 4 else int(struct.unpack("!I", value)[0])

    def u64(self, attr: int) -> int | None:
        value = self._checked(attr)
        return None if value is None or len(value) != 8 else int(struct.unpack("!Q", value)[0])

    def priority(self) -> int | None:
        return self.u32(_PRIORITY)

    def use_candidate(self) -> bool:
        return self.has(_USE_CANDIDATE)

    def ice_controlling(self) -> int | None:
        return self.u64(_ICE_CONTROLLING)

    def ice_controlled(self) -> int | None:
        return self.u64(_ICE_CONTROLLED)

    def error_code(self) -> tuple[int, str] | None:
        value = self.get(Attr.ERROR_CODE)
        return None if value is None else decode_error_code(value)

    def unknown_attributes(self) -> list[int] | None:
        value = self._checked(Attr.UNKNOWN_ATTRIBUTES)
        if value is None:
            return None
        return [int(v) for (v,) in struct.iter_unpack("!H", value)]

    def lifetime(self) -> int | None:
        return self.u32(Attr.LIFETIME)

    def requested_transport(self) -> int | None:
        value = self._checked(Attr.REQUESTED_TRANSPORT)
        return None if value is None else value[0]

    def additional_address_family(self) -> int | None:
        value = self._checked(Attr.ADDITIONAL_ADDRESS_FAMILY)
        return None if value is None else value[0]

    def requested_address_family(self) -> int | None:
        value = self._checked(Attr.REQUESTED_ADDRESS_FAMILY)
        return None if value is None else value[0]

    def channel_number(self) -> int | None:
        value = self._checked(Attr.CHANNEL_NUMBER)
        return None if value is None else int.from_bytes(value[:2], "big")

    def data(self) -> bytes | None:
        return self.get(Attr.DATA)

    def unknown_comprehension_required(self, understood: Collection[int] | None = None) -> list[int]:
        """Comprehension-required attribute types not in ``understood`` (default: the attribute table)."""
        known = ATTRIBUTES if understood is None else understood
        unknown: list[int] = []
        for attr, _ in self.attributes:
            if is_comprehension_required(attr) and attr not in known and attr not in unknown:
                unknown.append(attr)
        return unknown


# --- wire codec ---------------------------------------------------------------------------------------------------


def _iter_attributes(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Yields (type, value offset, value length) over a message whose header was already checked."""
    offset = HEADER_LENGTH
    end = len(data)
    while offset < end:
        if end - offset < ATTRIBUTE_HEADER_LENGTH:
            raise StunParseError("truncated attribute header")
        attr, length = struct.unpack_from("!HH", data, offset)
        value_offset = offset + ATTRIBUTE_HEADER_LENGTH
        padded = (length + 3) & ~3
        if value_offset + padded > end:
            raise StunParseError(f"attribute {attribute_name(attr)} overruns the message")
        yield attr, value_offset, length
        offset = value_offset + padded


def _check_header(data: bytes) -> None:
    if len(data) < HEADER_LENGTH:
        raise StunParseError("shorter than a STUN header")
    message_type, length, cookie = struct.unpack_from("!HHI", data)
    if message_type & 0xC000:
        raise StunParseError("top two bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunParseError("wrong magic cookie")
    if length % 4:
        raise StunParseError("length is not a multiple of 4")
    if HEADER_LENGTH + length != len(data):
        raise StunParseError(f"length field {length} does not match {len(data) - HEADER_LENGTH} bytes of attributes")


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing check (portal-protocol §4.4): header shape, cookie and length only."""
    return (
        len(data) >= HEADER_LENGTH
        and data[0] & 0xC0 == 0
        and data[4:8] == MAGIC_COOKIE_BYTES
        and (len(data) - HEADER_LENGTH) % 4 == 0
        and int.from_bytes(data[2:4], "big") == len(data) - HEADER_LENGTH
    )


def _fingerprint(*parts: bytes | bytearray) -> int:
    """FINGERPRINT's value (RFC 8489 §14.7) over the concatenated ``parts``."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return (crc ^ FINGERPRINT_XOR) & 0xFFFFFFFF


_ATTRIBUTE_HEADER = struct.Struct("!HH")
_FINGERPRINT_TYPE = int(Attr.FINGERPRINT)
_MI_TYPE = int(Attr.MESSAGE_INTEGRITY)
_MI_SHA256_TYPE = int(Attr.MESSAGE_INTEGRITY_SHA256)
_INTEGRITY_TYPES = (_MI_TYPE, _MI_SHA256_TYPE)
_SPECS_BY_TYPE: dict[int, AttrSpec] = {int(attr): spec for attr, spec in ATTRIBUTES.items()}


def decode(data: bytes) -> StunMessage:
    """Parses and validates one STUN message; raises only :class:`StunParseError`.

    A FINGERPRINT, when present, must be last and correct. Attributes after MESSAGE-INTEGRITY other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored (RFC 8489 §14.5). Integrity is checked separately with
    :func:`check_integrity` because only the caller knows the key.
    """
    data = bytes(data)
    _check_header(data)
    method, message_class = decode_message_type((data[0] << 8) | data[1])
    transaction_id = data[8:HEADER_LENGTH]
    attributes: list[tuple[int, bytes]] = []
    after_integrity = False
    seen_fingerprint = False
    # The attribute walk of _iter_attributes, inlined: every connectivity check and answer comes through here.
    unpack_header = _ATTRIBUTE_HEADER.unpack_from
    specs = _SPECS_BY_TYPE
    offset = HEADER_LENGTH
    end = len(data)
    while offset < end:
        if end - offset < ATTRIBUTE_HEADER_LENGTH:
            raise StunParseError("truncated attribute header")
        attr, length = unpack_header(data, offset)
        value_offset = offset + ATTRIBUTE_HEADER_LENGTH
        offset = value_offset + ((length + 3) & ~3)
        if offset > end:
            raise StunParseError(f"attribute {attribute_name(attr)} overruns the message")
        if seen_fingerprint:
            raise StunParseError("FINGERPRINT is not the last attribute")
        value = data[value_offset : value_offset + length]
        spec = specs.get(attr)
        if spec is not None:
            if attr in _CONTENT_CHECKED_TYPES:
                _validate_value(spec, value)
            elif (spec.fixed_length is not None and length != spec.fixed_length) or (
                spec.max_length is not None and length > spec.max_length
            ):
                _validate_value(spec, value)  # raises, with the reason
        if attr == _FINGERPRINT_TYPE:
            fingerprint_offset = value_offset - ATTRIBUTE_HEADER_LENGTH
            if int.from_bytes(value, "big") != _fingerprint(data[:fingerprint_offset]):
                raise StunParseError("FINGERPRINT mismatch")
            seen_fingerprint = True
        elif attr in _INTEGRITY_TYPES:
            after_integrity = True
        elif not after_integrity:
            attributes.append((attr, value))
    message = StunMessage(method, message_class, transaction_id, attributes)
    message._validated = True
    return message


def has_fingerprint(data: bytes) -> bool:
    """True when ``data`` ends with a FINGERPRINT attribute that matches (never raises)."""
    if len(data) < HEADER_LENGTH + FINGERPRINT_ATTRIBUTE_LENGTH or not is_stun(data):
        return False
    offset = len(data) - FINGERPRINT_ATTRIBUTE_LENGTH
    attr, length = struct.unpack_from("!HH", data, offset)
    if attr != Attr.FINGERPRINT or length != 4:
        return False
    return int.from_bytes(data[offset + 4 :], "big") == _fingerprint(data[:offset])


_MESSAGE_HEADER = struct.Struct("!HHI")
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")  # by value length % 4
_MI_SHA1_HEADER = _ATTRIBUTE_HEADER.pack(_MI_TYPE, HMAC_SHA1_LENGTH)
_MI_SHA256_HEADER = _ATTRIBUTE_HEADER.pack(_MI_SHA256_TYPE, HMAC_SHA256_LENGTH)
_FINGERPRINT_HEADER = _ATTRIBUTE_HEADER.pack(_FINGERPRINT_TYPE, 4)


def encode(
    msg: StunMessage,
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
    integrity_sha256: bool = False,
) -> bytes:
    """Serialises ``msg`` with zero padding; appends MESSAGE-INTEGRITY (and -SHA256) when a key is given, then FINGERPRINT."""
    body = bytearray()
    pack_attribute_header = _ATTRIBUTE_HEADER.pack
    for attr, value in msg.attributes:
        length = len(value)
        body += pack_attribute_header(attr, length)
        body += value
        if length % 4:
            body += _PADDING[length % 4]
    header_type = encode_message_type(msg.method, msg.message_class)
    transaction_id = msg.transaction_id

    def header(length: int) -> bytes:
        # Checked for every header built, so a trailer (MI, MI-SHA256, FINGERPRINT) that pushes the length past the
        # 16-bit field fails the same way as an over-long body.
        if length > 0xFFFF:
            raise ValueError("message too long")
        return _MESSAGE_HEADER.pack(header_type, length, MAGIC_COOKIE) + transaction_id

    if integrity_key is not None:
        mac = hmac.digest(integrity_key, header(len(body) + 4 + HMAC_SHA1_LENGTH) + body, "sha1")
        body += _MI_SHA1_HEADER
        body += mac
        if integrity_sha256:
            mac = hmac.digest(integrity_key, header(len(body) + 4 + HMAC_SHA256_LENGTH) + body, "sha256")
            body += _MI_SHA256_HEADER
            body += mac
    elif integrity_sha256:
        raise ValueError("integrity_sha256 needs an integrity_key")
    if fingerprint:
        prefix = header(len(body) + FINGERPRINT_ATTRIBUTE_LENGTH)
        crc = _fingerprint(prefix, body)
        body += _FINGERPRINT_HEADER
        body += crc.to_bytes(4, "big")
        return prefix + body
    return header(len(body)) + bytes(body)


def check_integrity(data: bytes, key: bytes) -> bool:
    """Verifies MESSAGE-INTEGRITY and, when present, MESSAGE-INTEGRITY-SHA256 over the bytes as received.

    Constant-time comparison; False when neither attribute is present or the message is malformed (never raises).
    """
    try:
        _check_header(data)
    except StunParseError:
        return False
    # The attribute walk of _iter_attributes, inlined (every check and answer is verified).
    unpack_header = _ATTRIBUTE_HEADER.unpack_from
    found = False
    offset = HEADER_LENGTH
    end = len(data)
    while offset < end:
        if end - offset < ATTRIBUTE_HEADER_LENGTH:
            return False
        attr, length = unpack_header(data, offset)
        value_offset = offset + ATTRIBUTE_HEADER_LENGTH
        attr_offset = offset
        offset = value_offset + ((length + 3) & ~3)
        if offset > end:
            return False
        if attr == _MI_TYPE and not found:
            if length != HMAC_SHA1_LENGTH:
                return False
            digest = "sha1"
        elif attr == _MI_SHA256_TYPE:
            if length > HMAC_SHA256_LENGTH or length < MIN_HMAC_SHA256_LENGTH or length % 4:
                return False
            digest = "sha256"
        else:
            continue  # before MI: covered by it; after MI: ignored (RFC 8489 §14.5)
        # The MAC covers the message up to this attribute, with the header's length as if it ended after it.
        signed_length = (attr_offset + ATTRIBUTE_HEADER_LENGTH + length - HEADER_LENGTH).to_bytes(2, "big")
        mac = hmac.digest(key, data[:2] + signed_length + data[4:attr_offset], digest)[:length]
        if not hmac.compare_digest(mac, data[value_offset : value_offset + length]):
            return False
        found = True
    return found


def has_integrity(data: bytes) -> bool:
    """True when the message carries MESSAGE-INTEGRITY or -SHA256 (never raises)."""
    try:
        _check_header(data)
        return any(
            attr in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256) for attr, _, _ in _iter_attributes(data)
        )
    except StunParseError:
        return False


# --- credentials --------------------------------------------------------------------------------------------------


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep as RFC 5389 §15.4 asks for long-term passwords (identity for printable ASCII)."""
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch))
    normalized = unicodedata.normalize("NFKC", mapped)
    for ch in normalized:
        if (
            stringprep.in_table_c12(ch)
            or stringprep.in_table_c21_c22(ch)
            or stringprep.in_table_c3(ch)
            or stringprep.in_table_c4(ch)
            or stringprep.in_table_c5(ch)
            or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch)
            or stringprep.in_table_c8(ch)
            or stringprep.in_table_c9(ch)
        ):
            raise ValueError(f"SASLprep prohibits U+{ord(ch):04X}")
    return normalized


def short_term_key(password: str) -> bytes:
    """Short-term credential key: OpaqueString(password) (RFC 8489 §9.1.1), i.e. NFC-normalised UTF-8."""
    return unicodedata.normalize("NFC", password).encode()


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """Long-term credential key MD5(username ":" realm ":" SASLprep(password)) (RFC 8489 §9.2.2)."""
    material = f"{username}:{realm}:{saslprep(password)}".encode()
    return hashlib.md5(material, usedforsecurity=False).digest()


# --- request validation -------------------------------------------------------------------------------------------


def unknown_attribute_response(request: StunMessage, understood: Collection[int] | None = None) -> StunMessage | None:
    """The 420 response a request with unknown comprehension-required attributes must get, or None if it has none."""
    if not request.is_request:
        return None
    unknown = request.unknown_comprehension_required(understood)
    if not unknown:
        return None
    return request.error_response(ErrorCode.UNKNOWN_ATTRIBUTE, "Unknown Attribute").add_unknown_attributes(unknown)


# --- transactions as deadline ladders -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetransmitPolicy:
    """When to retransmit a request and when to give up.

    The wait after transmission ``k`` (0-based) is ``min(initial_rto * backoff**k, max_rto)``. The transaction gives
    up after ``max_transmissions`` sends plus the wait after the last one (``last_wait`` when given, like RFC 8489's
    Rm * RTO), or once ``max_elapsed`` seconds have passed since the first send, whichever comes first.
    """

    initial_rto: float
    max_rto: float = float("inf")
    backoff: float = 2.0
    max_transmissions: int | None = None
    max_elapsed: float | None = None
    last_wait: float | None = None

    def __post_init__(self) -> None:
        if self.initial_rto <= 0 or self.max_rto <= 0 or self.backoff < 1:
            raise ValueError("RTOs must be positive and backoff at least 1")
        if self.max_transmissions is None and self.max_elapsed is None:
            raise ValueError("a retransmit policy needs max_transmissions or max_elapsed")
        if self.max_transmissions is not None and self.max_transmissions < 1:
            raise ValueError("max_transmissions must be at least 1")

    def wait_after(self, transmission: int) -> float:
        """Seconds to wait after transmission number ``transmission`` (0-based) before the next step."""
        if self.last_wait is not None and self.max_transmissions is not None:
            if transmission >= self.max_transmissions - 1:
                return self.last_wait
        return float(min(self.initial_rto * self.backoff**transmission, self.max_rto))

    def schedule(self) -> tuple[list[float], float]:
        """(offsets of every transmission from the first, offset of the give-up) — for tests and logs."""
        sends = [0.0]
        elapsed = 0.0
        while True:
            step = self.wait_after(len(sends) - 1)
            deadline = elapsed + step
            if self.max_elapsed is not None and deadline >= self.max_elapsed:
                return sends, self.max_elapsed
            if self.max_transmissions is not None and len(sends) >= self.max_transmissions:
                return sends, deadline
            elapsed = deadline
            sends.append(elapsed)


# RFC 8489 §6.2.1 defaults: RTO 500 ms, Rc = 7 transmissions, last wait Rm * RTO = 16 * RTO (39.5 s in all).
RFC8489_POLICY = RetransmitPolicy(initial_rto=0.5, max_transmissions=7, last_wait=8.0)
# Firezone snownet allocation requests: 1 s request timeout, give up 8 s after the first send.
TURN_POLICY = RetransmitPolicy(initial_rto=1.0, max_elapsed=8.0)


class TransactionStep(enum.Enum):
    WAIT = "wait"
    RETRANSMIT = "retransmit"
    GAVE_UP = "gave-up"


_WAIT = TransactionStep.WAIT  # returned on most calls; an Enum class attribute costs a metaclass hook


class Transaction:
    """The timing of one client transaction: a ladder of retransmit deadlines ending in give-up.

    The caller sends ``payload`` once when it creates the transaction, calls :meth:`handle_timeout` when
    :meth:`poll_timeout` is due and resends ``payload`` when told ``RETRANSMIT``; a matching response ends it via
    :meth:`complete`, which also yields the round-trip time measured from the latest transmission.
    """

    __slots__ = (
        "transaction_id",
        "payload",
        "destination",
        "policy",
        "started_at",
        "last_sent_at",
        "transmissions",
        "_deadline",
        "finished",
        "gave_up",
    )

    def __init__(
        self, transaction_id: bytes, payload: bytes, destination: Address, policy: RetransmitPolicy, now: float
    ) -> None:
        self.transaction_id = transaction_id
        self.payload = payload
        self.destination = destination
        self.policy = policy
        self.started_at = now
        self.last_sent_at = now
        self.transmissions = 1
        self.finished = False
        self.gave_up = False
        self._deadline: float | None = self._next_deadline()

    def _next_deadline(self) -> float:
        deadline = self.last_sent_at + self.policy.wait_after(self.transmissions - 1)
        if self.policy.max_elapsed is not None:
            deadline = min(deadline, self.started_at + self.policy.max_elapsed)
        return deadline

    def poll_timeout(self) -> float | None:
        return None if self.finished else self._deadline

    def handle_timeout(self, now: float) -> TransactionStep:
        if self.finished or self._deadline is None or now < self._deadline:
            return _WAIT
        elapsed_out = self.policy.max_elapsed is not None and now >= self.started_at + self.policy.max_elapsed
        sent_out = self.policy.max_transmissions is not None and self.transmissions >= self.policy.max_transmissions
        if elapsed_out or sent_out:
            self.finished = True
            self.gave_up = True
            self._deadline = None
            return TransactionStep.GAVE_UP
        self.transmissions += 1
        self.last_sent_at = now
        self._deadline = self._next_deadline()
        return TransactionStep.RETRANSMIT

    def complete(self, now: float) -> float:
        """Ends the transaction on a response; returns the RTT since the latest transmission."""
        self.finished = True
        self._deadline = None
        return now - self.last_sent_at
