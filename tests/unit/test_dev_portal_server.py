"""The dev portal over loopback, driven by a raw WebSocket client and the admin API (no gateway involved)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from lab.portal import AdminError, DevPortal, Faults, relay_credentials, wire
from lab.portal.config import ice_credentials

pytestmark = pytest.mark.timeout(30)

SITE_TOKEN = "site-token"
PINNED_TOKEN = "pinned-token"
CLIENT_KEY = "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM="
CONFIG: dict[str, Any] = {
    "relay_secret": "relay-secret",
    "sites": [{"id": "site-1"}],
    "gateways": [
        {"token": SITE_TOKEN, "site_id": "site-1", "ipv4": "100.64.0.10", "ipv6": "fd00:2021:1111::a"},
        {
            "token": PINNED_TOKEN,
            "site_id": "site-1",
            "external_id": "pinned-gw",
            "id": "11111111-2222-4333-8444-555555555555",
        },
    ],
    "resources": [
        {"id": "res-cidr", "type": "cidr", "name": "LAN", "address": "172.20.0.0/16", "site_id": "site-1"},
        {
            "id": "res-dns",
            "type": "dns",
            "name": "Wiki",
            "address": "*.corp.example",
            "filters": [{"protocol": "icmp"}],
        },
    ],
    "clients": [{"id": "client-1", "public_key": CLIENT_KEY, "ipv4": "100.93.74.51", "ipv6": "fd00:2021:1111::f:853b"}],
    "relays": [{"id": "relay-1", "addrs": ["127.0.0.1:3478", "[::1]:3478"]}],
    "authorizations": [{"client_id": "client-1", "resource_id": "res-cidr", "expires_at": None}],
}
USER_AGENT = "Debian/12 gateway/1.6.0 (x86_64; 6.1.0)"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
async def portal() -> AsyncIterator[DevPortal]:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as running:
        yield running


def socket_url(portal: DevPortal, *, path: str = "/gateway/v2/websocket", **params: str) -> str:
    query = {"external_id": "gw-1", "name": "gw-one", "public_key": new_key()}
    query.update(params)
    return f"{portal.url}{path}?{urlencode({k: v for k, v in query.items() if v is not None})}"


def open_socket(url: str, token: str | None = SITE_TOKEN) -> Any:
    headers = {"X-Authorization": f"Bearer {token}"} if token else {}
    return connect(url, additional_headers=headers, user_agent_header=USER_AGENT, open_timeout=5)


async def recv(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def send(ws: ClientConnection, topic: str, event: str, payload: Any, ref: Any) -> None:
    await ws.send(json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}))


async def join(ws: ClientConnection) -> dict[str, Any]:
    """Joins ``gateway`` with ref 0; returns the ``init`` payload."""
    await send(ws, "gateway", "phx_join", None, 0)
    assert await recv(ws) == {
        "topic": "gateway",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": 0,
    }
    init = await recv(ws)
    assert (init["topic"], init["event"], init["ref"]) == ("gateway", "init", None)
    payload: dict[str, Any] = init["payload"]
    return payload


async def test_join_is_answered_and_followed_by_init(portal: DevPortal) -> None:
    key = new_key()
    async with open_socket(socket_url(portal, public_key=key)) as ws:
        init = await join(ws)
    assert init["interface"] == {"ipv4": "100.64.0.10", "ipv6": "fd00:2021:1111::a"}
    username, password = relay_credentials(key, "relay-secret")
    assert [(r["id"], r["addr"]) for r in init["relays"]] == [("relay-1", "127.0.0.1:3478"), ("relay-1", "[::1]:3478")]
    assert all(r["username"] == username and r["password"] == password for r in init["relays"])
    assert init["authorizations"] == [{"client_id": "client-1", "resource_id": "res-cidr", "expires_at": None}]
    assert init["account_slug"] == "dev"
    assert set(init["flow_logs"]) == {"api_url", "upload_interval_secs", "upload_batch_size"}
    assert init["config"] == {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True}


async def test_connection_details_are_recorded(portal: DevPortal) -> None:
    key = new_key()
    async with open_socket(socket_url(portal, public_key=key, external_id="ext-9", name="edge")) as ws:
        await join(ws)
        [gateway] = portal.gateways()
    assert gateway["external_id"] == "ext-9" and gateway["name"] == "edge" and gateway["public_key"] == key
    assert gateway["user_agent"] == USER_AGENT and gateway["version"] == "1.6.0"
    assert gateway["connected"] and gateway["joined"] and gateway["socket"] == "v2"
    assert SITE_TOKEN not in json.dumps(portal.gateways())


async def test_firezone_id_is_accepted_for_external_id(portal: DevPortal) -> None:
    url = socket_url(portal, external_id=None, firezone_id="legacy-id")  # type: ignore[arg-type]
    async with open_socket(url) as ws:
        await join(ws)
        assert portal.session().external_id == "legacy-id"


async def test_heartbeats_are_answered_unless_the_fault_is_on(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        await send(ws, "phoenix", "heartbeat", {}, 1)
        assert await recv(ws) == {
            "topic": "phoenix",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": 1,
        }
        portal.faults.answer_heartbeats = False
        await send(ws, "phoenix", "heartbeat", {}, 2)
        await portal.wait_for(kind="received", event="heartbeat", predicate=lambda e: e.ref == 2)
        portal.faults.answer_heartbeats = True
        await send(ws, "phoenix", "heartbeat", {}, 3)
        assert (await recv(ws))["ref"] == 3  # frames are ordered: ref 2 got no reply


async def test_unmatched_topics_and_unknown_events_get_error_replies(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await send(ws, "gateway", "set_snownet_capabilities", {"iceless": False}, 0)
        assert (await recv(ws))["payload"] == {"status": "error", "response": {"reason": "unmatched topic"}}
        await join_with_ref(ws, "room:lobby", 1, expect_ok=False)
        await send(ws, "gateway", "phx_join", None, 2)
        assert (await recv(ws))["payload"]["status"] == "ok"
        await recv(ws)  # init
        await send(ws, "gateway", "what_is_this", {}, 3)
        assert await recv(ws) == {
            "topic": "gateway",
            "event": "phx_reply",
            "payload": {"status": "error", "response": {"reason": "unknown_message"}},
            "ref": 3,
        }
        await send(ws, "gateway", "set_snownet_capabilities", {"iceless": False}, 4)
        assert await recv(ws) == {
            "topic": "gateway",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": 4,
        }


async def join_with_ref(ws: ClientConnection, topic: str, ref: int, *, expect_ok: bool) -> None:
    await send(ws, topic, "phx_join", {}, ref)
    answer = await recv(ws)
    assert answer["ref"] == ref and answer["topic"] == topic
    if expect_ok:
        assert answer["payload"]["status"] == "ok"
    else:
        assert answer["payload"] == {"status": "error", "response": {"reason": "unmatched topic"}}


async def test_undecodable_frames_are_logged_and_the_socket_stays(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        since = portal.next_seq
        for garbage in ["not json", "[1,2]", '{"topic": 5, "event": "x", "payload": {}, "ref": 1}', '{"topic": "a"}']:
            await ws.send(garbage)
        await ws.send(b"\x00binary")
        await send(ws, "phoenix", "heartbeat", {}, 9)
        assert (await recv(ws))["ref"] == 9
        assert len(portal.events(since=since, kind="invalid")) == 5


async def test_authorization_round_trip_and_ref_checking(portal: DevPortal) -> None:
    key = new_key()
    async with open_socket(socket_url(portal, public_key=key)) as ws:
        await join(ws)
        pushed = await portal.create_authorization("client-1", "res-cidr", expires_at=None)
        frame = await recv(ws)
        assert (frame["event"], frame["ref"], frame["payload"]) == ("create_authorization", None, pushed)
        session = portal.session()
        client_creds, gateway_creds = ice_credentials("client-1", CLIENT_KEY, session.gateway_id, key)
        assert pushed["client_ice_credentials"] == client_creds
        assert pushed["gateway_ice_credentials"] == gateway_creds
        assert pushed["resource"] == {
            "id": "res-cidr",
            "type": "cidr",
            "name": "LAN",
            "address": "172.20.0.0/16",
            "filters": [],
        }
        assert pushed["client"]["public_key"] == CLIENT_KEY and pushed["client"]["ipv4"] == "100.93.74.51"
        assert len(base64.b64decode(pushed["client"]["preshared_key"])) == 32
        assert pushed["expires_at"] is None and pushed["use_iceless"] is False
        assert pushed["ref"].startswith("SFMyNTY.") and pushed["flow_logs_ingest_token"].count(".") == 2

        await send(ws, "gateway", "authorization_created", {"ref": pushed["ref"]}, 1)
        assert (await recv(ws))["payload"] == {"status": "ok", "response": {}}
        await send(ws, "gateway", "authorization_created", {"ref": pushed["ref"] + "x"}, 2)
        assert (await recv(ws))["payload"] == {"status": "error", "response": {"reason": "invalid_ref"}}
        await send(ws, "gateway", "flow_authorized", {"ref": pushed["ref"]}, 3)
        assert (await recv(ws))["payload"]["response"] == {"reason": "unknown_message"}


async def test_legacy_socket_uses_the_v1_event_names(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal, path="/gateway/websocket")) as ws:
        await join(ws)
        pushed = await portal.create_authorization("client-1", "res-dns")
        frame = await recv(ws)
        assert frame["event"] == "authorize_flow" and frame["payload"]["resource"]["filters"] == [{"protocol": "icmp"}]
        await send(ws, "gateway", "authorization_created", {"ref": pushed["ref"]}, 1)
        assert (await recv(ws))["payload"]["response"] == {"reason": "unknown_message"}
        await send(ws, "gateway", "flow_authorized", {"ref": pushed["ref"]}, 2)
        assert (await recv(ws))["payload"] == {"status": "ok", "response": {}}


async def test_no_relays_is_answered_with_relays_presence(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        await send(ws, "gateway", "no_relays", {}, 1)
        assert (await recv(ws))["payload"]["status"] == "ok"
        presence = await recv(ws)
        assert presence["event"] == "relays_presence" and presence["payload"]["disconnected_ids"] == []
        assert {r["id"] for r in presence["payload"]["connected"]} == {"relay-1"}


async def test_operator_pushes(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        await portal.reject_access("client-1", "res-cidr")
        assert (await recv(ws))["payload"] == {"client_id": "client-1", "resource_id": "res-cidr"}
        await portal.resource_updated(
            "res-cidr", filters=[{"protocol": "udp", "port_range_start": 53, "port_range_end": 53}]
        )
        frame = await recv(ws)
        assert frame["event"] == "resource_updated" and frame["payload"]["filters"][0]["protocol"] == "udp"
        await portal.relays_presence(disconnected_ids=["relay-1"], connected=[])
        assert (await recv(ws))["payload"] == {"disconnected_ids": ["relay-1"], "connected": []}
        await portal.disconnect()
        assert (await recv(ws))["payload"] == {"reason": "token_expired"}
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
    closed = await portal.wait_for(kind="closed")
    assert closed.detail == "disconnect token_expired"


async def _upgrade_answer(portal: DevPortal, url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url.replace("ws://", "http://"), headers=headers) as response:
            body = await response.json(content_type=None)
            return response.status, body, response.headers


@pytest.mark.parametrize(
    ("params", "headers", "status", "code"),
    [
        ({}, {}, 401, "missing_token"),
        ({}, {"X-Authorization": "Bearer wrong"}, 401, "invalid_token"),
        ({"token": "wrong"}, {}, 401, "invalid_token"),
        ({"public_key": "c2hvcnQ="}, {"X-Authorization": f"Bearer {SITE_TOKEN}"}, 400, "invalid_connect_params"),
        ({"external_id": ""}, {"X-Authorization": f"Bearer {SITE_TOKEN}"}, 400, "invalid_connect_params"),
        ({"vsn": "3.0.0"}, {"X-Authorization": f"Bearer {SITE_TOKEN}"}, 400, "invalid_connect_params"),
        # Not base64 at all (a non-ASCII byte): no token, not a server error.
        ({}, {"Sec-WebSocket-Protocol": "phoenix, base64url.bearer.phx.\xe9"}, 401, "missing_token"),
    ],
)
async def test_rejected_upgrades_answer_problem_json(
    portal: DevPortal, params: dict[str, str], headers: dict[str, str], status: int, code: str
) -> None:
    answer_status, body, response_headers = await _upgrade_answer(portal, socket_url(portal, **params), headers)
    assert answer_status == status
    assert response_headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == status and body["code"] == code and body["title"] and body["detail"]
    rejected = portal.events(kind="rejected")
    assert [e.status for e in rejected] == [status]


async def test_token_query_parameter_is_the_fallback(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal, token=SITE_TOKEN), token=None) as ws:
        await join(ws)
    status, body, _ = await _upgrade_answer(
        portal, socket_url(portal, token=SITE_TOKEN), {"X-Authorization": "Bearer wrong"}
    )
    assert (status, body["code"]) == (401, "invalid_token")  # the header is checked first


async def test_second_live_socket_for_the_same_gateway_is_refused(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal, external_id="dup")) as first:
        await join(first)
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with open_socket(socket_url(portal, external_id="dup")):
                pass
        assert refused.value.response.status_code == 409
        assert json.loads(refused.value.response.body or b"{}")["code"] == "gateway_already_connected"
        async with open_socket(socket_url(portal, external_id="other")) as second:
            second_init = await join(second)
        first_ips = portal.gateways()[0]
        assert second_init["interface"]["ipv4"] != first_ips["ipv4"]
    async with open_socket(socket_url(portal, external_id="dup")) as again:
        assert (await join(again))["interface"]["ipv4"] == "100.64.0.10"  # stable per gateway


async def test_injected_rejections_carry_retry_after(portal: DevPortal) -> None:
    portal.faults.update(
        {"reject_remaining": 2, "reject_status": 503, "reject_code": "rate_limit", "reject_retry_after": "2"}
    )
    for _ in range(2):
        status, body, headers = await _upgrade_answer(
            portal, socket_url(portal), {"X-Authorization": f"Bearer {SITE_TOKEN}"}
        )
        assert (status, body["code"], headers["Retry-After"]) == (503, "rate_limit", "2")
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)


async def test_refused_connections_get_no_answer(portal: DevPortal) -> None:
    portal.faults.refuse_connections = True
    with pytest.raises((websockets.InvalidMessage, ConnectionError, EOFError)):
        async with open_socket(socket_url(portal)):
            pass
    assert portal.events(kind="refused")
    portal.faults.refuse_connections = False
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)


async def test_join_faults(portal: DevPortal) -> None:
    portal.faults.join_reply = "error"
    async with open_socket(socket_url(portal)) as ws:
        await send(ws, "gateway", "phx_join", None, 0)
        assert (await recv(ws))["payload"]["status"] == "error"
    portal.faults.join_reply = "ignore"
    async with open_socket(socket_url(portal)) as ws:
        await send(ws, "gateway", "phx_join", None, 0)
        await send(ws, "phoenix", "heartbeat", {}, 1)
        assert (await recv(ws))["ref"] == 1  # the join got no reply


async def test_drop_with_close_frame_and_with_abort(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        await portal.drop(code=1011)
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        await portal.drop(abort=True)
        with pytest.raises(websockets.ConnectionClosedError) as aborted:
            await recv(ws)
        assert aborted.value.rcvd is None
    assert [e.kind for e in portal.events(kind="closed")] == ["closed", "closed"]


async def test_idle_sockets_are_closed() -> None:
    async with DevPortal({**CONFIG, "idle_timeout": 0.3}) as portal:
        async with open_socket(socket_url(portal)) as ws:
            await join(ws)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert (await portal.wait_for(kind="closed")).detail == "idle timeout"


async def test_restart_on_the_same_port_keeps_the_world(portal: DevPortal) -> None:
    port = portal.port
    key = new_key()
    async with open_socket(socket_url(portal, public_key=key)) as ws:
        first = await join(ws)
        await portal.stop()
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
    assert not portal.running
    await portal.start()
    assert portal.port == port
    async with open_socket(socket_url(portal, public_key=key)) as ws:
        assert await join(ws) == first
    assert [g["connections"] for g in portal.gateways()] == [2]


async def test_v2_array_serializer(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal, vsn="2.0.0")) as ws:
        await ws.send(json.dumps(["3", "3", "gateway", "phx_join", {}]))
        assert await recv(ws) == ["3", "3", "gateway", "phx_reply", {"status": "ok", "response": {}}]
        join_ref, ref, topic, event, payload = await recv(ws)
        assert (join_ref, ref, topic, event) == ("3", None, "gateway", "init") and "interface" in payload
        await ws.send(json.dumps([None, "4", "phoenix", "heartbeat", {}]))
        assert await recv(ws) == [None, "4", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


async def test_admin_api_end_to_end(portal: DevPortal) -> None:
    key = new_key()
    async with (
        open_socket(socket_url(portal, public_key=key, external_id="adm")) as ws,
        aiohttp.ClientSession() as http,
    ):
        await join(ws)
        async with http.get(f"{portal.admin_url}/gateways") as response:
            [gateway] = (await response.json())["gateways"]
        assert gateway["external_id"] == "adm" and gateway["public_key"] == key and gateway["connected"]

        since = portal.next_seq
        body = {"client_id": "client-1", "resource_id": "res-cidr", "gateway": "adm"}
        async with http.post(f"{portal.admin_url}/create_authorization", json=body) as response:
            assert response.status == 200
            payload = await response.json()
        frame = await recv(ws)
        assert frame["payload"]["ref"] == payload["ref"]
        await send(ws, "gateway", "authorization_created", {"ref": payload["ref"]}, 1)
        await recv(ws)
        query = {"kind": "received", "event": "authorization_created", "since": str(since), "timeout": "5"}
        async with http.get(f"{portal.admin_url}/wait", params=query) as response:
            assert response.status == 200
            assert (await response.json())["event"]["payload"] == {"ref": payload["ref"]}
        async with http.get(f"{portal.admin_url}/wait", params={"event": "never", "timeout": "0.2"}) as response:
            assert response.status == 504
        async with http.get(f"{portal.admin_url}/events", params={"kind": "sent", "since": str(since)}) as response:
            events = (await response.json())["events"]
        assert [e["event"] for e in events] == ["create_authorization", "phx_reply"]

        async with http.post(f"{portal.admin_url}/raw", json={"text": "{oops"}) as response:
            assert response.status == 200
        assert await ws.recv() == "{oops"
        async with http.post(
            f"{portal.admin_url}/push", json={"event": "resource_updated", "payload": {"id": "x"}}
        ) as response:
            assert response.status == 200
        assert (await recv(ws))["payload"] == {"id": "x"}
        for path, payload_body in [
            ("init", {}),
            ("reject_access", {"client_id": "client-1", "resource_id": "res-cidr"}),
            ("resource_updated", {"resource_id": "res-dns"}),
            ("relays_presence", {"disconnected_ids": ["gone"]}),
        ]:
            async with http.post(f"{portal.admin_url}/{path}", json=payload_body) as response:
                assert response.status == 200, path
            assert (await recv(ws))["event"] == path

        async with http.post(f"{portal.admin_url}/faults", json={"answer_heartbeats": False}) as response:
            assert (await response.json())["answer_heartbeats"] is False
        async with http.post(f"{portal.admin_url}/faults", json={"no_such_fault": 1}) as response:
            assert response.status == 400
        async with http.post(
            f"{portal.admin_url}/create_authorization", json={**body, "client_id": "ghost"}
        ) as response:
            assert response.status == 404
        async with http.post(f"{portal.admin_url}/reject_access", json={**body, "gateway": "ghost"}) as response:
            assert response.status == 404
        async with http.post(f"{portal.admin_url}/drop", json={}) as response:
            assert response.status == 200
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)


def test_fault_changes_are_type_checked_and_atomic() -> None:
    faults = Faults()
    with pytest.raises(AdminError):
        faults.update({"answer_heartbeats": False, "reject_remaining": "3"})
    assert faults.answer_heartbeats is True  # nothing applied
    with pytest.raises(AdminError):
        faults.update({"join_reply": "maybe"})
    faults.update({"reject_retry_after": "Wed, 21 Oct 2015 07:28:00 GMT", "reject_remaining": 1})
    faults.update({"reject_retry_after": None})
    assert faults.reject_retry_after is None and faults.reject_remaining == 1


async def test_a_forgotten_join_answers_unmatched_topic_until_the_rejoin(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        portal.forget_join()
        await send(ws, "gateway", "set_snownet_capabilities", {"iceless": False}, 1)
        assert (await recv(ws))["payload"]["response"] == {"reason": "unmatched topic"}
        await portal.push("resource_updated", {"id": "x"}, joined=False)
        assert (await recv(ws))["event"] == "resource_updated"
        await send(ws, "gateway", "phx_join", None, 2)
        assert (await recv(ws))["payload"]["status"] == "ok"
        assert (await recv(ws))["event"] == "init"


async def test_writing_to_a_vanished_socket_is_reported_not_raised_raw(portal: DevPortal) -> None:
    async with open_socket(socket_url(portal)) as ws:
        await join(ws)
        session = portal.session()
    await portal.wait_for(kind="closed")
    with pytest.raises(AdminError):
        await portal.push("init", {})  # no live session any more
    with pytest.raises(AdminError) as gone:
        await portal._send(session, wire.Frame(topic="gateway", event="x", payload={}, ref=None))
    assert gone.value.status == 409
    assert portal.events(kind="send_failed")


async def test_the_log_is_bounded_and_seqs_stay_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.portal import server

    monkeypatch.setattr(server, "MAX_LOGGED_EVENTS", 10)
    portal = DevPortal(CONFIG)
    for number in range(25):
        portal._record("sent", detail=str(number))
    assert portal.next_seq == 25
    kept = portal.events()
    assert len(kept) <= 10 and [e.seq for e in kept] == list(range(25 - len(kept), 25))
    assert [e.detail for e in portal.events(since=23)] == ["23", "24"]
    assert (await portal.wait_for(since=24, kind="sent", timeout=0.1)).detail == "24"
