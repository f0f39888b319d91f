"""The dev portal brokering a client and a gateway (docs/protocol.md §2.3), both played by raw WebSockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from lab.portal import DevPortal, relay_credentials
from lab.portal.config import ice_credentials, load_config, preshared_key

pytestmark = pytest.mark.timeout(30)

GATEWAY_TOKEN = "site-token"
CLIENT_TOKEN = "client-token"
CONFIG: dict[str, Any] = {
    "relay_secret": "relay-secret",
    "authorization_timeout": 0.5,
    "sites": [{"id": "site-1", "name": "one"}, {"id": "site-2"}],
    "gateways": [
        {"token": GATEWAY_TOKEN, "site_id": "site-1", "ipv4": "100.64.0.10", "ipv6": "fd00:2021:1111::a"},
        {"token": "other-site-token", "site_id": "site-2"},
    ],
    "resources": [
        {"id": "res-lan", "type": "cidr", "name": "LAN", "address": "172.20.0.0/16", "site_id": "site-1"},
        {"id": "res-far", "type": "cidr", "name": "Far", "address": "10.9.0.0/16", "site_id": "site-2"},
    ],
    "clients": [
        {
            "id": "client-1",
            "token": CLIENT_TOKEN,
            "public_key": "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM=",
            "ipv4": "100.93.74.51",
            "ipv6": "fd00:2021:1111::f:853b",
        }
    ],
    "relays": [{"id": "relay-1", "addrs": ["127.0.0.1:3478"]}],
}
CANDIDATE = "candidate:1 1 udp 2130706431 10.2.0.2 52625 typ host"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
async def portal() -> AsyncIterator[DevPortal]:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as running:
        yield running


class Peer:
    """One side's socket: sends with increasing refs, keeps pushes and replies apart."""

    def __init__(self, ws: ClientConnection, topic: str) -> None:
        self.ws = ws
        self.topic = topic
        self.ref = 0
        self.pushes: list[dict[str, Any]] = []

    async def send(self, event: str, payload: Any) -> int:
        self.ref += 1
        await self.ws.send(json.dumps({"topic": self.topic, "event": event, "payload": payload, "ref": self.ref}))
        return self.ref

    async def reply(self, ref: int) -> dict[str, Any]:
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
            if frame["event"] == "phx_reply" and frame["ref"] == ref:
                response: dict[str, Any] = frame["payload"]
                return response
            self.pushes.append(frame)

    async def push(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next push named ``event`` (others are kept in ``pushes``)."""
        for index, frame in enumerate(self.pushes):
            if frame["event"] == event:
                del self.pushes[index]
                payload: dict[str, Any] = frame["payload"]
                return payload
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            if frame["event"] == event:
                assert frame["topic"] == self.topic and frame["ref"] is None
                result: dict[str, Any] = frame["payload"]
                return result
            self.pushes.append(frame)

    async def join(self) -> dict[str, Any]:
        ref = await self.send("phx_join", {})
        assert (await self.reply(ref))["status"] == "ok"
        return await self.push("init")


def gateway_socket(portal: DevPortal, key: str, token: str = GATEWAY_TOKEN, external_id: str = "gw-1") -> Any:
    query = urlencode({"external_id": external_id, "name": external_id, "public_key": key})
    return connect(
        f"{portal.url}/gateway/v2/websocket?{query}",
        additional_headers={"X-Authorization": f"Bearer {token}"},
        open_timeout=5,
    )


def client_socket(portal: DevPortal, key: str, token: str = CLIENT_TOKEN) -> Any:
    return connect(
        f"{portal.url}/client/websocket?{urlencode({'public_key': key})}",
        additional_headers={"X-Authorization": f"Bearer {token}"},
        open_timeout=5,
    )


async def test_client_init_has_its_addresses_resources_and_relays(portal: DevPortal) -> None:
    key = new_key()
    async with client_socket(portal, key) as ws:
        init = await Peer(ws, "client").join()
        assert portal.clients()[0]["public_key"] == key and portal.clients()[0]["connected"]
    assert init["interface"] == {"ipv4": "100.93.74.51", "ipv6": "fd00:2021:1111::f:853b"}
    assert [r["id"] for r in init["resources"]] == ["res-lan", "res-far"]
    assert init["resources"][0]["sites"] == [{"id": "site-1", "name": "one"}]
    username, password = relay_credentials(key, "relay-secret")
    assert [(r["username"], r["password"]) for r in init["relays"]] == [(username, password)]


@pytest.mark.parametrize(
    ("token", "key", "status"),
    [(None, new_key(), 401), ("wrong", new_key(), 401), (CLIENT_TOKEN, "short", 400)],
)
async def test_client_upgrade_is_checked(portal: DevPortal, token: str | None, key: str, status: int) -> None:
    headers = {"X-Authorization": f"Bearer {token}"} if token else {}
    url = f"{portal.url}/client/websocket?{urlencode({'public_key': key})}"
    with pytest.raises(websockets.InvalidStatus) as raised:
        async with connect(url, additional_headers=headers, open_timeout=5):
            pass
    assert raised.value.response.status_code == status


async def test_a_second_socket_of_the_same_client_is_refused(portal: DevPortal) -> None:
    async with client_socket(portal, new_key()) as ws:
        await Peer(ws, "client").join()
        with pytest.raises(websockets.InvalidStatus) as raised:
            async with client_socket(portal, new_key()):
                pass
        assert raised.value.response.status_code == 409


async def test_create_flow_is_brokered_through_a_gateway_of_the_site(portal: DevPortal) -> None:
    gateway_key, client_key = new_key(), new_key()
    async with gateway_socket(portal, gateway_key) as gws, client_socket(portal, client_key) as cws:
        gateway, client = Peer(gws, "gateway"), Peer(cws, "client")
        await gateway.join()
        await client.join()
        ref = await client.send("create_flow", {"resource_id": "res-lan", "connected_gateway_ids": []})
        assert (await client.reply(ref))["status"] == "ok"

        authorization = await gateway.push("create_authorization")
        gateway_id = portal.session().gateway_id
        client_creds, gateway_creds = ice_credentials("client-1", client_key, gateway_id, gateway_key)
        assert authorization["client_ice_credentials"] == client_creds
        assert authorization["gateway_ice_credentials"] == gateway_creds
        assert authorization["client"]["public_key"] == client_key and authorization["resource"]["id"] == "res-lan"
        config = load_config(CONFIG)
        psk = preshared_key(
            "client-1",
            config.psk_base("client-1"),
            client_key,
            gateway_id,
            config.psk_base(gateway_id),
            gateway_key,
        )
        assert authorization["client"]["preshared_key"] == psk
        [flow] = portal.flows()
        assert flow.state == "pending" and flow.gateway_id == gateway_id

        # The gateway announces its candidates before it confirms (§2.3 step 3): they reach the client already.
        await gateway.send("broadcast_ice_candidates", {"client_ids": ["client-1"], "candidates": [CANDIDATE]})
        assert await client.push("ice_candidates") == {"gateway_id": gateway_id, "candidates": [CANDIDATE]}
        ref = await gateway.send("authorization_created", {"ref": authorization["ref"]})
        assert (await gateway.reply(ref))["status"] == "ok"

        created = await client.push("flow_created")
        assert created == {
            "resource_id": "res-lan",
            "gateway_id": gateway_id,
            "site_id": "site-1",
            "gateway_public_key": gateway_key,
            "gateway_ipv4": "100.64.0.10",
            "gateway_ipv6": "fd00:2021:1111::a",
            "preshared_key": psk,
            "client_ice_credentials": client_creds,
            "gateway_ice_credentials": gateway_creds,
            "relays": portal.config.relay_entries(client_key),
        }
        assert portal.flows()[0].state == "created" and portal.flows()[0].flow_created == created
        await portal.wait_for(kind="sent", event="flow_created", client="client-1")

        # Candidates both ways after the flow exists.
        await client.send("broadcast_ice_candidates", {"gateway_ids": [gateway_id], "candidates": [CANDIDATE]})
        assert await gateway.push("ice_candidates") == {"client_id": "client-1", "candidates": [CANDIDATE]}
        await client.send(
            "broadcast_invalidated_ice_candidates", {"gateway_ids": [gateway_id], "candidates": [CANDIDATE]}
        )
        assert await gateway.push("invalidate_ice_candidates") == {"client_id": "client-1", "candidates": [CANDIDATE]}
        payload = {"client_ids": ["client-1"], "candidates": [CANDIDATE]}
        await gateway.send("broadcast_invalidated_ice_candidates", payload)
        assert await client.push("invalidate_ice_candidates") == {"gateway_id": gateway_id, "candidates": [CANDIDATE]}


async def test_candidates_for_peers_without_a_flow_are_not_forwarded(portal: DevPortal) -> None:
    async with gateway_socket(portal, new_key()) as gws, client_socket(portal, new_key()) as cws:
        gateway, client = Peer(gws, "gateway"), Peer(cws, "client")
        await gateway.join()
        await client.join()
        gateway_id = portal.session().gateway_id
        ref = await client.send("broadcast_ice_candidates", {"gateway_ids": [gateway_id], "candidates": [CANDIDATE]})
        assert (await client.reply(ref))["status"] == "ok"
        ref = await gateway.send("broadcast_ice_candidates", {"client_ids": ["client-1"], "candidates": [CANDIDATE]})
        assert (await gateway.reply(ref))["status"] == "ok"
        ref = await client.send("broadcast_ice_candidates", {"gateway_ids": "nonsense", "candidates": [1, None]})
        assert (await client.reply(ref))["status"] == "ok"
        with pytest.raises(TimeoutError):
            await gateway.push("ice_candidates", timeout=0.3)
        with pytest.raises(TimeoutError):
            await client.push("ice_candidates", timeout=0.3)


async def test_no_relays_from_the_gateway_gets_it_relays_and_fails_no_flow() -> None:
    # As the real portal (docs/protocol.md §2.3): the gateway gets relays_presence and nothing else happens; the client,
    # unanswered, asks again and the gateway (with relays now) confirms. A long timeout: no flow may time out here.
    async with DevPortal({**CONFIG, "authorization_timeout": 30}, host="127.0.0.1", port=0) as portal:
        async with gateway_socket(portal, new_key()) as gws, client_socket(portal, new_key()) as cws:
            gateway, client = Peer(gws, "gateway"), Peer(cws, "client")
            await gateway.join()
            await client.join()
            await client.send("create_flow", {"resource_id": "res-lan"})
            first = await gateway.push("create_authorization")
            await gateway.send("no_relays", {})
            presence = await gateway.push("relays_presence")
            assert presence["disconnected_ids"] == [] and presence["connected"]
            assert [f.state for f in portal.flows()] == ["pending"]

            await client.send("create_flow", {"resource_id": "res-lan"})
            second = await gateway.push("create_authorization")
            assert second["ref"] != first["ref"]
            ref = await gateway.send("authorization_created", {"ref": second["ref"]})
            assert (await gateway.reply(ref))["status"] == "ok"
            created = await client.push("flow_created")
            assert created["resource_id"] == "res-lan"
            assert [f["event"] for f in client.pushes if f["event"].startswith("flow_")] == []
            assert [(f.state, f.reason) for f in portal.flows()] == [("superseded", "asked again"), ("created", None)]


async def test_no_relays_from_a_client_gets_it_relays_for_its_key(portal: DevPortal) -> None:
    key = new_key()
    async with client_socket(portal, key) as cws:
        client = Peer(cws, "client")
        await client.join()
        ref = await client.send("no_relays", {})
        assert (await client.reply(ref))["status"] == "ok"
        presence = await client.push("relays_presence")
    username, password = relay_credentials(key, "relay-secret")
    assert presence["disconnected_ids"] == []
    assert [(r["id"], r["username"], r["password"]) for r in presence["connected"]] == [("relay-1", username, password)]


async def test_asking_again_replaces_the_pending_request_and_its_timeout(portal: DevPortal) -> None:
    # The real portal keeps one request per (client, resource): a second ask cancels the first one's timer, so the
    # client hears about the resource once (here: offline, after the second ask's timeout).
    async with gateway_socket(portal, new_key()) as gws, client_socket(portal, new_key()) as cws:
        gateway, client = Peer(gws, "gateway"), Peer(cws, "client")
        await gateway.join()
        await client.join()
        await client.send("create_flow", {"resource_id": "res-lan"})
        first = await gateway.push("create_authorization")
        await client.send("create_flow", {"resource_id": "res-lan"})
        await gateway.push("create_authorization")
        earlier, latest = portal.flows()
        assert (earlier.state, earlier.timer, latest.state) == ("superseded", None, "pending")
        assert await client.push("flow_creation_failed") == {"resource_id": "res-lan", "reason": "offline"}
        with pytest.raises(TimeoutError):
            await client.push("flow_creation_failed", timeout=0.8)
        # The superseded ref is still the gateway's to confirm: acknowledged, and the client hears nothing.
        ref = await gateway.send("authorization_created", {"ref": first["ref"]})
        assert (await gateway.reply(ref))["status"] == "ok"
        with pytest.raises(TimeoutError):
            await client.push("flow_created", timeout=0.3)
        assert [(f.state, f.reason) for f in portal.flows()] == [("superseded", "asked again"), ("failed", "offline")]


async def test_requests_for_different_resources_stay_apart(portal: DevPortal) -> None:
    async with gateway_socket(portal, new_key()) as gws, client_socket(portal, new_key()) as cws:
        gateway, client = Peer(gws, "gateway"), Peer(cws, "client")
        await gateway.join()
        await client.join()
        await client.send("create_flow", {"resource_id": "res-lan"})
        await gateway.push("create_authorization")
        await client.send("create_flow", {"resource_id": "res-far"})  # site-2 has no gateway: offline at once
        assert await client.push("flow_creation_failed") == {"resource_id": "res-far", "reason": "offline"}
        assert [(f.resource_id, f.state) for f in portal.flows()] == [("res-lan", "pending"), ("res-far", "failed")]


async def test_a_silent_gateway_fails_the_flow_after_the_timeout(portal: DevPortal) -> None:
    async with gateway_socket(portal, new_key()) as gws, client_socket(portal, new_key()) as cws:
        gateway, client = Peer(gws, "gateway"), Peer(cws, "client")
        await gateway.join()
        await client.join()
        await client.send("create_flow", {"resource_id": "res-lan"})
        authorization = await gateway.push("create_authorization")
        assert await client.push("flow_creation_failed") == {"resource_id": "res-lan", "reason": "offline"}
        # A late confirmation is still a valid ref for the gateway, but the client hears nothing more.
        ref = await gateway.send("authorization_created", {"ref": authorization["ref"]})
        assert (await gateway.reply(ref))["status"] == "ok"
        with pytest.raises(TimeoutError):
            await client.push("flow_created", timeout=0.3)
        assert (await portal.wait_for_flow("res-lan")).reason == "offline"


async def test_a_gateway_that_leaves_fails_its_pending_flows(portal: DevPortal) -> None:
    async with client_socket(portal, new_key()) as cws:
        client = Peer(cws, "client")
        await client.join()
        async with gateway_socket(portal, new_key()) as gws:
            gateway = Peer(gws, "gateway")
            await gateway.join()
            await client.send("create_flow", {"resource_id": "res-lan"})
            await gateway.push("create_authorization")
        assert await client.push("flow_creation_failed", timeout=2) == {"resource_id": "res-lan", "reason": "offline"}


@pytest.mark.parametrize(("resource_id", "reason"), [("res-far", "offline"), ("res-nope", "not_found")])
async def test_flows_without_a_gateway_or_resource_fail_at_once(
    portal: DevPortal, resource_id: str, reason: str
) -> None:
    async with gateway_socket(portal, new_key()) as gws, client_socket(portal, new_key()) as cws:
        await Peer(gws, "gateway").join()  # a gateway of site-1 only: res-far's site has none
        client = Peer(cws, "client")
        await client.join()
        ref = await client.send("create_flow", {"resource_id": resource_id})
        assert (await client.reply(ref))["status"] == "ok"
        assert await client.push("flow_creation_failed", timeout=1) == {"resource_id": resource_id, "reason": reason}
        ref = await client.send("create_flow", {"resource": 1})
        assert (await client.reply(ref)) == {"status": "error", "response": {"reason": "invalid_payload"}}


async def test_the_gateway_the_client_already_uses_is_preferred(portal: DevPortal) -> None:
    async with (
        gateway_socket(portal, new_key(), external_id="gw-a") as a,
        gateway_socket(portal, new_key(), external_id="gw-b") as b,
        client_socket(portal, new_key()) as cws,
    ):
        await Peer(a, "gateway").join()
        gateway_b = Peer(b, "gateway")
        await gateway_b.join()
        client = Peer(cws, "client")
        await client.join()
        b_id = portal.session("gw-b").gateway_id
        await client.send("create_flow", {"resource_id": "res-lan", "connected_gateway_ids": [b_id]})
        await gateway_b.push("create_authorization")
        assert portal.flows()[0].gateway_id == b_id


async def test_admin_lists_clients_and_flows(portal: DevPortal) -> None:
    async with client_socket(portal, new_key()) as cws:
        client = Peer(cws, "client")
        await client.join()
        await client.send("create_flow", {"resource_id": "res-lan"})
        await client.push("flow_creation_failed")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{portal.admin_url}/clients") as response:
                [listed] = (await response.json())["clients"]
            async with http.get(f"{portal.admin_url}/flows", params={"client": "client-1"}) as response:
                [flow] = (await response.json())["flows"]
    assert listed["client_id"] == "client-1" and listed["connected"]
    assert (flow["resource_id"], flow["state"], flow["reason"]) == ("res-lan", "failed", "offline")


async def test_the_portal_serves_on_a_socket_made_by_the_caller() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    portal = DevPortal(CONFIG)
    await portal.start(sock=listener)
    try:
        assert portal.url == f"ws://127.0.0.1:{port}"
        async with client_socket(portal, new_key()) as cws:
            assert (await Peer(cws, "client").join())["interface"]["ipv4"] == "100.93.74.51"
    finally:
        await portal.stop()
    assert listener.fileno() == -1 or not portal.running
