"""The headless lab client's unanswered ``create_flow`` requests against the dev portal on loopback: asked again as
Firezone's client does when the gateway could not confirm (``no_relays``), and given up when nothing ever answers (the
data plane stubbed out; a short request schedule instead of 3/7/15 s). A client out of relays asks the portal for
relays, as Firezone's client does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from dataplane.node import NoRelays
from lab.client import HeadlessClient
from lab.portal import DevPortal
from lab.portal_channel import FlowRequests, FlowRequestTimer
from tests.unit.test_lab_client import CONFIG, emitted
from tests.unit.test_lab_client_rejoin import joined_gateway, running_client, until

pytestmark = pytest.mark.timeout(30)


def quick_requests(client: HeadlessClient, *, answer_timeout: float = 20.0) -> None:
    """Asks again 0.1 s after the first ask (and no more); gives up ``answer_timeout`` after the last ask."""
    client.flow_requests = FlowRequests(demand_offsets=(0.0, 0.1), spacing=0.05, answer_timeout=answer_timeout)
    client.flow_request_timer = FlowRequestTimer(client.loop, client.flow_requests, client.on_flow_requests_due)


async def gateway_says(gateway: ClientConnection, event: str, payload: dict[str, Any], ref: int) -> None:
    await gateway.send(json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": ref}))


async def test_a_gateway_without_relays_is_asked_again_and_then_confirms(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with DevPortal({**CONFIG, "authorization_timeout": 30}, host="127.0.0.1", port=0) as portal:
        async with joined_gateway(portal) as gateway, running_client(portal, monkeypatch, "res-lan") as client:
            quick_requests(client)
            first = await portal.wait_for(kind="sent", event="create_authorization")
            await gateway_says(gateway, "no_relays", {}, 1)
            await portal.wait_for(kind="sent", event="relays_presence", since=first.seq)
            second = await portal.wait_for(kind="sent", event="create_authorization", since=first.seq + 1)
            await gateway_says(gateway, "authorization_created", {"ref": second.payload["ref"]}, 2)
            await portal.wait_for(kind="sent", event="flow_created")
            await until(lambda: bool(client.flows))
            assert not client.flow_requests
    events = [e for e in emitted(capsys) if e["event"].startswith("flow_")]
    assert [e["event"] for e in events] == ["flow_retry", "flow_created"], events
    assert events[0] == {"event": "flow_retry", "resource_id": "res-lan", "reason": "unanswered", "attempt": 1}
    assert [(f.state, f.reason) for f in portal.flows()] == [("superseded", "asked again"), ("created", None)]


async def test_a_request_nothing_answers_ends_as_unanswered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A portal that never answers (its timeout far away, the gateway silent): the client does not wait forever.
    async with DevPortal({**CONFIG, "authorization_timeout": 60}, host="127.0.0.1", port=0) as portal:
        async with joined_gateway(portal), running_client(portal, monkeypatch, "res-lan") as client:
            quick_requests(client, answer_timeout=0.3)
            await portal.wait_for(kind="sent", event="create_authorization")
            await until(lambda: client.initialised and not client.flow_requests)
            assert [f.state for f in portal.flows()] == ["superseded", "pending"]
    events = [e for e in emitted(capsys) if e["event"].startswith("flow_")]
    assert [e["event"] for e in events] == ["flow_retry", "flow_creation_failed"], events
    assert events[1] == {"event": "flow_creation_failed", "resource_id": "res-lan", "reason": "unanswered"}


async def test_a_failure_from_the_portal_ends_the_request_without_asking_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        async with running_client(portal, monkeypatch, "res-lan") as client:  # no gateway: offline at once
            quick_requests(client, answer_timeout=0.3)
            await portal.wait_for(kind="sent", event="flow_creation_failed")
            await until(lambda: client.initialised and not client.flow_requests)
            client.request("res-lan")  # wanted again later: a new request, asked at once
            await until(lambda: len(portal.flows()) == 2 and portal.flows()[1].state == "failed")
    events = [e for e in emitted(capsys) if e["event"].startswith("flow_")]
    assert [(e["event"], e.get("reason")) for e in events] == [("flow_creation_failed", "offline")] * 2, events


async def test_a_client_out_of_relays_tells_the_portal_and_gets_relays(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        async with running_client(portal, monkeypatch) as client:
            await portal.wait_for(kind="sent", event="init", client="client-1")
            await until(lambda: client.initialised and client.portal.joined)
            since = portal.next_seq
            client.on_node_event(NoRelays())
            await portal.wait_for(since=since, kind="received", event="no_relays", client="client-1")
            presence = await portal.wait_for(since=since, kind="sent", event="relays_presence", client="client-1")
            assert presence.payload["connected"]
    assert [e["event"] for e in emitted(capsys)].count("no_relays") == 1
