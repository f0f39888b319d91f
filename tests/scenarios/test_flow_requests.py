"""A gateway that has no relay when a client asks for a resource (docs/protocol.md §2.3): the real gateway answers
``no_relays``, the dev portal (as the real one) only sends it fresh relays, and the lab client, left unanswered, asks
again 3 s after its first ask; the gateway, with a measured relay by then, confirms and the connection comes up."""

from __future__ import annotations

import time

import pytest

from lab.world import LabWorld
from tests.scenarios.helpers import SCENARIO_MARKS, assert_no_unprovoked_problems, report

pytestmark = [*SCENARIO_MARKS, pytest.mark.timeout(180)]


async def test_a_gateway_without_relays_is_asked_again_and_serves_the_client() -> None:
    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade") as world:
        await world.wait_gateway_joined(timeout=20)
        portal = world.need_portal()
        # Both relays die and the portal says so: the gateway is left with relays it cannot measure.
        for index in range(world.relays):
            world.stop_relay(index)
        await world.announce_relays_gone(list(range(world.relays)))
        since = portal.next_seq
        started = time.monotonic()
        client = await world.start_client(0, resources=[world.resource_id("lan")])
        asked = await portal.wait_for(since=since, kind="sent", event="create_authorization", timeout=20)
        await portal.wait_for(since=asked.seq, kind="received", event="no_relays", timeout=10)
        for index in range(world.relays):
            await world.start_relay(index)
        created = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=45)
        assert created["event"] == "flow_created", client.events
        await client.wait_event("established", timeout=30)
        setup = time.monotonic() - started
        retries = client.of("flow_retry")
        assert retries and retries[0]["reason"] == "unanswered", client.events
        states = [(f.state, f.reason) for f in portal.flows()]
        assert states[0] == ("superseded", "asked again") and states[-1] == ("created", None), states
        assert not [s for s in states if s[0] == "failed"], states
        report("no_relays_then_asked_again", setup_seconds=setup, asks=1 + len(retries))
        assert_no_unprovoked_problems(world)
