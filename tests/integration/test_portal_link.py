"""The gateway (a real ``firezone-gateway`` subprocess) against the in-process dev portal: issue 2's link behaviour.

Black box: the gateway is driven only through its environment, its health server and what the portal sees on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lab.portal import DevPortal, PortalEvent
from tests.integration.helpers_gateway import (
    CLIENT_ID,
    GATEWAY_TOKEN,
    RESOURCE_ID,
    GatewayProcess,
    portal_config,
    requires_gateway,
    run_gateway,
    wait_relay_measured,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60), requires_gateway]

FAST_HEARTBEAT = 0.5


@pytest.fixture
async def portal() -> AsyncIterator[DevPortal]:
    async with DevPortal(portal_config(), host="127.0.0.1", port=0) as running:
        yield running


async def _joined(portal: DevPortal, *, since: int = 0, timeout: float = 10.0) -> PortalEvent:
    """The next join the gateway sends (on any connection) after ``since``."""
    return await portal.wait_for(since=since, kind="received", event="phx_join", timeout=timeout)


async def test_join_then_init_applied_then_ready(portal: DevPortal, tmp_path: Path) -> None:
    portal.faults.push_init = False
    async with run_gateway(portal, tmp_path, heartbeat_interval=FAST_HEARTBEAT, name="gw-ready") as gateway:
        await gateway.wait_readyz(503)  # health server up before the portal link, not ready yet
        assert await gateway.healthz() == 200
        join = await _joined(portal)
        capabilities = await portal.wait_for(since=join.seq, kind="received", event="set_snownet_capabilities")
        # Joined, but init not applied: still not ready.
        assert await gateway.readyz() == 503

        session = portal.session()
        await portal.push("init", portal.init_payload(session))
        await gateway.wait_readyz(200)
        await gateway.wait_output("init applied")
        heartbeat = await portal.wait_for(since=join.seq, kind="received", event="heartbeat")
        metrics = await gateway.metrics()

    assert (join.topic, join.payload, join.ref) == ("gateway", None, 0)
    assert capabilities.payload == {"iceless": False} and isinstance(capabilities.ref, int) and capabilities.ref > 0
    assert heartbeat.topic == "phoenix" and heartbeat.payload == {} and isinstance(heartbeat.ref, int)
    assert "joined" in gateway.output()
    assert "firezone_" in metrics
    connected = portal.gateways()[0]
    assert connected["external_id"] == gateway.firezone_id and connected["name"] == "gw-ready"
    assert connected["socket"] == "v2" and connected["vsn"] == "1.0.0"
    assert connected["version"] and connected["version"][0].isdigit()
    assert f"gateway/{connected['version']}" in connected["user_agent"]
    assert len(base64.b64decode(connected["public_key"], validate=True)) == 32
    assert "token" not in connected["query"]


def _portal_connections_from_gateway(gateway: GatewayProcess, port: int) -> list[str]:
    """``ss`` lines of established TCP connections towards ``port`` in the gateway's namespace."""
    assert gateway.netns is not None
    listing = subprocess.run(
        ["ip", "netns", "exec", gateway.netns, "ss", "-tnHe", "state", "established", f"dport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listing.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")
async def test_portal_socket_carries_the_firezone_fwmark(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path) as gateway:
        await gateway.wait_readyz(200)
        connections = _portal_connections_from_gateway(gateway, portal.port)
    assert len(connections) == 1, connections
    assert re.search(r"\bfwmark:0xfd002021\b", connections[0]), connections[0]
    assert "SO_MARK" not in gateway.output()  # no "not permitted" warning when running as root


async def test_create_authorization_is_answered_with_the_same_ref(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path) as gateway:
        await gateway.wait_readyz(200)
        await wait_relay_measured(gateway)
        since = portal.next_seq
        pushed = await portal.create_authorization(CLIENT_ID, RESOURCE_ID)
        answer = await portal.wait_for(since=since, kind="received", event="authorization_created")
        reply = await portal.wait_for(since=answer.seq, kind="sent", event="phx_reply")
    assert answer.payload == {"ref": pushed["ref"]}
    assert reply.ref == answer.ref and reply.payload == {"status": "ok", "response": {}}


@pytest.mark.parametrize("abort", [False, True], ids=["close-frame", "tcp-abort"])
async def test_portal_drop_then_reconnect_within_the_backoff(portal: DevPortal, tmp_path: Path, abort: bool) -> None:
    async with run_gateway(portal, tmp_path) as gateway:
        await gateway.wait_readyz(200)
        first = portal.session()
        since = portal.next_seq
        await portal.drop(abort=abort)
        closed = await portal.wait_for(since=since, kind="closed", conn_id=first.conn_id)
        rejoin = await _joined(portal, since=closed.seq, timeout=10)
        await gateway.wait_readyz(200)
    assert rejoin.conn_id != first.conn_id
    # The first reconnect after a join waits 0.5 s with jitter (at least a quarter second under any jitter scheme,
    # at most twice the interval), plus the time to connect on a busy machine.
    connected = portal.events(since=closed.seq, kind="connected")[0]
    assert 0.25 <= connected.at - closed.at < 2.5
    assert portal.gateways()[0]["public_key"] == first.public_key  # same key within one process


async def test_portal_restart_on_the_same_port(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path) as gateway:
        await gateway.wait_readyz(200)
        port = portal.port
        await portal.stop()
        await gateway.wait_readyz(503)
        await asyncio.sleep(1.0)  # a real outage: some reconnect attempts find nothing listening
        since = portal.next_seq
        await portal.start()
        assert portal.port == port
        rejoin = await _joined(portal, since=since, timeout=20)
        await gateway.wait_readyz(200)
        capabilities = await portal.wait_for(since=rejoin.seq, kind="received", event="set_snownet_capabilities")
        assert gateway.running
    assert rejoin.ref == 0  # refs restart per connection
    assert capabilities.payload == {"iceless": False}  # after every join


async def test_phx_close_makes_the_gateway_reconnect(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path) as gateway:
        await gateway.wait_readyz(200)
        first = portal.session()
        since = portal.next_seq
        await portal.phx_close()
        rejoin = await _joined(portal, since=since)
        await gateway.wait_readyz(200)
    assert rejoin.conn_id != first.conn_id


async def test_unmatched_topic_makes_the_gateway_rejoin(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path) as gateway:
        await gateway.wait_readyz(200)
        session = portal.session()
        portal.forget_join()
        since = portal.next_seq
        payload = portal.authorization_payload(session, CLIENT_ID, RESOURCE_ID)
        await portal.push("create_authorization", payload, joined=False)
        refused = await portal.wait_for(
            since=since, kind="sent", event="phx_reply", predicate=lambda e: e.payload["status"] == "error"
        )
        rejoin = await _joined(portal, since=refused.seq)
        await gateway.wait_readyz(200)
    assert refused.payload["response"] == {"reason": "unmatched topic"}
    assert rejoin.conn_id == session.conn_id  # a re-join on the same socket, not a reconnect


async def test_join_timeout_reconnects(portal: DevPortal, tmp_path: Path) -> None:
    portal.faults.join_reply = "ignore"
    async with run_gateway(portal, tmp_path) as gateway:
        unanswered = await _joined(portal)
        portal.faults.join_reply = "ok"
        second = await _joined(portal, since=unanswered.seq + 1, timeout=15)
        await gateway.wait_readyz(200)
    assert second.conn_id != unanswered.conn_id
    assert second.at - unanswered.at >= 5.0 - 0.05  # the join timeout is 5 s


@pytest.mark.parametrize(
    "firezone_id",
    ["6f1c2b9e-3d4a-4c5b-8e7f-0a1b2c3d4e5f", "6F1C2B9E3D4A4C5B8E7F0A1B2C3D4E5F", "my-gateway-01"],
    ids=["uuid", "uuid-simple-upper", "not-a-uuid"],
)
async def test_external_id_hashes_uuid_ids(portal: DevPortal, tmp_path: Path, firezone_id: str) -> None:
    async with run_gateway(portal, tmp_path, firezone_id=firezone_id) as gateway:
        join = await _joined(portal)
        assert gateway.running
    is_uuid = firezone_id != "my-gateway-01"
    expected = hashlib.sha256(firezone_id.encode()).hexdigest() if is_uuid else firezone_id
    assert join.external_id == expected


async def test_http_api_url_is_normalised_to_ws(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path, api_url=portal.url.replace("ws://", "http://")) as gateway:
        await gateway.wait_readyz(200)
    assert portal.gateways()[0]["socket"] == "v2"


async def test_reconnect_budget_exhausted_exits_1(portal: DevPortal, tmp_path: Path) -> None:
    extra = {"FIREZONE_MAX_PARTITION_TIME": "3s"}
    async with run_gateway(portal, tmp_path, extra_env=extra) as gateway:
        await gateway.wait_readyz(200)
        await portal.stop()
        stopped = time.monotonic()
        code = await gateway.wait_exit(timeout=15)
        gave_up_after = time.monotonic() - stopped
    assert code == 1
    assert len([line for line in gateway.stderr.decode().splitlines() if line.startswith("error:")]) == 1
    # Delays 0.5, 0.75, 1.125 s (each up to doubled by jitter) until the next one would overrun the 3 s budget. No upper
    # bound here: a gateway that ignored the budget would not exit, and wait_exit's timeout catches that.
    assert gave_up_after >= 1.0


async def test_invalid_token_exits_1_with_a_clear_message(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path, token="not-the-token-3b1d") as gateway:
        code = await gateway.wait_exit(timeout=15)
    errors = [line for line in gateway.stderr.decode().splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(errors) == 1, gateway.output()
    assert "invalid" in errors[0].lower() and "token" in errors[0].lower()
    assert len(portal.events(kind="rejected")) == 1  # 401 is fatal: no retry
    assert "not-the-token-3b1d" not in gateway.output()


async def test_retry_after_is_honoured(portal: DevPortal, tmp_path: Path) -> None:
    portal.faults.update(
        {"reject_remaining": 1, "reject_status": 503, "reject_code": "rate_limit", "reject_retry_after": "2"}
    )
    async with run_gateway(portal, tmp_path) as gateway:
        rejected = await portal.wait_for(kind="rejected")
        second = await portal.wait_for(since=rejected.seq, kind="connected", timeout=15)
        await gateway.wait_readyz(200)
    assert rejected.status == 503
    # Without Retry-After the first-connect ladder would retry after 1 s.
    assert second.at - rejected.at >= 2.0 - 0.02


async def test_heartbeat_silence_reconnects(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path, heartbeat_interval=FAST_HEARTBEAT) as gateway:
        await gateway.wait_readyz(200)
        first = portal.session()
        portal.faults.answer_heartbeats = False
        closed = await portal.wait_for(kind="closed", conn_id=first.conn_id, timeout=15)
        portal.faults.answer_heartbeats = True
        await _joined(portal, since=closed.seq, timeout=10)
        await gateway.wait_readyz(200)
    answered = {e.ref for e in portal.events(kind="sent", event="phx_reply", conn_id=first.conn_id)}
    heartbeats = portal.events(kind="received", event="heartbeat", conn_id=first.conn_id)
    unanswered = [e for e in heartbeats if e.ref not in answered]
    # Like Firezone's phoenix-channel: the 4th heartbeat goes on the wire, and then the gateway gives up because more
    # than 3 are in flight; silence is not tolerated beyond that one.
    assert len(unanswered) == 4, [e.ref for e in unanswered]
    refs = [e.ref for e in unanswered]
    assert all(isinstance(ref, int) for ref in refs) and len(set(refs)) == 4, refs


async def test_malformed_frames_do_not_break_the_link(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path, heartbeat_interval=FAST_HEARTBEAT) as gateway:
        await gateway.wait_readyz(200)
        session = portal.session()
        garbage: list[str | bytes] = [
            "this is not json",
            "{",
            "[1, 2, 3]",
            "null",
            json.dumps({"topic": 7, "event": ["init"], "payload": "x", "ref": {}}),
            json.dumps({"topic": "gateway", "event": "init", "payload": "not an object", "ref": None}),
            json.dumps({"topic": "gateway", "event": "init", "payload": {"interface": 5}, "ref": None}),
            json.dumps({"topic": "gateway", "event": "create_authorization", "payload": {"ref": 5}, "ref": None}),
            json.dumps({"topic": "gateway", "event": "reject_access", "payload": [], "ref": None}),
            json.dumps({"topic": "gateway", "event": "surprise_event", "payload": {"a": 1}, "ref": None}),
            json.dumps({"topic": "elsewhere", "event": "init", "payload": {}, "ref": None}),
            json.dumps({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok"}, "ref": 99999}),
            b"\x00\x01binary",
            json.dumps(
                {
                    "topic": "gateway",
                    "event": "surprise_event",
                    "payload": {"blob": "x" * (1024 * 1024 - 80)},
                    "ref": None,
                }
            ),
            "x" * (1024 * 1024),
        ]
        for frame in garbage:
            await portal.send_raw(frame)
        since = portal.next_seq
        for _ in range(2):
            since = (await portal.wait_for(since=since, kind="received", event="heartbeat", timeout=10)).seq + 1
        pushed = await portal.create_authorization(CLIENT_ID, RESOURCE_ID)
        answer = await portal.wait_for(since=since, kind="received", event="authorization_created")
        assert gateway.running
        assert await gateway.readyz() == 200
        still = portal.session()
    assert answer.payload == {"ref": pushed["ref"]}
    assert still.conn_id == session.conn_id, "the gateway reconnected instead of skipping the bad frames"


async def test_token_never_shown_and_sigterm_exits_0(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path, log_level="debug", heartbeat_interval=FAST_HEARTBEAT) as gateway:
        await gateway.wait_readyz(200)
        cmdline = gateway.cmdline()
        await wait_relay_measured(gateway)
        await portal.create_authorization(CLIENT_ID, RESOURCE_ID)
        await portal.wait_for(kind="received", event="authorization_created")
        since = portal.next_seq
        await portal.drop()
        await _joined(portal, since=since)
        await gateway.wait_readyz(200)
        conn_id = portal.session().conn_id
        gateway.process.send_signal(signal.SIGTERM)
        code = await gateway.wait_exit(timeout=10)
        closed = await portal.wait_for(kind="closed", conn_id=conn_id)
    assert code == 0
    output = gateway.output()
    assert "DEBUG" in output  # debug logging really was on
    assert "effective settings: " in output and "num_tun_threads=" in output
    assert GATEWAY_TOKEN not in output
    assert GATEWAY_TOKEN.encode() not in cmdline
    assert closed.status == 1000  # a WebSocket close, not a dropped TCP connection


async def test_token_expired_disconnect_is_fatal(portal: DevPortal, tmp_path: Path) -> None:
    async with run_gateway(portal, tmp_path) as gateway:
        await gateway.wait_readyz(200)
        await portal.disconnect("token_expired")
        code = await gateway.wait_exit(timeout=10)
    assert code == 1
    assert len([line for line in gateway.stderr.decode().splitlines() if line.startswith("error:")]) == 1
    assert len(portal.events(kind="connected")) == 1


async def test_join_error_is_fatal(portal: DevPortal, tmp_path: Path) -> None:
    portal.faults.join_reply = "error"
    async with run_gateway(portal, tmp_path) as gateway:
        code = await gateway.wait_exit(timeout=10)
    assert code == 1
    assert len(portal.events(kind="connected")) == 1


async def test_duplicate_gateway_is_retried_until_the_other_socket_leaves(portal: DevPortal, tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    firezone_id = "ab" * 32
    key = base64.b64encode(bytes(range(32))).decode()
    url = f"{portal.url}/gateway/v2/websocket?external_id={firezone_id}&name=squatter&public_key={key.replace('+', '%2B').replace('/', '%2F').replace('=', '%3D')}"
    async with connect(url, additional_headers={"X-Authorization": f"Bearer {GATEWAY_TOKEN}"}) as squatter:
        async with run_gateway(portal, tmp_path, firezone_id=firezone_id) as gateway:
            refused = await portal.wait_for(kind="rejected", predicate=lambda e: e.status == 409)
            await squatter.close()
            joined = await _joined(portal, since=refused.seq, timeout=10)
            await gateway.wait_readyz(200)
    assert joined.external_id == firezone_id


@pytest.mark.timeout(180)
async def test_make_demo_passes_every_check() -> None:
    """``make demo`` as a user runs it (after setup): the gateway's main job end to end, every check passing."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lab.demo", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out = (await asyncio.wait_for(proc.communicate(), 170))[0].decode(errors="replace")
    last = out.strip().splitlines()[-1]
    checks = int(last.split("/")[1].split()[0])
    assert proc.returncode == 0 and last == f"demo: {checks}/{checks} checks passed" and checks >= 7, out
