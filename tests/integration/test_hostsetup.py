"""Gateway host setup against the real kernel: the tunnel interface (dataplane.io.netlink) and the forwarding sysctls
plus nftables table (dataplane.io.hostsetup), each in namespaces the test creates.

Topology: namespace "gw" holds the TUN and is joined by a veth to "far", an Internet host. A packet written into the
TUN as if a client had sent it leaves towards "far" masqueraded, and the answer comes back out of the TUN.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dataplane import packet as pk
from dataplane.io import netlink
from dataplane.io.hostsetup import HostSetup, HostSetupError
from dataplane.io.netlink import (
    TUNNEL_ROUTE_TABLE,
    configure_tunnel_interface,
    remove_tunnel_routes,
    run_in_netns,
)
from dataplane.io.tun import Tun
from lab.netns import Netns, Topology, run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft missing"),
]

TUN_NAME = "tun-firezone"
GW_V4, FAR_V4 = "198.51.100.1", "198.51.100.2"
GW_V6, FAR_V6 = "2001:db8:1::1", "2001:db8:1::2"
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.src_valid_mark",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
)

T = TypeVar("T")


@dataclass
class Lab:
    gw: Netns
    far: Netns

    def in_gw(self, fn: Callable[[], T]) -> T:
        return run_in_netns(self.gw.name, fn)

    def json(self, ns: Netns, *cmd: str) -> Any:
        return json.loads(ns.exec(list(cmd)) or "[]")

    def sysctls(self) -> dict[str, str]:
        return {key: self.gw.exec(["sysctl", "-n", key]).strip() for key in SYSCTLS}

    def ruleset(self) -> str:
        return self.gw.exec(["nft", "list", "ruleset"])


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Topology("hs") as topo:
        gw, far = topo.add_ns("gw"), topo.add_ns("far")
        topo.link(gw, f"{GW_V4}/24", far, f"{FAR_V4}/24", addrs_a=[f"{GW_V6}/64"], addrs_b=[f"{FAR_V6}/64"])
        # Topology turns forwarding on; the gateway host starts with it off so that undo has something to restore.
        for key in SYSCTLS:
            gw.exec(["sysctl", "-qw", f"{key}=0"])
        yield Lab(gw, far)


@pytest.fixture
def tun(lab: Lab) -> Iterator[Tun]:
    device = lab.in_gw(lambda: Tun.create(TUN_NAME, queues=2))
    try:
        yield device
    finally:
        device.close()


def configure(lab: Lab, ipv4: str | None, ipv6: str | None) -> None:
    lab.in_gw(lambda: configure_tunnel_interface(TUN_NAME, ipv4, ipv6))


def tunnel_addresses(lab: Lab) -> list[tuple[str, str, int]]:
    [link] = lab.json(lab.gw, "ip", "-j", "addr", "show", "dev", TUN_NAME)
    return sorted((a["family"], a["local"], a["prefixlen"]) for a in link["addr_info"])


def tunnel_routes(lab: Lab) -> list[tuple[str, str]]:
    routes = []
    for family in ("-4", "-6"):
        for route in lab.json(lab.gw, "ip", "-j", family, "route", "show", "table", "all"):
            if route.get("table") == str(TUNNEL_ROUTE_TABLE):
                routes.append((route["dst"], route["dev"]))
    return sorted(routes)


def tunnel_rules(lab: Lab) -> list[dict[str, Any]]:
    rules = []
    for family in ("-4", "-6"):
        rules += [r for r in lab.json(lab.gw, "ip", "-j", family, "rule", "show") if r.get("priority") == 100]
    return rules


def route_device(lab: Lab, destination: str, *extra: str) -> str:
    [route] = lab.json(lab.gw, "ip", "-j", "route", "get", destination, *extra)
    return str(route["dev"])


# -- the tunnel interface ----------------------------------------------------------------------------------------------


def test_tunnel_interface_gets_addresses_mtu_routes_and_rules(lab: Lab, tun: Tun) -> None:
    configure(lab, "100.64.0.7", "fd00:2021:1111::7")
    configure(lab, "100.64.0.7", "fd00:2021:1111::7")  # idempotent

    [link] = lab.json(lab.gw, "ip", "-j", "-d", "link", "show", TUN_NAME)
    assert link["mtu"] == 1280
    assert "UP" in link["flags"]
    assert link["inet6_addr_gen_mode"] == "none"
    # Exactly the two tunnel addresses: no fe80:: link-local, nothing left over.
    assert tunnel_addresses(lab) == [("inet", "100.64.0.7", 32), ("inet6", "fd00:2021:1111::7", 128)]
    assert tunnel_routes(lab) == [("100.64.0.0/11", TUN_NAME), ("fd00:2021:1111::/107", TUN_NAME)]
    rules = tunnel_rules(lab)
    assert len(rules) == 2
    for rule in rules:
        assert "not" in rule  # "not fwmark": everything except the gateway's own sockets
        assert int(rule["fwmark"], 16) == 0xFD002021
        assert rule["table"] == str(TUNNEL_ROUTE_TABLE)

    # The gateway's own sockets (marked) never see the tunnel routes: a peer in CGNAT space is reached via the uplink.
    lab.gw.exec(["ip", "route", "add", "default", "via", FAR_V4])
    lab.gw.exec(["ip", "-6", "route", "add", "default", "via", FAR_V6])
    assert route_device(lab, "100.64.9.9") == TUN_NAME
    assert route_device(lab, "fd00:2021:1111::9") == TUN_NAME
    assert route_device(lab, "100.64.9.9", "mark", "0xfd002021") != TUN_NAME
    assert route_device(lab, "fd00:2021:1111::9", "mark", "0xfd002021") != TUN_NAME


def test_new_tunnel_addresses_replace_the_old_ones(lab: Lab, tun: Tun) -> None:
    configure(lab, "100.64.0.7", "fd00:2021:1111::7")
    configure(lab, "100.64.0.8", "fd00:2021:1111::8")
    assert tunnel_addresses(lab) == [("inet", "100.64.0.8", 32), ("inet6", "fd00:2021:1111::8", 128)]
    assert tunnel_routes(lab) == [("100.64.0.0/11", TUN_NAME), ("fd00:2021:1111::/107", TUN_NAME)]

    configure(lab, "100.64.0.9", None)  # v4-only: the IPv6 address, route and rule go
    assert tunnel_addresses(lab) == [("inet", "100.64.0.9", 32)]
    assert tunnel_routes(lab) == [("100.64.0.0/11", TUN_NAME)]
    assert len(tunnel_rules(lab)) == 1

    configure(lab, None, "fd00:2021:1111::a")  # v6-only
    assert tunnel_addresses(lab) == [("inet6", "fd00:2021:1111::a", 128)]
    assert tunnel_routes(lab) == [("fd00:2021:1111::/107", TUN_NAME)]

    lab.in_gw(lambda: remove_tunnel_routes(TUN_NAME))
    lab.in_gw(lambda: remove_tunnel_routes(TUN_NAME))  # idempotent
    assert tunnel_routes(lab) == []
    assert tunnel_rules(lab) == []


def test_host_without_ipv6_gets_an_ipv4_only_tunnel(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
        lab.gw.exec(["sysctl", "-qw", f"{key}=1"])
    monkeypatch.setattr(netlink, "_ipv6_warning_logged", False)
    device = lab.in_gw(lambda: Tun.create(TUN_NAME))
    try:
        with caplog.at_level(logging.WARNING, logger="dataplane.io.netlink"):
            configure(lab, "100.64.0.7", "fd00:2021:1111::7")
            configure(lab, "100.64.0.7", "fd00:2021:1111::7")
        assert tunnel_addresses(lab) == [("inet", "100.64.0.7", 32)]
        assert tunnel_routes(lab) == [("100.64.0.0/11", TUN_NAME)]
        assert len([r for r in caplog.records if "IPv4 only" in r.getMessage()]) == 1
    finally:
        device.close()


def test_device_created_under_default_disable_ipv6_gets_ipv6_when_the_host_has_it(lab: Lab) -> None:
    # Host setup writes only net.ipv6.conf.all.disable_ipv6=0; a device created afterwards inherits "default".
    lab.gw.exec(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
    device = lab.in_gw(lambda: Tun.create(TUN_NAME))
    try:
        configure(lab, "100.64.0.7", "fd00:2021:1111::7")
        assert tunnel_addresses(lab) == [("inet", "100.64.0.7", 32), ("inet6", "fd00:2021:1111::7", 128)]
    finally:
        device.close()


# -- sysctls and the nftables table ------------------------------------------------------------------------------------


def test_apply_is_idempotent_and_undo_restores_everything(lab: Lab) -> None:
    before_sysctls, before_ruleset = lab.sysctls(), lab.ruleset()
    setup = HostSetup(TUN_NAME)
    lab.in_gw(setup.apply)
    first = lab.ruleset()
    assert lab.sysctls() == dict.fromkeys(SYSCTLS, "1")
    assert lab.gw.exec(["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).strip() == "0"

    lab.in_gw(setup.apply)
    assert lab.ruleset() == first
    # A second agent run (e.g. after a crash) replaces the table rather than adding to it.
    lab.in_gw(HostSetup(TUN_NAME).apply)
    assert lab.ruleset() == first
    table = lab.gw.exec(["nft", "list", "table", "inet", "firezone-gateway"])
    assert 'iifname "tun-firezone" accept' in table
    assert 'oifname "tun-firezone" accept' in table
    assert 'oifname != "tun-firezone" ip saddr 100.64.0.0/11 masquerade' in table
    assert 'oifname != "tun-firezone" ip6 saddr fd00:2021:1111::/107 masquerade' in table

    lab.in_gw(setup.undo)
    assert lab.sysctls() == before_sysctls
    assert lab.ruleset() == before_ruleset
    lab.in_gw(setup.undo)  # idempotent


def test_operator_rules_survive_apply_and_undo(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    # What an install script makes through iptables-nft (tables ip filter / ip nat) and a hand-written nft table.
    operator = """
table ip filter {
  chain FORWARD { type filter hook forward priority filter; policy accept; iifname "tun-firezone" accept; }
}
table ip nat {
  chain POSTROUTING { type nat hook postrouting priority srcnat; policy accept; ip saddr 100.64.0.0/11 oifname "e*" masquerade; }
}
table inet operator {
  chain forward { type filter hook forward priority filter; policy drop; ct state established,related accept; }
}
"""
    run(lab.gw.argv(["nft", "-f", "-"]), input=operator)
    before = lab.ruleset()
    setup = HostSetup(TUN_NAME)
    with caplog.at_level(logging.WARNING, logger="dataplane.io.hostsetup"):
        lab.in_gw(setup.apply)
    # The drop policy elsewhere is beyond our table's reach: the operator is told which chain.
    assert any("inet operator forward" in r.getMessage() for r in caplog.records)
    for table in ("ip filter", "ip nat", "inet operator"):
        assert lab.gw.exec(["nft", "list", "table", *table.split()]) in lab.ruleset()
    lab.in_gw(setup.undo)
    assert lab.ruleset() == before


def test_missing_nft_raises_and_rolls_back_sysctls(lab: Lab) -> None:
    before = lab.sysctls()
    setup = HostSetup(TUN_NAME, nft="/nonexistent/nft")
    with pytest.raises(HostSetupError, match="not found"):
        lab.in_gw(setup.apply)
    assert lab.sysctls() == before


def test_nft_without_privilege_raises_a_clear_error(lab: Lab, tmp_path: Path) -> None:
    nft = shutil.which("nft")
    wrapper = tmp_path / "nft-as-nobody"
    wrapper.write_text(f'#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups {nft} "$@"\n')
    wrapper.chmod(0o755)
    with pytest.raises(HostSetupError, match="not permitted"):
        lab.in_gw(HostSetup(TUN_NAME, nft=str(wrapper)).apply)


# -- end to end: forwarded and masqueraded -----------------------------------------------------------------------------


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + payload)
    initial = pk.pseudo_header_sum(source.packed, destination.packed, socket.IPPROTO_UDP, length)
    struct.pack_into("!H", udp, 6, pk.internet_checksum(udp, initial) or 0xFFFF)
    if source.version == 4:
        header = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, 17, 0, source.packed, destination.packed)
        )
        struct.pack_into("!H", header, 10, pk.internet_checksum(header))
        return bytes(header + udp)
    return struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, source.packed, destination.packed) + bytes(udp)


def receive_from_tun(tun: Tun, timeout: float = 3.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for received in tun.poll_recv_many():
            ip = pk.parse_ip(received)
            if ip.protocol == socket.IPPROTO_UDP:  # IPv6 may also bring router solicitations and the like
                return received
        time.sleep(0.01)
    raise AssertionError("nothing came back out of the TUN")


def round_trip(lab: Lab, tun: Tun, client: str, far_ip: str, family: socket.AddressFamily) -> str:
    """Writes a UDP packet from ``client`` to ``far_ip`` into the TUN, answers it in "far" and checks the answer comes
    out of the TUN, NAT undone. Returns the source address "far" saw."""
    server = run_in_netns(lab.far.name, lambda: socket.socket(family, socket.SOCK_DGRAM))
    try:
        server.bind((far_ip, 0))
        server.settimeout(3.0)
        port = server.getsockname()[1]
        assert tun.send(udp_packet(client, far_ip, 40000, port, b"hello"))

        payload, source = server.recvfrom(2048)
        assert payload == b"hello"
        server.sendto(b"answer", source)

        answer = receive_from_tun(tun)
        ip = pk.parse_ip(answer)
        udp = pk.parse_udp(answer, ip)
        assert (str(ip.src_ip), str(ip.dst_ip)) == (far_ip, client)  # NAT undone, routed into the TUN
        assert (udp.src_port, udp.dst_port) == (port, 40000)
        assert answer[ip.l4_offset + 8 :] == b"answer"
        return str(source[0])
    finally:
        server.close()


@pytest.mark.parametrize(
    ("client", "far_ip", "gw_ip", "family"),
    [
        ("100.64.3.4", FAR_V4, GW_V4, socket.AF_INET),
        ("fd00:2021:1111::3:4", FAR_V6, GW_V6, socket.AF_INET6),
    ],
    ids=["ipv4", "ipv6"],
)
def test_client_traffic_is_forwarded_masqueraded_and_answered(
    lab: Lab, tun: Tun, client: str, far_ip: str, gw_ip: str, family: socket.AddressFamily
) -> None:
    configure(lab, "100.64.0.1", "fd00:2021:1111::1")
    setup = HostSetup(TUN_NAME)
    lab.in_gw(setup.apply)
    try:
        assert round_trip(lab, tun, client, far_ip, family) == gw_ip  # masqueraded to the gateway's uplink address
    finally:
        lab.in_gw(setup.undo)


def iptables_nft_available() -> bool:
    return shutil.which("iptables") is not None and "nf_tables" in run(["iptables", "--version"], check=False)


def iptables_rules(lab: Lab) -> list[str]:
    """iptables-save and ip6tables-save output without the comment lines (timestamps) and counters."""
    lines = []
    for tool in ("iptables-save", "ip6tables-save"):
        text = lab.gw.exec([tool])
        lines += [re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#")]
    return lines


@pytest.mark.skipif(not iptables_nft_available(), reason="iptables (nf_tables variant) missing")
def test_firezone_install_script_rules_coexist(lab: Lab, tun: Tun) -> None:
    # docs/protocol.md §4.7's rules as Firezone's init script inserts them (uplink names match v+ here, not e+/w+),
    # on a host whose FORWARD policy is DROP as Docker leaves it.
    for iptables, source in (("iptables", "100.64.0.0/11"), ("ip6tables", "fd00:2021:1111::/107")):
        lab.gw.exec([iptables, "-P", "FORWARD", "DROP"])
        lab.gw.exec([iptables, "-I", "FORWARD", "1", "-i", TUN_NAME, "-j", "ACCEPT"])
        lab.gw.exec([iptables, "-I", "FORWARD", "1", "-o", TUN_NAME, "-j", "ACCEPT"])
        lab.gw.exec([iptables, "-t", "nat", "-A", "POSTROUTING", "-s", source, "-o", "v+", "-j", "MASQUERADE"])
    before = iptables_rules(lab)
    configure(lab, "100.64.0.1", "fd00:2021:1111::1")
    setup = HostSetup(TUN_NAME)
    lab.in_gw(setup.apply)
    try:
        assert round_trip(lab, tun, "100.64.3.4", FAR_V4, socket.AF_INET) == GW_V4
        assert round_trip(lab, tun, "fd00:2021:1111::3:4", FAR_V6, socket.AF_INET6) == GW_V6
    finally:
        lab.in_gw(setup.undo)
    assert iptables_rules(lab) == before
