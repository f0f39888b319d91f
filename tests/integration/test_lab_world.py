"""The lab world builds, works at the network level, hosts a joined gateway, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest

from lab.netns import run
from lab.resource import blob_sha256
from lab.world import GATEWAY_LAN_IP, RESOURCE_IP, LabWorld, NatMode

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("turnserver", "nft", "iperf3")), reason="coturn/nft/iperf3 missing"
    ),
]

BLOB_SIZE = 1024 * 1024


def _namespaces() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()}


async def test_world_builds_serves_relays_and_hosts_a_joined_gateway() -> None:
    world = LabWorld(gateway_nat="masquerade", client_nat="masquerade random", relays=2, clients=1, blob_size=BLOB_SIZE)
    async with world:
        names = {ns.name for ns in world.ns.values()}
        assert set(world.ns) == {"wan", "natg", "natc", "gw", "res", "cl"}
        assert names <= _namespaces()

        # The resource host, reached directly from the gateway's LAN side.
        fetched = await world.http_get_sha256("gw")
        assert fetched.get("matches") is True, fetched
        assert fetched["bytes"] == BLOB_SIZE and fetched["sha256"] == blob_sha256(BLOB_SIZE)

        # Both relays answer through both NATs, and see the routers' public addresses.
        for relay in (0, 1):
            assert await world.relay_binding("gw", relay) is not None
            mapped_gw, mapped_cl = await world.relay_binding("gw", relay), await world.relay_binding("cl", relay)
            assert mapped_gw is not None and mapped_gw[0] == "172.31.1.1", mapped_gw
            assert mapped_cl is not None and mapped_cl[0] == "172.31.2.1", mapped_cl

        # Nothing behind a NAT is reachable from the wan, and the client has no way onto the gateway's LAN.
        assert (await world.ping("wan", "10.1.0.2", count=1, wait=0.5)).returncode != 0
        assert (await world.ping("cl", RESOURCE_IP, count=1, wait=0.5)).returncode != 0

        # The real gateway joins the portal inside the topology and becomes ready.
        init = await world.wait_gateway_joined(timeout=20)
        relays = init.payload["relays"]
        assert {r["addr"] for r in relays} == {"172.31.0.11:3478", "172.31.0.12:3478"}
        gateway = world.need_gateway()
        await gateway.wait_readyz(200, timeout=10)
        metrics = await world.gateway_metrics()
        assert "firezone_portal_joined 1" in metrics, metrics[:500]
        assert [s.remote for s in world.need_portal().sessions] == ["172.31.1.1"]

    assert not names & _namespaces()
    assert world.gateway is not None and not world.gateway.running


async def test_plain_routing_exposes_private_addresses() -> None:
    async with LabWorld(gateway_nat="none", client_nat="none", clients=1, start_gateway=False, blob_size=4096) as world:
        mapped = await world.relay_binding("gw")
        assert mapped is not None and mapped[0] == "10.1.0.2"
        assert (await world.ping("wan", "10.2.0.2", count=1)).returncode == 0
        # The resource host is only on the gateway's LAN.
        assert (await world.ping("res", GATEWAY_LAN_IP, count=1)).returncode == 0
        assert (await world.ping("cl", RESOURCE_IP, count=1, wait=0.5)).returncode != 0

        world.set_nat("natg", "masquerade random")
        mapped = await world.relay_binding("gw")
        assert mapped is not None and mapped[0] == "172.31.1.1"
        assert (await world.ping("wan", "10.1.0.2", count=1, wait=0.5)).returncode != 0
        world.set_nat("natg", "none")
        mapped = await world.relay_binding("gw")
        assert mapped is not None and mapped[0] == "10.1.0.2"
        assert (await world.ping("wan", "10.1.0.2", count=1)).returncode == 0


async def test_a_failed_start_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    world = LabWorld(clients=0, start_gateway=False, blob_size=4096)

    async def broken_portal() -> None:
        raise subprocess.SubprocessError("the portal refuses to start on purpose")

    monkeypatch.setattr(world, "_start_portal", broken_portal)
    with pytest.raises(subprocess.SubprocessError):
        await world.start()
    assert not world.ns and not world.coturns
    assert not any(name.startswith("fzlab-") and name.endswith(world.topology.suffix) for name in _namespaces())


@pytest.mark.parametrize(
    "nat,expected_path", [("masquerade", "direct"), ("masquerade random", "relayed")], ids=["direct", "relayed"]
)
async def test_a_client_reaches_the_resource_through_the_gateway(nat: NatMode, expected_path: str) -> None:
    async with LabWorld(
        gateway_nat=nat, client_nat=nat, clients=1, resources=("lan-web",), blob_size=BLOB_SIZE
    ) as world:
        await world.wait_gateway_joined(timeout=20)
        client = await world.start_client(resources=[world.resource_id("lan-web")])
        flow = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=20)
        assert flow["event"] == "flow_created", (flow, world.need_gateway().output()[-2000:])
        await client.wait_event("established", timeout=20)
        for _ in range(50):
            if client.path == expected_path:
                break
            await asyncio.sleep(0.1)
        assert client.path == expected_path, client.events

        fetched = await world.http_get_sha256("cl")
        assert fetched.get("matches") is True, fetched
        # tcp/22 is outside lan-web's filters: the gateway answers for the resource.
        probe = await world.probe_tcp("cl", RESOURCE_IP, 22)
        assert probe["icmp"] == [3, 13], probe
        assert (await world.ping("cl", RESOURCE_IP, count=2)).returncode == 0
