"""Two Nodes behind nftables NAT routers, a real coturn between them, a ping through their TUN devices.

Topology (all namespaces created here, nothing routed outside them)::

    gw (10.1.0.2) ── natg (10.1.0.1 | 172.31.1.1) ── wan (172.31.1.254, 172.31.2.254; coturn on 172.31.1.254:3478)
    cl (10.2.0.2) ── natc (10.2.0.1 | 172.31.2.1) ──┘

``masquerade`` keeps the source port for every destination (endpoint-independent mapping, conntrack filtering), so
hole punching works and ICE must settle on a direct path. ``masquerade random`` picks a new port per destination on
both sides (two symmetric NATs), so only the relay connects them. Each side is a ``lab.client`` process; this test
plays the portal and forwards candidates between their stdio. The chosen path and the connection setup time (first
ICE check → ConnectionEstablished, measured by each driver) are printed for the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from dataplane.wireguard.crypto import public_key
from lab.netns import Netns, Topology
from lab.relay import Coturn

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(shutil.which("turnserver") is None or shutil.which("nft") is None, reason="coturn/nft missing"),
]

RELAY_IP = "172.31.1.254"
GATEWAY_TUN = "100.64.0.1"
CLIENT_TUN = "100.64.0.2"


def _key(name: str) -> bytes:
    key = bytearray(hashlib.sha256(name.encode()).digest())
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


@dataclass
class Side:
    name: str
    proc: subprocess.Popen[bytes]
    buffer: bytes = b""
    events: list[dict[str, object]] = field(default_factory=list)

    def send(self, message: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()

    def of(self, kind: str) -> list[dict[str, object]]:
        return [e for e in self.events if e["event"] == kind]

    @property
    def path(self) -> str | None:
        paths = [e["path"] for e in self.events if e["event"] in ("established", "path_changed")]
        return str(paths[-1]) if paths else None


class Portal:
    """Reads both drivers' event lines and forwards candidates to the other side (the portal's job)."""

    def __init__(self, gateway: Side, client: Side) -> None:
        self.sides = [gateway, client]
        self.selector = selectors.DefaultSelector()
        for side in self.sides:
            assert side.proc.stdout is not None
            os.set_blocking(side.proc.stdout.fileno(), False)
            self.selector.register(side.proc.stdout, selectors.EVENT_READ, side)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(timeout=min(remaining, 0.1)):
                side: Side = key.data
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    self.selector.unregister(key.fileobj)
                    continue
                side.buffer += chunk
                while b"\n" in side.buffer:
                    line, side.buffer = side.buffer.split(b"\n", 1)
                    self._on_event(side, json.loads(line))

    def pump_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            self.pump(0.1)
        return condition()

    def _on_event(self, side: Side, event: dict[str, object]) -> None:
        side.events.append(event)
        other = self.sides[1] if side is self.sides[0] else self.sides[0]
        if event["event"] == "candidate":
            other.send({"candidate": event["sdp"]})
        elif event["event"] == "invalidated":
            other.send({"invalidate": event["sdp"]})

    def close(self) -> None:
        self.selector.close()


def _build(topo: Topology, random_ports: bool) -> tuple[Netns, Netns, Netns]:
    wan, natg, natc = topo.add_ns("wan"), topo.add_ns("natg"), topo.add_ns("natc")
    gw, cl = topo.add_ns("gw"), topo.add_ns("cl")
    topo.link(gw, "10.1.0.2/24", natg, "10.1.0.1/24")
    topo.link(cl, "10.2.0.2/24", natc, "10.2.0.1/24")
    natg_out, _ = topo.link(natg, "172.31.1.1/24", wan, f"{RELAY_IP}/24")
    natc_out, _ = topo.link(natc, "172.31.2.1/24", wan, "172.31.2.254/24")
    gw.exec("ip route add default via 10.1.0.1")
    cl.exec("ip route add default via 10.2.0.1")
    natg.exec(f"ip route add default via {RELAY_IP}")
    natc.exec("ip route add default via 172.31.2.254")
    # The "internet" swallows datagrams to addresses nobody routes (the peers' private host candidates) instead of
    # failing the send: coturn tears an allocation down when a relayed send fails with ENETUNREACH.
    sink = f"fzs{topo.suffix}"
    wan.exec(["ip", "link", "add", f"{sink}a", "type", "veth", "peer", "name", f"{sink}b"])
    wan.exec(["ip", "link", "set", f"{sink}a", "up"])  # its peer stays down: whatever goes in is dropped
    wan.exec(["ip", "route", "add", "default", "dev", f"{sink}a"])
    for ns, out in ((natg, natg_out), (natc, natc_out)):
        rule = f'oifname "{out}" masquerade{" random" if random_ports else ""}'
        # Unsolicited inbound datagrams are dropped before conntrack confirms an entry for them, as home routers do:
        # otherwise the peer's early check would claim the tuple our own mapping needs and masquerade would pick
        # another port (conntrack clash), defeating hole punching for reasons that are not the NAT type's.
        ruleset = (
            "table ip fznat {\n"
            " chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n"
            f"  {rule}\n }}\n"
            " chain input {\n  type filter hook input priority filter; policy accept;\n"
            f'  iifname "{out}" ct state new drop\n }}\n'
            "}\n"
        )
        _nft(ns, ruleset)
    return wan, gw, cl


def _nft(ns: Netns, ruleset: str) -> None:
    subprocess.run(ns.argv(["nft", "-f", "-"]), input=ruleset.encode(), check=True, capture_output=True, timeout=10)


def _start_side(
    ns: Netns, role: str, peer_id: str, coturn: Coturn, *, me: str, peer: str, bind: str, tun_ip: str, peer_tun: str
) -> Side:
    seed = hashlib.sha256(b"client:gateway").hexdigest()
    client_ice, gateway_ice = f"{seed[0:4]}:{seed[4:26]}", f"{seed[26:30]}:{seed[30:52]}"
    username, password = coturn.credentials(tag=me)
    argv = [
        sys.executable,
        "-m",
        "lab.client",
        "--role",
        role,
        "--id",
        peer_id,
        "--private-key",
        _key(me).hex(),
        "--peer-public-key",
        public_key(_key(peer)).hex(),
        "--psk",
        hashlib.sha256(b"psk").hexdigest(),
        "--local-ice",
        client_ice if role == "client" else gateway_ice,
        "--remote-ice",
        gateway_ice if role == "client" else client_ice,
        "--relay",
        f"relay-1,{RELAY_IP}:{coturn.port},{username},{password}",
        "--bind",
        bind,
        "--tun",
        f"tunfz{role[0]}",
        "--tun-address",
        f"{tun_ip}/32",
        "--tun-route",
        f"{peer_tun}/32",
    ]
    proc = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return Side(role, proc)


def _stop(sides: list[Side]) -> None:
    for side in sides:
        side.send({"quit": True})
    for side in sides:
        try:
            side.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            side.proc.kill()
            side.proc.wait(timeout=5)
        for stream in (side.proc.stdin, side.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.mark.parametrize(
    "random_ports,expected_path", [(False, "direct"), (True, "relayed")], ids=["masquerade", "masquerade-random"]
)
def test_ping_through_nat_routers(random_ports, expected_path, capsys):
    with Topology("nat") as topo:
        wan, gw, cl = _build(topo, random_ports)
        with Coturn(listen_ip=RELAY_IP, netns=wan, allow_loopback_peers=False) as coturn:
            gateway = _start_side(
                gw, "gateway", "client-1", coturn, me="gateway", peer="client", bind="10.1.0.2", tun_ip=GATEWAY_TUN,
                peer_tun=CLIENT_TUN,
            )  # fmt: skip
            client = _start_side(
                cl, "client", "gateway-1", coturn, me="client", peer="gateway", bind="10.2.0.2", tun_ip=CLIENT_TUN,
                peer_tun=GATEWAY_TUN,
            )  # fmt: skip
            portal = Portal(gateway, client)
            try:
                assert portal.pump_until(lambda: bool(gateway.of("established") and client.of("established")), 30.0), (
                    f"not established: gateway {gateway.events[-5:]} client {client.events[-5:]}"
                )
                # A relayed pair may come first; ICE then moves to the best nominated pair.
                portal.pump_until(lambda: gateway.path == client.path == expected_path, 10.0)
                ping = cl.popen(["ping", "-c", "3", "-i", "0.2", "-W", "2", GATEWAY_TUN], stdout=subprocess.PIPE)
                while ping.poll() is None:
                    portal.pump(0.1)
                output = (ping.stdout.read() if ping.stdout else b"").decode(errors="replace")
                assert ping.returncode == 0, output
                assert " 0% packet loss" in output, output
                assert gateway.path == expected_path and client.path == expected_path, (gateway.events, client.events)
                setup = [s.of("established")[0]["setup_seconds"] for s in (client, gateway)]
                with capsys.disabled():
                    print(
                        f"\n[nat-traversal] {'masquerade random' if random_ports else 'masquerade'}: path={client.path}"
                        f" setup(first check→established) client={setup[0]:.3f}s gateway={setup[1]:.3f}s"
                    )
                assert not gateway.of("failed") and not client.of("failed")
            finally:
                _stop([gateway, client])
                portal.close()
