"""Portal events → gateway state; gateway outputs → portal messages (design.md §1, portal-protocol.md §2).

The gateway has no data plane yet (TUN, Node and policy are the next build-order step); until then
:class:`AuthorizationBook` is the gateway state: it keeps the real
authorization bookkeeping (own tunnel IPs, relays by id, per-client resources with expiry, §2.1 re-sync on ``init``,
``reject_access``, ``resource_updated``) behind the :class:`GatewayStateHandler` interface the data plane will implement.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dataplane.base import DropCounter, WallClock
from protocol.messages import (
    AccessAuthorizationExpiryUpdated,
    AuthorizationCreated,
    CidrResource,
    Client,
    CreateAuthorization,
    Disconnect,
    DnsResource,
    IceCandidates,
    IceCredentials,
    Init,
    InternetResource,
    InvalidateIceCandidates,
    NoRelays,
    OutboundMessage,
    RejectAccess,
    Relay,
    RelaysPresence,
    ResourceUpdated,
    SetSnownetCapabilities,
    TurnRelay,
    parse_portal_message,
)
from protocol.messages import DropReason as MessageDropReason
from protocol.messages import Interface as TunnelInterface
from protocol.phoenix import ChannelEvent, ChannelJoined, LinkHiccuped, PushReceived, ReplyReceived

logger = logging.getLogger(__name__)

Resource = CidrResource | DnsResource | InternetResource
EXPIRY_TICK = 1.0


class AuthorizationOutcome(enum.Enum):
    ACCEPTED = "accepted"
    NO_RELAYS = "no_relays"


class GatewayStateHandler(Protocol):
    """What the portal link asks of the gateway. Every method takes ``now`` (monotonic seconds) last."""

    def apply_init(self, init: Init, now: float) -> None: ...

    def create_authorization(self, request: CreateAuthorization, now: float) -> AuthorizationOutcome: ...

    def add_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None: ...

    def remove_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None: ...

    def reject_access(self, client_id: str, resource_id: str, now: float) -> None: ...

    def update_resource(self, resource: Resource, now: float) -> None: ...

    def relays_presence(self, disconnected_ids: Sequence[str], connected: Sequence[Relay], now: float) -> None: ...

    def handle_timeout(self, now: float) -> None: ...

    def poll_outbound(self) -> OutboundMessage | None: ...


@dataclass
class ResourceGrant:
    resource: Resource
    expires_at: float | None  # unix seconds; None = never


@dataclass
class ClientAccess:
    """One client's state on the gateway (``ClientOnGateway`` in the reference), minus the data plane."""

    client: Client
    client_ice: IceCredentials
    gateway_ice: IceCredentials
    use_iceless: bool
    resources: dict[str, ResourceGrant] = field(default_factory=dict)
    remote_candidates: set[str] = field(default_factory=set)
    flow_logs_ingest_token: str | None = None


class AuthorizationBook:
    """The bookkeeping half of the gateway state, complete enough to answer the portal correctly."""

    def __init__(self, wall_clock: WallClock) -> None:
        self._wall_clock = wall_clock
        self.interface: TunnelInterface | None = None
        self.relays: dict[str, list[Relay]] = {}
        self.clients: dict[str, ClientAccess] = {}
        self.account_slug: str | None = None
        self._outbound: deque[OutboundMessage] = deque()

    # --- GatewayStateHandler -------------------------------------------------------------------------------------

    def apply_init(self, init: Init, now: float) -> None:
        self.account_slug = init.account_slug
        self.relays_presence((), init.relays, now)
        self.interface = init.interface
        listed: dict[str, dict[str, float | None]] = {}
        for pair in init.authorizations:
            listed.setdefault(pair.client_id, {})[pair.resource_id] = (
                float(pair.expires_at) if pair.expires_at is not None else None
            )
        for client_id, access in list(self.clients.items()):
            keep = listed.get(client_id, {})
            for resource_id in list(access.resources):
                if resource_id not in keep:
                    del access.resources[resource_id]
            for resource_id, expires_at in keep.items():
                if resource_id in access.resources:
                    access.resources[resource_id].expires_at = expires_at
            if not access.resources:
                self._remove_client(client_id, "no authorizations left after init")
        unknown = sum(
            1 for c, rs in listed.items() for r in rs if c not in self.clients or r not in self.clients[c].resources
        )
        if unknown:
            logger.debug("init lists %d authorizations for clients or resources we do not know", unknown)
        self._evict_expired()

    def create_authorization(self, request: CreateAuthorization, now: float) -> AuthorizationOutcome:
        if not any(isinstance(r, TurnRelay) for entries in self.relays.values() for r in entries):
            # The reference samples a relay for every new connection; with none it answers no_relays instead.
            self._outbound.append(NoRelays())
            return AuthorizationOutcome.NO_RELAYS
        client = request.client
        access = self.clients.get(client.id)
        same_connection = (
            access is not None
            and access.client.public_key == client.public_key
            and access.client.preshared_key == client.preshared_key
            and access.client_ice == request.client_ice_credentials
            and access.gateway_ice == request.gateway_ice_credentials
            and access.use_iceless == request.use_iceless
        )
        if access is None or not same_connection:
            resources = access.resources if access is not None else {}
            access = ClientAccess(
                client=client,
                client_ice=request.client_ice_credentials,
                gateway_ice=request.gateway_ice_credentials,
                use_iceless=request.use_iceless,
                resources=resources,
            )
            self.clients[client.id] = access
        else:
            access.client = client
        access.flow_logs_ingest_token = request.flow_logs_ingest_token
        expires_at = float(request.expires_at) if request.expires_at is not None else None
        access.resources[request.resource.id] = ResourceGrant(request.resource, expires_at)
        self._evict_expired()
        return AuthorizationOutcome.ACCEPTED

    def add_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None:
        access = self.clients.get(client_id)
        if access is None:
            logger.debug("ice candidates for an unknown client")
            return
        access.remote_candidates.update(c for c in candidates if c.startswith("candidate:"))

    def remove_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None:
        access = self.clients.get(client_id)
        if access is not None:
            access.remote_candidates.difference_update(candidates)

    def reject_access(self, client_id: str, resource_id: str, now: float) -> None:
        access = self.clients.get(client_id)
        if access is None or access.resources.pop(resource_id, None) is None:
            logger.debug("reject_access for an authorization we do not hold")
            return
        if not access.resources:
            self._remove_client(client_id, "last resource rejected")

    def update_resource(self, resource: Resource, now: float) -> None:
        for access in self.clients.values():
            grant = access.resources.get(resource.id)
            if grant is None:
                continue
            if type(grant.resource) is not type(resource):
                logger.warning("resource_updated tried to change the type of resource %s; refused", resource.id)
                continue
            if isinstance(grant.resource, CidrResource | DnsResource) and isinstance(
                resource, CidrResource | DnsResource
            ):
                grant.resource = grant.resource.model_copy(update={"filters": resource.filters})

    def relays_presence(self, disconnected_ids: Sequence[str], connected: Sequence[Relay], now: float) -> None:
        for relay_id in disconnected_ids:
            self.relays.pop(relay_id, None)
        fresh: dict[str, list[Relay]] = {}
        for relay in connected:
            fresh.setdefault(relay.id, []).append(relay)
        self.relays.update(fresh)

    def handle_timeout(self, now: float) -> None:
        self._evict_expired()

    def poll_outbound(self) -> OutboundMessage | None:
        return self._outbound.popleft() if self._outbound else None

    # --- internals -----------------------------------------------------------------------------------------------

    def _evict_expired(self) -> None:
        wall = self._wall_clock()
        for client_id, access in list(self.clients.items()):
            expired = [rid for rid, g in access.resources.items() if g.expires_at is not None and g.expires_at <= wall]
            for resource_id in expired:
                del access.resources[resource_id]
            if expired and not access.resources:
                self._remove_client(client_id, "all authorizations expired")

    def _remove_client(self, client_id: str, why: str) -> None:
        self.clients.pop(client_id, None)
        logger.debug("client state dropped: %s", why)


class PortalSender(Protocol):
    def push(self, event: str, payload: Any) -> bool: ...


@dataclass
class EventloopStats:
    handled: dict[str, int] = field(default_factory=dict)


class Eventloop:
    """Routes one portal link's channel events into a :class:`GatewayStateHandler` and its outputs back."""

    def __init__(self, sender: PortalSender, state: GatewayStateHandler, monotonic: Callable[[], float]) -> None:
        self._sender = sender
        self.state = state
        self._monotonic = monotonic
        self.drops = DropCounter()
        self.init_applied = False
        self.stats = EventloopStats()

    def send(self, message: OutboundMessage) -> None:
        self._sender.push(message.EVENT, message.to_payload())

    def handle_channel_event(self, event: ChannelEvent) -> None:
        now = self._monotonic()
        if isinstance(event, ChannelJoined):
            self.init_applied = False
            logger.debug("announcing capabilities (classic ICE)")
            self.send(SetSnownetCapabilities(iceless=False))
        elif isinstance(event, LinkHiccuped):
            self.init_applied = False
        elif isinstance(event, ReplyReceived):
            if event.status != "ok":
                logger.info("portal answered push %d with %s", event.ref, event.status)
        elif isinstance(event, PushReceived):
            self._handle_push(event.event, event.payload, now)
        self.flush_outbound()

    def handle_disconnected(self) -> None:
        self.init_applied = False

    def tick(self) -> None:
        self.state.handle_timeout(self._monotonic())
        self.flush_outbound()

    def flush_outbound(self) -> None:
        while (message := self.state.poll_outbound()) is not None:
            self.send(message)

    def _handle_push(self, event: str, payload: Any, now: float) -> None:
        message = parse_portal_message(event, payload, self.drops)
        if isinstance(message, MessageDropReason):
            return
        self.stats.handled[message.EVENT] = self.stats.handled.get(message.EVENT, 0) + 1
        if isinstance(message, Init):
            self.state.apply_init(message, now)
            self.init_applied = True
            logger.info(
                "init applied",
                extra={"relays": len(message.relays), "authorizations": len(message.authorizations)},
            )
        elif isinstance(message, CreateAuthorization):
            outcome = self.state.create_authorization(message, now)
            if outcome is AuthorizationOutcome.ACCEPTED:
                self.send(AuthorizationCreated(ref=message.ref))
        elif isinstance(message, IceCandidates):
            self.state.add_ice_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, InvalidateIceCandidates):
            self.state.remove_ice_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, RejectAccess):
            self.state.reject_access(message.client_id, message.resource_id, now)
        elif isinstance(message, ResourceUpdated):
            self.state.update_resource(message.resource, now)
        elif isinstance(message, RelaysPresence):
            self.state.relays_presence(message.disconnected_ids, message.connected, now)
        elif isinstance(message, Disconnect):
            # token_expired is handled as fatal by the channel itself; other reasons are informational.
            logger.info("portal sent disconnect: %s", message.reason[:64])
        elif isinstance(message, AccessAuthorizationExpiryUpdated):
            pass

    async def run_ticks(self, interval: float = EXPIRY_TICK) -> None:
        """The 1 Hz internal tick that evicts expired authorizations (§3.3). Runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:
                logger.exception("expiry tick failed")
