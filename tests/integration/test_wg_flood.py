"""A handshake flood against firezone-wg: it switches to cookie replies, and a real wireguard-go peer still gets
through (it answers the cookie with a valid MAC2 and is not rate-limited, since it floods nothing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.wg import start_interface, wg_topology

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

FLOOD_COUNT = 20_000
FLOOD_RATE = 2_000.0  # four times the under-load threshold (512 handshake messages per second), for 10 s
ATTACKER_IPS = [f"192.168.78.{host}" for host in range(10, 18)]
PORTS_PER_IP = 4


def test_a_handshake_flood_gets_cookie_replies_while_a_real_peer_still_connects(tmp_path: Path) -> None:
    with wg_topology("wgf") as topo:
        ns_go, ns_fz, ns_attacker = topo.add_ns("go"), topo.add_ns("fz"), topo.add_ns("atk")
        topo.link(ns_go, "192.168.77.1/24", ns_fz, "192.168.77.2/24")
        topo.link(
            ns_attacker,
            f"{ATTACKER_IPS[0]}/24",
            ns_fz,
            "192.168.78.1/24",
            addrs_a=[f"{ip}/24" for ip in ATTACKER_IPS[1:]],
        )
        wggo = start_interface(
            ns_go,
            "wireguard-go",
            f"wg{topo.suffix}g",
            tunnel_ip="10.77.0.1",
            underlay_ip="192.168.77.1",
            log_dir=tmp_path,
            listen_port=51820,
        )
        firezone = start_interface(
            ns_fz,
            "firezone-wg",
            f"wg{topo.suffix}f",
            tunnel_ip="10.77.0.2",
            underlay_ip="192.168.77.2",
            log_dir=tmp_path,
            listen_port=51821,
            log_level="error",  # verbose logging of 20,000 drops would only measure the logger
        )
        wggo.add_peer(firezone.public_key, endpoint="192.168.77.2:51821", allowed_ips=["10.77.0.2/32"])
        firezone.add_peer(wggo.public_key, allowed_ips=["10.77.0.1/32"])

        sources = [f"--source={ip}:{40000 + n}" for ip in ATTACKER_IPS for n in range(PORTS_PER_IP)]
        attacker = ns_attacker.popen(
            [
                sys.executable,
                "-m",
                "lab.wg",
                "flood",
                "192.168.78.1:51821",
                firezone.public_key,
                *sources,
                f"--count={FLOOD_COUNT}",
                f"--rate={FLOOD_RATE}",
            ],
            stderr=subprocess.PIPE,
        )
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == b"flooding"
        time.sleep(1.0)  # well past the under-load threshold

        # wireguard-go's first initiation is answered with a cookie; its retry after Rekey-Timeout carries MAC2.
        started = time.monotonic()
        ping = wggo.ns.exec(["ping", "-c", "1", "-w", "15", "10.77.0.2"], check=False, timeout=20)
        handshake_took = time.monotonic() - started
        flood_still_running = attacker.poll() is None
        assert re.search(r"[1-9]\d* received", ping), ping
        assert flood_still_running, f"the flood ended before the handshake ({handshake_took:.1f} s)"
        assert "Receiving cookie response" in wggo.log(), "wireguard-go never saw a cookie reply"

        out, err = attacker.communicate(timeout=40)
        assert attacker.returncode == 0, err
        result = json.loads(out.decode().strip().splitlines()[-1])
        print(f"flood: {result}; handshake after {handshake_took:.1f} s")
        assert result["sent"] == FLOOD_COUNT
        # Most of the flood arrives while under load and is answered by a cookie reply carrying a real cookie.
        assert result["cookie_replies"] > FLOOD_COUNT // 2, result
        assert result["other_replies"] == 0, result

        peer = firezone.status().peers[wggo.public_key]
        assert peer.latest_handshake > 0 and peer.rx_bytes > 0
        log = firezone.log()
        assert "ERROR" not in log and "Traceback" not in log, log[-2000:]
