"""Portal events → gateway state; gateway outputs → portal messages (design.md §1, docs/protocol.md §2).

:class:`Eventloop` parses every push (:func:`protocol.messages.parse_portal_message`), hands it to the gateway state
(:class:`dataplane.gateway.GatewayState`, behind the :class:`GatewayStateHandler` interface) and sends what the state
queued for the portal. It also tells the state whether the link is up, so candidate changes made while it is down are
held and flushed after the next join (§2.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dataplane.base import DropCounter
from dataplane.gateway import AuthorizationOutcome, Resource
from protocol.messages import (
    AccessAuthorizationExpiryUpdated,
    AuthorizationCreated,
    CreateAuthorization,
    Disconnect,
    IceCandidates,
    Init,
    InvalidateIceCandidates,
    OutboundMessage,
    RejectAccess,
    Relay,
    RelaysPresence,
    ResourceUpdated,
    SetSnownetCapabilities,
    parse_portal_message,
)
from protocol.messages import DropReason as MessageDropReason
from protocol.phoenix import ChannelEvent, ChannelJoined, LinkHiccuped, PushReceived, ReplyReceived

logger = logging.getLogger(__name__)


class GatewayStateHandler(Protocol):
    """What the portal link asks of the gateway (:class:`dataplane.gateway.GatewayState`). ``now`` (monotonic) last."""

    def set_portal_connected(self, connected: bool) -> None: ...

    def apply_init(self, init: Init, now: float) -> None: ...

    def create_authorization(self, request: CreateAuthorization, now: float) -> AuthorizationOutcome: ...

    def add_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None: ...

    def remove_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None: ...

    def reject_access(self, client_id: str, resource_id: str, now: float) -> None: ...

    def update_resource(self, resource: Resource, now: float) -> None: ...

    def relays_presence(self, disconnected_ids: Sequence[str], connected: Sequence[Relay], now: float) -> None: ...

    def poll_outbound(self) -> OutboundMessage | None: ...


class PortalSender(Protocol):
    @property
    def joined(self) -> bool: ...

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
            self.state.set_portal_connected(True)
        elif isinstance(event, LinkHiccuped):
            self.init_applied = False
            self.state.set_portal_connected(False)
        elif isinstance(event, ReplyReceived):
            if event.status != "ok":
                logger.info("portal answered push %d with %s", event.ref, event.status)
        elif isinstance(event, PushReceived):
            self._handle_push(event.event, event.payload, now)
        self.flush_outbound()

    def handle_disconnected(self) -> None:
        self.init_applied = False
        self.state.set_portal_connected(False)

    def flush_outbound(self) -> None:
        # The link can go down without a channel event reaching us (the socket just closes): ask it each time.
        self.state.set_portal_connected(self._sender.joined)
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
