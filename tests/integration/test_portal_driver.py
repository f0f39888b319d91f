"""agent/portal.py against an in-test Phoenix V1 server built on ``websockets`` (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from agent.config import Secret
from agent.eventloop import Eventloop
from agent.portal import PortalLink
from dataplane.gateway import AuthorizationOutcome
from dataplane.io.rng import SeededRng
from lab.loopback_bridge import IsolatedNetns
from protocol.errors import FatalReason, PortalError
from protocol.messages import CreateAuthorization, Init, OutboundMessage, Relay, Resource

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOKEN = "sekrit-token-value-0123456789"
PUBLIC_KEY = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
INIT = {
    "interface": {"ipv4": "100.115.164.78", "ipv6": "fd00:2021:1111::2c:f6ab"},
    "relays": [
        {
            "id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8",
            "type": "turn",
            "addr": "127.0.0.1:3478",
            "username": "2145916800:salt",
            "password": "pw",
            "expires_at": 2145916800,
        }
    ],
    "authorizations": [],
    "account_slug": "acme",
    "flow_logs": {"api_url": None, "upload_interval_secs": 0, "upload_batch_size": 1000},
    "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True},
}
CREATE_AUTHORIZATION = {
    "ref": "SFMyNTY.opaque",
    "resource": {"id": "r1", "type": "cidr", "name": "n", "address": "172.20.0.0/16", "filters": []},
    "client": {
        "id": "c1",
        "public_key": PUBLIC_KEY,
        "preshared_key": "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM=",
        "ipv4": "100.93.74.51",
        "ipv6": "fd00:2021:1111::f:853b",
    },
    "client_ice_credentials": {"username": "hgwh", "password": "j2fqufatn7xlrrvv6fsvea"},
    "gateway_ice_credentials": {"username": "ejqt", "password": "zfjrrjdkbci42t2axyd45a"},
    "expires_at": None,
}


class AcceptingState:
    """The smallest GatewayStateHandler: accepts every authorization and keeps it; the data plane is not under test."""

    def __init__(self) -> None:
        self.authorizations: list[CreateAuthorization] = []

    def set_portal_connected(self, connected: bool) -> None:
        pass

    def apply_init(self, init: Init, now: float) -> None:
        pass

    def create_authorization(self, request: CreateAuthorization, now: float) -> AuthorizationOutcome:
        self.authorizations.append(request)
        return AuthorizationOutcome.ACCEPTED

    def add_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None:
        pass

    def remove_ice_candidates(self, client_id: str, candidates: Sequence[str], now: float) -> None:
        pass

    def reject_access(self, client_id: str, resource_id: str, now: float) -> None:
        pass

    def update_resource(self, resource: Resource, now: float) -> None:
        pass

    def relays_presence(self, disconnected_ids: Sequence[str], connected: Sequence[Relay], now: float) -> None:
        pass

    def poll_outbound(self) -> OutboundMessage | None:
        return None


@dataclass
class FakePortal:
    """Answers joins and heartbeats like Phoenix; can refuse upgrades, stay silent, and records everything."""

    reject: Callable[[int], Response | None] = lambda attempt: None
    answer_heartbeats: bool = True
    pushes_after_join: list[tuple[str, Any]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    attempt_times: list[float] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    # The connection number (1, 2, ...) each received frame arrived on, index-aligned with ``received``.
    received_on: list[int] = field(default_factory=list)
    closed_connections: int = 0
    connections: int = 0
    port: int = 0

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request)
        self.attempt_times.append(time.monotonic())
        return self.reject(len(self.requests))

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        try:
            await self._serve(ws, number)
        finally:
            self.closed_connections += 1

    async def _serve(self, ws: ServerConnection, number: int) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            self.received.append(frame)
            self.received_on.append(number)
            reply = {"topic": frame["topic"], "event": "phx_reply", "ref": frame["ref"]}
            if frame["event"] == "phx_join":
                await ws.send(json.dumps({**reply, "payload": {"status": "ok", "response": {}}}))
                for event, payload in self.pushes_after_join:
                    await ws.send(json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": None}))
            elif frame["event"] == "heartbeat":
                if self.answer_heartbeats:
                    await ws.send(json.dumps({**reply, "payload": {"status": "ok", "response": {}}}))
            else:
                await ws.send(json.dumps({**reply, "payload": {"status": "ok", "response": {}}}))

    def events(self, name: str, connection: int | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f, number in zip(self.received, self.received_on, strict=True)
            if f["event"] == name and connection in (None, number)
        ]


@contextlib.asynccontextmanager
async def running(portal: FakePortal) -> AsyncIterator[FakePortal]:
    async with serve(portal.handler, "127.0.0.1", 0, process_request=portal.process_request) as server:
        portal.port = next(iter(server.sockets)).getsockname()[1]
        yield portal


def problem(status: int, code: str, detail: str, extra_headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"title": HTTPStatus(status).phrase, "status": status, "detail": detail, "code": code}).encode()
    headers = Headers({"Content-Type": "application/problem+json", "Content-Length": str(len(body))})
    for key, value in (extra_headers or {}).items():
        headers[key] = value
    return Response(status, HTTPStatus(status).phrase, headers, body)


def make_link(
    port: int,
    *,
    heartbeat_interval: float = 10.0,
    max_partition_time: float = 3600.0,
    host: str = "127.0.0.1",
    connect_timeout: float = 15.0,
) -> PortalLink:
    return PortalLink(
        api_url=f"ws://{host}:{port}",
        firezone_id="5d4e8a9c-1c1f-4d7c-9a0b-3f3e2c1d0b9a",
        name="gw-test",
        public_key_b64=PUBLIC_KEY,
        token=Secret(f"  {TOKEN}\n"),
        rng=SeededRng(1),
        wall_clock=time.time,
        heartbeat_interval=heartbeat_interval,
        max_partition_time=max_partition_time,
        connect_timeout=connect_timeout,
    )


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def stop_link(link: PortalLink, task: asyncio.Task[None]) -> None:
    link.stop()
    await asyncio.wait_for(task, 5.0)


async def test_join_capabilities_init_and_authorization() -> None:
    portal = FakePortal(pushes_after_join=[("init", INIT), ("create_authorization", CREATE_AUTHORIZATION)])
    async with running(portal):
        link = make_link(portal.port, heartbeat_interval=0.3)
        state = AcceptingState()
        loop = Eventloop(link, state, time.monotonic)
        task = asyncio.ensure_future(link.run(loop.handle_channel_event))
        await wait_until(lambda: bool(portal.events("authorization_created")) and len(portal.events("heartbeat")) >= 2)
        assert link.joined and loop.init_applied
        await stop_link(link, task)

    request = portal.requests[0]
    assert request.headers["X-Authorization"] == f"Bearer {TOKEN}"
    assert " gateway/1.6.0 " in request.headers["User-Agent"]
    url = urlsplit(request.path)
    assert url.path == "/gateway/v2/websocket"
    query = parse_qs(url.query)
    assert query["name"] == ["gw-test"] and query["public_key"] == [PUBLIC_KEY]
    assert len(query["external_id"][0]) == 64 and TOKEN not in request.path
    first = portal.received[0]
    assert first == {"topic": "gateway", "event": "phx_join", "payload": None, "ref": 0}
    assert portal.received[1]["event"] == "set_snownet_capabilities"
    assert portal.received[1]["payload"] == {"iceless": False}
    assert portal.events("authorization_created")[0]["payload"] == {"ref": "SFMyNTY.opaque"}
    refs = [f["ref"] for f in portal.received]
    assert refs == list(range(len(refs)))
    assert all(f["topic"] == "phoenix" and f["payload"] == {} for f in portal.events("heartbeat"))
    assert [request.client.id for request in state.authorizations] == ["c1"]


@pytest.mark.allow_error_logs
async def test_401_with_problem_json_is_fatal_with_detail() -> None:
    portal = FakePortal(reject=lambda _: problem(401, "invalid_token", "The token is invalid or expired"))
    async with running(portal):
        link = make_link(portal.port)
        with pytest.raises(PortalError) as caught:
            await asyncio.wait_for(link.run(lambda event: None), 10.0)
    assert caught.value.reason is FatalReason.INVALID_TOKEN
    assert "The token is invalid or expired" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert len(portal.requests) == 1


async def test_503_retry_after_is_honoured() -> None:
    portal = FakePortal(
        reject=lambda n: problem(503, "rate_limit", "slow down", {"Retry-After": "2"}) if n == 1 else None
    )
    async with running(portal):
        link = make_link(portal.port)
        task = asyncio.ensure_future(link.run(lambda event: None))
        await wait_until(lambda: link.joined)
        await stop_link(link, task)
    assert len(portal.attempt_times) == 2
    # Without Retry-After the initial-connect policy would wait 1 s.
    assert portal.attempt_times[1] - portal.attempt_times[0] >= 1.9


async def test_retry_after_does_not_spend_the_connect_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.portal as portal_module
    from agent.backoff import BackoffPolicy

    # A 1 s budget; the portal asks for 1 s four times in a row. Firezone keeps retrying while Retry-After comes.
    monkeypatch.setattr(portal_module, "initial_connect_policy", lambda: BackoffPolicy(0.2, 1.0, 0.2, 1.0, False))
    portal = FakePortal(
        reject=lambda n: problem(429, "rate_limit", "slow down", {"Retry-After": "1"}) if n <= 4 else None
    )
    async with running(portal):
        link = make_link(portal.port)
        task = asyncio.ensure_future(link.run(lambda event: None))
        await wait_until(lambda: link.joined or task.done())
        assert link.joined, task.exception() if task.done() else None
        await stop_link(link, task)
    assert len(portal.attempt_times) == 5


async def test_heartbeat_silence_reconnects_and_rejoins() -> None:
    portal = FakePortal(answer_heartbeats=False)
    async with running(portal):
        link = make_link(portal.port, heartbeat_interval=0.2)
        task = asyncio.ensure_future(link.run(lambda event: None))
        await wait_until(lambda: portal.connections >= 2 and link.joined)
        await stop_link(link, task)
    # Like Firezone: the 4th unanswered heartbeat is sent, and only then does the link give up on the connection and
    # join again on a new one (refs restart).
    first = portal.events("heartbeat", connection=1)
    assert [f["ref"] for f in first] == [1, 2, 3, 4]
    joins = portal.events("phx_join")
    assert len(joins) >= 2 and all(j["ref"] == 0 for j in joins)
    assert link.stats.reconnects >= 1
    assert link.stats.sent["heartbeat"] >= 4


async def test_server_close_reconnects_with_backoff() -> None:
    closes = {"done": False}

    portal = FakePortal()
    original = portal.handler

    async def closing_handler(ws: ServerConnection) -> None:
        if not closes["done"]:
            closes["done"] = True
            await ws.recv()
            await ws.send(
                json.dumps(
                    {"topic": "gateway", "event": "phx_reply", "ref": 0, "payload": {"status": "ok", "response": {}}}
                )
            )
            await ws.close()
            return
        await original(ws)

    portal.handler = closing_handler  # type: ignore[method-assign]
    async with running(portal):
        link = make_link(portal.port)
        task = asyncio.ensure_future(link.run(lambda event: None))
        await wait_until(lambda: len(portal.requests) >= 2 and link.joined)
        await stop_link(link, task)
    gap = portal.attempt_times[1] - portal.attempt_times[0]
    # After a join the reconnect ladder starts at 0.5 s with jitter up to one more interval (so at most 1 s); the upper
    # bound only catches a ladder that starts far too late, with a margin a loaded machine cannot eat.
    assert 0.5 <= gap < 5.0


def _gateway_env(port: int, state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREZONE_", "RUST_LOG", "HEALTH_CHECK"))}
    env.update(
        FIREZONE_TOKEN=TOKEN,
        FIREZONE_API_URL=f"ws://127.0.0.1:{port}",
        FIREZONE_ID="a" * 64,
        FIREZONE_STATE_DIR=str(state_dir),
        FIREZONE_STATUS_SOCKET=str(state_dir / "status.sock"),
        HEALTH_CHECK_ADDR="127.0.0.1:0",
        FIREZONE_LOG_LEVEL="debug,websockets=debug",
    )
    return env


@contextlib.asynccontextmanager
async def gateway_cli(env: dict[str, str], *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m agent.main`` with output captured; killed on exit if the test left it running.

    It runs in a namespace of its own (its TUN device and host setup stay there), the portal's loopback port bridged
    in (lab/loopback_bridge.py)."""
    port = urlsplit(env["FIREZONE_API_URL"]).port
    async with IsolatedNetns(ports=[port] if port else []) as netns:
        proc = await asyncio.create_subprocess_exec(
            *netns.exec_argv([sys.executable, "-m", "agent.main", *args]),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.communicate()


async def test_cli_exits_1_on_401_without_leaking_the_token(tmp_path: Path) -> None:
    portal = FakePortal(reject=lambda _: problem(401, "invalid_token", "The token is invalid"))
    async with running(portal), gateway_cli(_gateway_env(portal.port, tmp_path)) as proc:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 20.0)
    assert proc.returncode == 1
    text = stderr.decode()
    assert "error: invalid_token" in text and "The token is invalid" in text
    assert TOKEN not in text and TOKEN not in stdout.decode()


async def test_cli_joins_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    # The authorization is answered only after the init before it was handled: a wait on an event, not on time.
    # The init's TURN relay does not exist, so the real gateway answers no_relays rather than authorization_created.
    portal = FakePortal(pushes_after_join=[("init", INIT), ("create_authorization", CREATE_AUTHORIZATION)])
    async with running(portal), gateway_cli(_gateway_env(portal.port, tmp_path)) as proc:
        await wait_until(lambda: bool(portal.events("authorization_created") or portal.events("no_relays")), 15.0)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 10.0)
    text = stderr.decode()
    assert proc.returncode == 0, text
    assert "joined" in text and "init applied" in text
    assert TOKEN not in text and TOKEN not in stdout.decode()


async def test_malformed_frames_do_not_break_the_link() -> None:
    garbage: list[str | bytes] = [
        "not json",
        "[1, 2, 3]",
        json.dumps({"topic": "gateway", "event": "init", "payload": {"interface": 5}, "ref": None}),
        json.dumps({"topic": "gateway", "event": "no_such_event", "payload": {}, "ref": None}),
        json.dumps({"topic": "gateway", "event": "reject_access", "payload": "x" * (1 << 20), "ref": None}),
        b"\x00\x01binary",
    ]
    portal = FakePortal(pushes_after_join=[("init", INIT)])
    original = portal.handler

    async def noisy_handler(ws: ServerConnection) -> None:
        async def spray() -> None:
            await asyncio.sleep(0.2)
            for frame in garbage:
                await ws.send(frame)

        sprayer = asyncio.ensure_future(spray())
        try:
            await original(ws)
        finally:
            sprayer.cancel()

    portal.handler = noisy_handler  # type: ignore[method-assign]
    async with running(portal):
        link = make_link(portal.port, heartbeat_interval=0.2)
        state = AcceptingState()
        loop = Eventloop(link, state, time.monotonic)
        task = asyncio.ensure_future(link.run(loop.handle_channel_event))
        await wait_until(lambda: loop.drops.total() >= 3 and link.channel.drops.total() >= 2)
        heartbeats = len(portal.events("heartbeat"))
        await wait_until(lambda: len(portal.events("heartbeat")) >= heartbeats + 3)
        assert link.joined and loop.init_applied
        await stop_link(link, task)
    assert portal.connections == 1


async def test_stop_during_backoff_returns_promptly() -> None:
    portal = FakePortal(reject=lambda _: problem(503, "rate_limit", "busy", {"Retry-After": "10"}))
    async with running(portal):
        link = make_link(portal.port)
        task = asyncio.ensure_future(link.run(lambda event: None))
        await wait_until(lambda: len(portal.requests) == 1)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await stop_link(link, task)
        # Returning before the 10 s Retry-After is the point; the margin absorbs a loaded machine.
        assert time.monotonic() - started < 8.0


async def test_cli_exits_1_when_the_health_port_is_taken(tmp_path: Path) -> None:
    env = _gateway_env(9, tmp_path)
    # In the gateway's namespace the bridge of the portal's port listens on 127.0.0.1:9 (nothing answers behind it).
    env["HEALTH_CHECK_ADDR"] = "127.0.0.1:9"
    async with gateway_cli(env) as proc:
        _, stderr = await asyncio.wait_for(proc.communicate(), 20.0)
    assert proc.returncode == 1
    assert stderr.decode().strip().splitlines()[-1].startswith("error: ")


async def test_initial_connect_budget_exhaustion_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.portal as portal_module
    from agent.backoff import BackoffPolicy

    # Same shape as the real 1 s × 15 s policy, scaled down so the test takes a second.
    monkeypatch.setattr(portal_module, "initial_connect_policy", lambda: BackoffPolicy(0.2, 1.0, 0.2, 1.0, False))
    with socket_on_a_closed_port() as port:
        link = make_link(port)
        with pytest.raises(PortalError) as caught:
            await asyncio.wait_for(link.run(lambda event: None), 10.0)
    assert caught.value.reason is FatalReason.MAX_RETRIES_REACHED
    assert link.stats.connect_attempts == 6  # the first try plus five 0.2 s waits within the 1 s budget


@contextlib.contextmanager
def socket_on_a_closed_port() -> Iterator[int]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]  # bound but not listening: connections are refused


async def test_positional_token_is_moved_out_of_the_process_title(tmp_path: Path) -> None:
    portal = FakePortal(pushes_after_join=[("init", INIT)])
    async with running(portal):
        env = _gateway_env(portal.port, tmp_path)
        del env["FIREZONE_TOKEN"]
        async with gateway_cli(env, "--log-format", "json", TOKEN) as proc:
            await wait_until(lambda: bool(portal.events("set_snownet_capabilities")), 15.0)
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            assert TOKEN.encode() not in cmdline and b"--log-format" in cmdline
            assert portal.requests[0].headers["X-Authorization"] == f"Bearer {TOKEN}"
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 10.0)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    assert any("joined" in line["message"] for line in lines)
    assert TOKEN not in stderr.decode()


async def test_the_host_name_is_resolved_at_every_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []
    real_getaddrinfo = asyncio.get_running_loop().getaddrinfo

    async def counting_getaddrinfo(host: str, port: int, **kwargs: Any) -> Any:
        lookups.append(host)
        # The name only exists for this test; it resolves to where the fake portal listens.
        return await real_getaddrinfo("127.0.0.1" if host == "portal.test" else host, port, **kwargs)

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", counting_getaddrinfo)
    drops = {"left": 1}
    portal = FakePortal()
    original = portal.handler

    async def dropping_handler(ws: ServerConnection) -> None:
        if drops["left"]:
            drops["left"] -= 1
            await ws.recv()
            await ws.close()
            return
        await original(ws)

    portal.handler = dropping_handler  # type: ignore[method-assign]
    async with running(portal):
        link = make_link(portal.port, host="portal.test")
        task = asyncio.ensure_future(link.run(lambda event: None))
        await wait_until(lambda: link.joined and len(portal.requests) >= 2)
        await stop_link(link, task)
    assert lookups.count("portal.test") == len(portal.requests) == 2
    assert portal.requests[1].headers["Host"] == f"portal.test:{portal.port}"


async def test_the_whole_attempt_times_out(caplog: pytest.LogCaptureFixture) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # TCP connects, the WebSocket upgrade is never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.WARNING, logger="agent.portal")
    try:
        link = make_link(port, connect_timeout=0.4)
        task = asyncio.ensure_future(link.run(lambda event: None))
        await wait_until(lambda: len(accepted) >= 2)
        await stop_link(link, task)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert any("connect attempt timed out after 0.4 s" in r.getMessage() for r in caplog.records)
    assert not link.joined


async def test_a_mark_error_other_than_eperm_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import socket

    from agent.dial import SocketMarkError

    original = socket.socket.setsockopt

    def setsockopt(self: socket.socket, level: int, option: int, *value: Any) -> None:
        if level == socket.SOL_SOCKET and option == 36:  # SO_MARK
            raise OSError(errno.EINVAL, "Invalid argument")
        original(self, level, option, *value)

    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
    portal = FakePortal()
    async with running(portal):
        link = make_link(portal.port)
        with pytest.raises(SocketMarkError):
            await asyncio.wait_for(link.run(lambda event: None), 10.0)
    assert portal.requests == []
