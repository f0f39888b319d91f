"""The portal link: :class:`protocol.phoenix.PhoenixChannel` driven over ``websockets`` (docs/protocol.md §1).

:class:`PortalLink` connects (URL, headers; the TCP connection is opened by :mod:`agent.dial` as §1.3 says: host
resolved again at every attempt, all addresses dialled at once, 5 s per TCP connect, 15 s for the whole attempt, every
socket marked ``SO_MARK 0xfd002021``), runs the channel, reconnects with the §1.7 backoff, and raises
:class:`protocol.errors.PortalError` for the fatal cases of §1.8. The token only ever travels in the
``X-Authorization`` header: it is never put in the URL, in a log line or in an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import importlib.metadata
import json
import logging
import platform
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, WebSocketException

from agent.backoff import MAX_RETRY_AFTER, Backoff, initial_connect_policy, reconnect_policy
from agent.config import Secret
from agent.dial import TCP_CONNECT_TIMEOUT, SocketMarker, SocketMarkError, dial_first, resolve_targets
from dataplane.base import Rng
from protocol.errors import FatalReason, PortalError, TransientPortalError
from protocol.messages import INBOUND_MODELS, LEGACY_EVENTS, OUTBOUND_MODELS, ResourceUpdated
from protocol.phoenix import (
    ChannelEvent,
    ChannelFailed,
    ChannelJoined,
    LinkHiccuped,
    PhoenixChannel,
    PushReceived,
)

logger = logging.getLogger(__name__)

GATEWAY_SOCKET_PATH = "/gateway/v2/websocket"
CONNECT_TIMEOUT = 15.0
# The largest portal message is init: 10,000 authorizations make 1.4 MB, so 4 MiB leaves room for about 30,000.
# At most MAX_QUEUED_FRAMES received frames wait to be read: 16 MiB in all (websockets' defaults allowed 16 MiB x 16).
MAX_FRAME_SIZE = 4 * 1024 * 1024
MAX_QUEUED_FRAMES = 4
# A frame the portal does not take within this time means the connection is dead: reconnect rather than wait on it.
WRITE_TIMEOUT = 10.0
# Frames already received are read in one turn of the event loop, up to this many: one frame per turn leaves the
# portal link behind the data plane when a thousand clients come up at once (their create_authorization and
# candidates queue, the heartbeat replies behind them, and the link gives up on missed heartbeats).
MAX_FRAMES_PER_TURN = 64
PACKAGE_NAME = "firezone-gateway-py"
FALLBACK_VERSION = "1.6.0"
_MAX_DETAIL = 300


# --- pure helpers -------------------------------------------------------------------------------------------------


def external_id_for(firezone_id: str) -> str:
    """UUID-shaped ids are sent as hex(sha256(id as given)); anything else (e.g. 64 hex) verbatim (§1.1)."""
    try:
        uuid.UUID(firezone_id)
    except ValueError:
        return firezone_id
    return hashlib.sha256(firezone_id.encode()).hexdigest()


def normalise_base_url(api_url: str) -> tuple[str, str, int, str]:
    """(scheme ws|wss, host, port, path) with the reference's port rule: none or the scheme default → 443."""
    parts = urlsplit(api_url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("http", "ws"):
        ws_scheme, scheme_default = "ws", 80
    elif scheme in ("https", "wss"):
        ws_scheme, scheme_default = "wss", 443
    else:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("URL has no host")
    port = parts.port
    if port is None or port == scheme_default:
        port = 443
    return ws_scheme, parts.hostname, port, parts.path.rstrip("/")


def build_url(api_url: str, firezone_id: str, name: str, public_key_b64: str) -> str:
    scheme, host, port, base_path = normalise_base_url(api_url)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    query = urlencode([("external_id", external_id_for(firezone_id)), ("name", name), ("public_key", public_key_b64)])
    return urlunsplit((scheme, netloc, base_path + GATEWAY_SOCKET_PATH, query, ""))


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_VERSION


def _os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip().strip('"')
    except OSError:
        pass
    return fields


def build_user_agent(
    version: str,
    *,
    os_type: str | None = None,
    os_version: str | None = None,
    arch: str | None = None,
    kernel: str | None = None,
) -> str:
    """``<os>/<version> gateway/<version> (<arch>; <kernel>)``, non-ASCII stripped, parentheses degrading (§1.2)."""
    if os_type is None or os_version is None:
        release = _os_release()
        os_type = os_type or (release.get("NAME", "").split(" ")[0] or platform.system() or "Unknown")
        os_version = os_version or release.get("VERSION_ID") or "Unknown"
    arch = platform.machine() if arch is None else arch
    kernel = platform.release() if kernel is None else kernel
    details = "; ".join(part for part in (arch, kernel) if part)
    agent = f"{os_type}/{os_version} gateway/{version}"
    if details:
        agent += f" ({details})"
    return agent.encode("ascii", "ignore").decode()


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """``Retry-After`` as delta-seconds or IMF-fixdate → seconds to wait (≥ 0); None when absent or unparsable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        # Past 10 digits the wait is longer than Backoff.MAX_RETRY_AFTER anyway; parsing more could overflow a float.
        return float(int(text)) if len(text) <= 10 else MAX_RETRY_AFTER
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_wall)


def _one_line(text: str, secret: Secret | None) -> str:
    line = re.sub(r"\s+", " ", text).strip()
    if secret is not None and secret.reveal():
        line = line.replace(secret.reveal(), "<redacted>")
    return line[:_MAX_DETAIL]


def classify_rejection(
    status: int, headers: dict[str, str], body: bytes, now_wall: float, secret: Secret | None = None
) -> PortalError | TransientPortalError:
    """Map a refused WebSocket upgrade to fatal (401 only) or retried, per §1.8, keeping the problem+json detail."""
    code: str | None = None
    detail: str | None = None
    try:
        problem = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        problem = None
    if isinstance(problem, dict):
        code = problem.get("code") if isinstance(problem.get("code"), str) else None
        for key in ("detail", "title"):
            if isinstance(problem.get(key), str):
                detail = problem[key]
                break
    summary = f"portal refused the connection: HTTP {status}"
    if code:
        summary += f" {code}"
    if detail:
        summary += f": {detail}"
    summary = _one_line(summary, secret)
    if status == 401:
        reason = (
            FatalReason.INVALID_TOKEN
            if code in ("invalid_token", "missing_token")
            else FatalReason.AUTHENTICATION_FAILED
        )
        return PortalError(reason, summary)
    lowered = {k.lower(): v for k, v in headers.items()}
    return TransientPortalError(summary, retry_after=parse_retry_after(lowered.get("retry-after"), now_wall))


# --- the driver ---------------------------------------------------------------------------------------------------


# Metric labels come from a fixed set: an event name the portal invents is counted as "other", so a portal cannot grow
# the metrics (or this process) by sending new names.
OTHER_EVENT = "other"
RECEIVED_EVENT_LABELS = frozenset({*INBOUND_MODELS, ResourceUpdated.EVENT, *LEGACY_EVENTS, OTHER_EVENT})
SENT_EVENT_LABELS = frozenset({*OUTBOUND_MODELS, "phx_join", "heartbeat", OTHER_EVENT})


def received_event_label(event: str) -> str:
    return event if event in RECEIVED_EVENT_LABELS else OTHER_EVENT


@dataclass
class PortalStats:
    connect_attempts: int = 0
    reconnects: int = 0
    joins: int = 0
    # Keyed by RECEIVED_EVENT_LABELS / SENT_EVENT_LABELS only.
    received: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)


EventHandler = Callable[[ChannelEvent], None]


class PortalLink:
    """Holds the gateway's link to the portal until stopped (returns) or a fatal error (raises PortalError)."""

    def __init__(
        self,
        *,
        api_url: str,
        firezone_id: str,
        name: str,
        public_key_b64: str,
        token: Secret,
        rng: Rng,
        wall_clock: Callable[[], float],
        heartbeat_interval: float = 10.0,
        max_partition_time: float = 24 * 3600.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        tcp_connect_timeout: float = TCP_CONNECT_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        user_agent: str | None = None,
        marker: SocketMarker | None = None,
    ) -> None:
        self.url = build_url(api_url, firezone_id, name, public_key_b64)
        _, self._host, self._port, _ = normalise_base_url(api_url)
        # The header carries the token with all whitespace removed (§1.2); scrubbing uses that same form.
        self._token = Secret("".join(token.reveal().split()))
        self._rng = rng
        self._wall_clock = wall_clock
        self._max_partition_time = max_partition_time
        self._connect_timeout = connect_timeout
        self._tcp_connect_timeout = tcp_connect_timeout
        self._write_timeout = write_timeout
        self.marker = marker or SocketMarker()
        self.user_agent = user_agent or build_user_agent(package_version())
        self.channel = PhoenixChannel(heartbeat_interval=heartbeat_interval)
        self.stats = PortalStats()
        self._backoff = Backoff(initial_connect_policy(), rng)
        self._handler: EventHandler | None = None
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()

    @property
    def joined(self) -> bool:
        return self.channel.joined

    def push(self, event: str, payload: Any) -> bool:
        """Queue an application message; False when refused (no connection: dropped, not replayed later; or a
        duplicate while joining). Safe to call from handlers and other tasks."""
        accepted = self.channel.push(event, payload, asyncio.get_running_loop().time())
        self._wakeup.set()
        return accepted

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    async def run(self, handler: EventHandler) -> None:
        self._handler = handler
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            failure: TransientPortalError
            connecting = asyncio.ensure_future(self._connect())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransientPortalError, PortalError):
                    await connecting
                return
            try:
                ws = connecting.result()
            except TransientPortalError as exc:
                failure = exc
            else:
                try:
                    failure = await self._serve(ws)
                finally:
                    self.channel.connection_lost(loop.time())
                if self._stopping.is_set():
                    return
            delay = self._backoff.next_delay(failure.retry_after)
            if delay is None:
                raise PortalError(
                    FatalReason.MAX_RETRIES_REACHED,
                    f"gave up reconnecting to the portal after {self._backoff.elapsed:.0f} s: {failure}",
                )
            logger.warning("portal link down (%s); retrying in %.2f s", failure, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _connect(self) -> ClientConnection:
        """One attempt (§1.3): resolve, dial all addresses, then TLS + WebSocket upgrade, all within 15 s.

        Raises TransientPortalError (retry), PortalError (fatal rejection) or SocketMarkError (fatal, local)."""
        self.stats.connect_attempts += 1
        if self.stats.joins:
            self.stats.reconnects += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                targets = await resolve_targets(self._host, self._port)
                sock = await dial_first(targets, self.marker, tcp_timeout=self._tcp_connect_timeout)
                try:
                    return await connect(
                        self.url,
                        sock=sock,
                        additional_headers={"X-Authorization": f"Bearer {self._token.reveal()}"},
                        user_agent_header=self.user_agent,
                        open_timeout=None,
                        ping_interval=None,
                        max_size=MAX_FRAME_SIZE,
                        max_queue=MAX_QUEUED_FRAMES,
                        close_timeout=2.0,
                    )
                except BaseException:
                    sock.close()
                    raise
        except SocketMarkError:
            raise
        except InvalidStatus as exc:
            response = exc.response
            verdict = classify_rejection(
                response.status_code,
                dict(response.headers.raw_items()),
                bytes(response.body or b""),
                self._wall_clock(),
                self._token,
            )
            raise verdict from None
        except TimeoutError:
            raise TransientPortalError(f"connect attempt timed out after {self._connect_timeout:g} s") from None
        # ValueError: websockets cannot follow a redirect over a socket it was handed.
        except (OSError, InvalidHandshake, WebSocketException, EOFError, ValueError) as exc:
            raise TransientPortalError(_one_line(f"cannot connect: {type(exc).__name__}: {exc}", self._token)) from None

    async def _serve(self, ws: ClientConnection) -> TransientPortalError:
        """Run one connection until it breaks (returns why) or is stopped; fatal channel errors raise."""
        loop = asyncio.get_running_loop()
        self.channel.connect(loop.time())
        logger.info("connected to the portal; joining")
        receiving: asyncio.Task[str | bytes] = asyncio.ensure_future(ws.recv())
        waking: asyncio.Task[bool] | None = None
        try:
            while True:
                await self._flush(ws)
                failure = self._dispatch_events()
                if failure is not None:
                    # Frames the channel emitted on its way down (the heartbeat over the limit) still go out.
                    await self._flush(ws)
                    return failure
                await self._flush(ws)
                if self._stopping.is_set():
                    await ws.close(code=1000)
                    return TransientPortalError("stopped")
                timeout = self.channel.poll_timeout()
                wait_for = None if timeout is None else max(0.0, timeout[0] - loop.time())
                self._wakeup.clear()
                waking = asyncio.ensure_future(self._wakeup.wait())
                done, _ = await asyncio.wait({receiving, waking}, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED)
                waking.cancel()
                if receiving in done:
                    try:
                        frame = receiving.result()
                    except ConnectionClosed as exc:
                        return TransientPortalError(f"portal closed the connection ({exc.rcvd or 'no close frame'})")
                    await receive_burst(ws, frame, self._receive_frame)
                    receiving = asyncio.ensure_future(ws.recv())
                self.channel.handle_timeout(loop.time())
        except ConnectionClosed as exc:
            return TransientPortalError(f"connection closed while sending ({exc.rcvd or 'no close frame'})")
        except TimeoutError:
            return TransientPortalError(f"the portal took no frame for {self._write_timeout:g} s")
        except OSError as exc:
            return TransientPortalError(f"connection error: {type(exc).__name__}")
        finally:
            if waking is not None:
                waking.cancel()
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, Exception):
                await receiving
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)

    def _receive_frame(self, frame: str | bytes) -> None:
        if isinstance(frame, str):
            self.channel.receive_text(frame, asyncio.get_running_loop().time())
        else:
            logger.debug("ignoring a binary frame of %d bytes", len(frame))

    async def _flush(self, ws: ClientConnection) -> None:
        while (frame := self.channel.poll_send()) is not None:
            self.stats.sent[_event_of(frame)] += 1
            async with asyncio.timeout(self._write_timeout):
                await ws.send(frame)

    def _dispatch_events(self) -> TransientPortalError | None:
        while (event := self.channel.poll_event()) is not None:
            if isinstance(event, ChannelJoined):
                self.stats.joins += 1
                self._backoff = Backoff(reconnect_policy(self._max_partition_time), self._rng)
                logger.info("joined the portal channel", extra={"url_host": urlsplit(self.url).hostname})
            elif isinstance(event, PushReceived):
                self.stats.received[received_event_label(event.event)] += 1
            elif isinstance(event, LinkHiccuped):
                return TransientPortalError(f"portal link hiccup: {event.reason.value}")
            elif isinstance(event, ChannelFailed):
                raise PortalError(event.reason, event.detail)
            if self._handler is not None:
                self._handler(event)
        return None


async def receive_burst(ws: ClientConnection, first: str | bytes, receive: Callable[[str | bytes], None]) -> int:
    """Gives ``receive`` the frame ``first`` and then every frame ``ws`` has already received, in order, up to
    :data:`MAX_FRAMES_PER_TURN` in all (the rest wait for the next turn); returns how many it gave."""
    frame: str | bytes | None = first
    taken = 0
    while frame is not None:
        receive(frame)
        taken += 1
        frame = await _buffered_frame(ws) if taken < MAX_FRAMES_PER_TURN else None
    return taken


async def _buffered_frame(ws: ClientConnection) -> str | bytes | None:
    """The next frame if the connection has one already (``recv`` returns without waiting then), else None.

    ``recv`` is cancel-safe: a frame that is not there yet stays for the next call. A closed connection also gives
    None: the frames taken so far are handled first (a ``disconnect`` among them), the next ``recv`` reports the close.
    """
    try:
        async with asyncio.timeout(0):
            return await ws.recv()
    except (TimeoutError, ConnectionClosed):
        return None


def _event_of(frame: str) -> str:
    match = re.search(r'"event":"([a-z_]{1,64})"', frame)
    return match.group(1) if match and match.group(1) in SENT_EVENT_LABELS else OTHER_EVENT


__all__ = [
    "PortalLink",
    "PortalStats",
    "received_event_label",
    "build_url",
    "build_user_agent",
    "classify_rejection",
    "external_id_for",
    "package_version",
    "parse_retry_after",
]
