"""The dev portal: an aiohttp Phoenix server for gateways, plus an admin API for tests and the demo.

It mirrors the parts of Firezone's portal a gateway can observe (docs/protocol.md §1, §2): the upgrade checks and
their problem+json answers, the ``gateway`` channel, ``init`` after every join, the pushes an operator or a client would
cause, and the replies to what the gateway sends. Headless clients connect on ``/client/websocket`` (topic ``client``)
and are brokered as the real portal does (§2.3): ``create_flow`` picks a joined gateway of the resource's site, pushes
``create_authorization`` with the derived ICE credentials and PSK, and answers ``flow_created`` once the gateway
confirms (``flow_creation_failed`` ``offline`` for a vanished gateway or after 15 s; a gateway's ``no_relays`` only gets
it fresh relays, and asking again for a resource replaces the client's pending request); candidates go both ways.
Everything it sees and sends is kept in an event log that tests read with :meth:`DevPortal.wait_for` (or ``GET /admin/events``) instead of sleeping. Faults (rejected upgrades, silent
heartbeats, dropped sockets, downtime) are switched on through :attr:`DevPortal.faults` or ``POST /admin/faults``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http
import ipaddress
import itertools
import json
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from lab.portal import wire
from lab.portal.config import (
    TUNNEL_IPV4_POOL,
    TUNNEL_IPV6_POOL,
    ClientConfig,
    GatewayConfig,
    PortalConfig,
    ResourceConfig,
    SigningKey,
    gateway_version_from_user_agent,
    ice_credentials,
    is_valid_public_key,
    load_config,
    preshared_key,
)

log = logging.getLogger("lab.portal")

V2_PATH = "/gateway/v2/websocket"
V1_PATH = "/gateway/websocket"
CLIENT_PATH = "/client/websocket"
CLIENT_TOPIC = "client"
PHOENIX_AUTH_PROTOCOL_PREFIX = "base64url.bearer.phx."
MAX_INBOUND_FRAME = 16 * 1024 * 1024
ADMIN_MAX_BODY = 64 * 1024 * 1024
MAX_LOGGED_EVENTS = 100_000
"""The log keeps this many newest entries (a long-running ``firezone-lab portal`` must not grow without bound)."""

# The gateway→portal events each socket generation understands (docs/protocol.md §2.0, §2.2).
_COMMON_GATEWAY_EVENTS = frozenset(
    {"set_snownet_capabilities", "broadcast_ice_candidates", "broadcast_invalidated_ice_candidates", "no_relays"}
)
_AUTHORIZED_EVENT = {"v2": "authorization_created", "v1": "flow_authorized"}
_AUTHORIZE_EVENT = {"v2": "create_authorization", "v1": "authorize_flow"}
_CANDIDATE_EVENTS = {
    "broadcast_ice_candidates": "ice_candidates",
    "broadcast_invalidated_ice_candidates": ("invalidate_ice_candidates"),
}
"""What each side's candidate broadcast becomes when the portal forwards it to the other side."""
MAX_FLOWS_KEPT = 10_000
"""Finished flows beyond this many (oldest first) are forgotten; pending ones are always kept."""
MAX_PENDING_FLOWS_PER_CLIENT = 64
MAX_FORWARDED_CANDIDATES = 64
"""Candidates per forwarded message; a broadcast with more is cut (a real peer announces a handful)."""
MAX_BROADCAST_TARGETS = 64
MAX_FINISHED_CLIENTS = 1000


class AdminError(Exception):
    """An admin request that cannot be served; carries the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SocketGone(AdminError):
    """The gateway's socket closed while the portal was writing to it."""

    def __init__(self, session: GatewaySession | ClientSession) -> None:
        super().__init__(409, f"the socket of conn {session.conn_id} is closed")


@dataclass
class Faults:
    """Switchable misbehaviour. Fields are read on every upgrade/frame, so changes apply immediately."""

    reject_remaining: int = 0
    """Reject this many upcoming upgrades with the status/code below, before any other check."""
    reject_status: int = 503
    reject_code: str = "rate_limit"
    reject_detail: str = "Too many requests"
    reject_retry_after: str | None = None
    refuse_connections: bool = False
    """Simulated downtime: upgrade requests have their TCP connection aborted without an answer."""
    answer_heartbeats: bool = True
    join_reply: str = "ok"
    """``ok``, ``error`` (a join error reply: fatal for a gateway) or ``ignore`` (provokes the join timeout)."""
    push_init: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "reject_remaining": self.reject_remaining,
            "reject_status": self.reject_status,
            "reject_code": self.reject_code,
            "reject_detail": self.reject_detail,
            "reject_retry_after": self.reject_retry_after,
            "refuse_connections": self.refuse_connections,
            "answer_heartbeats": self.answer_heartbeats,
            "join_reply": self.join_reply,
            "push_init": self.push_init,
        }

    def update(self, changes: Mapping[str, Any]) -> None:
        """Applies all changes or none; values must keep each field's type (``reject_retry_after`` may be null)."""
        current = self.to_json()
        for key, value in changes.items():
            if key not in current:
                raise AdminError(400, f"unknown fault {key!r}")
            if key == "reject_retry_after" and value is None:
                continue
            expected = str if key == "reject_retry_after" else type(current[key])
            if type(value) is not expected:
                raise AdminError(400, f"fault {key} must be {expected.__name__}, not {type(value).__name__}")
            if key == "join_reply" and value not in ("ok", "error", "ignore"):
                raise AdminError(400, "join_reply must be ok, error or ignore")
        for key, value in changes.items():
            setattr(self, key, value)


@dataclass(frozen=True, slots=True)
class PortalEvent:
    """One entry of the log. ``kind``: rejected, refused, connected, received, invalid, sent, send_failed, closed."""

    seq: int
    kind: str
    at: float
    """time.monotonic() when it happened (comparable with the test process's clock)."""
    wall: float
    conn_id: int | None = None
    gateway_id: str | None = None
    external_id: str | None = None
    client_id: str | None = None
    """Set on entries about a client socket."""
    topic: str | None = None
    event: str | None = None
    payload: Any = None
    ref: wire.Ref = None
    detail: str | None = None
    status: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "at": self.at,
            "wall": self.wall,
            "conn_id": self.conn_id,
            "gateway_id": self.gateway_id,
            "external_id": self.external_id,
            "client_id": self.client_id,
            "topic": self.topic,
            "event": self.event,
            "payload": self.payload,
            "ref": self.ref,
            "detail": self.detail,
            "status": self.status,
        }


@dataclass
class GatewaySession:
    """One live (or finished) gateway WebSocket."""

    conn_id: int
    identity: tuple[str, str]
    """(sha256 of the token, external_id): a second live socket with the same identity is refused with 409."""
    entry: GatewayConfig
    gateway_id: str
    external_id: str
    name: str
    public_key: str
    user_agent: str
    version: str | None
    socket_version: str
    """``v2`` for /gateway/v2/websocket, ``v1`` for the legacy /gateway/websocket."""
    serializer: wire.Serializer
    remote: str | None
    query: dict[str, str]
    ws: web.WebSocketResponse
    request: web.Request
    connected_at: float
    joined: bool = False
    join_ref: wire.Ref = None
    closed_at: float | None = None
    close_reason: str | None = None
    issued_refs: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "gateway_id": self.gateway_id,
            "external_id": self.external_id,
            "name": self.name,
            "public_key": self.public_key,
            "user_agent": self.user_agent,
            "version": self.version,
            "socket": self.socket_version,
            "vsn": self.serializer.value,
            "remote": self.remote,
            "query": {k: v for k, v in self.query.items() if k != "token"},
            "site_id": self.entry.site_id,
            "connected_at": self.connected_at,
            "joined": self.joined,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
        }


@dataclass
class ClientSession:
    """One live (or finished) client WebSocket. The client brings its own ``public_key`` (query parameter)."""

    conn_id: int
    entry: ClientConfig
    public_key: str
    user_agent: str
    serializer: wire.Serializer
    remote: str | None
    ws: web.WebSocketResponse
    request: web.Request
    connected_at: float
    joined: bool = False
    join_ref: wire.Ref = None
    closed_at: float | None = None
    close_reason: str | None = None

    @property
    def client_id(self) -> str:
        return self.entry.id

    def to_json(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "client_id": self.client_id,
            "public_key": self.public_key,
            "user_agent": self.user_agent,
            "ipv4": str(self.entry.ipv4),
            "ipv6": str(self.entry.ipv6),
            "remote": self.remote,
            "connected_at": self.connected_at,
            "joined": self.joined,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
        }


Session = GatewaySession | ClientSession


@dataclass
class Flow:
    """One ``create_flow`` from a client and what the portal made of it."""

    flow_id: int
    client_conn_id: int
    client_id: str
    resource_id: str
    requested_at: float
    state: str = "pending"
    """``pending`` (waiting for the gateway), ``created``, ``failed``, ``abandoned`` (the client left first) or
    ``superseded`` (the client asked for the resource again before the gateway confirmed: the newer request counts)."""
    gateway_id: str | None = None
    gateway_conn_id: int | None = None
    ref: str | None = None
    reason: str | None = None
    finished_at: float | None = None
    authorization: dict[str, Any] | None = None
    """The ``create_authorization`` payload pushed to the gateway."""
    flow_created: dict[str, Any] | None = None
    """The ``flow_created`` payload pushed to the client."""
    timer: asyncio.TimerHandle | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "flow_id": self.flow_id,
            "client_conn_id": self.client_conn_id,
            "client_id": self.client_id,
            "resource_id": self.resource_id,
            "requested_at": self.requested_at,
            "state": self.state,
            "gateway_id": self.gateway_id,
            "gateway_conn_id": self.gateway_conn_id,
            "ref": self.ref,
            "reason": self.reason,
            "finished_at": self.finished_at,
            "authorization": self.authorization,
            "flow_created": self.flow_created,
        }


def _strings(value: Any, limit: int) -> list[str]:
    """The string items of a JSON list (anything else skipped), at most ``limit`` of them."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)][:limit]


def _problem(status: int, code: str, detail: str, retry_after: str | None = None) -> web.Response:
    body = {"title": http.HTTPStatus(status).phrase, "status": status, "detail": detail, "code": code}
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json", headers=headers)


def _bearer_token(request: web.Request) -> tuple[str | None, str | None]:
    """(token, subprotocol to echo): ``X-Authorization: Bearer`` first, then Phoenix's auth subprotocol, then ``?token=``."""
    header = request.headers.get("X-Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return "".join(value.split()), None
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    for protocol in offered:
        if protocol.startswith(PHOENIX_AUTH_PROTOCOL_PREFIX):
            encoded = protocol.removeprefix(PHOENIX_AUTH_PROTOCOL_PREFIX)
            # binascii.Error, UnicodeDecodeError and the ValueError for non-ASCII input: a protocol that is no token.
            with contextlib.suppress(ValueError):
                token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
                return token, "phoenix"
    query_token = request.query.get("token")
    if query_token:
        return query_token, None
    return None, None


class DevPortal:
    """``async with DevPortal(config, host="127.0.0.1", port=0) as portal:`` → ``portal.url``, ``portal.admin_url``.

    ``stop()`` then ``start()`` restarts the server on the same port, keeping config, log and tunnel IPs (a portal
    restart as the gateway sees it).
    """

    def __init__(
        self,
        config: PortalConfig | str | Path | dict[str, Any],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = load_config(config)
        self.host = host
        self.port = port
        self.faults = Faults()
        self._wall_clock = wall_clock
        self._signing = SigningKey(self.config.signing_secret)
        self._runner: web.AppRunner | None = None
        self._conn_ids = itertools.count(1)
        self._sessions: dict[int, GatewaySession] = {}
        self._finished: list[GatewaySession] = []
        self._events: list[PortalEvent] = []
        self._first_seq = 0
        self._changed = asyncio.Event()
        self._tunnel_ips: dict[str, tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]] = {}
        self._next_pool_host = 2
        self._clients: dict[int, ClientSession] = {}
        self._finished_clients: list[ClientSession] = []
        self._flows: dict[int, Flow] = {}
        self._pending_flows: dict[str, Flow] = {}
        """Flows waiting for ``authorization_created``, by the ref pushed to the gateway."""
        self._pending_by_resource: dict[tuple[int, str], Flow] = {}
        """The same flows by (client connection, resource): a client has one request per resource, as with the real
        portal, whose pending authorizations are keyed by resource (docs/protocol.md §2.3)."""
        # Indexes kept next to the tables above, so that brokering stays O(1) per message with thousands of clients:
        self._client_by_id: dict[str, ClientSession] = {}
        """The live client socket of each client id (a second one is refused with 409)."""
        self._live_flows: dict[int, Flow] = {}
        """Kept flows with a gateway that are pending or created: they carry candidates and count as load."""
        self._live_pairs: Counter[tuple[str, str]] = Counter()
        """Live flows by (client id, gateway id)."""
        self._gateway_load: Counter[int] = Counter()
        """Live flows by gateway connection."""
        self._pending_by_client: Counter[int] = Counter()
        """Pending flows by client connection."""
        self._flow_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def url(self) -> str:
        """The value for the gateway's ``FIREZONE_API_URL``."""
        return f"ws://{self._url_host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self._url_host}:{self.port}/admin"

    @property
    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    async def __aenter__(self) -> DevPortal:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=ADMIN_MAX_BODY)
        app.router.add_get(V2_PATH, self._handle_v2)
        app.router.add_get(V1_PATH, self._handle_v1)
        app.router.add_get(CLIENT_PATH, self._handle_client_socket)
        admin = AdminApi(self)
        admin.register(app.router)
        return app

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Listens on ``host:port``, or on ``sock``: a bound listening TCP socket the caller made (e.g. inside a
        network namespace). The portal then owns it and closes it on :meth:`stop`; a restart needs a new socket."""
        if self._runner is not None:
            raise RuntimeError("the dev portal is already running")
        runner = web.AppRunner(self._build_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        site: web.BaseSite
        if sock is not None:
            sock.setblocking(False)
            self.host, self.port = str(sock.getsockname()[0]), int(sock.getsockname()[1])
            site = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        self._runner = runner
        log.info("dev portal listening on %s", self.url)

    async def stop(self) -> None:
        """Closes every gateway and client socket (WS close 1001) and the listener. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        sockets: list[Session] = [*self._sessions.values(), *self._clients.values()]
        await asyncio.gather(
            *(self._close_session(s, code=1001, reason="portal stopping") for s in sockets),
            return_exceptions=True,
        )
        for flow in list(self._pending_flows.values()):
            self._finish_flow(flow, "abandoned", "portal stopping")
        await runner.cleanup()
        log.info("dev portal stopped")

    # ---------------------------------------------------------------- event log

    def _record(self, kind: str, session: Session | None = None, **fields: Any) -> PortalEvent:
        if isinstance(session, GatewaySession):
            fields["gateway_id"], fields["external_id"] = session.gateway_id, session.external_id
        elif isinstance(session, ClientSession):
            fields["client_id"] = session.client_id
        event = PortalEvent(
            seq=self.next_seq,
            kind=kind,
            at=time.monotonic(),
            wall=self._wall_clock(),
            conn_id=session.conn_id if session else None,
            **fields,
        )
        self._events.append(event)
        if len(self._events) > MAX_LOGGED_EVENTS:
            dropped = len(self._events) - MAX_LOGGED_EVENTS // 2
            del self._events[:dropped]
            self._first_seq += dropped
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    @property
    def next_seq(self) -> int:
        """The seq the next log entry gets: pass it as ``since`` to wait only for what happens from now on."""
        return self._first_seq + len(self._events)

    def _since(self, seq: int) -> list[PortalEvent]:
        return self._events[max(0, seq - self._first_seq) :]

    def events(
        self,
        *,
        since: int = 0,
        kind: str | None = None,
        event: str | None = None,
        gateway: str | None = None,
        conn_id: int | None = None,
        client: str | None = None,
    ) -> list[PortalEvent]:
        return [e for e in self._since(since) if self._matches(e, kind, event, gateway, conn_id, client)]

    @staticmethod
    def _matches(
        e: PortalEvent,
        kind: str | None,
        event: str | None,
        gateway: str | None,
        conn_id: int | None,
        client: str | None = None,
    ) -> bool:
        return (
            (kind is None or e.kind == kind)
            and (event is None or e.event == event)
            and (gateway is None or gateway in (e.gateway_id, e.external_id))
            and (conn_id is None or e.conn_id == conn_id)
            and (client is None or e.client_id == client)
        )

    async def wait_for(
        self,
        *,
        since: int = 0,
        kind: str | None = None,
        event: str | None = None,
        gateway: str | None = None,
        conn_id: int | None = None,
        client: str | None = None,
        predicate: Callable[[PortalEvent], bool] | None = None,
        timeout: float = 10.0,
    ) -> PortalEvent:
        """The first log entry at or after ``since`` that matches; raises ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        position = since
        while True:
            for e in self._since(position):
                if self._matches(e, kind, event, gateway, conn_id, client) and (predicate is None or predicate(e)):
                    return e
            position = max(position, self.next_seq)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                wanted = ", ".join(f"{k}={v}" for k, v in (("kind", kind), ("event", event)) if v)
                raise TimeoutError(f"no portal event ({wanted}) since seq {since} within {timeout} s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    # ---------------------------------------------------------------- state for admins

    @property
    def sessions(self) -> list[GatewaySession]:
        """Live gateway sockets, oldest first."""
        return list(self._sessions.values())

    def gateways(self) -> list[dict[str, Any]]:
        """Every gateway seen, with its latest connection and whether it is connected and joined now."""
        latest: dict[str, GatewaySession] = {}
        counts: dict[str, int] = {}
        for session in sorted([*self._finished, *self._sessions.values()], key=lambda s: s.conn_id):
            latest[session.gateway_id] = session
            counts[session.gateway_id] = counts.get(session.gateway_id, 0) + 1
        result = []
        for gateway_id, session in latest.items():
            info = session.to_json()
            info["connected"] = session.conn_id in self._sessions
            info["connections"] = counts[gateway_id]
            ipv4, ipv6 = self._tunnel_ips.get(gateway_id, (None, None))
            info["ipv4"] = str(ipv4) if ipv4 else None
            info["ipv6"] = str(ipv6) if ipv6 else None
            result.append(info)
        return result

    def session(self, gateway: str | None = None, *, joined: bool = True) -> GatewaySession:
        """The live session selected by gateway id, external id, name or conn id; the only one when ``None``."""
        candidates = [s for s in self._sessions.values() if s.joined or not joined]
        if gateway is not None:
            candidates = [s for s in candidates if gateway in (s.gateway_id, s.external_id, s.name, str(s.conn_id))]
        if not candidates:
            state = "joined " if joined else ""
            raise AdminError(404, f"no {state}gateway connection" + (f" matching {gateway!r}" if gateway else ""))
        if len(candidates) > 1:
            raise AdminError(409, "several gateways are connected; name one")
        return candidates[0]

    # ---------------------------------------------------------------- pushes

    def clients(self) -> list[dict[str, Any]]:
        """Every client socket seen (the newest per client id), with whether it is connected now."""
        latest: dict[str, ClientSession] = {}
        for session in sorted([*self._finished_clients, *self._clients.values()], key=lambda s: s.conn_id):
            latest[session.client_id] = session
        return [{**s.to_json(), "connected": s.conn_id in self._clients} for s in latest.values()]

    def client_session(self, client: str | None = None, *, joined: bool = True) -> ClientSession:
        """The live client socket selected by client id or conn id; the only one when ``None``."""
        candidates = [s for s in self._clients.values() if s.joined or not joined]
        if client is not None:
            candidates = [s for s in candidates if client in (s.client_id, str(s.conn_id))]
        if not candidates:
            raise AdminError(404, "no client connection" + (f" matching {client!r}" if client else ""))
        if len(candidates) > 1:
            raise AdminError(409, "several clients are connected; name one")
        return candidates[0]

    def flows(self, *, client: str | None = None, state: str | None = None) -> list[Flow]:
        """Brokered flows, oldest first, optionally only one client's (client id) or in one state."""
        return [
            f
            for f in self._flows.values()
            if (client is None or f.client_id == client) and (state is None or f.state == state)
        ]

    async def wait_for_flow(self, resource_id: str, *, client: str | None = None, timeout: float = 20.0) -> Flow:
        """The newest flow for this resource (and client) once it is no longer pending; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [f for f in self.flows(client=client) if f.resource_id == resource_id]
            if matching and matching[-1].state != "pending":
                return matching[-1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no finished flow for resource {resource_id} within {timeout} s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _send(self, session: Session, frame: wire.Frame) -> None:
        await self._write(session, wire.encode(frame, session.serializer))
        self._record("sent", session, topic=frame.topic, event=frame.event, payload=frame.payload, ref=frame.ref)

    async def push(
        self, event: str, payload: Any, *, gateway: str | None = None, topic: str = "gateway", joined: bool = True
    ) -> GatewaySession:
        """A server push (ref null) to one gateway; with ``joined=False`` also to a socket without a live join."""
        session = self.session(gateway, joined=joined)
        await self._push(session, event, payload, topic=topic)
        return session

    async def _push(self, session: Session, event: str, payload: Any, *, topic: str = "gateway") -> None:
        await self._send(
            session, wire.Frame(topic=topic, event=event, payload=payload, ref=None, join_ref=session.join_ref)
        )

    async def send_raw(self, frame: str | bytes, *, gateway: str | None = None, joined: bool = True) -> None:
        """Any text (str) or binary (bytes) frame, unchecked: for malformed-frame tests."""
        session = self.session(gateway, joined=joined)
        await self._write(session, frame)
        self._record("sent", session, detail=f"raw {type(frame).__name__} frame, {len(frame)} units")

    async def _write(self, session: Session, frame: str | bytes) -> None:
        try:
            if isinstance(frame, bytes):
                await session.ws.send_bytes(frame)
            else:
                await session.ws.send_str(frame)
        except (ConnectionError, RuntimeError) as exc:
            # The gateway went away between our decision to write and the write; callers learn it as SocketGone.
            self._record("send_failed", session, detail=str(exc))
            raise SocketGone(session) from None

    def init_payload(self, session: GatewaySession) -> dict[str, Any]:
        """``init`` for this gateway (docs/protocol.md §2.1)."""
        ipv4, ipv6 = self._tunnel_ips_for(session.gateway_id, session.entry)
        return {
            "interface": {"ipv4": str(ipv4), "ipv6": str(ipv6)},
            "relays": self.config.relay_entries(session.public_key),
            "authorizations": self.config.authorizations_for_site(session.entry.site_id, self._wall_clock()),
            "account_slug": self.config.account_slug,
            "flow_logs": self.config.flow_logs.model_dump(),
            "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True},
        }

    def _tunnel_ips_for(
        self, gateway_id: str, entry: GatewayConfig
    ) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
        """Stable per gateway for the portal's lifetime: the token entry's addresses first, then the pool."""
        if gateway_id in self._tunnel_ips:
            return self._tunnel_ips[gateway_id]
        taken = set(self._tunnel_ips.values())
        used_v4 = {v4 for v4, _ in taken} | {g.ipv4 for g in self.config.gateways if g.ipv4}
        used_v6 = {v6 for _, v6 in taken} | {g.ipv6 for g in self.config.gateways if g.ipv6}
        ipv4 = entry.ipv4 if entry.ipv4 and entry.ipv4 not in {v4 for v4, _ in taken} else None
        ipv6 = entry.ipv6 if entry.ipv6 and entry.ipv6 not in {v6 for _, v6 in taken} else None
        while ipv4 is None or ipv6 is None:
            index = self._next_pool_host
            self._next_pool_host += 1
            candidate_v4 = TUNNEL_IPV4_POOL.network_address + index
            candidate_v6 = TUNNEL_IPV6_POOL.network_address + index
            if ipv4 is None and candidate_v4 not in used_v4:
                ipv4 = candidate_v4
            if ipv6 is None and candidate_v6 not in used_v6:
                ipv6 = candidate_v6
        self._tunnel_ips[gateway_id] = (ipv4, ipv6)
        return ipv4, ipv6

    def authorization_payload(
        self,
        session: GatewaySession,
        client_id: str,
        resource_id: str,
        *,
        expires_at: int | None | str = "default",
        client_public_key: str | None = None,
    ) -> dict[str, Any]:
        """A full ``create_authorization`` payload (docs/protocol.md §2.1) for a configured client and resource.

        ``client_public_key``: the key a connected client announced (default: the one in the config).
        """
        client = self.config.client(client_id)
        resource = self.config.resource(resource_id)
        client_key = client.public_key if client_public_key is None else client_public_key
        if expires_at == "default":
            expires_at = int(self._wall_clock()) + 14 * 24 * 3600
        assert expires_at is None or isinstance(expires_at, int)
        client_creds, gateway_creds = ice_credentials(client.id, client_key, session.gateway_id, session.public_key)
        psk = preshared_key(
            client.id,
            self.config.psk_base(client.id),
            client_key,
            session.gateway_id,
            self.config.psk_base(session.gateway_id),
            session.public_key,
        )
        ref = self._signing.sign_ref(
            {
                "client_id": client.id,
                "resource_id": resource.id,
                "gateway_id": session.gateway_id,
                "nonce": secrets.token_hex(8),
            }
        )
        now = int(self._wall_clock())
        flow_token = self._signing.jwt(
            {
                "account_id": self.config.account_id,
                "uploads_enabled": self.config.flow_logs.upload_interval_secs > 0,
                "role": "responder",
                "client_id": client.id,
                "gateway_id": session.gateway_id,
                "resource_id": resource.id,
                "actor_name": client.actor_name,
                "actor_email": client.actor_email,
                "iat": now,
            }
        )
        return {
            "ref": ref,
            "resource": resource.to_payload(),
            "client": {
                "id": client.id,
                "public_key": client_key,
                "preshared_key": psk,
                "ipv4": str(client.ipv4),
                "ipv6": str(client.ipv6),
                "version": client.version,
                "device_os_name": client.device_os_name,
                "device_os_version": client.device_os_version,
                "device_serial": None,
                "device_uuid": None,
                "firebase_installation_id": None,
                "identifier_for_vendor": None,
            },
            "client_ice_credentials": client_creds,
            "gateway_ice_credentials": gateway_creds,
            "expires_at": expires_at,
            "subject": {
                "actor_id": hashlib.sha256(client.actor_email.encode()).hexdigest()[:32],
                "actor_name": client.actor_name,
                "actor_email": client.actor_email,
                "actor_type": "account_user",
                "auth_provider_id": "dev-portal",
                "ip": "127.0.0.1",
                "ip_region": "Local",
                "ip_city": "Loopback",
                "ip_lat": 0.0,
                "ip_lon": 0.0,
                "user_agent": f"{client.device_os_name}/{client.device_os_version} connlib/{client.version}",
            },
            "use_iceless": False,
            "flow_logs_ingest_token": flow_token,
        }

    async def create_authorization(
        self,
        client_id: str,
        resource_id: str,
        *,
        gateway: str | None = None,
        expires_at: int | None | str = "default",
    ) -> dict[str, Any]:
        """Pushes ``create_authorization`` (``authorize_flow`` on a v1 socket); returns the payload sent."""
        session = self.session(gateway)
        payload = self.authorization_payload(session, client_id, resource_id, expires_at=expires_at)
        session.issued_refs.add(payload["ref"])
        await self._push(session, _AUTHORIZE_EVENT[session.socket_version], payload)
        return payload

    async def reject_access(self, client_id: str, resource_id: str, *, gateway: str | None = None) -> None:
        await self.push("reject_access", {"client_id": client_id, "resource_id": resource_id}, gateway=gateway)

    async def resource_updated(
        self, resource_id: str, *, filters: list[dict[str, Any]] | None = None, gateway: str | None = None
    ) -> list[GatewaySession]:
        """Pushes the resource (with replaced filters if given) to one gateway, or to every joined one like the portal."""
        payload = self.config.resource(resource_id).to_payload()
        if filters is not None:
            payload["filters"] = filters
        targets = [self.session(gateway)] if gateway is not None else [s for s in self.sessions if s.joined]
        for session in targets:
            await self._push(session, "resource_updated", payload)
        return targets

    async def relays_presence(
        self,
        *,
        disconnected_ids: list[str] | tuple[str, ...] = (),
        connected: list[str] | None = None,
        gateway: str | None = None,
    ) -> dict[str, Any]:
        """``connected``: relay ids from the config (credentials minted for the gateway); None = the init relays."""
        session = self.session(gateway)
        payload = {
            "disconnected_ids": list(disconnected_ids),
            "connected": self.config.relay_entries(session.public_key, connected),
        }
        await self._push(session, "relays_presence", payload)
        return payload

    async def disconnect(self, reason: str = "token_expired", *, gateway: str | None = None) -> None:
        """Pushes ``disconnect`` and stops the channel, as the portal does when the token is deleted."""
        session = self.session(gateway)
        await self._push(session, "disconnect", {"reason": reason})
        await self._close_session(session, code=1000, reason=f"disconnect {reason}")

    async def phx_close(self, *, gateway: str | None = None) -> None:
        """The channel stops (e.g. session not durable): ``phx_close`` on the gateway topic; the socket stays."""
        session = self.session(gateway)
        await self._push(session, "phx_close", {})
        session.joined = False

    async def push_init(self, *, gateway: str | None = None) -> dict[str, Any]:
        """Pushes ``init`` again (the portal does when the gateway's tunnel IPs or the account slug change)."""
        session = self.session(gateway)
        payload = self.init_payload(session)
        await self._push(session, "init", payload)
        return payload

    def forget_join(self, *, gateway: str | None = None) -> None:
        """The channel dies silently (no ``phx_close``): the gateway's next channel message gets "unmatched topic"."""
        self.session(gateway).joined = False

    async def drop(self, *, gateway: str | None = None, abort: bool = False, code: int = 1011) -> None:
        """Ends one socket: a WebSocket close frame with ``code``, or with ``abort`` a TCP reset without one."""
        session = self.session(gateway, joined=False)
        if abort:
            session.close_reason = "aborted by the portal"
            transport = session.request.transport
            if transport is not None:
                transport.abort()
        else:
            await self._close_session(session, code=code, reason="dropped by the portal")

    async def _close_session(self, session: Session, *, code: int, reason: str) -> None:
        session.close_reason = session.close_reason or reason
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.ws.close(code=code, message=reason.encode()[:120]), 3.0)
        if not session.ws.closed:
            transport = session.request.transport
            if transport is not None:
                transport.abort()

    # ---------------------------------------------------------------- the gateway socket

    async def _handle_v2(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_socket(request, "v2")

    async def _handle_v1(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_socket(request, "v1")

    def _reject(
        self, status: int, code: str, detail: str, retry_after: str | None = None, **fields: Any
    ) -> web.Response:
        self._record("rejected", status=status, detail=f"{code}: {detail}", **fields)
        log.info("refused a gateway upgrade: %s %s (%s)", status, code, detail)
        return _problem(status, code, detail, retry_after)

    async def _handle_socket(self, request: web.Request, socket_version: str) -> web.StreamResponse:
        query = dict(request.query)
        external_id = query.get("external_id") or query.get("firezone_id") or ""
        if self.faults.refuse_connections:
            self._record("refused", external_id=external_id or None, detail="simulated downtime")
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing may be written on an aborted connection

        if self.faults.reject_remaining > 0:
            self.faults.reject_remaining -= 1
            return self._reject(
                self.faults.reject_status,
                self.faults.reject_code,
                self.faults.reject_detail,
                self.faults.reject_retry_after,
                external_id=external_id or None,
            )

        token, subprotocol = _bearer_token(request)
        if token is None:
            return self._reject(401, "missing_token", "No token was provided", external_id=external_id or None)
        entry = self.config.find_gateway(token, external_id)
        if entry is None:
            return self._reject(
                401, "invalid_token", "The token is invalid or expired", external_id=external_id or None
            )

        try:
            serializer = wire.serializer_for_vsn(query.get("vsn"))
        except ValueError as exc:
            return self._reject(400, "invalid_connect_params", str(exc), external_id=external_id or None)
        errors = []
        if not external_id:
            errors.append("external_id: can't be blank")
        public_key = query.get("public_key", "")
        if not is_valid_public_key(public_key):
            errors.append("public_key: is invalid")
        if errors:
            return self._reject(400, "invalid_connect_params", "; ".join(errors), external_id=external_id or None)

        identity = (hashlib.sha256(token.encode()).hexdigest(), external_id)
        if any(s.identity == identity for s in self._sessions.values()):
            return self._reject(
                409, "gateway_already_connected", "This gateway is already connected", external_id=external_id
            )

        ws = web.WebSocketResponse(
            timeout=3.0,
            autoping=True,
            heartbeat=None,
            compress=False,
            max_msg_size=MAX_INBOUND_FRAME,
            protocols=(subprotocol,) if subprotocol else (),
        )
        await ws.prepare(request)
        user_agent = request.headers.get("User-Agent", "")
        session = GatewaySession(
            conn_id=next(self._conn_ids),
            identity=identity,
            entry=entry,
            gateway_id=self.config.gateway_device_id(entry, external_id),
            external_id=external_id,
            name=query.get("name") or f"gateway-{secrets.token_hex(3)}",
            public_key=public_key,
            user_agent=user_agent,
            version=gateway_version_from_user_agent(user_agent),
            socket_version=socket_version,
            serializer=serializer,
            remote=request.remote,
            query=query,
            ws=ws,
            request=request,
            connected_at=self._wall_clock(),
        )
        self._sessions[session.conn_id] = session
        self._record("connected", session, detail=f"{socket_version} {serializer.value} {user_agent}")
        log.info("gateway %s (%s) connected, conn %d", session.name, session.external_id, session.conn_id)
        try:
            await self._serve(session, self._handle_text)
        finally:
            self._sessions.pop(session.conn_id, None)
            self._finished.append(session)
            session.joined = False
            session.closed_at = self._wall_clock()
            if session.close_reason is None:
                session.close_reason = f"closed by the gateway ({ws.close_code})"
            self._record("closed", session, detail=session.close_reason, status=ws.close_code)
            log.info("gateway %s conn %d closed: %s", session.name, session.conn_id, session.close_reason)
            for flow in [f for f in self._pending_flows.values() if f.gateway_conn_id == session.conn_id]:
                self._spawn(self._fail_flow(flow, "offline"))
        return ws

    async def _serve(self, session: Session, handle: Callable[[Any, str], Awaitable[None]]) -> None:
        ws = session.ws
        while not ws.closed:
            try:
                message = await ws.receive(timeout=self.config.idle_timeout)
            except TimeoutError:
                await self._close_session(session, code=1000, reason="idle timeout")
                return
            if message.type == WSMsgType.TEXT:
                try:
                    await handle(session, message.data)
                except SocketGone:
                    return
            elif message.type == WSMsgType.BINARY:
                self._record("invalid", session, detail=f"binary frame of {len(message.data)} bytes ignored")
            elif message.type == WSMsgType.ERROR:
                session.close_reason = session.close_reason or f"socket error: {ws.exception()}"
                return
            else:  # CLOSE, CLOSING, CLOSED
                return

    async def _handle_text(self, session: GatewaySession, text: str) -> None:
        try:
            frame = wire.decode(text, session.serializer)
        except wire.FrameError as exc:
            self._record("invalid", session, detail=f"{exc}; frame starts {text[:80]!r}")
            log.debug("ignored an undecodable frame from %s: %s", session.name, exc)
            return
        self._record("received", session, topic=frame.topic, event=frame.event, payload=frame.payload, ref=frame.ref)
        log.debug("from %s: %s %s ref=%s", session.name, frame.topic, frame.event, frame.ref)

        if frame.topic == "phoenix" and frame.event == "heartbeat":
            if self.faults.answer_heartbeats:
                await self._send(session, wire.reply(frame, "ok", {}))
            return
        if frame.event == "phx_join":
            await self._handle_join(session, frame)
            return
        if frame.topic != "gateway" or not session.joined:
            await self._send(session, wire.reply(frame, "error", {"reason": "unmatched topic"}))
            return
        await self._handle_gateway_event(session, frame)

    async def _handle_join(self, session: GatewaySession, frame: wire.Frame) -> None:
        if frame.topic != "gateway":
            await self._send(session, wire.reply(frame, "error", {"reason": "unmatched topic"}))
            return
        if self.faults.join_reply == "ignore":
            return
        if self.faults.join_reply == "error":
            await self._send(session, wire.reply(frame, "error", {"reason": "join refused by the dev portal"}))
            return
        session.joined = True
        session.join_ref = frame.join_ref if frame.join_ref is not None else frame.ref
        if session.serializer is wire.Serializer.V1:
            session.join_ref = None
        await self._send(session, wire.reply(frame, "ok", {}))
        log.info("gateway %s joined (conn %d)", session.name, session.conn_id)
        if self.faults.push_init:
            await self._push(session, "init", self.init_payload(session))

    async def _handle_gateway_event(self, session: GatewaySession, frame: wire.Frame) -> None:
        event = frame.event
        if event == "phx_leave":
            session.joined = False
            await self._send(session, wire.reply(frame, "ok", {}))
            return
        if event == _AUTHORIZED_EVENT[session.socket_version]:
            ref = frame.payload.get("ref") if isinstance(frame.payload, dict) else None
            if isinstance(ref, str) and ref in session.issued_refs and self._signing.verify_ref(ref):
                await self._send(session, wire.reply(frame, "ok", {}))
                flow = self._pending_flows.get(ref)
                if flow is not None and flow.gateway_conn_id == session.conn_id:
                    await self._complete_flow(flow, session)
            else:
                await self._send(session, wire.reply(frame, "error", {"reason": "invalid_ref"}))
            return
        if event in _COMMON_GATEWAY_EVENTS:
            await self._send(session, wire.reply(frame, "ok", {}))
            if event == "no_relays":
                # As the real portal (docs/protocol.md §2.3): fresh relays, nothing else. A flow the gateway could not
                # confirm for want of a relay stays pending: the client asks again (and gets this gateway, now with
                # relays) or the flow fails ``offline`` at the authorization timeout.
                payload = {"disconnected_ids": [], "connected": self.config.relay_entries(session.public_key)}
                await self._push(session, "relays_presence", payload)
            elif event in _CANDIDATE_EVENTS:
                await self._forward_gateway_candidates(session, _CANDIDATE_EVENTS[event], frame.payload)
            return
        await self._send(session, wire.reply(frame, "error", {"reason": "unknown_message"}))

    # ---------------------------------------------------------------- the client socket and brokering

    async def _handle_client_socket(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        if self.faults.refuse_connections:
            self._record("refused", detail="client: simulated downtime")
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        token, subprotocol = _bearer_token(request)
        if token is None:
            return self._reject(401, "missing_token", "No token was provided")
        entry = self.config.find_client(token)
        if entry is None:
            return self._reject(401, "invalid_token", "The token is invalid or expired")
        try:
            serializer = wire.serializer_for_vsn(query.get("vsn"))
        except ValueError as exc:
            return self._reject(400, "invalid_connect_params", str(exc), client_id=entry.id)
        public_key = query.get("public_key", "")
        if not is_valid_public_key(public_key):
            return self._reject(400, "invalid_connect_params", "public_key: is invalid", client_id=entry.id)
        if entry.id in self._client_by_id:
            return self._reject(409, "client_already_connected", "This client is already connected", client_id=entry.id)

        ws = web.WebSocketResponse(
            timeout=3.0,
            autoping=True,
            heartbeat=None,
            compress=False,
            max_msg_size=MAX_INBOUND_FRAME,
            protocols=(subprotocol,) if subprotocol else (),
        )
        await ws.prepare(request)
        session = ClientSession(
            conn_id=next(self._conn_ids),
            entry=entry,
            public_key=public_key,
            user_agent=request.headers.get("User-Agent", ""),
            serializer=serializer,
            remote=request.remote,
            ws=ws,
            request=request,
            connected_at=self._wall_clock(),
        )
        self._clients[session.conn_id] = session
        self._client_by_id[session.client_id] = session
        self._record("connected", session, detail=f"client {serializer.value} {session.user_agent}")
        log.info("client %s connected, conn %d", session.client_id, session.conn_id)
        try:
            await self._serve(session, self._handle_client_text)
        finally:
            self._clients.pop(session.conn_id, None)
            if self._client_by_id.get(session.client_id) is session:
                del self._client_by_id[session.client_id]
            self._finished_clients.append(session)
            del self._finished_clients[:-MAX_FINISHED_CLIENTS]
            session.joined = False
            session.closed_at = self._wall_clock()
            if session.close_reason is None:
                session.close_reason = f"closed by the client ({ws.close_code})"
            self._record("closed", session, detail=session.close_reason, status=ws.close_code)
            log.info("client %s conn %d closed: %s", session.client_id, session.conn_id, session.close_reason)
            for flow in [f for f in self._pending_flows.values() if f.client_conn_id == session.conn_id]:
                self._finish_flow(flow, "abandoned", "the client left")
        return ws

    async def _handle_client_text(self, session: ClientSession, text: str) -> None:
        try:
            frame = wire.decode(text, session.serializer)
        except wire.FrameError as exc:
            self._record("invalid", session, detail=f"{exc}; frame starts {text[:80]!r}")
            return
        self._record("received", session, topic=frame.topic, event=frame.event, payload=frame.payload, ref=frame.ref)
        if frame.topic == "phoenix" and frame.event == "heartbeat":
            if self.faults.answer_heartbeats:
                await self._send(session, wire.reply(frame, "ok", {}))
            return
        if frame.event == "phx_join" and frame.topic == CLIENT_TOPIC:
            session.joined = True
            join_ref = frame.join_ref if frame.join_ref is not None else frame.ref
            session.join_ref = None if session.serializer is wire.Serializer.V1 else join_ref
            await self._send(session, wire.reply(frame, "ok", {}))
            await self._push(session, "init", self.client_init_payload(session), topic=CLIENT_TOPIC)
            return
        if frame.topic != CLIENT_TOPIC or not session.joined:
            await self._send(session, wire.reply(frame, "error", {"reason": "unmatched topic"}))
            return
        if frame.event == "phx_leave":
            session.joined = False
            await self._send(session, wire.reply(frame, "ok", {}))
        elif frame.event == "create_flow":
            await self._create_flow(session, frame)
        elif frame.event in _CANDIDATE_EVENTS:
            await self._send(session, wire.reply(frame, "ok", {}))
            await self._forward_client_candidates(session, _CANDIDATE_EVENTS[frame.event], frame.payload)
        elif frame.event == "no_relays":
            # The client ran out of relays: fresh ones for its key, as the real portal answers (docs/protocol.md §2.3).
            await self._send(session, wire.reply(frame, "ok", {}))
            payload = {"disconnected_ids": [], "connected": self.config.relay_entries(session.public_key)}
            await self._push(session, "relays_presence", payload, topic=CLIENT_TOPIC)
        else:
            await self._send(session, wire.reply(frame, "error", {"reason": "unknown_message"}))

    def client_init_payload(self, session: ClientSession) -> dict[str, Any]:
        """The client's ``init``: its tunnel addresses (from the config), every resource, relays for its key."""
        return {
            "interface": {"ipv4": str(session.entry.ipv4), "ipv6": str(session.entry.ipv6)},
            "resources": [self.config.client_resource_payload(r) for r in self.config.resources],
            "relays": self.config.relay_entries(session.public_key),
        }

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pick_gateway(self, resource: ResourceConfig, connected_ids: list[str]) -> GatewaySession | None:
        """A joined gateway of the resource's site: one the client already talks to, else the least loaded."""
        eligible = [s for s in self._sessions.values() if s.joined and resource.site_id in (None, s.entry.site_id)]
        for session in eligible:
            if session.gateway_id in connected_ids:
                return session
        if not eligible:
            return None
        return min(eligible, key=lambda s: (self._gateway_load[s.conn_id], s.conn_id))

    def _add_flow(self, flow: Flow) -> None:
        self._flows[flow.flow_id] = flow
        if len(self._flows) > MAX_FLOWS_KEPT:
            for flow_id in [i for i, f in self._flows.items() if f.state != "pending"][: MAX_FLOWS_KEPT // 10]:
                self._forget_live(self._flows.pop(flow_id))

    def _make_live(self, flow: Flow) -> None:
        assert flow.gateway_id is not None and flow.gateway_conn_id is not None
        self._live_flows[flow.flow_id] = flow
        self._live_pairs[(flow.client_id, flow.gateway_id)] += 1
        self._gateway_load[flow.gateway_conn_id] += 1

    def _forget_live(self, flow: Flow) -> None:
        if self._live_flows.pop(flow.flow_id, None) is None:
            return
        assert flow.gateway_id is not None and flow.gateway_conn_id is not None
        pair = (flow.client_id, flow.gateway_id)
        self._live_pairs[pair] -= 1
        if self._live_pairs[pair] <= 0:
            del self._live_pairs[pair]
        self._gateway_load[flow.gateway_conn_id] -= 1
        if self._gateway_load[flow.gateway_conn_id] <= 0:
            del self._gateway_load[flow.gateway_conn_id]

    async def _create_flow(self, session: ClientSession, frame: wire.Frame) -> None:
        payload = frame.payload if isinstance(frame.payload, dict) else {}
        resource_id = payload.get("resource_id")
        if not isinstance(resource_id, str):
            await self._send(session, wire.reply(frame, "error", {"reason": "invalid_payload"}))
            return
        await self._send(session, wire.reply(frame, "ok", {}))
        earlier = self._pending_by_resource.get((session.conn_id, resource_id))
        if earlier is not None:
            # Asking again replaces the request and its timeout, without an answer for the earlier one (as the real
            # portal, §2.3); the gateway may still confirm the earlier ref, which is then acknowledged and ignored.
            self._finish_flow(earlier, "superseded", "asked again")
        flow = Flow(next(self._flow_ids), session.conn_id, session.client_id, resource_id, self._wall_clock())
        self._add_flow(flow)
        if self._pending_by_client[session.conn_id] >= MAX_PENDING_FLOWS_PER_CLIENT:
            await self._fail_flow(flow, "too_many_requests")
            return
        try:
            resource = self.config.resource(resource_id)
        except KeyError:
            await self._fail_flow(flow, "not_found")
            return
        gateway = self._pick_gateway(resource, _strings(payload.get("connected_gateway_ids"), MAX_BROADCAST_TARGETS))
        if gateway is None:
            await self._fail_flow(flow, "offline")
            return
        authorization = self.authorization_payload(
            gateway, session.client_id, resource_id, client_public_key=session.public_key
        )
        flow.gateway_id, flow.gateway_conn_id = gateway.gateway_id, gateway.conn_id
        flow.ref, flow.authorization = authorization["ref"], authorization
        gateway.issued_refs.add(authorization["ref"])
        self._pending_flows[authorization["ref"]] = flow
        self._pending_by_resource[(flow.client_conn_id, flow.resource_id)] = flow
        self._pending_by_client[flow.client_conn_id] += 1
        self._make_live(flow)
        flow.timer = asyncio.get_running_loop().call_later(
            self.config.authorization_timeout, self._on_flow_timeout, authorization["ref"]
        )
        log.info("client %s asks for %s: brokering via gateway %s", session.client_id, resource_id, gateway.name)
        try:
            await self._push(gateway, _AUTHORIZE_EVENT[gateway.socket_version], authorization)
        except SocketGone:
            await self._fail_flow(flow, "offline")

    def _on_flow_timeout(self, ref: str) -> None:
        flow = self._pending_flows.get(ref)
        if flow is not None:
            flow.timer = None
            self._spawn(self._fail_flow(flow, "offline"))

    def _finish_flow(self, flow: Flow, state: str, reason: str | None) -> None:
        if flow.ref is not None and self._pending_flows.pop(flow.ref, None) is not None:
            key = (flow.client_conn_id, flow.resource_id)
            if self._pending_by_resource.get(key) is flow:
                del self._pending_by_resource[key]
            self._pending_by_client[flow.client_conn_id] -= 1
            if self._pending_by_client[flow.client_conn_id] <= 0:
                del self._pending_by_client[flow.client_conn_id]
        if state not in ("pending", "created"):
            self._forget_live(flow)
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        flow.state, flow.reason, flow.finished_at = state, reason, self._wall_clock()
        self._changed.set()
        self._changed = asyncio.Event()

    async def _fail_flow(self, flow: Flow, reason: str) -> None:
        """``flow_creation_failed`` to the client (docs/protocol.md §2.1 step 5: ``offline`` after 15 s)."""
        if flow.state != "pending":
            return
        self._finish_flow(flow, "failed", reason)
        log.info("flow %d (%s for %s) failed: %s", flow.flow_id, flow.resource_id, flow.client_id, reason)
        client = self._clients.get(flow.client_conn_id)
        if client is not None:
            with contextlib.suppress(SocketGone):
                payload = {"resource_id": flow.resource_id, "reason": reason}
                await self._push(client, "flow_creation_failed", payload, topic=CLIENT_TOPIC)

    async def _complete_flow(self, flow: Flow, gateway: GatewaySession) -> None:
        client = self._clients.get(flow.client_conn_id)
        if client is None:
            self._finish_flow(flow, "abandoned", "the client left")
            return
        assert flow.authorization is not None
        ipv4, ipv6 = self._tunnel_ips_for(gateway.gateway_id, gateway.entry)
        payload = {
            "resource_id": flow.resource_id,
            "gateway_id": gateway.gateway_id,
            "site_id": gateway.entry.site_id,
            "gateway_public_key": gateway.public_key,
            "gateway_ipv4": str(ipv4),
            "gateway_ipv6": str(ipv6),
            "preshared_key": flow.authorization["client"]["preshared_key"],
            "client_ice_credentials": flow.authorization["client_ice_credentials"],
            "gateway_ice_credentials": flow.authorization["gateway_ice_credentials"],
            "relays": self.config.relay_entries(client.public_key),
        }
        flow.flow_created = payload
        self._finish_flow(flow, "created", None)
        self._push_soon(client, "flow_created", payload, topic=CLIENT_TOPIC)

    def _push_soon(self, session: Session, event: str, payload: Any, *, topic: str) -> None:
        """Pushes from a task of its own: a gateway's frames (its heartbeats among them) are not held up while one
        slow client's socket drains. Tasks start in the order they were made, so one client's pushes keep theirs."""

        async def push() -> None:
            with contextlib.suppress(SocketGone):
                await self._push(session, event, payload, topic=topic)

        self._spawn(push())

    def _flow_between(self, client_id: str, gateway_id: str) -> bool:
        """Whether the portal brokered (or is brokering) this pair: candidates only flow between such peers."""
        return (client_id, gateway_id) in self._live_pairs

    async def _forward_client_candidates(self, session: ClientSession, event: str, payload: Any) -> None:
        """``broadcast_(invalidated_)ice_candidates`` {gateway_ids, candidates} → each gateway, with our client id."""
        body = payload if isinstance(payload, dict) else {}
        candidates = _strings(body.get("candidates"), MAX_FORWARDED_CANDIDATES)
        if not candidates:
            return
        for gateway_id in _strings(body.get("gateway_ids"), MAX_BROADCAST_TARGETS):
            if not self._flow_between(session.client_id, gateway_id):
                log.debug("client %s sent candidates for gateway %s it has no flow with", session.client_id, gateway_id)
                continue
            for gateway in [s for s in self._sessions.values() if s.joined and s.gateway_id == gateway_id]:
                with contextlib.suppress(SocketGone):
                    await self._push(gateway, event, {"client_id": session.client_id, "candidates": candidates})

    async def _forward_gateway_candidates(self, session: GatewaySession, event: str, payload: Any) -> None:
        """``broadcast_(invalidated_)ice_candidates`` {client_ids, candidates} → each client, with the gateway id."""
        body = payload if isinstance(payload, dict) else {}
        candidates = _strings(body.get("candidates"), MAX_FORWARDED_CANDIDATES)
        if not candidates:
            return
        for client_id in _strings(body.get("client_ids"), MAX_BROADCAST_TARGETS):
            if not self._flow_between(client_id, session.gateway_id):
                continue
            client = self._client_by_id.get(client_id)
            if client is not None and client.joined:
                body = {"gateway_id": session.gateway_id, "candidates": candidates}
                self._push_soon(client, event, body, topic=CLIENT_TOPIC)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminApi:
    """JSON endpoints under ``/admin/`` (see lab/portal/README section in :mod:`lab.portal`)."""

    def __init__(self, portal: DevPortal) -> None:
        self.portal = portal

    def register(self, router: web.UrlDispatcher) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/admin/gateways", self.gateways),
            ("GET", "/admin/clients", self.clients),
            ("GET", "/admin/flows", self.flows),
            ("GET", "/admin/events", self.events),
            ("GET", "/admin/wait", self.wait),
            ("GET", "/admin/faults", self.get_faults),
            ("POST", "/admin/faults", self.set_faults),
            ("POST", "/admin/init", self.init),
            ("POST", "/admin/push", self.push),
            ("POST", "/admin/raw", self.raw),
            ("POST", "/admin/create_authorization", self.create_authorization),
            ("POST", "/admin/reject_access", self.reject_access),
            ("POST", "/admin/resource_updated", self.resource_updated),
            ("POST", "/admin/relays_presence", self.relays_presence),
            ("POST", "/admin/disconnect", self.disconnect),
            ("POST", "/admin/phx_close", self.phx_close),
            ("POST", "/admin/drop", self.drop),
        ]
        for method, path, handler in routes:
            router.add_route(method, path, self._wrap(handler))

    @staticmethod
    def _wrap(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except AdminError as exc:
                return web.json_response({"error": str(exc)}, status=exc.status)
            except KeyError as exc:
                return web.json_response({"error": str(exc.args[0]) if exc.args else "not found"}, status=404)
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)

        return wrapped

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise AdminError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise AdminError(400, "the body must be a JSON object")
        return body

    async def gateways(self, request: web.Request) -> web.Response:
        return web.json_response({"gateways": self.portal.gateways()})

    async def clients(self, request: web.Request) -> web.Response:
        return web.json_response({"clients": self.portal.clients()})

    async def flows(self, request: web.Request) -> web.Response:
        """Brokered flows; filters ``client`` (client id) and ``state`` (pending, created, failed, abandoned)."""
        found = self.portal.flows(client=request.query.get("client"), state=request.query.get("state"))
        return web.json_response({"flows": [f.to_json() for f in found]})

    def _filters(self, request: web.Request) -> dict[str, Any]:
        query = request.query
        return {
            "since": int(query.get("since", "0")),
            "kind": query.get("kind"),
            "event": query.get("event"),
            "gateway": query.get("gateway"),
            "conn_id": int(query["conn_id"]) if "conn_id" in query else None,
            "client": query.get("client"),
        }

    async def events(self, request: web.Request) -> web.Response:
        """The log, filtered; with ``timeout`` it long-polls until at least one entry matches."""
        filters = self._filters(request)
        timeout = float(request.query.get("timeout", "0"))
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await self.portal.wait_for(**filters, timeout=timeout)
        found = self.portal.events(**filters)
        return web.json_response({"events": [e.to_json() for e in found], "next_seq": self.portal.next_seq})

    async def wait(self, request: web.Request) -> web.Response:
        """The first matching entry, or 504 after ``timeout`` seconds (default 10)."""
        filters = self._filters(request)
        timeout = float(request.query.get("timeout", "10"))
        try:
            found = await self.portal.wait_for(**filters, timeout=timeout)
        except TimeoutError as exc:
            return web.json_response({"error": str(exc)}, status=504)
        return web.json_response({"event": found.to_json(), "next_seq": self.portal.next_seq})

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.portal.faults.to_json())

    async def set_faults(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.portal.faults.update(body)
        return web.json_response(self.portal.faults.to_json())

    async def init(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return web.json_response(await self.portal.push_init(gateway=body.get("gateway")))

    async def push(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        event = body.get("event")
        if not isinstance(event, str):
            raise AdminError(400, "event (string) is required")
        session = await self.portal.push(
            event,
            body.get("payload", {}),
            gateway=body.get("gateway"),
            topic=body.get("topic", "gateway"),
            joined=bool(body.get("joined", True)),
        )
        return web.json_response({"conn_id": session.conn_id})

    async def raw(self, request: web.Request) -> web.Response:
        """One of ``text`` (sent verbatim), ``json`` (any JSON value, serialised as is) or ``binary_b64``."""
        body = await self._body(request)
        frame: str | bytes
        if "text" in body:
            frame = str(body["text"])
        elif "json" in body:
            frame = json.dumps(body["json"])
        elif "binary_b64" in body:
            frame = base64.b64decode(body["binary_b64"])
        else:
            raise AdminError(400, "give text, json or binary_b64")
        await self.portal.send_raw(frame, gateway=body.get("gateway"), joined=bool(body.get("joined", True)))
        return web.json_response({"sent": len(frame)})

    async def create_authorization(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        expires_at = body.get("expires_at", "default")
        payload = await self.portal.create_authorization(
            body["client_id"], body["resource_id"], gateway=body.get("gateway"), expires_at=expires_at
        )
        return web.json_response(payload)

    async def reject_access(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self.portal.reject_access(body["client_id"], body["resource_id"], gateway=body.get("gateway"))
        return web.json_response({})

    async def resource_updated(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        targets = await self.portal.resource_updated(
            body["resource_id"], filters=body.get("filters"), gateway=body.get("gateway")
        )
        return web.json_response({"conn_ids": [s.conn_id for s in targets]})

    async def relays_presence(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        payload = await self.portal.relays_presence(
            disconnected_ids=body.get("disconnected_ids", []),
            connected=body.get("connected"),
            gateway=body.get("gateway"),
        )
        return web.json_response(payload)

    async def disconnect(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self.portal.disconnect(body.get("reason", "token_expired"), gateway=body.get("gateway"))
        return web.json_response({})

    async def phx_close(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self.portal.phx_close(gateway=body.get("gateway"))
        return web.json_response({})

    async def drop(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self.portal.drop(
            gateway=body.get("gateway"), abort=bool(body.get("abort", False)), code=int(body.get("code", 1011))
        )
        return web.json_response({})
