"""Health and metrics HTTP server, started before the portal connection (docs/protocol.md §5).

``GET /healthz``: 200 while the event loop runs. ``GET /readyz``: 200 only when joined to the portal and ``init`` has
been applied, else 503 (the reference always answers 200). ``GET /metrics``: Prometheus text exposition format (the
text comes from the ``metrics`` callback: the gateway's prometheus-client registry, ``agent.metrics``).

The listener is reachable by anyone who can reach the port, so it must not be a way to starve the process: it holds at
most :data:`MAX_CONNECTIONS` connections (a new one evicts the oldest that has not sent its request yet), a request
head must arrive within :data:`HEADER_TIMEOUT` and fit in :data:`MAX_HEADER_BYTES`, and every response is written
within :data:`WRITE_TIMEOUT` and ends the connection (no keep-alive: probes and scrapers reconnect anyway). Together
with :func:`raise_nofile_limit` this keeps ``/healthz`` answering, and descriptors free for the portal, while
thousands of idle connections are held open against the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CONNECTIONS = 64
HEADER_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
MAX_HEADER_BYTES = 8192
LISTEN_BACKLOG = 128

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Go programs do at start; returns (soft, hard) after.

    The default soft limit (often 1024) is a leftover of select(); this process uses epoll and asyncio only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft, hard
    logger.debug("open-file limit raised from %d to %d", soft, hard)
    return hard, hard


class MetricsText:
    """A tiny Prometheus text builder: one HELP/TYPE header per family, escaped label values (the gateway itself uses
    prometheus-client, ``agent.metrics``; this stays for callers that serve a few fixed lines)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self._lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True, slots=True)
class HealthResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


def respond(method: str, path: str, *, ready: Callable[[], bool], metrics: Callable[[], str]) -> HealthResponse:
    """The three endpoints as a pure function of (method, path); HEAD is GET without the body."""
    route = path.split("?", 1)[0]
    if route not in ("/healthz", "/readyz", "/metrics"):
        return HealthResponse(404)
    if method not in ("GET", "HEAD"):
        return HealthResponse(405)
    if route == "/healthz":
        return HealthResponse(200)
    if route == "/readyz":
        return HealthResponse(200 if ready() else 503)
    return HealthResponse(200, metrics().encode(), PROMETHEUS_CONTENT_TYPE)


class _Connection:
    __slots__ = ("request_started", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.request_started = False


class HealthServer:
    """Serves the three endpoints; ``ready`` and ``metrics`` are callbacks so this module knows nothing of the rest."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], str],
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        if max_connections < 1 or header_timeout <= 0 or write_timeout <= 0:
            raise ValueError("max_connections must be >= 1 and the timeouts > 0")
        self.host = host
        self.port = port
        self._ready = ready
        self._metrics = metrics
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self._server: asyncio.Server | None = None
        # Insertion order is arrival order: the first idle entry is the oldest one to evict.
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self.evicted = 0
        # The same endpoints as an aiohttp application, for in-process test clients.
        self.app = build_app(ready=ready, metrics=metrics)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, backlog=LISTEN_BACKLOG, limit=MAX_HEADER_BYTES, reuse_address=True
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        logger.info("health server listening", extra={"health_addr": f"{self.host}:{self.port}"})

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Aborting the transports ends every handler through EOF. Cancelling the handler tasks instead would make
        # asyncio (3.11) log each cancelled client_connected_cb task as an error.
        tasks = list(self._connections.items())
        for _, connection in tasks:
            connection.writer.transport.abort()
        await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections and not self._evict_one_idle():
            writer.transport.abort()
            return
        connection = _Connection(writer)
        self._connections[task] = connection
        try:
            await self._serve(reader, connection)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()

    def _evict_one_idle(self) -> bool:
        for task, connection in self._connections.items():
            if not connection.request_started:
                self.evicted += 1
                connection.writer.transport.abort()  # its handler ends on EOF; see stop() for why not cancel()
                del self._connections[task]
                return True
        return False

    async def _serve(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        async with asyncio.timeout(self.header_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
        connection.request_started = True
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            response = HealthResponse(400)
            method = "GET"
        else:
            method = parts[0]
            response = respond(method, parts[1], ready=self._ready, metrics=self._metrics)
        body = b"" if method == "HEAD" else response.body
        header = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        connection.writer.write(header + body)
        async with asyncio.timeout(self.write_timeout):
            await connection.writer.drain()


def build_app(*, ready: Callable[[], bool], metrics: Callable[[], str]) -> web.Application:
    """The endpoints as an aiohttp application (same :func:`respond`), for ``aiohttp.test_utils`` clients."""

    async def handle(request: web.Request) -> web.Response:
        response = respond(request.method, request.path, ready=ready, metrics=metrics)
        return web.Response(status=response.status, body=response.body, headers={"Content-Type": response.content_type})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
