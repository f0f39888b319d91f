"""Starting a ``firezone-gateway`` subprocess against an in-process dev portal, for the integration tests."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lab.portal import DevPortal
from lab.portal.gateway_process import GatewayProcess, free_tcp_port, gateway_command

__all__ = [
    "CLIENT_ID",
    "GATEWAY_TOKEN",
    "PORTAL_CONFIG",
    "RESOURCE_ID",
    "GatewayProcess",
    "free_tcp_port",
    "gateway_command",
    "requires_gateway",
    "run_gateway",
]

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
    "relays": [{"id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8", "addrs": ["127.0.0.1:9"]}],
}

requires_gateway = pytest.mark.skipif(
    importlib.util.find_spec("agent.main") is None, reason="the gateway (agent.main) is not built yet"
)


@contextlib.asynccontextmanager
async def run_gateway(
    portal: DevPortal, state_dir: Path, *, token: str = GATEWAY_TOKEN, api_url: str | None = None, **options: Any
) -> AsyncIterator[GatewayProcess]:
    """A gateway pointed at ``portal`` (or at ``api_url``); killed on exit if the test left it running."""
    state_dir.mkdir(parents=True, exist_ok=True)
    gateway = await GatewayProcess.start(api_url=api_url or portal.url, token=token, state_dir=state_dir, **options)
    try:
        yield gateway
    finally:
        await gateway.close()
