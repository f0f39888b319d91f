"""WireGuard daemons (wireguard-go or firezone-wg) in network namespaces, configured with the stock `wg` tool.

Used by the interop tests and reusable for benchmarks::

    with Topology("wgx") as topo:
        pair = WgPair.create(topo, "wireguard-go", "firezone-wg", log_dir=tmp)
        pair.a.ping(pair.b.tunnel_ip)

``python -m lab.wg measure`` measures ping RTT and iperf3 throughput for the three pairings
(wireguard-go↔wireguard-go, wireguard-go↔firezone-wg, firezone-wg↔firezone-wg) in one run and prints a table.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from lab.netns import Netns, Topology

__all__ = [
    "Implementation",
    "PeerStatus",
    "WgInterface",
    "WgPair",
    "WgStatus",
    "generate_keypair",
    "generate_preshared_key",
    "FloodResult",
    "flood_initiations",
    "iperf3",
    "measure",
    "ping_rtt_ms",
    "public_key_of",
    "remove_stale_sockets",
    "start_interface",
    "wg_topology",
]

Implementation = Literal["wireguard-go", "firezone-wg"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("wireguard-go", "firezone-wg")
SOCKET_DIRECTORY = "/var/run/wireguard"
TUNNEL_PREFIX = "10.77.0."
TUNNEL_PREFIX6 = "fd77::"
IPERF_PORT = 5201


# -- keys ---------------------------------------------------------------------------------------------------------


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def generate_keypair() -> tuple[str, str]:
    """A (private, public) pair in `wg`'s base64 form."""
    key = X25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(_raw_private(key)).decode(), base64.b64encode(public).decode()


def public_key_of(private_key: str) -> str:
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
    return base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


def generate_preshared_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# -- `wg show dump` -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerStatus:
    public_key: str
    preshared_key: str | None
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None


@dataclass(frozen=True)
class WgStatus:
    private_key: str | None
    public_key: str | None
    listen_port: int
    fwmark: int | None
    peers: dict[str, PeerStatus]


def parse_dump(text: str) -> WgStatus:
    """Parses `wg show IFNAME dump`."""
    lines = [line.split("\t") for line in text.strip("\n").split("\n")]
    private_key, public_key, port, fwmark = lines[0]
    peers: dict[str, PeerStatus] = {}
    for fields in lines[1:]:
        pub, psk, endpoint, allowed, handshake, rx, tx, keepalive = fields
        peers[pub] = PeerStatus(
            public_key=pub,
            preshared_key=None if psk == "(none)" else psk,
            endpoint=None if endpoint == "(none)" else endpoint,
            allowed_ips=() if allowed == "(none)" else tuple(allowed.split(",")),
            latest_handshake=int(handshake),
            rx_bytes=int(rx),
            tx_bytes=int(tx),
            persistent_keepalive=None if keepalive == "off" else int(keepalive),
        )
    return WgStatus(
        private_key=None if private_key == "(none)" else private_key,
        public_key=None if public_key == "(none)" else public_key,
        listen_port=int(port),
        fwmark=None if fwmark == "off" else int(fwmark, 0),
        peers=peers,
    )


# -- one interface ------------------------------------------------------------------------------------------------


def daemon_argv(implementation: Implementation, ifname: str, *, foreground: bool = True) -> list[str]:
    flags = ["-f"] if foreground else []
    if implementation == "wireguard-go":
        return ["wireguard-go", *flags, ifname]
    return [sys.executable, "-m", "agent.wg", *flags, ifname]


def uapi_socket_ready(ifname: str) -> bool:
    path = f"{SOCKET_DIRECTORY}/{ifname}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def remove_stale_sockets(prefix: str) -> list[str]:
    """Removes UAPI sockets named ``prefix*`` that nobody serves (left by a daemon killed with SIGKILL)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(SOCKET_DIRECTORY):
            if name.startswith(prefix) and name.endswith(".sock") and not uapi_socket_ready(name[: -len(".sock")]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SOCKET_DIRECTORY, name))
                removed.append(name)
    return removed


@contextlib.contextmanager
def wg_topology(prefix: str) -> Iterator[Topology]:
    """A :class:`Topology` whose interface names (``wg{suffix}…``) get their stale UAPI sockets removed at the end."""
    topo = Topology(prefix)
    try:
        yield topo
    finally:
        topo.close()
        remove_stale_sockets(f"wg{topo.suffix}")


@dataclass
class WgInterface:
    """A running WireGuard daemon in a namespace, with its tunnel address and keys."""

    ns: Netns
    name: str
    implementation: Implementation
    tunnel_ip: str
    underlay_ip: str  # as in an endpoint: "192.0.2.1" or "[2001:db8::1]"
    private_key: str
    public_key: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    tunnel_ip6: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def wg(self, *args: str, check: bool = True, input: str | None = None) -> str:
        """Runs `wg ARGS` in the namespace (``{ifname}`` in an argument is replaced by the interface name)."""
        argv = self.ns.argv(["wg", *(a.replace("{ifname}", self.name) for a in args)])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"wg {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout if check else proc.stdout + proc.stderr

    def status(self) -> WgStatus:
        return parse_dump(self.wg("show", self.name, "dump"))

    def listen_port(self) -> int:
        return int(self.wg("show", self.name, "listen-port").strip())

    def set_listen_port(self, port: int) -> None:
        self.wg("set", self.name, "listen-port", str(port))

    def add_peer(
        self,
        public_key: str,
        *,
        endpoint: str | None = None,
        allowed_ips: Sequence[str] = (),
        preshared_key: str | None = None,
        persistent_keepalive: int | None = None,
    ) -> None:
        args = ["set", self.name, "peer", public_key]
        with tempfile.NamedTemporaryFile("w", suffix=".psk") as psk_file:
            if preshared_key is not None:
                psk_file.write(preshared_key + "\n")
                psk_file.flush()
                args += ["preshared-key", psk_file.name]
            if endpoint is not None:
                args += ["endpoint", endpoint]
            if allowed_ips:
                args += ["allowed-ips", ",".join(allowed_ips)]
            if persistent_keepalive is not None:
                args += ["persistent-keepalive", str(persistent_keepalive)]
            self.wg(*args)

    def ping(self, address: str, *, count: int = 3, interval: float = 0.2, deadline: float = 10.0) -> str:
        return self.ns.exec(
            ["ping", "-c", str(count), "-i", str(interval), "-w", str(int(deadline)), "-q", address],
            timeout=deadline + 5,
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_interface(
    ns: Netns,
    implementation: Implementation,
    ifname: str,
    *,
    tunnel_ip: str,
    underlay_ip: str,
    log_dir: Path,
    private_key: str | None = None,
    listen_port: int | None = None,
    tunnel_ip6: str | None = None,
    log_level: str = "verbose",
    env: dict[str, str] | None = None,
    startup_timeout: float = 10.0,
) -> WgInterface:
    """Starts a daemon in the foreground in ``ns``, waits for its UAPI socket, addresses and configures it.

    The process is also registered with the namespace so that the topology stops it when it closes.
    """
    if private_key is None:
        private_key, public_key = generate_keypair()
    else:
        public_key = public_key_of(private_key)
    log_path = log_dir / f"{ifname}.log"
    process_env = {**os.environ, "LOG_LEVEL": log_level, **(env or {})}
    with open(log_path, "wb") as log_file:
        process = ns.popen(
            daemon_argv(implementation, ifname), stdout=log_file, stderr=subprocess.STDOUT, env=process_env
        )
    iface = WgInterface(
        ns=ns,
        name=ifname,
        implementation=implementation,
        tunnel_ip=tunnel_ip,
        underlay_ip=underlay_ip,
        private_key=private_key,
        public_key=public_key,
        log_path=log_path,
        process=process,
        tunnel_ip6=tunnel_ip6,
    )
    deadline = time.monotonic() + startup_timeout
    while not uapi_socket_ready(ifname):
        if process.poll() is not None:
            raise RuntimeError(f"{implementation} {ifname} exited ({process.returncode}):\n{iface.log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{implementation} {ifname}: no UAPI socket after {startup_timeout} s:\n{iface.log()}")
        time.sleep(0.02)
    ns.exec(["ip", "addr", "add", f"{tunnel_ip}/24", "dev", ifname])
    if tunnel_ip6 is not None:
        ns.exec(["ip", "addr", "add", f"{tunnel_ip6}/64", "dev", ifname, "nodad"])
    ns.exec(["ip", "link", "set", ifname, "up"])
    with tempfile.NamedTemporaryFile("w", suffix=".key") as key_file:
        key_file.write(private_key + "\n")
        key_file.flush()
        args = ["set", ifname, "private-key", key_file.name]
        if listen_port is not None:
            args += ["listen-port", str(listen_port)]
        iface.wg(*args)
    return iface


@dataclass
class WgPair:
    """Two namespaces joined by a veth, one WireGuard interface in each, peered with each other."""

    a: WgInterface
    b: WgInterface

    @classmethod
    def create(
        cls,
        topo: Topology,
        implementation_a: Implementation,
        implementation_b: Implementation,
        *,
        log_dir: Path,
        preshared_key: str | None = None,
        port_a: int = 51820,
        port_b: int = 51821,
        endpoint_on_a: bool = True,
        endpoint_on_b: bool = True,
        persistent_keepalive: int | None = None,
        env_a: dict[str, str] | None = None,
        env_b: dict[str, str] | None = None,
        ipv6_underlay: bool = False,
    ) -> WgPair:
        """``endpoint_on_a``: A knows B's endpoint (so A can initiate); same for B. ``ipv6_underlay``: the
        WireGuard datagrams travel over IPv6 (endpoints ``[fd78::1]:port``)."""
        ns_a, ns_b = topo.add_ns("a"), topo.add_ns("b")
        topo.link(ns_a, "192.168.77.1/24", ns_b, "192.168.77.2/24", addrs_a=["fd78::1/64"], addrs_b=["fd78::2/64"])
        underlay_a, underlay_b = ("[fd78::1]", "[fd78::2]") if ipv6_underlay else ("192.168.77.1", "192.168.77.2")
        a, b = (
            start_interface(
                ns,
                implementation,
                f"wg{topo.suffix}{side}",
                tunnel_ip=f"{TUNNEL_PREFIX}{host}",
                tunnel_ip6=f"{TUNNEL_PREFIX6}{host}",
                underlay_ip=underlay,
                log_dir=log_dir,
                listen_port=port,
                env=env,
            )
            for side, host, ns, implementation, underlay, port, env in (
                ("a", 1, ns_a, implementation_a, underlay_a, port_a, env_a),
                ("b", 2, ns_b, implementation_b, underlay_b, port_b, env_b),
            )
        )
        for local, remote, remote_port, knows_endpoint in (
            (a, b, port_b, endpoint_on_a),
            (b, a, port_a, endpoint_on_b),
        ):
            local.add_peer(
                remote.public_key,
                endpoint=f"{remote.underlay_ip}:{remote_port}" if knows_endpoint else None,
                allowed_ips=[f"{remote.tunnel_ip}/32", f"{remote.tunnel_ip6}/128"],
                preshared_key=preshared_key,
                persistent_keepalive=persistent_keepalive,
            )
        return cls(a, b)


# -- traffic ------------------------------------------------------------------------------------------------------


_RTT = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def ping_rtt_ms(ns: Netns, address: str, *, count: int = 20, interval: float = 0.05) -> tuple[float, float, int]:
    """(avg RTT ms, max RTT ms, packets lost)."""
    out = ns.exec(["ping", "-c", str(count), "-i", str(interval), "-W", "2", "-q", address], check=False, timeout=60)
    match = _RTT.search(out)
    received = re.search(r"(\d+) received", out)
    lost = count - int(received.group(1)) if received else count
    if match is None:
        return float("nan"), float("nan"), lost
    return float(match.group(2)), float(match.group(3)), lost


@dataclass(frozen=True)
class IperfResult:
    bits_per_second: float
    bytes: int
    retransmits: int | None


def iperf3(
    client: Netns, server: Netns, server_ip: str, *, seconds: int = 3, reverse: bool = False, port: int = IPERF_PORT
) -> IperfResult:
    """One TCP stream from ``client`` to ``server`` (``reverse``: server to client); raises on any iperf3 error."""
    server_proc = server.popen(
        ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not server.exec(["ss", "-Hltn", f"sport = :{port}"], check=False).strip():
            if server_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 server in {server.name} did not start")
            time.sleep(0.05)
        proc = subprocess.run(
            client.argv(
                ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(seconds), "--json", *(["-R"] if reverse else [])]
            ),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        out = proc.stdout
        report = json.loads(out)
        if "error" in report:
            raise RuntimeError(f"iperf3 failed: {report['error']}")
        end = report["end"]
        received = end["sum_received"]
        return IperfResult(
            bits_per_second=float(received["bits_per_second"]),
            bytes=int(received["bytes"]),
            retransmits=end.get("sum_sent", {}).get("retransmits"),
        )
    finally:
        if server_proc.poll() is None:
            server_proc.terminate()
        try:
            server_proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server_proc.kill()
            server_proc.wait(timeout=5)


# -- handshake flood ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloodResult:
    sent: int
    send_errors: int
    seconds: float
    cookie_replies: int  # type-3 replies whose cookie decrypts with the MAC1 of the initiation they answer
    other_replies: int


def flood_initiations(
    target: tuple[str, int],
    responder_public_key: bytes,
    sources: Sequence[tuple[str, int]],
    *,
    count: int = 20_000,
    rate: float = 2_000.0,
    linger: float = 0.5,
) -> FloodResult:
    """Sends ``count`` handshake initiations with a valid MAC1 (and random everything else) at ``rate`` per second,
    round-robin from ``sources`` (local ip, port), and counts the cookie replies that come back.

    Valid MAC1s get past the first check, so the responder has to treat them as real handshakes: this is what the
    cookie mechanism protects against.
    """
    from dataplane.wireguard.constants import COOKIE_NONCE_SIZE, MESSAGE_COOKIE_REPLY_SIZE
    from dataplane.wireguard.cookie import CookieGenerator, cookie_key
    from dataplane.wireguard.crypto import xaead_decrypt
    from dataplane.wireguard.messages import INITIATION_MAC1_OFFSET, Initiation

    generator = CookieGenerator(responder_public_key)
    messages: list[bytes] = []
    mac1_by_index: dict[int, bytes] = {}
    for sender_index in range(1, count + 1):
        body = Initiation(sender_index, os.urandom(32), os.urandom(48), os.urandom(28)).to_bytes()
        message = generator.add_macs(body[:INITIATION_MAC1_OFFSET], 0.0)
        mac1_by_index[sender_index] = message[INITIATION_MAC1_OFFSET : INITIATION_MAC1_OFFSET + 16]
        messages.append(message)
    sockets: list[socket.socket] = []
    try:
        for host, port in sources:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((host, port))
            sockets.append(sock)
        key = cookie_key(responder_public_key)
        cookie_replies = other_replies = send_errors = 0

        def drain() -> None:
            nonlocal cookie_replies, other_replies
            for sock in sockets:
                while True:
                    try:
                        reply = sock.recv(2048)
                    except BlockingIOError:
                        break
                    index = int.from_bytes(reply[4:8], "little") if len(reply) >= 8 else 0
                    mac1 = mac1_by_index.get(index)
                    if (
                        len(reply) == MESSAGE_COOKIE_REPLY_SIZE
                        and reply[:4] == b"\x03\x00\x00\x00"
                        and mac1 is not None
                        and xaead_decrypt(key, reply[8 : 8 + COOKIE_NONCE_SIZE], reply[8 + COOKIE_NONCE_SIZE :], mac1)
                        is not None
                    ):
                        cookie_replies += 1
                    else:
                        other_replies += 1

        batch = max(1, int(rate / 100))  # one batch every 10 ms
        start = time.monotonic()
        for offset in range(0, count, batch):
            for position in range(offset, min(offset + batch, count)):
                try:
                    sockets[position % len(sockets)].sendto(messages[position], target)
                except OSError:
                    send_errors += 1
            drain()
            pause = start + (offset + batch) / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        elapsed = time.monotonic() - start
        end = time.monotonic() + linger
        while time.monotonic() < end:
            drain()
            time.sleep(0.01)
        return FloodResult(count - send_errors, send_errors, elapsed, cookie_replies, other_replies)
    finally:
        for sock in sockets:
            sock.close()


# -- measurement --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pair(implementation_a: Implementation, implementation_b: Implementation, log_dir: Path) -> Iterator[WgPair]:
    with wg_topology("wgm") as topo:
        # Quiet daemons: logging must not cost throughput while measuring.
        env = {"LOG_LEVEL": "error"}
        pair = WgPair.create(topo, implementation_a, implementation_b, log_dir=log_dir, env_a=env, env_b=env)
        pair.a.ping(pair.b.tunnel_ip, count=3, deadline=10)
        yield pair


def measure(seconds: int = 5, pings: int = 20) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    pairings: list[tuple[Implementation, Implementation]] = [
        ("wireguard-go", "wireguard-go"),
        ("wireguard-go", "firezone-wg"),
        ("firezone-wg", "firezone-wg"),
    ]
    with tempfile.TemporaryDirectory(prefix="fz-wg-measure-") as tmp:
        for implementation_a, implementation_b in pairings:
            with _pair(implementation_a, implementation_b, Path(tmp)) as pair:
                avg, worst, lost = ping_rtt_ms(pair.a.ns, pair.b.tunnel_ip, count=pings)
                forward = iperf3(pair.a.ns, pair.b.ns, pair.b.tunnel_ip, seconds=seconds)
                backward = iperf3(pair.a.ns, pair.b.ns, pair.b.tunnel_ip, seconds=seconds, reverse=True)
            rows.append(
                {
                    "a": implementation_a,
                    "b": implementation_b,
                    "rtt_avg_ms": avg,
                    "rtt_max_ms": worst,
                    "ping_lost": lost,
                    "a_to_b_mbit": forward.bits_per_second / 1e6,
                    "a_to_b_retr": forward.retransmits,
                    "b_to_a_mbit": backward.bits_per_second / 1e6,
                    "b_to_a_retr": backward.retransmits,
                }
            )
    return rows


def _format_table(rows: list[dict[str, object]], seconds: int, pings: int) -> str:
    header = f"| A (iperf3 client) | B (iperf3 server) | ping RTT avg/max ms ({pings} pings) | A→B Mbit/s (retr) | B→A Mbit/s (retr) |"
    lines = [header, "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['a']} | {row['b']} | {row['rtt_avg_ms']:.3f} / {row['rtt_max_ms']:.3f} (lost {row['ping_lost']}) "
            f"| {row['a_to_b_mbit']:.0f} ({row['a_to_b_retr']}) | {row['b_to_a_mbit']:.0f} ({row['b_to_a_retr']}) |"
        )
    lines.append(f"iperf3: one TCP stream, {seconds} s per direction; ping -c {pings} -i 0.05 over the tunnel.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.wg")
    sub = parser.add_subparsers(dest="command", required=True)
    measure_parser = sub.add_parser("measure", help="ping RTT and iperf3 throughput of the three pairings")
    measure_parser.add_argument("--seconds", type=int, default=5)
    measure_parser.add_argument("--pings", type=int, default=20)
    measure_parser.add_argument("--json", action="store_true")
    flood_parser = sub.add_parser("flood", help="send handshake initiations with valid MAC1; print a JSON result")
    flood_parser.add_argument("target", help="ip:port of the responder")
    flood_parser.add_argument("public_key", help="the responder's public key (base64)")
    flood_parser.add_argument("--source", action="append", required=True, help="local ip:port, repeatable")
    flood_parser.add_argument("--count", type=int, default=20_000)
    flood_parser.add_argument("--rate", type=float, default=2_000.0)
    args = parser.parse_args(argv)
    if args.command == "flood":
        host, _, port = args.target.rpartition(":")
        sources = [(src.rpartition(":")[0], int(src.rpartition(":")[2])) for src in args.source]
        print("flooding", flush=True)
        result = flood_initiations(
            (host, int(port)), base64.b64decode(args.public_key), sources, count=args.count, rate=args.rate
        )
        print(json.dumps(result.__dict__), flush=True)
        return 0
    load_before = os.getloadavg()
    rows = measure(seconds=args.seconds, pings=args.pings)
    load_after = os.getloadavg()
    if args.json:
        print(json.dumps({"rows": rows, "loadavg_before": load_before, "loadavg_after": load_after}, indent=2))
    else:
        print(_format_table(rows, args.seconds, args.pings))
        # Other work on the machine moves these numbers; the 1-minute load average says how much there was.
        print(f"load average (1/5/15 min) before: {load_before}, after: {load_after}; {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
