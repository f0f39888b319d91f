"""agent/eventloop.py: channel events → gateway state calls, and the messages the gateway answers with.

The gateway state here is a recorder; what the real one decides is tested in tests/sim/test_gateway_state.py.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Sequence
from typing import Any

import pytest

from agent.eventloop import Eventloop
from dataplane.gateway import AuthorizationOutcome, Resource
from protocol.messages import (
    BroadcastIceCandidates,
    CreateAuthorization,
    Init,
    OutboundMessage,
    PortFilter,
    Relay,
)
from protocol.phoenix import ChannelJoined, HiccupReason, LinkHiccuped, PushReceived

RELAY = {
    "id": "relay-1",
    "type": "turn",
    "addr": "172.28.0.101:3478",
    "username": "2145916800:s",
    "password": "p",
    "expires_at": 2145916800,
}
INIT: dict[str, Any] = {
    "interface": {"ipv4": "100.115.164.78", "ipv6": "fd00:2021:1111::2c:f6ab"},
    "relays": [RELAY],
    "authorizations": [],
    "account_slug": "acme",
}


def create_authorization(client: str, resource: str, *, ref: str = "ref") -> dict[str, Any]:
    return {
        "ref": ref,
        "resource": {"id": resource, "type": "cidr", "name": "n", "address": "172.20.0.0/16", "filters": []},
        "client": {
            "id": client,
            "public_key": "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8=",
            "preshared_key": "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM=",
            "ipv4": "100.93.74.51",
            "ipv6": "fd00:2021:1111::f:853b",
        },
        "client_ice_credentials": {"username": "hgwh", "password": "j2fqufatn7xlrrvv6fsvea"},
        "gateway_ice_credentials": {"username": "ejqt", "password": "zfjrrjdkbci42t2axyd45a"},
        "expires_at": None,
    }


class RecordingState:
    """A GatewayStateHandler that records every call and answers create_authorization as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.outcome = AuthorizationOutcome.ACCEPTED
        self.outbound: deque[OutboundMessage] = deque()
        self.connected: list[bool] = []

    def set_portal_connected(self, connected: bool) -> None:
        if not self.connected or self.connected[-1] != connected:
            self.connected.append(connected)

    def apply_init(self, init: Init, now: float) -> None:
        self.calls.append(("init", init))

    def create_authorization(self, request: CreateAuthorization, now: float) -> AuthorizationOutcome:
        self.calls.append(("create_authorization", request))
        return self.outcome

    def add_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None:
        self.calls.append(("add", (client_id, list(candidates))))

    def remove_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None:
        self.calls.append(("remove", (client_id, list(candidates))))

    def reject_access(self, client_id: str, resource_id: str, now: float) -> None:
        self.calls.append(("reject", (client_id, resource_id)))

    def update_resource(self, resource: Resource, now: float) -> None:
        self.calls.append(("update", resource))

    def relays_presence(self, disconnected_ids: Sequence[str], connected: Sequence[Relay], now: float) -> None:
        self.calls.append(("relays", (list(disconnected_ids), [r.id for r in connected])))

    def poll_outbound(self) -> OutboundMessage | None:
        return self.outbound.popleft() if self.outbound else None


class Harness:
    def __init__(self) -> None:
        self.pushed: list[tuple[str, Any]] = []
        self.joined = True
        self.state = RecordingState()
        self.loop = Eventloop(self, self.state, lambda: 0.0)

    def push(self, event: str, payload: Any) -> bool:
        self.pushed.append((event, payload))
        return True

    def portal(self, event: str, payload: Any) -> None:
        self.loop.handle_channel_event(PushReceived(event, copy.deepcopy(payload)))


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.loop.handle_channel_event(ChannelJoined())
    harness.portal("init", INIT)
    harness.pushed.clear()
    harness.state.calls.clear()
    return harness


def test_join_announces_classic_ice_capabilities_and_tells_the_state() -> None:
    harness = Harness()
    harness.loop.handle_channel_event(ChannelJoined())
    assert harness.pushed == [("set_snownet_capabilities", {"iceless": False})]
    assert harness.state.connected == [True]
    assert not harness.loop.init_applied


def test_init_applied_and_reset_on_hiccup_and_rejoin(h: Harness) -> None:
    assert h.loop.init_applied
    h.joined = False
    h.loop.handle_channel_event(LinkHiccuped(HiccupReason.MISSED_HEARTBEATS))
    assert not h.loop.init_applied and h.state.connected[-1] is False
    h.joined = True
    h.loop.handle_channel_event(ChannelJoined())
    assert not h.loop.init_applied and h.state.connected[-1] is True
    h.portal("init", INIT)
    assert h.loop.init_applied
    kind, init = h.state.calls[-1]
    assert kind == "init" and isinstance(init, Init) and str(init.interface.ipv4) == "100.115.164.78"


def test_accepted_authorization_is_answered_with_the_same_ref(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1", ref="SFMyNTY.abc"))
    assert h.pushed == [("authorization_created", {"ref": "SFMyNTY.abc"})]
    kind, request = h.state.calls[-1]
    assert kind == "create_authorization" and request.client.id == "c1" and request.resource.id == "r1"


@pytest.mark.parametrize("outcome", [AuthorizationOutcome.NO_RELAYS, AuthorizationOutcome.REFUSED])
def test_an_authorization_not_accepted_is_not_answered_authorized(h: Harness, outcome: AuthorizationOutcome) -> None:
    h.state.outcome = outcome
    h.portal("create_authorization", create_authorization("c1", "r1"))
    assert h.pushed == []


def test_every_push_reaches_its_handler(h: Harness) -> None:
    candidate = "candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host"
    h.portal("ice_candidates", {"client_id": "c1", "candidates": [candidate]})
    h.portal("invalidate_ice_candidates", {"client_id": "c1", "candidates": [candidate]})
    h.portal("reject_access", {"client_id": "c1", "resource_id": "r1"})
    h.portal(
        "resource_updated",
        {"id": "r1", "type": "cidr", "address": "10.0.0.0/8", "name": "x", "filters": [{"protocol": "tcp"}]},
    )
    h.portal("relays_presence", {"disconnected_ids": ["relay-1"], "connected": [dict(RELAY, id="relay-2")]})
    kinds = [kind for kind, _ in h.state.calls]
    assert kinds == ["add", "remove", "reject", "update", "relays"]
    assert h.state.calls[0][1] == ("c1", [candidate])
    assert h.state.calls[2][1] == ("c1", "r1")
    assert h.state.calls[3][1].filters == [PortFilter(protocol="tcp")]
    assert h.state.calls[4][1] == (["relay-1"], ["relay-2"])


def test_state_output_is_sent_and_follows_the_link(h: Harness) -> None:
    message = BroadcastIceCandidates(client_ids=["c1"], candidates=["candidate:x"])
    h.state.outbound.append(message)
    h.loop.flush_outbound()
    assert h.pushed == [("broadcast_ice_candidates", {"client_ids": ["c1"], "candidates": ["candidate:x"]})]
    h.joined = False  # the socket closed without a channel event reaching the loop
    h.loop.flush_outbound()
    assert h.state.connected[-1] is False


def test_garbage_pushes_are_counted_not_raised(h: Harness) -> None:
    h.portal("create_authorization", {"ref": 5})
    h.portal("brand_new_event", {})
    h.portal("init", "not an object")
    assert h.loop.drops.total() == 3
    assert h.pushed == [] and h.state.calls == []
    assert h.loop.init_applied  # a bad init does not undo the good one


def test_obsolete_and_disconnect_events_are_accepted_quietly(h: Harness) -> None:
    h.portal("access_authorization_expiry_updated", {"client_id": "c", "resource_id": "r", "expires_at": 1})
    h.portal("disconnect", {"reason": "other"})
    assert h.loop.drops.total() == 0 and h.pushed == [] and h.state.calls == []
