"""A load identity's ``create_flow`` against the dev portal on loopback: unanswered, it is asked again as Firezone's
client does (a gateway without relays only tells the portal), and given up when nothing ever answers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from dataplane.base import Address
from lab.loadgen import LoadClient, LoadGenerator, build_parser
from lab.portal import DevPortal
from lab.portal_channel import FlowRequests, FlowRequestTimer
from tests.unit.test_lab_client import CONFIG
from tests.unit.test_lab_client_rejoin import joined_gateway, until

pytestmark = pytest.mark.timeout(30)


class FakeGenerator:
    """What a :class:`LoadClient` reads of its generator."""

    def __init__(self, portal: DevPortal) -> None:
        self.loop = asyncio.get_running_loop()
        self.args = argparse.Namespace(portal=portal.url, resource="res-lan", rate=1.0, flow_demand=(0.0,))
        self.bind = "127.0.0.1"
        self.target = bytes(4)
        self.stopping = False
        self.pinging = False
        self.relay_addresses: set[Address] = set()
        self.settled_count = 0

    def settled(self) -> None:
        self.settled_count += 1


@contextlib.asynccontextmanager
async def running_identity(portal: DevPortal, *, answer_timeout: float) -> AsyncIterator[LoadClient]:
    generator = FakeGenerator(portal)
    client = LoadClient(1, "client-token", cast(LoadGenerator, generator))
    # Asked again 0.1 s after the first ask (and no more), not at 3/7/15 s.
    client.flow_requests = FlowRequests(demand_offsets=(0.0, 0.1), spacing=0.05, answer_timeout=answer_timeout)
    client.flow_request_timer = FlowRequestTimer(client.loop, client.flow_requests, client.on_flow_requests_due)
    link = asyncio.create_task(client.run_portal())
    try:
        yield client
    finally:
        generator.stopping = True
        link.cancel()
        await asyncio.gather(link, return_exceptions=True)
        client.close()


async def gateway_says(gateway: Any, event: str, payload: dict[str, Any], ref: int) -> None:
    await gateway.send(json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": ref}))


async def test_an_identity_asks_again_after_no_relays_and_gets_its_flow() -> None:
    async with DevPortal({**CONFIG, "authorization_timeout": 30}, host="127.0.0.1", port=0) as portal:
        async with joined_gateway(portal) as gateway:
            async with running_identity(portal, answer_timeout=20.0) as client:
                first = await portal.wait_for(kind="sent", event="create_authorization")
                await gateway_says(gateway, "no_relays", {}, 1)
                second = await portal.wait_for(kind="sent", event="create_authorization", since=first.seq + 1)
                await gateway_says(gateway, "authorization_created", {"ref": second.payload["ref"]}, 2)
                await until(lambda: client.grant is not None)
                assert client.failure is None and client.flow_retries == 1 and not client.flow_requests
        assert [f.state for f in portal.flows()][:2] == ["superseded", "created"]


async def test_an_identity_nothing_answers_fails_as_unanswered() -> None:
    async with DevPortal({**CONFIG, "authorization_timeout": 60}, host="127.0.0.1", port=0) as portal:
        async with joined_gateway(portal):
            async with running_identity(portal, answer_timeout=0.3) as client:
                await until(lambda: client.failure is not None)
                assert client.failure == "flow request unanswered" and client.grant is None
                assert client.flow_retries == 1
                assert cast(FakeGenerator, client.generator).settled_count == 1


def test_flow_demand_offsets_are_parsed_sorted_with_the_first_ask() -> None:
    parser = build_parser()
    base = ["--portal", "ws://x", "--token-prefix", "t", "--resource", "r", "--target", "10.0.0.1"]
    assert parser.parse_args(base).flow_demand == (0.0,)
    assert parser.parse_args([*base, "--flow-demand", "7,1,3, 15"]).flow_demand == (0.0, 1.0, 3.0, 7.0, 15.0)
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--flow-demand", "1,x"])
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--flow-demand", "-1"])


async def test_by_default_an_identity_asks_once_and_takes_the_portals_offline() -> None:
    # Its application sends its first packet only once connected: nothing makes Firezone's client ask again.
    async with DevPortal({**CONFIG, "authorization_timeout": 0.3}, host="127.0.0.1", port=0) as portal:
        async with joined_gateway(portal):
            generator = FakeGenerator(portal)
            client = LoadClient(1, "client-token", cast(LoadGenerator, generator))
            link = asyncio.create_task(client.run_portal())
            try:
                await until(lambda: client.failure is not None)
            finally:
                generator.stopping = True
                link.cancel()
                await asyncio.gather(link, return_exceptions=True)
                client.close()
        assert client.failure == "flow_creation_failed: offline" and client.flow_retries == 0
        assert [f.state for f in portal.flows()] == ["failed"]
