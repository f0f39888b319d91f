"""Sans-IO Phoenix V1 JSON channel, as the gateway speaks it to the portal (docs/protocol.md §1.4–§1.6).

One :class:`PhoenixChannel` lives as long as the process. For every WebSocket connection the driver calls
:meth:`PhoenixChannel.connect` once the upgrade succeeded, feeds every text frame to :meth:`receive_text`, sends what
:meth:`poll_send` returns, acts on :meth:`poll_event`, and calls :meth:`handle_timeout` at :meth:`poll_timeout`. When the
socket dies on its own, the driver calls :meth:`connection_lost`. After a :class:`LinkHiccuped` the driver first sends
what :meth:`poll_send` still returns (the heartbeat that went over the limit), then closes the socket.

Application messages belong to one connection, as in Firezone's phoenix-channel: pushed while the socket is open but
the join is not answered yet, they are held (at most :data:`MAX_HELD_MESSAGES`, no exact duplicates) and flushed right
after the join; pushed while there is no socket, they are refused (``push`` returns False); and whatever is still
unsent when the connection is lost is discarded, never replayed on the next connection. An ``authorization_created``
for a request the portal has since forgotten would otherwise reach it after the reconnect; what must survive a
disconnection (ICE candidate changes) is the caller's state to re-send after :class:`ChannelJoined`.
"""

from __future__ import annotations

import enum
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from dataplane.base import DropCounter
from protocol.errors import FatalReason, LocalProtocolError

logger = logging.getLogger(__name__)

GATEWAY_TOPIC = "gateway"
PHOENIX_TOPIC = "phoenix"
HEARTBEAT_INTERVAL = 10.0
JOIN_TIMEOUT = 5.0
MAX_OUTSTANDING_HEARTBEATS = 3
MAX_HELD_MESSAGES = 32

PHX_JOIN = "phx_join"
PHX_REPLY = "phx_reply"
PHX_CLOSE = "phx_close"
PHX_ERROR = "phx_error"
HEARTBEAT = "heartbeat"
DISCONNECT = "disconnect"
UNMATCHED_TOPIC = "unmatched topic"
TOKEN_EXPIRED = "token_expired"


class DropReason(enum.Enum):
    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    BAD_ENVELOPE = "bad_envelope"
    UNKNOWN_TOPIC = "unknown_topic"
    UNEXPECTED_REPLY = "unexpected_reply"
    BAD_REPLY = "bad_reply"
    PHX_ERROR = "phx_error"
    HELD_DUPLICATE = "held_duplicate"
    HELD_QUEUE_FULL = "held_queue_full"
    # Outbound: pushed while there was no connection, or still unsent when the connection was lost.
    NOT_CONNECTED = "not_connected"
    UNSENT_ON_DISCONNECT = "unsent_on_disconnect"


class HiccupReason(enum.Enum):
    """Why the link must be re-established (all transient, docs/protocol.md §1.8)."""

    MISSED_HEARTBEATS = "missed_heartbeats"
    JOIN_TIMEOUT = "join_timeout"
    CHANNEL_CLOSED = "channel_closed"


class TimerKind(enum.Enum):
    HEARTBEAT = "heartbeat"
    JOIN_TIMEOUT = "join_timeout"


class State(enum.Enum):
    DISCONNECTED = "disconnected"
    JOINING = "joining"
    JOINED = "joined"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ChannelJoined:
    """The join reply arrived with status ok; messages pushed while joining have been queued for sending."""


@dataclass(frozen=True, slots=True)
class PushReceived:
    """A portal push on the gateway topic (``init``, ``create_authorization``, ...); the payload is not validated here."""

    event: str
    payload: Any


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The portal's reply to one of our application pushes, matched by ``ref``."""

    ref: int
    status: str
    response: Any


@dataclass(frozen=True, slots=True)
class LinkHiccuped:
    """The connection is unusable; the driver must close it and reconnect with backoff."""

    reason: HiccupReason


@dataclass(frozen=True, slots=True)
class ChannelFailed:
    """A fatal error: the gateway must stop (join rejected, token expired). The channel stays failed."""

    reason: FatalReason
    detail: str


ChannelEvent = ChannelJoined | PushReceived | ReplyReceived | LinkHiccuped | ChannelFailed


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str
    event: str
    payload: Any
    # Canonical JSON of (event, payload), used to refuse exact duplicates in the held queue.
    identity: str


def _identity(event: str, payload: Any) -> str:
    return json.dumps([event, payload], sort_keys=True, separators=(",", ":"))


class PhoenixChannel:
    """The gateway's side of one Phoenix V1 channel (topic ``gateway``) plus the socket heartbeat."""

    def __init__(
        self,
        *,
        topic: str = GATEWAY_TOPIC,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        join_timeout: float = JOIN_TIMEOUT,
        max_held_messages: int = MAX_HELD_MESSAGES,
    ) -> None:
        if heartbeat_interval <= 0 or join_timeout <= 0 or max_held_messages < 0:
            raise ValueError("heartbeat_interval and join_timeout must be > 0, max_held_messages >= 0")
        self.topic = topic
        self.heartbeat_interval = heartbeat_interval
        self.join_timeout = join_timeout
        self.max_held_messages = max_held_messages
        self.drops = DropCounter()
        self._state = State.DISCONNECTED
        self._next_ref = 0
        self._join_ref: int | None = None
        self._join_deadline: float | None = None
        self._next_heartbeat: float | None = None
        self._outstanding_heartbeats: set[int] = set()
        self._outbox: deque[_Outgoing] = deque()
        self._held: deque[_Outgoing] = deque()
        self._frames: deque[str] = deque()
        self._events: deque[ChannelEvent] = deque()

    # --- introspection -------------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def joined(self) -> bool:
        return self._state is State.JOINED

    @property
    def held_count(self) -> int:
        return len(self._held)

    # --- driver inputs -------------------------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """A new WebSocket connection is open: refs restart at 0, the join goes out first, heartbeats start."""
        if self._state is State.FAILED:
            raise LocalProtocolError("the channel failed fatally; it cannot be connected again")
        if self._state is not State.DISCONNECTED:
            raise LocalProtocolError(f"connect() while {self._state.value}; call connection_lost() first")
        self._next_ref = 0
        self._frames.clear()
        self._outstanding_heartbeats.clear()
        self._next_heartbeat = now + self.heartbeat_interval
        self._send_join(now)

    def connection_lost(self, now: float) -> None:
        """The socket is gone (closed by either side, or the driver gave up on it after a hiccup)."""
        del now
        self._frames.clear()
        if self._state in (State.FAILED, State.DISCONNECTED):
            return
        self._go_disconnected()

    def push(self, event: str, payload: Any, now: float) -> bool:
        """Send an application message on the channel topic; held while joining.

        False = refused: no connection (dropped, as Firezone's ``NotConnected``), or a duplicate / full hold queue."""
        del now
        if self._state is State.FAILED:
            raise LocalProtocolError("push() on a failed channel")
        if self._state is State.DISCONNECTED:
            self._drop(DropReason.NOT_CONNECTED)
            return False
        message = _Outgoing(self.topic, event, payload, _identity(event, payload))
        if self._state is State.JOINED:
            self._outbox.append(message)
            return True
        return self._hold(message)

    def receive_text(self, frame: str | bytes, now: float) -> None:
        """One text frame from the portal. Garbage is dropped and counted, never raised."""
        if self._state in (State.FAILED, State.DISCONNECTED):
            return
        try:
            decoded = json.loads(frame)
        except (ValueError, TypeError, RecursionError):
            self._drop(DropReason.NOT_JSON)
            return
        if not isinstance(decoded, dict):
            self._drop(DropReason.NOT_AN_OBJECT)
            return
        topic = decoded.get("topic")
        event = decoded.get("event")
        payload = decoded.get("payload")
        ref = _parse_ref(decoded.get("ref"))
        if not isinstance(topic, str) or not isinstance(event, str) or isinstance(ref, _BadRef):
            self._drop(DropReason.BAD_ENVELOPE)
            return
        if event == PHX_REPLY:
            self._handle_reply(topic, ref, payload, now)
        elif topic != self.topic:
            self._drop(DropReason.UNKNOWN_TOPIC)
        elif event == PHX_ERROR:
            self._drop(DropReason.PHX_ERROR)
        elif event == PHX_CLOSE:
            self._hiccup(HiccupReason.CHANNEL_CLOSED)
        elif event == DISCONNECT and isinstance(payload, dict) and payload.get("reason") == TOKEN_EXPIRED:
            self._fail(FatalReason.INVALID_TOKEN, "the portal disconnected us: token_expired")
        else:
            self._events.append(PushReceived(event, payload))

    def handle_timeout(self, now: float) -> None:
        if self._state in (State.FAILED, State.DISCONNECTED):
            return
        if self._join_deadline is not None and now >= self._join_deadline:
            self._hiccup(HiccupReason.JOIN_TIMEOUT)
            return
        if self._next_heartbeat is not None and now >= self._next_heartbeat:
            # As Firezone's phoenix-channel: the heartbeat due now always goes out, and only then is the in-flight
            # count checked, so the 4th unanswered heartbeat is on the wire when the link gives up (at 40 s).
            self._outstanding_heartbeats.add(self._emit(PHOENIX_TOPIC, HEARTBEAT, {}))
            if len(self._outstanding_heartbeats) > MAX_OUTSTANDING_HEARTBEATS:
                self._hiccup(HiccupReason.MISSED_HEARTBEATS)
                return
            self._next_heartbeat += self.heartbeat_interval
            if self._next_heartbeat <= now:
                # The driver woke up very late; do not burst heartbeats to catch up.
                self._next_heartbeat = now + self.heartbeat_interval

    # --- driver outputs ------------------------------------------------------------------------------------------

    def poll_send(self) -> str | None:
        """The next text frame to send, with its ref assigned now so refs follow the wire order."""
        if self._frames:
            return self._frames.popleft()
        if self._state is State.JOINED and self._outbox:
            message = self._outbox.popleft()
            ref = self._next_ref
            self._next_ref += 1
            return _encode(message.topic, message.event, message.payload, ref)
        return None

    def poll_event(self) -> ChannelEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> tuple[float, TimerKind] | None:
        if self._state in (State.FAILED, State.DISCONNECTED):
            return None
        candidates: list[tuple[float, TimerKind]] = []
        if self._join_deadline is not None:
            candidates.append((self._join_deadline, TimerKind.JOIN_TIMEOUT))
        if self._next_heartbeat is not None:
            candidates.append((self._next_heartbeat, TimerKind.HEARTBEAT))
        return min(candidates, key=lambda c: c[0]) if candidates else None

    # --- internals -----------------------------------------------------------------------------------------------

    def _send_join(self, now: float) -> None:
        self._state = State.JOINING
        self._join_ref = self._emit(self.topic, PHX_JOIN, None)
        self._join_deadline = now + self.join_timeout

    def _emit(self, topic: str, event: str, payload: Any) -> int:
        # Control frames (join, heartbeat) bypass the application outbox but still take the next ref in order;
        # application frames already handed out keep their refs because poll_send() numbers them as it returns them.
        ref = self._next_ref
        self._next_ref += 1
        self._frames.append(_encode(topic, event, payload, ref))
        return ref

    def _handle_reply(self, topic: str, ref: int | None, payload: Any, now: float) -> None:
        if ref is None or ref >= self._next_ref:
            self._drop(DropReason.UNEXPECTED_REPLY)
            return
        if not isinstance(payload, dict) or not isinstance(payload.get("status"), str):
            self._drop(DropReason.BAD_REPLY)
            return
        status: str = payload["status"]
        response = payload.get("response")
        if topic == PHOENIX_TOPIC:
            if ref in self._outstanding_heartbeats:
                self._outstanding_heartbeats.discard(ref)
            else:
                self._drop(DropReason.UNEXPECTED_REPLY)
            return
        if topic != self.topic:
            self._drop(DropReason.UNKNOWN_TOPIC)
            return
        if ref == self._join_ref and self._state is State.JOINING:
            if status == "ok":
                self._on_joined()
            else:
                self._fail(FatalReason.JOIN_REJECTED, f"join rejected: {_reason_of(response)}")
            return
        if status != "ok" and _reason_of(response) == UNMATCHED_TOPIC:
            logger.info("portal says topic %r is not joined; re-joining", topic)
            self._requeue_outbox()
            self._send_join(now)
            return
        self._events.append(ReplyReceived(ref, status, response))

    def _on_joined(self) -> None:
        self._state = State.JOINED
        self._join_deadline = None
        self._outbox.extend(self._held)
        self._held.clear()
        self._events.append(ChannelJoined())

    def _hold(self, message: _Outgoing) -> bool:
        if any(held.identity == message.identity for held in self._held):
            self._drop(DropReason.HELD_DUPLICATE)
            return False
        if len(self._held) >= self.max_held_messages:
            self._drop(DropReason.HELD_QUEUE_FULL)
            return False
        self._held.append(message)
        return True

    def _requeue_outbox(self) -> None:
        # Re-joining on the same connection ("unmatched topic"): unsent messages wait for the new join reply.
        pending = list(self._outbox)
        self._outbox.clear()
        self._state = State.JOINING
        for message in pending:
            self._hold(message)

    def _discard_unsent(self) -> None:
        unsent = len(self._outbox) + len(self._held)
        if unsent:
            self.drops.drop(DropReason.UNSENT_ON_DISCONNECT, unsent)
            logger.debug("connection lost: %d unsent portal messages discarded", unsent)
        self._outbox.clear()
        self._held.clear()

    def _go_disconnected(self, *, keep_frames: bool = False) -> None:
        self._discard_unsent()
        self._state = State.DISCONNECTED
        if not keep_frames:
            self._frames.clear()
        self._join_ref = None
        self._join_deadline = None
        self._next_heartbeat = None
        self._outstanding_heartbeats.clear()

    def _hiccup(self, reason: HiccupReason) -> None:
        logger.info("portal link hiccup: %s", reason.value)
        # The socket is still open: control frames already emitted (the last heartbeat) stay pollable so the driver
        # puts them on the wire before it closes; connect() and connection_lost() discard any leftovers.
        self._go_disconnected(keep_frames=True)
        self._events.append(LinkHiccuped(reason))

    def _fail(self, reason: FatalReason, detail: str) -> None:
        self._go_disconnected()
        self._state = State.FAILED
        self._events.append(ChannelFailed(reason, detail))

    def _drop(self, reason: DropReason) -> None:
        self.drops.drop(reason)
        logger.debug("phoenix frame dropped: %s", reason.value)


class _BadRef:
    pass


_BAD_REF = _BadRef()


def _parse_ref(raw: object) -> int | None | _BadRef:
    # Phoenix echoes the ref we sent (an int); other clients' servers use strings of digits, which we accept too.
    if raw is None:
        return None
    if isinstance(raw, bool):
        return _BAD_REF
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) < 20:
        return int(raw)
    return _BAD_REF


def _reason_of(response: Any) -> str:
    if isinstance(response, dict) and isinstance(response.get("reason"), str):
        return str(response["reason"])
    return json.dumps(response)[:200]


def _encode(topic: str, event: str, payload: Any, ref: int) -> str:
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}, separators=(",", ":"))
