"""Health and metrics HTTP server (aiohttp), started before the portal connection (portal-protocol.md §5).

``GET /healthz``: 200 while the event loop runs. ``GET /readyz``: 200 only when joined to the portal and ``init`` has
been applied, else 503 (the reference always answers 200). ``GET /metrics``: Prometheus text exposition format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from aiohttp import web

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsText:
    """A tiny Prometheus text builder: one HELP/TYPE header per family, escaped label values."""

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


class HealthServer:
    """Serves the three endpoints; ``ready`` and ``metrics`` are callbacks so this module knows nothing of the rest."""

    def __init__(self, host: str, port: int, *, ready: Callable[[], bool], metrics: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self.app = build_app(ready=ready, metrics=metrics)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        logger.info("health server listening", extra={"health_addr": f"{self.host}:{self.port}"})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def build_app(*, ready: Callable[[], bool], metrics: Callable[[], str]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(status=200 if ready() else 503)

    async def metrics_endpoint(_: web.Request) -> web.Response:
        response = web.Response(status=200, text=metrics())
        response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
