"""firezone-wg against wireguard-go (Debian package), both configured with the stock `wg` tool, in two namespaces.

Namespace A runs wireguard-go, namespace B firezone-wg; they are joined by a veth pair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.netns import Topology
from lab.wg import WgInterface, WgPair, generate_keypair, generate_preshared_key, iperf3, start_interface, wg_topology

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
def topo() -> Iterator[Topology]:
    with wg_topology("wgi") as topology:
        yield topology


def assert_no_error_logged(iface: WgInterface) -> None:
    log = iface.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.mark.parametrize(
    ("firezone_role", "use_preshared_key", "ipv6_underlay"),
    [("responder", False, False), ("initiator", True, True)],
    ids=["firezone-responder", "firezone-initiator-psk-ipv6"],
)
def test_firezone_wg_interoperates_with_wireguard_go(
    topo: Topology, tmp_path: Path, firezone_role: str, use_preshared_key: bool, ipv6_underlay: bool
) -> None:
    preshared_key = generate_preshared_key() if use_preshared_key else None
    # Only the initiator knows the other's endpoint, so the roles cannot swap.
    pair = WgPair.create(
        topo,
        "wireguard-go",
        "firezone-wg",
        log_dir=tmp_path,
        preshared_key=preshared_key,
        endpoint_on_a=firezone_role == "responder",
        endpoint_on_b=firezone_role == "initiator",
        ipv6_underlay=ipv6_underlay,
    )
    wggo, firezone = pair.a, pair.b
    initiator, responder = (wggo, firezone) if firezone_role == "responder" else (firezone, wggo)

    initiator.ping(responder.tunnel_ip, count=3, deadline=10)
    responder.ping(initiator.tunnel_ip, count=3, deadline=10)
    assert initiator.tunnel_ip6 is not None and responder.tunnel_ip6 is not None
    initiator.ping(responder.tunnel_ip6, count=2, deadline=5)
    responder.ping(initiator.tunnel_ip6, count=2, deadline=5)

    # One TCP stream each way: wireguard-go → firezone-wg, then firezone-wg → wireguard-go (-R).
    forward = iperf3(wggo.ns, firezone.ns, firezone.tunnel_ip, seconds=3)
    backward = iperf3(wggo.ns, firezone.ns, firezone.tunnel_ip, seconds=3, reverse=True)
    assert forward.bytes > 0 and backward.bytes > 0

    for iface, other in ((wggo, firezone), (firezone, wggo)):
        peer = iface.status().peers[other.public_key]
        assert peer.latest_handshake > 0, f"{iface.implementation} reports no handshake"
        assert peer.rx_bytes > 1_000_000 and peer.tx_bytes > 1_000_000, peer
        assert peer.preshared_key == preshared_key
        assert peer.endpoint == f"{other.underlay_ip}:{other.listen_port()}"
        assert set(peer.allowed_ips) == {f"{other.tunnel_ip}/32", f"{other.tunnel_ip6}/128"}
    assert_no_error_logged(firezone)


def test_a_peer_with_a_wrong_public_key_never_completes_a_handshake(topo: Topology, tmp_path: Path) -> None:
    ns_a, ns_b = topo.add_ns("a"), topo.add_ns("b")
    topo.link(ns_a, "192.168.77.1/24", ns_b, "192.168.77.2/24")

    wggo = start_interface(
        ns_a,
        "wireguard-go",
        f"wg{topo.suffix}a",
        tunnel_ip="10.77.0.1",
        underlay_ip="192.168.77.1",
        log_dir=tmp_path,
        listen_port=51820,
    )
    firezone = start_interface(
        ns_b,
        "firezone-wg",
        f"wg{topo.suffix}b",
        tunnel_ip="10.77.0.2",
        underlay_ip="192.168.77.2",
        log_dir=tmp_path,
        listen_port=51821,
    )
    wrong_key = generate_keypair()[1]
    # wireguard-go knows firezone-wg's real key: its initiations reach firezone-wg, which does not know it.
    wggo.add_peer(firezone.public_key, endpoint="192.168.77.2:51821", allowed_ips=["10.77.0.2/32"])
    # firezone-wg has a wrong key for wireguard-go: its initiations carry a MAC1 wireguard-go rejects.
    firezone.add_peer(wrong_key, endpoint="192.168.77.1:51820", allowed_ips=["10.77.0.1/32"])

    wggo.ns.exec(["ping", "-c", "2", "-i", "0.5", "-W", "1", "10.77.0.2"], check=False)
    firezone.ns.exec(["ping", "-c", "2", "-i", "0.5", "-W", "1", "10.77.0.1"], check=False)

    assert firezone.status().peers[wrong_key].latest_handshake == 0
    assert wggo.status().peers[firezone.public_key].latest_handshake == 0
    assert firezone.status().peers[wrong_key].rx_bytes == 0
    assert_no_error_logged(firezone)


def test_the_endpoint_roams_when_wireguard_go_changes_its_listen_port(topo: Topology, tmp_path: Path) -> None:
    pair = WgPair.create(topo, "wireguard-go", "firezone-wg", log_dir=tmp_path)
    wggo, firezone = pair.a, pair.b
    wggo.ping(firezone.tunnel_ip, count=2)
    assert firezone.status().peers[wggo.public_key].endpoint == f"{wggo.underlay_ip}:51820"

    wggo.set_listen_port(51830)
    # The next authenticated packet from wireguard-go comes from the new port; firezone-wg must follow it.
    wggo.ping(firezone.tunnel_ip, count=2)
    assert wait_for(lambda: firezone.status().peers[wggo.public_key].endpoint == f"{wggo.underlay_ip}:51830")
    # And traffic initiated on the firezone-wg side now goes to the new port.
    firezone.ping(wggo.tunnel_ip, count=2)
    assert_no_error_logged(firezone)
