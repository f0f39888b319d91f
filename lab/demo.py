"""``make demo`` (``python -m lab.demo``): the dev portal and a real gateway joined to it, with a readable report.

The demo is a list of steps (:data:`STEPS`) run in order against one :class:`DemoContext`; each returns a one-line
result or raises :class:`DemoError`. Later stages (data plane, relays, a headless client) append their steps.
Whatever happens, the gateway and the portal are shut down at the end; the exit code is 0 only if every step
passed and the gateway shut down cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from lab.portal import DEFAULT_CONFIG, DevPortal, PortalConfig, load_config
from lab.portal.gateway_process import GatewayProcess

STEP_TIMEOUT = 20.0
METRIC_PREFIXES = ("firezone_portal_", "firezone_gateway_up", "firezone_clients")


class DemoError(Exception):
    """A step could not do what it promises; the message says what was seen instead."""


@dataclass
class DemoContext:
    config: PortalConfig
    workdir: Path
    log_level: str = "info"
    portal: DevPortal | None = None
    gateway: GatewayProcess | None = None
    http: aiohttp.ClientSession | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def need_portal(self) -> DevPortal:
        if self.portal is None:
            raise DemoError("the dev portal is not running")
        return self.portal

    def need_gateway(self) -> GatewayProcess:
        if self.gateway is None:
            raise DemoError("the gateway is not running")
        return self.gateway

    def need_http(self) -> aiohttp.ClientSession:
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT + 5))
        return self.http

    async def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        """One admin API call on the dev portal (the demo uses the same HTTP API as external tools would)."""
        url = f"{self.need_portal().admin_url}{path}"
        async with self.need_http().request(method, url, **kwargs) as response:
            body = await response.json()
            if response.status != 200:
                raise DemoError(f"{method} {path} → {response.status}: {body.get('error', body)}")
            return body


Step = tuple[str, Callable[[DemoContext], Awaitable[str]]]


async def start_portal(ctx: DemoContext) -> str:
    ctx.portal = DevPortal(ctx.config, host="127.0.0.1", port=0)
    await ctx.portal.start()
    return f"listening on {ctx.portal.url} (admin API {ctx.portal.admin_url})"


async def start_gateway(ctx: DemoContext) -> str:
    portal = ctx.need_portal()
    if not ctx.config.gateways:
        raise DemoError("the portal config has no gateway token")
    state_dir = ctx.workdir / "state"
    state_dir.mkdir()
    ctx.gateway = await GatewayProcess.start(
        api_url=portal.url,
        token=ctx.config.gateways[0].token,
        state_dir=state_dir,
        name="demo-gateway",
        log_level=ctx.log_level,
    )
    return f"pid {ctx.gateway.pid}, health on {ctx.gateway.health_url}, state in {state_dir}"


async def wait_joined(ctx: DemoContext) -> str:
    gateway = ctx.need_gateway()
    found = await ctx.admin("GET", "/wait", params={"kind": "received", "event": "phx_join", "timeout": "15"})
    joined_seq = found["event"]["seq"]
    await ctx.admin("GET", "/wait", params={"kind": "sent", "event": "init", "since": str(joined_seq), "timeout": "5"})
    if not gateway.running:
        raise DemoError(f"the gateway exited with {gateway.process.returncode}")
    [info] = [g for g in (await ctx.admin("GET", "/gateways"))["gateways"] if g["connected"]]
    ctx.facts["gateway"] = info
    return f"{info['name']} joined topic gateway and received init"


async def wait_ready(ctx: DemoContext) -> str:
    gateway = ctx.need_gateway()
    try:
        await gateway.wait_readyz(200, timeout=STEP_TIMEOUT)
    except TimeoutError as exc:
        raise DemoError(str(exc)) from None
    ctx.facts["readyz"] = 200
    ctx.facts["healthz"] = await gateway.healthz()
    return "/readyz 200 (joined and init applied)"


async def authorize_client(ctx: DemoContext) -> str:
    config = ctx.config
    if not config.clients or not config.resources:
        raise DemoError("the portal config needs a client and a resource")
    client, resource = config.clients[0], config.resources[0]
    since = ctx.need_portal().next_seq
    started = time.monotonic()
    pushed = await ctx.admin("POST", "/create_authorization", json={"client_id": client.id, "resource_id": resource.id})
    found = await ctx.admin(
        "GET",
        "/wait",
        params={"kind": "received", "event": "authorization_created", "since": str(since), "timeout": "10"},
    )
    answered_ref = found["event"]["payload"].get("ref")
    if answered_ref != pushed["ref"]:
        raise DemoError(f"authorization_created carried ref {answered_ref!r}, expected {pushed['ref']!r}")
    elapsed_ms = (time.monotonic() - started) * 1000
    ctx.facts["authorization"] = {"client": client.id, "resource": f"{resource.name or resource.id} ({resource.type})"}
    return f"client {client.id[:8]}… → resource {resource.name!r}: authorization_created, same ref, {elapsed_ms:.0f} ms"


async def read_metrics(ctx: DemoContext) -> str:
    text = await ctx.need_gateway().metrics()
    if not text:
        raise DemoError("/metrics did not answer")
    excerpt = [line for line in text.splitlines() if line.startswith(METRIC_PREFIXES)]
    ctx.facts["metrics"] = excerpt
    return f"{len(text.splitlines())} lines of Prometheus text"


STEPS: list[Step] = [
    ("start the dev portal", start_portal),
    ("start firezone-gateway", start_gateway),
    ("gateway joins the portal", wait_joined),
    ("gateway is ready", wait_ready),
    ("authorize a client", authorize_client),
    ("read /metrics", read_metrics),
]


def _report(ctx: DemoContext) -> list[str]:
    lines = ["", "Report", "------"]
    info = ctx.facts.get("gateway")
    if info:
        lines += [
            f"gateway name      {info['name']}",
            f"gateway version   {info['version']}   (User-Agent: {info['user_agent']})",
            f"public key        {info['public_key']}",
            f"external id       {info['external_id']}",
            f"portal id         {info['gateway_id']}",
            f"tunnel addresses  {info['ipv4']}  {info['ipv6']}",
        ]
    if "readyz" in ctx.facts:
        lines.append(f"health            /healthz {ctx.facts['healthz']}  /readyz {ctx.facts['readyz']}")
    if ctx.portal is not None:
        received = Counter(e.event for e in ctx.portal.events(kind="received"))
        sent = Counter(e.event for e in ctx.portal.events(kind="sent") if e.event)
        lines.append("gateway → portal  " + ", ".join(f"{k} ×{v}" for k, v in sorted(received.items())))
        lines.append("portal → gateway  " + ", ".join(f"{k} ×{v}" for k, v in sorted(sent.items())))
    metrics = ctx.facts.get("metrics")
    if metrics:
        lines.append("metrics excerpt")
        lines += [f"    {line}" for line in metrics[:15]]
    return lines


async def _shutdown(ctx: DemoContext) -> tuple[bool, str]:
    ok, detail = True, ""
    if ctx.gateway is not None:
        try:
            code = await ctx.gateway.terminate(timeout=10)
            ok = code == 0
            detail = f"gateway exited with {code} after SIGTERM"
        except TimeoutError:
            ok, detail = False, "the gateway did not exit within 10 s of SIGTERM (killed)"
        await ctx.gateway.close()
    if ctx.http is not None:
        await ctx.http.close()
    if ctx.portal is not None:
        await ctx.portal.stop()
        detail += "; dev portal stopped"
    return ok, detail.lstrip("; ")


async def run(config: PortalConfig, *, log_level: str = "info", steps: Sequence[Step] = STEPS) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="firezone-demo-"))
    ctx = DemoContext(config=config, workdir=workdir, log_level=log_level)
    failed: str | None = None
    print("Firezone gateway demo: dev portal + firezone-gateway on loopback\n", flush=True)
    try:
        for number, (title, step) in enumerate(steps, 1):
            try:
                detail = await asyncio.wait_for(step(ctx), STEP_TIMEOUT)
            except (DemoError, TimeoutError, OSError, aiohttp.ClientError) as exc:
                failed = title
                print(f"[{number}/{len(steps)}] FAILED  {title}: {exc or type(exc).__name__}", flush=True)
                break
            print(f"[{number}/{len(steps)}] ok      {title}: {detail}", flush=True)
    finally:
        clean, detail = await _shutdown(ctx)
        print(f"[end]   {'ok' if clean else 'FAILED'}      shut down: {detail}", flush=True)
        for line in _report(ctx):
            print(line)
        if (failed or not clean) and ctx.gateway is not None:
            tail = ctx.gateway.output().splitlines()[-25:]
            print("\ngateway output (last lines):")
            print("\n".join(f"    {line}" for line in tail))
        shutil.rmtree(workdir, ignore_errors=True)
    success = failed is None and clean
    print(f"\n{'demo passed' if success else 'demo FAILED'}")
    return 0 if success else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="dev portal config (default: the dev one)")
    parser.add_argument("--gateway-log-level", default="info", help="FIREZONE_LOG_LEVEL for the gateway")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.config}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(config, log_level=args.gateway_log_level))


if __name__ == "__main__":
    sys.exit(main())
