"""Typed payloads of every event on the gateway channel, both directions (docs/protocol.md §2).

Inbound: :func:`parse_portal_message` turns ``(event, payload)`` into one of the models below, or into a
:class:`DropReason` (counted and logged) — it never raises. Unknown fields are ignored everywhere, as the portal adds
fields freely. Outbound: each model has ``EVENT`` and :meth:`OutboundMessage.to_payload`.

Everything a model accepts is usable as is: unix times are clamped to what ``datetime`` can hold, ports fit in 16 bits,
and every list has a bound (generous next to what the real portal sends: an ``init`` carrying 10,000 authorizations
is 1.4 MB). Candidate lists skip the entries that are not SDP ``candidate:`` lines instead of failing the message,
and a malformed ``init.flow_logs`` is ignored rather than costing the whole ``init``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import logging
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from dataplane.base import Address, DropCounter

logger = logging.getLogger(__name__)


class DropReason(enum.Enum):
    UNKNOWN_EVENT = "unknown_event"
    LEGACY_EVENT = "legacy_event"
    INVALID_PAYLOAD = "invalid_payload"
    # One entry of a candidate list that is not an SDP candidate line; the rest of the message is kept.
    INVALID_CANDIDATE = "invalid_candidate"


# 9999-12-31T23:59:59Z, the last second datetime can represent. Later expiries (Firezone takes any u64) mean "never"
# just as well, and clamping keeps every accepted value convertible to float and datetime.
MAX_UNIX_TIME = 253_402_300_799
MAX_RELAYS = 256
MAX_RELAY_IDS = 1024
MAX_AUTHORIZATIONS = 50_000
MAX_FILTERS = 1024
MAX_CANDIDATES = 256
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


def _clamp_unix_time(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_UNIX_TIME:
        return MAX_UNIX_TIME
    return value


UnixTime = Annotated[int, BeforeValidator(_clamp_unix_time), Field(ge=0, le=MAX_UNIX_TIME)]
Port = Annotated[int, Field(ge=0, le=65535)]


def candidate_priority(line: str) -> int | None:
    """The priority (4th field) of an SDP ``candidate:`` line, or None when it is not one (Firezone's test)."""
    if not line.startswith("candidate:"):
        return None
    fields = line.split()
    if len(fields) < 4:
        return None
    text = fields[3].removeprefix("+")
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    priority = int(text)
    return priority if priority <= U32_MAX else None


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _parse_host_port(value: str) -> Address:
    """``"1.2.3.4:3478"`` or ``"[2001:db8::1]:3478"`` → (ip, port); raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"not host:port: {value!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        ip = ipaddress.IPv6Address(host[1:-1])
    else:
        ip4 = ipaddress.IPv4Address(host)
        return (str(ip4), port)
    return (str(ip), port)


def _check_wg_key(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not standard base64") from exc
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes")
    return value


# --- shared pieces ---------------------------------------------------------------------------------------------------


class Interface(_Model):
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address


class _RelayAddress(_Model):
    """What both relay kinds share: an id and a validated ``host:port`` address."""

    id: str
    addr: str

    @field_validator("addr")
    @classmethod
    def _addr_is_host_port(cls, value: str) -> str:
        _parse_host_port(value)
        return value

    @property
    def address(self) -> Address:
        return _parse_host_port(self.addr)


class TurnRelay(_RelayAddress):
    type: Literal["turn"]
    username: str
    password: str
    expires_at: UnixTime


class StunRelay(_RelayAddress):
    type: Literal["stun"]


Relay = Annotated[TurnRelay | StunRelay, Field(discriminator="type")]


class PortFilter(_Model):
    protocol: Literal["tcp", "udp"]
    port_range_start: Port = 0
    port_range_end: Port = 65535


class IcmpFilter(_Model):
    protocol: Literal["icmp"]


Filter = Annotated[PortFilter | IcmpFilter, Field(discriminator="protocol")]


class CidrResource(_Model):
    id: str
    type: Literal["cidr"]
    address: ipaddress.IPv4Network | ipaddress.IPv6Network
    name: str = ""
    filters: list[Filter] = Field(default_factory=list, max_length=MAX_FILTERS)

    @field_validator("address", mode="before")
    @classmethod
    def _network_non_strict(cls, value: Any) -> Any:
        # Host bits set ("10.0.0.1/8") are accepted and masked, like the reference parser does.
        if isinstance(value, str):
            return ipaddress.ip_network(value, strict=False)
        return value


class DnsResource(_Model):
    id: str
    type: Literal["dns"]
    address: str
    name: str = ""
    filters: list[Filter] = Field(default_factory=list, max_length=MAX_FILTERS)


class InternetResource(_Model):
    id: str
    type: Literal["internet"]


Resource = Annotated[CidrResource | DnsResource | InternetResource, Field(discriminator="type")]


class IceCredentials(_Model):
    username: str
    password: str


class Client(_Model):
    id: str
    public_key: str
    preshared_key: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    version: str | None = None
    device_os_name: str | None = None
    device_os_version: str | None = None

    @field_validator("public_key", "preshared_key")
    @classmethod
    def _keys_are_wireguard_keys(cls, value: str) -> str:
        return _check_wg_key(value)


class Authorization(_Model):
    client_id: str
    resource_id: str
    expires_at: UnixTime | None = None


class FlowLogsConfig(_Model):
    api_url: str | None = None
    upload_interval_secs: Annotated[int, Field(ge=0, le=U64_MAX)] = 0
    upload_batch_size: Annotated[int, Field(ge=0, le=U64_MAX)] = 1000


def _flow_logs_or_none(value: Any) -> FlowLogsConfig | None:
    # Unused by this gateway: an odd shape must not cost the init that carries the interface and authorizations.
    try:
        return FlowLogsConfig.model_validate(value)
    except (ValidationError, ValueError, TypeError, RecursionError):
        return None


class InitConfig(_Model):
    ipv4_masquerade_enabled: bool = True
    ipv6_masquerade_enabled: bool = True


# --- portal → gateway ------------------------------------------------------------------------------------------------


class Init(_Model):
    EVENT: ClassVar[str] = "init"
    interface: Interface
    relays: list[Relay] = Field(default_factory=list, max_length=MAX_RELAYS)
    authorizations: list[Authorization] = Field(default_factory=list, max_length=MAX_AUTHORIZATIONS)
    account_slug: str | None = None
    # Required by Firezone's parser; here any shape (or none) is accepted and read as None when it does not fit,
    # because flow logs are not uploaded by this gateway.
    flow_logs: Annotated[FlowLogsConfig | None, BeforeValidator(_flow_logs_or_none)] = None
    config: InitConfig | None = None


class CreateAuthorization(_Model):
    EVENT: ClassVar[str] = "create_authorization"
    ref: str
    resource: Resource
    client: Client
    client_ice_credentials: IceCredentials
    gateway_ice_credentials: IceCredentials
    expires_at: UnixTime | None = None
    use_iceless: bool = False
    flow_logs_ingest_token: str | None = None


class _CandidateList(_Model):
    """Firezone parses candidate lists with ``VecSkipError``: bad entries are skipped, the message is kept.

    ``skipped`` counts the entries left out (not strings, not ``candidate:`` lines with a numeric priority, or past
    :data:`MAX_CANDIDATES`); :func:`parse_portal_message` adds them to its drop counter."""

    client_id: str
    candidates: list[str]
    skipped: int = 0

    @model_validator(mode="before")
    @classmethod
    def _skip_bad_candidates(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
            return data
        raw: list[Any] = data["candidates"]
        kept = [c for c in raw if isinstance(c, str) and candidate_priority(c) is not None][:MAX_CANDIDATES]
        return {**data, "candidates": kept, "skipped": len(raw) - len(kept)}


class IceCandidates(_CandidateList):
    EVENT: ClassVar[str] = "ice_candidates"


class InvalidateIceCandidates(_CandidateList):
    EVENT: ClassVar[str] = "invalidate_ice_candidates"


class RejectAccess(_Model):
    EVENT: ClassVar[str] = "reject_access"
    client_id: str
    resource_id: str


class ResourceUpdated(_Model):
    """The payload *is* the resource object; it is wrapped so the event has a type of its own."""

    EVENT: ClassVar[str] = "resource_updated"
    resource: Resource


class RelaysPresence(_Model):
    EVENT: ClassVar[str] = "relays_presence"
    disconnected_ids: list[str] = Field(default_factory=list, max_length=MAX_RELAY_IDS)
    connected: list[Relay] = Field(default_factory=list, max_length=MAX_RELAYS)


class Disconnect(_Model):
    EVENT: ClassVar[str] = "disconnect"
    reason: str


class AccessAuthorizationExpiryUpdated(_Model):
    """Obsolete push (PR #13714): parsed so it is not counted as unknown, then ignored."""

    EVENT: ClassVar[str] = "access_authorization_expiry_updated"
    client_id: str
    resource_id: str
    expires_at: UnixTime | None = None


InboundMessage = (
    Init
    | CreateAuthorization
    | IceCandidates
    | InvalidateIceCandidates
    | RejectAccess
    | ResourceUpdated
    | RelaysPresence
    | Disconnect
    | AccessAuthorizationExpiryUpdated
)

# resource_updated is the one push whose payload is the model's field rather than the model: parsed on its own.
INBOUND_MODELS: dict[str, type[_Model]] = {
    model.EVENT: model for model in get_args(InboundMessage) if model is not ResourceUpdated
}

# Pushed by the portal for clients < 1.4 (and v1-socket names); current gateways ignore them.
LEGACY_EVENTS = frozenset({"request_connection", "allow_access", "authorize_flow"})


class _ResourceEnvelope(_Model):
    resource: Resource


def parse_portal_message(event: str, payload: Any, drops: DropCounter | None = None) -> InboundMessage | DropReason:
    """Validate one portal push. Returns the typed message, or the reason it was dropped (already counted/logged)."""
    try:
        if event == ResourceUpdated.EVENT:
            message: Any = ResourceUpdated(resource=_ResourceEnvelope.model_validate({"resource": payload}).resource)
        elif event in INBOUND_MODELS:
            message = INBOUND_MODELS[event].model_validate(payload)
        elif event in LEGACY_EVENTS:
            return _dropped(DropReason.LEGACY_EVENT, event, drops)
        else:
            return _dropped(DropReason.UNKNOWN_EVENT, event, drops)
    except (ValidationError, ValueError, TypeError, RecursionError) as exc:
        return _dropped(DropReason.INVALID_PAYLOAD, event, drops, exc)
    if isinstance(message, _CandidateList) and message.skipped:
        if drops is not None:
            drops.drop(DropReason.INVALID_CANDIDATE, message.skipped)
        logger.debug("portal message %r: %d invalid candidates skipped", event, message.skipped)
    result: InboundMessage = message
    return result


def _dropped(reason: DropReason, event: str, drops: DropCounter | None, exc: Exception | None = None) -> DropReason:
    if drops is not None:
        drops.drop(reason)
    shown = event if len(event) <= 64 else event[:64] + "…"
    if exc is None:
        logger.debug("portal message %r dropped: %s", shown, reason.value)
    else:
        # Validation errors echo input values; keep the log line short and free of secrets such as PSKs.
        summary = exc.error_count() if isinstance(exc, ValidationError) else type(exc).__name__
        logger.warning("portal message %r dropped: %s (%s errors)", shown, reason.value, summary)
    return reason


# --- gateway → portal ------------------------------------------------------------------------------------------------


class OutboundMessage(_Model):
    EVENT: ClassVar[str] = ""

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SetSnownetCapabilities(OutboundMessage):
    EVENT: ClassVar[str] = "set_snownet_capabilities"
    iceless: bool = False


class AuthorizationCreated(OutboundMessage):
    EVENT: ClassVar[str] = "authorization_created"
    ref: str


class BroadcastIceCandidates(OutboundMessage):
    EVENT: ClassVar[str] = "broadcast_ice_candidates"
    client_ids: list[str]
    candidates: list[str]


class BroadcastInvalidatedIceCandidates(OutboundMessage):
    EVENT: ClassVar[str] = "broadcast_invalidated_ice_candidates"
    client_ids: list[str]
    candidates: list[str]


class NoRelays(OutboundMessage):
    EVENT: ClassVar[str] = "no_relays"


OUTBOUND_MODELS: dict[str, type[OutboundMessage]] = {
    model.EVENT: model
    for model in (
        SetSnownetCapabilities,
        AuthorizationCreated,
        BroadcastIceCandidates,
        BroadcastInvalidatedIceCandidates,
        NoRelays,
    )
}
