"""The headless client brokered by the dev portal through the lab world's NAT routers and coturn.

The gateway here is a stand-in: the test joins the portal as a gateway over a socket made inside the wan namespace
and, on ``create_authorization``, starts ``lab.client --role gateway`` (a bare Node) in ``gw`` with the keys and
credentials the portal derived, answering ``authorization_created`` once that Node is ready and carrying its candidates
to and from the portal. The client is the real headless client in portal mode. It pings the gateway's tunnel address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import sys
from typing import Any
from urllib.parse import urlencode

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect

from dataplane.io.netlink import run_in_netns
from lab.world import GATEWAY_TOKEN, PORTAL_IP, PORTAL_PORT, LabWorld, NatMode

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(shutil.which("turnserver") is None or shutil.which("nft") is None, reason="coturn/nft missing"),
]

GATEWAY_BIND = "10.1.0.2"


class StandInGateway:
    """A gateway for the portal made of a raw channel plus a ``lab.client --role gateway`` Node process."""

    def __init__(self, world: LabWorld) -> None:
        self.world = world
        self.private_key = X25519PrivateKey.generate().private_bytes_raw()
        self.public_key = base64.b64encode(
            X25519PrivateKey.from_private_bytes(self.private_key).public_key().public_bytes_raw()
        ).decode()
        self.ws: ClientConnection | None = None
        self.ref = 0
        self.init: dict[str, Any] = {}
        self.node: asyncio.subprocess.Process | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.node_events: list[dict[str, Any]] = []

    async def join(self) -> None:
        def dial() -> socket.socket:
            return socket.create_connection((PORTAL_IP, PORTAL_PORT), timeout=5)

        sock = run_in_netns(self.world.ns["wan"].name, dial)
        query = urlencode({"external_id": "stand-in", "name": "stand-in", "public_key": self.public_key})
        self.ws = await connect(
            f"ws://{PORTAL_IP}:{PORTAL_PORT}/gateway/v2/websocket?{query}",
            sock=sock,
            additional_headers={"X-Authorization": f"Bearer {GATEWAY_TOKEN}"},
            open_timeout=5,
        )
        await self.send("phx_join", {})
        while not self.init:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
            if frame["event"] == "init":
                self.init = frame["payload"]
        self.tasks.append(asyncio.create_task(self.serve()))

    async def send(self, event: str, payload: Any) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": self.ref}))
        self.ref += 1

    async def serve(self) -> None:
        assert self.ws is not None
        async for text in self.ws:
            frame = json.loads(text)
            if frame["event"] == "create_authorization":
                await self.start_node(frame["payload"])
            elif frame["event"] in ("ice_candidates", "invalidate_ice_candidates") and self.node is not None:
                key = "candidate" if frame["event"] == "ice_candidates" else "invalidate"
                assert self.node.stdin is not None
                for sdp in frame["payload"]["candidates"]:
                    self.node.stdin.write(json.dumps({key: sdp}).encode() + b"\n")

    async def start_node(self, authorization: dict[str, Any]) -> None:
        client = authorization["client"]
        relay = self.init["relays"][0]
        local, remote = authorization["gateway_ice_credentials"], authorization["client_ice_credentials"]
        argv = [
            sys.executable,
            "-m",
            "lab.client",
            "--role",
            "gateway",
            "--id",
            client["id"],
            "--private-key",
            self.private_key.hex(),
            "--peer-public-key",
            base64.b64decode(client["public_key"]).hex(),
            "--psk",
            base64.b64decode(client["preshared_key"]).hex(),
            "--local-ice",
            f"{local['username']}:{local['password']}",
            "--remote-ice",
            f"{remote['username']}:{remote['password']}",
            "--relay",
            f"{relay['id']},{relay['addr']},{relay['username']},{relay['password']}",
            "--bind",
            GATEWAY_BIND,
            "--tun",
            "tunfzstand",
            "--tun-address",
            f"{self.init['interface']['ipv4']}/32",
            "--tun-route",
            f"{client['ipv4']}/32",
        ]
        self.node = await asyncio.create_subprocess_exec(
            *self.world.ns["gw"].argv(argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self.tasks.append(asyncio.create_task(self.pump_node(client["id"], authorization["ref"])))

    async def pump_node(self, client_id: str, ref: str) -> None:
        assert self.node is not None and self.node.stdout is not None
        while line := await self.node.stdout.readline():
            event = json.loads(line)
            self.node_events.append(event)
            if event["event"] == "ready":
                await self.send("authorization_created", {"ref": ref})
            elif event["event"] in ("candidate", "invalidated"):
                kind = (
                    "broadcast_ice_candidates"
                    if event["event"] == "candidate"
                    else "broadcast_invalidated_ice_candidates"
                )
                await self.send(kind, {"client_ids": [client_id], "candidates": [event["sdp"]]})

    async def close(self) -> None:
        if self.node is not None and self.node.returncode is None:
            assert self.node.stdin is not None
            self.node.stdin.write(b'{"quit": true}\n')
            try:
                await asyncio.wait_for(self.node.wait(), 5)
            except TimeoutError:
                self.node.kill()
                await self.node.wait()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()


@pytest.mark.parametrize(
    ("client_nat", "expected_path"),
    [("masquerade", "direct"), ("masquerade random", "relayed")],
    ids=["direct", "relayed"],
)
async def test_the_headless_client_reaches_a_brokered_gateway(
    client_nat: NatMode, expected_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with LabWorld(gateway_nat="masquerade", client_nat=client_nat, start_gateway=False) as world:
        gateway = StandInGateway(world)
        try:
            await gateway.join()
            client = await world.start_client(resources=[world.resource_id("lan")])
            created = await client.wait_event("flow_created", timeout=20)
            established = await client.wait_event("established", timeout=30)
            gateway_ip = gateway.init["interface"]["ipv4"]
            assert created["gateway_ipv4"] == gateway_ip
            ping = await world.ping("cl", gateway_ip)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            # Hole punching needs a moment after a relayed pair came first.
            for _ in range(50):
                if client.path == expected_path:
                    break
                await asyncio.sleep(0.2)
            assert client.path == expected_path, client.events
            flow = world.need_portal().flows()[0]
            assert flow.state == "created" and flow.flow_created is not None
            with capsys.disabled():
                print(
                    f"\n[lab-client] client NAT {client_nat}: path={client.path}"
                    f" create_flow→flow_created={created['flow_seconds']:.3f}s"
                    f" flow_created→established={established['setup_seconds']:.3f}s"
                )
            assert await client.quit() == 0
        finally:
            await gateway.close()
