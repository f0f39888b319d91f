"""The dev portal speaks real Phoenix: the official Phoenix JavaScript client (npm ``phoenix``, ``ws`` transport) joins,
pushes and gets replies, heartbeats and receives ``init`` (script: lab/js/phoenix_conformance.js)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lab.portal import DevPortal
from tests.integration.helpers_gateway import GATEWAY_TOKEN, PORTAL_CONFIG

JS_DIR = Path(__file__).resolve().parents[2] / "lab" / "js"
SCRIPT = JS_DIR / "phoenix_conformance.js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        NODE is None or not (JS_DIR / "node_modules" / "phoenix").is_dir(),
        reason="node and lab/js/node_modules (make setup) are needed",
    ),
]

PUBLIC_KEY = base64.b64encode(bytes(range(1, 33))).decode()
USER_AGENT = "Node/20 gateway/1.6.0 (x86_64; phoenix-js)"


@pytest.fixture
async def portal() -> AsyncIterator[DevPortal]:
    async with DevPortal(PORTAL_CONFIG, host="127.0.0.1", port=0) as running:
        yield running


async def run_phoenix_js(
    portal: DevPortal, *, auth: str, vsn: str, external_id: str, token: str = GATEWAY_TOKEN
) -> dict[str, Any]:
    options = {
        "endpoint": f"{portal.url}/gateway/v2",  # Phoenix's Socket appends /websocket
        "auth": auth,
        "vsn": vsn,
        "token": token,
        "params": {"external_id": external_id, "name": f"js-{auth}", "public_key": PUBLIC_KEY},
        "headers": {"User-Agent": USER_AGENT},
    }
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(SCRIPT),
        json.dumps(options),
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().strip().splitlines()
    assert lines, f"no report from the Phoenix JS client; stderr: {stderr.decode()}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


@pytest.mark.parametrize(
    ("auth", "vsn"),
    [("header", "1.0.0"), ("query", "2.0.0"), ("subprotocol", "2.0.0")],
    ids=["v1-json-objects+x-authorization", "v2-arrays+token-param", "v2-arrays+phoenix-auth-token"],
)
async def test_official_phoenix_client_joins_pushes_and_heartbeats(portal: DevPortal, auth: str, vsn: str) -> None:
    external_id = f"phoenix-js-{auth}"
    report = await run_phoenix_js(portal, auth=auth, vsn=vsn, external_id=external_id)

    assert report["opened"] and report["socketErrors"] == []
    assert report["join"] == {} and report["joinError"] is None
    init = report["init"]
    assert init is not None and init["interface"]["ipv4"].startswith("100.")
    assert {relay["id"] for relay in init["relays"]} == {PORTAL_CONFIG["relays"][0]["id"]}
    assert report["pushReplies"]["set_snownet_capabilities"] == {"status": "ok", "response": {}}
    assert report["pushReplies"]["no_such_event"] == {"status": "error", "response": {"reason": "unknown_message"}}
    assert report["unmatchedJoin"] == {"status": "error", "response": {"reason": "unmatched topic"}}
    assert report["heartbeatReplies"] >= 3

    # The portal's side of the same conversation.
    [gateway] = portal.gateways()
    assert gateway["external_id"] == external_id and gateway["public_key"] == PUBLIC_KEY
    assert gateway["user_agent"] == USER_AGENT and gateway["version"] == "1.6.0" and gateway["vsn"] == vsn
    heartbeats = portal.events(kind="received", event="heartbeat")
    assert len(heartbeats) >= 3 and all(h.topic == "phoenix" and isinstance(h.ref, str) for h in heartbeats)
    replies = {e.ref for e in portal.events(kind="sent", event="phx_reply")}
    assert {h.ref for h in heartbeats} <= replies
    [init_sent] = portal.events(kind="sent", event="init")
    assert init_sent.ref is None and init_sent.payload == init
    capabilities = portal.events(kind="received", event="set_snownet_capabilities")
    assert [c.payload for c in capabilities] == [{"iceless": False}]


async def test_official_phoenix_client_is_refused_without_a_valid_token(portal: DevPortal) -> None:
    report = await run_phoenix_js(portal, auth="header", vsn="2.0.0", external_id="intruder", token="wrong-token")
    assert not report["opened"] and report["join"] is None
    assert any("401" in error for error in report["socketErrors"]), report["socketErrors"]
    [rejected] = portal.events(kind="rejected")
    assert rejected.status == 401 and rejected.detail is not None and rejected.detail.startswith("invalid_token")
