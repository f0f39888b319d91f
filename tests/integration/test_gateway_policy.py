"""The real gateway enforces each client's policy on real traffic (docs/protocol.md §2.1, §3.3, §3.4).

One lab world serves the module: ``firezone-gateway`` joined to the dev portal, two headless clients behind their NAT
holding the filtered resource ``lan-web`` (tcp/80, tcp/5201, ICMP), and the resource host. Each test starts from that
state and puts it back, except the last one on that world, which lets client 2's grant expire. The portal pushes what
an operator would cause (a second authorization, an expiry, ``reject_access``, ``resource_updated``, downtime); the
clients' namespaces probe the resource host, and the gateway's ``/metrics`` and the resource host's own counters say
what got through. A second, short-lived world checks the relayed path. Timings are measured against the wall clock the
gateway's policy uses, and printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from lab.portal import DevPortal
from lab.portal.config import AuthorizationConfig
from lab.world import HTTP_PORT, RESOURCE_IP, ClientProcess, LabWorld

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("turnserver", "nft", "iperf3", "ping")),
        reason="coturn/nft/iperf3/ping missing",
    ),
    pytest.mark.asyncio(loop_scope="module"),
]

BLOB_SIZE = 1024 * 1024
DENIED_PORT = 22
"""Outside ``lan-web``'s filters, inside ``lan``'s; nothing listens there, so a SYN that reaches the host gets a RST."""
ICMP_ADMIN_PROHIBITED = [3, 13]
CLIENT_TUN = "tun-firezone"
SETUP_TIMEOUT = 30.0
EXPIRY_LEAD = 3.0
"""Seconds at least between granting with an expiry and that expiry: long enough to see traffic pass first."""
EXPIRY_CUT_LIMIT = 2.0
"""docs/protocol.md §3.3: an expired authorization carries no traffic after this many seconds."""
AT_ONCE_LIMIT = 1.5
"""What "at once" (reject_access, resource_updated) may take on a loaded machine; measured values are milliseconds."""

PROBE_LOOP = r"""
import errno, json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
until, interval, timeout, stop_after = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
prohibited = 0
while time.time() < until and prohibited < stop_after:
    started = time.time()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        outcome = "reached"
    except ConnectionRefusedError:
        outcome = "reached"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        outcome = "prohibited" if exc.errno == errno.EHOSTUNREACH else f"errno {exc.errno}"
    finally:
        sock.close()
    ended = time.time()
    print(json.dumps({"start": started, "end": ended, "outcome": outcome}), flush=True)
    prohibited += outcome == "prohibited"
    time.sleep(max(0.0, interval - (ended - started)))
"""
"""TCP connects in a loop from a client's namespace, one JSON line each: ``reached`` (connected or refused by the
host), ``prohibited`` (EHOSTUNREACH: the gateway's ICMP answer), ``timeout``. Stops after ``stop_after`` prohibited
answers or at ``until`` (unix time)."""

KEEPALIVE = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
connection = socket.create_connection((host, port), timeout=5)
request = f"GET /blob.sha256 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
print(json.dumps({"event": "connected", "port": connection.getsockname()[1]}), flush=True)
for line in sys.stdin:
    connection.settimeout(float(line))
    started = time.time()
    try:
        connection.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = None
        for header in head.split(b"\r\n")[1:]:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while length is not None and len(body) < length:
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            body += chunk
        status = int(head.split()[1])
        print(json.dumps({"ok": status == 200, "status": status, "body": body.decode().strip()}), flush=True)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": repr(exc), "seconds": time.time() - started}), flush=True)
"""
"""One persistent HTTP/1.1 connection from a client's namespace to the resource host: each stdin line (a timeout in
seconds) sends one ``GET /blob.sha256`` on it and prints ``{ok, status, body}`` or ``{ok: false, error}``."""


@dataclass
class PolicyLab:
    world: LabWorld
    clients: list[ClientProcess]

    @property
    def portal(self) -> DevPortal:
        return self.world.need_portal()

    def client_id(self, index: int) -> str:
        return self.world.lab_clients[index].id

    def netns_role(self, index: int) -> str:
        return self.world.lab_clients[index].netns_role


class LineProcess:
    """A helper script in a namespace whose stdout is JSON lines, read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, world: LabWorld, role: str, script: str, args: Sequence[str]) -> LineProcess:
        process = await asyncio.create_subprocess_exec(
            *world.netns(role).argv([sys.executable, "-c", script, *args]),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        return cls(process)

    async def next(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next line as JSON; None at EOF."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            return None
        found: dict[str, Any] = json.loads(line)
        self.lines.append(found)
        return found

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        with contextlib.suppress(TimeoutError):
            return (await asyncio.wait_for(self.process.stderr.read(), 2)).decode(errors="replace")
        return ""

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()


async def probe_loop(
    lab: PolicyLab, index: int, port: int, *, until: float, stop_after: int = 3, interval: float = 0.05
) -> LineProcess:
    args = [RESOURCE_IP, str(port), f"{until:.3f}", str(interval), "0.5", str(stop_after)]
    return await LineProcess.start(lab.world, lab.netns_role(index), PROBE_LOOP, args)


async def drain(loop: LineProcess, timeout: float) -> list[dict[str, Any]]:
    """Every result of a probe loop until it ends (``timeout`` s at most)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0 and await loop.next(remaining) is not None:
        pass
    await loop.close()
    return loop.lines


async def authorize(lab: PolicyLab, index: int, key: str, *, expires_at: int | None | str = "default") -> None:
    """Pushes ``create_authorization`` for a connected client and resource, as the portal does for another grant of the
    same client (same key, so the same ICE credentials and PSK), and waits for the gateway's ``authorization_created``."""
    portal = lab.portal
    session = portal.session()
    client_id = lab.client_id(index)
    payload = portal.authorization_payload(
        session,
        client_id,
        lab.world.resource_id(key),
        expires_at=expires_at,
        client_public_key=portal.client_session(client_id).public_key,
    )
    session.issued_refs.add(payload["ref"])
    since = portal.next_seq
    await portal.push("create_authorization", payload)
    await portal.wait_for(
        since=since,
        kind="received",
        event="authorization_created",
        predicate=lambda e: isinstance(e.payload, dict) and e.payload.get("ref") == payload["ref"],
        timeout=10,
    )


async def gateway_drops(world: LabWorld, reason: str) -> float:
    """firezone_dataplane_drops_total{layer="gateway",reason=...} (0 when absent)."""
    text = await world.gateway_metrics()
    for line in text.splitlines():
        if line.startswith("firezone_dataplane_drops_total{") and 'layer="gateway"' in line:
            if f'reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def gateway_clients(world: LabWorld) -> float:
    """The firezone_clients gauge: clients holding at least one authorization (-1 when absent)."""
    for line in (await world.gateway_metrics()).splitlines():
        if line.startswith("firezone_clients "):
            return float(line.split()[1])
    return -1.0


async def wait_drops(world: LabWorld, reason: str, at_least: float, timeout: float = 5.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = await gateway_drops(world, reason)
        if value >= at_least or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def icmp_in_echos(world: LabWorld, role: str) -> int:
    """Echo requests the namespace's IPv4 stack received (``Icmp: InEchos`` of /proc/net/snmp, per namespace)."""
    snmp = (await world.exec_in(role, ["cat", "/proc/net/snmp"])).stdout
    header, values = [line.split() for line in snmp.splitlines() if line.startswith("Icmp:")][:2]
    return int(values[header.index("InEchos")])


async def wait_tunnel_answers(world: LabWorld, role: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (await world.ping(role, RESOURCE_IP, count=1, wait=1.0)).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no ping answer through the tunnel from {role} within {timeout} s")


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[gateway-policy] {text}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab() -> AsyncIterator[PolicyLab]:
    world = LabWorld(
        gateway_nat="masquerade",
        client_nat="masquerade",
        clients=2,
        resources=("lan", "lan-web"),
        blob_size=BLOB_SIZE,
    )
    async with world:
        await world.wait_gateway_joined(timeout=20)
        clients = [await world.start_client(index, resources=[world.resource_id("lan-web")]) for index in (0, 1)]
        for client in clients:
            flow = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=SETUP_TIMEOUT)
            assert flow["event"] == "flow_created", (flow, world.need_gateway().output()[-2000:])
            await client.wait_event("established", timeout=SETUP_TIMEOUT)
        # The gateway drops what it would send a client until its own side of the connection is ready (it never
        # buffers, docs/protocol.md §3.3), which can lag the client's "established" by a round trip: one answered
        # ping per client first, so no test pays for a lost first packet.
        for index in (0, 1):
            await wait_tunnel_answers(world, world.lab_clients[index].netns_role)
        yield PolicyLab(world, clients)


async def test_allowed_port_carries_the_download(lab: PolicyLab) -> None:
    for index in (0, 1):
        fetched = await lab.world.http_get_sha256(lab.netns_role(index))
        assert fetched.get("matches") is True, fetched
        assert fetched["bytes"] == BLOB_SIZE


async def test_a_denied_port_is_answered_administratively_prohibited(lab: PolicyLab) -> None:
    before = await gateway_drops(lab.world, "filtered")
    probe = await lab.world.probe_tcp("cl", RESOURCE_IP, DENIED_PORT)
    assert probe["outcome"] == "unreachable" and probe["icmp"] == ICMP_ADMIN_PROHIBITED, probe
    assert await wait_drops(lab.world, "filtered", before + 1) >= before + 1


async def test_a_narrowed_filter_applies_on_the_next_packet(lab: PolicyLab, capsys: pytest.CaptureFixture[str]) -> None:
    world = lab.world
    resource_id = world.resource_id("lan-web")
    session = await LineProcess.start(world, "cl", KEEPALIVE, [RESOURCE_IP, str(HTTP_PORT)])
    loop = await probe_loop(lab, 0, HTTP_PORT, until=time.time() + 15)
    try:
        assert (await session.next()) is not None, await session.stderr()
        session.send("5")
        first = await session.next()
        assert first is not None and first["ok"] is True, first
        reached = await loop.next()
        assert reached is not None and reached["outcome"] == "reached", reached
        # tcp/80 leaves the filters while one connection is established (and was just used) and new ones keep coming.
        pushed_at = time.time()
        await lab.portal.resource_updated(resource_id, filters=[{"protocol": "icmp"}])
        results = await drain(loop, 15)
        session.send("1.5")
        second = await session.next()
        assert second is not None and second["ok"] is False, second
        # ICMP stays allowed: the new filter set replaced the old one, no more.
        assert (await world.ping("cl", RESOURCE_IP, count=1)).returncode == 0
    finally:
        await loop.close()
        await session.close()
        await lab.portal.resource_updated(resource_id)
    prohibited = [r for r in results if r["outcome"] == "prohibited"]
    assert prohibited, results[-5:]
    cut = prohibited[0]["end"] - pushed_at
    assert cut <= AT_ONCE_LIMIT, results
    late = [r for r in results if r["outcome"] == "reached" and r["start"] > pushed_at + AT_ONCE_LIMIT]
    assert not late, late
    # Restored: port 80 works again from the next connection on.
    loop = await probe_loop(lab, 0, HTTP_PORT, until=time.time() + 3, stop_after=99)
    first_after = await loop.next()
    await loop.close()
    assert first_after is not None and first_after["outcome"] == "reached", first_after
    fetched = await world.http_get_sha256("cl")
    assert fetched.get("matches") is True, fetched
    report(
        capsys,
        f"resource_updated without tcp/80: first refused SYN {cut * 1000:.0f} ms after the push; "
        "the established connection's next request got no answer",
    )


async def test_a_second_client_without_the_authorization_cannot_reach_the_resource(lab: PolicyLab) -> None:
    world = lab.world
    await authorize(lab, 0, "lan")
    try:
        # Client 1 now holds "lan": tcp/22 reaches the host (which refuses it, nothing listens).
        first = await world.probe_tcp("cl", RESOURCE_IP, DENIED_PORT)
        assert first["outcome"] == "refused" and first["icmp"] is None, first
        # Client 2 holds only "lan-web": the gateway answers for the host.
        before = await gateway_drops(world, "filtered")
        second = await world.probe_tcp(lab.netns_role(1), RESOURCE_IP, DENIED_PORT)
        assert second["outcome"] == "unreachable" and second["icmp"] == ICMP_ADMIN_PROHIBITED, second
        assert await wait_drops(world, "filtered", before + 1) >= before + 1
        # Its tunnel itself is fine.
        fetched = await world.http_get_sha256(lab.netns_role(1))
        assert fetched.get("matches") is True, fetched
    finally:
        await lab.portal.reject_access(lab.client_id(0), world.resource_id("lan"))


async def test_a_spoofed_source_is_dropped(lab: PolicyLab, capsys: pytest.CaptureFixture[str]) -> None:
    world = lab.world
    # Client 1 sends with client 2's tunnel address as its source: a legitimate address, only not its own.
    spoofed = world.lab_clients[1].ipv4
    control_before = await icmp_in_echos(world, "res")
    control = await world.ping("cl", RESOURCE_IP, count=3)
    assert control.returncode == 0, control.stdout
    echoes_before = await icmp_in_echos(world, "res")
    assert echoes_before - control_before >= 3, "the resource host's echo counter does not count our pings"
    drops_before = await gateway_drops(world, "spoofed_source")
    await world.exec_in("cl", ["ip", "addr", "add", f"{spoofed}/32", "dev", CLIENT_TUN])
    try:
        argv = ["ping", "-c", "5", "-i", "0.2", "-W", "1", "-I", spoofed, RESOURCE_IP]
        result = await world.exec_in("cl", argv, timeout=15)
        assert result.returncode != 0, result.stdout
    finally:
        await world.exec_in("cl", ["ip", "addr", "del", f"{spoofed}/32", "dev", CLIENT_TUN])
    drops = await wait_drops(world, "spoofed_source", drops_before + 5)
    assert drops >= drops_before + 5, (drops_before, drops)
    assert await icmp_in_echos(world, "res") == echoes_before, "a spoofed echo request reached the resource host"
    # Client 1's own traffic is unaffected.
    assert (await world.ping("cl", RESOURCE_IP, count=1)).returncode == 0
    report(capsys, f"spoofed source {spoofed}: {drops - drops_before:.0f} packets dropped as spoofed_source, 0 reached")


async def test_expiry_cuts_traffic_within_2s(lab: PolicyLab, capsys: pytest.CaptureFixture[str]) -> None:
    world = lab.world
    expires_at = math.ceil(time.time() + EXPIRY_LEAD)
    await authorize(lab, 0, "lan", expires_at=expires_at)
    loop = await probe_loop(lab, 0, DENIED_PORT, until=expires_at + EXPIRY_CUT_LIMIT + 3)
    try:
        results = await drain(loop, expires_at - time.time() + EXPIRY_CUT_LIMIT + 8)
    finally:
        with contextlib.suppress(Exception):
            await lab.portal.reject_access(lab.client_id(0), world.resource_id("lan"))
    reached = [r for r in results if r["outcome"] == "reached"]
    prohibited = [r for r in results if r["outcome"] == "prohibited"]
    assert reached and reached[0]["end"] < expires_at, f"tcp/22 never worked before the expiry: {results}"
    assert prohibited, f"tcp/22 still works after the expiry: {results[-5:]}"
    cut = prohibited[0]["end"] - expires_at
    last_reached = reached[-1]["start"] - expires_at
    assert cut <= EXPIRY_CUT_LIMIT, f"first refusal {cut:.3f} s after expires_at: {results}"
    assert all(r["start"] < expires_at for r in reached), f"traffic passed after expires_at: {results}"
    # The client keeps its other resource: only the expired grant went.
    fetched = await world.http_get_sha256("cl")
    assert fetched.get("matches") is True, fetched
    report(
        capsys,
        f"expiry: last connect that reached the host started {last_reached * 1000:+.0f} ms from expires_at, "
        f"first refusal {cut * 1000:+.0f} ms (limit {EXPIRY_CUT_LIMIT:.0f} s)",
    )


async def test_reject_access_cuts_traffic_at_once(lab: PolicyLab, capsys: pytest.CaptureFixture[str]) -> None:
    world = lab.world
    await authorize(lab, 0, "lan")
    loop = await probe_loop(lab, 0, DENIED_PORT, until=time.time() + 15)
    try:
        first = await loop.next()
        assert first is not None and first["outcome"] == "reached", first
        rejected_at = time.time()
        await lab.portal.reject_access(lab.client_id(0), world.resource_id("lan"))
        results = await drain(loop, 15)
    finally:
        await loop.close()
    prohibited = [r for r in results if r["outcome"] == "prohibited"]
    assert prohibited, results[-5:]
    cut = prohibited[0]["end"] - rejected_at
    assert cut <= AT_ONCE_LIMIT, results
    late = [r for r in results if r["outcome"] == "reached" and r["start"] > rejected_at + AT_ONCE_LIMIT]
    assert not late, late
    fetched = await world.http_get_sha256("cl")
    assert fetched.get("matches") is True, fetched
    report(capsys, f"reject_access: first refusal {cut * 1000:.0f} ms after the push")


async def test_existing_flows_keep_working_while_the_portal_is_down(
    lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    world, portal = lab.world, lab.portal
    session = await LineProcess.start(world, "cl", KEEPALIVE, [RESOURCE_IP, str(HTTP_PORT)])
    try:
        assert (await session.next()) is not None, await session.stderr()
        session.send("5")
        before = await session.next()
        assert before is not None and before["ok"] is True, before
        down_since = portal.next_seq
        down_at = time.monotonic()
        portal.faults.refuse_connections = True
        await portal.drop(abort=True)
        deadline = time.monotonic() + 10
        while "firezone_portal_joined 0" not in await world.gateway_metrics():
            assert time.monotonic() < deadline, "the gateway still says it is joined"
            await asyncio.sleep(0.1)
        # The gateway tries to come back and is turned away, more than once, while the traffic goes on.
        first_refusal = await portal.wait_for(since=down_since, kind="refused", timeout=10)
        fetched = await world.http_get_sha256("cl")
        assert fetched.get("matches") is True, fetched
        assert (await world.ping(lab.netns_role(1), RESOURCE_IP, count=2)).returncode == 0
        await portal.wait_for(since=first_refusal.seq + 1, kind="refused", timeout=15)
        session.send("5")
        during = await session.next()
        assert during is not None and during["ok"] is True and during["body"] == before["body"], during
        refused = len(portal.events(since=down_since, kind="refused"))
        assert "firezone_portal_joined 0" in await world.gateway_metrics() and world.need_gateway().running
        seconds_down = time.monotonic() - down_at
    finally:
        await session.close()
        # The real portal's init lists its cache of valid pairs (docs/protocol.md §2.1) and the gateway revokes
        # every pair it does not list: the pairs brokered so far go into the config, so that the rejoin's init lists
        # them whatever the dev portal remembers by itself.
        listed = {(f.client_id, f.resource_id): f for f in portal.flows(state="created")}
        portal.config.authorizations.extend(
            AuthorizationConfig(
                client_id=client_id,
                resource_id=resource_id,
                expires_at=(flow.authorization or {}).get("expires_at"),
            )
            for (client_id, resource_id), flow in listed.items()
        )
        since = portal.next_seq
        portal.faults.refuse_connections = False
    joined = await portal.wait_for(since=since, kind="received", event="phx_join", timeout=30)
    await portal.wait_for(since=joined.seq, kind="sent", event="init", timeout=10)
    # Past one expiry tick (1 Hz) after the re-sync: both clients keep their grant and their connection.
    await asyncio.sleep(1.2)
    for index in (0, 1):
        fetched = await world.http_get_sha256(lab.netns_role(index))
        assert fetched.get("matches") is True, (index, fetched)
    assert await gateway_clients(world) == 2
    report(
        capsys,
        f"portal down {seconds_down:.1f} s ({refused} reconnects refused): the open connection, a new download "
        "and ping all worked; after the rejoin both clients still download",
    )


async def test_expiry_of_the_last_resource_closes_the_connection(
    lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Client 2's only grant expires: its packets are refused from that instant, and the 1 Hz expiry tick then
    ends the connection with a goodbye (docs/protocol.md §3.3, §3.4). Runs last: client 2 is gone afterwards."""
    client = lab.clients[1]
    since = len(client.events)
    expires_at = math.ceil(time.time() + EXPIRY_LEAD)
    await authorize(lab, 1, "lan-web", expires_at=expires_at)
    loop = await probe_loop(lab, 1, HTTP_PORT, until=expires_at + EXPIRY_CUT_LIMIT + 3, stop_after=1)
    try:
        closed = await client.wait_event("closed", since=since, timeout=expires_at - time.time() + 10)
        closed_after = time.time() - expires_at
        results = await drain(loop, 10)
    finally:
        await loop.close()
    assert closed.get("reason") == "goodbye", closed
    reached = [r for r in results if r["outcome"] == "reached"]
    assert reached and reached[0]["end"] < expires_at, results
    assert all(r["start"] < expires_at for r in reached), f"traffic passed after expires_at: {results}"
    assert closed_after <= EXPIRY_CUT_LIMIT, f"goodbye {closed_after:.3f} s after expires_at"
    assert await gateway_clients(lab.world) == 1
    report(capsys, f"expiry of the last resource: goodbye {closed_after * 1000:+.0f} ms from expires_at")


async def test_the_relayed_path_carries_the_same_download(capsys: pytest.CaptureFixture[str]) -> None:
    async with LabWorld(
        gateway_nat="masquerade random",
        client_nat="masquerade random",
        clients=1,
        resources=("lan-web",),
        blob_size=BLOB_SIZE,
    ) as world:
        await world.wait_gateway_joined(timeout=20)
        client = await world.start_client(resources=[world.resource_id("lan-web")])
        flow = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=SETUP_TIMEOUT)
        assert flow["event"] == "flow_created", (flow, world.need_gateway().output()[-2000:])
        established = await client.wait_event("established", timeout=SETUP_TIMEOUT)
        assert client.path == "relayed", client.events
        fetched = await world.http_get_sha256("cl")
        assert fetched.get("matches") is True and fetched["bytes"] == BLOB_SIZE, fetched
        assert client.path == "relayed", client.events
        probe = await world.probe_tcp("cl", RESOURCE_IP, DENIED_PORT)
        assert probe["icmp"] == ICMP_ADMIN_PROHIBITED, probe
        # Rejecting the client's last resource ends its connection at once: the gateway says goodbye (§3.4).
        since = len(client.events)
        rejected_at = time.monotonic()
        await world.need_portal().reject_access(world.lab_clients[0].id, world.resource_id("lan-web"))
        closed = await client.wait_event("closed", since=since, timeout=5)
        goodbye_after = time.monotonic() - rejected_at
        assert closed.get("reason") == "goodbye", closed
        assert await gateway_clients(world) == 0
        report(
            capsys,
            f"relayed: {BLOB_SIZE} bytes in {fetched['seconds']:.2f} s, sha256 matches "
            f"(setup {established['setup_seconds']:.2f} s); reject_access of the last resource: "
            f"goodbye after {goodbye_after * 1000:.0f} ms",
        )
