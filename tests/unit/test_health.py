"""agent/health.py: /healthz, /readyz, /metrics, and the gateway's readiness rule (joined AND init applied)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.config import load_settings
from agent.health import HealthServer, MetricsText, build_app, raise_nofile_limit
from agent.main import Gateway, generate_key_pair
from protocol.phoenix import ChannelJoined, PushReceived

ROOT = Path(__file__).resolve().parents[2]
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
        assert (await client.post("/healthz")).status == 405


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


# --- issue 11: the listener cannot starve the process -------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(**options: float) -> AsyncIterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, ready=lambda: True, metrics=lambda: "m 1\n", **options)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 5.0)  # until the server closes: no keep-alive
    finally:
        writer.close()


async def test_one_request_per_connection_and_head_without_body() -> None:
    async with serving() as server:
        answer = await raw_request(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nm 1\n")
        assert b"Connection: close" in answer
        head = await raw_request(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"Content-Length: 4\r\nConnection: close\r\n\r\n")
        assert (await raw_request(server.port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")


async def test_a_silent_connection_is_closed_after_the_header_timeout() -> None:
    async with serving(header_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        assert 0.25 <= time.monotonic() - started < 3.0
        writer.close()
        await asyncio.sleep(0.05)
        assert server.connection_count == 0


async def test_an_oversized_request_head_is_refused() -> None:
    async with serving() as server:
        answer = await raw_request(server.port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
        assert answer == b""


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_nofile_limit() == (hard, hard) or hard == resource.RLIM_INFINITY
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] in (hard, soft)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))


IDLE_CONNECTIONS = 2000
# Issue 11 ran the gateway with 128 descriptors: 150 idle connections were enough to stop /healthz and the portal dial.
SERVER_FD_LIMIT = 128
SERVER_SCRIPT = """
import asyncio, resource, sys
from agent.health import HealthServer

resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    server = HealthServer("127.0.0.1", 0, ready=lambda: True, metrics=lambda: "", header_timeout=600.0)
    await server.start()
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()

asyncio.run(main())
"""


@pytest.mark.timeout(120)
async def test_healthz_answers_while_2000_idle_connections_are_held_open() -> None:
    soft, _ = raise_nofile_limit()
    if soft != resource.RLIM_INFINITY and soft < IDLE_CONNECTIONS + 500:
        pytest.skip(f"the hard open-file limit ({soft}) is below {IDLE_CONNECTIONS + 500}")
    # The server runs in its own process with only 128 descriptors and a 10-minute header timeout: what keeps
    # /healthz alive is the connection cap, not a generous limit or the idle connections timing out.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER_SCRIPT,
        str(SERVER_FD_LIMIT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    idle: list[asyncio.StreamWriter] = []
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 20.0))
        for _ in range(IDLE_CONNECTIONS):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            idle.append(writer)
        await asyncio.sleep(0.2)
        for _ in range(3):
            started = time.monotonic()
            answer = await raw_request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 OK")
            assert time.monotonic() - started < 2.0
    finally:
        for writer in idle:
            writer.transport.abort()
        if process.returncode is None:
            process.kill()
        await process.wait()
