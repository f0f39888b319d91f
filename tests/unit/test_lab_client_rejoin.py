"""The headless lab client across a portal restart: it backs off, rejoins, and keeps what it had (no namespaces: the
dev portal on loopback, the client's data plane stubbed out)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import ClientConnection, connect

from lab import client as lab_client
from lab.client import HeadlessClient, build_headless_parser
from lab.portal import DevPortal
from tests.unit.test_lab_client import CONFIG, emitted, ipv4_packet

pytestmark = pytest.mark.timeout(30)


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_client(
    portal: DevPortal, monkeypatch: pytest.MonkeyPatch, *resources: str
) -> AsyncIterator[HeadlessClient]:
    """A headless client (data plane stubbed out) holding its portal link until the block ends."""
    monkeypatch.setattr(lab_client, "run_ip", lambda arguments, check=True: None)
    monkeypatch.setattr(HeadlessClient, "start_data_plane", lambda self, ipv4, ipv6, relays: None)
    requests = [part for resource in resources for part in ("--resource", resource)]
    args = build_headless_parser().parse_args(["--portal", portal.url, "--token", "client-token", *requests])
    client = HeadlessClient(args)
    link = asyncio.create_task(client.run_portal())
    try:
        yield client
    finally:
        client.stop(0)
        link.cancel()
        await asyncio.gather(link, return_exceptions=True)
        client.close()


@contextlib.asynccontextmanager
async def joined_gateway(portal: DevPortal) -> AsyncIterator[ClientConnection]:
    """A raw gateway socket that has joined (and got its ``init``): the portal has a gateway to broker."""
    query = urlencode({"external_id": "gw", "public_key": base64.b64encode(os.urandom(32)).decode()})
    headers = {"X-Authorization": "Bearer gw-token"}
    async with connect(f"{portal.url}/gateway/v2/websocket?{query}", additional_headers=headers) as gateway:
        await gateway.send(json.dumps({"topic": "gateway", "event": "phx_join", "payload": {}, "ref": 0}))
        await portal.wait_for(kind="sent", event="init")
        yield gateway


async def restart(portal: DevPortal) -> None:
    """Stops the portal (every socket closed with 1001) and listens again on the same port a moment later."""
    await portal.stop()
    await asyncio.sleep(0.3)
    await portal.start()


async def test_a_restarted_portal_is_rejoined_and_the_flow_is_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        async with joined_gateway(portal) as gateway:
            async with running_client(portal, monkeypatch, "res-lan") as client:
                authorization = await portal.wait_for(kind="sent", event="create_authorization")
                created = {"ref": authorization.payload["ref"]}
                await gateway.send(
                    json.dumps({"topic": "gateway", "event": "authorization_created", "payload": created, "ref": 1})
                )
                await until(lambda: bool(client.flows))
                [gateway_id] = client.flows
                restarted_at = portal.next_seq
                await restart(portal)
                await portal.wait_for(since=restarted_at, kind="sent", event="init", client="client-1")
                await until(lambda: client.portal_lost_at is None)
                # Nothing was asked again: the flow, its routes and the gateway's connection stayed as they were.
                assert not portal.events(since=restarted_at, kind="received", event="create_flow")
                assert list(client.flows) == [gateway_id]
                assert client.routes.lookup(ipv4_packet("172.20.3.4")) == gateway_id
                assert not client.done.is_set()
    kinds = [e["event"] for e in emitted(capsys)]
    assert kinds[:2] == ["joined", "flow_created"], kinds
    assert "portal_lost" in kinds and kinds[-1] == "portal_rejoined", kinds
    assert "failed" not in kinds and kinds.count("joined") == 1, kinds


async def test_a_resource_asked_for_while_the_portal_is_away_is_asked_for_after_the_rejoin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        async with running_client(portal, monkeypatch) as client:
            await portal.wait_for(kind="sent", event="init", client="client-1")
            await until(lambda: client.initialised)
            await portal.stop()
            await until(lambda: client.portal_lost_at is not None)
            client.request("res-lan")  # no gateway is up: the portal will answer flow_creation_failed
            assert client.queued_requests == ["res-lan"] and not client.flow_requests
            restarted_at = portal.next_seq
            await portal.start()
            asked = await portal.wait_for(since=restarted_at, kind="received", event="create_flow", timeout=15)
            assert asked.payload["resource_id"] == "res-lan"
            await portal.wait_for(since=restarted_at, kind="sent", event="flow_creation_failed")
            await until(lambda: not client.flow_requests)
    events = emitted(capsys)
    lost = [e for e in events if e["event"] == "portal_lost"]
    assert lost and all(e["retry_seconds"] > 0 for e in lost), events
    assert [e["event"] for e in events if e["event"] in ("portal_rejoined", "flow_creation_failed")] == [
        "portal_rejoined",
        "flow_creation_failed",
    ], events


async def test_a_flow_the_portal_left_unanswered_is_asked_for_again_after_the_rejoin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        async with joined_gateway(portal):
            async with running_client(portal, monkeypatch, "res-lan") as client:
                # The gateway never answers create_authorization: the flow is pending when the portal stops.
                await portal.wait_for(kind="sent", event="create_authorization")
                assert client.flow_requests.resource_ids() == ["res-lan"]
                restarted_at = portal.next_seq
                await restart(portal)
                asked = await portal.wait_for(since=restarted_at, kind="received", event="create_flow", timeout=15)
                assert asked.payload["resource_id"] == "res-lan"
                assert not client.flows
