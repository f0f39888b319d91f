"""agent/health.py: /healthz, /readyz, /metrics, and the gateway's readiness rule (joined AND init applied)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from agent.config import load_settings
from agent.health import HealthServer, MetricsText, build_app
from agent.main import Gateway, generate_key_pair
from protocol.phoenix import ChannelJoined, PushReceived

INIT = {"interface": {"ipv4": "100.64.0.1", "ipv6": "fd00:2021:1111::1"}}


async def test_endpoints_follow_the_callbacks() -> None:
    state = {"ready": False}
    app = build_app(ready=lambda: state["ready"], metrics=lambda: "m 1\n")
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503
        state["ready"] = True
        assert (await client.get("/readyz")).status == 200
        response = await client.get("/metrics")
        assert response.status == 200 and await response.text() == "m 1\n"
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert (await client.get("/nope")).status == 404


async def test_server_binds_and_stops() -> None:
    server = HealthServer("127.0.0.1", 0, ready=lambda: True, metrics=lambda: "")
    await server.start()
    try:
        assert server.port != 0
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/healthz") as r:
            assert r.status == 200
    finally:
        await server.stop()


def test_metrics_text_format() -> None:
    text = MetricsText()
    text.family("x_total", "counter", "Things.", [({"reason": 'a"b\\c\nd'}, 3), ({}, 1.5)])
    assert text.render() == (
        '# HELP x_total Things.\n# TYPE x_total counter\nx_total{reason="a\\"b\\\\c\\nd"} 3\nx_total 1.5\n'
    )


def _gateway(tmp_path: Path) -> Gateway:
    settings = load_settings(
        [],
        {
            "FIREZONE_TOKEN": "t",
            "FIREZONE_ID": "a" * 64,
            "FIREZONE_STATE_DIR": str(tmp_path),
            "FIREZONE_API_URL": "ws://127.0.0.1:9",
            "HEALTH_CHECK_ADDR": "127.0.0.1:0",
        },
    )
    return Gateway(settings, *generate_key_pair())


async def test_gateway_readiness_needs_join_and_init(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path)
    async with TestClient(TestServer(gateway.health.app)) as client:
        assert (await client.get("/readyz")).status == 503
        gateway.link.channel.connect(0.0)
        gateway.link.channel.receive_text(
            '{"topic":"gateway","event":"phx_reply","payload":{"status":"ok"},"ref":0}', 0.1
        )
        gateway.eventloop.handle_channel_event(ChannelJoined())
        assert (await client.get("/readyz")).status == 503  # joined, no init yet
        gateway.eventloop.handle_channel_event(PushReceived("init", INIT))
        assert (await client.get("/readyz")).status == 200
        gateway.link.channel.connection_lost(1.0)
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200


async def test_gateway_metrics_cover_reconnects_messages_and_drops(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path)
    gateway.link.stats.reconnects = 2
    gateway.link.stats.received["init"] += 1
    gateway.eventloop.handle_channel_event(PushReceived("unknown_thing", {}))
    gateway.link.channel.connect(0.0)
    gateway.link.channel.receive_text("not json", 0.1)
    async with TestClient(TestServer(gateway.health.app)) as client:
        body = await (await client.get("/metrics")).text()
    assert "firezone_portal_reconnects_total 2" in body
    assert 'firezone_portal_messages_received_total{event="init"} 1' in body
    assert 'firezone_portal_drops_total{layer="messages",reason="unknown_event"} 1' in body
    assert 'firezone_portal_drops_total{layer="phoenix",reason="not_json"} 1' in body
    assert "firezone_portal_ready 0" in body
