"""The dev portal's world, read from a JSON file, and the payloads it derives from it.

Everything a real portal would compute from its database (tunnel IPs, relay credentials, ICE credentials, PSKs, the
opaque authorization ``ref``) is derived here deterministically from the config and the connecting gateway, following
docs/protocol.md §2.1, §4.2, §4.3 and §4.5. Nothing here does I/O beyond :func:`load_config`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

RELAY_CREDENTIALS_EXPIRY = 2145916800
"""2038-01-01: the portal mints relay credentials with this fixed expiry so they stay stable across reconnects."""

TUNNEL_IPV4_POOL = ipaddress.IPv4Network("100.64.0.0/11")
TUNNEL_IPV6_POOL = ipaddress.IPv6Network("fd00:2021:1111::/107")
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
GATEWAY_PUBLIC_KEY_LENGTH = 44


def b64_nopad(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64url_nopad(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def relay_salt(gateway_public_key: str) -> str:
    """The salt the portal puts in relay usernames: b64nopad(sha256(<gateway public key, base64 string>))."""
    return b64_nopad(hashlib.sha256(gateway_public_key.encode()).digest())


def relay_password(expiry: int, relay_secret: str, salt: str) -> str:
    """Firezone relay password: b64nopad(sha256("<expiry>:<relay secret>:<salt>")); the secret string is hashed as-is."""
    return b64_nopad(hashlib.sha256(f"{expiry}:{relay_secret}:{salt}".encode()).digest())


def relay_credentials(
    gateway_public_key: str, relay_secret: str, expiry: int = RELAY_CREDENTIALS_EXPIRY
) -> tuple[str, str]:
    """(username, password) for one gateway, as in the ``relays`` entries of ``init``."""
    salt = relay_salt(gateway_public_key)
    return f"{expiry}:{salt}", relay_password(expiry, relay_secret, salt)


def ice_credentials(
    client_id: str, client_public_key: str, gateway_id: str, gateway_public_key: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(client, gateway) ICE credentials derived as in docs/protocol.md §4.3 (4/22/4/22 characters)."""
    seed = f"{client_id}:{client_public_key}:{gateway_id}:{gateway_public_key}"
    digest = base64.b32encode(hashlib.sha256(seed.encode()).digest()).decode("ascii").rstrip("=").lower()
    client = {"username": digest[0:4], "password": digest[4:26]}
    gateway = {"username": digest[26:30], "password": digest[30:52]}
    return client, gateway


def preshared_key(
    client_id: str,
    client_psk_base: bytes,
    client_public_key: str,
    gateway_id: str,
    gateway_psk_base: bytes,
    gateway_public_key: str,
) -> str:
    """The WireGuard PSK as the portal derives it (docs/protocol.md §4.2), base64 of 32 bytes."""
    salt = f"WG_PSK|C_ID:{client_id}|G_ID:{gateway_id}|C_PK:{client_public_key}|G_PK:{gateway_public_key}"
    key = hashlib.pbkdf2_hmac("sha256", client_psk_base + gateway_psk_base, salt.encode(), 1, dklen=32)
    return base64.b64encode(key).decode("ascii")


def is_valid_public_key(value: str) -> bool:
    """The portal's check on ``public_key``: standard base64 of exactly 44 characters (a 32-byte X25519 key)."""
    if len(value) != GATEWAY_PUBLIC_KEY_LENGTH:
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == 32
    except ValueError:
        return False


def gateway_version_from_user_agent(user_agent: str) -> str | None:
    """The portal reads the version solely from the ``gateway/<version>`` token of the User-Agent."""
    for token in user_agent.split():
        if token.startswith("gateway/"):
            version = token.removeprefix("gateway/")
            return version or None
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilterConfig(_Model):
    protocol: Literal["tcp", "udp", "icmp"]
    port_range_start: int | None = Field(default=None, ge=0, le=65535)
    port_range_end: int | None = Field(default=None, ge=0, le=65535)


class SiteConfig(_Model):
    id: str
    name: str = "default"


class GatewayConfig(_Model):
    """A gateway token. With ``external_id`` unset it is a site token any number of gateway ids may use."""

    token: str = Field(min_length=1)
    site_id: str
    external_id: str | None = None
    id: str | None = None
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None

    @field_validator("ipv4", "ipv6")
    @classmethod
    def _in_tunnel_range(cls, value: IpAddress | None) -> IpAddress | None:
        pool = TUNNEL_IPV4_POOL if value is None or value.version == 4 else TUNNEL_IPV6_POOL
        if value is not None and value not in pool:
            raise ValueError(f"{value} is outside {pool}")
        return value


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_Identified = TypeVar("_Identified", bound=_HasId)


def _by_id(items: Sequence[_Identified], wanted: str, kind: str) -> _Identified:
    for item in items:
        if item.id == wanted:
            return item
    raise KeyError(f"no {kind} {wanted!r} in the portal config")


class ResourceConfig(_Model):
    id: str
    type: Literal["cidr", "dns", "internet"]
    name: str = ""
    address: str | None = None
    filters: list[FilterConfig] = Field(default_factory=list)
    site_id: str | None = None
    """None = reachable through every site."""

    @model_validator(mode="after")
    def _address_matches_type(self) -> ResourceConfig:
        if self.type == "cidr":
            if self.address is None:
                raise ValueError(f"cidr resource {self.id} needs an address")
            ipaddress.ip_network(self.address, strict=False)
        elif self.type == "dns" and not self.address:
            raise ValueError(f"dns resource {self.id} needs an address")
        return self

    def to_payload(self) -> dict[str, Any]:
        """The resource object of docs/protocol.md §3.1, as the gateway sees it."""
        if self.type == "internet":
            return {"id": self.id, "type": "internet"}
        return {
            "id": self.id,
            "type": self.type,
            "name": self.name,
            "address": self.address,
            "filters": [f.model_dump(exclude_none=True) for f in self.filters],
        }


class ClientConfig(_Model):
    """A client device. ``token`` admits it on ``/client/websocket``; it then brings its own ``public_key`` (the
    configured one is only used by operator-made authorizations for a client that is not connected)."""

    id: str
    public_key: str
    token: str | None = Field(default=None, min_length=1)
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    version: str = "1.6.0"
    device_os_name: str = "Linux"
    device_os_version: str = "6.1"
    psk_base: str | None = None
    actor_name: str = "Dev User"
    actor_email: str = "dev@example.com"

    @field_validator("public_key")
    @classmethod
    def _key_is_wireguard_key(cls, value: str) -> str:
        if not is_valid_public_key(value):
            raise ValueError("public_key must be a base64 X25519 key (44 characters)")
        return value


class RelayConfig(_Model):
    id: str
    addrs: list[str] = Field(min_length=1)
    type: Literal["turn", "stun"] = "turn"


class AuthorizationConfig(_Model):
    client_id: str
    resource_id: str
    expires_at: int | None = None


class FlowLogsConfig(_Model):
    api_url: str = "http://127.0.0.1:9/flow-logs-disabled"
    upload_interval_secs: int = 0
    upload_batch_size: int = 1000


class PortalConfig(_Model):
    account_id: str = "00000000-0000-4000-8000-00000000acc7"
    account_slug: str = "dev"
    signing_secret: str = "dev-portal-signing-secret"
    """Signs authorization refs and flow-log tokens, and seeds the per-device psk_base values."""
    relay_secret: str = "dev-relay-secret"
    relay_expires_at: int = RELAY_CREDENTIALS_EXPIRY
    max_relays: int = 2
    idle_timeout: float = 37.0
    """Seconds without any frame from the gateway before the portal closes the socket (Phoenix's 37 s)."""
    authorization_timeout: float = Field(default=15.0, gt=0)
    """Seconds a brokered flow waits for the gateway's ``authorization_created`` (docs/protocol.md §2.1: 15 s)."""
    sites: list[SiteConfig] = Field(default_factory=list)
    gateways: list[GatewayConfig] = Field(default_factory=list)
    resources: list[ResourceConfig] = Field(default_factory=list)
    clients: list[ClientConfig] = Field(default_factory=list)
    relays: list[RelayConfig] = Field(default_factory=list)
    authorizations: list[AuthorizationConfig] = Field(default_factory=list)
    flow_logs: FlowLogsConfig = Field(default_factory=FlowLogsConfig)
    # Lookups by id and token: a load run has thousands of clients and looks one up on every connection and flow.
    _clients_by_id: dict[str, ClientConfig] = PrivateAttr(default_factory=dict)
    _clients_by_token: dict[str, ClientConfig] = PrivateAttr(default_factory=dict)
    _resources_by_id: dict[str, ResourceConfig] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._clients_by_id = {c.id: c for c in reversed(self.clients)}  # the first of a duplicated id wins
        self._clients_by_token = {c.token: c for c in self.clients if c.token is not None}
        self._resources_by_id = {r.id: r for r in reversed(self.resources)}

    @model_validator(mode="after")
    def _references_resolve(self) -> PortalConfig:
        site_ids = {s.id for s in self.sites}
        for gateway in self.gateways:
            if gateway.site_id not in site_ids:
                raise ValueError(f"gateway token for site {gateway.site_id!r}: no such site")
        for resource in self.resources:
            if resource.site_id is not None and resource.site_id not in site_ids:
                raise ValueError(f"resource {resource.id}: no such site {resource.site_id!r}")
        client_ids = {c.id for c in self.clients}
        tokens = [c.token for c in self.clients if c.token is not None]
        if len(tokens) != len(set(tokens)):
            raise ValueError("two clients share a token")
        resource_ids = {r.id for r in self.resources}
        for authorization in self.authorizations:
            if authorization.client_id not in client_ids:
                raise ValueError(f"authorization: no such client {authorization.client_id!r}")
            if authorization.resource_id not in resource_ids:
                raise ValueError(f"authorization: no such resource {authorization.resource_id!r}")
        return self

    def client(self, client_id: str) -> ClientConfig:
        client = self._clients_by_id.get(client_id)
        return _by_id(self.clients, client_id, "client") if client is None else client

    def find_client(self, token: str) -> ClientConfig | None:
        """The client admitted by this token, or None (a dictionary lookup: this is a dev portal, timing-safe
        comparison buys nothing here)."""
        return self._clients_by_token.get(token)

    def resource(self, resource_id: str) -> ResourceConfig:
        resource = self._resources_by_id.get(resource_id)
        return _by_id(self.resources, resource_id, "resource") if resource is None else resource

    def relay(self, relay_id: str) -> RelayConfig:
        return _by_id(self.relays, relay_id, "relay")

    def psk_base(self, device_id: str) -> bytes:
        """The per-device random secret of the real portal, derived here so restarts keep PSKs stable."""
        client = self._clients_by_id.get(device_id)
        if client is not None and client.psk_base is not None:
            return client.psk_base.encode()
        return hmac.new(self.signing_secret.encode(), f"psk_base:{device_id}".encode(), hashlib.sha256).digest()

    def gateway_device_id(self, entry: GatewayConfig, external_id: str) -> str:
        """The portal's UUID for a gateway: pinned in the config, or derived from site and external id."""
        if entry.id is not None:
            return entry.id
        namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"firezone-dev-portal:{self.account_id}")
        return str(uuid.uuid5(namespace, f"{entry.site_id}:{external_id}"))

    def find_gateway(self, token: str, external_id: str) -> GatewayConfig | None:
        """The token entry that admits this gateway, or None for an unknown token.

        An entry pinned to this external id wins, then a site token (no external id); a token pinned to another id is
        a single-owner token that names its device, so the reported id is only a hint and it still admits.
        """
        candidates = [g for g in self.gateways if hmac.compare_digest(g.token.encode(), token.encode())]
        for entry in candidates:
            if entry.external_id == external_id:
                return entry
        for entry in candidates:
            if entry.external_id is None:
                return entry
        return candidates[0] if candidates else None

    def relay_entries(self, gateway_public_key: str, relay_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """``init``/``relays_presence`` relay objects: one per address, same id, credentials minted for this key."""
        relays = self.relays[: self.max_relays] if relay_ids is None else [self.relay(r) for r in relay_ids]
        username, password = relay_credentials(gateway_public_key, self.relay_secret, self.relay_expires_at)
        entries: list[dict[str, Any]] = []
        for relay in relays:
            for addr in relay.addrs:
                if relay.type == "stun":
                    entries.append({"id": relay.id, "type": "stun", "addr": addr})
                else:
                    entries.append(
                        {
                            "id": relay.id,
                            "type": "turn",
                            "addr": addr,
                            "username": username,
                            "password": password,
                            "expires_at": self.relay_expires_at,
                        }
                    )
        return entries

    def client_resource_payload(self, resource: ResourceConfig) -> dict[str, Any]:
        """A resource as the client's ``init`` lists it: the gateway view plus the sites that serve it."""
        sites = [s for s in self.sites if resource.site_id in (None, s.id)]
        return {**resource.to_payload(), "sites": [{"id": s.id, "name": s.name} for s in sites]}

    def authorizations_for_site(self, site_id: str, now_unix: float) -> list[dict[str, Any]]:
        """Still-valid (client, resource) pairs whose resource this site serves, as ``init.authorizations``."""
        result: list[dict[str, Any]] = []
        for authorization in self.authorizations:
            resource = self.resource(authorization.resource_id)
            if resource.site_id not in (None, site_id):
                continue
            if authorization.expires_at is not None and authorization.expires_at < now_unix:
                continue
            result.append(authorization.model_dump())
        return result


def load_config(source: str | Path | dict[str, Any] | PortalConfig) -> PortalConfig:
    """A config from a JSON file path, a dict, or an existing model; raises ``ValueError`` when invalid."""
    if isinstance(source, PortalConfig):
        return source
    if isinstance(source, dict):
        return PortalConfig.model_validate(source)
    data = json.loads(Path(source).read_text())
    return PortalConfig.model_validate(data)


class SigningKey:
    """Makes the portal's opaque signed strings: authorization refs and HS256 flow-log tokens."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(f"dev-portal-signing:{secret}".encode()).digest()

    def sign_ref(self, claims: dict[str, Any]) -> str:
        """``SFMyNTY.<payload>.<mac>`` like Plug.Crypto.sign; the gateway must echo it back byte for byte."""
        protected = "SFMyNTY"  # base64("HS256"), the prefix Plug.Crypto's signed tokens carry
        body = b64url_nopad(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
        mac = hmac.new(self._key, f"{protected}.{body}".encode(), hashlib.sha256).digest()
        return f"{protected}.{body}.{b64url_nopad(mac)}"

    def verify_ref(self, ref: str) -> bool:
        parts = ref.split(".")
        if len(parts) != 3:
            return False
        mac = hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        return hmac.compare_digest(b64url_nopad(mac), parts[2])

    def jwt(self, claims: dict[str, Any]) -> str:
        header = b64url_nopad(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        body = b64url_nopad(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
        mac = hmac.new(self._key, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{b64url_nopad(mac)}"
