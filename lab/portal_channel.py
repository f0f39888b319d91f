"""What the lab's portal clients share: the headless client (:mod:`lab.client`) and the load generator's identities
(:mod:`lab.loadgen`) both drive a Phoenix ``client`` channel over one WebSocket at a time, a Node with one timer, and
announce the candidates their Node gathers with one portal push per (kind, gateway).

:class:`PortalChannelDriver` is the channel's I/O: a session opens the WebSocket, joins, hands every channel event to
the owner, keeps the channel's deadline (join timeout, heartbeat) on one loop timer and ends when the socket closes, the
link hiccups or the channel fails. Reconnecting is the owner's choice (its policy differs: the headless client backs
off as the gateway does, a load identity only retries until it connected).

:class:`FlowRequests` keeps the ``create_flow`` requests the portal has not answered and says when to ask again, the
way Firezone's client does (docs/protocol.md §2.3): the portal answers only with ``flow_created`` or
``flow_creation_failed``, and a gateway that could not confirm (``no_relays``) is not reported, so the client asks
again while it still wants the resource, at most once per 2 s, each ask replacing the last at the portal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from agent.looptimer import DeadlineTimer
from agent.portal import classify_rejection
from dataplane.node import CandidateGathered, CandidateInvalidated, Node
from protocol.errors import PortalError
from protocol.phoenix import ChannelEvent, ChannelFailed, LinkHiccuped, PhoenixChannel

CLIENT_TOPIC = "client"
CLIENT_SOCKET_PATH = "/client/websocket"


def client_socket_url(portal: str, public_key_b64: str) -> str:
    """The client channel's WebSocket URL under the portal's base URL; the key identifies this client (§2.3)."""
    return f"{portal.rstrip('/')}{CLIENT_SOCKET_PATH}?{urlencode({'public_key': public_key_b64})}"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """Why one portal session ended."""

    reason: str
    """``the socket closed``, the channel event (``LinkHiccuped``, ``ChannelFailed``) or the exception's type."""
    detail: str = ""
    fatal: bool = False
    """The portal refused our token (HTTP 401) or rejected the join: trying again cannot help."""
    retry_after: float | None = None
    """The portal's ``Retry-After`` on a refused upgrade, in seconds."""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class PortalChannelDriver:
    """One Phoenix channel to the portal, driven on the event loop.

    ``on_event`` gets every channel event (pushes, joined, hiccup, failure) as it happens; ``after_input`` runs once
    after each batch of input (a frame or the channel's timer), when the owner flushes its Node."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        url: str,
        token: str,
        on_event: Callable[[ChannelEvent], None],
        after_input: Callable[[], None],
        open_timeout: float,
    ) -> None:
        self.loop = loop
        self.url = url
        self._token = token
        self._on_event = on_event
        self._after_input = after_input
        self._open_timeout = open_timeout
        self.channel = PhoenixChannel(topic=CLIENT_TOPIC)
        # Frames for the session's sender; None asks it to close the socket (the channel gave the link up).
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._timer = DeadlineTimer(loop, self._channel_deadline, self._on_timer)
        self._ended_by: ChannelEvent | None = None

    @property
    def joined(self) -> bool:
        return self.channel.joined

    def push(self, event: str, payload: Any) -> bool:
        """Sends an application message on the channel (False: not connected, dropped by the channel)."""
        accepted = self.channel.push(event, payload, self.loop.time())
        self.flush()
        return accepted

    async def session(self) -> SessionEnd:
        """One WebSocket to the portal, from the upgrade until it closes; returns why it ended."""
        headers = {"X-Authorization": f"Bearer {self._token}"}
        self._outbox = asyncio.Queue()
        self._ended_by = None
        try:
            # proxy=None: the lab portal is never behind a proxy, and looking one up reads the environment per socket.
            async with ws_connect(
                self.url, additional_headers=headers, open_timeout=self._open_timeout, proxy=None
            ) as ws:
                sender = self.loop.create_task(self._send_frames(ws))
                # A send that fails on a dying socket ends the sender; the receiving loop reports the close.
                sender.add_done_callback(lambda task: task.cancelled() or task.exception())
                try:
                    self.channel.connect(self.loop.time())
                    self._handle_input()
                    async for frame in ws:
                        self.channel.receive_text(frame, self.loop.time())
                        self._handle_input()
                finally:
                    sender.cancel()
        except InvalidStatus as exc:
            response = exc.response
            verdict = classify_rejection(
                response.status_code, dict(response.headers.raw_items()), bytes(response.body or b""), time.time()
            )
            if isinstance(verdict, PortalError):
                return SessionEnd("InvalidStatus", str(verdict), fatal=True)
            return SessionEnd("InvalidStatus", str(verdict), retry_after=verdict.retry_after)
        except (OSError, TimeoutError, WebSocketException) as exc:
            return SessionEnd(type(exc).__name__, str(exc))
        finally:
            self.channel.connection_lost(self.loop.time())
            self.cancel_timer()
        if isinstance(self._ended_by, ChannelFailed):
            return SessionEnd("ChannelFailed", self._ended_by.detail, fatal=True)
        if isinstance(self._ended_by, LinkHiccuped):
            return SessionEnd("LinkHiccuped", self._ended_by.reason.value)
        return SessionEnd("the socket closed")

    async def _send_frames(self, ws: ClientConnection) -> None:
        while (frame := await self._outbox.get()) is not None:
            await ws.send(frame)
        await ws.close()

    def _handle_input(self) -> None:
        while (event := self.channel.poll_event()) is not None:
            if isinstance(event, LinkHiccuped | ChannelFailed) and self._ended_by is None:
                self._ended_by = event
            self._on_event(event)
        self.flush()
        if self._ended_by is not None:
            self._outbox.put_nowait(None)  # after the frames the channel emitted on its way down
        self._after_input()

    def flush(self) -> None:
        """Queues the channel's frames for the socket and re-arms its timer."""
        while (frame := self.channel.poll_send()) is not None:
            self._outbox.put_nowait(frame)
        self._timer.arm()

    def _channel_deadline(self) -> float | None:
        deadline = self.channel.poll_timeout()
        return None if deadline is None else deadline[0]

    def _on_timer(self, now: float) -> None:
        self.channel.handle_timeout(now)
        self._handle_input()

    def cancel_timer(self) -> None:
        self._timer.cancel()


class NodeTimer(DeadlineTimer):
    """A Node's one timer on the event loop: due at ``node.poll_timeout()``, it runs ``handle_timeout`` and then
    ``after`` (the owner's flush, which re-arms it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, node: Node, after: Callable[[], None]) -> None:
        def on_due(now: float) -> None:
            node.handle_timeout(now)
            after()

        super().__init__(loop, node.poll_timeout, on_due)
        self.node = node


class CandidateAnnouncements:
    """The candidates one Node poll gathered or invalidated, grouped per (kind, connection) into one portal push each:
    ``broadcast_ice_candidates`` / ``broadcast_invalidated_ice_candidates`` to that gateway (§2.3)."""

    def __init__(self) -> None:
        self._sdps: dict[tuple[str, str], list[str]] = {}

    def add(self, event: object) -> bool:
        """Takes ``event`` if it is a candidate event (True); anything else is the caller's (False)."""
        if isinstance(event, CandidateGathered):
            kind = "broadcast_ice_candidates"
        elif isinstance(event, CandidateInvalidated):
            kind = "broadcast_invalidated_ice_candidates"
        else:
            return False
        self._sdps.setdefault((kind, event.connection_id), []).append(event.candidate.to_sdp())
        return True

    def push_to(self, portal: PortalChannelDriver) -> None:
        now = portal.loop.time()
        for (kind, gateway_id), sdps in self._sdps.items():
            portal.channel.push(kind, {"gateway_ids": [gateway_id], "candidates": sdps}, now)
        if self._sdps:
            portal.flush()
        self._sdps.clear()


FLOW_REQUEST_SPACING = 2.0
"""Firezone's client asks the portal for a resource at most once per 2 s (docs/protocol.md §2.3)."""
FLOW_DEMAND_OFFSETS: tuple[float, ...] = (0.0, 1.0, 3.0, 7.0, 15.0)
"""When the lab's identities want a resource after first asking, in s: what makes Firezone's client ask again is the
application's next packet, and the lab plays an application opening a TCP connection: its SYN and the retransmissions
(initial RTO 1 s, doubled each time). Through :data:`FLOW_REQUEST_SPACING` that asks at 0, 3, 7 and 15 s."""
FLOW_ANSWER_TIMEOUT = 15.0
"""The portal answers ``flow_creation_failed`` ``offline`` this long after the last ask at the latest (§2.3)."""
FLOW_ANSWER_GRACE = 5.0
MAX_FLOW_REQUESTS = 64
"""Unanswered requests one client keeps (a resource asked for beyond that is refused locally)."""


@dataclass
class _FlowRequest:
    first_asked_at: float
    last_asked_at: float
    asks: int = 1
    demands: int = 1
    """How many of :data:`FLOW_DEMAND_OFFSETS` have passed (the first is the first ask)."""


@dataclass(frozen=True, slots=True)
class FlowRequestDue:
    """What :meth:`FlowRequests.handle_timeout` found due for one resource."""

    resource_id: str
    ask_again: bool
    """True: send ``create_flow`` again (this is ask number ``asks``); False: give up, no answer will come."""
    asks: int


class FlowRequests:
    """The client's unanswered ``create_flow`` requests, by resource id, and when each is asked again (sans-IO: the
    caller passes ``now`` and drives the timer from :meth:`poll_timeout`).

    Like Firezone's client (its pending authorizations) a request is asked again when the resource is wanted again
    and the last ask is at least :data:`FLOW_REQUEST_SPACING` old; the wants follow :data:`FLOW_DEMAND_OFFSETS`.
    Firezone's client has no deadline of its own: the portal answers ``offline`` 15 s after the last ask. So that
    nothing waits forever on a portal that never answers, a request is given up :data:`FLOW_ANSWER_TIMEOUT` plus
    :data:`FLOW_ANSWER_GRACE` after its last ask (a lab-only safety net)."""

    def __init__(
        self,
        *,
        demand_offsets: Sequence[float] = FLOW_DEMAND_OFFSETS,
        spacing: float = FLOW_REQUEST_SPACING,
        answer_timeout: float = FLOW_ANSWER_TIMEOUT + FLOW_ANSWER_GRACE,
        limit: int = MAX_FLOW_REQUESTS,
    ) -> None:
        self._offsets = tuple(sorted(demand_offsets)) or (0.0,)
        self._spacing = spacing
        self._answer_timeout = answer_timeout
        self._limit = limit
        self._pending: dict[str, _FlowRequest] = {}

    def __contains__(self, resource_id: object) -> bool:
        return resource_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def resource_ids(self) -> list[str]:
        return list(self._pending)

    def ask(self, resource_id: str, now: float) -> bool:
        """The resource is wanted: True when ``create_flow`` should go out now (a new request, or one whose last ask
        is at least the spacing old); False while it is too soon, or when the table is full."""
        request = self._pending.get(resource_id)
        if request is None:
            if len(self._pending) >= self._limit:
                return False
            self._pending[resource_id] = _FlowRequest(now, now)
            return True
        if now - request.last_asked_at < self._spacing:
            return False
        request.last_asked_at = now
        request.asks += 1
        return True

    def answered(self, resource_id: str) -> float | None:
        """``flow_created`` or ``flow_creation_failed`` arrived: forgets the request; returns when it was first asked
        (None when it was not pending: a late or unasked-for answer)."""
        request = self._pending.pop(resource_id, None)
        return None if request is None else request.first_asked_at

    def forget(self, resource_id: str) -> None:
        """Drops a request without an answer (the portal that had it is gone)."""
        self._pending.pop(resource_id, None)

    def _next_due(self, request: _FlowRequest) -> float:
        if request.demands < len(self._offsets):
            demand = request.first_asked_at + self._offsets[request.demands]
            return min(demand, request.last_asked_at + self._answer_timeout)
        return request.last_asked_at + self._answer_timeout

    def poll_timeout(self) -> float | None:
        """When :meth:`handle_timeout` has something to do next; None without pending requests."""
        return min((self._next_due(r) for r in self._pending.values()), default=None)

    def handle_timeout(self, now: float) -> list[FlowRequestDue]:
        """Advances every request to ``now``: the asks that are due, and the requests given up (forgotten)."""
        due: list[FlowRequestDue] = []
        for resource_id, request in list(self._pending.items()):
            if now >= request.last_asked_at + self._answer_timeout:
                del self._pending[resource_id]
                due.append(FlowRequestDue(resource_id, ask_again=False, asks=request.asks))
                continue
            wanted = False
            while (
                request.demands < len(self._offsets) and now >= request.first_asked_at + self._offsets[request.demands]
            ):
                request.demands += 1
                wanted = True
            if wanted and self.ask(resource_id, now):
                due.append(FlowRequestDue(resource_id, ask_again=True, asks=request.asks))
        return due


class FlowRequestTimer(DeadlineTimer):
    """The one loop timer of a :class:`FlowRequests`: due at its ``poll_timeout()``, it hands what is due to
    ``on_due``; :meth:`arm` after every change to the requests."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, requests: FlowRequests, on_due: Callable[[list[FlowRequestDue]], None]
    ) -> None:
        def handle(now: float) -> None:
            due = requests.handle_timeout(now)
            if due:
                on_due(due)
            self.arm()

        super().__init__(loop, requests.poll_timeout, handle)
        self.requests = requests
