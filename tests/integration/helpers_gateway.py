"""Starting a ``firezone-gateway`` subprocess against an in-process dev portal, for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from lab.loopback_bridge import IsolatedNetns
from lab.netns import Netns
from lab.portal import DevPortal
from lab.portal.gateway_process import GatewayProcess, free_tcp_port, gateway_command
from lab.relay import Coturn
from lab.world import LabPortalConfig

__all__ = [
    "CLIENT_ID",
    "GATEWAY_TOKEN",
    "PORTAL_CONFIG",
    "RESOURCE_ID",
    "GatewayProcess",
    "free_tcp_port",
    "gateway_command",
    "requires_gateway",
    "portal_config",
    "run_gateway",
    "wait_relay_measured",
]

RELAY_PORT = 3478
GATEWAY_TOKEN = "link-test-token-5f3c9a17e2b84d06"
CLIENT_ID = "5d2c7a4e-0b1f-4e3a-9c8d-7f6e5a4b3c21"
RESOURCE_ID = "8e1b3c5d-7f9a-4b2c-8d4e-6f1a3b5c7d90"
PORTAL_CONFIG: dict[str, Any] = {
    "relay_secret": "link-test-relay-secret",
    "sites": [{"id": "site-link", "name": "link"}],
    "gateways": [{"token": GATEWAY_TOKEN, "site_id": "site-link"}],
    "resources": [
        {"id": RESOURCE_ID, "type": "cidr", "name": "LAN", "address": "172.20.0.0/16", "site_id": "site-link"}
    ],
    "clients": [
        {
            "id": CLIENT_ID,
            "public_key": "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8=",
            "ipv4": "100.93.74.51",
            "ipv6": "fd00:2021:1111::f:853b",
        }
    ],
    # A coturn inside each gateway's namespace answers here (see run_gateway).
    "relays": [{"id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8", "addrs": [f"127.0.0.1:{RELAY_PORT}"]}],
}


def portal_config() -> LabPortalConfig:
    """PORTAL_CONFIG with relay passwords the in-namespace coturn accepts."""
    return LabPortalConfig.model_validate(PORTAL_CONFIG)


requires_gateway = pytest.mark.skipif(
    importlib.util.find_spec("agent.main") is None, reason="the gateway (agent.main) is not built yet"
)


@contextlib.asynccontextmanager
async def run_gateway(
    portal: DevPortal,
    state_dir: Path,
    *,
    token: str = GATEWAY_TOKEN,
    api_url: str | None = None,
    relay: bool = True,
    **options: Any,
) -> AsyncIterator[GatewayProcess]:
    """A gateway pointed at ``portal`` (or at ``api_url``); killed on exit if the test left it running.

    It runs in a namespace of its own (its TUN device, routes and host setup stay there) with the URL's loopback port
    bridged in, so it reaches the portal at the same ``127.0.0.1`` address. With ``relay`` a coturn runs in that
    namespace on 127.0.0.1:3478 (the relay of PORTAL_CONFIG), so the gateway has a relay to answer authorizations."""
    state_dir.mkdir(parents=True, exist_ok=True)
    url = api_url or portal.url
    port = urlsplit(url).port or portal.port
    async with IsolatedNetns(ports=[port]) as netns:
        turn = None
        if relay:
            turn = Coturn(
                listen_ip="127.0.0.1", port=RELAY_PORT, secret=PORTAL_CONFIG["relay_secret"], netns=Netns(netns.name)
            )
            await asyncio.to_thread(turn.start)
        try:
            gateway = await GatewayProcess.start(
                api_url=url, token=token, state_dir=state_dir, netns=netns.name, **options
            )
            try:
                yield gateway
            finally:
                await gateway.close()
        finally:
            if turn is not None:
                await asyncio.to_thread(turn.stop)


async def wait_relay_measured(gateway: GatewayProcess, timeout: float = 10.0) -> None:
    """Until the gateway's relay answered a BINDING: only then can it serve a new client (else it says no_relays)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while 'firezone_relays{state="measured"} 0' in (metrics := await gateway.metrics()) or not metrics:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no relay measured within {timeout} s:\n{gateway.output()[-2000:]}")
        await asyncio.sleep(0.05)
