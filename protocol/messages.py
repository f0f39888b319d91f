"""Typed payloads of every event on the gateway channel, both directions (portal-protocol.md §2).

Inbound: :func:`parse_portal_message` turns ``(event, payload)`` into one of the models below, or into a
:class:`DropReason` (counted and logged) — it never raises. Unknown fields are ignored everywhere, as the portal adds
fields freely. Outbound: each model has ``EVENT`` and :meth:`OutboundMessage.to_payload`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import logging
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dataplane.base import Address, DropCounter

logger = logging.getLogger(__name__)


class DropReason(enum.Enum):
    UNKNOWN_EVENT = "unknown_event"
    LEGACY_EVENT = "legacy_event"
    INVALID_PAYLOAD = "invalid_payload"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _parse_host_port(value: str) -> Address:
    """``"1.2.3.4:3478"`` or ``"[2001:db8::1]:3478"`` → (ip, port); raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
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
    expires_at: int


class StunRelay(_RelayAddress):
    type: Literal["stun"]


Relay = Annotated[TurnRelay | StunRelay, Field(discriminator="type")]


class PortFilter(_Model):
    protocol: Literal["tcp", "udp"]
    port_range_start: int = Field(default=0, ge=0, le=65535)
    port_range_end: int = Field(default=65535, ge=0, le=65535)


class IcmpFilter(_Model):
    protocol: Literal["icmp"]


Filter = Annotated[PortFilter | IcmpFilter, Field(discriminator="protocol")]


class CidrResource(_Model):
    id: str
    type: Literal["cidr"]
    address: ipaddress.IPv4Network | ipaddress.IPv6Network
    name: str = ""
    filters: list[Filter] = Field(default_factory=list)

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
    filters: list[Filter] = Field(default_factory=list)


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
    expires_at: int | None = None


class FlowLogsConfig(_Model):
    api_url: str | None = None
    upload_interval_secs: int = 0
    upload_batch_size: int = 1000


class InitConfig(_Model):
    ipv4_masquerade_enabled: bool = True
    ipv6_masquerade_enabled: bool = True


# --- portal → gateway ------------------------------------------------------------------------------------------------


class Init(_Model):
    EVENT: ClassVar[str] = "init"
    interface: Interface
    relays: list[Relay] = Field(default_factory=list)
    authorizations: list[Authorization] = Field(default_factory=list)
    account_slug: str | None = None
    # Required by the Rust parser; optional here because we do not use them yet and a missing one is harmless.
    flow_logs: FlowLogsConfig | None = None
    config: InitConfig | None = None


class CreateAuthorization(_Model):
    EVENT: ClassVar[str] = "create_authorization"
    ref: str
    resource: Resource
    client: Client
    client_ice_credentials: IceCredentials
    gateway_ice_credentials: IceCredentials
    expires_at: int | None = None
    use_iceless: bool = False
    flow_logs_ingest_token: str | None = None


class IceCandidates(_Model):
    EVENT: ClassVar[str] = "ice_candidates"
    client_id: str
    candidates: list[str]


class InvalidateIceCandidates(_Model):
    EVENT: ClassVar[str] = "invalidate_ice_candidates"
    client_id: str
    candidates: list[str]


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
    disconnected_ids: list[str] = Field(default_factory=list)
    connected: list[Relay] = Field(default_factory=list)


class Disconnect(_Model):
    EVENT: ClassVar[str] = "disconnect"
    reason: str


class AccessAuthorizationExpiryUpdated(_Model):
    """Obsolete push (PR #13714): parsed so it is not counted as unknown, then ignored."""

    EVENT: ClassVar[str] = "access_authorization_expiry_updated"
    client_id: str
    resource_id: str
    expires_at: int | None = None


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
