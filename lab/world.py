"""The lab world: a dev portal, coturn relays, NAT routers, the real gateway, a resource host and lab clients.

Everything lives in network namespaces with a unique suffix (:class:`lab.netns.Topology`); nothing is routed outside::

    cl  (10.2.0.2) ── natc (10.2.0.1 | 172.31.2.1) ──┐
    cl2 (10.3.0.2) ── natc (10.3.0.1)                │  wan: 172.31.1.254, 172.31.2.254 on the router links;
    gw  (10.1.0.2) ── natg (10.1.0.1 | 172.31.1.1) ──┤       portal 172.31.0.1:8443 (in this process, its listening
    gw  (172.20.0.1) ── res (172.20.0.10)            │       socket made inside wan); relays 172.31.0.11/.12:3478

A NAT router either routes plainly (``none``: the wan knows the private networks), or masquerades with
endpoint-independent mapping (``masquerade``: hole punching works), or picks a new port per destination
(``masquerade random``: two such NATs leave only the relay). Unsolicited inbound datagrams are dropped before conntrack
confirms them, as home routers do. The resource host serves a deterministic blob over HTTP (:mod:`lab.resource`) and
runs ``iperf3 -s``. The gateway runs in ``gw`` (``ip netns exec``); its health server is 127.0.0.1:8080 there.

    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade random") as world:
        await world.wait_gateway_joined()
        client = await world.start_client(resources=[world.resource_id("lan")])
        await client.wait_event("established")
        fetched = await world.http_get_sha256("cl")

Every helper that runs something in a namespace is async, so the in-process portal keeps serving meanwhile. Leaving
the ``async with`` (normally, on failure or on cancellation such as Ctrl-C) stops every process and deletes every
namespace, with the TUN devices and nftables rules inside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import PrivateAttr

from dataplane.io.netlink import run_in_netns
from lab.netns import Netns, Topology
from lab.portal import AdminError, DevPortal, Flow, PortalConfig, PortalEvent
from lab.portal.gateway_process import GatewayProcess
from lab.relay import Coturn, coturn_password
from lab.resource import BLOB_PATH, DEFAULT_BLOB_SIZE, blob_sha256

NatMode = Literal["none", "masquerade", "masquerade random"]
NAT_MODES: tuple[NatMode, ...] = ("none", "masquerade", "masquerade random")

PORTAL_IP = "172.31.0.1"
PORTAL_PORT = 8443
RELAY_IPS = ("172.31.0.11", "172.31.0.12")
RELAY_PORT = 3478
GATEWAY_LAN_IP = "172.20.0.1"
RESOURCE_IP = "172.20.0.10"
RESOURCE_NETWORK = "172.20.0.0/24"
HTTP_PORT = 80
IPERF_PORT = 5201
GATEWAY_TUNNEL_IPS = ("100.64.0.10", "fd00:2021:1111::a")
SITE_ID = "5a1e0000-0000-4000-8000-000000000001"
GATEWAY_TOKEN = "lab-site-token"
RELAY_SECRET = "lab-relay-secret"
LAB_RELAY_THREADS = 2  # one per core of the lab machine: at 500+ clients a single relay thread drops datagrams
MAX_CLIENTS = 2
MAX_RELAYS = 2
MAX_GATEWAYS = 2
MAX_LOAD_CLIENTS = 10_000
LOAD_CLIENT_TOKEN_PREFIX = "lab-load-token-"
SECOND_GATEWAY_LAN = ("172.21.0.1", "172.21.0.10")
"""The second gateway's own link to the resource host (gateway side, resource side)."""
PROCESS_START_TIMEOUT = 10.0
DNS_PORT = 53
DNS_RESOURCE_PATTERN = "*.lab.example"
DNS_NAME = "app.lab.example"
"""A name of the DNS resource the resource host's DNS server answers (A: the resource host; TXT for the forwarder)."""
DNS_TXT = "firezone-lab"


@dataclass(frozen=True)
class LabResource:
    """A resource of the lab's portal config, chosen by ``key`` in :class:`LabWorld`'s ``resources``."""

    key: str
    id: str
    name: str
    address: str
    filters: tuple[Mapping[str, Any], ...] = ()
    type: Literal["cidr", "dns"] = "cidr"

    def to_config(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "name": self.name,
            "address": self.address,
            "filters": [dict(f) for f in self.filters],
            "site_id": SITE_ID,
        }


LAB_RESOURCES = {
    resource.key: resource
    for resource in (
        LabResource("lan", "1a000000-0000-4000-8000-000000000001", "Lab LAN", RESOURCE_NETWORK),
        LabResource(
            "lan-web",
            "1a000000-0000-4000-8000-000000000002",
            "Lab LAN (HTTP, iperf3 and ICMP only)",
            RESOURCE_NETWORK,
            (
                {"protocol": "tcp", "port_range_start": HTTP_PORT, "port_range_end": HTTP_PORT},
                {"protocol": "tcp", "port_range_start": IPERF_PORT, "port_range_end": IPERF_PORT},
                {"protocol": "icmp"},
            ),
        ),
        LabResource(
            "dns",
            "1a000000-0000-4000-8000-000000000003",
            "Lab names (DNS resource)",
            DNS_RESOURCE_PATTERN,
            (
                {"protocol": "tcp", "port_range_start": HTTP_PORT, "port_range_end": HTTP_PORT},
                {"protocol": "udp", "port_range_start": 1, "port_range_end": 65535},
                {"protocol": "icmp"},
            ),
            type="dns",
        ),
    )
}
"""``lan``: the resource host's network, everything allowed; ``lan-web``: the same network behind filters; ``dns``:
the names under ``*.lab.example`` the resource host's DNS server answers (docs/protocol.md §3.4)."""


class LabPortalConfig(PortalConfig):
    """The portal config with relay passwords coturn accepts.

    The real portal and relay share the Firezone scheme (docs/protocol.md §4.5); coturn only knows its TURN REST
    scheme (HMAC-SHA1 over the username). Usernames stay the portal's ``<expiry>:<salt>``; only the password differs,
    which neither the gateway nor the client computes themselves.
    """

    _brokered_flows: Callable[[], Sequence[Flow]] | None = PrivateAttr(default=None)

    def remember_brokered_flows(self, flows: Callable[[], Sequence[Flow]]) -> None:
        """Lets ``init`` list the flows the portal brokered (see :meth:`authorizations_for_site`)."""
        self._brokered_flows = flows

    def authorizations_for_site(self, site_id: str, now_unix: float) -> list[dict[str, Any]]:
        """The configured pairs plus every flow the portal brokered for this site that is still valid.

        The real portal's authorization cache holds brokered flows too, and a gateway re-syncs to ``init`` after a
        reconnect by revoking whatever is not listed (docs/protocol.md §2.1 step 5): without them a portal restart
        would cut every client off.
        """
        result = super().authorizations_for_site(site_id, now_unix)
        listed = {(entry["client_id"], entry["resource_id"]) for entry in result}
        for flow in self._brokered_flows() if self._brokered_flows is not None else ():
            authorization = flow.authorization
            if flow.state != "created" or authorization is None:
                continue
            if self.resource(flow.resource_id).site_id not in (None, site_id):
                continue
            expires_at = authorization.get("expires_at")
            if isinstance(expires_at, int) and expires_at < now_unix:
                continue
            if (flow.client_id, flow.resource_id) not in listed:
                listed.add((flow.client_id, flow.resource_id))
                result.append({"client_id": flow.client_id, "resource_id": flow.resource_id, "expires_at": expires_at})
        return result

    def relay_entries(self, gateway_public_key: str, relay_ids: list[str] | None = None) -> list[dict[str, Any]]:
        entries = super().relay_entries(gateway_public_key, relay_ids)
        for entry in entries:
            if entry.get("type") == "turn":
                entry["password"] = coturn_password(self.relay_secret, entry["username"])
        return entries


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The last non-empty stdout line as JSON (the probes print one object), or None."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        if not lines:
            return None
        try:
            return json.loads(lines[-1])
        except ValueError:
            return None


@dataclass(frozen=True)
class IperfResult:
    bits_per_second: float
    retransmits: int | None
    seconds: float
    reverse: bool


def nat_ruleset(outside_interface: str, mode: NatMode) -> str:
    """The nftables ruleset of a NAT router in ``mode`` (not ``none``) towards ``outside_interface``."""
    random = " random" if mode == "masquerade random" else ""
    # Dropping unsolicited inbound datagrams before conntrack confirms them keeps the peer's early checks from claiming
    # the tuple our own mapping needs (masquerade would then pick another port and defeat hole punching).
    return (
        "table ip fznat {\n"
        " chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n"
        f'  oifname "{outside_interface}" masquerade{random}\n }}\n'
        " chain input {\n  type filter hook input priority filter; policy accept;\n"
        f'  iifname "{outside_interface}" ct state new drop\n }}\n'
        "}\n"
    )


def load_client_token(index: int) -> str:
    """The portal token of load client ``index`` (see ``LabWorld.load_clients``)."""
    return f"{LOAD_CLIENT_TOKEN_PREFIX}{index}"


def lab_client_argv(portal_url: str, token: str, resources: Sequence[str], tun: str = "tun-firezone") -> list[str]:
    """The headless client's command line (``python -m lab.client`` in portal mode)."""
    argv = [sys.executable, "-m", "lab.client", "--portal", portal_url, "--token", token, "--tun", tun]
    for resource_id in resources:
        argv += ["--resource", resource_id]
    return argv


class ClientProcess:
    """A lab client in its namespace: its JSON event lines are collected, commands go to its stdin as JSON lines."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.stderr = bytearray()
        self.other_output: list[str] = []
        self._changed = asyncio.Event()
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._read_events(process.stdout)),
            asyncio.ensure_future(self._collect(process.stderr)),
        ]

    @classmethod
    async def start(cls, name: str, netns: Netns, argv: Sequence[str]) -> ClientProcess:
        process = await asyncio.create_subprocess_exec(
            *netns.argv(argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        return cls(name, process)

    async def _read_events(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").strip()
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.events.append(event)
            elif text:
                self.other_output.append(text)
            self._changed.set()
        self._changed.set()

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.stderr.extend(chunk)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    @property
    def path(self) -> str | None:
        """The path of the newest ``established``/``path_changed`` event, if any."""
        paths = [e.get("path") for e in self.events if e.get("event") in ("established", "path_changed")]
        return str(paths[-1]) if paths else None

    async def wait_event(
        self,
        event: str | Sequence[str],
        *,
        timeout: float = 15.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        since: int = 0,
    ) -> dict[str, Any]:
        """The first event named ``event`` (or any of several names) at index ``since`` or later that satisfies
        ``where``; raises ``TimeoutError``, or ``RuntimeError`` once the client has exited without it."""
        names = {event} if isinstance(event, str) else set(event)
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            for found in self.events[since:]:
                if found.get("event") in names and (where is None or where(found)):
                    return found
            if not self.running and all(reader.done() for reader in self._readers[:1]):
                raise RuntimeError(f"client {self.name} exited ({self.process.returncode}) before {event!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"client {self.name}: no {event!r} within {timeout} s; last {self.events[-3:]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def send(self, command: Mapping[str, Any]) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(json.dumps(command).encode() + b"\n")

    def request(self, resource_id: str) -> None:
        self.send({"request": resource_id})

    async def quit(self, timeout: float = 5.0) -> int | None:
        """Asks the client to quit; kills it if it has not within ``timeout``. Returns its exit code."""
        self.send({"quit": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout)
        await self.close()
        return self.process.returncode

    async def close(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5)
        if self.process.stdin is not None:
            self.process.stdin.close()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def stderr_text(self) -> str:
        return bytes(self.stderr).decode(errors="replace")


@dataclass
class NatRouter:
    netns: Netns
    outside_interface: str
    outside_ip: str
    inside: tuple[str, ...]
    """The private networks behind it (routed by the wan only in mode ``none``)."""
    mode: NatMode | None = None


@dataclass
class LabClient:
    """One client of the portal config and the namespace it runs in."""

    id: str
    token: str
    ipv4: str
    ipv6: str
    netns_role: str


@dataclass
class LabWorld:
    """See the module docstring. Parameters are fixed at construction; :meth:`start` builds, :meth:`close` removes."""

    gateway_nat: NatMode = "masquerade"
    client_nat: NatMode = "masquerade"
    relays: int = 1
    clients: int = 1
    resources: Sequence[str] = ("lan", "lan-web")
    blob_size: int = DEFAULT_BLOB_SIZE
    start_gateway: bool = True
    gateway_log_level: str = "info"
    gateway_env: Mapping[str, str] = field(default_factory=dict)
    load_clients: int = 0
    """Extra client identities in the portal config, without namespaces of their own: for :mod:`lab.loadgen`, which
    runs them all in one process (tokens :func:`load_client_token`)."""
    gateways: int = 1
    """1, or 2: a second gateway of the same site in ``gw2`` (behind ``natg`` too, reaching the resource host over a
    LAN of its own); :meth:`launch_gateway` with ``index=1`` starts it."""
    topology: Topology = field(init=False)
    ns: dict[str, Netns] = field(init=False, default_factory=dict)
    coturns: list[Coturn] = field(init=False, default_factory=list)
    config: LabPortalConfig = field(init=False)
    lab_clients: list[LabClient] = field(init=False, default_factory=list)
    portal: DevPortal | None = field(init=False, default=None)
    gateway: GatewayProcess | None = field(init=False, default=None)
    gateway2: GatewayProcess | None = field(init=False, default=None)
    client_processes: list[ClientProcess] = field(init=False, default_factory=list)
    stopped_gateways: list[GatewayProcess] = field(init=False, default_factory=list)
    """Gateway runs that ended before the world did (their output, for :meth:`gateway_problems`)."""
    blob_sha256: str = field(init=False, default="")
    workdir: Path | None = field(init=False, default=None)
    _routers: dict[str, NatRouter] = field(init=False, default_factory=dict)
    _etc_netns: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for mode in (self.gateway_nat, self.client_nat):
            if mode not in NAT_MODES:
                raise ValueError(f"NAT mode must be one of {NAT_MODES}, not {mode!r}")
        if not 1 <= self.relays <= MAX_RELAYS:
            raise ValueError(f"relays must be 1..{MAX_RELAYS}")
        if not 0 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 0..{MAX_CLIENTS}")
        if not 0 <= self.load_clients <= MAX_LOAD_CLIENTS:
            raise ValueError(f"load_clients must be 0..{MAX_LOAD_CLIENTS}")
        if not 1 <= self.gateways <= MAX_GATEWAYS:
            raise ValueError(f"gateways must be 1..{MAX_GATEWAYS}")
        unknown = [key for key in self.resources if key not in LAB_RESOURCES]
        if unknown:
            raise ValueError(f"unknown resources {unknown}; known: {sorted(LAB_RESOURCES)}")
        self.topology = Topology("lab")
        self.lab_clients = [
            LabClient(
                id=f"c1000000-0000-4000-8000-00000000000{index + 1}",
                token=f"lab-client-token-{index + 1}",
                ipv4=f"100.64.1.{index + 1}",
                ipv6=f"fd00:2021:1111::1:{index + 1}",
                netns_role="cl" if index == 0 else f"cl{index + 1}",
            )
            for index in range(self.clients)
        ]
        self.config = LabPortalConfig.model_validate(self.portal_config())

    # ------------------------------------------------------------------ configuration

    def portal_config(self) -> dict[str, Any]:
        """The dev portal's config for this world (as a dict, the shape of a config file)."""
        # Configured client keys only matter for operator-made authorizations; connecting clients bring their own.
        placeholder_key = "A" * 43 + "="
        return {
            "relay_secret": RELAY_SECRET,
            "max_relays": MAX_RELAYS,
            "sites": [{"id": SITE_ID, "name": "lab-site"}],
            "gateways": [
                {
                    "token": GATEWAY_TOKEN,
                    "site_id": SITE_ID,
                    "ipv4": GATEWAY_TUNNEL_IPS[0],
                    "ipv6": GATEWAY_TUNNEL_IPS[1],
                }
            ],
            "resources": [LAB_RESOURCES[key].to_config() for key in self.resources],
            "clients": [
                {
                    "id": client.id,
                    "public_key": placeholder_key,
                    "token": client.token,
                    "ipv4": client.ipv4,
                    "ipv6": client.ipv6,
                    "actor_name": f"Lab User {index + 1}",
                    "actor_email": f"user{index + 1}@lab.example",
                }
                for index, client in enumerate(self.lab_clients)
            ]
            + [
                {
                    "id": f"c2000000-0000-4000-8000-{index:012d}",
                    "public_key": placeholder_key,
                    "token": load_client_token(index),
                    "ipv4": f"100.66.{index // 250}.{index % 250 + 1}",
                    "ipv6": f"fd00:2021:1111::{2 + index // 65536:x}:{index % 65536:x}",
                    "actor_name": f"Load User {index}",
                    "actor_email": f"load{index}@lab.example",
                }
                for index in range(self.load_clients)
            ],
            "relays": [
                {"id": f"5e1a0000-0000-4000-8000-00000000000{index + 1}", "addrs": [f"{RELAY_IPS[index]}:{RELAY_PORT}"]}
                for index in range(self.relays)
            ],
        }

    def resource_id(self, key: str) -> str:
        return LAB_RESOURCES[key].id

    @property
    def portal_url(self) -> str:
        return f"ws://{PORTAL_IP}:{PORTAL_PORT}"

    @property
    def blob_url(self) -> str:
        return f"http://{RESOURCE_IP}:{HTTP_PORT}{BLOB_PATH}"

    def netns(self, role: str | Netns) -> Netns:
        if isinstance(role, Netns):
            return role
        try:
            return self.ns[role]
        except KeyError:
            raise KeyError(f"no namespace {role!r} in this world; have {sorted(self.ns)}") from None

    def need_portal(self) -> DevPortal:
        if self.portal is None:
            raise RuntimeError("the lab world has not been started")
        return self.portal

    def need_gateway(self, index: int = 0) -> GatewayProcess:
        gateway = self._gateway_slot(index)
        if gateway is None:
            raise RuntimeError(f"gateway {index} is not running")
        return gateway

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> LabWorld:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        relays: asyncio.Future[None] | None = None
        try:
            self.blob_sha256 = blob_sha256(self.blob_size)
            self.workdir = Path(tempfile.mkdtemp(prefix="firezone-lab-"))
            self._build_namespaces()
            relays = asyncio.ensure_future(asyncio.to_thread(self._start_relays))
            # Shielded: a cancelled start must not tear down while that thread may still be launching a relay.
            await asyncio.gather(asyncio.shield(relays), self._start_resource_services())
            await self._start_portal()
            if self.start_gateway:
                await self.launch_gateway()
        except BaseException:
            if relays is not None and not relays.done():
                await asyncio.wait([relays])
            await self.close()
            raise

    def _build_namespaces(self) -> None:
        topo = self.topology
        second_gateway = ("gw2",) if self.gateways > 1 else ()
        for role in ("wan", "natg", "natc", "gw", *second_gateway, "res", *(c.netns_role for c in self.lab_clients)):
            self.ns[role] = topo.add_ns(role)
        wan, natg, natc, gw, res = (self.ns[r] for r in ("wan", "natg", "natc", "gw", "res"))
        topo.link(gw, "10.1.0.2/24", natg, "10.1.0.1/24")
        topo.link(gw, f"{GATEWAY_LAN_IP}/24", res, f"{RESOURCE_IP}/24")
        natg_out, _ = topo.link(natg, "172.31.1.1/24", wan, "172.31.1.254/24")
        natc_out, _ = topo.link(natc, "172.31.2.1/24", wan, "172.31.2.254/24")
        gw.exec("ip route add default via 10.1.0.1")
        natg.exec("ip route add default via 172.31.1.254")
        natc.exec("ip route add default via 172.31.2.254")
        gateway_networks = ["10.1.0.0/24"]
        if second_gateway:
            gw2 = self.ns["gw2"]
            topo.link(gw2, "10.1.1.2/24", natg, "10.1.1.1/24")
            gateway_side, resource_side = SECOND_GATEWAY_LAN
            topo.link(gw2, f"{gateway_side}/24", res, f"{resource_side}/24")
            gw2.exec("ip route add default via 10.1.1.1")
            # The resource keeps its one address; the second gateway reaches it over its own link (the gateway
            # masquerades, so the replies come back the same way).
            gw2.exec(["ip", "route", "add", RESOURCE_NETWORK, "via", resource_side])
            gateway_networks.append("10.1.1.0/24")
        client_networks = []
        for index, client in enumerate(self.lab_clients):
            network = f"10.{2 + index}.0"
            topo.link(self.ns[client.netns_role], f"{network}.2/24", natc, f"{network}.1/24")
            self.ns[client.netns_role].exec(f"ip route add default via {network}.1")
            client_networks.append(f"{network}.0/24")
        # The public services' addresses sit on the wan's loopback (no dummy interfaces on every kernel), reachable
        # from both routers through their default routes.
        for address in (PORTAL_IP, *RELAY_IPS[: self.relays]):
            wan.exec(["ip", "addr", "add", f"{address}/32", "dev", "lo"])
        # The "internet" swallows datagrams to addresses nobody routes (the peers' private host candidates) instead
        # of failing the send: coturn tears an allocation down when a relayed send fails with ENETUNREACH.
        sink = f"fzs{topo.suffix}"
        wan.exec(["ip", "link", "add", f"{sink}a", "type", "veth", "peer", "name", f"{sink}b"])
        wan.exec(["ip", "link", "set", f"{sink}a", "up"])  # its peer stays down: whatever goes in is dropped
        wan.exec(["ip", "route", "add", "default", "dev", f"{sink}a"])
        self._routers = {
            "natg": NatRouter(natg, natg_out, "172.31.1.1", tuple(gateway_networks)),
            "natc": NatRouter(natc, natc_out, "172.31.2.1", tuple(client_networks)),
        }
        self.set_nat("natg", self.gateway_nat)
        self.set_nat("natc", self.client_nat)

    def set_nat(self, router: Literal["natg", "natc"], mode: NatMode) -> None:
        """Switches a router's NAT mode. Flows it already tracks keep their mappings; new flows get the new mode."""
        if mode not in NAT_MODES:
            raise ValueError(f"NAT mode must be one of {NAT_MODES}, not {mode!r}")
        entry = self._routers[router]
        wan = self.ns["wan"]
        if entry.mode == "none":
            for network in entry.inside:
                wan.exec(["ip", "route", "del", network, "via", entry.outside_ip], check=False)
        elif entry.mode is not None:
            entry.netns.exec(["nft", "delete", "table", "ip", "fznat"], check=False)
        if mode == "none":
            for network in entry.inside:
                wan.exec(["ip", "route", "add", network, "via", entry.outside_ip])
        else:
            _nft(entry.netns, nat_ruleset(entry.outside_interface, mode))
        entry.mode = mode
        if router == "natg":
            self.gateway_nat = mode
        else:
            self.client_nat = mode

    def rebind_nat(self, router: Literal["natg", "natc"]) -> None:
        """A NAT rebinding, as when a client roams: the router forgets its mappings and maps every UDP flow behind
        it to a new random port from now on. TCP flows are mapped to the same ports again, so the portal
        connections survive."""
        entry = self._routers[router]
        if entry.mode in (None, "none"):
            raise ValueError("rebinding needs a masquerading router")
        entry.netns.exec(["nft", "delete", "table", "ip", "fznat"], check=False)
        ruleset = nat_ruleset(entry.outside_interface, entry.mode).replace(
            f'  oifname "{entry.outside_interface}" masquerade',
            f'  oifname "{entry.outside_interface}" meta l4proto udp masquerade random\n'
            f'  oifname "{entry.outside_interface}" masquerade',
        )
        _nft(entry.netns, ruleset)
        run_in_netns(entry.netns.name, _flush_conntrack)

    def _start_relays(self) -> None:
        for index in range(self.relays):
            relay = Coturn(
                listen_ip=RELAY_IPS[index],
                port=RELAY_PORT,
                secret=RELAY_SECRET,
                netns=self.ns["wan"],
                allow_loopback_peers=False,
                # A relay port per allocation: 10,000 each, enough for MAX_LOAD_CLIENTS identities and the gateways
                # (1,000 ran out at 1,000 identities: "508 Cannot create socket"), below the ephemeral range.
                relay_ports=(10000 + 10000 * index, 19999 + 10000 * index),
                relay_threads=LAB_RELAY_THREADS,
            )
            self.coturns.append(relay)
            relay.start()

    async def _start_resource_services(self) -> None:
        res = self.ns["res"]
        http = res.popen(
            [sys.executable, "-m", "lab.resource", "serve", "--bind", RESOURCE_IP, "--port", str(HTTP_PORT),
             "--size", str(self.blob_size)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert http.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(http.stdout.readline), PROCESS_START_TIMEOUT)
        if line.strip() != b"ready":
            raise RuntimeError(f"the resource host's HTTP server did not start (said {line!r})")
        res.popen(
            ["iperf3", "-s", "-B", RESOURCE_IP, "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await self._start_dns_server()
        deadline = time.monotonic() + PROCESS_START_TIMEOUT
        while not await self._listens(res, IPERF_PORT):
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 -s did not start listening")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ DNS (docs/protocol.md §3.4, §3.5)

    @property
    def dns_zone_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "zone.json"

    def set_dns_records(
        self, name: str, *, a: Sequence[str] = (), aaaa: Sequence[str] = (), txt: Sequence[str] = ()
    ) -> None:
        """Sets ``name``'s records on the resource host's DNS server (TTL 1 s; an empty name is removed)."""
        path = self.dns_zone_path
        zone: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        records = {k: list(v) for k, v in (("A", a), ("AAAA", aaaa), ("TXT", txt)) if v}
        if records:
            zone[name] = records
        else:
            zone.pop(name, None)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(zone))
        scratch.replace(path)

    async def _start_dns_server(self) -> None:
        self.set_dns_records(DNS_NAME, a=[RESOURCE_IP], txt=[DNS_TXT])
        dns = self.ns["res"].popen(
            [sys.executable, "-m", "lab.dns_server", "--bind", RESOURCE_IP, "--port", str(DNS_PORT),
             "--zone", str(self.dns_zone_path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert dns.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(dns.stdout.readline), PROCESS_START_TIMEOUT)
        if line.strip() != b"ready":
            raise RuntimeError(f"the resource host's DNS server did not start (said {line!r})")
        # The gateways resolve through it: `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf.
        for role in ("gw", "gw2"):
            if role in self.ns:
                self.write_netns_etc(role, "resolv.conf", f"nameserver {RESOURCE_IP}\n")

    def write_netns_etc(self, role: str, file: str, text: str) -> None:
        """Writes /etc/netns/<namespace>/<file>, which `ip netns exec` shows as /etc/<file> (removed on close)."""
        directory = Path("/etc/netns") / self.ns[role].name
        directory.mkdir(parents=True, exist_ok=True)
        if directory not in self._etc_netns:
            self._etc_netns.append(directory)
        (directory / file).write_text(text)

    async def _listens(self, ns: Netns, port: int) -> bool:
        result = await self.exec_in(ns, ["ss", "-Hltn", f"sport = :{port}"], timeout=5)
        return bool(result.stdout.strip())

    async def _start_portal(self) -> None:
        sock = run_in_netns(self.ns["wan"].name, _portal_listening_socket)
        self.portal = DevPortal(self.config, host=PORTAL_IP, port=PORTAL_PORT)
        self.config.remember_brokered_flows(self.portal.flows)
        try:
            await self.portal.start(sock=sock)
        except BaseException:
            sock.close()
            self.portal = None
            raise

    async def launch_gateway(self, index: int = 0, *, firezone_id: str | None = None) -> GatewayProcess:
        """Starts ``firezone-gateway`` number ``index`` (0: in ``gw``, 1: in ``gw2``) against the portal; the world
        stops it on close. ``firezone_id`` keeps an identity across a restart (default: a new random one)."""
        if self._gateway_slot(index) is not None:
            raise RuntimeError(f"gateway {index} is already running")
        assert self.workdir is not None
        state_dir = self.workdir / ("gateway-state" if index == 0 else f"gateway-state-{index + 1}")
        state_dir.mkdir(exist_ok=True)
        process = await GatewayProcess.start(
            api_url=self.portal_url,
            token=GATEWAY_TOKEN,
            state_dir=state_dir,
            firezone_id=firezone_id,
            name="lab-gateway" if index == 0 else f"lab-gateway-{index + 1}",
            log_level=self.gateway_log_level,
            netns=self.ns["gw" if index == 0 else "gw2"].name,
            extra_env={
                "FIREZONE_ALLOW_INSECURE_PORTAL": "true",
                # /run is shared by every namespace: each gateway gets a status socket of its own.
                "FIREZONE_STATUS_SOCKET": str(state_dir / "status.sock"),
                **self.gateway_env,
            },
        )
        if index == 0:
            self.gateway = process
        else:
            self.gateway2 = process
        return process

    def _gateway_slot(self, index: int) -> GatewayProcess | None:
        if not 0 <= index < self.gateways:
            raise ValueError(f"this world has {self.gateways} gateway(s), no gateway {index}")
        return self.gateway if index == 0 else self.gateway2

    async def stop_gateway(self, index: int = 0, *, kill: bool = False, timeout: float = 10.0) -> GatewayProcess:
        """Stops gateway ``index`` (SIGTERM, or SIGKILL with ``kill``) and forgets it; returns the stopped process
        (its output stays readable). :meth:`launch_gateway` may start it again."""
        process = self._gateway_slot(index)
        if process is None:
            raise RuntimeError(f"gateway {index} is not running")
        try:
            if kill:
                await process.close()
            else:
                await process.terminate(timeout=timeout)
        finally:
            await process.close()
            if index == 0:
                self.gateway = None
            else:
                self.gateway2 = None
            self.stopped_gateways.append(process)
        return process

    async def restart_gateway(self, index: int = 0, *, kill: bool = False) -> GatewayProcess:
        """Stops gateway ``index`` and starts it again with the same firezone id (a new WireGuard key)."""
        old = await self.stop_gateway(index, kill=kill)
        return await self.launch_gateway(index, firezone_id=old.firezone_id)

    # ------------------------------------------------------------------ faults

    async def restart_portal(self, downtime: float = 0.0) -> None:
        """Stops the portal (every socket closed with 1001), waits ``downtime`` s, and listens again on the same
        address; config, event log and tunnel IPs survive, as a real portal's database would."""
        portal = self.need_portal()
        await portal.stop()
        if downtime > 0:
            await asyncio.sleep(downtime)
        sock = run_in_netns(self.ns["wan"].name, _portal_listening_socket)
        try:
            await portal.start(sock=sock)
        except BaseException:
            sock.close()
            raise

    def relay_id(self, index: int) -> str:
        """Relay ``index``'s id in the portal config (what ``relays_presence`` names)."""
        return str(self.portal_config()["relays"][index]["id"])

    async def announce_relays_gone(self, indexes: Sequence[int]) -> None:
        """``relays_presence`` to every joined gateway and client: relays ``indexes`` disconnected, the others still
        connected (with credentials minted for each receiver), as the portal pushes when relays leave it."""
        portal = self.need_portal()
        gone = [self.relay_id(index) for index in indexes]
        staying = [self.relay_id(index) for index in range(self.relays) if index not in indexes]
        for session in [s for s in portal.sessions if s.joined]:
            await portal.relays_presence(disconnected_ids=gone, connected=staying, gateway=str(session.conn_id))
        for client in self.lab_clients:
            try:
                client_session = portal.client_session(client.id)
            except AdminError:
                continue  # not connected
            payload = {
                "disconnected_ids": gone,
                "connected": self.config.relay_entries(client_session.public_key, staying),
            }
            # The dev portal's public push only addresses gateways; the client topic needs its session directly.
            await portal._push(client_session, "relays_presence", payload, topic="client")

    async def kill_relay(self, index: int, *, announce: bool = True) -> None:
        """Kills coturn ``index``; with ``announce`` the portal then tells gateways and clients, as the real portal
        does when a relay process dies (its portal socket goes with it)."""
        self.stop_relay(index)
        if announce:
            await self.announce_relays_gone([index])

    def stop_relay(self, index: int) -> None:
        """Kills coturn ``index`` (its allocations vanish without a word to anyone)."""
        self.coturns[index].stop()

    async def start_relay(self, index: int) -> None:
        """Starts coturn ``index`` again on its address (fresh: no allocations survive)."""
        await asyncio.to_thread(self.coturns[index].start)

    def set_loss(self, router: Literal["natg", "natc"], percent: float) -> None:
        """Drops ``percent`` % of the datagrams the router forwards, each way, at random (nftables ``numgen``);
        0 removes the rule. Only UDP: the tunnel and ICE suffer, the portal's TCP keeps its pace."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be 0..100")
        ns = self._routers[router].netns
        ns.exec(["nft", "delete", "table", "inet", "fzloss"], check=False)
        if percent > 0:
            per_mille = round(percent * 10)
            _nft(
                ns,
                "table inet fzloss {\n chain forward {\n  type filter hook forward priority -10; policy accept;\n"
                f"  meta l4proto udp numgen random mod 1000 < {per_mille} counter drop\n }}\n}}\n",
            )

    def lost_datagrams(self, router: Literal["natg", "natc"]) -> int:
        """How many datagrams :meth:`set_loss`'s rule has dropped on ``router`` so far (0 without a rule)."""
        listing = self._routers[router].netns.exec(["nft", "-j", "list", "table", "inet", "fzloss"], check=False)
        try:
            entries = json.loads(listing).get("nftables", [])
        except ValueError:
            return 0
        return sum(
            expression["counter"]["packets"]
            for entry in entries
            for expression in entry.get("rule", {}).get("expr", [])
            if isinstance(expression, dict) and "counter" in expression
        )

    def shape_resource(self, rate_mbit: float | None) -> None:
        """Caps what the resource host sends towards the gateway(s) at ``rate_mbit`` (a tbf qdisc), so a download
        lasts long enough for a fault to strike mid-flow; None removes the cap."""
        res = self.ns["res"]
        links = json.loads(res.exec(["ip", "-j", "link", "show"]))
        for link in links:
            name = link.get("ifname")
            if not isinstance(name, str) or name == "lo":
                continue
            res.exec(["tc", "qdisc", "del", "dev", name, "root"], check=False)
            if rate_mbit is not None:
                res.exec(
                    ["tc", "qdisc", "add", "dev", name, "root", "tbf", "rate", f"{rate_mbit:g}mbit", "burst", "32kb",
                     "latency", "400ms"]
                )  # fmt: skip

    def gateway_problems(self, index: int = 0, *, allowed: Sequence[str] = ()) -> list[str]:
        """The gateway's WARN and ERROR lines (this run and the stopped runs of the same slot) that match none of
        the ``allowed`` substrings: what a scenario provoked on purpose is allowed, anything else is a finding."""
        name = "lab-gateway" if index == 0 else f"lab-gateway-{index + 1}"
        runs = [p for p in self.stopped_gateways if p.env.get("FIREZONE_NAME") == name]
        current = self._gateway_slot(index)
        if current is not None:
            runs.append(current)
        return [
            line
            for run in runs
            for line in run.output().splitlines()
            if _WARN_OR_ERROR.search(line) and not any(text in line for text in allowed)
        ]

    async def wait_gateway_joined(self, timeout: float = 15.0, *, index: int = 0, since: int = 0) -> PortalEvent:
        """The portal's ``init`` sent after gateway ``index``'s ``phx_join`` at log position ``since`` or later
        (raises ``TimeoutError`` with its output)."""
        portal = self.need_portal()
        gateway = self.need_gateway(index)

        async def joined_and_initialised() -> PortalEvent:
            on_gateway_topic: Callable[[PortalEvent], bool] = lambda e: e.topic == "gateway"  # noqa: E731
            joined = await portal.wait_for(
                kind="received",
                event="phx_join",
                gateway=gateway.firezone_id if self.gateways > 1 else None,
                predicate=on_gateway_topic,
                since=since,
                timeout=timeout,
            )
            return await portal.wait_for(
                kind="sent", event="init", since=joined.seq, conn_id=joined.conn_id, timeout=5.0
            )

        waiting = asyncio.ensure_future(joined_and_initialised())
        exited = asyncio.ensure_future(gateway.process.wait())
        try:
            await asyncio.wait([waiting, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not waiting.done():
                waiting.cancel()
            await asyncio.gather(waiting, exited, return_exceptions=True)
        if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
            return waiting.result()
        why = f"exited with {gateway.process.returncode}" if not gateway.running else f"did not join within {timeout} s"
        raise TimeoutError(f"the gateway {why}; its output:\n{gateway.output()[-2000:]}")

    async def start_client(
        self, index: int = 0, *, resources: Sequence[str] = (), extra_args: Sequence[str] = ()
    ) -> ClientProcess:
        """Starts lab client ``index`` in its namespace, requesting ``resources`` (ids) right away."""
        client = self.lab_clients[index]
        argv = [*lab_client_argv(self.portal_url, client.token, resources), *extra_args]
        process = await ClientProcess.start(f"client-{index + 1}", self.ns[client.netns_role], argv)
        self.client_processes.append(process)
        return process

    async def close(self) -> None:
        """Stops clients, gateway, portal, relays and resource services and deletes the namespaces. Idempotent."""
        try:
            for process in self.client_processes:
                with contextlib.suppress(Exception):
                    await process.quit(timeout=2.0)
            self.client_processes.clear()
            for gateway in (self.gateway, self.gateway2):
                if gateway is None:
                    continue
                with contextlib.suppress(Exception):
                    await gateway.terminate(timeout=5.0)
                with contextlib.suppress(Exception):
                    await gateway.close()
            if self.portal is not None:
                with contextlib.suppress(Exception):
                    await self.portal.stop()
        finally:
            # Synchronous from here on: this part must run to the end even while the task is being cancelled.
            for relay in self.coturns:
                relay.stop()
            self.coturns.clear()
            self.topology.close()
            self.ns.clear()
            for directory in self._etc_netns:
                shutil.rmtree(directory, ignore_errors=True)
            self._etc_netns.clear()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    # ------------------------------------------------------------------ helpers for tests and the demo

    async def exec_in(self, ns: str | Netns, argv: Sequence[str], *, timeout: float = 30.0) -> ExecResult:
        """Runs ``argv`` in a namespace to completion (killed after ``timeout`` s, returncode -9 then)."""
        process = await asyncio.create_subprocess_exec(
            *self.netns(ns).argv(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            stdout, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        assert process.returncode is not None
        return ExecResult(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))

    async def http_get_sha256(
        self, ns: str | Netns, url: str | None = None, *, timeout: float = 20.0
    ) -> dict[str, Any]:
        """Downloads ``url`` (default: the blob) from inside ``ns``: ``{status, bytes, sha256, seconds}`` or
        ``{error}``; ``matches`` says whether the digest is the blob's."""
        argv = [sys.executable, "-m", "lab.resource", "fetch", url or self.blob_url, "--timeout", str(timeout)]
        result = await self.exec_in(ns, argv, timeout=timeout + 5)
        found = result.json()
        if not isinstance(found, dict):
            found = {"error": result.stderr.strip()[-500:] or f"exit {result.returncode}"}
        found["matches"] = found.get("sha256") == self.blob_sha256
        return found

    async def iperf3(
        self, ns: str | Netns, server: str = RESOURCE_IP, seconds: float = 2.0, *, reverse: bool = False
    ) -> IperfResult:
        """One TCP iperf3 run from ``ns`` to the resource host; raises ``RuntimeError`` when it fails."""
        argv = ["iperf3", "-c", server, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "--connect-timeout", "3000"]
        if reverse:
            argv.append("-R")
        result = await self.exec_in(ns, argv, timeout=seconds + 15)
        try:
            report = json.loads(result.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 failed ({result.returncode}): {result.stderr.strip()[-300:]}") from None
        if "error" in report or result.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {report.get('error', result.returncode)}")
        end = report["end"]
        received = end["sum_received"]
        return IperfResult(
            bits_per_second=float(received["bits_per_second"]),
            retransmits=end.get("sum_sent", {}).get("retransmits"),
            seconds=float(received["seconds"]),
            reverse=reverse,
        )

    async def probe_tcp(self, ns: str | Netns, host: str, port: int, *, timeout: float = 3.0) -> dict[str, Any]:
        """One TCP connect from ``ns``: ``{outcome, errno, icmp: [type, code] | None}`` (see :mod:`lab.resource`)."""
        argv = [sys.executable, "-m", "lab.resource", "probe-tcp", host, str(port), "--timeout", str(timeout)]
        result = await self.exec_in(ns, argv, timeout=timeout + 10)
        found = result.json()
        return found if isinstance(found, dict) else {"outcome": "error", "detail": result.stderr.strip()[-300:]}

    async def relay_binding(self, ns: str | Netns, relay: int = 0) -> tuple[str, int] | None:
        """The address relay ``relay`` sees for a BINDING sent from ``ns`` (the NAT's public side), or None."""
        argv = [sys.executable, "-m", "lab.relay", "--probe", RELAY_IPS[relay], str(RELAY_PORT)]
        result = await self.exec_in(ns, argv, timeout=10)
        if result.returncode != 0:
            return None
        host, port = result.stdout.split()
        return host, int(port)

    async def ping(self, ns: str | Netns, host: str, *, count: int = 3, wait: float = 2.0) -> ExecResult:
        """``ping -c count`` from ``ns``; ``wait`` is how long each reply is waited for."""
        argv = ["ping", "-c", str(count), "-i", "0.2", "-W", f"{wait:g}", host]
        return await self.exec_in(ns, argv, timeout=count * (wait + 0.2) + 5)

    async def run_loadgen(
        self,
        clients: int,
        *,
        rate: float = 1.0,
        duration: float = 5.0,
        setup_timeout: float = 60.0,
        resource: str = "lan",
        ns: str = "cl",
    ) -> dict[str, Any]:
        """Runs :mod:`lab.loadgen` in ``ns`` with ``clients`` of this world's load identities (``load_clients``),
        pinging the resource host; returns its summary (``{"error": ...}`` when it printed none)."""
        if clients > self.load_clients:
            raise ValueError(f"this world has {self.load_clients} load identities, not {clients}")
        argv = [
            sys.executable, "-m", "lab.loadgen", "--portal", self.portal_url, "--token-prefix", LOAD_CLIENT_TOKEN_PREFIX,
            "--clients", str(clients), "--resource", self.resource_id(resource), "--target", RESOURCE_IP,
            "--rate", f"{rate:g}", "--duration", f"{duration:g}", "--setup-timeout", f"{setup_timeout:g}",
        ]  # fmt: skip
        result = await self.exec_in(ns, argv, timeout=setup_timeout + duration + 30)
        summary = result.json()
        if not isinstance(summary, dict):
            return {"error": result.stderr.strip()[-2000:] or f"exit {result.returncode}"}
        return summary

    async def gateway_metrics(self) -> str:
        """The gateway's /metrics text, fetched inside ``gw`` ("" when it does not answer)."""
        return await self.need_gateway().metrics()


def _flush_conntrack() -> None:
    """Empties the calling namespace's IPv4 connection-tracking table (``conntrack -F`` over netlink: an
    IPCTNL_MSG_CT_DELETE without attributes), so every flow gets a new NAT mapping."""
    netlink_netfilter = 12
    message_type = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
    flags = 0x1 | 0x4  # NLM_F_REQUEST | NLM_F_ACK
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)  # nfgenmsg: family, version, res_id
    header = struct.pack("=IHHII", 16 + len(body), message_type, flags, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_netfilter) as sock:
        sock.settimeout(5)
        sock.send(header + body)
        reply = sock.recv(4096)
    (error,) = struct.unpack_from("=i", reply, 16)
    if error != 0:
        raise OSError(-error, f"conntrack flush failed: {os.strerror(-error)}")


def _portal_listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((PORTAL_IP, PORTAL_PORT))
    sock.listen(1024)
    return sock


_WARN_OR_ERROR = re.compile(r"\b(WARN|WARNING|ERROR|CRITICAL)\b|\"level\": \"(WARN|ERROR)\"|Traceback")


def _nft(ns: Netns, ruleset: str) -> None:
    subprocess.run(ns.argv(["nft", "-f", "-"]), input=ruleset.encode(), check=True, capture_output=True, timeout=10)
