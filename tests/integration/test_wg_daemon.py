"""The firezone-wg daemon as a process: the stock `wg` tool drives it exactly as it drives wireguard-go, and it starts,
daemonises, refuses and cleans up like wireguard-go."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.netns import Netns, Topology, run
from lab.wg import (
    SOCKET_DIRECTORY,
    WgInterface,
    daemon_argv,
    generate_keypair,
    generate_preshared_key,
    start_interface,
    uapi_socket_ready,
    wg_topology,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def topo() -> Iterator[Topology]:
    with wg_topology("wgd") as topology:
        yield topology


def socket_file(ifname: str) -> str:
    return f"{SOCKET_DIRECTORY}/{ifname}.sock"


def link_exists(ns: Netns, ifname: str) -> bool:
    return subprocess.run(ns.argv(["ip", "link", "show", ifname]), capture_output=True).returncode == 0


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for its (adopting) parent to reap it counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def run_daemon(
    ns: Netns, ifname: str, *, foreground: bool, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
):
    """Runs firezone-wg to completion (a refused start, or the daemonising parent); ``prefix`` wraps the command."""
    return run_in(ns, [*prefix, *daemon_argv("firezone-wg", ifname, foreground=foreground)], env=env)


def run_in(ns: Netns, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Without LOG_LEVEL the daemon keeps no inherited pipe open, so capturing the parent's output cannot hang.
    environment = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    environment.update(env or {})
    return subprocess.run(ns.argv(argv), capture_output=True, text=True, timeout=30, env=environment)


def normalized_showconf(iface: WgInterface) -> tuple[list[str], list[list[str]]]:
    """`wg showconf` with the listen port left out and peers sorted (wireguard-go lists them in map order)."""
    text = iface.wg("showconf", iface.name)
    sections = [s.strip().splitlines() for s in re.split(r"\n(?=\[)", text.strip())]
    interface = [line for line in sections[0] if not line.startswith("ListenPort")]
    peers = sorted(sorted(section) for section in sections[1:])
    return interface, peers


# -- `wg` against firezone-wg and wireguard-go side by side ----------------------------------------------------------


def test_wg_setconf_set_addconf_syncconf_and_show_behave_as_with_wireguard_go(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_ns("a")
    reference = start_interface(
        ns, "wireguard-go", f"wg{topo.suffix}g", tunnel_ip="10.77.0.1", underlay_ip="", log_dir=tmp_path
    )
    firezone = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}f", tunnel_ip="10.78.0.1", underlay_ip="", log_dir=tmp_path
    )
    private_key = generate_keypair()[0]
    other_private_key = generate_keypair()[0]
    peer1, peer2, peer3, peer4 = (generate_keypair()[1] for _ in range(4))
    psk = generate_preshared_key()
    config = tmp_path / "wg.conf"
    config.write_text(
        f"[Interface]\nPrivateKey = {private_key}\nFwMark = 0x1234\n\n"
        f"[Peer]\nPublicKey = {peer1}\nPresharedKey = {psk}\nEndpoint = 192.0.2.1:51820\n"
        "AllowedIPs = 10.1.0.0/16, fd01::/64\nPersistentKeepalive = 25\n\n"
        f"[Peer]\nPublicKey = {peer2}\nEndpoint = [2001:db8::2]:443\nAllowedIPs = 10.2.0.1/32\n"
    )
    key_file = tmp_path / "other.key"
    key_file.write_text(other_private_key + "\n")
    extra = tmp_path / "extra.conf"
    extra.write_text(f"[Peer]\nPublicKey = {peer4}\nAllowedIPs = 10.4.0.0/24, 10.1.2.0/24\n")
    reduced = tmp_path / "reduced.conf"
    reduced.write_text(
        f"[Interface]\nPrivateKey = {other_private_key}\n\n[Peer]\nPublicKey = {peer1}\nAllowedIPs = 10.1.0.0/16\n"
    )
    steps = [
        ["setconf", "{ifname}", str(config)],
        ["set", "{ifname}", "peer", peer1, "allowed-ips", "10.9.0.0/24,fd09::1/128"],
        ["set", "{ifname}", "peer", peer2, "remove"],
        ["set", "{ifname}", "peer", peer3, "endpoint", "192.0.2.3:1", "persistent-keepalive", "0"],
        ["set", "{ifname}", "peer", peer1, "preshared-key", "/dev/null", "persistent-keepalive", "off"],
        ["set", "{ifname}", "private-key", str(key_file), "fwmark", "0"],
        ["addconf", "{ifname}", str(extra)],
        ["syncconf", "{ifname}", str(reduced)],
    ]
    for step in steps:
        reference.wg(*step)
        firezone.wg(*step)
        assert normalized_showconf(firezone) == normalized_showconf(reference), step
    assert (
        firezone.wg("show", firezone.name, "public-key").strip()
        == reference.wg("show", reference.name, "public-key").strip()
    )
    assert f"interface: {firezone.name}" in firezone.wg("show", firezone.name)
    assert firezone.name in firezone.wg("show", "interfaces").split()
    assert "error" not in firezone.log().lower()


def test_wg_set_listen_port_rebinds_and_a_port_in_use_is_reported(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_ns("a")
    firezone = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}f", tunnel_ip="10.78.0.1", underlay_ip="", log_dir=tmp_path
    )
    random_port = firezone.listen_port()
    assert random_port > 0  # like wireguard-go, it listens on a random port before any configuration

    firezone.set_listen_port(51999)
    assert firezone.listen_port() == 51999
    sockets = ns.exec(["ss", "-Huan", "sport = :51999"])
    assert "0.0.0.0:51999" in sockets and "[::]:51999" in sockets
    assert ns.exec(["ss", "-Huan", f"sport = :{random_port}"]).strip() == ""

    blocker = ns.popen(
        [
            sys.executable,
            "-c",
            "import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',52001));"
            "print('bound',flush=True); time.sleep(60)",
        ]
    )
    assert blocker.stdout is not None and b"bound" in blocker.stdout.readline()
    failure = firezone.wg("set", firezone.name, "listen-port", "52001", check=False)
    assert "Address already in use" in failure
    # The daemon keeps serving on its previous port.
    assert firezone.listen_port() == 51999
    assert "0.0.0.0:51999" in ns.exec(["ss", "-Huan", "sport = :51999"])


# -- process life cycle -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_socket_and_the_device(topo: Topology, tmp_path: Path, signum: int) -> None:
    ns = topo.add_ns("a")
    firezone = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}f", tunnel_ip="10.78.0.1", underlay_ip="", log_dir=tmp_path
    )
    assert firezone.process is not None
    assert link_exists(ns, firezone.name) and os.path.exists(socket_file(firezone.name))
    firezone.process.send_signal(signum)
    assert firezone.process.wait(timeout=10) == 0
    assert not os.path.exists(socket_file(firezone.name))
    assert not link_exists(ns, firezone.name)
    assert "Traceback" not in firezone.log()
    # Issue 11 finding 8: the socket directory goes too, unless another daemon (another test's) still has a socket.
    assert not os.path.isdir(SOCKET_DIRECTORY) or os.listdir(SOCKET_DIRECTORY)


def test_deleting_the_link_or_the_socket_stops_the_daemon_like_wireguard_go(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_ns("a")
    by_link = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}l", tunnel_ip="10.78.0.1", underlay_ip="", log_dir=tmp_path
    )
    by_socket = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}s", tunnel_ip="10.79.0.1", underlay_ip="", log_dir=tmp_path
    )
    assert by_link.process is not None and by_socket.process is not None
    ns.exec(["ip", "link", "del", by_link.name])
    os.unlink(socket_file(by_socket.name))
    assert by_link.process.wait(timeout=10) == 0
    assert by_socket.process.wait(timeout=10) == 0
    assert not os.path.exists(socket_file(by_link.name))
    assert not link_exists(ns, by_socket.name)


def test_without_f_it_daemonises_once_the_interface_is_up(topo: Topology) -> None:
    ns = topo.add_ns("a")
    ifname = f"wg{topo.suffix}d"
    result = run_daemon(ns, ifname, foreground=False, env={"FIREZONE_NUM_TUN_THREADS": "3"})
    assert result.returncode == 0, result.stderr
    # The parent returned only after the interface was up and the UAPI socket served.
    link = ns.exec(["ip", "-d", "-o", "link", "show", ifname])
    assert "UP" in link.split("<")[1].split(">")[0].split(",")
    assert "mtu 1420" in link and "numqueues 3" in link
    assert uapi_socket_ready(ifname)
    pids = [int(pid) for pid in run(["ip", "netns", "pids", ns.name]).split()]
    try:
        assert len(pids) == 1
        daemon = pids[0]
        # Double fork: a new session it does not lead, so it can never reacquire a terminal.
        assert os.getsid(daemon) not in (daemon, os.getsid(0))
        assert ns.exec(["wg", "show", ifname, "listen-port"]).strip().isdigit()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not any(process_alive(pid) for pid in pids))
    assert not os.path.exists(socket_file(ifname))
    assert not link_exists(ns, ifname)


def test_a_failure_after_forking_reaches_the_caller_and_leaves_nothing_behind(topo: Topology) -> None:
    ns = topo.add_ns("a")
    ifname = f"wg{topo.suffix}d"
    os.makedirs(SOCKET_DIRECTORY, exist_ok=True)
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        squatter.bind(socket_file(ifname))
        squatter.listen(1)
        result = run_daemon(ns, ifname, foreground=False)
    finally:
        squatter.close()
        os.unlink(socket_file(ifname))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"firezone-wg: UAPI socket {socket_file(ifname)} is in use by another process"
    ]
    assert not link_exists(ns, ifname)


def test_an_existing_device_is_refused(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_ns("a")
    ifname = f"wg{topo.suffix}x"
    ns.exec(["ip", "tuntap", "add", "dev", ifname, "mode", "tun"])
    for foreground in (True, False):
        result = run_daemon(ns, ifname, foreground=foreground)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [f"firezone-wg: interface {ifname} already exists"]
    assert not os.path.exists(socket_file(ifname))
    # A running daemon's interface is refused the same way, and the running daemon is unharmed.
    running = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}f", tunnel_ip="10.78.0.1", underlay_ip="", log_dir=tmp_path
    )
    result = run_daemon(ns, running.name, foreground=True)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert uapi_socket_ready(running.name)


@pytest.mark.parametrize(
    ("variable", "value"), [("FIREZONE_NUM_TUN_THREADS", "many"), ("FIREZONE_NO_INC_BUF", "sometimes")]
)
def test_a_bad_environment_value_is_refused(topo: Topology, variable: str, value: str) -> None:
    ns = topo.add_ns("a")
    ifname = f"wg{topo.suffix}n"
    result = run_daemon(ns, ifname, foreground=False, env={variable: value})
    assert result.returncode == 1
    assert result.stderr.startswith(f"firezone-wg: invalid {variable}={value!r}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not link_exists(ns, ifname)


def test_not_being_root_is_refused(topo: Topology) -> None:
    ns = topo.add_ns("a")
    ifname = f"wg{topo.suffix}u"
    result = run_daemon(
        ns,
        ifname,
        foreground=True,
        prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"),
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "firezone-wg: must be run as root (creating a TUN device needs CAP_NET_ADMIN)"
    ]
    assert not link_exists(ns, ifname)


def test_a_missing_dev_net_tun_is_refused(topo: Topology) -> None:
    ns = topo.add_ns("a")
    ifname = f"wg{topo.suffix}t"
    # A private mount namespace hides /dev/net/tun from this one process only.
    daemon = shlex.join(daemon_argv("firezone-wg", ifname, foreground=True))
    result = run_in(ns, ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none /dev/net && exec {daemon}"])
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("firezone-wg: /dev/net/tun is missing")
    assert not link_exists(ns, ifname)


def test_wg_quick_up_and_down_use_it_as_the_userspace_implementation(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_ns("a")
    ifname = f"wg{topo.suffix}q"
    config = tmp_path / f"{ifname}.conf"
    config.write_text(
        f"[Interface]\nPrivateKey = {generate_keypair()[0]}\nAddress = 10.99.0.1/24\nListenPort = 51998\n\n"
        f"[Peer]\nPublicKey = {generate_keypair()[1]}\nAllowedIPs = 10.99.0.2/32\nEndpoint = 192.0.2.1:51820\n"
    )
    config.chmod(0o600)
    implementation = shlex.join(daemon_argv("firezone-wg", ifname, foreground=False)[:-1])
    wrapper = tmp_path / "firezone-wg"
    wrapper.write_text(f'#!/bin/sh\nexec {implementation} "$@"\n')
    wrapper.chmod(0o755)
    env = ["env", f"WG_QUICK_USERSPACE_IMPLEMENTATION={wrapper}"]
    up = run_in(ns, [*env, "wg-quick", "up", str(config)])
    assert up.returncode == 0, up.stderr
    try:
        assert ns.exec(["wg", "show", ifname, "listen-port"]).strip() == "51998"
        assert "10.99.0.1/24" in ns.exec(["ip", "-br", "addr", "show", ifname])
    finally:
        down = run_in(ns, [*env, "wg-quick", "down", str(config)])
    assert down.returncode == 0, down.stderr
    # wg-quick down deletes the link; the daemon notices and removes its socket.
    assert wait_for(lambda: not os.path.exists(socket_file(ifname)))


@pytest.mark.parametrize("ifname", ["", "x" * 16, "a/b", "a b"])
def test_an_invalid_interface_name_is_refused(topo: Topology, ifname: str) -> None:
    ns = topo.add_ns("a")
    result = run_daemon(ns, ifname, foreground=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"firezone-wg: invalid interface name {ifname!r} (1-15 characters, no '/' or spaces)"
    ]


def test_the_uapi_socket_serves_several_operations_per_connection(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add_ns("a")
    firezone = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}f", tunnel_ip="10.78.0.1", underlay_ip="", log_dir=tmp_path
    )
    assert oct(os.stat(socket_file(firezone.name)).st_mode & 0o777) == "0o700"  # umask 077, like wireguard-go
    peer = bytes(range(32)).hex()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(socket_file(firezone.name))
        reader = client.makefile("rb")

        def reply() -> list[str]:
            lines = []
            while (line := reader.readline().decode()) != "\n":
                assert line, "connection closed early"
                lines.append(line.rstrip("\n"))
            return lines

        client.sendall(f"set=1\npublic_key={peer}\nallowed_ip=10.5.0.0/16\n\n".encode())
        assert reply() == ["errno=0"]
        client.sendall(b"set=1\nlisten_port=notaport\n\n")
        assert reply() == ["errno=-22"]
        client.sendall(b"get=1\n\n")
        got = reply()
        assert got[-1] == "errno=0"
        assert f"public_key={peer}" in got and "allowed_ip=10.5.0.0/16" in got
        client.sendall(b"bogus=1\n")
        assert reader.readline() == b""  # an unknown operation closes the connection, without a reply


def test_a_uapi_client_that_never_reads_does_not_stall_the_daemon(topo: Topology, tmp_path: Path) -> None:
    """Issue 11 finding 11: replies are sent without blocking, so other clients (and packets) are still served."""
    ns = topo.add_ns("a")
    firezone = start_interface(
        ns, "firezone-wg", f"wg{topo.suffix}f", tunnel_ip="10.78.0.1", underlay_ip="", log_dir=tmp_path
    )
    peers = "".join(f"public_key={(bytes([i]) * 32).hex()}\nallowed_ip=10.{i}.0.0/16\n" for i in range(1, 200))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as setter:
        setter.connect(socket_file(firezone.name))
        setter.sendall(f"set=1\n{peers}\n".encode())
        assert setter.recv(64).startswith(b"errno=0")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hog:
        hog.connect(socket_file(firezone.name))
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        requests = 200  # each get=1 answers ~20 kB; nothing is read back for a while
        hog.sendall(b"get=1\n\n" * requests)
        time.sleep(0.5)
        shown = ns.exec(["wg", "show", firezone.name, "peers"], timeout=10)
        assert len(shown.split()) == 199
        # The slow reader is still served in full once it reads (a blocking send used to give up and drop it).
        hog.settimeout(10)
        received = bytearray()
        while received.count(b"errno=0\n\n") < requests:
            chunk = hog.recv(1 << 20)
            assert chunk, f"connection closed after {received.count(b'errno=0')} of {requests} replies"
            received += chunk
    assert "Traceback" not in firezone.log()
