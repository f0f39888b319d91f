"""``make demo`` (``python -m lab.demo``): the real gateway in the lab world, checked end to end as a user would.

The lab world (:mod:`lab.world`) is built first: NAT routers, a coturn relay, the dev portal, the resource host and
``firezone-gateway`` in its own namespace. Then a list of checks (:data:`CHECKS`) runs in order; each prints one
progress line and either passes with a short result or fails with what was seen instead. A check whose prerequisites
failed is skipped (and counts as not passed). Everything is torn down at the end, also on failure, Ctrl-C or SIGTERM.
The last line is ``demo: K/N checks passed``; the exit code is 0 only when K == N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from lab.world import (
    DNS_NAME,
    DNS_RESOURCE_PATTERN,
    HTTP_PORT,
    IPERF_PORT,
    RELAY_IPS,
    RELAY_PORT,
    RESOURCE_IP,
    ClientProcess,
    LabWorld,
)

CHECK_TIMEOUT = 25.0
DENIED_PORT = 22
IPERF_SECONDS = 2.0
# The excerpt shows what the data plane did; the portal counters are in the full text.
METRIC_PREFIXES = (
    "firezone_portal_ready",
    "firezone_clients",
    "firezone_connections",
    "firezone_handshakes_total",
    "firezone_packets_total",
    "firezone_datagrams_total",
    "firezone_dataplane_drops_total",
)
METRICS_EXCERPT_LINES = 16
EXIT_INTERRUPTED = 130
ICMP_ADMIN_PROHIBITED = [3, 13]


class DemoError(Exception):
    """A check could not do what it promises; the message says what was seen instead."""


@dataclass
class DemoContext:
    """What the checks share: the world, the clients they started, and facts for later checks and the report."""

    world: Any
    """A :class:`LabWorld` in the real demo (the unit tests pass a stand-in)."""
    clients: dict[str, ClientProcess] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Extra lines printed under the current check's progress line (e.g. a metrics excerpt)."""

    @property
    def lab(self) -> LabWorld:
        if not isinstance(self.world, LabWorld):
            raise DemoError("this check needs the lab world")
        return self.world

    def client(self, name: str) -> ClientProcess:
        try:
            return self.clients[name]
        except KeyError:
            raise DemoError(f"{name} was not started") from None


@dataclass(frozen=True)
class Check:
    title: str
    run: Callable[[DemoContext], Awaitable[str]]
    needs: tuple[str, ...] = ()
    """Titles of earlier checks that must have passed for this one to make sense."""
    timeout: float = CHECK_TIMEOUT


# ---------------------------------------------------------------------- the checks


async def gateway_joined(ctx: DemoContext) -> str:
    world = ctx.lab
    started = time.monotonic()
    try:
        init = await world.wait_gateway_joined(timeout=20)
        await world.need_gateway().wait_readyz(200, timeout=10)
    except (TimeoutError, RuntimeError) as exc:
        raise DemoError(str(exc).splitlines()[0]) from None
    remote = next((s.remote for s in world.need_portal().sessions if s.joined), "?")
    relays = ", ".join(r["addr"] for r in init.payload.get("relays", []))
    return (
        f"joined from {remote} (behind {world.gateway_nat!r} NAT) in {time.monotonic() - started:.1f} s; "
        f"init with relays {relays}; /readyz 200"
    )


async def _start_client(ctx: DemoContext, name: str, index: int, resource_key: str) -> dict[str, Any]:
    world = ctx.lab
    client = await world.start_client(index, resources=[world.resource_id(resource_key)])
    ctx.clients[name] = client
    try:
        found = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=20)
    except (TimeoutError, RuntimeError) as exc:
        tail = client.stderr_text().strip().splitlines()[-3:]
        raise DemoError(f"{exc}{'; stderr: ' + ' | '.join(tail) if tail else ''}") from None
    if found["event"] == "flow_creation_failed":
        raise DemoError(f"flow_creation_failed: {found.get('reason')}")
    return found


async def authorization(ctx: DemoContext) -> str:
    world = ctx.lab
    portal = world.need_portal()
    since = portal.next_seq
    started = time.monotonic()
    await _start_client(ctx, "client-1", 0, "lan-web")
    elapsed = time.monotonic() - started
    try:
        pushed = await portal.wait_for(kind="sent", event="create_authorization", since=since, timeout=1)
        answered = await portal.wait_for(kind="received", event="authorization_created", since=since, timeout=1)
    except TimeoutError:
        raise DemoError("the client got its flow but the portal log lacks the gateway's authorization") from None
    if pushed.payload.get("ref") != answered.payload.get("ref"):
        raise DemoError("authorization_created did not echo the ref of create_authorization")
    return (
        f"client-1 asked for 'lan-web': create_authorization → authorization_created → flow_created in "
        f"{elapsed:.1f} s (client start included)"
    )


async def _wait_path(client: ClientProcess, wanted: str, timeout: float) -> float:
    """Waits until the client's connection is established on ``wanted``; returns its setup time."""
    established = await client.wait_event(("established", "failed"), timeout=timeout)
    if established["event"] == "failed":
        raise DemoError(f"the connection failed: {established}")
    deadline = time.monotonic() + 10
    while client.path != wanted and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            await client.wait_event("path_changed", timeout=deadline - time.monotonic(), since=len(client.events))
    if client.path != wanted:
        raise DemoError(f"path is {client.path}, expected {wanted}")
    return float(established.get("setup_seconds", 0.0))


async def direct_path(ctx: DemoContext) -> str:
    setup = await _wait_path(ctx.client("client-1"), "direct", timeout=20)
    return f"client-1 ↔ gateway: direct (hole punched through both NATs), ICE + handshake {setup:.2f} s"


async def download(ctx: DemoContext) -> str:
    world = ctx.lab
    fetched = await world.http_get_sha256("cl")
    if "error" in fetched:
        raise DemoError(f"GET {world.blob_url}: {fetched['error']}")
    if not fetched["matches"]:
        raise DemoError(f"sha256 {fetched['sha256'][:16]}… differs from the blob's {world.blob_sha256[:16]}…")
    mbit = fetched["bytes"] * 8 / max(fetched["seconds"], 1e-6) / 1e6
    return (
        f"{fetched['bytes'] / 2**20:.1f} MiB from http://{RESOURCE_IP}:{HTTP_PORT} through the tunnel in "
        f"{fetched['seconds']:.2f} s ({mbit:.0f} Mbit/s), sha256 {fetched['sha256'][:16]}… matches"
    )


async def dns_resource(ctx: DemoContext) -> str:
    """A DNS resource reached by name (docs/protocol.md §3.4): the client asks for the resource, hands out proxy
    IPs for the name (announced with assigned_ips), the gateway resolves it through the resource host's DNS server and
    NATs the proxy IP to the real address; the name points at the proxy IP in the client's hosts file, as a Firezone
    client's DNS stub would answer."""
    world = ctx.lab
    client = ctx.client("client-1")
    dns_id = world.resource_id("dns")
    since = len(client.events)
    client.request(dns_id)
    try:
        found = await client.wait_event(
            ("flow_created", "flow_creation_failed"), since=since, where=lambda e: e.get("resource_id") == dns_id
        )
        if found["event"] == "flow_creation_failed":
            raise DemoError(f"flow_creation_failed: {found.get('reason')}")
        since = len(client.events)
        started = time.monotonic()
        client.send({"resolve": DNS_NAME, "resource": dns_id})
        status = await client.wait_event("domain_status", since=since, where=lambda e: e.get("domain") == DNS_NAME)
    except (TimeoutError, RuntimeError) as exc:
        raise DemoError(str(exc).splitlines()[0]) from None
    if status.get("status") != "Active":
        raise DemoError(f"domain_status {status.get('status')} for {DNS_NAME}")
    elapsed = time.monotonic() - started
    proxy = status["proxy_ips"][0]
    world.write_netns_etc("cl", "hosts", f"{proxy} {DNS_NAME}\n")
    url = f"http://{DNS_NAME}:{HTTP_PORT}/blob"
    fetched = await world.http_get_sha256("cl", url)
    if "error" in fetched:
        raise DemoError(f"GET {url}: {fetched['error']}")
    if not fetched["matches"]:
        raise DemoError(f"GET {url}: sha256 {fetched['sha256'][:16]}… differs from the blob's")
    return (
        f"{DNS_NAME} ({DNS_RESOURCE_PATTERN}): assigned_ips → domain_status Active in {elapsed:.2f} s; "
        f"{fetched['bytes'] / 2**20:.1f} MiB by name via proxy IP {proxy} → {RESOURCE_IP}, sha256 matches"
    )


async def denied_port(ctx: DemoContext) -> str:
    probe = await ctx.lab.probe_tcp("cl", RESOURCE_IP, DENIED_PORT)
    if probe.get("icmp") != ICMP_ADMIN_PROHIBITED:
        raise DemoError(f"tcp/{DENIED_PORT}: {probe} (expected ICMP 3/13)")
    return (
        f"tcp/{DENIED_PORT} is outside lan-web's filters: ICMP destination unreachable, administratively "
        f"prohibited (3/13), connect() → {probe['outcome']}"
    )


async def iperf3(ctx: DemoContext) -> str:
    try:
        upload = await ctx.lab.iperf3("cl", seconds=IPERF_SECONDS)
        download = await ctx.lab.iperf3("cl", seconds=IPERF_SECONDS, reverse=True)
    except RuntimeError as exc:
        raise DemoError(str(exc)) from None
    ctx.facts["iperf3_mbit"] = (upload.bits_per_second / 1e6, download.bits_per_second / 1e6)
    retransmits = f", {upload.retransmits} retransmits" if upload.retransmits is not None else ""
    return (
        f"TCP with {RESOURCE_IP}:{IPERF_PORT} through the tunnel, {IPERF_SECONDS:g} s each way: client → resource "
        f"{upload.bits_per_second / 1e6:.0f} Mbit/s{retransmits}, resource → client "
        f"{download.bits_per_second / 1e6:.0f} Mbit/s"
    )


async def relayed_path(ctx: DemoContext) -> str:
    world = ctx.lab
    # New flows through both routers now get a new port per destination: hole punching cannot work any more.
    world.set_nat("natg", "masquerade random")
    world.set_nat("natc", "masquerade random")
    await _start_client(ctx, "client-2", 1, "lan")
    setup = await _wait_path(ctx.client("client-2"), "relayed", timeout=20)
    ping = await world.ping("cl2", RESOURCE_IP, count=3)
    if ping.returncode != 0:
        raise DemoError(f"relayed, but ping {RESOURCE_IP} failed: {ping.stdout.strip().splitlines()[-1:]}")
    return (
        f"client-2 ↔ gateway behind port-randomizing NATs: relayed via {RELAY_IPS[0]}:{RELAY_PORT} "
        f"(setup {setup:.2f} s), ping {RESOURCE_IP} 0% loss"
    )


async def metrics(ctx: DemoContext) -> str:
    text = await ctx.lab.gateway_metrics()
    if not text:
        raise DemoError("/metrics did not answer")
    excerpt = [line for line in text.splitlines() if line.startswith(METRIC_PREFIXES)]
    ctx.notes += [f"    {line}" for line in excerpt[:METRICS_EXCERPT_LINES]]
    return f"{len(text.splitlines())} lines of Prometheus text from 127.0.0.1:8080 inside the gateway's namespace"


async def clean_shutdown(ctx: DemoContext) -> str:
    gateway = ctx.lab.need_gateway()
    for client in ctx.clients.values():
        await client.quit(timeout=3)
    started = time.monotonic()
    try:
        code = await gateway.terminate(timeout=10)
    except TimeoutError:
        raise DemoError("the gateway did not exit within 10 s of SIGTERM (killed)") from None
    if code != 0:
        raise DemoError(f"the gateway exited with {code} after SIGTERM")
    return f"SIGTERM → exit 0 in {time.monotonic() - started:.1f} s"


CHECKS: list[Check] = [
    Check("gateway joined", gateway_joined),
    Check("authorization", authorization, needs=("gateway joined",)),
    Check("direct path", direct_path, needs=("authorization",)),
    Check("download", download, needs=("authorization",), timeout=40),
    Check("DNS resource", dns_resource, needs=("authorization",), timeout=40),
    Check("denied port", denied_port, needs=("authorization",)),
    Check("iperf3", iperf3, needs=("authorization",)),
    Check("relayed path", relayed_path, needs=("gateway joined",), timeout=45),
    Check("metrics", metrics, needs=("gateway joined",)),
    Check("clean shutdown", clean_shutdown),
]


# ---------------------------------------------------------------------- the runner

WorldFactory = Callable[[], AbstractAsyncContextManager[Any]]


def demo_world(gateway_log_level: str = "info") -> LabWorld:
    return LabWorld(
        gateway_nat="masquerade",
        client_nat="masquerade",
        relays=1,
        clients=2,
        resources=("lan", "lan-web", "dns"),
        gateway_log_level=gateway_log_level,
    )


def _diagnostics(ctx: DemoContext) -> list[str]:
    """The last lines the gateway and the clients wrote, for a failed run."""
    lines: list[str] = []
    world = ctx.world
    gateway = getattr(world, "gateway", None)
    if gateway is not None:
        lines += ["gateway output (last lines):", *(f"    {line}" for line in gateway.output().splitlines()[-12:])]
    for name, client in ctx.clients.items():
        tail = client.stderr_text().splitlines()[-6:]
        if tail:
            lines += [f"{name} stderr (last lines):", *(f"    {line}" for line in tail)]
    return lines


async def run(
    checks: Sequence[Check] = CHECKS,
    *,
    make_world: WorldFactory = demo_world,
    write: Callable[[str], None] = print,
) -> int:
    """Builds the world, runs the checks, tears down; returns the exit code (0 all passed, 1 some failed, 130 on
    interruption)."""
    passed: list[str] = []
    failed = False
    interrupted = False
    total = len(checks)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    write("Firezone gateway demo: client ─ NAT ─ relay + portal ─ NAT ─ firezone-gateway ─ resource host")
    started = time.monotonic()
    try:
        async with make_world() as world:
            write(f"setup: {_describe(world)} ({time.monotonic() - started:.1f} s)")
            ctx = DemoContext(world=world)
            checks_started = time.monotonic()
            try:
                for number, check in enumerate(checks, 1):
                    missing = [need for need in check.needs if need not in passed]
                    prefix = f"[{number}/{total}]"
                    if missing:
                        failed = True
                        write(f"{prefix} skipped {check.title}: needs {', '.join(missing)}")
                        continue
                    try:
                        detail = await asyncio.wait_for(check.run(ctx), check.timeout)
                    except (DemoError, TimeoutError, OSError, RuntimeError) as exc:
                        failed = True
                        message = str(exc).splitlines()[0] if str(exc) else f"timed out after {check.timeout:g} s"
                        write(f"{prefix} FAILED  {check.title}: {message}")
                    else:
                        passed.append(check.title)
                        write(f"{prefix} ok      {check.title}: {detail}")
                    for note in ctx.notes:
                        write(note)
                    ctx.notes.clear()
            except asyncio.CancelledError:
                interrupted = True
                _consume_cancellation()
                write("demo: interrupted, tearing everything down")
            write(f"checks took {time.monotonic() - checks_started:.1f} s")
            if failed and not interrupted:
                for line in _diagnostics(ctx):
                    write(line)
            teardown_started = time.monotonic()
        write(f"teardown: namespaces, processes and relays removed ({time.monotonic() - teardown_started:.1f} s)")
    except asyncio.CancelledError:
        interrupted = True
        _consume_cancellation()
        write("demo: interrupted during setup or teardown; everything built so far was removed")
    except (OSError, RuntimeError, ValueError) as exc:
        failed = True
        write(f"setup FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
    write(f"demo: {len(passed)}/{total} checks passed")
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if len(passed) == total and not failed else 1


def _consume_cancellation() -> None:
    """Marks the interruption as handled, so that the teardown's own timeouts keep working."""
    task = asyncio.current_task()
    if task is not None:
        while task.cancelling():
            task.uncancel()


def _describe(world: Any) -> str:
    if not isinstance(world, LabWorld):
        return "stand-in world"
    return (
        f"{len(world.ns)} namespaces, NATs gateway={world.gateway_nat!r} client={world.client_nat!r}, coturn on "
        f"{', '.join(f'{ip}:{RELAY_PORT}' for ip in RELAY_IPS[: world.relays])}, resource host {RESOURCE_IP} "
        f"(HTTP {world.blob_size / 2**20:.0f} MiB blob, iperf3), portal {world.portal_url}, firezone-gateway in gw"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--gateway-log-level", default="info", help="FIREZONE_LOG_LEVEL for the gateway")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, TUN devices, nftables)", file=sys.stderr)
        print(f"demo: 0/{len(CHECKS)} checks passed")
        return 2
    return asyncio.run(run(make_world=lambda: demo_world(args.gateway_log_level)))


if __name__ == "__main__":
    sys.exit(main())
